"""Multi-process training on CPU through ``lmforge pretrain``, on a corpus of many global batches
trained for more than one epoch with shuffling on: 2-process DDP equals one process with the same
global batch (losses and final weights), FSDP2 (lmforge's fully_shard) equals DDP with really
sharded parameters, a 2-process checkpoint resumes exactly in 2 processes and in one, and a launch
where accelerate sees only one of several processes is refused before anything is written. Plus
unit tests of lmforge.train.distributed and the shipped accelerate configs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from lmforge.errors import LmforgeError
from lmforge.presets import find_preset
from lmforge.runs import check_launch
from lmforge.train import distributed as dist_mod
from tests.fake_hub import FakeHub
from tests.pipeline_fixtures import gpt_tokenizer, make_corpus
from tests.train_fixtures import free_port, launch_env, snapshot

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BLOCK, GLOBAL_BATCH = 32, 4


# --------------------------------------------------------------------------- units


def _acc(n: int = 1, kind: str = "NO") -> SimpleNamespace:
    return SimpleNamespace(num_processes=n, distributed_type=f"DistributedType.{kind}",
                           device=torch.device("cpu"), state=SimpleNamespace())


def test_check_launch_refuses_processes_accelerate_cannot_see():
    with pytest.raises(LmforgeError, match="ACCELERATE_USE_CPU=1") as e:
        check_launch(_acc(1), env={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    assert "started 2 processes" in str(e.value) and "WORLD_SIZE=2" in str(e.value)
    check_launch(_acc(1), env={})  # plain single process
    check_launch(_acc(1), env={"WORLD_SIZE": "1"})
    check_launch(_acc(2, "MULTI_CPU"), env={"WORLD_SIZE": "2"})


def test_shard_model_refuses_what_cannot_run_here():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(LmforgeError, match="DeepSpeed"):
        dist_mod.shard_model(_acc(2, "MULTI_CPU"), model, "deepspeed")
    with pytest.raises(LmforgeError, match="valid: ddp, fsdp, deepspeed"):
        dist_mod.shard_model(_acc(), model, "zero")
    assert dist_mod.shard_model(_acc(), model, "fsdp") is model  # one process: nothing to shard
    assert dist_mod.strategy_name(_acc(), model) == "single process (cpu)"


def test_transformer_blocks_found_from_no_split_modules():
    from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM

    model = LmforgeGPTForCausalLM(LmforgeGPTConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2))
    assert [type(b).__name__ for b in dist_mod.transformer_blocks(model)] == ["TransformerBlock"] * 3


@pytest.mark.parametrize("name", ["cpu_multiprocess", "single_gpu", "multi_gpu_ddp", "fsdp2",
                                  "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(find_preset("accelerate", name)))
    expected = {"cpu_multiprocess": "MULTI_GPU", "single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU",
                "fsdp2": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}[name]
    assert str(config.distributed_type).endswith(expected)
    if name == "fsdp2":
        assert str(config.fsdp_config["fsdp_version"]) == "2"
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


# --------------------------------------------------------------------------- launches


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    """A tokenizer, a corpus of a few dozen packed rows (several global batches of 4, an odd tail
    that each epoch drops differently) trained for more than one epoch with shuffling on, and a
    tiny GPT pretraining config (dropout off: 2 processes draw other dropout masks than 1)."""
    tmp = tmp_path_factory.mktemp("dist")
    tok = gpt_tokenizer(make_corpus(100, seed=1))
    tok.save_pretrained(tmp / "tok")
    docs = make_corpus(15, seed=5, max_words=30)  # 25 rows: 6 steps an epoch, one row dropped
    (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    from lmforge.data.pipeline import build_lm_dataset

    rows = len(build_lm_dataset(str(tmp / "corpus.jsonl"), tok, BLOCK))
    steps_per_epoch = rows // GLOBAL_BATCH
    assert steps_per_epoch >= 4 and rows % GLOBAL_BATCH, rows
    config = {
        "objective": "causal",
        "model": {"preset": "gpt-debug", "overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                       "hidden_dropout": 0.0, "attention_dropout": 0.0}},
        "data": {"source": str(tmp / "corpus.jsonl"), "tokenizer": str(tmp / "tok"), "block_size": BLOCK,
                 "eval_split": None},
        "train": {"micro_batch_size": GLOBAL_BATCH, "max_steps": steps_per_epoch + 3, "log_every": 1,
                  "eval_every": 1000, "save_every": 2, "keep_last": 100, "progress": False},
        # eps 1e-6, not AdamW's 1e-8: with 1e-8, weights whose gradients are ~1e-8 get updates of
        # ~lr from float noise, so summing a batch in another order (2 processes or 2 micro-batches
        # instead of one) moved some weights by 1.3e-5 after 9 steps; with 1e-6, by 2.7e-7
        "optim": {"lr": 3e-3, "warmup_steps": 0, "eps": 1e-6},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp


def _steps(cfg: Path) -> int:
    return yaml.safe_load((cfg / "config.yaml").read_text())["train"]["max_steps"]


def _env() -> dict[str, str]:
    return launch_env()


def _launch(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _pretrain_args(cfg: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(cfg / "config.yaml"), "--output-dir", str(out), *extra]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _accelerate(cfg: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "accelerate"), "launch", "--main_process_port", "0", "--config_file",
           str(find_preset("accelerate", "cpu_multiprocess")), "-m", "lmforge.cli",
           *_pretrain_args(cfg, out, "--train.micro-batch-size", str(GLOBAL_BATCH // 2), *extra)]
    result = _launch(cmd, {**_env(), "ACCELERATE_USE_CPU": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single_run(run_config) -> Path:
    from lmforge.cli import main

    out = run_config / "single"
    assert main(_pretrain_args(run_config, out)) == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(run_config) -> tuple[Path, str]:
    out = run_config / "ddp"
    return out, _accelerate(run_config, out).stdout


def _assert_same_weights(a: Path, b: Path) -> None:
    want, got = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)


def test_two_processes_match_one_process(run_config, single_run, ddp_run):
    ddp_dir, stdout = ddp_run
    assert "strategy ddp (2 processes, gloo)" in stdout
    one, two = _losses(single_run), _losses(ddp_dir)
    assert len(one) == len(two) == _steps(run_config)
    assert two == pytest.approx(one, rel=1e-5)
    assert one[-1] < one[0]
    _assert_same_weights(single_run, ddp_dir)


def test_two_process_checkpoint_resumes_in_one_process(run_config, ddp_run):
    """The same global batch (2 x 2 rows -> 1 x 4 rows): the run continues exactly where it was."""
    from lmforge.cli import main

    full, _ = ddp_run
    resumed = run_config / "ddp-resumed-alone"
    shutil.copytree(full, resumed)
    for later in [resumed / "final", *(p for p in (resumed / "checkpoints").iterdir() if p.name != "step_2")]:
        shutil.rmtree(later)
    assert main(_pretrain_args(run_config, resumed, "--resume", "auto")) == 0  # micro-batch 4, 1 process
    assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-5)
    _assert_same_weights(full, resumed)


@pytest.fixture(scope="module")
def muon_ddp_run(run_config) -> Path:
    """The 2-process run with Muon, a checkpoint after every step."""
    out = run_config / "muon-ddp"
    _accelerate(run_config, out, "--optim.name", "muon", "--train.save-every", "1")
    return out


def test_two_process_muon_steps_match_one_process(run_config, muon_ddp_run, monkeypatch):
    """Every optimizer step of the 2-process Muon run, taken again in one process from the same
    checkpoint (weights, AdamW moments, Muon momentum, data position), gives the same step.

    - The optimizer state after the step (AdamW's moments, Muon's momentum: float32 functions of
      the gradient) and the AdamW-updated weights agree to float noise: the gradient is the same.
    - Muon-updated matrices agree to 1e-4 of the step's largest change. Muon orthogonalizes the
      momentum in float32 on the CPU, so a 1e-7 difference in how the gradient was summed moves
      its update by about 1e-6 of the step (in torch's bfloat16 it moved a few bfloat16 steps,
      1.4% of the step); a gradient that was not averaged across processes, or another batch,
      changes the direction by far more.
    """
    from transformers import AutoModelForCausalLM

    from lmforge.cli import main
    from lmforge.train.loop import Trainer
    from lmforge.train.optim import muon_parameters

    original = Trainer.resume

    def resume_for_one_step(self, checkpoint):
        original(self, checkpoint)
        self.state.total_steps = self.state.step + 1

    monkeypatch.setattr(Trainer, "resume", resume_for_one_step)
    checkpoints = muon_ddp_run / "checkpoints"
    model = AutoModelForCausalLM.from_pretrained(muon_ddp_run / "final", trust_remote_code=True)
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {names[id(p)] for p in muon_parameters(model)}
    two = _losses(muon_ddp_run)
    assert len(two) == _steps(run_config) and two[-1] < two[0]
    for step in range(1, _steps(run_config)):
        out = run_config / f"muon-one-step-{step}"
        assert main(_pretrain_args(run_config, out, "--optim.name", "muon",
                                   "--resume", str(checkpoints / f"step_{step}"))) == 0
        assert _losses(out)[-1] == pytest.approx(two[step], rel=1e-6)
        after = f"step_{step + 1}"
        want = torch.load(checkpoints / after / "optimizer.bin", weights_only=True)["state"]
        got = torch.load(out / "checkpoints" / after / "optimizer.bin", weights_only=True)["state"]
        assert want.keys() == got.keys() and {"exp_avg", "momentum_buffer"} <= {k for s in want.values() for k in s}
        for index, state in want.items():
            for key, value in state.items():
                torch.testing.assert_close(got[index][key], value, rtol=1e-5, atol=1e-8, msg=f"{after}: {key}")

        want = load_file(checkpoints / after / "model.safetensors")
        before = load_file(checkpoints / f"step_{step}" / "model.safetensors")
        got = load_file(out / "final" / "model.safetensors")
        assert matrices < want.keys()
        for key in want:
            moved = (want[key] - before[key]).abs().max().item()
            assert moved > 1e-5, key  # the step changed every tensor
            atol = 1e-4 * moved if key in matrices else 1e-6
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=f"{after}: {key}")


_MUON_ON_SHARDS = """
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lmforge.errors import LmforgeError
from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM
from lmforge.train import OptimConfig
from lmforge.train.optim import build_optimizer

# a file store, not a TCP port: tests run in parallel (pytest-xdist) must not compete for one
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}/store", rank=0, world_size=1)
model = LmforgeGPTForCausalLM(LmforgeGPTConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2))
mesh = init_device_mesh("cpu", (1,))
for block in model.model.layers:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
build_optimizer(model, OptimConfig(name="adamw"))  # AdamW works on shards
try:
    build_optimizer(model, OptimConfig(name="muon"))
except LmforgeError as error:
    print("REFUSED:", error)
dist.destroy_process_group()
"""


def test_muon_refuses_fsdp_sharded_parameters(tmp_path):
    """However the model got sharded (here torch's fully_shard in a 1-rank group), Muon is refused
    on DTensor parameters with the way out, where AdamW builds."""
    script = tmp_path / "muon_on_shards.py"
    script.write_text(_MUON_ON_SHARDS)
    result = _launch([sys.executable, str(script), str(tmp_path)], _env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED: optim.name: muon needs each weight matrix whole on every process" in result.stdout
    assert "use distributed: ddp with muon" in result.stdout


def test_muon_under_fsdp_is_refused_before_any_file_is_written(run_config):
    from lmforge.cli import main

    out = run_config / "muon-fsdp"
    assert main(_pretrain_args(run_config, out, "--optim.name", "muon", "--distributed", "fsdp")) != 0
    assert not out.exists()


@pytest.fixture(scope="module")
def fsdp_hub():
    with FakeHub() as hub:
        yield hub


@pytest.fixture(scope="module")
def fsdp_run(run_config, fsdp_hub) -> tuple[Path, str]:
    """The FSDP run also pushes to a fake Hub: every checkpoint gathers the sharded model (a
    collective in the checkpoint hook) before the main process pushes it as its own branch."""
    out = run_config / "fsdp"
    return out, _accelerate(run_config, out, "--distributed", "fsdp", "--push-to-hub", "user/fsdp",
                            "--push-checkpoints", env=fsdp_hub.env(run_config / "hf_home")).stdout


def test_fsdp_matches_ddp_with_sharded_parameters(run_config, single_run, ddp_run, fsdp_run):
    ddp_dir, _ = ddp_run
    out, stdout = fsdp_run
    # strategy_name says fsdp2 only when the parameters are torch DTensor shards (is_sharded)
    assert "strategy fsdp2 (2 processes, gloo, fully_shard by lmforge)" in stdout
    assert _losses(out) == pytest.approx(_losses(ddp_dir), rel=1e-5)
    assert _losses(out) == pytest.approx(_losses(single_run), rel=1e-5)
    _assert_same_weights(single_run, out)
    # the checkpoint and the final model hold full tensors, equal to DDP's
    for rel in ("final/model.safetensors", f"checkpoints/step_{_steps(run_config)}/model.safetensors"):
        sharded, plain = load_file(out / rel), load_file(ddp_dir / rel)
        assert sharded.keys() == plain.keys()
        for key in plain:
            torch.testing.assert_close(sharded[key], plain[key], rtol=1e-5, atol=1e-6)


def test_fsdp_run_pushes_full_models_to_a_branch_per_checkpoint(run_config, fsdp_run, fsdp_hub):
    out, stdout = fsdp_run
    steps = _steps(run_config)
    saved = [s for s in range(2, steps + 1, 2)] + ([steps] if steps % 2 else [])
    assert set(fsdp_hub.branches("user/fsdp")) == {"main", *(f"step-{s}" for s in saved)}
    assert "hub: pushed to user/fsdp: " in stdout and "NOT pushed" not in stdout
    for revision, local in (("main", out / "final"), (f"step-{saved[0]}", out / "checkpoints" / f"step_{saved[0]}")):
        pushed = safetensors_load(fsdp_hub.files("user/fsdp", revision)["model.safetensors"])
        want = load_file(local / "model.safetensors")
        assert pushed.keys() == want.keys(), revision
        for key in want:
            torch.testing.assert_close(pushed[key], want[key], rtol=0, atol=0, msg=f"{revision} {key}")


def test_fsdp_run_resumes_exactly_across_two_processes(run_config, fsdp_run):
    """A 2-process FSDP run cut back to its step-2 checkpoint and resumed (--resume auto, 2
    processes) ends with the uninterrupted run's losses and final weights."""
    full, _ = fsdp_run
    resumed = run_config / "fsdp-resumed"
    shutil.copytree(full, resumed)
    for later in [resumed / "final", *(p for p in (resumed / "checkpoints").iterdir() if p.name != "step_2")]:
        shutil.rmtree(later)
    stdout = _accelerate(run_config, resumed, "--distributed", "fsdp", "--resume", "auto").stdout
    assert "fsdp2 (2 processes" in stdout and f"resuming from {resumed / 'checkpoints' / 'step_2'}" in stdout
    assert _losses(resumed) == _losses(full)  # steps 1-2 kept from before, the rest trained again
    want, got = load_file(full / "final/model.safetensors"), load_file(resumed / "final/model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


_SHARDED = """
import json
import sys

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM
from lmforge.train.distributed import shard_model

accelerator = Accelerator()
torch.manual_seed(0)
model = LmforgeGPTForCausalLM(LmforgeGPTConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2))
full = {name: tuple(p.shape) for name, p in model.named_parameters()}
model = shard_model(accelerator, model, "fsdp")
params = dict(model.named_parameters())
report = {
    "rank": accelerator.process_index,
    "world": accelerator.num_processes,
    "dtensor": all(isinstance(p, DTensor) for p in params.values()),
    "placements": sorted({str(p.placements) for p in params.values()}),
    "global_shapes_kept": all(tuple(p.shape) == full[name] for name, p in params.items()),
    "local_rows": {name: p.to_local().shape[0] for name, p in params.items()},
}
with open(f"{sys.argv[1]}/report-{accelerator.process_index}.json", "w") as f:  # both ranks share one stdout
    json.dump(report, f)
"""


def test_fsdp_parameters_are_dtensor_shards_across_two_processes(tmp_path):
    """Under a real 2-process launch, shard_model(..., "fsdp") leaves every parameter a DTensor
    sharded on dim 0 over both ranks: each rank holds about half the rows, together all of them."""
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    cmd = [str(BIN / "accelerate"), "launch", "--main_process_port", "0", "--config_file",
           str(find_preset("accelerate", "cpu_multiprocess")), str(script), str(tmp_path)]
    result = _launch(cmd, {**_env(), "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world"] == 2 for r in reports)
    for r in reports:
        assert r["dtensor"] and r["global_shapes_kept"]
        assert r["placements"] == ["(Shard(dim=0),)"]
    from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM

    model = LmforgeGPTForCausalLM(LmforgeGPTConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
    for name, p in model.named_parameters():
        rows = [r["local_rows"][name] for r in reports]
        assert sum(rows) == p.shape[0] and max(rows) == -(-p.shape[0] // 2), (name, rows)


@pytest.mark.parametrize("target", ["existing run", "new folder"])
def test_launch_accelerate_cannot_see_is_refused_before_any_file_is_written(run_config, single_run, target):
    """torchrun starts 2 `lmforge pretrain` processes without ACCELERATE_USE_CPU=1 on this GPU-less
    machine: accelerate sees one process in each. Both refuse with the explanation, before
    touching the output folder: an existing run (no overwrite) stays byte for byte, a new folder is
    not created (they used to race on it and report "already holds a run")."""
    out = run_config / "refused"
    if target == "existing run":
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(single_run, out)
    before = snapshot(out) if out.exists() else None
    env = _env()
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "lmforge.cli",
           *_pretrain_args(run_config, out)]
    result = _launch(cmd, env)
    assert result.returncode != 0
    assert result.stderr.count("the launcher started 2 processes") == 2, result.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=1" in result.stderr and "already holds a run" not in result.stderr
    if before is None:
        assert not out.exists()
    else:
        assert snapshot(out) == before


def test_self_sharded_checkpoint_resumes_exactly():
    """save_state/load_state of a fully_shard-ed model (1-rank gloo group, one process): the
    checkpoint holds full tensors and FQN-keyed optimizer state, and resuming continues exactly
    (first loss after loading checks the weights, the second the optimizer state)."""
    result = _launch([sys.executable, str(ROOT / "tests" / "fsdp_resume_script.py")], _env())
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["sharded"] and out["saved_types"] == ["Tensor"]
    assert "lm_head.weight" not in out["saved_keys"]  # tied to the embeddings: saved once
    assert out["optimizer_state_keys"] == out["saved_keys"]
    assert out["resumed"] == out["reference"]
