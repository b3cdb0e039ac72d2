"""``lmforge finetune``: every task with every family on tiny models, LoRA freezing, gradient
accumulation, exact resume, model selection and early stopping, and bad input refused before
anything is written."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.errors import LmforgeError
from tests.finetune_fixtures import (
    finetune_config,
    losses,
    run_finetune,
    save_base,
    write_chats,
    write_labelled,
)

FAMILIES = ("gpt", "bert", "mamba")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bases")
    return {family: save_base(tmp / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return write_labelled(tmp_path_factory.mktemp("labelled"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval_results.json").read_text())


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_classification_trains_every_family(tmp_path, bases, labelled, family, method):
    from transformers import AutoModelForSequenceClassification

    lr = 1e-2 if method == "lora" else 3e-3
    config = finetune_config(tmp_path / "run", bases[family], labelled, method=method,
                             optim={"lr": lr}, train={"max_steps": 24, "eval_every": 8})
    result = run_finetune(config)
    seen = losses(result.run_dir)
    assert len(seen) == 24 and _mean(seen[-6:]) < _mean(seen[:6]), seen
    results = _results(result.run_dir)
    assert {"accuracy", "macro_f1", "matthews_correlation", "loss"} <= set(results["eval"])
    assert {"accuracy", "macro_f1"} <= set(results["test"])
    final = result.final_dir
    assert (final / "README.md").is_file() and str(bases[family]) in (final / "README.md").read_text()
    if method == "lora":
        assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
        assert not (final / "model.safetensors").exists()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(final)
        assert model.config.id2label == {0: "neg", 1: "pos"}
        assert model.config.problem_type == "single_label_classification"


def test_lora_trains_only_the_adapter_and_the_new_head(tmp_path, bases, labelled):
    """Every weight of the base model is bit-identical after LoRA training; the LoRA matrices and
    the new head (modules_to_save) moved."""
    config = finetune_config(tmp_path / "run", bases["gpt"], labelled, method="lora", optim={"lr": 1e-2},
                             lora={"dropout": 0.1})
    result = run_finetune(config)
    base = load_file(bases["gpt"] / "model.safetensors")
    trained = load_file(result.train.last_checkpoint / "model.safetensors")
    lora = {k for k in trained if "lora_" in k}
    head = {k for k in trained if "modules_to_save" in k}
    assert lora and head == {"base_model.model.score.modules_to_save.default.weight"}
    checked = 0
    for key, value in trained.items():
        if key in lora or key in head or "original_module" in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".base_layer", "")
        torch.testing.assert_close(value, base[name], rtol=0, atol=0, msg=key)
        checked += 1
    assert checked == len(base) - 1, (checked, len(base))  # every base weight but the (absent) LM head
    assert all(not torch.equal(trained[k], torch.zeros_like(trained[k])) for k in lora if "lora_B" in k)
    initial_head = trained["base_model.model.score.original_module.weight"]
    assert not torch.equal(trained["base_model.model.score.modules_to_save.default.weight"], initial_head)
    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    assert all("lora_" in k or k.startswith("base_model.model.score.") for k in adapter)


@pytest.mark.parametrize("kind, metrics", [
    ("int", {"accuracy", "macro_f1", "matthews_correlation"}),
    ("multi", {"accuracy", "micro_f1", "macro_f1"}),
    ("regression", {"pearson", "spearman", "mse"}),
])
def test_label_kinds(tmp_path, bases, kind, metrics):
    from transformers import AutoModelForSequenceClassification

    data = write_labelled(tmp_path / "data", kind=kind)
    config = finetune_config(tmp_path / "run", bases["gpt"], data, optim={"lr": 3e-3},
                             train={"max_steps": 24, "eval_every": 8})
    result = run_finetune(config)
    seen = losses(result.run_dir)
    assert _mean(seen[-6:]) < _mean(seen[:6]), seen
    assert metrics <= set(_results(result.run_dir)["eval"])
    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    expected = {"int": "single_label_classification", "multi": "multi_label_classification",
                "regression": "regression"}[kind]
    assert model.config.problem_type == expected
    if kind == "multi":
        assert sorted(model.config.label2id) == ["fair", "love", "none", "sweet"]
    if kind == "regression":
        assert model.config.num_labels == 1


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, bases, labelled):
    """Classification losses are means over rows: 2 micro-batches of 4 must give the gradient of
    one batch of 8 (the loop weights each micro-batch's mean by its share of the rows)."""
    runs = {}
    for name, (micro, accum) in {"big": (8, 1), "accum": (4, 2)}.items():
        config = finetune_config(tmp_path / name, bases["gpt"], labelled, optim={"lr": 3e-3},
                                 train={"micro_batch_size": micro, "grad_accum_steps": accum, "max_steps": 6,
                                        "eval_every": 0})
        runs[name] = run_finetune(config)
    big, accum = (losses(runs[n].run_dir) for n in ("big", "accum"))
    assert big == pytest.approx(accum, rel=1e-5)
    a = load_file(runs["big"].final_dir / "model.safetensors")
    b = load_file(runs["accum"].final_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_lora_run_resumes_exactly(tmp_path, bases, labelled):
    """A LoRA run resumed from its step-4 checkpoint (into a fresh folder) matches the
    uninterrupted run: the same losses and bit-identical adapter and head (LoRA dropout on,
    shuffling on, several epochs)."""
    config = finetune_config(tmp_path / "full", bases["gpt"], labelled, method="lora", optim={"lr": 1e-2},
                             lora={"dropout": 0.2}, train={"max_steps": 30, "eval_every": 10, "save_every": 4})
    whole = run_finetune(config)
    assert whole.train.step == 30
    resumed_config = {**config, "output_dir": str(tmp_path / "resumed"),
                      "resume": str(whole.run_dir / "checkpoints" / "step_12")}
    resumed = run_finetune(resumed_config)
    assert losses(resumed.run_dir) == losses(whole.run_dir)[12:]
    a = load_file(whole.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _results(whole.run_dir) == _results(resumed.run_dir)


def test_best_model_is_kept_and_reported(tmp_path, bases, labelled):
    """final/ holds the model of the best evaluation (not the last), and eval_results.json
    reports that model's figures."""
    config = finetune_config(tmp_path / "run", bases["gpt"], labelled, optim={"lr": 3e-2},
                             train={"max_steps": 24, "eval_every": 2})
    result = run_finetune(config)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r and "selected_step" not in r]
    assert len(evals) == 12
    best_step, best = max(evals, key=lambda e: (e[1], -e[0]))  # the first of equal bests
    results = _results(result.run_dir)
    assert results["best_step"] == best_step
    assert results["eval"]["accuracy"] == pytest.approx(best)
    final, kept = load_file(result.final_dir / "model.safetensors"), load_file(result.run_dir / "best" / "model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in final)


@pytest.mark.parametrize("eval_every, reloaded", [(0, False), (4, True)])
def test_the_closing_evaluation_is_not_run_twice(tmp_path, bases, labelled, monkeypatch, eval_every, reloaded):
    """The trainer's closing evaluation of the validation split is the one reported; the split is
    evaluated again only when an earlier model was reloaded. With lr 1e-9 every evaluation ties and
    the first of equal bests is kept: the step-4 model with periodic evaluations, else the last."""
    import lmforge.train.finetune as finetune

    real, calls = finetune.evaluate_classifier, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(finetune, "evaluate_classifier", counted)
    config = finetune_config(tmp_path / "run", bases["gpt"], labelled, optim={"lr": 1e-9},
                             train={"max_steps": 12, "eval_every": eval_every})
    result = run_finetune(config)
    results = _results(result.run_dir)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    closing = [r for r in rows if r["step"] == 12 and "eval_accuracy" in r and "selected_step" not in r]
    assert len(closing) == 1  # the trainer's own evaluation after the last step
    assert results["best_step"] == (4 if reloaded else 12)
    periodic = 2 if eval_every else 0  # steps 4 and 8
    assert len(calls) == periodic + 1 + reloaded + 1  # ..., the closing one, the reloaded model's, test
    assert results["eval"]["accuracy"] == pytest.approx(closing[0]["eval_accuracy"])  # all tie


def _scripted_trainer(run_dir: Path, values: list[float], patience: int, saved: list[int]):
    """A tiny GPT in the loop, evaluated every step with the next of ``values`` as accuracy."""
    from lmforge.data.collators import CausalLMCollator
    from lmforge.train import BatchStream, LoopConfig, OptimConfig, Trainer
    from lmforge.train.loop import ModelSelection
    from tests.test_train_loop import tiny_gpt, variable_rows
    from tests.train_fixtures import gpt_tokenizer

    tok = gpt_tokenizer()
    stream = BatchStream(variable_rows(tok, 16), 4, CausalLMCollator(tok.pad_token_id), seed=0)
    scores = iter(values)
    select = ModelSelection("accuracy", True, lambda model, step, metrics: saved.append(step), patience=patience)
    cfg = LoopConfig(micro_batch_size=4, max_steps=len(values), eval_every=1, save_every=1, keep_last=20,
                     progress=False)
    return Trainer(tiny_gpt(len(tok)), stream, cfg, OptimConfig(), run_dir,
                   evaluate=lambda model, final: {"accuracy": next(scores)}, select=select)


def test_early_stopping_and_selection_in_the_loop(tmp_path):
    """The loop keeps the best evaluation (ties keep the earlier one), stops after `patience`
    evaluations in a row without improvement, and carries the count across a resume."""
    values = [0.5, 0.7, 0.6, 0.7, 0.65, 0.9, 0.95, 0.99]
    saved: list[int] = []
    result = _scripted_trainer(tmp_path / "a", values, patience=3, saved=saved).fit()
    assert result.status == "early stopped" and result.step == 5
    assert (result.best_step, result.best_value) == (2, 0.7) and saved == [1, 2]

    saved = []
    trainer = _scripted_trainer(tmp_path / "b", values[3:] + [0.0] * 3, patience=3, saved=saved)
    trainer.resume(tmp_path / "a" / "checkpoints" / "step_3")  # best 0.7 at step 2, one miss so far
    result = trainer.fit()
    assert result.status == "early stopped" and result.step == 5 and saved == []

    saved = []
    result = _scripted_trainer(tmp_path / "c", values, patience=0, saved=saved).fit()
    assert result.status == "completed" and saved == [1, 2, 6, 7, 8]  # the last is the final evaluation
    assert (result.best_step, result.best_value) == (8, 0.99)


# --------------------------------------------------------------------------- sft


@pytest.fixture(scope="module")
def chat_bases(tmp_path_factory) -> dict[str, Path]:
    """Random bases with the chat tokenizer. Their weights start larger than a real init (0.3):
    with 0.02, the frozen tied embedding keeps every logit near zero and a LoRA adapter on a
    random 32-wide model cannot move the loss in a few steps (a pretrained base has no such
    problem)."""
    tmp = tmp_path_factory.mktemp("chat-bases")
    return {family: save_base(tmp / family, family, chat=True, initializer_range=0.3) for family in ("gpt", "mamba")}


@pytest.mark.parametrize("family, method, pack", [("gpt", "full", False), ("gpt", "lora", True),
                                                  ("mamba", "full", True)])
def test_sft_trains_and_answers_in_the_assistant_role(tmp_path, chat_bases, family, method, pack, monkeypatch,
                                                      capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.data.chat import chat_generate

    data = write_chats(tmp_path / "chats")
    config = finetune_config(tmp_path / "run", chat_bases[family], data, task="sft", method=method,
                             data={"pack": pack, "max_length": 64}, optim={"lr": 1e-2},
                             train={"max_steps": 30, "eval_every": 10, "micro_batch_size": 4})
    result = run_finetune(config)
    seen = losses(result.run_dir)
    assert _mean(seen[-5:]) < _mean(seen[:5]) - 0.5, seen
    assert {"loss", "perplexity"} <= set(_results(result.run_dir)["eval"])
    if method == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(chat_bases[family])
        model = PeftModel.from_pretrained(base, result.final_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    answer = chat_generate(model, tokenizer, [{"role": "user", "content": "say crown"}], max_new_tokens=12)
    assert "<|user|>" not in answer and "<|assistant|>" not in answer
    assert isinstance(answer, str)
    # `lmforge chat` on the run folder (an adapter: on its base) answers the same, greedy
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("say crown\n"))
    assert main(["chat", str(result.run_dir), "--greedy", "--max-new-tokens", "12", "--compile", "no"]) == 0
    assert capsys.readouterr().out == answer + "\n"


# --------------------------------------------------------------------------- bad input


def _refused(tmp_path: Path, config: dict, *needles: str) -> None:
    with pytest.raises(LmforgeError) as info:
        run_finetune(config)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert not Path(config["output_dir"]).exists()


def test_missing_label_column_is_refused(tmp_path, bases, labelled):
    config = finetune_config(tmp_path / "run", bases["bert"], labelled, data={"label_column": "stars"})
    _refused(tmp_path, config, "stars", "label")


def test_unseen_eval_label_is_refused(tmp_path, bases):
    data = write_labelled(tmp_path / "data")
    rows = (data / "validation.jsonl").read_text().splitlines()
    rows[3] = json.dumps({"text": "the king", "label": "maybe"})
    (data / "validation.jsonl").write_text("\n".join(rows) + "\n")
    _refused(tmp_path, finetune_config(tmp_path / "run", bases["bert"], data), "maybe", "validation")


def test_a_single_class_is_refused(tmp_path, bases):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"text {i}", "label": "pos"}) + "\n"
                                                     for i in range(10)))
    _refused(tmp_path, finetune_config(tmp_path / "run", bases["bert"], data), "pos")


