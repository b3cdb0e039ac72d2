"""Tiny presets, corpora and tokenizers shared by the tests/test_train*.py files, and ``perturb``."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import yaml

from tests.pipeline_fixtures import bert_tokenizer, gpt_tokenizer, make_corpus

# 2 layers, hidden 32: each family in its smallest useful form (dropout on, for resume tests)
PRESETS = {
    "gpt": {"model_type": "lmforge_gpt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
            "hidden_dropout": 0.1, "attention_dropout": 0.1},
    "bert": {"model_type": "lmforge_bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "max_position_embeddings": 64, "hidden_dropout": 0.1},
    "mamba": {"model_type": "lmforge_mamba", "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8},
}


def perturb(model, seed: int = 0):
    """Move every parameter off its initialisation (unit norms, zero biases, S4D A_log...) by 0.1 x a
    seeded normal draw, so each one matters: a dropped input or a wrong mapping shows in the outputs.
    Returns ``model`` (its train/eval mode unchanged)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def write_preset(folder: Path, family: str, name: str | None = None, **changes) -> Path:
    path = Path(folder) / f"{name or family + '-tiny'}.yaml"
    path.write_text(yaml.safe_dump({**PRESETS[family], **changes}))
    return path


def write_corpus(folder: Path, n_train: int = 160, n_eval: int = 24) -> Path:
    """A folder with train.jsonl / validation.jsonl of short random documents."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("validation", n_eval, 2)):
        rows = [json.dumps({"text": t}) for t in make_corpus(n, seed=seed, max_words=40)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def launch_env(*paths: Path, **extra: str) -> dict[str, str]:
    """The environment of a test's subprocess or ``accelerate launch``: this checkout's ``src``
    (and ``paths``) importable, one torch thread per process, offline, and no rank variables
    inherited from an outer launcher; ``extra`` adds or overrides variables."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(str(x) for x in (*paths, root / "src")),
               HF_HUB_OFFLINE="1", **extra)
    return env


def free_port() -> int:
    """A TCP port free at this moment, for a launcher's rendezvous: the fixed default (29500) would
    make two launches at once (pytest-xdist workers, another suite on the machine) collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes), to show a folder was left untouched."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def save_tokenizers(folder: Path) -> dict[str, Path]:
    out = {}
    for name, make in (("gpt", gpt_tokenizer), ("bert", bert_tokenizer)):
        path = Path(folder) / f"tok-{name}"
        make(make_corpus(200)).save_pretrained(path)
        out[name] = path
    return out


__all__ = ["PRESETS", "bert_tokenizer", "free_port", "gpt_tokenizer", "launch_env", "make_corpus", "perturb", "save_tokenizers", "snapshot",
           "write_corpus", "write_preset"]


def pretrain(config):
    """``lmforge pretrain`` from Python: the run with its model card and Hub pushes (``run_publisher``)."""
    from lmforge.publish import run_publisher
    from lmforge.train.pretrain import pretrain as run

    return run(config, hooks=run_publisher(config))
