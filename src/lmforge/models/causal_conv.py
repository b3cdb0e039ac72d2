"""Depthwise causal convolution + SiLU over (batch, length, channels), for training on CPU.

The Mamba mixers convolve their projections along time, channel by channel, with a short kernel
(K = 4). ``F.conv1d`` wants (batch, channels, length): the projection is transposed in and out,
and the convolution's and the SiLU's backwards then run on mixed memory layouts, which on a CPU
cost more than the convolution itself. ``causal_conv_silu`` keeps (batch, length, channels): that
is the memory of a channels-last (batch, channels, 1, length) image, so the forward and the input
gradient are one depthwise ``conv2d`` each (oneDNN's channels-last kernels, vectorised over
channels); the weight gradient is K dot products per channel, taken over cache-sized blocks of
rows on CPU (oneDNN's depthwise weight gradient is slower there; other devices use their
library's); the SiLU and its backward run on contiguous memory.

This file is copied next to saved weights: torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_ELEMENTS = 1 << 17  # rows x channels of one block of the weight gradient (512 KiB in fp32)
BLOCKED_WEIGHT_GRAD = ("cpu",)  # device types whose weight gradient is computed block by block


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> the (B, C, 1, L) channels-last view of the same memory."""
    return x.unsqueeze(1).permute(0, 3, 1, 2)


def _from_image(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, L) -> (B, L, C), a view (contiguous when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).squeeze(1)


class _CausalConv(torch.autograd.Function):
    """The causal depthwise convolution of (B, L, C), followed by SiLU when ``silu``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
        channels, k = weight.shape
        dtype = x.dtype  # under autocast x is already the autocast dtype (a projection's output)
        weight = weight.to(dtype).view(channels, 1, 1, k)
        bias = None if bias is None else bias.to(dtype)
        padded = F.pad(x, (0, 0, k - 1, 0))  # (B, K - 1 + L, C): zeros before the start
        with torch.autocast(x.device.type, enabled=False):
            pre = _from_image(F.conv2d(_as_image(padded), weight, bias, groups=channels))
        ctx.save_for_backward(padded, pre if silu else None, weight)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded, pre, weight = ctx.saved_tensors
        channels, k = weight.shape[0], weight.shape[-1]
        grad = grad.to(padded.dtype).contiguous()
        grad_pre = torch.ops.aten.silu_backward(grad, pre.contiguous()) if ctx.silu else grad
        grad_x = grad_w = grad_b = None
        on_cpu = padded.device.type in BLOCKED_WEIGHT_GRAD  # elsewhere the library's, not a Python loop
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if want_x or (want_w and not on_cpu):
            grad_x, grad_w_lib = torch.ops.aten.convolution_backward(
                _as_image(grad_pre), _as_image(padded), weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0],
                channels, [want_x, want_w and not on_cpu, False])[:2]
            grad_x = None if grad_x is None else _from_image(grad_x)[:, k - 1 :]
            grad_w = None if grad_w_lib is None else grad_w_lib.view(channels, k)
        if want_w and on_cpu:
            grad_w = _weight_grad(grad_pre, padded, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_pre.sum((0, 1))
        return grad_x, grad_w, grad_b, None


def _weight_grad(grad_pre: torch.Tensor, padded: torch.Tensor, k: int) -> torch.Tensor:
    """grad_w[c, j] = sum over (b, t) of grad_pre[b, t, c] * padded[b, t + j, c], block by block
    so that each block of ``grad_pre`` is read K times from cache, not from memory."""
    b, length, channels = grad_pre.shape
    rows = max(1, BLOCK_ELEMENTS // channels)
    out = grad_pre.new_zeros(channels, k, dtype=torch.promote_types(grad_pre.dtype, torch.float32))
    for i in range(b):
        for start in range(0, length, rows):
            block = grad_pre[i, start : start + rows]
            for tap in range(k):
                out[:, tap] += (block * padded[i, start + tap : start + tap + block.shape[0]]).sum(0, dtype=out.dtype)
    return out


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal depthwise conv of x): x (B, L, C), weight (C, K) or (C, 1, K), bias (C,) -> (B, L, C).

    Equals ``F.silu(F.conv1d(x.transpose(1, 2), weight, bias, padding=K - 1, groups=C)[..., :L]
    .transpose(1, 2))``: output t reads x[t - K + 1 .. t], zeros before the start. With ``seq_idx``
    (B, L) (documents packed in a row), output t reads x[t - s] only where seq_idx[t - s] ==
    seq_idx[t], as ``modeling_mamba.causal_conv_docs``.
    """
    if x.dim() != 3 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"causal_conv_silu: x must be (batch, length, channels) with channels = weight's "
                         f"{weight.shape[0]}, got x {tuple(x.shape)}")
    weight = weight.reshape(weight.shape[0], -1)
    if seq_idx is None:
        return _CausalConv.apply(x, weight, bias, True)
    if seq_idx.shape != x.shape[:2]:
        raise ValueError(f"causal_conv_silu: seq_idx must be (batch, length) = {tuple(x.shape[:2])}, "
                         f"got {tuple(seq_idx.shape)}")
    return F.silu(_restart_documents(_CausalConv.apply(x, weight, bias, False), x, weight, bias, seq_idx))


def _restart_documents(pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       seq_idx: torch.Tensor) -> torch.Tensor:
    """``pre`` (the convolution over the whole row) with the outputs whose window crosses a document
    boundary recomputed from their own document's inputs. Only the first K - 1 outputs of each
    document change, so this gathers those few rows; ``index_put`` routes their gradients to the
    recomputed values and none through the convolution's."""
    k, length = weight.shape[-1], x.shape[1]
    crossing = torch.zeros_like(seq_idx, dtype=torch.bool)
    for shift in range(1, min(k, length)):
        crossing[:, shift:] |= seq_idx[:, shift:] != seq_idx[:, :-shift]
    rows, steps = crossing.nonzero(as_tuple=True)  # (M,) each
    if rows.numel() == 0:
        return pre
    doc = seq_idx[rows, steps]
    weight = weight.to(x.dtype)
    fixed = pre.new_zeros(rows.shape[0], x.shape[-1]) if bias is None else bias.to(x.dtype).expand(
        rows.shape[0], -1)
    for tap in range(k):
        source = steps - (k - 1 - tap)
        safe = source.clamp(min=0)
        same = (source >= 0) & (seq_idx[rows, safe] == doc)
        fixed = fixed + x[rows, safe] * same[:, None].to(x.dtype) * weight[:, tap]
    return pre.index_put((rows, steps), fixed.to(pre.dtype))
