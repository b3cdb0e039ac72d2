"""``lmforge ablate`` end to end on a tiny GPT: the sweep's outputs (results.json / .md / plots,
loadable run folders), identical variants train identically, a diverging variant does not stop
the sweep, --resume (finished, new and cut-short runs), tokenizer variants, and bad input refused
(exit 2) before anything runs.

Every variant trains in its own subprocess (several seconds of start-up each), so the three
sweeps that really train are module fixtures shared by the tests that read them:
``main_sweep`` (plain / twin / layernorm, a base YAML file, a steps budget), ``tok_sweep`` (a
diverging variant first, then bpe / unigram tokenizer variants, an inline base, a tokens budget).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.presets import list_presets
from lmforge.runs import read_metrics
from lmforge.train import PretrainConfig
from lmforge.train.model_presets import count_parameters
from tests.train_fixtures import (
    PRESETS,
    gpt_tokenizer,
    make_corpus,
    snapshot,
    write_corpus,
    write_preset,
)

MICRO_BATCH = 4
BLOCK = 32
STEPS = 10  # main sweep: > one epoch of the tiny corpus (checked in the determinism test)

ROW_KEYS = {"name", "run", "seed", "overrides", "params", "val_bits_per_byte", "val_loss", "status", "diverged",
            "error", "steps", "tokens_seen", "train_seconds", "tokens_per_second", "peak_memory_mb",
            "max_grad_norm", "loss_spikes", "tokenizer"}
RUN_FILES = {"config.yaml", "metrics.jsonl", "checkpoints", "final", "ablation.json", "log.txt"}

LAYERNORM = {"model.overrides.norm_type": "layernorm", "model.overrides.norm_bias": True}


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny corpus (a few batches per epoch), a saved 300-token BPE tokenizer and the tiny GPT
    preset; the variants' subprocesses run with one torch thread (2-core machine)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        root = tmp_path_factory.mktemp("ablate")
        tok = root / "tok-gpt"
        gpt_tokenizer(make_corpus(200)).save_pretrained(tok)
        yield {"root": root, "corpus": write_corpus(root / "corpus", n_train=12, n_eval=8), "tok": tok,
               "preset": write_preset(root, "gpt")}


def base_values(ws, **sections) -> dict:
    """A pretraining configuration (the keys of a pretrain preset) for the tiny GPT."""
    values = {
        "objective": "causal",
        "output_dir": str(ws["root"] / "ignored-base-output"),
        "model": {"preset": str(ws["preset"])},
        "data": {"source": str(ws["corpus"]), "tokenizer": str(ws["tok"]), "block_size": BLOCK},
        "train": {"micro_batch_size": MICRO_BATCH, "max_steps": 50, "log_every": 1, "eval_every": 2,
                  "save_every": 4, "progress": False},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    }
    for key, value in sections.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return values


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def ablate_cli(sweep: Path, out: Path, *flags: str) -> int:
    return main(["ablate", "--config", str(sweep), "--output-dir", str(out), *flags])


def read_rows(out: Path) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())
    assert isinstance(rows, list)
    return rows


def by_name(rows: list[dict]) -> dict[str, dict]:
    named = {row["name"]: row for row in rows}
    assert len(named) == len(rows), [row["name"] for row in rows]
    return named


def last_eval(run_dir: Path) -> dict:
    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    assert evals, f"no evaluation in {run_dir}/metrics.jsonl"
    return evals[-1]


def file_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, path


# ----------------------------------------------------------------------------------- the main sweep


@pytest.fixture(scope="module")
def main_sweep(ws):
    """plain / twin (identical) / layernorm (norm_type layernorm with biases: more parameters),
    a base YAML file whose max_steps (50) the steps budget replaces. What the tests read is kept
    as it was right after the sweep (the resume test changes the folder afterwards)."""
    root = ws["root"]
    base = write_yaml(root / "base.yaml", base_values(ws))
    sweep = write_yaml(root / "sweep-main.yaml", {
        "base": str(base),
        "budget": {"steps": STEPS},
        "variants": {"plain": {}, "twin": {}, "layernorm": dict(LAYERNORM)},
    })
    out = root / "out-main"
    code = ablate_cli(sweep, out)
    assert code == 0
    return {"code": code, "sweep": sweep, "base": base, "out": out, "rows": read_rows(out),
            "md": (out / "results.md").read_text(encoding="utf-8")}


def test_sweep_runs_end_to_end_and_writes_results(ws, main_sweep):
    out = main_sweep["out"]
    assert main_sweep["code"] == 0
    rows = by_name(main_sweep["rows"])
    assert set(rows) == {"plain", "twin", "layernorm"}
    assert (out / "sweep.yaml").is_file()

    expected_overrides = {"plain": {}, "twin": {}, "layernorm": LAYERNORM}
    for name, row in rows.items():
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        run_dir = out / name  # one seed: OUTPUT/<name>
        assert row["run"] == name and row["seed"] == 0
        assert row["overrides"] == expected_overrides[name]
        assert (row["status"], row["diverged"], row["error"]) == ("completed", False, None), row
        assert RUN_FILES <= {p.name for p in run_dir.iterdir()}, sorted(p.name for p in run_dir.iterdir())
        # the steps budget replaced the base's train.max_steps; the seed is the sweep's
        config = load_config(PretrainConfig, run_dir / "config.yaml")
        assert config.train.max_steps == STEPS and config.train.seed == 0
        assert Path(config.output_dir).resolve() == run_dir.resolve()
        assert Path(config.data.tokenizer).resolve() == ws["tok"].resolve()
        assert row["steps"] == STEPS and row["tokens_seen"] == STEPS * MICRO_BATCH * BLOCK

        # the compared numbers are the run's final evaluation on the validation split
        final_eval = last_eval(run_dir)
        assert final_eval["step"] == STEPS
        assert isinstance(row["val_bits_per_byte"], float) and math.isfinite(row["val_bits_per_byte"])
        assert 0 < row["val_bits_per_byte"] < 20
        assert row["val_bits_per_byte"] == pytest.approx(final_eval["eval_bits_per_byte"], rel=1e-5)
        assert row["val_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-5)
        grad_norms = [r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r]
        assert row["max_grad_norm"] == pytest.approx(max(grad_norms), abs=1e-4)  # rounded to 4 decimals
        assert isinstance(row["params"], int) and row["params"] > 0
        assert row["train_seconds"] > 0 and row["tokens_per_second"] > 0
        assert isinstance(row["loss_spikes"], int) and row["loss_spikes"] >= 0
        assert row["peak_memory_mb"] is None or row["peak_memory_mb"] > 0
        assert Path(row["tokenizer"]).resolve() == ws["tok"].resolve()  # the base's own tokenizer folder

    # the model switch reached the model: final/ loads and carries it; the parameter count follows
    models = {name: load_causal_lm(out / name / "final") for name in ("plain", "layernorm")}
    assert models["layernorm"].config.norm_type == "layernorm" and models["layernorm"].config.norm_bias is True
    assert models["plain"].config.norm_type == "rmsnorm" and models["plain"].config.norm_bias is False
    assert load_config(PretrainConfig, out / "layernorm" / "config.yaml").model.overrides == {
        "norm_type": "layernorm", "norm_bias": True}
    assert load_config(PretrainConfig, out / "plain" / "config.yaml").model.overrides == {}
    extra = count_parameters(models["layernorm"]) - count_parameters(models["plain"])
    assert extra > 0
    assert rows["layernorm"]["params"] - rows["plain"]["params"] == extra
    assert rows["layernorm"]["val_bits_per_byte"] != rows["plain"]["val_bits_per_byte"]  # it trained differently

    md = main_sweep["md"]
    table = [line for line in md.splitlines() if line.strip().startswith("|")]
    for name in rows:
        assert any(re.search(rf"(?<![\w=]){re.escape(name)}(?![\w=])", line) for line in table), (name, md)
    layernorm_line = next(line for line in table if "layernorm" in line and "norm_type" in line)
    assert "norm_type" in layernorm_line  # the "changes" column
    assert "bits/byte" in md and "Δ" in md
    for picture in ("val_curves.png", "val_bpb.png"):
        assert_png(out / picture)


def test_identical_variants_train_identically(ws, main_sweep):
    """Same seed, same data order, same budget: two variants with the same (empty) overrides give
    exactly the same numbers, with shuffling over more than one epoch and dropout on."""
    from transformers import AutoTokenizer

    from lmforge.data.pipeline import build_lm_dataset

    tokenizer = AutoTokenizer.from_pretrained(ws["tok"])
    n_rows = len(build_lm_dataset(str(ws["corpus"]), tokenizer, BLOCK, split="train"))
    assert n_rows // MICRO_BATCH >= 3, n_rows  # several batches per epoch ...
    assert STEPS * MICRO_BATCH > n_rows, n_rows  # ... and more than one epoch
    assert PRESETS["gpt"]["hidden_dropout"] > 0 and PRESETS["gpt"]["attention_dropout"] > 0

    out = main_sweep["out"]
    rows = by_name(main_sweep["rows"])
    plain, twin = rows["plain"], rows["twin"]
    assert plain["val_bits_per_byte"] == twin["val_bits_per_byte"]
    assert plain["val_loss"] == twin["val_loss"]
    evals = {name: [r for r in read_metrics(out / name) if "eval_loss" in r] for name in ("plain", "twin")}
    assert len(evals["plain"]) >= 4 and evals["plain"] == evals["twin"]
    losses = {name: [r["loss"] for r in read_metrics(out / name) if "loss" in r] for name in ("plain", "twin")}
    assert len(losses["plain"]) == STEPS and losses["plain"] == losses["twin"]
    a = load_file(out / "plain" / "final" / "model.safetensors")
    b = load_file(out / "twin" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------- divergence, tokenizers


@pytest.fixture(scope="module")
def tok_sweep(ws):
    """An inline base, a tokens budget (500 tokens of 4 x 32 per step -> 4 steps), the default
    tokenizer bpe-300 and: a diverging variant FIRST (lr 1e30: the loss becomes NaN at step 2),
    then a bpe variant (the default, trained once for both) and a unigram one (310 tokens).
    The base's data.tokenizer must not be used since variants override tokenizer.*."""
    root = ws["root"]
    sweep = write_yaml(root / "sweep-tok.yaml", {
        "base": base_values(ws, train={"save_every": 0}, optim={"warmup_steps": 1}),
        "budget": {"tokens": 500},
        "tokenizer": {"algorithm": "bpe", "vocab_size": 300},
        "variants": {
            "diverge": {"optim.lr": 1.0e30},
            "bpe": {"tokenizer.algorithm": "bpe"},
            "unigram": {"tokenizer.algorithm": "unigram", "tokenizer.vocab_size": 310},
        },
    })
    out = root / "out-tok"
    code = ablate_cli(sweep, out)
    return {"code": code, "out": out, "rows": read_rows(out)}


