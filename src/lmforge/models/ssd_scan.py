"""The Mamba-2 (SSD) scan: a sequential reference, the chunked fast path for CPU, one decoding step.

Notation: b batch, l length, h heads, p head dim, g groups (h % g == 0, head i reads group
i // r with r = h // g heads per group), n state size; chunked: k chunks of t steps (l padded up
to k * t). The recurrence, per head (its decay is one scalar per step, A is negative):

    state_s = exp(dt_s * A) * state_{s-1} + dt_s * x_s (outer) B_s        y_s = state_s @ C_s

with state (p, n), x_s (p,), B_s and C_s (n,) of the head's group. ``D`` skip and gating are
elementwise and live in the mixer, outside the scan. ``seq_idx`` (documents packed in a row)
zeroes the state where it changes; ``h0`` is the start state of the first document.

Fast path (``ssd_scan``), the state-space duality: with cs the cumulative sum of dt * A inside a
chunk, y of a chunk is a causal "attention" within it plus the contribution of the state it
starts from,

    y_s = sum_{u <= s} exp(cs_s - cs_u) (C_s . B_u) dt_u x_u  +  exp(cs_s) C_s @ start^T

and the chunk's end state is its start state times exp(cs_last) plus
sum_u exp(cs_last - cs_u) dt_u x_u (outer) B_u. So a chunk costs batched matrix products:
C B^T once per group (b, k, g, t, t), times each head's decay matrix, times dt x; the end states
(b, k, h, p, n) as one product per group over the chunk's steps (a group's heads side by side);
C times the start states, one product per group. Only the start states need a recurrence, k
steps over chunk ends. B and C are never repeated per head, and no (t, t, n) or (t, t, p)
broadcast is built. Every exponent is a sum of dt * A over a span of steps (<= 0; inside a chunk a
difference of cumulative sums), -inf where no path exists (the future, another document) so that
exp gives exact zeros and nothing overflows; exp2 of log2-scaled sums, which is faster on CPU.
The backward is written by hand (``_ChunkedScan``): the same products transposed, the adjoint
recurrence over chunk ends run backwards, and the decay gradients as sums of the saved products.
It saves O(b l h (t + p) + b l h p n / t) numbers; the (b, l, h, p, n) state sequence is never built.
This file is copied next to saved weights: torch and the standard library only.
"""

from __future__ import annotations

import math

import torch

# Chosen by benchmarks/bench_ssd_scan.py (see benchmarks/results/ssd_scan.md).
DEFAULT_CHUNK_SIZE = 64
LOG2_E = math.log2(math.e)

# ---------------------------------------------------------------------------- reference


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shapes(x, dt, A, B, C, h0, seq_idx) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, heads, head_dim), got shape {tuple(x.shape)}")
    b, length, h, p = x.shape
    if length == 0:
        raise ValueError("x must have at least one step (x.shape[1] = 0)")
    if B.dim() != 4 or B.shape[:2] != (b, length) or B.shape != C.shape:
        raise ValueError(f"B and C must both be (batch, length, groups, state) = ({b}, {length}, g, n), "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[2:]
    if g == 0 or h % g:
        raise ValueError(f"groups (B.shape[2] = {g}) must divide heads (x.shape[2] = {h})")
    if dt.shape != (b, length, h):
        raise ValueError(f"dt must be (batch, length, heads) = {(b, length, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (heads,) = ({h},), got {tuple(A.shape)}")
    if h0 is not None and h0.shape != (b, h, p, n):
        raise ValueError(f"h0 must be (batch, heads, head_dim, state) = {(b, h, p, n)}, got {tuple(h0.shape)}")
    if seq_idx is not None and seq_idx.shape != (b, length):
        raise ValueError(f"seq_idx must be (batch, length) = {(b, length)}, got {tuple(seq_idx.shape)}")


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: a plain loop over time under ordinary autograd.

    Args:
        x: (b, l, h, p) input.
        dt: (b, l, h) time step, > 0 (already softplus-ed, biased and clamped).
        A: (h,) negative decay rate per head.
        B, C: (b, l, g, n) input and output projections; head i reads group i // (h // g).
        h0: (b, h, p, n) start state, zeros if None.
        seq_idx: (b, l) document index; the state is zeroed where it changes from the previous
            position (``h0`` is the start of the first document only).

    Returns:
        y (b, l, h, p) and the final state (b, h, p, n), in float32 (float64 inputs: float64).
    """
    _check_shapes(x, dt, A, B, C, h0, seq_idx)
    dtype = _compute_dtype(x)
    x, dt, A, B, C = (v.to(dtype) for v in (x, dt, A, B, C))
    b, length, h, p = x.shape
    g, n = B.shape[2:]
    state = x.new_zeros(b, h, p, n) if h0 is None else h0.to(dtype)
    ys = []
    for s in range(length):
        if seq_idx is not None and s > 0:
            keep = (seq_idx[:, s] == seq_idx[:, s - 1]).to(dtype)
            state = state * keep[:, None, None, None]
        y, state = ssd_step(state, x[:, s], dt[:, s], A, B[:, s], C[:, s])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: state (b, h, p, n), x (b, h, p), dt (b, h), A (h,), B and C (b, g, n)
    -> y (b, h, p) and the new state (b, h, p, n). Same dtypes as the scans."""
    dtype = _compute_dtype(x)
    state, x, dt, A, B, C = (v.to(dtype) for v in (state, x, dt, A, B, C))
    b, h, p = x.shape
    g, n = B.shape[1:]
    with torch.autocast(x.device.type, enabled=False):  # float32 product, also under autocast
        decay = torch.exp(dt * A)  # (b, h)
        xdt = (x * dt[..., None]).view(b, g, h // g, p, 1)
        state = decay[..., None, None] * state + (xdt * B[:, :, None, None, :]).view(b, h, p, n)
        y = state.view(b, g, h // g * p, n) @ C[..., None]  # (b, g, r * p, 1)
    return y.view(b, h, p), state


# ------------------------------------------------------------------------------ chunked


def _segments(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) document index -> (b, l) segment number: 0 at position 0, +1 wherever seq_idx changes."""
    changed = torch.zeros_like(seq_idx, dtype=torch.long)
    changed[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return changed.cumsum(1)


def _pad_steps(v: torch.Tensor, pad: int) -> torch.Tensor:
    """Zeros appended along dim 1 (padded steps have dt = 0: they keep the state and add nothing)."""
    if not pad:
        return v
    return torch.cat([v, v.new_zeros(v.shape[0], pad, *v.shape[2:])], dim=1)


class _Chunks:
    """Shapes of a chunked scan and the layout changes between (b, l, ...) and chunked tensors.

    Two chunked layouts: by group, (b, k, g, t, r * p) for x-like and (b, k, g, t, n) for B and
    C, where a group's heads are the columns of one matrix per chunk (views of the input when
    g = 1); and by head, (b, k, h, t, ...), for the per-head decays and the in-chunk products.
    """

    def __init__(self, x: torch.Tensor, g: int, t: int):
        self.b, self.length, self.h, self.p = x.shape
        self.g, self.r, self.t = g, self.h // g, t
        self.k = -(-self.length // t)
        self.pad = self.k * t - self.length

    def by_group(self, v: torch.Tensor) -> torch.Tensor:
        """(b, l, h, p) or (b, l, g, n) -> (b, k, g, t, r * p) or (b, k, g, t, n), zero-padded."""
        v = _pad_steps(v, self.pad)
        return v.reshape(self.b, self.k, self.t, self.g, -1).transpose(2, 3).contiguous()

    def by_head(self, v: torch.Tensor) -> torch.Tensor:
        """(b, l, h) -> (b, k, h, t), zero-padded."""
        return _pad_steps(v, self.pad).reshape(self.b, self.k, self.t, self.h).transpose(2, 3).contiguous()

    def groups_by_head(self, v: torch.Tensor) -> torch.Tensor:
        """(b, k, g, t, r * p) -> (b, k, h, t, p), a copy."""
        b, k, g, r, t = self.b, self.k, self.g, self.r, self.t
        return v.view(b, k, g, t, r, -1).transpose(3, 4).reshape(b, k, self.h, t, -1)

    def heads_view(self, v: torch.Tensor) -> torch.Tensor:
        """(b, k, g, t, r * p) -> (b, k, g, r, t, p), a view."""
        return v.view(self.b, self.k, self.g, self.t, self.r, -1).transpose(3, 4)

    def columns_view(self, v: torch.Tensor) -> torch.Tensor:
        """(b, k, h, t, p) -> (b, k, g, t, r, p), a view."""
        return v.view(self.b, self.k, self.g, self.r, self.t, -1).transpose(3, 4)

    def per_column(self, w: torch.Tensor) -> torch.Tensor:
        """Per-head (b, k, h, t) -> (b, k, g, t, r, 1), to scale a (b, k, g, t, r, p) view."""
        return w.view(self.b, self.k, self.g, self.r, self.t).transpose(3, 4)[..., None]

    def split_columns(self, v: torch.Tensor) -> torch.Tensor:
        """(b, k, g, t, r * p) -> (b, k, g, t, r, p), a view."""
        return v.view(self.b, self.k, self.g, self.t, self.r, -1)

    def column_sums_by_head(self, v: torch.Tensor) -> torch.Tensor:
        """(b, k, g, t, r, p) -> sum over p as (b, k, h, t)."""
        return v.sum(-1).transpose(3, 4).reshape(self.b, self.k, self.h, self.t)

    def unchunk(self, v: torch.Tensor, *tail: int) -> torch.Tensor:
        """(b, k, g, t, f) -> (b, l, *tail) (tail: (g, n), or (h, p) for x-like), without the padding."""
        v = v.transpose(2, 3).reshape(self.b, self.k * self.t, *tail)
        return v[:, : self.length].contiguous() if self.pad else v


def _log_masks(seg: torch.Tensor | None, ch: _Chunks, dtype: torch.dtype, device) -> tuple:
    """Masks added to log decays: 0 where a path exists, -inf where none does (the future, another
    document), so that exp gives exact zeros and nothing overflows.

    Returns masks inside chunks ((t, t), or (b, k, 1, t, t) with documents), and with documents
    only (else None): to each chunk's end and from its start (b, k, 1, t), through whole chunks
    (b, k, 1).
    """
    inf = float("-inf")
    causal = torch.ones(ch.t, ch.t, dtype=torch.bool, device=device).tril()
    if seg is None:
        return torch.zeros(ch.t, ch.t, dtype=dtype, device=device).masked_fill_(~causal, inf), None, None, None
    b, k, t = ch.b, ch.k, ch.t
    seg = torch.cat([seg, seg[:, -1:].expand(b, ch.pad)], dim=1).view(b, k, t)  # padding: same document
    seg_end = seg[:, :, -1]  # (b, k)
    seg_in = torch.cat([seg.new_zeros(b, 1), seg_end[:, :-1]], dim=1)  # document of the entering state
    keeps = (causal & (seg[:, :, :, None] == seg[:, :, None, :]), seg == seg_end[..., None],
             seg == seg_in[..., None], seg_end == seg_in)
    return tuple(torch.zeros(v.shape, dtype=dtype, device=device).masked_fill_(~v, inf)[:, :, None] for v in keeps)


def _exp2_masked(log2_decay: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """2 ** (log2_decay + mask), in place."""
    return (log2_decay if mask is None else log2_decay.add_(mask)).exp2_()


class _ChunkedScan(torch.autograd.Function):
    """The chunked SSD scan (module docstring) with a hand-written backward.

    Saves O(b l h (t + p) + b l h p n / t) numbers: the in-chunk decay and mixing matrices, the
    weighted inputs and outputs, and the chunk start states.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, seg, t):
        with torch.autocast(x.device.type, enabled=False):  # float32 products, also under autocast
            return _ChunkedScan._forward(ctx, x, dt, A, B, C, h0, seg, t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, g_final):
        with torch.autocast(gy.device.type, enabled=False):
            return _ChunkedScan._backward(ctx, gy, g_final)

    @staticmethod
    def _forward(ctx, x, dt, A, B, C, h0, seg, t):
        ch = _Chunks(x, B.shape[2], t)
        b, k, g, h, r, p, n = ch.b, ch.k, ch.g, ch.h, ch.r, ch.p, B.shape[3]
        inside, to_end, from_start, through_chunk = _log_masks(seg, ch, x.dtype, x.device)
        xg, Bg, Cg = ch.by_group(x), ch.by_group(B), ch.by_group(C)  # (b, k, g, t, r * p | n)
        dth = ch.by_head(dt)  # (b, k, h, t)
        # log2 of the decays (exp2 is faster than exp on CPU), cumulated inside chunks
        cs = (dth * (A * LOG2_E)[:, None]).cumsum(-1)  # (b, k, h, t), <= 0, non-increasing
        dtx_h = x.new_empty(b, k, h, t, p)  # dt x by head: the right side of the in-chunk products
        torch.mul(ch.heads_view(xg), dth.view(b, k, g, r, t, 1), out=dtx_h.view(b, k, g, r, t, p))
        # 1. inside chunks: y_s += sum_u exp(cs_s - cs_u) (C_s . B_u) dt_u x_u
        decay = (cs[..., :, None] + inside).sub_(cs[..., None, :]).exp2_()  # (b, k, h, t, t)
        scores = Cg @ Bg.transpose(-1, -2)  # (b, k, g, t, t), once per group
        mix = (decay.view(b, k, g, r, t, t) * scores[:, :, :, None]).view(b, k, h, t, t)
        y_diag = mix @ dtx_h  # (b, k, h, t, p)
        # 2. each chunk's end state from a zero start: sum_u exp(cs_last - cs_u) dt_u x_u B_u^T
        w_end = _exp2_masked(cs[..., -1:] - cs, to_end)  # (b, k, h, t)
        xw = (ch.split_columns(xg) * ch.per_column(dth * w_end)).view(b, k, g, t, r * p)
        local = (xw.transpose(-1, -2) @ Bg).view(b, k, h, p, n)
        # 3. start states, chunk after chunk (k small steps)
        through = _exp2_masked(cs[..., -1].clone(), through_chunk)  # (b, k, h)
        starts = x.new_empty(b, k, h, p, n)
        state = starts[:, 0]
        if h0 is None:
            state.zero_()
        else:
            state.copy_(h0)
        for c in range(k):
            nxt = starts[:, c + 1] if c + 1 < k else x.new_empty(b, h, p, n)
            state = torch.addcmul(local[:, c], through[:, c, :, None, None], state, out=nxt)
        # 4. from each chunk's start state: y_s += exp(cs_s) C_s @ start^T
        w_in = _exp2_masked(cs.clone(), from_start)  # (b, k, h, t)
        y_in = Cg @ starts.view(b, k, g, r * p, n).transpose(-1, -2)  # (b, k, g, t, r * p)
        y = x.new_empty(b, k, g, t, r * p)
        torch.addcmul(ch.columns_view(y_diag), ch.split_columns(y_in), ch.per_column(w_in), out=ch.split_columns(y))
        ctx.save_for_backward(xg, dth, A, Bg, Cg, decay, mix, dtx_h, xw, w_end, through, starts, w_in, y_in)
        ctx.ch, ctx.has_h0 = ch, h0 is not None
        return ch.unchunk(y, h, p), state

    @staticmethod
    def _backward(ctx, gy, g_final):
        xg, dth, A, Bg, Cg, decay, mix, dtx_h, xw, w_end, through, starts, w_in, y_in = ctx.saved_tensors
        ch = ctx.ch
        b, k, g, h, r, p, t, n = ch.b, ch.k, ch.g, ch.h, ch.r, ch.p, ch.t, Bg.shape[-1]
        gy = ch.by_group(gy.to(xg.dtype))  # (b, k, g, t, r * p)
        gy_h = ch.groups_by_head(gy)  # (b, k, h, t, p)
        # 4. from the start states
        d_cs = ch.column_sums_by_head(ch.split_columns(gy * y_in)) * w_in  # via w_in: (b, k, h, t)
        g_in = (ch.split_columns(gy) * ch.per_column(w_in)).view(b, k, g, t, r * p)
        dC = g_in @ starts.view(b, k, g, r * p, n)  # (b, k, g, t, n)
        g_starts = (g_in.transpose(-1, -2) @ Cg).view(b, k, h, p, n)
        # 3. back through the chunks: g_local[c] = dL/d(end state of chunk c)
        g_local = torch.empty_like(starts)
        lam = g_local[:, k - 1]
        lam.copy_(g_final)
        for c in range(k - 1, -1, -1):
            nxt = g_local[:, c - 1] if c > 0 else torch.empty_like(lam)
            lam = torch.addcmul(g_starts[:, c], through[:, c, :, None, None], lam, out=nxt)
        d_h0 = lam if ctx.has_h0 else None
        d_through = torch.linalg.vecdot(g_local.view(b, k, h, p * n), starts.view(b, k, h, p * n))
        d_cs[..., -1] += d_through * through
        # 2. the chunk end states
        g_xw = Bg @ g_local.view(b, k, g, r * p, n).transpose(-1, -2)  # (b, k, g, t, r * p)
        dB = xw @ g_local.view(b, k, g, r * p, n)  # (b, k, g, t, n)
        g_end = ch.column_sums_by_head(ch.split_columns(g_xw * xw))  # dL/d(log w_end): (b, k, h, t)
        d_cs -= g_end
        d_cs[..., -1] += g_end.sum(-1)
        g_dtx = ch.split_columns(g_xw).mul_(ch.per_column(w_end))  # (b, k, g, t, r, p)
        # 1. inside chunks
        g_mix = gy_h @ dtx_h.transpose(-1, -2)  # (b, k, h, t, t)
        g_dtx += ch.columns_view(mix.transpose(-1, -2) @ gy_h)
        g_scores = (g_mix * decay).view(b, k, g, r, t, t).sum(3)  # (b, k, g, t, t)
        dC += g_scores @ Bg
        dB += g_scores.transpose(-1, -2) @ Cg
        g_log = g_mix.mul_(mix)  # dL/d(cs_s - cs_u) for the decay (b, k, h, t, t)
        d_cs += g_log.sum(-1) - g_log.sum(-2)
        # cs = cumsum(dt * A), dtx = dt * x
        d_a = d_cs.flip(-1).cumsum(-1).flip(-1)  # (b, k, h, t)
        dA = (d_a * dth).sum((0, 1, 3))
        d_dt = d_a * A[:, None] + ch.column_sums_by_head(g_dtx * ch.split_columns(xg))
        dx = g_dtx.mul_(ch.per_column(dth))
        dx = ch.unchunk(dx.view(b, k, g, t, r * p), h, p)
        d_dt = ch.unchunk(d_dt.view(b, k, 1, h, t).transpose(3, 4), h)
        dB, dC = ch.unchunk(dB, g, n), ch.unchunk(dC, g, n)
        return dx, d_dt, dA, dB, dC, d_h0, None, None


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast scan (chunked SSD); same arguments and results as :func:`ssd_scan_ref`.

    Args:
        chunk_size: steps per chunk (default ``DEFAULT_CHUNK_SIZE``); any length works, the
            sequence is padded up to a multiple of it.
    """
    _check_shapes(x, dt, A, B, C, h0, seq_idx)
    t = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if t < 1:
        raise ValueError(f"chunk_size must be a positive number of steps, got {chunk_size}")
    dtype = _compute_dtype(x)
    x, dt, A, B, C = (v.to(dtype) for v in (x, dt, A, B, C))
    h0 = None if h0 is None else h0.to(dtype)
    seg = None if seq_idx is None else _segments(seq_idx)
    return _ChunkedScan.apply(x, dt, A, B, C, h0, seg, max(1, min(t, x.shape[1])))
