"""Metrics out of the loop: a JSONL file, accelerate trackers, a tqdm bar, MFU estimates and the
loss-curve plot."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmforge.runs import METRICS_FILE


class MetricsLogger:
    """Writes one JSON object per line to ``run_dir/metrics.jsonl`` (main process only) and
    forwards the same numbers to the accelerator's trackers (tensorboard when installed)."""

    def __init__(self, accelerator: Any, run_dir: str | Path, *, resume_step: int | None = None,
                 progress_bar: bool = True, total_steps: int = 0, use_trackers: bool = False):
        self.accelerator = accelerator
        self.path = Path(run_dir) / METRICS_FILE
        self.main = accelerator.is_main_process
        self.use_trackers = use_trackers
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.main and resume_step is not None:
            self._truncate_after(resume_step)
        self.bar = None
        if self.main and progress_bar:
            self.bar = tqdm(total=total_steps, initial=resume_step or 0, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint (they will be written again)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        record = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.use_trackers:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numbers, step=record.get("step"))

    def progress(self, step: int, total: int, postfix: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(step - self.bar.n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        """Print a message on the main process without breaking the bar."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def flops_per_token(n_params: int, num_layers: int = 0, hidden_size: int = 0, seq_len: int = 0) -> float:
    """Training FLOPs per token: 6 N (forward + backward) + 12 L H T for attention (PaLM appendix B)."""
    return 6.0 * n_params + 12.0 * num_layers * hidden_size * seq_len


_PEAK_CACHE: dict[str, float] = {}


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Achievable matmul FLOP/s on this device, measured with a short 1024^3 matmul loop.

    Used as the MFU denominator on CPUs (no spec sheet to read); on a GPU pass ``peak_tflops``.
    """
    key = f"{device}-{dtype}"
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        a @ b
        reps += 1
    _PEAK_CACHE[key] = 2 * n**3 * reps / (time.perf_counter() - start)
    return _PEAK_CACHE[key]


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path | None:
    """Train loss (and eval loss / bits per byte when present) against step; None without matplotlib."""
    try:
        import matplotlib  # optional (lmforge[plot]): no plot without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after use("Agg"): needs no display
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    bpb = [(r["step"], r["eval_bits_per_byte"]) for r in records if "eval_bits_per_byte" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.5)
    if bpb:
        ax.plot(*zip(*bpb, strict=True), "s--", label="eval bits/byte", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per token / bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
