"""The optimizers (AdamW; Muon for the blocks' matrices with AdamW for the rest) and the
learning-rate schedules (warmup, then cosine, linear, constant or warmup-stable-decay)."""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.errors import LmforgeError
from lmforge.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, exclude: AbstractSet[int] = frozenset()) -> list[dict]:
    """Split trainable parameters into decayed (matrices) and not decayed (norms, biases, embeddings).

    Embeddings are found by module type (``nn.Embedding``), norms and biases by being 1-D; a
    weight tied to an embedding (the LM head) is a single parameter and is not decayed.
    Parameters whose ``id`` is in ``exclude`` (another optimizer's) are left out.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, other, seen = [], [], set(exclude)
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (other if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon updates: weight matrices of ``nn.Linear`` layers inside the model's
    repeated blocks (any ``nn.ModuleList``), trainable, and not the output head.

    Everything else (embeddings, the LM head tied or not, a classification head, norms, biases,
    convolutions, Mamba's ``A_log``) is left to AdamW, the usual split (Keller Jordan's Muon,
    modded-nanogpt).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {id(p) for p in head.parameters()} if head is not None else set()
    chosen: dict[int, nn.Parameter] = {}
    for blocks in model.modules():
        if not isinstance(blocks, nn.ModuleList):
            continue
        for module in blocks.modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, nn.Linear) and weight is not None and weight.requires_grad
                    and weight.ndim == 2 and id(weight) not in excluded):
                chosen[id(weight)] = weight
    return list(chosen.values())


def orthogonalize(updates: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                  eps: float) -> torch.Tensor:
    """Keller Jordan's quintic Newton–Schulz iteration (``torch.optim.Muon``'s, same coefficients,
    steps and normalisation), on a stack of same-shaped matrices ``(batch, rows, cols)`` in their
    own dtype: one ``baddbmm`` per product for the whole batch instead of one ``addmm`` per matrix."""
    a, b, c = ns_coefficients
    x = updates
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _muon_lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """``torch.optim.Muon``'s per-matrix learning-rate scale for ``adjust_lr_fn``."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))  # "original" (torch's default, also for None)


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (same hyper-parameters, state and update) with the orthogonalization
    batched over same-shaped matrices and run in ``ns_dtype``.

    torch orthogonalizes in bfloat16, one matrix at a time. That is the fast choice on GPUs, but
    CPUs without bfloat16 matrix units emulate it: on this project's 2-core AMD EPYC (AVX2) the
    step of a 4 x 128 GPT's 28 matrices took 0.94 s against 0.05 s in float32, three times the
    forward and backward pass. ``ns_dtype=None`` picks bfloat16 on accelerators and float32 on
    the CPU (where it is also the more exact choice).
    """

    def __init__(self, params, *, ns_dtype: torch.dtype | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            momentum, lr = group["momentum"], float(group["lr"])
            by_shape: dict[tuple, list[int]] = {}
            updates = []
            for i, (param, grad, buf) in enumerate(zip(params, grads, buffers, strict=True)):
                buf.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
                by_shape.setdefault((param.shape, param.device), []).append(i)
            for indices in by_shape.values():
                first = params[indices[0]]
                dtype = self.ns_dtype or (torch.float32 if first.device.type == "cpu" else torch.bfloat16)
                stacked = torch.stack([updates[i] for i in indices]).to(dtype)
                ortho = orthogonalize(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
                adjusted_lr = lr * _muon_lr_scale(group["adjust_lr_fn"], first.shape)
                for i, update in zip(indices, ortho, strict=True):
                    params[i].mul_(1 - lr * group["weight_decay"])
                    params[i].add_(update.to(params[i].dtype), alpha=-adjusted_lr)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """``Muon`` over some parameters and ``torch.optim.AdamW`` over the others, as one
    optimizer (one ``step``, one ``state_dict``, one set of ``param_groups``) so that the
    learning-rate scheduler, gradient clipping and accelerate's checkpointing treat it like any
    other.

    The two inner optimizers work on this optimizer's own group dicts and state, so a scheduler
    that sets ``group["lr"]`` reaches them, and ``load_state_dict`` restores both (AdamW's groups
    come first: ``param_groups[0]["lr"]`` is AdamW's learning rate).
    """

    def __init__(self, adamw_groups: list[dict[str, Any]], muon_groups: list[dict[str, Any]], *,
                 adamw: dict[str, Any], muon: dict[str, Any]):
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw) if adamw_groups else None
        self.muon = Muon(muon_groups, **muon)
        inner = [o for o in (self.adamw, self.muon) if o is not None]
        super().__init__([g for o in inner for g in o.param_groups], defaults={})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (again after a load)."""
        n_adamw = len(self.adamw.param_groups) if self.adamw is not None else 0
        if self.adamw is not None:
            self.adamw.param_groups = self.param_groups[:n_adamw]
            self.adamw.state = self.state
        self.muon.param_groups = self.param_groups[n_adamw:]
        self.muon.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        """One step of both optimizers; a closure runs once, in the first."""
        if self.adamw is None:
            return self.muon.step(closure)
        loss = self.adamw.step(closure)
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()


def build_optimizer(model: nn.Module, config: OptimConfig, *, log: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``config.name`` asks for over ``model``'s trainable parameters.

    - ``adamw``: AdamW over ``param_groups`` (fused/foreach picked by torch).
    - ``muon``: ``MuonWithAdamW``: Muon (``muon_lr``, ``muon_momentum``, ``weight_decay``) over
      ``muon_parameters``, AdamW (``lr``, with ``param_groups``' decay rule) over the rest. With
      ``log`` the split is printed. Refused for sharded (FSDP ``DTensor``) parameters: Muon needs
      each whole matrix on every process.
    """
    if config.name == "adamw":
        groups = param_groups(model, config.weight_decay)
        if not groups:
            raise LmforgeError("the model has no trainable parameters")
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    if config.name != "muon":
        raise LmforgeError(f"optim.name: unknown optimizer {config.name!r}; valid: adamw, muon")
    matrices = muon_parameters(model)
    if not matrices:
        raise LmforgeError(f"optim.name: muon: {type(model).__name__} has no trainable linear layers inside "
                           "repeated blocks for Muon to update; use optim.name: adamw")
    if any(isinstance(p, DTensor) for p in matrices):
        raise LmforgeError("optim.name: muon needs each weight matrix whole on every process, but the model "
                           "is sharded (FSDP); use distributed: ddp with muon, or optim.name: adamw")
    muon_ids = {id(p) for p in matrices}
    adamw_groups = param_groups(model, config.weight_decay, exclude=muon_ids)
    optimizer = MuonWithAdamW(
        adamw_groups, [{"params": matrices}],
        adamw={"lr": config.lr, "betas": tuple(config.betas), "eps": config.eps},
        muon={"lr": config.muon_lr, "momentum": config.muon_momentum, "weight_decay": config.weight_decay,
              "adjust_lr_fn": config.muon_adjust_lr,
              "ns_dtype": None if config.muon_ns_dtype == "auto" else getattr(torch, config.muon_ns_dtype)},
    )
    if log:
        names = {id(p): n for n, p in model.named_parameters()}
        n_muon = sum(p.numel() for p in matrices)
        n_adamw = sum(p.numel() for g in adamw_groups for p in g["params"])
        print(f"optimizer: Muon (lr {config.muon_lr:g}) on {len(matrices)} block matrices, {n_muon:,} weights "
              f"(e.g. {names[id(matrices[0])]}); AdamW (lr {config.lr:g}) on the other "
              f"{sum(len(g['params']) for g in adamw_groups)} tensors, {n_adamw:,} weights "
              "(embeddings, head, norms, biases)", flush=True)
    return optimizer


class Schedule:
    """Learning-rate multiplier: linear warmup, then cosine/linear decay to ``min_lr_ratio``,
    constant, or warmup-stable-decay (``wsd``: flat, then linear to ``min_lr_ratio`` over the last
    ``decay_fraction`` of ``total_steps``).

    Same shapes as transformers' ``get_scheduler`` (plus a floor; ``wsd`` as its
    ``warmup_stable_decay`` with a linear decay), written as a callable object whose
    ``total_steps`` can be refitted to a time budget; ``LambdaLR`` saves its attributes in the
    scheduler state, so a resumed run continues on the same curve.
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                 decay_fraction: float = 0.2):
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.decay_fraction = decay_fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.total_steps))
            start = max(self.warmup_steps, self.total_steps - decay_steps)
            progress = min(1.0, max(0, step - start) / max(1, self.total_steps - start))
            return 1.0 - (1.0 - self.min_lr_ratio) * progress
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
    schedule = Schedule(config.scheduler, warmup, total_steps, config.min_lr_ratio, config.decay_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def refit_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Stretch or shrink the decay to end at ``total_steps`` (used by the time budget)."""
    for schedule in scheduler.lr_lambdas:
        schedule.total_steps = total_steps
        schedule.warmup_steps = min(schedule.warmup_steps, max(0, total_steps - 1))
