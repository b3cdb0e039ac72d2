"""The quickstart's pretraining, measured: writes benchmarks/results/quickstart.json from the run.

    python benchmarks/bench_quickstart.py                  # the 5-minute budget of `lmforge quickstart`
    python benchmarks/bench_quickstart.py --minutes 0.5 --out /tmp/quickstart_check.json   # a check run

Runs the steps of ``lmforge quickstart`` (``lmforge.commands.quickstart``) that make the model:
the corpus, the model's byte-level BPE trained on the training plays, and the pretraining of
the quickstart pretrain preset for ``--minutes``. Everything in the results file is measured by
this run: steps, tokens, train seconds, tokens/s, the validation curve and the final validation
bits per byte (whole validation split) from the run's metrics.jsonl, the machine (threads,
versions, load average: benchmarks/machine.py), and, measured once at the very end by the
quickstart's own held-out step (``heldout_step``: the saved model scored as ``lmforge eval``
scores it: disjoint windows as long as the run's training rows), bits per byte on the held-out
test plays. The loss plot is copied next to the JSON file.

The settings of the quickstart pretrain preset are chosen on the validation plays only, by
benchmarks/tune_quickstart.py; this script is the one place that reads the test plays.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from machine import finish, machine_info, sample_load

from lmforge.presets import find_preset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = find_preset("pretrain", "quickstart")
CORPUS = "shakespeare"


def model_tokenizer(run_dir: Path, vocab_size: int, algorithm: str = "bpe") -> Path:
    """Quickstart steps 1 and 4: the corpus, and the model's tokenizer on the train split."""
    from lmforge.commands.quickstart import fetch_step, model_tokenizer_step
    from lmforge.data.sources import load_corpus

    fetch_step(CORPUS)
    train = load_corpus(CORPUS, "train")
    return model_tokenizer_step(train, run_dir / "tokenizers", vocab_size=vocab_size, model_max_length=1024,
                                algorithm=algorithm)


def pretrain(run_dir: Path, tokenizer: Path, *, minutes: float, threads: int | None,
             overrides: dict[str, Any] | None = None) -> Any:
    """Quickstart step 5: pretrain for ``minutes``; evaluates on the validation split only."""
    from lmforge.commands.quickstart import build_pretrain_config, pretrain_step

    config = build_pretrain_config(CONFIG, tokenizer, run_dir / "model", minutes=minutes, threads=threads,
                                   overwrite=True, overrides=overrides)
    return pretrain_step(config)


def validation_curve(metrics: list[dict]) -> list[dict]:
    """Every evaluation of the run: step, bits per byte, bytes evaluated, and the elapsed time of
    the last logged training step at or before it."""
    elapsed, curve = 0.0, []
    for record in metrics:
        if "elapsed_s" in record:
            elapsed = record["elapsed_s"]
        if "eval_bits_per_byte" in record:
            curve.append({"step": record["step"], "elapsed_s": round(elapsed, 1),
                          "bits_per_byte": record["eval_bits_per_byte"], "eval_bytes": record["eval_bytes"]})
    return curve


def training_figures(result: Any) -> dict:
    """Steps, tokens, time and throughput of a ``pretrain`` result, and its final validation
    figure (the last evaluation sees the whole validation split)."""
    import torch

    from lmforge.runs import read_metrics

    metrics = read_metrics(result.run_dir)
    rates = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
    train = result.train
    return {
        "status": train.status, "steps": train.step, "tokens_seen": train.tokens_seen,
        "train_seconds": round(train.elapsed_seconds, 1),
        "tokens_per_s": round(train.tokens_seen / train.elapsed_seconds, 1) if train.elapsed_seconds else None,
        "median_logged_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
        "torch_threads": torch.get_num_threads(),  # as the run set them
        "validation_bits_per_byte": train.last_eval.get("bits_per_byte"),
        "validation_bytes": train.last_eval.get("bytes"),
        "validation_curve": validation_curve(metrics),
    }


def heldout_test_figure(result: Any) -> dict:
    """Quickstart step 6, once, at the end: bits per byte on the held-out test plays, scored as
    the quickstart scores them (windows of the run's training rows, ``lmforge eval``'s way)."""
    from lmforge.commands.quickstart import heldout_step

    metrics = heldout_step(result.final_dir, CORPUS, "test")
    return {"test_bits_per_byte": metrics["bits_per_byte"], "test_bytes": metrics["bytes"],
            "test_window": {key: metrics.get(key) for key in ("max_length", "stride", "window")}}


def main() -> int:
    from lmforge.train.threads import auto_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="pretraining budget (default 5, as quickstart)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: as `lmforge quickstart`, 1 on a busy machine)")
    parser.add_argument("--model-vocab-size", type=int, default=2048)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench_quickstart"))
    parser.add_argument("--out", type=Path, default=RESULTS / "quickstart.json")
    args = parser.parse_args()

    info = machine_info()
    start = time.perf_counter()
    threads = args.threads if args.threads is not None else auto_threads()
    tokenizer = model_tokenizer(args.run_dir, args.model_vocab_size)
    sample_load(info)
    result = pretrain(args.run_dir, tokenizer, minutes=args.minutes, threads=threads)
    if result.final_dir is None:
        print(f"pretraining stopped early ({result.train.status}); nothing written")
        return 1
    sample_load(info)
    figures = training_figures(result)
    figures.update(heldout_test_figure(result))  # the only look at the test plays
    plot = args.out.with_name(f"{args.out.stem}_loss.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if (result.run_dir / "loss.png").is_file():
        shutil.copy(result.run_dir / "loss.png", plot)
    record = {
        "command": f"python benchmarks/bench_quickstart.py --minutes {args.minutes:g}",
        "config": str(CONFIG.relative_to(ROOT)) if ROOT in CONFIG.parents else str(CONFIG),
        "config_values": _config_values(result.run_dir),
        "minutes": args.minutes, "model_vocab_size": args.model_vocab_size, "threads_requested": threads,
        **figures,
        "loss_plot": plot.name if plot.is_file() else None,
        "seconds_total": round(time.perf_counter() - start, 1),
        "machine": finish(info),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"\n{figures['steps']} steps in {figures['train_seconds']} s; validation {figures['validation_bits_per_byte']:.4f}, "
          f"test {figures['test_bits_per_byte']:.4f} bits per byte; wrote {args.out}")
    return 0


def _config_values(run_dir: Path) -> dict:
    """The resolved settings that make the recipe (model, data, train, optim) from config.yaml."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {key: config[key] for key in ("model", "data", "train", "optim") if key in config}


if __name__ == "__main__":
    raise SystemExit(main())