def test_a_diverging_variant_is_recorded_and_the_sweep_goes_on(tok_sweep):
    assert tok_sweep["code"] == 0
    out = tok_sweep["out"]
    rows = by_name(tok_sweep["rows"])
    assert set(rows) == {"diverge", "bpe", "unigram"}
    diverged = rows["diverge"]
    assert diverged["status"] == "diverged" and diverged["diverged"] is True, diverged
    assert (out / "diverge" / "ablation.json").is_file()  # a finished run
    for name in ("bpe", "unigram"):  # listed after the diverging one: the sweep went on
        row = rows[name]
        assert (row["status"], row["diverged"], row["error"]) == ("completed", False, None), row
        assert math.isfinite(row["val_bits_per_byte"]) and 0 < row["val_bits_per_byte"] < 20
        assert (out / name / "final" / "model.safetensors").is_file()
    md = (out / "results.md").read_text(encoding="utf-8")
    assert all(name in md for name in rows)


def test_tokens_budget_sets_the_steps(tok_sweep):
    """budget tokens: 500 -> max_steps = ceil(500 / (4 rows x 32 tokens)) = 4."""
    out = tok_sweep["out"]
    rows = by_name(tok_sweep["rows"])
    for name in ("bpe", "unigram"):
        assert load_config(PretrainConfig, out / name / "config.yaml").train.max_steps == 4
        assert rows[name]["steps"] == 4 and rows[name]["tokens_seen"] == 4 * MICRO_BATCH * BLOCK
    assert load_config(PretrainConfig, out / "diverge" / "config.yaml").train.max_steps == 4


