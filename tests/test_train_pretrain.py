"""``lmforge pretrain`` end to end on tiny models: every family/objective learns, exact resume
after a real SIGINT, the final folder loads with from_pretrained, and bad input fails early."""

from __future__ import annotations

import json
import math
import shutil
import signal
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.config import build_dataclass, load_config
from lmforge.errors import LmforgeError
from lmforge.runs import read_metrics
from lmforge.train import PretrainConfig
from lmforge.train.loop import Trainer
from tests.train_fixtures import pretrain, save_tokenizers, snapshot, write_corpus, write_preset

FAMILIES = {"gpt": "causal", "mamba": "causal", "bert": "mlm"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    toks = save_tokenizers(root)
    empty = root / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    return {"root": root, "corpus": write_corpus(root / "corpus"), "tok": toks, "empty": empty,
            **{f: write_preset(root, f) for f in FAMILIES}}


def make_config(ws, family: str, run: str, **sections) -> PretrainConfig:
    values = {
        "objective": FAMILIES[family], "output_dir": str(ws["root"] / run),
        "model": {"preset": str(ws[family])},
        "data": {"source": str(ws["corpus"]), "tokenizer": str(ws["tok"]["bert" if family == "bert" else "gpt"]),
                 "block_size": 32},
        "train": {"micro_batch_size": 4, "max_steps": 12, "log_every": 1, "eval_every": 0, "save_every": 0,
                  "progress": False},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return build_dataclass(PretrainConfig, values)


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


# each family also exercises one loop option: streaming data (mamba), gradient checkpointing (bert)
OPTIONS = {"gpt": {}, "mamba": {"data": {"streaming": True}}, "bert": {"train": {"gradient_checkpointing": True}}}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_learns_and_final_folder_loads(ws, family):
    config = make_config(ws, family, f"run-{family}", **OPTIONS[family])
    result = pretrain(config)
    assert result.train.status == "completed" and result.train.step == 12
    losses = list(train_losses(result.run_dir).values())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    assert "loss" in result.train.last_eval
    if FAMILIES[family] == "causal":
        assert 0 < result.train.last_eval["bits_per_byte"] < 20

    final = result.final_dir
    import transformers

    auto = transformers.AutoModelForCausalLM if FAMILIES[family] == "causal" else transformers.AutoModelForMaskedLM
    model = auto.from_pretrained(final, trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    saved = load_file(result.run_dir / "checkpoints" / "step_12" / "model.safetensors")
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings
    card = (final / "README.md").read_text()
    assert "optimizer steps: 12" in card and "from_pretrained" in card and "loss.png" in card
    assert f"{result.train.last_eval['loss']:.4f}" in card
    assert (final / "loss.png").is_file() and (result.run_dir / "loss.png").is_file()
    # the resolved configuration is saved (the splits named: auto resolved) and reads back to it
    saved = load_config(PretrainConfig, result.run_dir / "config.yaml")
    assert config.data.eval_split == "auto" and saved.data.eval_split == "validation"
    assert saved == replace(config, data=replace(config.data, eval_split="validation"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_exact_resume_after_sigint(ws, monkeypatch, optimizer):
    """Stop at step 5 with a real SIGINT, resume, and match an uninterrupted run exactly
    (shuffling and dropout on; with Muon its momentum travels in the checkpoint too)."""
    optim = {"name": optimizer, "scheduler": "wsd" if optimizer == "muon" else "cosine"}
    full = pretrain(make_config(ws, "gpt", f"full-{optimizer}", optim=optim, train={"max_steps": 9}))

    original = Trainer._train_step

    def interrupt_at_step_5(self):
        out = original(self)
        if self.state.step == 4:  # the step being finished is step 5
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "_train_step", interrupt_at_step_5)
    stopped = pretrain(make_config(ws, "gpt", f"resumed-{optimizer}", optim=optim, train={"max_steps": 9}))
    assert stopped.train.status == "interrupted" and stopped.train.step == 5
    assert stopped.train.exit_code == 130  # 128 + SIGINT, as shells report Ctrl-C
    assert stopped.final_dir is None and stopped.train.last_checkpoint.name == "step_5"
    monkeypatch.setattr(Trainer, "_train_step", original)

    resumed = pretrain(make_config(ws, "gpt", f"resumed-{optimizer}", optim=optim, resume="auto",
                                   train={"max_steps": 9}))
    assert resumed.train.status == "completed" and resumed.train.step == 9
    assert train_losses(resumed.run_dir) == train_losses(full.run_dir)
    a = load_file(full.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.train.tokens_seen == full.train.tokens_seen


# ------------------------------------------------------------------------- bad input


def _no_training_happened(config: PretrainConfig) -> bool:
    from pathlib import Path

    return not Path(config.output_dir).exists()  # not even created


def test_unknown_config_key_suggests_the_closest(ws, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_step": 3}}))
    with pytest.raises(LmforgeError, match=r"unknown key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(PretrainConfig, path)
    from lmforge.cli import main

    assert main(["pretrain", "--config", str(path)]) == 2


@pytest.mark.parametrize("case, match", [
    ("vocab", r"vocabulary has 50 entries but the tokenizer has \d+ tokens"),
    ("block", r"data.block_size 128 is longer than the model's positions \(max_position_embeddings 64"),
    ("empty", r"no tokens left"),
    ("objective", r"cannot be trained with objective 'mlm'"),
    ("tokenizer", r"data.tokenizer is required"),
    ("batch", r"fewer than one optimizer step of 4096 rows \(train.micro_batch_size 4096"),
    ("override typo", r"model.overrides.num_hidden_layer: LmforgeGPTConfig \(lmforge_gpt\) has no setting "
                      r"'num_hidden_layer'; did you mean 'num_hidden_layers'\?"),
    ("preset typo", r"gpt-typo.yaml: 'norm_typ': LmforgeGPTConfig \(lmforge_gpt\) has no setting 'norm_typ'; "
                    r"did you mean 'norm_type'\?"),
])
def test_bad_input_fails_before_training(ws, case, match):
    changes = {
        "vocab": {"model": {"overrides": {"vocab_size": 50}}},
        "block": {"data": {"block_size": 128}},
        "empty": {"data": {"source": str(ws["empty"])}},
        "objective": {"objective": "mlm"},
        "tokenizer": {"data": {"tokenizer": ""}},
        "batch": {"train": {"micro_batch_size": 4096}},
        "override typo": {"model": {"overrides": {"num_hidden_layer": 4}}},
        "preset typo": {"model": {"preset": str(write_preset(ws["root"], "gpt", name="gpt-typo", norm_typ="dyt"))}},
    }[case]
    config = make_config(ws, "gpt", f"bad-{case}", **changes)
    with pytest.raises(LmforgeError, match=match):
        pretrain(config)
    assert _no_training_happened(config)


def test_nothing_is_written_before_every_check_passed(ws):
    """The README order: pretrain before the tokenizer exists fails with the tokenizer message and
    creates nothing; the corrected rerun then trains (no "already holds a run")."""
    missing = ws["root"] / "tok-not-trained-yet"
    config = make_config(ws, "gpt", "readme-order", data={"tokenizer": str(missing)}, train={"max_steps": 2})
    with pytest.raises(LmforgeError, match=f"data.tokenizer: {missing} is not a folder.*--output-dir"):
        pretrain(config)
    assert not (ws["root"] / "readme-order").exists()
    fixed = make_config(ws, "gpt", "readme-order", train={"max_steps": 2})
    assert pretrain(fixed).train.status == "completed"


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_run_is_untouched_when_a_check_fails(ws, overwrite):
    """A failing check (here the model preset) leaves an existing run folder byte for byte as it was,
    even with overwrite (the old run is replaced only when training starts)."""
    run = make_config(ws, "gpt", f"kept-{overwrite}", train={"max_steps": 2})
    pretrain(run)
    before = snapshot(run.output_dir)
    assert "config.yaml" in before and "final/model.safetensors" in before
    bad = make_config(ws, "gpt", f"kept-{overwrite}", overwrite=overwrite,
                      model={"overrides": {"num_hidden_layer": 4}})
    first_failure = ("model.overrides.num_hidden_layer: LmforgeGPTConfig .* did you mean 'num_hidden_layers'" if overwrite
                     else "already holds a run.*--resume.*--overwrite")
    with pytest.raises(LmforgeError, match=first_failure):
        pretrain(bad)
    assert snapshot(run.output_dir) == before
    if not overwrite:
        with pytest.raises(LmforgeError, match="already holds a run"):
            pretrain(run)
        assert snapshot(run.output_dir) == before
    else:
        replaced = pretrain(make_config(ws, "gpt", f"kept-{overwrite}", overwrite=True, train={"max_steps": 3}))
        assert replaced.train.step == 3 and list(train_losses(replaced.run_dir)) == [1, 2, 3]  # old metrics gone
        assert not (replaced.run_dir / "checkpoints" / "step_2").exists()


def test_resume_in_another_geometry_with_the_same_step_continues_exactly(ws):
    """A run with micro-batch 4 stopped at step 5 continues with micro-batch 2 x 2 accumulation
    steps (the same 4 rows per step) like the uninterrupted run; another step size is refused."""
    quiet = {"overrides": {"hidden_dropout": 0.0, "attention_dropout": 0.0}}
    full = pretrain(make_config(ws, "gpt", "geo-full", model=quiet, train={"max_steps": 9, "save_every": 5}))
    cut = ws["root"] / "geo-cut"
    shutil.copytree(full.run_dir, cut)
    shutil.rmtree(cut / "checkpoints" / "step_9")
    shutil.rmtree(cut / "final")
    resumed = pretrain(make_config(ws, "gpt", "geo-cut", model=quiet, resume="auto",
                                   train={"max_steps": 9, "micro_batch_size": 2, "grad_accum_steps": 2}))
    assert resumed.train.step == 9
    want, got = train_losses(full.run_dir), train_losses(resumed.run_dir)
    assert list(got) == list(want) and list(got.values()) == pytest.approx(list(want.values()), rel=1e-5)
    a, b = load_file(full.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)

    for field, value, match in (("world_size", 2, "hold 8 rows \\(2 process"),
                                ("micro_batch_size", 8, "micro_batch_size 8")):
        ckpt = ws["root"] / f"ckpt-{field}"
        shutil.copytree(full.run_dir / "checkpoints" / "step_9", ckpt)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state[field] = value
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        config = make_config(ws, "gpt", f"bad-resume-{field}", resume=str(ckpt))
        with pytest.raises(LmforgeError, match=match):
            pretrain(config)
        assert not (ws["root"] / f"bad-resume-{field}").exists()


def test_a_terminated_run_exits_143_after_its_checkpoint(ws, monkeypatch):
    from lmforge.cli import main

    original = Trainer._train_step

    def terminate_at_step_3(self):
        out = original(self)
        if self.state.step == 2:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "_train_step", terminate_at_step_3)
    config = make_config(ws, "gpt", "terminated")
    path = ws["root"] / "terminated.yaml"
    from lmforge.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(config)))
    assert main(["pretrain", "--config", str(path)]) == 143
    assert (ws["root"] / "terminated" / "checkpoints" / "step_3").is_dir()


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide AcceleratorState whose mixed precision cannot change:
    a run with another precision in this test process needs it reset before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_mixed_precision_trains_and_saves_float32_weights(ws, fresh_accelerator_state):
    """bf16 autocast (accelerate, CPU): the loss still falls and the saved weights stay float32."""
    config = make_config(ws, "gpt", "run-bf16", train={"mixed_precision": "bf16"})
    result = pretrain(config)
    assert result.train.status == "completed"
    losses = list(train_losses(result.run_dir).values())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    saved = load_file(result.final_dir / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_compiled_model_trains_like_the_eager_one(ws):
    """train.compile wraps the forward in torch.compile (inductor on CPU): same losses as eager
    (dropout off: inductor draws its masks from another generator)."""
    no_dropout = {"overrides": {"hidden_dropout": 0.0, "attention_dropout": 0.0}}
    eager = pretrain(make_config(ws, "gpt", "run-eager", train={"max_steps": 4}, model=no_dropout))
    compiled = pretrain(make_config(ws, "gpt", "run-compiled", train={"max_steps": 4, "compile": True},
                                    model=no_dropout))
    assert compiled.train.status == "completed"
    want, got = train_losses(eager.run_dir), train_losses(compiled.run_dir)
    assert list(got) == list(want) == [1, 2, 3, 4]
    assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-4)


def test_a_causal_lm_on_wordpiece_is_scored_per_byte_of_the_text(ws):
    """WordPiece drops the spaces: the evaluation divides by the validation text's own bytes (scaled
    to the scored tokens), not by the fewer bytes its tokens spell."""
    import numpy as np

    from lmforge.data.pipeline import build_lm_dataset
    from lmforge.data.sources import load_corpus
    from lmforge.eval.perplexity import token_byte_lengths
    from lmforge.runs import load_tokenizer

    config = make_config(ws, "gpt", "wordpiece-causal", train={"max_steps": 3},
                         data={"tokenizer": str(ws["tok"]["bert"]), "document_masks": False})
    result = pretrain(config)
    tok = load_tokenizer(config.data.tokenizer)
    lengths = token_byte_lengths(tok).numpy()
    rows = build_lm_dataset(config.data.source, tok, 32, split="validation", document_masks=False)
    ids = np.asarray([r["input_ids"] for r in rows])
    mask = np.asarray([r["attention_mask"] for r in rows])
    covered = int(lengths[ids[mask == 1]].sum())
    targets = int(lengths[ids[:, 1:][mask[:, 1:] == 1]].sum())  # every token but a row's first is scored
    raw = sum(len(t.encode()) for t in load_corpus(config.data.source, "validation")["text"] if t)
    assert raw > 1.1 * covered  # the spaces
    assert result.train.last_eval["bytes"] == round(targets * raw / covered)


def test_a_single_file_is_all_training_data(ws, capsys):
    """A corpus without split names has no validation split: by default nothing is evaluated (and
    the start-up line says so) instead of scoring the model on its own training text; naming one is
    refused before anything is written."""
    corpus = ws["root"] / "one-file.txt"
    corpus.write_text("".join(f"line {i} of a plain text corpus with some words in it\n" for i in range(400)))
    config = make_config(ws, "gpt", "one-file", data={"source": str(corpus)}, train={"max_steps": 2})
    result = pretrain(config)
    assert result.train.last_eval == {} and "no validation split in" in capsys.readouterr().out
    named = make_config(ws, "gpt", "one-file-named", data={"source": str(corpus), "eval_split": "validation"})
    with pytest.raises(LmforgeError, match=r"data.eval_split: .*one-file.txt has no split 'validation' \(it has: train"):
        pretrain(named)
    assert not (ws["root"] / "one-file-named").exists()