def test_empty_text_is_refused(tmp_path, bases):
    data = write_labelled(tmp_path / "data")
    rows = (data / "train.jsonl").read_text().splitlines()
    rows[5] = json.dumps({"text": "   ", "label": "pos"})
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    _refused(tmp_path, finetune_config(tmp_path / "run", bases["bert"], data), "empty")


def test_lora_targets_that_match_nothing_are_refused(tmp_path, bases, labelled):
    config = finetune_config(tmp_path / "run", bases["gpt"], labelled, method="lora",
                             lora={"target_modules": ["query", "value"]})
    _refused(tmp_path, config, "query", "q_proj", "o_proj")


def test_unknown_selection_metric_is_refused(tmp_path, bases, labelled):
    config = finetune_config(tmp_path / "run", bases["bert"], labelled, train={"metric_for_best": "f1"})
    _refused(tmp_path, config, "'f1'", "macro_f1")


def test_missing_model_is_refused(tmp_path, labelled):
    _refused(tmp_path, finetune_config(tmp_path / "run", tmp_path / "nowhere", labelled), "nowhere")


def test_sft_needs_a_chat_template(tmp_path, bases):
    data = write_chats(tmp_path / "chats")
    _refused(tmp_path, finetune_config(tmp_path / "run", bases["gpt"], data, task="sft"), "chat template")


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "hello"}], "assistant"),
    ([{"role": "narrator", "content": "once"}, {"role": "assistant", "content": "upon"}], "narrator"),
])
def test_bad_chat_rows_are_refused(tmp_path, chat_bases, messages, needle):
    data = write_chats(tmp_path / "chats")
    rows = (data / "train.jsonl").read_text().splitlines()
    rows[2] = json.dumps({"messages": messages})
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    config = finetune_config(tmp_path / "run", chat_bases["gpt"], data, task="sft")
    _refused(tmp_path, config, needle)