def test_tokenizer_variants_train_each_tokenizer_once(ws, tok_sweep):
    from transformers import AutoTokenizer

    out = tok_sweep["out"]
    rows = by_name(tok_sweep["rows"])
    folders = {"bpe-300": "BPE", "unigram-310": "Unigram"}
    assert {p.name for p in (out / "tokenizers").iterdir()} == set(folders)
    assert (rows["diverge"]["tokenizer"], rows["bpe"]["tokenizer"], rows["unigram"]["tokenizer"]) == (
        "bpe-300", "bpe-300", "unigram-310")
    base_vocab = AutoTokenizer.from_pretrained(ws["tok"]).get_vocab()
    for name, folder in (("bpe", "bpe-300"), ("unigram", "unigram-310")):
        trained = AutoTokenizer.from_pretrained(out / "tokenizers" / folder)
        used = AutoTokenizer.from_pretrained(out / name / "final")
        assert json.loads((out / name / "final" / "tokenizer.json").read_text())["model"]["type"] == folders[folder]
        assert used.get_vocab() == trained.get_vocab() != base_vocab
        assert len(used) == len(trained) <= int(folder.split("-")[1])
        assert load_causal_lm(out / name / "final").config.vocab_size == len(trained)
        config = load_config(PretrainConfig, out / name / "config.yaml")
        assert Path(config.data.tokenizer).resolve() == (out / "tokenizers" / folder).resolve()
    assert len(AutoTokenizer.from_pretrained(out / "bpe" / "final")) == 300


# ----------------------------------------------------------------------------------- resume


def test_resume_skips_finished_runs_runs_new_ones_and_continues_cut_ones(ws, main_sweep, capsys):
    """Changes the main sweep's folder, so it runs after the tests that read it."""
    out, sweep = main_sweep["out"], main_sweep["sweep"]
    names = ["plain", "twin", "layernorm"]
    assert read_rows(out) == main_sweep["rows"]

    # 1. everything finished: nothing retrains, the results are written again, the same
    runs = {name: snapshot(out / name) for name in names}
    times = {name: file_times(out / name) for name in names}
    for name in ("results.json", "results.md", "val_curves.png", "val_bpb.png"):
        (out / name).unlink()
    assert ablate_cli(sweep, out, "--resume") == 0
    assert {name: snapshot(out / name) for name in names} == runs
    assert {name: file_times(out / name) for name in names} == times
    assert by_name(read_rows(out)) == by_name(main_sweep["rows"])
    assert (out / "results.md").is_file()
    assert_png(out / "val_curves.png")
    assert_png(out / "val_bpb.png")

    # 2. a new variant in the sweep file: only it runs
    values = yaml.safe_load(sweep.read_text())
    values["variants"]["slower"] = {"optim.lr": 1.0e-3}
    added = write_yaml(ws["root"] / "sweep-main-added.yaml", values)
    assert ablate_cli(added, out, "--resume") == 0
    assert {name: snapshot(out / name) for name in names} == runs
    rows = by_name(read_rows(out))
    assert set(rows) == {*names, "slower"}
    assert all(rows[name] == by_name(main_sweep["rows"])[name] for name in names)
    assert rows["slower"]["status"] == "completed" and rows["slower"]["overrides"] == {"optim.lr": 1.0e-3}
    assert (out / "slower" / "ablation.json").is_file() and (out / "slower" / "final").is_dir()

    # 3. a run cut short (no outcome, no final model, its last checkpoint gone) continues from its
    #    last checkpoint (left as it was) and ends exactly where it ended before
    twin = out / "twin"
    checkpoints = sorted(p.name for p in (twin / "checkpoints").iterdir())
    assert checkpoints == ["step_10", "step_8"], checkpoints  # save_every 4, keep_last 2
    weights = load_file(twin / "final" / "model.safetensors")
    (twin / "ablation.json").unlink()
    shutil.rmtree(twin / "final")
    shutil.rmtree(twin / "checkpoints" / "step_10")
    kept = file_times(twin / "checkpoints" / "step_8")
    others = {name: snapshot(out / name) for name in ("plain", "layernorm", "slower")}
    assert ablate_cli(added, out, "--resume") == 0
    assert {name: snapshot(out / name) for name in others} == others
    assert file_times(twin / "checkpoints" / "step_8") == kept  # loaded, not retrained and rewritten
    assert (twin / "ablation.json").is_file() and (twin / "checkpoints" / "step_10").is_dir()
    resumed = by_name(read_rows(out))["twin"]
    before = by_name(main_sweep["rows"])["twin"]
    assert resumed["status"] == "completed" and resumed["steps"] == STEPS
    assert resumed["val_bits_per_byte"] == before["val_bits_per_byte"]
    assert resumed["val_loss"] == before["val_loss"]
    again = load_file(twin / "final" / "model.safetensors")
    assert all(torch.equal(again[k], weights[k]) for k in weights)

    # 4. a stored run whose configuration differs from the new sweep's is refused, nothing changed
    capsys.readouterr()
    changed_base = write_yaml(ws["root"] / "base-changed.yaml", base_values(ws, optim={"lr": 1e-3}))
    values["base"] = str(changed_base)
    changed = write_yaml(ws["root"] / "sweep-main-changed.yaml", values)
    everything = snapshot(out)
    assert ablate_cli(changed, out, "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and any(name in err for name in (*names, "slower")), err
    assert snapshot(out) == everything


# ----------------------------------------------------------------------------------- bad input


def small_sweep(ws) -> dict:
    return {"base": base_values(ws), "budget": {"steps": 2}, "variants": {"plain": {}}}


BAD = {
    # case: (change to the sweep, substrings the message must hold)
    "override typo": ({"variants": {"plain": {}, "typo_variant": {"model.overrides.norm_typ": "layernorm"}}},
                      ["typo_variant", "norm_typ", "'norm_type'"]),
    "dotted typo": ({"variants": {"plain": {}, "lr_variant": {"optim.lrr": 0.01}}}, ["optim.lrr", "'optim.lr'"]),
    "tokenizer key": ({"variants": {"plain": {}, "tok_variant": {"tokenizer.algo": "unigram"}}},
                      ["tokenizer.algo", "'tokenizer.algorithm'"]),
    "empty grid": ({"grid": {}}, ["grid", "empty"]),
    "empty grid values": ({"grid": {"optim.lr": []}}, ["optim.lr", "empty"]),
    "grid name clash": ({"variants": {"lr=0.01": {"optim.lr": 0.01}}, "grid": {"optim.lr": [0.01, 0.02]}},
                        ["lr=0.01"]),
    "zero steps": ({"budget": {"steps": 0}}, ["budget", "steps"]),
    "negative steps": ({"budget": {"steps": -3}}, ["budget", "steps"]),
    "no budget": ({"budget": None}, ["budget"]),
    "two budget keys": ({"budget": {"steps": 4, "tokens": 1000}}, ["budget", "steps", "tokens"]),
    "test split": ({"base": {"data": {"eval_split": "test"}}}, ["eval_split"]),
    "no eval split": ({"base": {"data": {"eval_split": None}}}, ["eval_split"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_is_refused_before_anything_runs(ws, tmp_path, capsys, case):
    change, needles = BAD[case]
    values = small_sweep(ws)
    for key, value in change.items():
        if value is None:
            values.pop(key)
        elif key == "base":
            values["base"]["data"] = {**values["base"]["data"], **value["data"]}
        else:
            values[key] = value
    sweep = write_yaml(tmp_path / "sweep.yaml", values)
    out = tmp_path / "out"
    assert ablate_cli(sweep, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle.lower() in err.lower() if needle == "empty" else needle in err, (needle, err)
    assert not out.exists() or not any(out.iterdir())


def test_duplicate_variant_names_are_refused(ws, tmp_path, capsys):
    base = write_yaml(tmp_path / "base.yaml", base_values(ws))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {base}\nbudget:\n  steps: 2\nvariants:\n  same: {{}}\n  other: {{}}\n"
                     "  same:\n    optim.lr: 0.01\n")
    out = tmp_path / "out"
    assert ablate_cli(sweep, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and "'same'" in err, err
    assert not out.exists() or not any(out.iterdir())


def test_an_output_dir_holding_another_sweep_is_left_alone(ws, main_sweep, tmp_path, capsys):
    """Without --resume: a folder with another sweep, or with any other file, is refused untouched."""
    sweep = write_yaml(tmp_path / "other-sweep.yaml", small_sweep(ws))
    for out in (main_sweep["out"], tmp_path / "notes"):
        out.mkdir(exist_ok=True)
        if out.name == "notes":
            (out / "notes.txt").write_text("mine\n")
        before = snapshot(out)
        assert ablate_cli(sweep, out) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmforge: error: ") and str(out) in err, err
        assert snapshot(out) == before
        assert not (out / "plain").exists() or out == main_sweep["out"]


@pytest.mark.parametrize("inline", [False, True])
def test_paths_in_a_sweep_and_its_base_file_are_relative_to_their_folder(ws, tmp_path, monkeypatch, inline):
    """A sweep kept beside its tokenizer runs from any folder: the base file's input paths (and an
    inline base's) are looked up from the folder of the file that names them."""
    from lmforge.config import load_config
    from lmforge.experiments.ablate import AblateConfig, plan

    folder = tmp_path / "sw"
    shutil.copytree(ws["tok"], folder / "mytok")
    shutil.copy(ws["preset"], folder / "tiny.yaml")
    base = base_values(ws, data={"tokenizer": "mytok"}, model={"preset": "tiny.yaml"})
    if inline:
        sweep = {"base": base}
    else:
        write_yaml(folder / "base.yaml", base)
        sweep = {"base": "base.yaml"}
    write_yaml(folder / "sweep.yaml", {**sweep, "budget": {"steps": 2}, "variants": {"a": {}}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (run,) = plan(load_config(AblateConfig, folder / "sweep.yaml")).runs
    assert Path(run.config.data.tokenizer) == folder / "mytok"
    assert Path(run.config.model.preset) == folder / "tiny.yaml"


@pytest.mark.parametrize("name", sorted(list_presets("ablate")))
def test_every_packaged_sweep_plans_with_every_variant_accepted(name, tmp_path):
    """Each packaged sweep resolves, and every variant's model settings are accepted by its config
    class (a preset naming a field its family lacks would fail only when that run starts)."""
    from lmforge.experiments.ablate import AblateConfig, plan

    config = load_config(AblateConfig, str(list_presets("ablate")[name]), overrides={"output_dir": str(tmp_path)})
    the_plan = plan(config, source=name)
    variants = yaml.safe_load(list_presets("ablate")[name].read_text()).get("variants") or {}
    assert {run.name for run in the_plan.runs} >= set(variants)
    assert the_plan.baseline in {run.name for run in the_plan.runs}
