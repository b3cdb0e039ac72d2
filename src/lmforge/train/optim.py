"""AdamW with decay only on weight matrices, and a warmup + cosine/linear/constant schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed (matrices) and not decayed (norms, biases, embeddings).

    Embeddings are found by module type (``nn.Embedding``), norms and biases by being 1-D; a
    weight tied to an embedding (the LM head) is a single parameter and is not decayed.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, other, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (other if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (fused/foreach picked by torch)."""
    groups = param_groups(model, config.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


class Schedule:
    """Learning-rate multiplier: linear warmup, then cosine/linear decay to ``min_lr_ratio`` or constant.

    Same shapes as transformers' ``get_scheduler`` (plus a floor), written as a callable object
    whose ``total_steps`` can be refitted to a time budget; ``LambdaLR`` saves its attributes in
    the scheduler state, so a resumed run continues on the same curve.
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` driven by ``Schedule`` (one scheduler step per optimizer step)."""
    warmup = min(config.warmup_steps, max(0, total_steps - 1))
    schedule = Schedule(config.scheduler, warmup, total_steps, config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def refit_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Stretch or shrink the decay to end at ``total_steps`` (used by the time budget)."""
    for schedule in scheduler.lr_lambdas:
        schedule.total_steps = total_steps
        schedule.warmup_steps = min(schedule.warmup_steps, max(0, total_steps - 1))
