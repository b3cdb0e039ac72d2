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
    """Chunk length near sqrt(L) (a power of two, 16..64): few sequential steps, small tensors."""
    return int(min(64, max(16, 2 ** round(math.log2(max(length, 1)) / 2))))


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
    """The scan inputs in chunked, time-major layout; builds the inputs of a block of S steps."""

    def __init__(self, x, dt, A, B, C, keep, chunk_size: int, block: int):
        self.length = x.shape[1]
        self.t = chunk_size
        self.k = -(-self.length // chunk_size)
        self.s = max(1, min(block, chunk_size))
        self.x, self.dt = _to_chunks(x, self.k, self.t), _to_chunks(dt, self.k, self.t)  # (T, B, K, D)
        self.B, self.C = _to_chunks(B, self.k, self.t), _to_chunks(C, self.k, self.t)  # (T, B, K, N)
        self.dtx = self.dt * self.x
        # keep: (T, B, K), 0. where the state is zeroed before the step; padded steps keep (1.)
        self.keep = None if keep is None else _to_chunks(keep, self.k, self.t)
        if self.keep is not None and self.k * self.t > self.length:
            self.keep[(self.length % self.t) :, :, -1] = 1.0
        self.A = A

    def blocks(self) -> list[tuple[int, int]]:
        """[lo, hi) step ranges of the blocks that are vectorised together."""
        return [(lo, min(lo + self.s, self.t)) for lo in range(0, self.t, self.s)]

    def decays(self, lo: int, hi: int) -> torch.Tensor:
        """exp(dt * A) for steps lo..hi-1, zeroed at document starts: (S, B, K, D, N)."""
        a = torch.exp(self.dt[lo:hi].unsqueeze(-1) * self.A)
        if self.keep is not None:
            a.mul_(self.keep[lo:hi, :, :, None, None])
        return a

    def inputs(self, lo: int, hi: int) -> torch.Tensor:
        """dt * x * B for steps lo..hi-1: (S, B, K, D, N)."""
        return self.dtx[lo:hi].unsqueeze(-1) * self.B[lo:hi].unsqueeze(-2)

    def chunk_decay(self) -> torch.Tensor:
        """Product of the decays over each chunk: (B, K, D, N)."""
        p = torch.exp(self.dt.sum(0).unsqueeze(-1) * self.A)
        if self.keep is not None:
            p.mul_(self.keep.prod(0)[:, :, None, None])
        return p

    def state_shape(self) -> tuple[int, int, int, int]:
        return (self.x.shape[1], self.k, self.x.shape[3], self.A.shape[1])


def _recur(a: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """States of one block, in place in u: u[j] <- a[j] * u[j-1] + u[j] with u[-1] = h. One op per step."""
    for j in range(a.shape[0]):
        u[j].addcmul_(a[j], u[j - 1] if j else h)
    return u


def _sweep(ch: _Chunks, h: torch.Tensor, ys: torch.Tensor | None = None, checkpoints: list | None = None):
    """Run every chunk from its start state h (B, K, D, N); optionally emit y and block-start states."""
    for lo, hi in ch.blocks():
        if checkpoints is not None:
            checkpoints.append(h)
        states = _recur(ch.decays(lo, hi), ch.inputs(lo, hi), h)  # (S, B, K, D, N)
        if ys is not None:
            torch.matmul(states, ch.C[lo:hi].unsqueeze(-1), out=ys[lo:hi].unsqueeze(-1))
        h = states[-1].clone()
    return h


def _chunk_start_states(ch: _Chunks, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward pass 1 and the boundary recurrence: start state of each chunk (B, K, D, N), final state."""
    b, k, d, n = ch.state_shape()
    h = ch.x.new_zeros(b, d, n) if h0 is None else h0
    starts = ch.x.new_empty(b, k, d, n)
    if k == 1:
        starts[:, 0] = h
        return starts, None
    local = _sweep(ch, ch.x.new_zeros(b, k, d, n))
    decay = ch.chunk_decay()
    for c in range(k):
        starts[:, c] = h
        h = decay[:, c] * h + local[:, c]
    return starts, h


def _adjoint_block(a: torch.Tensor, g: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """Adjoints of one block in place in g (reverse recurrence): g[j] <- g[j] + a[j+1] * g[j+1]."""
    g[-1].add_(carry)
    for j in reversed(range(g.shape[0] - 1)):
        g[j].addcmul_(a[j + 1], g[j + 1])
    return g


def _chunk_end_adjoints(ch: _Chunks, gy: torch.Tensor, g_last: torch.Tensor):
    """Backward pass 1: adjoint flowing into each chunk's last step (B, K, D, N), and dL/dh0 (K > 1)."""
    b, k, d, n = ch.state_shape()
    r = g_last
    ends = ch.x.new_empty(b, k, d, n)
    if k == 1:
        ends[:, 0] = r
        return ends, None
    carry = ch.x.new_zeros(b, k, d, n)
    for lo, hi in reversed(ch.blocks()):
        a = ch.decays(lo, hi)
        lam = _adjoint_block(a, gy[lo:hi].unsqueeze(-1) * ch.C[lo:hi].unsqueeze(-2), carry)
        carry = a[0] * lam[0]
    decay = ch.chunk_decay()
    for c in reversed(range(k)):
        ends[:, c] = r
        r = carry[:, c] + decay[:, c] * r
    return ends, r


def _chunk_backward(ch: _Chunks, gy: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor):
    """Backward pass 2: reverse sweep inside every chunk with the true boundary adjoints.

    A forward sweep from the chunk starts keeps one state per block; each block (from the last)
    then recomputes its S states, runs the adjoint recurrence through them and forms the gradients
    with batched products. Returns dx, ddt, dB, dC (chunked), dA, and a_0 * lambda_0 per chunk.
    """
    checkpoints: list[torch.Tensor] = []
    _sweep(ch, starts, checkpoints=checkpoints)
    ddtx, ddt, dB, dC = (torch.empty_like(v) for v in (ch.x, ch.x, ch.B, ch.C))
    dA = torch.zeros_like(ch.A)
    carry = ends
    for (lo, hi), h_start in zip(reversed(ch.blocks()), reversed(checkpoints), strict=True):
        a = ch.decays(lo, hi)
        states = _recur(a, ch.inputs(lo, hi), h_start)  # h_t, (S, B, K, D, N)
        lam = _adjoint_block(a, gy[lo:hi].unsqueeze(-1) * ch.C[lo:hi].unsqueeze(-2), carry)
        torch.matmul(gy[lo:hi].unsqueeze(-2), states, out=dC[lo:hi].unsqueeze(-2))  # sum_d gy h
        torch.matmul(lam, ch.B[lo:hi].unsqueeze(-1), out=ddtx[lo:hi].unsqueeze(-1))  # sum_n lam B
        torch.matmul(ch.dtx[lo:hi].unsqueeze(-2), lam, out=dB[lo:hi].unsqueeze(-2))  # sum_d lam dtx
        q = lam.mul_(a)  # a_t * lambda_t (lam is not needed any more)
        carry = q[0].clone()
        q[1:].mul_(states[:-1])
        q[0].mul_(h_start)  # q_t = dL/d(log a_t) = lambda_t * a_t * h_{t-1}
        ddt[lo:hi] = (q * ch.A).sum(-1)
        dA += torch.einsum("sbkdn,sbkd->dn", q, ch.dt[lo:hi])
    dx = ddtx * ch.dt
    ddt.add_(ddtx * ch.x)
    return dx, ddt, dB, dC, dA, carry


class _ChunkedScan(torch.autograd.Function):
    """Chunked selective scan with recomputation inside chunks in backward (see module docstring)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, keep, chunk_size, block):
        ch = _Chunks(x, dt, A, B, C, keep, chunk_size, block)
        starts, h_last = _chunk_start_states(ch, h0)
        ys = ch.x.new_empty(ch.x.shape)  # (T, B, K, D)
        h = _sweep(ch, starts, ys=ys)
        if h_last is None:  # one chunk: the end of pass 2 is the final state (padding keeps it)
            h_last = h[:, -1]
        ctx.save_for_backward(x, dt, A, B, C, h0, keep, starts)
        ctx.chunk_size, ctx.block = chunk_size, block
        return _from_chunks(ys, ch.length), h_last

    @staticmethod
    def backward(ctx, gy, g_last):
        x, dt, A, B, C, h0, keep, starts = ctx.saved_tensors
        ch = _Chunks(x, dt, A, B, C, keep, ctx.chunk_size, ctx.block)
        gy = _to_chunks(gy.to(x.dtype), ch.k, ch.t)  # (T, B, K, D)
        ends, dh0 = _chunk_end_adjoints(ch, gy, g_last.to(x.dtype))
        dx, ddt, dB, dC, dA, first = _chunk_backward(ch, gy, starts, ends)
        if dh0 is None:
            dh0 = first[:, 0]
        n = ch.length
        grads = [_from_chunks(v, n) for v in (dx, ddt)] + [dA] + [_from_chunks(v, n) for v in (dB, dC)]
        return (*grads, dh0 if h0 is not None else None, None, None, None)


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
    block: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast selective scan; same arguments and results as :func:`selective_scan_ref`.

    Computes in float32 (float64 inputs stay float64) and returns y in that dtype.

    Args:
        chunk_size: chunk length T (default: :func:`default_chunk_size`).
        block: steps whose inputs are built and reduced together (S); the working memory is
            about 4 * S * (B, K, D, N) for K = L / T chunks.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = chunk_size or default_chunk_size(x.shape[1])
    keep = None if reset is None else (~reset).to(dtype)
    args = (v.to(dtype) for v in (x, dt, A, B, C))
    h0 = None if h0 is None else h0.to(dtype)
    return _ChunkedScan.apply(*args, h0, keep, int(t), int(block))


def seq_idx_to_reset(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) document index per position -> (B, L) bool, True where a new document starts."""
    reset = torch.zeros_like(seq_idx, dtype=torch.bool)
    reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return reset
