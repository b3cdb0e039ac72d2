"""Losses: transformers' causal-LM and masked-LM losses through a cross-entropy with a cheaper backward.

Notation: N target rows (batch x length, flattened), V vocabulary size.

This file is copied next to saved weights: it imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn


class _CrossEntropy(torch.autograd.Function):
    """Summed cross-entropy over rows whose target is not ``ignore_index``, divided by ``denom``.

    Same value and gradient as ``F.cross_entropy(reduction="sum") / denom``, with a cheaper
    backward: it saves the log-probabilities and turns them into the gradient (softmax - one-hot),
    where autograd would write a zero-filled NLL gradient and run a separate log-softmax backward
    over the (N, V) logits. The conversion is in place unless the backward keeps the graph
    (``retain_graph=True``): a second backward then finds the log-probabilities intact and gives
    the same gradient again, as the stock loss does.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, denom, ignore_index: int) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)  # (N, V)
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)
        picked = logp.gather(1, safe[:, None]).squeeze(1)  # (N,)
        ctx.save_for_backward(logp, safe, valid)
        ctx.denom = denom
        return -(picked * valid).sum() / denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logp, safe, valid = ctx.saved_tensors
        scale = (grad / ctx.denom) * valid.to(logp.dtype)  # (N,)
        probs = logp.exp() if _backward_keeps_graph() else logp.exp_()  # (N, V)
        g = probs.mul_(scale[:, None])
        g.scatter_add_(1, safe[:, None], -scale[:, None])  # minus the one-hot
        return g, None, None, None


# torch's own query (used by its AOT autograd to free saved tensors early); absent: assume kept.
_KEEP_GRAPH_QUERY = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _backward_keeps_graph() -> bool:
    """Whether the running backward was asked to keep the graph (``retain_graph`` / ``create_graph``).

    Under ``torch.compile`` the answer is "kept": the backward is traced once, Dynamo cannot call
    the query (a graph break per call), and the compiler plans the memory of the graph itself.
    """
    if torch.compiler.is_compiling():
        return True
    return _KEEP_GRAPH_QUERY is None or bool(_KEEP_GRAPH_QUERY())


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, num_items_in_batch=None, ignore_index: int = -100
) -> torch.Tensor:
    """transformers' ``fixed_cross_entropy`` (sum / num_items_in_batch, else the mean over targets)
    for logits (N, V) and targets (N,), through ``_CrossEntropy`` when a gradient is needed."""
    if not logits.requires_grad or not torch.is_grad_enabled():
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
        return loss if num_items_in_batch is None else loss / _as_denominator(num_items_in_batch, loss)
    if num_items_in_batch is None:
        denom = (target != ignore_index).sum().to(logits.dtype)  # 0 targets: nan, as F.cross_entropy
    else:
        denom = _as_denominator(num_items_in_batch, logits)
    return _CrossEntropy.apply(logits, target, denom, ignore_index)


def _as_denominator(n, like: torch.Tensor):
    return n.to(like.device) if torch.is_tensor(n) else n


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (float32 logits, labels shifted left by one, -100 ignored,
    ``num_items_in_batch`` for exact gradient accumulation) through ``cross_entropy`` above."""
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return masked_lm_loss(logits, shift_labels, vocab_size, num_items_in_batch, ignore_index)  # unshifted from here


def masked_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   **kwargs) -> torch.Tensor:
    """transformers' ``ForMaskedLMLoss`` (no shift) through ``cross_entropy`` above."""
    logits = logits.float()
    target = labels.reshape(-1).to(logits.device)
    return cross_entropy(logits.reshape(-1, vocab_size), target, num_items_in_batch, ignore_index)
