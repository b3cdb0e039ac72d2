"""The Mamba (S6) selective scan: a sequential reference and a chunked, memory-bounded fast path.

The recurrence, per batch row, channel d and state index n (A is negative, so decays are <= 1):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t        y_t = sum_n C_t[n] * h_t[:, n]

``D`` skip and ``silu(z)`` gating are elementwise and live in the mixer, outside the scan.

Notation: B batch, L length, D channels (the mixer's inner width), N state size, T chunk length,
K number of chunks (L padded up to K * T). Chunked tensors are stored time-major: (T, B, K, ...).

Fast path (``selective_scan``): the sequence is cut into K chunks that are scanned together, one
position of every chunk per step, in two passes: (1) each chunk's end state from a zero start and
its total decay, (2) after a short K-step recurrence over chunk boundaries, each chunk again from
its true start state, emitting y. Every step touches (B, K, D, N): the (B, L, D, N) state sequence
is never built. The backward pass (a custom autograd Function) runs the adjoint recurrence the
same way and recomputes states inside chunks, in sub-blocks, from the chunk start states saved by
the forward (B, K, D, N). Optional ``reset`` (document starts in packed rows) zeroes the state
before a position. This file is copied next to saved weights: torch and the standard library only.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------- reference


def selective_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: a plain loop over time under ordinary autograd.

    Args:
        x, dt: (B, L, D) input and (already softplus-ed) time step.
        A: (D, N) negative state matrix (diagonal per channel).
        B, C: (B, L, N) input-dependent input and output projections.
        h0: (B, D, N) initial state, zeros if None.
        reset: (B, L) bool, True where a new document starts (the state is zeroed before it).

    Returns:
        y (B, L, D) and the final state (B, D, N).
    """
    batch, length, dim = x.shape
    h = x.new_zeros(batch, dim, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(length):
        a = torch.exp(dt[:, t, :, None] * A)  # (B, D, N)
        if reset is not None:
            a = a * (~reset[:, t]).to(a.dtype)[:, None, None]
        h = a * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h @ C[:, t, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1), h


def selective_state_step(
    h: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: h (B, D, N), x and dt (B, D), B and C (B, N) -> y (B, D), new h."""
    h = torch.exp(dt[:, :, None] * A) * h + (dt * x)[:, :, None] * B[:, None, :]
    return (h @ C[:, :, None]).squeeze(-1), h


# ------------------------------------------------------------------------------ chunking


def default_chunk_size(length: int) -> int:
    """Chunk length near sqrt(L) (a power of two, 8..64): few sequential steps, small tensors."""
    return int(min(64, max(8, 2 ** round(math.log2(max(length, 1)) / 2))))


def _to_chunks(v: torch.Tensor, k: int, t: int) -> torch.Tensor:
    """(B, L, ...) -> time-major chunks (T, B, K, ...), zero-padded at the end to K * T."""
    pad = k * t - v.shape[1]
    if pad:
        v = torch.cat([v, v.new_zeros(v.shape[0], pad, *v.shape[2:])], dim=1)
    v = v.reshape(v.shape[0], k, t, *v.shape[2:])
    return v.movedim(2, 0).contiguous()


def _from_chunks(v: torch.Tensor, length: int) -> torch.Tensor:
    """(T, B, K, ...) -> (B, L, ...), dropping the padding."""
    t, b, k = v.shape[:3]
    return v.movedim(0, 2).reshape(b, k * t, *v.shape[3:])[:, :length]


class _Chunks:
    """The scan inputs in chunked, time-major layout, with the decay of any step on demand."""

    def __init__(self, x, dt, A, B, C, keep, chunk_size):
        self.length = x.shape[1]
        self.t = chunk_size
        self.k = -(-self.length // chunk_size)
        self.x, self.dt = _to_chunks(x, self.k, self.t), _to_chunks(dt, self.k, self.t)  # (T, B, K, D)
        self.B, self.C = _to_chunks(B, self.k, self.t), _to_chunks(C, self.k, self.t)  # (T, B, K, N)
        self.dtx = self.dt * self.x
        # keep: (T, B, K) 0. where the state is zeroed before the step; padded steps keep (1.)
        self.keep = None if keep is None else _to_chunks(keep, self.k, self.t)
        if self.keep is not None and self.k * self.t > self.length:
            self.keep[(self.length % self.t) :, :, -1] = 1.0
        self.A = A

    def decay(self, t: int) -> torch.Tensor:
        """exp(dt_t * A), zeroed at document starts: (B, K, D, N)."""
        a = torch.exp(self.dt[t].unsqueeze(-1) * self.A)
        if self.keep is not None:
            a.mul_(self.keep[t][:, :, None, None])
        return a

    def step(self, h: torch.Tensor, t: int, a: torch.Tensor | None = None) -> torch.Tensor:
        """In place: h <- a_t * h + dt_t * x_t * B_t; returns h."""
        h.mul_(self.decay(t) if a is None else a)
        return h.addcmul_(self.dtx[t].unsqueeze(-1), self.B[t].unsqueeze(-2))

    def chunk_decay(self) -> torch.Tensor:
        """Product of the decays over each chunk: (B, K, D, N)."""
        p = torch.exp(self.dt.sum(0).unsqueeze(-1) * self.A)
        if self.keep is not None:
            p.mul_(self.keep.prod(0)[:, :, None, None])
        return p

    def state_shape(self) -> tuple[int, ...]:
        return (self.x.shape[1], self.k, self.x.shape[3], self.A.shape[1])


def _chunk_start_states(ch: _Chunks, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass 1 and the boundary recurrence: start state of each chunk (B, K, D, N), final state."""
    b, k, d, n = ch.state_shape()
    h = ch.x.new_zeros(b, d, n) if h0 is None else h0.to(ch.x.dtype)
    starts = ch.x.new_empty(b, k, d, n)
    if k == 1:
        starts[:, 0] = h
        return starts, None
    local = ch.x.new_zeros(b, k, d, n)
    for t in range(ch.t):
        ch.step(local, t)
    decay = ch.chunk_decay()
    for c in range(k):
        starts[:, c] = h
        h = decay[:, c] * h + local[:, c]
    return starts, h


def _chunk_end_adjoints(ch: _Chunks, gy: torch.Tensor, g_last: torch.Tensor | None):
    """Backward pass 1: adjoint flowing into each chunk's last step (B, K, D, N), and dL/dh0 (if K > 1)."""
    b, k, d, n = ch.state_shape()
    r = ch.x.new_zeros(b, d, n) if g_last is None else g_last.to(ch.x.dtype)
    ends = ch.x.new_empty(b, k, d, n)
    if k == 1:
        ends[:, 0] = r
        return ends, None
    lam = ch.x.new_zeros(b, k, d, n)
    for t in reversed(range(ch.t)):
        lam.addcmul_(gy[t].unsqueeze(-1), ch.C[t].unsqueeze(-2)).mul_(ch.decay(t))
    decay = ch.chunk_decay()
    for c in reversed(range(k)):
        ends[:, c] = r
        r = lam[:, c] + decay[:, c] * r
    return ends, r


class _ChunkedScan(torch.autograd.Function):
    """Chunked selective scan with recomputation inside chunks in backward (see module docstring)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, keep, chunk_size, sub_block):
        ch = _Chunks(x, dt, A, B, C, keep, chunk_size)
        starts, h_last = _chunk_start_states(ch, h0)
        h = starts.clone()
        ys = ch.x.new_empty(ch.x.shape)  # (T, B, K, D)
        for t in range(ch.t):
            ch.step(h, t)
            torch.matmul(h, ch.C[t].unsqueeze(-1), out=ys[t].unsqueeze(-1))
        if h_last is None:  # one chunk: the last step of pass 2 is the final state (padding keeps it)
            h_last = h[:, -1]
        ctx.save_for_backward(x, dt, A, B, C, h0, keep, starts)
        ctx.chunk_size, ctx.sub_block = chunk_size, sub_block
        return _from_chunks(ys, ch.length), h_last

    @staticmethod
    def backward(ctx, gy, g_last):
        x, dt, A, B, C, h0, keep, starts = ctx.saved_tensors
        ch = _Chunks(x, dt, A, B, C, keep, ctx.chunk_size)
        gy = _to_chunks(gy.to(x.dtype), ch.k, ch.t)  # (T, B, K, D)
        ends, dh0 = _chunk_end_adjoints(ch, gy, g_last)
        grads = _chunk_backward(ch, gy, starts, ends, ctx.sub_block)
        dx, ddt, dB, dC, dA, lam0 = grads
        if dh0 is None:
            dh0 = lam0[:, 0]
        return dx, ddt, dA, dB, dC, (dh0 if h0 is not None else None), None, None, None


def _chunk_backward(ch: _Chunks, gy, starts, ends, sub_block: int):
    """Backward pass 2: reverse sweep inside every chunk with the true boundary adjoints.

    States are recomputed from the chunk starts: a forward sweep keeps one checkpoint per sub-block,
    then each sub-block (from the last) recomputes its S states and walks back through them.
    """
    s = max(1, min(sub_block, ch.t))
    checkpoints = []
    h = starts.clone()
    for t in range(ch.t):
        if t % s == 0:
            checkpoints.append(h.clone())
        ch.step(h, t)
    ddtx, ddt, dB, dC = (torch.empty_like(v) for v in (ch.x, ch.x, ch.B, ch.C))
    dA_acc = torch.zeros_like(starts)  # (B, K, D, N): sum over steps of q * dt
    lam = ends.clone()  # adjoint carried from step t+1: a_{t+1} * lambda_{t+1}
    for i in reversed(range(len(checkpoints))):
        lo, hi = i * s, min((i + 1) * s, ch.t)
        prev, decays, states = checkpoints[i], [], []
        for t in range(lo, hi):  # recompute: states[j] = h_{lo+j}, decays[j] = a_{lo+j}
            decays.append(ch.decay(t))
            states.append(ch.step((states[-1] if states else prev).clone(), t, decays[-1]))
        for j in reversed(range(hi - lo)):
            t = lo + j
            h_prev = states[j - 1] if j else prev
            lam.addcmul_(gy[t].unsqueeze(-1), ch.C[t].unsqueeze(-2))  # lambda_t
            torch.matmul(gy[t].unsqueeze(-2), states[j], out=dC[t].unsqueeze(-2))
            torch.matmul(lam, ch.B[t].unsqueeze(-1), out=ddtx[t].unsqueeze(-1))
            torch.matmul(ch.dtx[t].unsqueeze(-2), lam, out=dB[t].unsqueeze(-2))
            q = lam * h_prev
            q.mul_(decays[j])  # dL/d(log a_t) = lambda_t * a_t * h_{t-1}
            ddt[t] = (q * ch.A).sum(-1)
            dA_acc.addcmul_(q, ch.dt[t].unsqueeze(-1))
            lam.mul_(decays[j])
    dx = ddtx * ch.dt
    ddt.add_(ddtx * ch.x)
    dA = dA_acc.sum((0, 1))
    n = ch.length
    return (_from_chunks(dx, n), _from_chunks(ddt, n), _from_chunks(dB, n), _from_chunks(dC, n), dA, lam)


# ---------------------------------------------------------------------------- public API


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int | None = None,
    sub_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast selective scan; same arguments and results as :func:`selective_scan_ref`.

    Computes in float32 (float64 inputs stay float64) and returns y in that dtype.

    Args:
        chunk_size: chunk length T (default: :func:`default_chunk_size`).
        sub_block: steps recomputed together in backward (default: about sqrt(T)).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = chunk_size or default_chunk_size(x.shape[1])
    s = sub_block or max(1, int(round(math.sqrt(t))))
    keep = None if reset is None else (~reset).to(dtype)
    args = (v.to(dtype) for v in (x, dt, A, B, C))
    h0 = None if h0 is None else h0.to(dtype)
    return _ChunkedScan.apply(*args, h0, keep, int(t), int(s))


def seq_idx_to_reset(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) document index per position -> (B, L) bool, True where a new document starts."""
    reset = torch.zeros_like(seq_idx, dtype=torch.bool)
    reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return reset