def test_an_existing_run_folder_is_not_touched(tmp_path, bases, labelled):
    from tests.train_fixtures import snapshot

    first = run_finetune(finetune_config(tmp_path / "run", bases["bert"], labelled, train={"max_steps": 2}))
    before = snapshot(first.run_dir)
    with pytest.raises(LmforgeError, match="already holds a run"):
        run_finetune(finetune_config(tmp_path / "run", bases["gpt"], labelled, train={"max_steps": 2}))
    assert snapshot(first.run_dir) == before


# --------------------------------------------------------------------------- with eval and merge


@pytest.mark.parametrize("family", ["bert", "mamba"])
def test_lora_run_evaluates_and_merges_with_its_label_names(tmp_path, bases, labelled, family):
    """A LoRA classification run's final/ (adapter + its config) evaluates with `lmforge eval`
    to the figures the run reported on the test split, and `lmforge merge` gives a plain model
    that keeps the string labels and scores exactly the same."""
    from transformers import AutoModelForSequenceClassification

    config = finetune_config(tmp_path / "run", bases[family], labelled, method="lora", optim={"lr": 1e-2})
    result = run_finetune(config)
    reported = _results(result.run_dir)["test"]
    figures = {}
    for name, folder in (("adapter", result.run_dir), ("merged", tmp_path / "merged")):
        if name == "merged":
            assert main(["merge", str(result.final_dir), "--output-dir", str(folder)]) == 0
            merged = AutoModelForSequenceClassification.from_pretrained(folder)
            assert merged.config.id2label == {0: "neg", 1: "pos"}
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(folder), "--data", str(labelled), "--split", "test", "--max-length", "32",
                     "--output-json", str(out), "--no-progress"]) == 0
        figures[name] = json.loads(out.read_text())["models"][0]
    for name, got in figures.items():
        assert got["task"] == "classification", name
        assert got["accuracy"] == reported["accuracy"], name
        assert got["macro_f1"] == pytest.approx(reported["macro_f1"]), name
        assert got["loss"] == pytest.approx(reported["loss"], rel=1e-4), name


