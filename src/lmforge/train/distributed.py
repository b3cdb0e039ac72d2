"""Multi-process training: refuse broken launches, shard the model, say what really runs.

Launching (see the accelerate presets, ``lmforge presets accelerate``, and docs/training.md):

- ``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs starts N processes
  that each see ``DistributedType.NO`` and train alone on the same data. ``torchrun`` does the same.
  Real multi-process CPU training needs ``ACCELERATE_USE_CPU=1`` (gloo backend,
  ``DistributedType.MULTI_CPU``). ``lmforge.runs.check_launch`` refuses the broken case first.
- accelerate enables FSDP only on GPU-like backends: on CPU an FSDP plugin silently becomes DDP.
  ``shard_model(..., "fsdp")`` then applies torch's ``fully_shard`` (FSDP2) itself, per block and
  at the root, so parameters really are sharded ``DTensor``s. DeepSpeed is disabled by
  accelerate on CPU; ``shard_model(..., "deepspeed")`` refuses instead of pretending.
- ``strategy_name`` reports what the prepared model actually is, never the requested strategy.

Order in the loop: ``lmforge.runs.check_launch`` -> build model -> ``model = shard_model(...)`` -> create the
optimizer from ``model.parameters()`` (FSDP2 replaces parameters with DTensors, so an optimizer
built before would hold dead tensors) -> ``accelerator.prepare(model, optimizer, ...)``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lmforge.errors import LmforgeError

Strategy = Literal["ddp", "fsdp", "deepspeed"]
STRATEGIES = ("ddp", "fsdp", "deepspeed")
def distributed_kind(accelerator: Any) -> str:
    """accelerate's ``DistributedType`` as a bare name: ``NO``, ``MULTI_CPU``, ``MULTI_GPU``,
    ``FSDP``, ``DEEPSPEED``, ..."""
    return str(accelerator.distributed_type).rsplit(".", 1)[-1]


def shard_model(accelerator: Any, model: nn.Module, strategy: Strategy = "ddp") -> nn.Module:
    """Prepare ``model``'s distribution ``strategy`` where accelerate will not do it itself.

    - ``ddp``: nothing to do here; ``accelerator.prepare`` wraps the model in DDP when several
      processes run.
    - ``fsdp``: when accelerate runs FSDP (GPU launch with the fsdp2 accelerate preset) it shards
      in ``prepare``. Otherwise (several processes on CPU, where accelerate turns FSDP into DDP),
      apply ``torch.distributed.fsdp.fully_shard`` to every transformer block and to the root
      (mixed precision from ``accelerator.mixed_precision``), and mark the model as prepared so
      ``accelerator.prepare`` registers it (for ``save_state``) without wrapping it in DDP.
    - ``deepspeed``: only under a DeepSpeed launch (GPUs); refused otherwise.

    Create the optimizer from the returned model's parameters, after this call.
    """
    if strategy not in STRATEGIES:
        raise LmforgeError(f"unknown distributed strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    kind = distributed_kind(accelerator)
    if strategy == "deepspeed":
        if kind != "DEEPSPEED":
            raise LmforgeError(
                f"strategy 'deepspeed' but accelerate runs {kind}: accelerate disables DeepSpeed "
                "without GPUs. Launch on GPUs with the deepspeed_zero2 or deepspeed_zero3 accelerate preset "
                "(lmforge presets accelerate), or use strategy 'fsdp' or 'ddp'."
            )
        return model
    if kind in ("FSDP", "DEEPSPEED"):
        if strategy != kind.lower():
            raise LmforgeError(f"strategy {strategy!r} but the accelerate config launched {kind}; "
                               "make them agree (lmforge presets accelerate)")
        return model
    if strategy == "ddp" or accelerator.num_processes == 1:
        return model
    return _fully_shard(model, accelerator)


def _fully_shard(model: nn.Module, accelerator: Any) -> nn.Module:
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    model.to(accelerator.device)
    blocks = transformer_blocks(model)
    if not blocks:
        raise LmforgeError(f"{type(model).__name__}: found no repeated blocks to shard with FSDP")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model._is_accelerate_prepared = True  # accelerate must register it, not wrap it in DDP
    accelerator.register_save_state_pre_hook(partial(_save_full_state, accelerator))
    accelerator.register_load_state_pre_hook(partial(_load_full_state, accelerator))
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: modules named in ``_no_split_modules`` (transformers'
    list of blocks that must stay whole), else the members of the longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP2 ``DTensor`` shards."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def strategy_name(accelerator: Any, model: nn.Module) -> str:
    """What really runs, read from the prepared model and accelerate's state (never the request).

    Returns e.g. ``"single process (cpu)"``, ``"ddp (2 processes, gloo)"``,
    ``"fsdp2 (2 processes, gloo, fully_shard by lmforge)"``, ``"deepspeed zero-3 (8 processes)"``.
    """
    n = accelerator.num_processes
    kind = distributed_kind(accelerator)
    backend = _backend_name()
    if kind == "DEEPSPEED":
        stage = getattr(getattr(accelerator.state, "deepspeed_plugin", None), "zero_stage", "?")
        return f"deepspeed zero-{stage} ({n} processes)"
    if is_sharded(model):
        who = "accelerate" if kind == "FSDP" else "fully_shard by lmforge"
        return f"fsdp2 ({n} processes, {backend}, {who})"
    if kind == "FSDP":
        return f"fsdp ({n} processes, {backend})"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return f"ddp ({n} processes, {backend})"
    if n == 1:
        return f"single process ({accelerator.device.type})"
    return f"unwrapped model in {n} processes (call accelerator.prepare first)"


def _backend_name() -> str:
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "no backend"


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU state dict of a possibly FSDP2-sharded model, on every process.

    Collective when sharded: call it on all processes (e.g. before ``save_pretrained`` on the main one).
    """
    if not is_sharded(model):
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        return inner.state_dict()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _drop_tied(model, state)


