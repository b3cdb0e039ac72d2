"""``lmforge finetune --task preference``: every loss on GPT and Mamba, full and LoRA, every kind
of reference model, the figures logged, gradient accumulation, exact resume, and bad input
refused before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import LmforgeError
from lmforge.train.preference import REFERENCE_FILE, load_reference_logps
from tests.finetune_fixtures import finetune_config, losses, run_finetune, save_base, write_pairs

LOG_2 = math.log(2)
FIGURES = {"rewards_chosen", "rewards_rejected", "margin", "accuracy", "logps_chosen", "logps_rejected"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pref-bases")
    # weights larger than a real init: the policy's log-probabilities move within a few steps
    return {family: save_base(tmp / family, family, initializer_range=0.3) for family in ("gpt", "mamba")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"), n_train=40, n_eval=12, n_test=10)


def _config(tmp: Path, base: Path, data: Path, /, *, method: str = "full", loss: str = "dpo",
            reference: str = "auto", **sections) -> dict:
    sections.setdefault("optim", {"lr": 1e-2})
    lora = {"dropout": 0.0, **sections.pop("lora", {})}
    return finetune_config(tmp, base, data, task="preference", method=method, lora=lora,
                           preference={"loss": loss, "reference": reference, **sections.pop("preference", {})},
                           **sections)


def _assert_same_steps(got: list[dict], want: list[dict], where: str) -> None:
    """Per-step figures equal to float noise: float32 sums in other batch shapes, amplified over
    the steps by Adam (the first steps agree to the last logged digit, later ones to a
    few 1e-6); rewards and margins are beta x differences of two log-probabilities of about -50."""
    assert len(got) == len(want) > 0
    for step, (a, b) in enumerate(zip(got, want, strict=True), 1):
        for key in b:
            if key == "accuracy" and step == 1:
                # the first logged figures start from a policy equal to its reference: every margin is
                # 0 up to float noise, whose sign (so the share of margins > 0) depends on the batch
                # shapes and the thread count
                continue
            close = {"rel": 1e-5, "abs": 2e-5} if key in ("rewards_chosen", "rewards_rejected", "margin") else \
                {"rel": 1e-5, "abs": 5e-6}
            assert a[key] == pytest.approx(b[key], **close), f"{where}: step {step} {key}"


def _steps(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in ("loss", *FIGURES)} for r in _rows(run_dir) if "loss" in r]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


CASES = [("gpt", "full", "dpo", "auto"), ("gpt", "lora", "dpo", "auto"), ("gpt", "full", "ipo", "precomputed"),
         ("gpt", "lora", "simpo", "auto"), ("gpt", "full", "orpo", "auto"), ("mamba", "lora", "dpo", "adapter"),
         ("mamba", "full", "dpo", "copy")]


@pytest.mark.parametrize(("family", "method", "loss", "reference"), CASES)
def test_preference_tuning_trains_and_logs_its_figures(tmp_path, bases, pairs, family, method, loss, reference):
    from transformers import AutoModelForCausalLM

    config = _config(tmp_path / "run", bases[family], pairs, method=method, loss=loss, reference=reference)
    result = run_finetune(config)
    rows = _rows(result.run_dir)
    train = [r for r in rows if "loss" in r]
    assert len(train) == 12 and FIGURES <= train[0].keys()
    if loss in ("dpo", "ipo"):  # the policy starts as its reference: zero rewards, DPO's loss log 2
        assert train[0]["rewards_chosen"] == pytest.approx(0, abs=1e-6)
        assert train[0]["margin"] == pytest.approx(0, abs=1e-6)
        if loss == "dpo":
            assert train[0]["loss"] == pytest.approx(LOG_2, abs=1e-6)
    else:  # reference-free: rewards are beta x the mean log-probability of each completion
        assert train[0]["rewards_chosen"] < 0
    if loss == "orpo":
        assert "nll" in train[0]
    assert train[-1]["margin"] > train[0]["margin"] and train[-1]["loss"] < train[0]["loss"]
    evals = [r for r in rows if "eval_loss" in r and "selected_step" not in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert {f"eval_{k}" for k in FIGURES} <= evals[0].keys() and evals[0]["eval_pairs"] == 12
    results = json.loads((result.run_dir / "eval_results.json").read_text())
    assert results["test"]["pairs"] == 10 and 0 <= results["test"]["accuracy"] <= 1
    final = result.final_dir
    if method == "lora":
        assert (final / "adapter_config.json").is_file()
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
        assert (final / "generation_config.json").is_file() and model.config.model_type == f"lmforge_{family}"
    assert (result.run_dir / REFERENCE_FILE).is_file() == (reference == "precomputed")


def test_the_references_agree(tmp_path, bases, pairs):
    """A frozen copy, the adapter switched off and stored log-probabilities are the same reference:
    the same losses and figures at every step (float noise: batched forwards of other shapes)."""
    runs = {}
    for method, reference in (("full", "copy"), ("full", "precomputed"), ("lora", "adapter"), ("lora", "precomputed")):
        config = _config(tmp_path / f"{method}-{reference}", bases["gpt"], pairs, method=method, reference=reference,
                         train={"eval_every": 0})
        runs[method, reference] = _steps(run_finetune(config).run_dir)
    for method in ("full", "lora"):
        _assert_same_steps(runs[method, "precomputed"], runs[method, "copy" if method == "full" else "adapter"], method)


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, bases, pairs):
    """The loss is a mean over pairs: 2 micro-batches of 4 pairs give the step of one batch of 8."""
    runs = {}
    for name, (micro, accum) in {"big": (8, 1), "accum": (4, 2)}.items():
        config = _config(tmp_path / name, bases["gpt"], pairs, optim={"lr": 3e-3},
                         train={"micro_batch_size": micro, "grad_accum_steps": accum, "eval_every": 0})
        runs[name] = run_finetune(config)
    _assert_same_steps(_steps(runs["accum"].run_dir), _steps(runs["big"].run_dir), "accumulation")
    a = load_file(runs["big"].final_dir / "model.safetensors")
    b = load_file(runs["accum"].final_dir / "model.safetensors")
    for key in a:  # Adam divides by sqrt(v): an element whose gradients are near zero amplifies float noise
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("reference", ["precomputed", "adapter"])
def test_a_lora_run_resumes_exactly(tmp_path, bases, pairs, reference):
    """Resumed from its step-4 checkpoint into a fresh folder (LoRA dropout on, several epochs),
    the run matches the uninterrupted one bit for bit; stored reference log-probabilities are read
    back from the run they belong to (the model at step 4 would give others), and kept with the
    new run."""
    config = _config(tmp_path / "whole", bases["gpt"], pairs, method="lora", reference=reference,
                     lora={"dropout": 0.2}, train={"max_steps": 14, "eval_every": 7, "save_every": 4})
    whole = run_finetune(config)
    resumed = run_finetune({**config, "output_dir": str(tmp_path / "resumed"),
                            "resume": str(whole.run_dir / "checkpoints" / "step_4")})
    assert losses(resumed.run_dir) == losses(whole.run_dir)[4:]
    a = load_file(whole.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((whole.run_dir / "eval_results.json").read_text()) == \
        json.loads((resumed.run_dir / "eval_results.json").read_text())
    if reference == "precomputed":
        sizes = {"train": 40, "eval": 12, "test": 10}
        first = load_reference_logps(whole.run_dir / REFERENCE_FILE, sizes)
        kept = load_reference_logps(resumed.run_dir / REFERENCE_FILE, sizes)
        assert all(torch.equal(first[s][side], kept[s][side]) for s in sizes for side in ("chosen", "rejected"))


def test_a_missing_stored_reference_is_refused_on_resume(tmp_path, bases, pairs):
    config = _config(tmp_path / "run", bases["gpt"], pairs, reference="precomputed",
                     train={"max_steps": 4, "eval_every": 0, "save_every": 2})
    run = run_finetune(config)
    (run.run_dir / REFERENCE_FILE).unlink()
    with pytest.raises(LmforgeError, match=f"its {REFERENCE_FILE} is missing"):
        run_finetune({**config, "output_dir": str(tmp_path / "again"),
                      "resume": str(run.run_dir / "checkpoints" / "step_2")})
    assert not (tmp_path / "again").exists()


def test_conversational_pairs_train(tmp_path, pairs):
    chat_base = save_base(tmp_path / "base", "gpt", chat=True, initializer_range=0.3)
    data = write_pairs(tmp_path / "chat-pairs", chat=True)
    result = run_finetune(_config(tmp_path / "run", chat_base, data, method="lora", train={"max_steps": 6}))
    train = [r for r in _rows(result.run_dir) if "loss" in r]
    assert train[0]["loss"] == pytest.approx(LOG_2, abs=1e-6) and train[-1]["margin"] > 0


def test_model_selection_on_a_preference_metric(tmp_path, bases, pairs):
    config = _config(tmp_path / "run", bases["gpt"], pairs, train={"eval_every": 2, "metric_for_best": "accuracy"})
    result = run_finetune(config)
    evals = [(r["step"], r["eval_accuracy"]) for r in _rows(result.run_dir)
             if "eval_accuracy" in r and "selected_step" not in r]
    best_step, best = max(evals, key=lambda e: (e[1], -e[0]))
    results = json.loads((result.run_dir / "eval_results.json").read_text())
    assert results["best_step"] == best_step and results["eval"]["accuracy"] == pytest.approx(best)


# ----------------------------------------------------------------------------------- bad input


def _refused(config: dict, *needles: str) -> None:
    with pytest.raises((LmforgeError, ValueError)) as info:
        run_finetune(config)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert not Path(config["output_dir"]).exists()


def _rewrite(folder: Path, split: str, change) -> Path:
    path = folder / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in change(rows)))
    return folder


def test_missing_columns_are_refused(tmp_path, bases, pairs):
    config = _config(tmp_path / "run", bases["gpt"], pairs, data={"chosen_column": "better"})
    _refused(config, "no chosen column 'better'", "the columns are prompt, chosen, rejected")


def test_a_pair_whose_chosen_equals_rejected_is_refused(tmp_path, bases):
    data = write_pairs(tmp_path / "data")
    _rewrite(data, "validation", lambda rows: [*rows[:3], {**rows[3], "rejected": rows[3]["chosen"]}, *rows[4:]])
    _refused(_config(tmp_path / "run", bases["gpt"], data), "(split 'validation') row 3",
             "the chosen and the rejected completion are the same")


def test_an_empty_completion_is_refused(tmp_path, bases):
    data = write_pairs(tmp_path / "data")
    _rewrite(data, "train", lambda rows: [{**rows[0], "rejected": ""}, *rows[1:]])
    _refused(_config(tmp_path / "run", bases["gpt"], data), "(split 'train') row 0", "the rejected completion is empty")


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_a_reference_free_loss_given_a_reference_is_refused(tmp_path, bases, pairs, loss):
    _refused(_config(tmp_path / "run", bases["gpt"], pairs, loss=loss, reference="copy"),
             "preference.reference: copy", f"preference.loss {loss} is reference-free")


def test_an_adapter_reference_needs_lora(tmp_path, bases, pairs):
    _refused(_config(tmp_path / "run", bases["gpt"], pairs, method="full", reference="adapter"),
             "preference.reference: adapter", "method is full")


def test_nll_selects_only_orpo(tmp_path, bases, pairs):
    _refused(_config(tmp_path / "run", bases["gpt"], pairs, train={"metric_for_best": "nll"}),
             "nll is reported only for preference.loss orpo")