@pytest.mark.parametrize("present", [("train", "validation"), ("train", "test")])
def test_optional_splits_are_used_when_present_and_a_named_missing_one_is_refused(tmp_path, bases, labelled,
                                                                                 present, capsys):
    """Train + validation: trains, selects, and says nothing was tested; train + test: no model
    selection, but the test split is scored. A split named explicitly and missing stays an error."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for split in present:
        shutil.copy(labelled / f"{split}.jsonl", data / f"{split}.jsonl")
    result = run_finetune(finetune_config(tmp_path / "run", bases["bert"], data, train={"max_steps": 4}))
    assert result.final_dir is not None
    assert set(result.metrics) == ({"eval"} if "validation" in present else {"test"})
    assert main(["finetune", "--model.path", str(bases["bert"]), "--data", str(data), "--method", "full",
                 "--train.max-steps", "2", "--train.epochs", "null", "--data.max-length", "32",
                 "--output-dir", str(tmp_path / "cli"), "--no-train.progress"]) == 0
    out = capsys.readouterr().out
    if "test" in present:
        assert re.search(r"^  test: .*accuracy", out, re.M) and "no validation split: no evaluation during training" in out
    else:
        assert "test: nothing tested (the data has no test split)" in out
    missing = "validation" if "test" in present else "test"
    key = {"validation": "eval_split", "test": "test_split"}[missing]
    with pytest.raises(LmforgeError, match=f"data.{key}: {data} has no split '{missing}'"):
        run_finetune(finetune_config(tmp_path / "named", bases["bert"], data, data={key: missing}))
    assert not (tmp_path / "named").exists()
