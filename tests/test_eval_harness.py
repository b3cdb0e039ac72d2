"""``lmforge eval MODEL --tasks ...`` through lm-evaluation-harness, and the two tasks lmforge ships.

The harness's per-choice log-likelihoods equal lmforge's own scoring of the same strings; its
rolling perplexity equals ``lmforge eval``'s strided perplexity; ``lm_eval --model hf`` on a saved
lmforge model gives the in-process figures; the command checks its input before loading anything;
the figures saved beside the model reach the model card's model-index through ``lmforge push``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import lmforge.models  # noqa: F401  (registers the lmforge families)
from lmforge.cli import main
from lmforge.data.sources import load_corpus, load_table
from lmforge.errors import LmforgeError
from lmforge.eval import harness
from lmforge.eval.harness import (
    HARNESS_RESULTS,
    continuation_logprobs,
    read_harness_results,
    resolve_tasks,
    run_harness,
    task_figures,
    task_manager,
)
from lmforge.eval.lm import evaluate_lm_strided, joined_ids
from lmforge.eval.tasks import TASKS_DIR
from lmforge.publish.cards import (
    HARNESS_SOURCE,
    build_card,
    folder_facts,
    with_harness_results,
    write_card,
)
from tests.train_fixtures import PRESETS, gpt_tokenizer, launch_env

pytest.importorskip("lm_eval")

MC, ROLLING = "lmforge_rotten_tomatoes", "lmforge_shakespeare"
LIMIT = 6  # examples of each task: 12 choice requests, 6 passages of about 2,000 characters
WINDOW = 64  # the tiny GPT's context: the harness's rolling windows and lmforge's strided ones


def _config(family: str, tokenizer, **changes):
    values = {**PRESETS[family], **changes}
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values, **special, vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def tok():
    plays = "\n".join(load_corpus("shakespeare", "train")["text"][:2])
    reviews = load_table("rotten-tomatoes", "train")["text"][:500]
    return gpt_tokenizer(plays.splitlines()[:4000] + reviews, vocab_size=400)


@pytest.fixture(scope="module")
def gpt(tok):
    """A tiny lmforge GPT fitted a little on Shakespeare, so that context changes its predictions."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("gpt", tok, hidden_dropout=0.0,
                                                                  attention_dropout=0.0))
    ids = torch.from_numpy(joined_ids(tok, load_corpus("shakespeare", "train")["text"][2:3]))
    rows = ids[: (ids.numel() // WINDOW) * WINDOW].view(-1, WINDOW)[:240]
    optim = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for step in range(30):
        batch = rows[(step * 8) % len(rows):][:8]
        model(input_ids=batch, labels=batch).loss.backward()
        optim.step()
        optim.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def saved(gpt, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-gpt"
    gpt.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm_eval_cli(saved, tmp_path_factory):
    """The harness's own command line on the saved folder, started first so that it runs (about
    20 s, most of it indexing the harness's 14,000 built-in task files) beside the other tests;
    the last test of the file reads what it wrote."""
    out = tmp_path_factory.mktemp("lm_eval_out")
    command = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={saved},trust_remote_code=True", "--tasks", f"{MC},{ROLLING}", "--include_path",
               str(TASKS_DIR), "--limit", str(LIMIT), "--device", "cpu", "--output_path", str(out)]
    process = subprocess.Popen(command, cwd=out, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    yield process, out
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def tasks():
    return resolve_tasks([MC, ROLLING])


@pytest.fixture(scope="module")
def manager(tasks):
    return task_manager(tasks)


@pytest.fixture(scope="module")
def in_process(gpt, tok, tasks, manager, lm_eval_cli):
    return run_harness(gpt, tok, tasks, manager=manager, limit=LIMIT, batch_size=4, log_samples=True)


# ----------------------------------------------------------------------------------- the figures


def _pairs_and_scores(samples: list[dict]) -> tuple[list[tuple[str, str]], list[float]]:
    pairs = [tuple(request) for sample in samples for request in sample["arguments"]]
    scores = [ll for sample in samples for ll, _greedy in sample["filtered_resps"]]
    return pairs, scores


def test_choice_loglikelihoods_equal_lmforge_scoring(gpt, tok, in_process):
    samples = in_process["samples"][MC]
    assert len(samples) == LIMIT
    pairs, scores = _pairs_and_scores(samples)
    assert all(context.endswith("\nSentiment:") and cont in (" negative", " positive") for context, cont in pairs)
    ours = continuation_logprobs(gpt, tok, pairs)
    assert ours == pytest.approx(scores, abs=1e-5)
    # accuracy is the share of documents whose label has the higher log-likelihood
    right = [max(range(2), key=lambda i: s["filtered_resps"][i][0]) == s["target"] for s in samples]
    assert task_figures(in_process)[MC]["metrics"]["acc"] == pytest.approx(sum(right) / LIMIT)


def test_trailing_whitespace_of_a_context_is_scored_with_the_continuation(gpt, tok):
    moved, plain = continuation_logprobs(gpt, tok, [("Review: fine.\nSentiment: ", "positive"),
                                                    ("Review: fine.\nSentiment:", " positive")])
    assert moved == plain  # " positive" is one byte-level BPE token either way
    (empty,) = continuation_logprobs(gpt, tok, [("", "To be")])
    assert empty < 0


def test_a_mamba_model_runs_through_the_harness_with_the_same_loglikelihoods(tok, tasks, manager):
    torch.manual_seed(0)
    mamba = transformers.AutoModelForCausalLM.from_config(_config("mamba", tok)).eval()
    results = run_harness(mamba, tok, resolve_tasks([MC]), manager=manager, limit=2, log_samples=True)
    pairs, scores = _pairs_and_scores(results["samples"][MC])
    assert continuation_logprobs(mamba, tok, pairs) == pytest.approx(scores, abs=1e-5)


def test_a_lora_adapter_is_evaluated_on_its_base(saved, tok, manager, tmp_path, in_process):
    from peft import LoraConfig, TaskType, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(saved)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora).eval()
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    (row,) = _eval([adapter, "--tasks", MC, "--limit", 2], tmp_path / "r.json")["models"]
    results = run_harness(peft_model, tok, resolve_tasks([MC]), manager=manager, limit=2, log_samples=True)
    pairs, scores = _pairs_and_scores(results["samples"][MC])
    assert continuation_logprobs(peft_model, tok, pairs) == pytest.approx(scores, abs=1e-5)
    _, plain = _pairs_and_scores(in_process["samples"][MC][:2])
    assert scores != pytest.approx(plain, abs=1e-3)  # the adapter is applied
    assert row["tasks"][MC]["metrics"]["acc"] == task_figures(results)[MC]["metrics"]["acc"]
    assert set(read_harness_results(adapter)) == {MC}  # saved beside the adapter, which is what is pushed


def test_rolling_perplexity_equals_lmforge_strided_perplexity(gpt, tok, in_process):
    samples = in_process["samples"][ROLLING]
    texts = [s["doc"]["text"] for s in samples]
    assert len(texts) == LIMIT and all(1000 < len(t) < 4000 for t in texts)
    figures = task_figures(in_process)[ROLLING]["metrics"]
    nll = -sum(s["filtered_resps"][0] for s in samples)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert figures["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-9)
    assert figures["byte_perplexity"] == pytest.approx(2 ** figures["bits_per_byte"], rel=1e-9)
    # The same texts through lmforge's disjoint windows of the harness's length. They still differ
    # a little: the harness scores every passage alone, its first token after the EOT prefix and
    # its windows starting again at each passage; lmforge reads the passages as one stream joined
    # by EOS, so a passage's first token sees the end of the one before, windows run across
    # passages (their starts shifted), and the first token of the stream is not scored while each
    # EOS is (their NLL counts, their bytes do not).
    ours = evaluate_lm_strided(gpt, tok, texts, max_length=WINDOW, stride=WINDOW, progress=False)
    assert in_process["lmforge_max_length"] == WINDOW
    assert figures["bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=5e-3)
    print(f"rolling bits per byte: harness {figures['bits_per_byte']:.6f}, lmforge {ours['bits_per_byte']:.6f} "
          f"({figures['bits_per_byte'] / ours['bits_per_byte'] - 1:+.3%})")
    assert ours["bits_per_byte"] < 7.5  # the fitted model is far better than uniform (log2 400 = 8.6 bits per token)


# ----------------------------------------------------------------------------------- the command


def _eval(args: list, out: Path) -> dict:
    assert main(["eval", *map(str, args), "--output-json", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def _fails(args: list, capsys, tmp_path) -> str:
    out = tmp_path / "never.json"
    assert main(["eval", *map(str, args), "--output-json", str(out), "--no-progress"]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("lmforge: error: ") and "Traceback" not in err
    return err


def test_tasks_by_yaml_file_include_path_and_name(saved, tmp_path, in_process, capsys):
    mine = tmp_path / "my-tasks"  # a user's own local definition: our sentiment task renamed
    mine.mkdir()
    shutil.copy(TASKS_DIR / "builtin_data.py", mine / "builtin_data.py")
    text = (TASKS_DIR / f"{MC}.yaml").read_text().replace(f"task: {MC}", "task: my_sentiment")
    (mine / "my_sentiment.yaml").write_text(text.replace("tag: lmforge", "tag: mine"))
    model, other = tmp_path / "model", tmp_path / "other"
    shutil.copytree(saved, model)
    shutil.copytree(saved, other)

    by_file = _eval([model, "--tasks", mine / "my_sentiment.yaml", "--limit", LIMIT, "--no-record"], tmp_path / "f.json")
    assert by_file["tasks"] == ["my_sentiment"] and str(mine) in by_file["include_paths"]
    assert not (model / HARNESS_RESULTS).exists()  # --no-record
    by_path = _eval([model, "--include-path", mine, "--tasks", "my_sentiment", "--limit", LIMIT, "--no-record"],
                    tmp_path / "p.json")
    by_name = _eval([model, "--tasks", MC, "--limit", LIMIT, "--compare", other], tmp_path / "n.json")
    out = capsys.readouterr().out
    assert re.search(rf"\| {MC} acc +\| +[\d.]+ \| +[\d.]+ \|", out)  # a column per model
    assert "lmforge push puts them into the model card" in out
    want = task_figures(in_process)[MC]["metrics"]["acc"]
    rows = [(by_file["models"][0], "my_sentiment"), (by_path["models"][0], "my_sentiment"),
            *((row, MC) for row in by_name["models"])]
    assert [row["name"] for row in by_name["models"]] == ["model", "other"]
    for row, task in rows:
        assert row["tasks"][task]["metrics"]["acc"] == pytest.approx(want)
        assert row["tasks"][task]["samples"] == LIMIT and row["tasks"][task]["split"] == "test"
    for folder in (model, other):
        saved_figures = read_harness_results(folder)
        assert set(saved_figures) == {MC} and saved_figures[MC]["limit"] == LIMIT
        assert saved_figures[MC]["metrics"]["acc"] == pytest.approx(want)


def test_an_unknown_task_is_refused_with_near_names_before_any_model_is_loaded(saved, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("lmforge.commands.eval.load_model", never)
    model = tmp_path / "model"
    shutil.copytree(saved, model)
    err = _fails([model, "--tasks", "lmforge_rotten_tomatos", "hellaswg"], capsys, tmp_path)
    assert "unknown tasks 'lmforge_rotten_tomatos' (near: lmforge_rotten_tomatoes" in err
    assert "'hellaswg' (near: hellaswag" in err
    assert not (model / HARNESS_RESULTS).exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "shakespeare", "--tasks", MC], "--data and --tasks are two different evaluations"),
    ([], "nothing to evaluate on: give --data SOURCE"),
    (["--data", "shakespeare", "--limit", "3"], "--limit applies only to --tasks"),
    (["--tasks", MC, "--stride", "8"], "--stride applies to --data only"),
    (["--tasks", MC, "--limit", "2.5"], "--limit must be a whole number of examples"),
    (["--tasks", MC, "--num-fewshot", "-1"], "--num-fewshot must be 0 or more"),
    (["--tasks", "nowhere/task.yaml"], "--tasks nowhere/task.yaml: no such task file"),
    (["--tasks", MC, "--include-path", "nowhere"], "--include-path nowhere: no such folder"),
])
def test_bad_input_is_refused_before_anything_is_written(saved, tmp_path, capsys, args, message):
    assert message in _fails([saved, *args], capsys, tmp_path)
    assert not (saved / HARNESS_RESULTS).exists()


def test_a_task_file_without_a_name_and_a_classifier_are_refused(saved, tok, tmp_path, capsys):
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("output_type: multiple_choice\ncustom_dataset: !function builtin_data.rotten_tomatoes\n")
    assert "the file names no task" in _fails([saved, "--tasks", nameless], capsys, tmp_path)
    shutil.copy(TASKS_DIR / f"{MC}.yaml", tmp_path / "task.yml")
    assert "reads task files named *.yaml only" in _fails([saved, "--tasks", tmp_path / "task.yml"], capsys, tmp_path)
    classifier = tmp_path / "clf"
    _config("gpt", tok, num_labels=2, architectures=["LmforgeGPTForSequenceClassification"]).save_pretrained(classifier)
    assert "causal language models; this is a sequence classifier" in _fails([classifier, "--tasks", MC], capsys, tmp_path)


def test_without_lm_eval_the_error_says_what_to_install(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    err = _fails([saved, "--tasks", MC], capsys, tmp_path)
    assert "pip install 'lmforge[harness]'" in err
    with pytest.raises(LmforgeError, match=r"lmforge\[harness\]"):
        harness.import_harness()


# ----------------------------------------------------------------------------------- the model card


def test_the_model_card_and_a_push_carry_the_benchmarks(saved, in_process, tmp_path, fake_hub):
    model = tmp_path / "model"
    shutil.copytree(saved, model)
    write_card(model, folder_facts(model))  # a card written before the benchmarks were run
    assert "## Benchmarks" not in (model / "README.md").read_text()
    harness.save_harness_results(model, task_figures(in_process, limit=LIMIT))
    want = task_figures(in_process)

    card = build_card(model, folder_facts(model))
    rows = {(r.dataset_type, r.metric_type): r for r in card.data.eval_results if r.source_name == HARNESS_SOURCE}
    assert set(rows) == {(MC, "acc"), (ROLLING, "word_perplexity"), (ROLLING, "byte_perplexity"),
                         (ROLLING, "bits_per_byte")}  # standard errors are not results
    assert rows[MC, "acc"].metric_value == pytest.approx(want[MC]["metrics"]["acc"], abs=1e-6)
    assert rows[MC, "acc"].dataset_split == "test" and rows[MC, "acc"].dataset_args == {"num_few_shot": 0}
    assert rows[MC, "acc"].dataset_name == f"{MC} (0-shot, first {LIMIT} of 1059 examples)"
    again = with_harness_results(card, model)  # idempotent: the rows and the section are replaced
    assert len(again.data.eval_results) == len(rows) and str(again).count("## Benchmarks") == 1

    assert main(["push", str(model), "user/tiny-gpt"]) == 0
    from huggingface_hub import ModelCard

    pushed = ModelCard(fake_hub.files("user/tiny-gpt")["README.md"].decode())
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in pushed.data.eval_results}
    assert got[ROLLING, "bits_per_byte"] == pytest.approx(want[ROLLING]["metrics"]["bits_per_byte"], abs=1e-6)
    assert pushed.data.model_name == "tiny-gpt" and pushed.text.count("## Benchmarks") == 1
    assert HARNESS_RESULTS in fake_hub.files("user/tiny-gpt")


# ----------------------------------------------------------------------------------- the harness's own command line


def test_lm_eval_command_line_gives_the_in_process_figures(lm_eval_cli, in_process):
    process, out = lm_eval_cli
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log[-3000:]
    (path,) = out.rglob("results_*.json")
    cli = task_figures(json.loads(path.read_text()))
    ours = task_figures(in_process)
    for task, metric in ((MC, "acc"), (ROLLING, "bits_per_byte"), (ROLLING, "word_perplexity")):
        assert cli[task]["metrics"][metric] == pytest.approx(ours[task]["metrics"][metric], rel=1e-5), (task, metric)
    assert cli[MC]["samples"] == ours[MC]["samples"] == LIMIT
