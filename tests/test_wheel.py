"""lmforge as a user gets it: a wheel (``pip wheel .``) installed into a fresh virtual environment,
used in an empty folder. The presets must come from the package, not from a checkout.

The new environment takes torch, transformers and the other dependencies from this test
environment's site-packages through a path file (a .pth line adds the folder without running the
editable-install hook that lives there, so only the wheel's lmforge is importable).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_an_installed_wheel_works_in_an_empty_folder(tmp_path):
    source = tmp_path / "source"  # a clean copy: a build folder left in the checkout must not leak in
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(dist)], cwd=tmp_path)
    wheel = next(dist.glob("lmforge-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip())
    (site / "lmforge_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path)

    work = tmp_path / "empty"
    data = work / "DIR"
    data.mkdir(parents=True)
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog, and the cat sat on the mat." for i in range(400)]
    for split, rows in (("train", lines[:360]), ("validation", lines[360:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    env.pop("VIRTUAL_ENV", None)
    lmforge = str(venv / "bin" / "lmforge")
    where = _run([str(python), "-c", "import lmforge; print(lmforge.__file__)"], cwd=work, env=env)
    assert where.startswith(str(venv)), where  # the wheel's lmforge, not the checkout's

    _run([lmforge, "tokenizer", "train", "--algorithm", "bpe", "--vocab_size", "512", "--data", "DIR",
          "--output", "tok"], cwd=work, env=env)
    _run([lmforge, "pretrain", "--config", "gpt-debug", "--data.source", "DIR", "--data.tokenizer", "tok",
          "--train.max_steps", "3", "--output-dir", "run"], cwd=work, env=env)
    _run([lmforge, "convert", "run", "--to-hf", "stock"], cwd=work, env=env)
    out = _run([lmforge, "eval", "run", "--data", "DIR", "--split", "validation", "--no-progress"], cwd=work, env=env)
    assert "bits_per_byte" in out and "windows of 128 tokens (the run's data.block_size)" in out

    assert (work / "run" / "final" / "model.safetensors").is_file()
    config = json.loads((work / "stock" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert sorted(p.name for p in work.iterdir()) == ["DIR", "run", "stock", "tok"]  # nothing else written
