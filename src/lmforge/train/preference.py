"""Preference tuning: the DPO family of losses on the one training loop.

A batch holds B pairs as 2B sequences (chosen ones first, see
``lmforge.data.preference.PreferenceCollator``). The policy's log-probability of a completion is
the sum of its tokens' log-probabilities (the prompt is never scored); with the reference
model's (``ref``), the losses per pair are, with ``n`` the completion's token count:

- ``dpo`` (sigmoid): ``-logsigmoid(beta * ((pc - rc) - (pr - rr)))``; rewards ``beta * (p - ref)``;
- ``ipo``: ``((pc - rc) / nc - (pr - rr) / nr - 1 / (2 beta)) ** 2`` (per-token log-ratios, as
  trl and the IPO authors compute it); rewards as DPO's;
- ``simpo`` (no reference): ``-logsigmoid(beta * (pc / nc - pr / nr) - gamma)``; rewards
  ``beta * p / n``;
- ``orpo`` (no reference): ``-pc / nc - beta * logsigmoid(log odds(chosen) - log odds(rejected))``
  with ``odds = p / (1 - p)`` of the per-token mean log-probability (the NLL of the chosen
  completion is ORPO's SFT term); rewards ``beta * p / n``.

These equal trl's ``DPOTrainer`` (sigmoid, ipo), ``CPOTrainer`` (simpo) and ``ORPOTrainer``
implementations (checked in tests). The loss of a batch is the mean over its pairs, so the loop
weights micro-batches by their pairs: accumulation and processes change nothing.

The reference model is, by ``preference.reference``: the LoRA model with its adapter switched off
(``adapter``: no second copy of the weights), a frozen copy of the starting model (``copy``), or
log-probabilities computed once with the starting model before training and stored with the run
(``precomputed``, the file ``reference_logps.safetensors``; a resumed run reads them back).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lmforge.data.collators import IGNORE_INDEX
from lmforge.data.preference import REFERENCE_COLUMNS
from lmforge.errors import LmforgeError

LOSSES = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}
REFERENCE_FILE = "reference_logps.safetensors"
# what a preference evaluation reports (train.metric_for_best picks one)
PREFERENCE_METRICS = ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
                "logps_rejected", "nll")


# ----------------------------------------------------------------------------------- the math


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of each row's labelled tokens, their count), both (N,).

    ``logits`` (N, T, V) predict the next token; ``labels`` (N, T) hold the tokens to score and
    -100 elsewhere (label ``t`` is scored by the logits at ``t - 1``). Computed in float32 at least."""
    targets = labels[:, 1:]
    logits = logits[:, :-1]
    if logits.dtype != torch.float64:
        logits = logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class PairLosses:
    """Per-pair values of a preference loss, all (B,)."""

    loss: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # nll (orpo)


def preference_loss(kind: str, beta: float, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                    *, simpo_gamma: float = 0.5) -> PairLosses:
    """The per-pair loss and rewards of ``kind`` (see the module docstring). Log-probabilities are
    sums over each completion's tokens; ``*_tokens`` count them."""
    nc, nr = chosen_tokens.clamp(min=1).to(chosen_logps.dtype), rejected_tokens.clamp(min=1).to(chosen_logps.dtype)
    if kind in ("dpo", "ipo"):
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise LmforgeError(f"preference.loss {kind} needs the reference model's log-probabilities")
        chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        if kind == "dpo":
            loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        else:
            loss = (chosen_ratio / nc - rejected_ratio / nr - 1 / (2 * beta)) ** 2
        return PairLosses(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    chosen_mean, rejected_mean = chosen_logps / nc, rejected_logps / nr
    rewards = beta * chosen_mean.detach(), beta * rejected_mean.detach()
    if kind == "simpo":
        return PairLosses(-F.logsigmoid(beta * (chosen_mean - rejected_mean) - simpo_gamma), *rewards)
    if kind == "orpo":
        log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
        nll = -chosen_mean
        return PairLosses(nll - beta * F.logsigmoid(log_odds), *rewards, extra={"nll": nll.detach()})
    raise LmforgeError(f"preference.loss: {kind!r} is not one of {', '.join(LOSSES)}")


# ----------------------------------------------------------------------------------- the objective


def pairs_of(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a preference batch (its rows are chosen then rejected sequences)."""
    return int(batch["input_ids"].shape[0]) // 2


def forward_logps(model: Callable[..., Any], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities, token counts) of every completion in ``batch``, (2B,) each."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return completion_logps(out.logits, batch["labels"])


@contextlib.contextmanager
def _evaluating(module: nn.Module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


Reference = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> (2B,) logps


def adapter_off_reference(autocast: Callable[[], Any] = contextlib.nullcontext) -> Reference:
    """The reference of a LoRA policy: the same model with its adapters switched off (peft's
    ``disable_adapter``), in eval mode, without gradients."""
    def reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        peft_model = extract_model_from_parallel(model)
        with torch.no_grad(), peft_model.disable_adapter(), _evaluating(peft_model), autocast():
            return forward_logps(peft_model, batch)[0]
    return reference


def frozen_copy_reference(model: nn.Module, device: torch.device,
                          autocast: Callable[[], Any] = contextlib.nullcontext) -> Reference:
    """A frozen copy of ``model`` as it is now (call before training) as the reference."""
    frozen = copy.deepcopy(extract_model_from_parallel(model)).to(device).eval().requires_grad_(False)

    def reference(_: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), autocast():
            return forward_logps(frozen, batch)[0]
    return reference


@dataclass
class PreferenceOutput:
    """One micro-batch: ``loss`` is the mean over its pairs; ``sums`` hold per-pair figures summed
    over its pairs (the loop adds them up over a step and divides by the step's pairs)."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]
    pairs: int


class PreferenceObjective:
    """``objective(model, batch) -> PreferenceOutput`` for ``lmforge.train.loop.Trainer``.

    Args:
        kind: dpo, ipo, simpo or orpo.
        beta: the loss's beta (orpo: the weight of the odds-ratio term).
        reference: where reference log-probabilities come from when the batch does not carry
            them (``ref_chosen_logps``/``ref_rejected_logps``); None for reference-free losses.
        simpo_gamma: SimPO's target reward margin.
    """

    def __init__(self, kind: str, beta: float, reference: Reference | None = None, *, simpo_gamma: float = 0.5):
        if kind not in LOSSES:
            raise LmforgeError(f"preference.loss: {kind!r} is not one of {', '.join(LOSSES)}")
        self.kind, self.beta, self.reference, self.simpo_gamma = kind, beta, reference, simpo_gamma

    @property
    def needs_reference(self) -> bool:
        return self.kind not in REFERENCE_FREE

    def _reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.needs_reference:
            return None, None
        if REFERENCE_COLUMNS[0] in batch:
            return batch[REFERENCE_COLUMNS[0]].to(dtype), batch[REFERENCE_COLUMNS[1]].to(dtype)
        if self.reference is None:
            raise LmforgeError(f"preference.loss {self.kind}: the batch carries no reference log-probabilities "
                               "and no reference model was given")
        return self.reference(model, batch).to(dtype).chunk(2)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PreferenceOutput:
        logps, counts = forward_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        ref_chosen, ref_rejected = self._reference_logps(model, batch, logps.dtype)
        out = preference_loss(self.kind, self.beta, chosen, rejected, chosen_tokens, rejected_tokens,
                              ref_chosen, ref_rejected, simpo_gamma=self.simpo_gamma)
        valid = (chosen_tokens > 0).to(logps.dtype)  # an evaluation's filler row has no tokens
        pairs = int(valid.sum())
        margin = out.rewards_chosen - out.rewards_rejected
        figures = {"rewards_chosen": out.rewards_chosen, "rewards_rejected": out.rewards_rejected,
                   "margin": margin, "accuracy": (margin > 0).to(logps.dtype),
                   "logps_chosen": chosen.detach(), "logps_rejected": rejected.detach(), **out.extra}
        sums = {name: (value * valid).sum() for name, value in figures.items()}
        loss = (out.loss * valid).sum() / max(pairs, 1)
        return PreferenceOutput(loss, sums, pairs)


# ----------------------------------------------------------------------------------- evaluation


def evaluate_preference(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                        objective: PreferenceObjective, *, accelerator: Any = None) -> dict[str, float]:
    """Mean loss, rewards, margin, preference accuracy and log-probabilities over every pair of
    ``batches`` (this process's share; summed over processes), in eval mode."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    totals: dict[str, float] = {}
    with torch.no_grad(), _evaluating(model):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = objective(model, batch)
            figures = {"loss": out.loss.double() * out.pairs, **out.sums, "pairs": torch.tensor(float(out.pairs))}
            for name, value in figures.items():
                totals[name] = totals.get(name, 0.0) + float(value)
    names = list(totals)
    values = torch.tensor([totals[n] for n in names], dtype=torch.float64, device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    summed = dict(zip(names, values.tolist(), strict=True))
    pairs = summed.pop("pairs", 0.0)
    if not pairs:
        raise LmforgeError("the evaluation split holds no pairs")
    return {**{name: value / pairs for name, value in summed.items()}, "pairs": int(pairs)}


# ----------------------------------------------------------------------------------- stored reference


def compute_reference_logps(model: nn.Module, pairs: Any, collate: Callable[[list[dict]], dict], *,
                            batch_size: int, device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext,
                            desc: str = "reference log-probabilities", progress: bool = True) -> dict[str, torch.Tensor]:
    """``{"chosen": (N,), "rejected": (N,)}`` float64 log-probabilities of every pair of ``pairs``
    under ``model`` as it is now (eval mode, no gradients, batches of ``batch_size``, in order)."""
    chosen, rejected = [], []
    inner = extract_model_from_parallel(model)
    with torch.no_grad(), _evaluating(inner), autocast():
        for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
            rows = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            c, r = forward_logps(inner, batch)[0].double().chunk(2)
            chosen.append(c.cpu())
            rejected.append(r.cpu())
    return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}


def save_reference_logps(path: Path, values: dict[str, dict[str, torch.Tensor]]) -> None:
    """``values[split][side]`` -> one safetensors file (written aside, then renamed)."""
    tmp = path.with_name(path.name + ".part")
    save_file({f"{split}.{side}": t.contiguous() for split, sides in values.items() for side, t in sides.items()},
              str(tmp), metadata={"format": "pt", "content": "lmforge reference log-probabilities"})
    tmp.replace(path)


def load_reference_logps(path: Path, sizes: dict[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    """Read what ``save_reference_logps`` wrote; each split must have ``sizes[split]`` pairs."""
    tensors = load_file(str(path))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for split, n in sizes.items():
        sides = {side: tensors.get(f"{split}.{side}") for side in ("chosen", "rejected")}
        if any(t is None or t.shape != (n,) for t in sides.values()):
            have = {k: tuple(v.shape) for k, v in tensors.items()}
            raise LmforgeError(f"{path}: the stored reference log-probabilities do not match the data ({split}: {n} "
                               f"pairs; stored: {have}); the data changed since the run started. Start a new run "
                               "(the reference must come from the starting model)")
        out[split] = sides  # type: ignore[assignment]
    return out


def with_reference_columns(pairs: Any, logps: dict[str, torch.Tensor]) -> Any:
    """``pairs`` with the columns ``ref_chosen_logps`` and ``ref_rejected_logps``."""
    pairs = pairs.remove_columns([c for c in REFERENCE_COLUMNS if c in pairs.column_names])
    pairs = pairs.add_column(REFERENCE_COLUMNS[0], logps["chosen"].tolist())
    return pairs.add_column(REFERENCE_COLUMNS[1], logps["rejected"].tolist())
