"""The Mamba (S6) selective scan: a sequential reference and a memory-bounded fast path for CPU.

The recurrence, per batch row, channel d and state index n (A is negative, so decays are <= 1):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t        y_t = sum_n C_t[n] * h_t[:, n]

``D`` skip and ``silu(z)`` gating are elementwise and live in the mixer, outside the scan.

Notation: B batch, L length, D channels (the mixer's inner width), N state size, T chunk length,
K number of chunks (L padded up to K * T), P = B * K rows scanned side by side, S steps per block.
Chunked tensors are stored time-major: (T, P, ...).

Fast path (``selective_scan``). On a CPU the scan costs memory traffic over (..., D, N) tensors,
not arithmetic, so it is organised around the cache: the recurrence walks through time one step
at a time over every row at once (a step touches one (P, D, N) tensor), and everything else (the
decays, the inputs, the contraction with C, the gradient reductions) is done per block of S steps
in (S, P, D, N) buffers that are allocated once and reused. The (B, L, D, N) state sequence is
never built: the forward keeps the state at each block start, (T / S + 1) x (P, D, N); the
backward (a custom autograd Function) recomputes one block of states at a time from them, runs
the adjoint recurrence backwards through it and reduces the gradients with batched products.
(Mamba-2's chunked "SSD" form, which turns a chunk into (T, T) matrix products, needs one decay
per head; Mamba-1 has one per (channel, state) pair, where that form costs T/2 times the exps or
factors exp(+x) that overflow. The reductions over D, N and time are the matrix products here.)

Chunks (K > 1) are for narrow scans, where one step's (B, D, N) tensor is too small for an
operation on it to be efficient: the sequence is cut into K chunks scanned side by side. The
forward then runs twice: each chunk from a zero start for its end state, a K-step recurrence over
the chunk boundaries for the true start states, then each chunk again from its start, emitting y;
the backward does the same with the adjoints. ``default_chunk_size`` takes one chunk when a step
is wide enough. Optional ``reset`` (document starts in packed rows) zeroes the state before a
position. This file is copied next to saved weights: torch and the standard library only.
"""

from __future__ import annotations

import math

import torch

# A step should touch about this many state elements (B * K * D * N): enough for an element-wise
# operation to cost more than its dispatch, few enough to stay in cache.
STEP_ELEMENTS = 1 << 16

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


def default_chunk_size(length: int, width: int) -> int:
    """Chunk length T for ``length`` steps over ``width`` = B * D * N state elements.

    The whole sequence (one chunk) when a step is at least ``STEP_ELEMENTS`` wide; otherwise
    enough chunks side by side to make it so, each at least 16 steps long.
    """
    k = max(1, min(STEP_ELEMENTS // max(width, 1), length // 16))
    return -(-length // k)


def _to_chunks(v: torch.Tensor, k: int, t: int) -> torch.Tensor:
    """(B, L, ...) -> time-major chunks (T, B * K, ...), zero-padded at the end to K * T."""
    pad = k * t - v.shape[1]
    if pad:
        v = torch.cat([v, v.new_zeros(v.shape[0], pad, *v.shape[2:])], dim=1)
    v = v.reshape(v.shape[0], k, t, *v.shape[2:]).movedim(2, 0)  # (T, B, K, ...)
    return v.reshape(t, v.shape[1] * k, *v.shape[3:]).contiguous()


def _from_chunks(v: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(T, B * K, ...) -> (B, L, ...), contiguous, dropping the padding."""
    t, p = v.shape[:2]
    v = v.reshape(t, batch, p // batch, *v.shape[2:]).movedim(0, 2)  # (B, K, T, ...)
    return v.reshape(batch, p // batch * t, *v.shape[3:])[:, :length].contiguous()


class _Chunks:
    """The scan inputs in chunked, time-major layout, and the block buffers the passes reuse."""

    def __init__(self, x, dt, A, B, C, keep, chunk_size: int, block: int):
        self.batch, self.length = x.shape[:2]
        self.t = max(1, min(chunk_size, self.length))
        self.k = -(-self.length // self.t)
        self.s = max(1, min(block, self.t))
        self.x, self.dt = _to_chunks(x, self.k, self.t), _to_chunks(dt, self.k, self.t)  # (T, P, D)
        self.B, self.C = _to_chunks(B, self.k, self.t), _to_chunks(C, self.k, self.t)  # (T, P, N)
        self.dtx = self.dt * self.x
        # keep: (T, P), 0. where the state is zeroed before the step; padded steps keep (1.)
        self.keep = None if keep is None else _to_chunks(keep, self.k, self.t)
        if self.keep is not None and self.k * self.t > self.length:
            self.keep.view(self.t, self.batch, self.k)[(self.length % self.t) :, :, -1] = 1.0
        self.A = A
        self.A2 = A * math.log2(math.e)  # exp2 is faster than exp on CPU: exp(dt * A) = exp2(dt * A2)
        p, d, n = self.x.shape[1], x.shape[2], A.shape[1]
        self.state_shape = (p, d, n)
        self._a = self.x.new_empty(self.s, p, d, n)  # decays of a block
        self._u = self.x.new_empty(self.s, p, d, n)  # inputs, then states of a block
        self._g: torch.Tensor | None = None  # adjoints of a block (backward only)
        self.ones = self.x.new_ones(max(self.s * p, n))  # sums as matrix products

    def blocks(self) -> list[tuple[int, int]]:
        """[lo, hi) step ranges of the blocks that are vectorised together."""
        return [(lo, min(lo + self.s, self.t)) for lo in range(0, self.t, self.s)]

    def chunk_view(self, v: torch.Tensor) -> torch.Tensor:
        """(P, ...) -> (B, K, ...)."""
        return v.view(self.batch, self.k, *v.shape[1:])

    def decays(self, lo: int, hi: int) -> torch.Tensor:
        """exp(dt * A) for steps lo..hi-1, zeroed at document starts: (S, P, D, N), in a reused buffer."""
        a = self._a[: hi - lo]
        torch.exp2(torch.mul(self.dt[lo:hi, :, :, None], self.A2, out=a), out=a)
        if self.keep is not None:
            a.mul_(self.keep[lo:hi, :, None, None])
        return a

    def inputs(self, lo: int, hi: int) -> torch.Tensor:
        """dt * x * B for steps lo..hi-1: (S, P, D, N), in a reused buffer."""
        return torch.mul(self.dtx[lo:hi, :, :, None], self.B[lo:hi, :, None, :], out=self._u[: hi - lo])

    def output_adjoints(self, gy: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """dL/dh_t through y_t alone, gy_t * C_t, for steps lo..hi-1: (S, P, D, N), in a reused buffer."""
        if self._g is None:
            self._g = torch.empty_like(self._a)
        return torch.mul(gy[lo:hi, :, :, None], self.C[lo:hi, :, None, :], out=self._g[: hi - lo])

    def chunk_decay(self) -> torch.Tensor:
        """Product of the decays over each chunk: (P, D, N)."""
        p = torch.exp(self.dt.sum(0).unsqueeze(-1) * self.A)
        if self.keep is not None:
            p.mul_(self.keep.prod(0)[:, None, None])
        return p


def _recur(a: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """States of one block, in place in u: u[j] <- a[j] * u[j-1] + u[j] with u[-1] = h. One op per step."""
    for j in range(a.shape[0]):
        u[j].addcmul_(a[j], u[j - 1] if j else h)
    return u


def _sweep(ch: _Chunks, h: torch.Tensor, ys: torch.Tensor | None = None) -> torch.Tensor:
    """Run every chunk from its start state h (P, D, N); optionally write y (T, P, D).

    Returns the state at every block start and, last, at the end: (T / S + 1, P, D, N).
    """
    blocks = ch.blocks()
    states_at = h.new_empty(len(blocks) + 1, *h.shape)
    states_at[0] = h
    for i, (lo, hi) in enumerate(blocks):
        states = _recur(ch.decays(lo, hi), ch.inputs(lo, hi), states_at[i])  # (S, P, D, N)
        if ys is not None:
            _contract_n(ch.C[lo:hi], states, out=ys[lo:hi])
        states_at[i + 1] = states[-1]
    return states_at


def _chunk_starts(ch: _Chunks, h0: torch.Tensor | None) -> torch.Tensor:
    """Start state of every chunk (P, D, N): forward pass 1 and the recurrence over chunk boundaries."""
    b, (p, d, n) = ch.batch, ch.state_shape
    h = ch.x.new_zeros(b, d, n) if h0 is None else h0
    if ch.k == 1:
        return h
    local = ch.chunk_view(_sweep(ch, ch.x.new_zeros(p, d, n))[-1])  # (B, K, D, N) ends from zero starts
    decay = ch.chunk_view(ch.chunk_decay())
    starts = ch.x.new_empty(b, ch.k, d, n)
    for c in range(ch.k):
        starts[:, c] = h
        h = decay[:, c] * h + local[:, c]
    return starts.view(p, d, n)


def _adjoint_block(a: torch.Tensor, g: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """Adjoints of one block in place in g (reverse recurrence): g[j] <- g[j] + a[j+1] * g[j+1]."""
    g[-1].add_(carry)
    for j in reversed(range(g.shape[0] - 1)):
        g[j].addcmul_(a[j + 1], g[j + 1])
    return g


def _chunk_end_adjoints(ch: _Chunks, gy: torch.Tensor, g_last: torch.Tensor):
    """Backward pass 1: adjoint flowing into each chunk's last step (P, D, N), and dL/dh0.

    With one chunk that is g_last, and dL/dh0 comes out of pass 2 (None here).
    """
    b, (p, d, n) = ch.batch, ch.state_shape
    if ch.k == 1:
        return g_last.clone(), None
    carry = ch.x.new_zeros(p, d, n)  # adjoint that leaves each chunk through its first step
    for lo, hi in reversed(ch.blocks()):
        a = ch.decays(lo, hi)
        g = _adjoint_block(a, ch.output_adjoints(gy, lo, hi), carry)
        torch.mul(a[0], g[0], out=carry)
    carry, decay = ch.chunk_view(carry), ch.chunk_view(ch.chunk_decay())
    ends = ch.x.new_empty(b, ch.k, d, n)
    r = g_last
    for c in reversed(range(ch.k)):
        ends[:, c] = r
        r = carry[:, c] + decay[:, c] * r
    return ends.view(p, d, n), r


def _contract_n(v: torch.Tensor, states: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[s, p, d] = sum_n v[s, p, n] * states[s, p, d, n]; v (S, P, N), states (S, P, D, N)."""
    s, p, d, n = states.shape
    return torch.bmm(v.view(s * p, 1, n), states.view(s * p, d, n).transpose(1, 2), out=out.view(s * p, 1, d))


def _contract_d(v: torch.Tensor, states: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[s, p, n] = sum_d v[s, p, d] * states[s, p, d, n]; v (S, P, D), states (S, P, D, N)."""
    s, p, d, n = states.shape
    return torch.bmm(v.view(s * p, 1, d), states.view(s * p, d, n), out=out.view(s * p, 1, n))


def _decay_grads(q: torch.Tensor, ch: _Chunks, lo: int, hi: int, ddt: torch.Tensor, dA: torch.Tensor):
    """From q = dL/d(dt * A) (S, P, D, N) of steps lo..hi-1: ddt (S, P, D) <- sum_n A q, dA (D, N) += sum dt q.

    Both reductions are matrix products with a vector of ones; the block buffers hold the products.
    """
    s, p, d, n = q.shape
    torch.mv(torch.mul(q, ch.A, out=ch._a[:s]).view(-1, n), ch.ones[:n], out=ddt.view(-1))
    qdt = torch.mul(q, ch.dt[lo:hi, :, :, None], out=ch._u[:s]).view(s * p, d * n)
    dA.view(1, -1).addmm_(ch.ones[None, : s * p], qdt)


def _chunk_backward(ch: _Chunks, gy: torch.Tensor, states_at: torch.Tensor, ends: torch.Tensor):
    """Backward pass 2: reverse sweep inside every chunk with the true boundary adjoints.

    Each block (from the last) recomputes its S states from the state saved at its start, runs
    the adjoint recurrence through them and forms the gradients with batched products. Returns
    dx, ddt, dB, dC (chunked), dA, and the adjoint leaving each chunk through its first step.
    """
    ddtx, ddt, dB, dC = (torch.empty_like(v) for v in (ch.x, ch.x, ch.B, ch.C))
    dA = torch.zeros_like(ch.A)
    carry = ends
    for i, (lo, hi) in reversed(list(enumerate(ch.blocks()))):
        a = ch.decays(lo, hi)
        states = _recur(a, ch.inputs(lo, hi), states_at[i])  # h_t, (S, P, D, N)
        g = _adjoint_block(a, ch.output_adjoints(gy, lo, hi), carry)  # lambda_t = dL/dh_t
        _contract_d(gy[lo:hi], states, out=dC[lo:hi])  # sum_d gy h
        _contract_n(ch.B[lo:hi], g, out=ddtx[lo:hi])  # sum_n lambda B
        _contract_d(ch.dtx[lo:hi], g, out=dB[lo:hi])  # sum_d lambda dtx
        q = g.mul_(a)  # a_t * lambda_t (lambda is not needed any more)
        carry = q[0].clone()
        q[1:].mul_(states[:-1])
        q[0].mul_(states_at[i])  # q_t = dL/d(dt_t * A) = lambda_t * a_t * h_{t-1}
        _decay_grads(q, ch, lo, hi, ddt[lo:hi], dA)  # a and the states are not needed any more
    dx = ddtx * ch.dt
    ddt.addcmul_(ddtx, ch.x)
    return dx, ddt, dB, dC, dA, carry


class _ChunkedScan(torch.autograd.Function):
    """Chunked selective scan with recomputation inside blocks in backward (see module docstring)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, keep, chunk_size, block):
        ch = _Chunks(x, dt, A, B, C, keep, chunk_size, block)
        ys = ch.x.new_empty(ch.x.shape)  # (T, P, D)
        states_at = _sweep(ch, _chunk_starts(ch, h0), ys=ys)  # (T / S + 1, P, D, N)
        h_last = ch.chunk_view(states_at[-1])[:, -1]  # padding keeps the state: the last chunk's end
        ctx.save_for_backward(x, dt, A, B, C, h0, keep, states_at)
        ctx.chunk_size, ctx.block = chunk_size, block
        return _from_chunks(ys, ch.batch, ch.length), h_last.clone()

    @staticmethod
    def backward(ctx, gy, g_last):
        x, dt, A, B, C, h0, keep, states_at = ctx.saved_tensors
        ch = _Chunks(x, dt, A, B, C, keep, ctx.chunk_size, ctx.block)
        gy = _to_chunks(gy.to(x.dtype), ch.k, ch.t)  # (T, P, D)
        ends, dh0 = _chunk_end_adjoints(ch, gy, g_last.to(x.dtype))
        dx, ddt, dB, dC, dA, first = _chunk_backward(ch, gy, states_at, ends)
        if dh0 is None:
            dh0 = first
        grads = [_from_chunks(v, ch.batch, ch.length) for v in (dx, ddt)] + [dA]
        grads += [_from_chunks(v, ch.batch, ch.length) for v in (dB, dC)]
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
            about 3 * S * (P, D, N) for P = B * K rows.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, length, dim = x.shape
    t = chunk_size or default_chunk_size(length, batch * dim * A.shape[1])
    keep = None if reset is None else (~reset).to(dtype)
    args = (v.to(dtype) for v in (x, dt, A, B, C))
    h0 = None if h0 is None else h0.to(dtype)
    return _ChunkedScan.apply(*args, h0, keep, int(t), int(block))


def seq_idx_to_reset(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) document index per position -> (B, L) bool, True where a new document starts."""
    reset = torch.zeros_like(seq_idx, dtype=torch.bool)
    reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return reset
