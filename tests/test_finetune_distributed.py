"""2-process fine-tuning equals 1 process: ``lmforge finetune`` under ``accelerate launch`` with 2
CPU processes x micro-batch 4 trains on the same rows at every step as one process x micro-batch 8
(the global batch is the same rows whatever the process count), so the per-step losses, the
periodic and final evaluations and the final weights agree to float noise.

Both cases train for more than one epoch with shuffling on, on a training split whose rows do not
divide into global batches of 8 (each epoch drops another tail), and evaluate on splits whose last
global batch is uneven across the 2 processes (one process holds fewer rows, or only a filler row
with ignored labels). Dropout is off everywhere: 2 processes draw other dropout masks than 1.

- LoRA classification of a tiny lmforge GPT (adapter + new head compared).
- Full chat SFT of a tiny GPT with packed conversations (model.safetensors compared).
- LoRA DPO of a tiny GPT whose reference is the model with its adapter switched off (under DDP:
  the unwrapped model's adapter is switched off), the preference figures compared too.

One 2-process launch per case (module-scoped), run while the 1-process run trains in this process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.presets import find_preset
from tests.finetune_fixtures import (
    finetune_config,
    losses,
    run_finetune,
    save_base,
    write_chats,
    write_labelled,
    write_pairs,
)
from tests.train_fixtures import launch_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MICRO, PROCESSES = 4, 2
GLOBAL_BATCH = MICRO * PROCESSES  # the 1-process run's micro-batch


# --------------------------------------------------------------------------- runs


def _env(tmp: Path) -> dict[str, str]:
    # the launch gets its own datasets cache: it tokenizes the same files while this process does
    return launch_env(ACCELERATE_USE_CPU="1", HF_DATASETS_CACHE=str(tmp / "hf-datasets-two"),
                      TOKENIZERS_PARALLELISM="false")


def _one_and_two(tmp: Path, config: dict[str, Any]) -> tuple[Path, Path, str]:
    """The 1-process run of ``config`` (micro-batch 8, in this process) and its 2-process launch
    (``--train.micro-batch-size 4``), started first and run alongside. Returns both run folders
    and the launch's stdout."""
    assert config["train"]["micro_batch_size"] == GLOBAL_BATCH
    two = tmp / "two"
    config_file = tmp / "two.yaml"
    config_file.write_text(yaml.safe_dump({**config, "output_dir": str(two)}))
    cmd = [str(BIN / "accelerate"), "launch", "--main_process_port", "0", "--config_file",
           str(find_preset("accelerate", "cpu_multiprocess")), "-m", "lmforge.cli",
           "finetune", "--config", str(config_file), "--train.micro-batch-size", str(MICRO)]
    launch = subprocess.Popen(cmd, env=_env(tmp), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # 3 processes on the cores meanwhile: no thread oversubscription
        one = run_finetune({**config, "output_dir": str(tmp / "one")}).run_dir
    finally:
        torch.set_num_threads(threads)
        try:
            stdout, stderr = launch.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)  # the launcher and its 2 workers (their own session)
            launch.communicate()
            raise
    assert launch.returncode == 0, stderr[-3000:]
    return one, two, stdout


@pytest.fixture(scope="module")
def classification_runs(tmp_path_factory) -> tuple[Path, Path, str]:
    """LoRA (dropout 0) on a GPT classifier: 37 training rows = 4 global batches of 8 + 5 rows
    dropped per epoch, 10 steps (2.5 epochs), evaluation every 3 steps on 11 rows (last global
    batch: 3 rows on process 0, a filler row on process 1) and a test split of 13 (5 rows: 4 + 1)."""
    tmp = tmp_path_factory.mktemp("ft-dist-cls")
    base = save_base(tmp / "base", "gpt")
    data = write_labelled(tmp / "data", n_train=37, n_eval=11, n_test=13)
    config = finetune_config(tmp / "one", base, data, method="lora", lora={"dropout": 0.0},
                             optim={"lr": 1e-2, "eps": 1e-6},
                             train={"max_steps": 10, "eval_every": 3, "save_every": 5})
    return _one_and_two(tmp, config)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory) -> tuple[Path, Path, str]:
    """Full SFT of a chat GPT (dropout 0) with packing: 41 conversations -> 25 packed rows of at
    most 64 tokens = 3 global batches + 1 row dropped per epoch, 8 steps, evaluation every 3 steps
    on 9 packed rows (last global batch: 1 row on process 0, a filler row on process 1), test on 6
    (4 + 2)."""
    from lmforge.data.chat import build_sft_dataset
    from tests.finetune_fixtures import chat_tokenizer

    tmp = tmp_path_factory.mktemp("ft-dist-sft")
    base = save_base(tmp / "base", "gpt", chat=True, initializer_range=0.3)
    data = write_chats(tmp / "data", n_train=41, n_eval=15, n_test=9)
    tok = chat_tokenizer()
    rows = {split: len(build_sft_dataset(str(data), split, tok, max_length=64, pack=True))
            for split in ("train", "validation", "test")}
    assert rows["train"] // GLOBAL_BATCH >= 3 and rows["train"] % GLOBAL_BATCH, rows
    assert rows["validation"] % GLOBAL_BATCH and rows["test"] % GLOBAL_BATCH, rows
    assert rows["validation"] % 2 and rows["train"] % 2, rows
    config = finetune_config(tmp / "one", base, data, task="sft", method="full",
                             data={"pack": True, "max_length": 64}, optim={"lr": 3e-3, "eps": 1e-6},
                             train={"max_steps": 8, "eval_every": 3, "save_every": 4})
    return _one_and_two(tmp, config)


@pytest.fixture(scope="module")
def preference_runs(tmp_path_factory) -> tuple[Path, Path, str]:
    """LoRA DPO (dropout 0), reference: the adapter switched off. 37 pairs = 4 global batches + 5
    pairs dropped per epoch, 10 steps, evaluation every 3 steps on 11 pairs (last global batch: 3
    pairs on process 0, a filler row on process 1), test on 13."""
    tmp = tmp_path_factory.mktemp("ft-dist-pref")
    base = save_base(tmp / "base", "gpt", initializer_range=0.3)
    data = write_pairs(tmp / "data", n_train=37, n_eval=11, n_test=13)
    config = finetune_config(tmp / "one", base, data, task="preference", method="lora", lora={"dropout": 0.0},
                             preference={"loss": "dpo", "reference": "adapter"}, optim={"lr": 1e-2, "eps": 1e-6},
                             train={"max_steps": 10, "eval_every": 3, "save_every": 5})
    return _one_and_two(tmp, config)


# --------------------------------------------------------------------------- comparisons


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _evals(run_dir: Path) -> list[dict]:
    """The periodic evaluations (eval_* figures by step) logged during training."""
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")} for r in _rows(run_dir)
            if any(k.startswith("eval_") for k in r) and "selected_step" not in r]


EXACT = {"accuracy", "macro_f1", "matthews_correlation", "rows", "tokens", "bytes", "step", "pairs"}
# beta x differences of two log-probabilities of about -50: float noise of about 1e-6 on each
DIFFERENCES = {"rewards_chosen", "rewards_rejected", "margin"}


def _assert_same_metrics(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for key, value in want.items():
        name = key.removeprefix("eval_")
        if name in EXACT or not isinstance(value, float):
            assert got[key] == value, f"{where}: {key}"
        elif name in DIFFERENCES:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-5), f"{where}: {key}"
        else:
            assert got[key] == pytest.approx(value, rel=1e-5), f"{where}: {key}"


def _assert_same_runs(one: Path, two: Path, stdout: str, steps: int, weights: str) -> dict:
    assert f"{PROCESSES} process(es)" in stdout, stdout[-3000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == steps
    assert b == pytest.approx(a, rel=1e-5)

    evals_one, evals_two = _evals(one), _evals(two)
    assert [e["step"] for e in evals_one] == [e["step"] for e in evals_two] and len(evals_one) >= 3
    for got, want in zip(evals_two, evals_one, strict=True):
        _assert_same_metrics(got, want, f"evaluation at step {want['step']}")

    results_one = json.loads((one / "eval_results.json").read_text())
    results_two = json.loads((two / "eval_results.json").read_text())
    assert results_one.keys() == results_two.keys() >= {"step", "status", "best_step", "eval", "test"}
    for key in ("step", "status", "best_step"):
        assert results_two[key] == results_one[key], key
    for split in ("eval", "test"):
        _assert_same_metrics(results_two[split], results_one[split], f"eval_results.json {split}")

    want, got = load_file(one / "final" / weights), load_file(two / "final" / weights)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    return results_one


def test_lora_classification_in_two_processes_matches_one(classification_runs):
    one, two, stdout = classification_runs
    results = _assert_same_runs(one, two, stdout, 10, "adapter_model.safetensors")
    assert results["eval"]["rows"] == 11 and results["test"]["rows"] == 13  # no row lost or counted twice
    assert (two / "final" / "adapter_config.json").is_file() and not (two / "final" / "model.safetensors").exists()
    adapter = load_file(two / "final" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any("score" in k for k in adapter)
    assert all(v.abs().max() > 1e-4 for v in lora_b)  # trained: LoRA's B matrices start at zero


def test_packed_sft_in_two_processes_matches_one(sft_runs):
    one, two, stdout = sft_runs
    results = _assert_same_runs(one, two, stdout, 8, "model.safetensors")
    assert results["eval"]["tokens"] > 0 and math.isfinite(results["eval"]["loss"])
    seen = losses(one)
    assert seen[-1] < seen[0]  # it trained


def test_lora_dpo_in_two_processes_matches_one(preference_runs):
    one, two, stdout = preference_runs
    results = _assert_same_runs(one, two, stdout, 10, "adapter_model.safetensors")
    assert results["eval"]["pairs"] == 11 and results["test"]["pairs"] == 13
    train_one = [r for r in _rows(one) if "loss" in r]
    train_two = [r for r in _rows(two) if "loss" in r]
    for a, b in zip(train_two, train_one, strict=True):  # the step's figures: means over both processes' pairs
        for key in ("accuracy", "logps_chosen", "logps_rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (b["step"], key)
        for key in DIFFERENCES:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (b["step"], key)
    assert train_one[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
