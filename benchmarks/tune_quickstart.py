"""Choose the quickstart's settings on the VALIDATION plays: train each candidate configuration
for the same time budget and score it by bits per byte on the whole validation split.

    python benchmarks/tune_quickstart.py                              # the candidates below, 5 min each
    python benchmarks/tune_quickstart.py --candidates my.yaml --minutes 0.5

A candidates file is a YAML list; each item has a ``name`` and ``overrides`` (dotted settings on
top of the quickstart pretrain preset), optionally ``model_vocab_size`` (default 2048) and
``model_tokenizer`` (bpe or unigram, default bpe)::

    - name: lr 1e-3
      overrides: {optim.lr: 1.0e-3}
    - name: 6 layers
      overrides: {model.overrides.num_hidden_layers: 6}

Every configuration tried is appended, with its validation figure, training figures and the
machine (benchmarks/machine.py), to benchmarks/results/quickstart_tuning.json (``--out``); the
best of this invocation is printed. The test plays are never read here: the only evaluation is
the training run's own, on ``data.eval_split``, and a candidate whose resolved configuration
does not train on the train plays and evaluate on the validation plays is refused before
anything runs. All candidates get the same torch thread count (decided once, at the start).
benchmarks/bench_quickstart.py measures the chosen configuration once, test plays included.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml
from bench_quickstart import CONFIG, RESULTS, model_tokenizer, pretrain, training_figures
from machine import finish, machine_info

CANDIDATES: list[dict[str, Any]] = [
    {"name": "quickstart.yaml as committed", "overrides": {}},
    # one change at a time from the committed settings (3 layers, rows of 64 x 32, Muon in float32)
    {"name": "Muon orthogonalizing in bfloat16 (as torch.optim.Muon)", "overrides": {"optim.muon_ns_dtype": "bfloat16"}},
    {"name": "AdamW only", "overrides": {"optim.name": "adamw"}},
    {"name": "4 layers", "overrides": {"model.overrides.num_hidden_layers": 4}},
    {"name": "2 layers", "overrides": {"model.overrides.num_hidden_layers": 2}},
    {"name": "rows of 128 tokens, batch 16", "overrides": {"data.block_size": 128, "train.micro_batch_size": 16}},
    {"name": "batch 16", "overrides": {"train.micro_batch_size": 16}},
    {"name": "both learning rates x2", "overrides": {"optim.muon_lr": 0.02, "optim.lr": 8.0e-3}},
    {"name": "MQA (1 key/value head)", "overrides": {"model.overrides.num_key_value_heads": 1}},
    {"name": "Unigram tokenizer", "model_tokenizer": "unigram", "overrides": {}},
    {"name": "vocab 4096", "model_vocab_size": 4096, "overrides": {}},
    # the committed settings again, last: the gap between its two runs is the run-to-run spread
    # (machine, time budget) that a candidate's difference has to exceed
    {"name": "quickstart.yaml as committed, again", "overrides": {}},
]


def load_candidates(path: Path | None) -> list[dict[str, Any]]:
    """The candidates of a YAML file (or the built-in list), each checked to keep the splits."""
    items = CANDIDATES if path is None else yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(items, list) or not all(isinstance(c, dict) and "name" in c for c in items):
        raise SystemExit(f"{path}: expected a YAML list of {{name, overrides}} items")
    for candidate in items:
        check_splits(candidate)
    return items


def check_splits(candidate: dict[str, Any]) -> None:
    """Refuse a candidate that would not train on the train plays and score on the validation
    plays of the built-in Shakespeare corpus (its configuration is resolved, nothing runs)."""
    from lmforge.config import load_config
    from lmforge.train import PretrainConfig

    data = load_config(PretrainConfig, CONFIG, candidate.get("overrides") or {}).data
    if (data.source, data.train_split, data.eval_split) != ("shakespeare", "train", "validation"):
        raise SystemExit(f"candidate {candidate['name']!r} trains on {data.source} {data.train_split!r} and "
                         f"scores on {data.eval_split!r}: tuning uses the train plays and the validation plays only")


def try_candidate(candidate: dict[str, Any], run_dir: Path, tokenizer: Path, minutes: float,
                  threads: int | None) -> dict:
    """Train one candidate for ``minutes``; its validation figures (never the test plays)."""
    info = machine_info()
    result = pretrain(run_dir, tokenizer, minutes=minutes, threads=threads, overrides=candidate.get("overrides"))
    figures = training_figures(result)
    return {"name": candidate["name"], "overrides": candidate.get("overrides") or {},
            "model_vocab_size": candidate.get("model_vocab_size", 2048),
            "model_tokenizer": candidate.get("model_tokenizer", "bpe"), "minutes": minutes, "threads_requested": threads, **figures, "machine": finish(info)}


def append(path: Path, entry: dict) -> None:
    """Add one entry to the JSON list in ``path`` (created if missing)."""
    entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def main() -> int:
    from lmforge.train.threads import auto_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="budget per candidate (default 5)")
    parser.add_argument("--candidates", type=Path, default=None, help="YAML list of {name, overrides}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: as `lmforge quickstart`, 1 on a busy machine)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tune_quickstart"))
    parser.add_argument("--out", type=Path, default=RESULTS / "quickstart_tuning.json")
    args = parser.parse_args()

    candidates = load_candidates(args.candidates)
    threads = args.threads if args.threads is not None else auto_threads()
    if threads is not None and args.threads is None:
        print(f"the machine is busy (other work on its cores): every candidate runs with {threads} "
              "torch thread(s); such results do not compare with runs on a quiet machine (--threads N fixes it)",
              flush=True)
    tokenizers: dict[tuple, Path] = {}  # one model tokenizer per (algorithm, vocabulary), on the train plays
    scored = []
    for candidate in candidates:
        choice = (candidate.get("model_tokenizer", "bpe"), int(candidate.get("model_vocab_size", 2048)))
        if choice not in tokenizers:
            tokenizers[choice] = model_tokenizer(args.run_dir, choice[1], choice[0])
        start = time.perf_counter()
        entry = try_candidate(candidate, args.run_dir / _slug(candidate["name"]), tokenizers[choice],
                              args.minutes, threads)
        entry["seconds_total"] = round(time.perf_counter() - start, 1)
        append(args.out, entry)
        scored.append(entry)
        print(f"[{candidate['name']}] {entry['steps']} steps, validation {entry['validation_bits_per_byte']:.4f} "
              f"bits per byte ({entry['status']}; appended to {args.out})", flush=True)
    ranked = sorted((e for e in scored if e["validation_bits_per_byte"] is not None),
                    key=lambda e: e["validation_bits_per_byte"])
    print(f"\nvalidation bits per byte after {args.minutes:g} min each (lower is better):")
    for e in ranked:
        print(f"  {e['validation_bits_per_byte']:.4f}  {e['name']}  {e['overrides']}")
    if ranked:
        print(f"best: {ranked[0]['name']} {ranked[0]['overrides']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