def _drop_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gathering turns tied weights (embeddings = LM head) into separate copies: keep one name,
    as an unsharded model's checkpoint would."""
    for name in tied_keys(model):
        state.pop(name, None)
    return state


# --------------------------------------------------------------------------- checkpoints of self-sharded models
# accelerate's save_state/load_state know FSDP only when accelerate itself runs it: for a model
# sharded here they would pickle each rank's DTensor shards as if they were whole tensors. These
# hooks make checkpoints hold FULL model and optimizer states instead (gathered on every
# process, written by the main one as usual; every process re-shards its part on load), so a
# checkpoint looks like a DDP one and resumes exactly.


def _sharded_pairs(accelerator: Any, models: list[nn.Module]) -> list[tuple[int, nn.Module, list[Any]]]:
    """(index, sharded model, its accelerate optimizers) for each sharded model in ``models``."""
    out = []
    for i, model in enumerate(models):
        if not is_sharded(model):
            continue
        params = {id(p) for p in model.parameters()}
        opts = [o for o in accelerator._optimizers
                if all(id(p) in params for g in o.param_groups for p in g["params"])]
        out.append((i, model, opts))
    return out


def _save_full_state(accelerator: Any, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for i, model, opts in _sharded_pairs(accelerator, models):
        weights[i] = _drop_tied(model, get_model_state_dict(model, options=options))  # collective
        for opt in opts:
            full = get_optimizer_state_dict(model, opt.optimizer, options=options)  # collective
            opt.state_dict = partial(_once, full, opt)  # what accelerate writes next


def _once(value: dict, opt: Any) -> dict:
    del opt.state_dict  # back to the class method after this save
    return value


def _load_full_state(accelerator: Any, models: list[nn.Module], input_dir: str) -> None:
    options = StateDictOptions(full_state_dict=True)
    for i, model, opts in reversed(_sharded_pairs(accelerator, models)):
        name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
        path = Path(input_dir) / name
        if not path.is_file():
            raise LmforgeError(f"{input_dir}: no {name}; was this checkpoint written with the fsdp strategy?")
        state = load_file(path)
        missing = set(set_model_state_dict(model, state, options=StateDictOptions(
            full_state_dict=True, strict=False)).missing_keys)
        if missing - tied_keys(model):
            raise LmforgeError(f"{path}: missing weights {sorted(missing - tied_keys(model))}")
        del models[i]  # loaded here: accelerate must not load it again
        for opt in opts:
            opt.load_state_dict = partial(_load_optimizer, model, opt, options)


def _load_optimizer(model: nn.Module, opt: Any, options: Any, full: dict) -> None:
    del opt.load_state_dict
    set_optimizer_state_dict(model, opt.optimizer, full, options=options)


def tied_keys(model: nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (tied embeddings)."""
    seen: set[int] = set()
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied
