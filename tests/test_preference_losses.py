"""Preference losses equal trl's implementations, and completion log-probabilities equal a direct
forward of the stock transformers class on the same weights.

trl's code is run, not re-derived: DPO and IPO through ``DPOTrainer._compute_loss`` (with
precomputed reference log-probabilities and a stand-in model returning the per-token
log-probabilities trl's fused head would), SimPO through ``CPOTrainer.cpo_loss`` and ORPO's
odds-ratio term through ``ORPOTrainer.odds_ratio_loss``; its ``get_batch_logps`` checks our
log-probabilities and token counts. Values are drawn so that every term matters: completions of
different lengths, reference log-probabilities on both sides of the policy's, mean log-probabilities
on both sides of -log 2 (the two branches of log(1 - exp(x))).
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from lmforge.data.collators import IGNORE_INDEX
from lmforge.data.preference import PreferenceCollator
from lmforge.models.configuration_gpt import LmforgeGPTConfig
from lmforge.models.configuration_mamba import LmforgeMambaConfig
from lmforge.models.convert import to_hf
from lmforge.models.modeling_gpt import LmforgeGPTForCausalLM
from lmforge.models.modeling_mamba import LmforgeMambaForCausalLM
from lmforge.train.preference import (
    PreferenceObjective,
    completion_logps,
    forward_logps,
    preference_loss,
)
from tests.train_fixtures import perturb

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental
trl = pytest.importorskip("trl")  # a dev dependency: installed by `make test`
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

B, T, V = 6, 12, 50


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """2B rows (chosen then rejected) of logits and labels: prompts of 1-4 tokens, completions of
    1-7 tokens, right padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    labels = torch.full((2 * B, T), IGNORE_INDEX)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        prompt = 1 + row % B % 4  # the same prompt length on both sides of a pair
        completion = int(torch.randint(1, T - prompt + 1, (), generator=g))
        labels[row, prompt:prompt + completion] = ids[row, prompt:prompt + completion]
        mask[row, :prompt + completion] = 1
    return {"logits": logits, "labels": labels, "input_ids": ids, "attention_mask": mask}


def _per_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What trl's fused LM head returns as ``log_probs``: (N, T-1), 0 where no label."""
    targets = labels[:, 1:]
    logps = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return logps * (targets != IGNORE_INDEX)


def _trl_dpo(kind: str, beta: float, batch: dict, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """trl's DPOTrainer._compute_loss on a stand-in model (the trainer is not constructed: it would
    need a real model and a dataset; the attributes _compute_loss reads are set as __init__ does)."""
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.beta, trainer.loss_types, trainer.loss_weights = beta, [{"dpo": "sigmoid"}.get(kind, kind)], [1.0]
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef, trainer.ld_alpha = "reverse_kl", 1.0, None
    trainer.precompute_ref_logps, trainer.aux_loss_enabled, trainer.use_weighting = True, False, False
    trainer.label_smoothing, trainer._tp_size, trainer._total_train_tokens = 0.0, 1, 0
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.accelerator = Accelerator(cpu=True)
    trainer.model = SimpleNamespace(training=True)
    log_probs = _per_token_logps(batch["logits"], batch["labels"])
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                              mean_logits=torch.zeros_like(log_probs), is_top1=torch.zeros_like(log_probs, dtype=torch.bool))
    completion_mask = (batch["labels"] != IGNORE_INDEX).long()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return trainer._compute_loss(lambda **_: outputs, inputs, return_outputs=False)


def _ours(kind: str, beta: float, batch: dict, ref_chosen=None, ref_rejected=None, **kw):
    logps, counts = completion_logps(batch["logits"], batch["labels"])
    (chosen, rejected), (nc, nr) = logps.chunk(2), counts.chunk(2)
    return preference_loss(kind, beta, chosen, rejected, nc, nr, ref_chosen, ref_rejected, **kw)


def _references(batch: dict, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    logps, _ = completion_logps(batch["logits"], batch["labels"])
    g = torch.Generator().manual_seed(seed)
    shifted = logps + torch.randn(logps.shape, generator=g, dtype=logps.dtype) * 2
    return shifted.chunk(2)


def test_log_probabilities_and_counts_equal_trls():
    batch = _batch()
    logps, counts = completion_logps(batch["logits"], batch["labels"])
    want_sum = CPOTrainer.get_batch_logps(batch["logits"], batch["labels"], average_log_prob=False)
    want_mean = CPOTrainer.get_batch_logps(batch["logits"], batch["labels"], average_log_prob=True)
    torch.testing.assert_close(logps, want_sum, rtol=0, atol=1e-10)
    torch.testing.assert_close(logps / counts, want_mean, rtol=0, atol=1e-10)
    assert counts.tolist() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).tolist()
    assert len(set(counts.tolist())) > 2  # lengths differ: length normalisation is exercised


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_dpo_and_ipo_equal_trl(kind, beta):
    batch = _batch(seed=3)
    ref_chosen, ref_rejected = _references(batch)
    ours = _ours(kind, beta, batch, ref_chosen, ref_rejected)
    want = _trl_dpo(kind, beta, batch, ref_chosen, ref_rejected)
    torch.testing.assert_close(ours.loss.mean(), want, rtol=0, atol=1e-6)
    logps, _ = completion_logps(batch["logits"], batch["labels"])
    chosen, rejected = logps.chunk(2)
    torch.testing.assert_close(ours.rewards_chosen, beta * (chosen - ref_chosen), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.rewards_rejected, beta * (rejected - ref_rejected), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (0.5, 1.2)])
def test_simpo_equals_trls_cpo_simpo(beta, gamma):
    batch = _batch(seed=4)
    trainer = CPOTrainer.__new__(CPOTrainer)
    trainer.beta, trainer.loss_type, trainer.simpo_gamma, trainer.label_smoothing, trainer.alpha = \
        beta, "simpo", gamma, 0.0, 0.0
    trainer.accelerator = Accelerator(cpu=True)
    mean = CPOTrainer.get_batch_logps(batch["logits"], batch["labels"], average_log_prob=True)
    want, want_chosen, want_rejected = trainer.cpo_loss(*mean.chunk(2))
    ours = _ours("simpo", beta, batch, simpo_gamma=gamma)
    torch.testing.assert_close(ours.loss, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.rewards_chosen, want_chosen, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.rewards_rejected, want_rejected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trls_odds_ratio_plus_the_chosen_nll(beta):
    """ORPO = NLL of the chosen completion (its mean token NLL; trl's SFT term also scores the prompt
    tokens and averages over the batch's tokens; ours scores completion tokens only, per pair, as
    the other preference losses do) - beta * trl's odds-ratio term."""
    batch = _batch(seed=5)
    # the labelled tokens' logits raised row by row: mean log-probabilities from about -4 to about
    # -0.05, on both sides of -log 2 (the two branches of log(1 - exp(x)))
    targets = batch["labels"][:, 1:].clamp(min=0)
    boost = torch.arange(2 * B, dtype=torch.float64)[:, None].expand_as(targets) * 8 / (2 * B)
    batch["logits"] = batch["logits"].clone()
    batch["logits"][:, :-1].scatter_add_(-1, targets[..., None], boost[..., None].contiguous())
    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.beta, trainer.accelerator = beta, Accelerator(cpu=True)
    mean = ORPOTrainer.get_batch_logps(batch["logits"], batch["labels"], average_log_prob=True)
    chosen_mean = mean.chunk(2)[0]
    assert (mean > -0.6931).any() and (mean < -0.6932).any(), mean
    or_terms, want_chosen, want_rejected, *_ = trainer.odds_ratio_loss(*mean.chunk(2))
    ours = _ours("orpo", beta, batch)
    torch.testing.assert_close(ours.loss, -chosen_mean - or_terms, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.extra["nll"], -chosen_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.rewards_chosen, want_chosen.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.rewards_rejected, want_rejected.double(), rtol=0, atol=1e-6)


def test_a_policy_equal_to_its_reference_has_dpo_loss_log_2_and_zero_rewards():
    batch = _batch(seed=6)
    logps, _ = completion_logps(batch["logits"], batch["labels"])
    ours = _ours("dpo", 0.3, batch, *logps.chunk(2))
    torch.testing.assert_close(ours.loss, torch.full((B,), 0.6931471805599453, dtype=torch.float64))
    assert ours.rewards_chosen.abs().max() == 0 and ours.rewards_rejected.abs().max() == 0


# ----------------------------------------------------------------------------------- real models


def _pairs(vocab: int, seed: int = 0) -> list[dict]:
    """Pairs with prompts and completions of different lengths (padding in every batch)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
            for p, c, r in ((1, 5, 2), (4, 1, 7), (3, 3, 3), (6, 2, 9))]


def _stock_logps(stock, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt) from one unpadded forward of the stock class."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = stock(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return float(sum(logps[len(prompt) - 1 + k, t] for k, t in enumerate(completion)))


GPT2_STYLE = dict(position_embedding_type="learned", norm_type="layernorm", hidden_act="gelu_tanh", norm_bias=True,
                  attention_bias=True, mlp_bias=True, num_key_value_heads=4, tie_word_embeddings=True)
MODELS = {
    "llama": lambda: LmforgeGPTForCausalLM(LmforgeGPTConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)),
    "gpt2": lambda: LmforgeGPTForCausalLM(LmforgeGPTConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0, **GPT2_STYLE)),
    "mamba": lambda: LmforgeMambaForCausalLM(LmforgeMambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, pad_token_id=0)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_log_probabilities_of_a_padded_batch_equal_a_direct_forward_of_the_stock_class(name):
    torch.manual_seed(0)
    model = perturb(MODELS[name]()).eval()
    stock = to_hf(model).eval()
    pairs = _pairs(64)
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    with torch.no_grad():
        logps, counts = forward_logps(model, batch)
    want = [_stock_logps(stock, p["prompt_ids"], p[side]) for side in ("chosen_ids", "rejected_ids") for p in pairs]
    torch.testing.assert_close(logps.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-4)
    assert counts.tolist() == [len(p[side]) for side in ("chosen_ids", "rejected_ids") for p in pairs]


def test_objective_weights_pairs_and_ignores_filler_rows():
    """The objective's loss is the mean over real pairs; a filler row (all labels ignored, as an
    evaluation pads an uneven last batch) adds nothing to the loss or the sums."""
    torch.manual_seed(0)
    model = perturb(MODELS["llama"]()).eval()
    objective = PreferenceObjective("simpo", 2.0)
    pairs = _pairs(64)
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    with torch.no_grad():
        whole = objective(model, batch)
        filler = PreferenceCollator(pad_token_id=0)(pairs[:1])
        filler["labels"].fill_(IGNORE_INDEX)
        empty = objective(model, filler)
        parts = [objective(model, PreferenceCollator(pad_token_id=0)([p])) for p in pairs]
    assert whole.pairs == len(pairs) and empty.pairs == 0 and float(empty.loss) == 0
    assert all(float(v) == 0 for v in empty.sums.values())
    torch.testing.assert_close(whole.loss, torch.stack([p.loss for p in parts]).mean(), rtol=1e-5, atol=1e-6)
    for key in whole.sums:
        torch.testing.assert_close(whole.sums[key], sum(p.sums[key] for p in parts), rtol=1e-5, atol=1e-5)
