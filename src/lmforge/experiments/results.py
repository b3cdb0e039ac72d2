"""The results of an ``lmforge ablate`` sweep: one row per run, the table, and the plots.

Rows come from each run's ``metrics.jsonl`` (one training record per step, as ``lmforge ablate``
runs with ``train.log_every: 1``) and its ``ablation.json`` outcome:

- ``tokens_per_second``: the median over steps (a step after an evaluation also carries the
  evaluation's time; the median ignores those);
- ``max_grad_norm``: the largest gradient norm before clipping, over all steps;
- ``loss_spikes``: steps whose training loss is more than 25% above the median of the 20 steps
  before it (or not finite);
- ``diverged``: the loss or gradient became NaN/inf (training stopped), or the final validation
  loss is not below the first training loss (the model ended no better than it started);
- ``expert_load_min`` / ``expert_load_max`` (mixture-of-experts models, else None): the least and
  most loaded expert over all layers as a multiple of an even share (the trainer's
  ``moe_load_min`` / ``moe_load_max``: 1 is balanced, 0 an idle expert), averaged over the last
  ``LOAD_STEPS`` steps.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from lmforge.runs import read_metrics

SPIKE_WINDOW = 20
SPIKE_FACTOR = 1.25
LOAD_STEPS = 10
_X_AXIS = {"steps": ("step", "optimizer step"), "tokens": ("tokens_seen", "training tokens"),
           "seconds": ("elapsed_s", "training seconds")}


def loss_spikes(losses: list[float], window: int = SPIKE_WINDOW, factor: float = SPIKE_FACTOR) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the ``window`` steps before (or is not finite)."""
    count = 0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            count += 1
        elif i >= window:
            before = [x for x in losses[i - window:i] if math.isfinite(x)]
            count += bool(before) and loss > factor * statistics.median(before)
    return count


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def run_row(run: Any, outcome: dict[str, Any] | None, *, error: str | None = None) -> dict[str, Any]:
    """The results.json row of one ``lmforge.train.ablate.Run`` (``outcome``: its ablation.json,
    None when the run crashed; ``error``: what it died of)."""
    records = read_metrics(run.folder)
    train = [r for r in records if "loss" in r]
    final = (outcome or {}).get("final_eval") or {}
    losses = [float(r["loss"]) for r in train]
    grads = [g for g in (_finite(r.get("grad_norm")) for r in train) if g is not None]
    speeds = [r["tokens_per_s"] for r in train[1:] if _finite(r.get("tokens_per_s"))]  # step 1 warms up
    loads = [r for r in train if _finite(r.get("moe_load_min")) is not None][-LOAD_STEPS:]
    status = "crashed" if outcome is None else outcome["status"]
    val_loss = _finite(final.get("loss"))
    if status == "completed" and losses and val_loss is not None and val_loss >= losses[0]:
        status = "diverged"
        error = (f"the final validation loss {val_loss:.4f} is not below the first training loss "
                 f"{losses[0]:.4f}")
    return {
        "name": run.name, "run": run.folder.name, "seed": run.seed, "overrides": run.overrides,
        "tokenizer": run.tokenizer.key if run.tokenizer else run.config.data.tokenizer,
        "params": (outcome or {}).get("params"),
        "val_bits_per_byte": _finite(final.get("bits_per_byte")) if status != "diverged" else None,
        "val_loss": val_loss if status != "diverged" else None,
        "status": status, "diverged": status == "diverged",
        "error": error or (outcome or {}).get("error"),
        "steps": train[-1]["step"] if train else 0,
        "tokens_seen": train[-1]["tokens_seen"] if train else 0,
        "train_seconds": round(train[-1]["elapsed_s"], 2) if train else 0.0,
        "tokens_per_second": round(statistics.median(speeds), 1) if speeds else None,
        "peak_memory_mb": (outcome or {}).get("peak_memory_mb"),
        "max_grad_norm": round(max(grads), 4) if grads else None,
        "loss_spikes": loss_spikes(losses),
        **{f"expert_load_{end}": round(statistics.fmean(r[f"moe_load_{end}"] for r in loads), 3) if loads else None
           for end in ("min", "max")},
    }


# ----------------------------------------------------------------------------------- summary


def variant_summaries(rows: list[dict[str, Any]], metric: str, baseline: str) -> tuple[list[dict], float | None]:
    """One summary per variant (in sweep order): mean, min and max of ``metric`` over its runs,
    its difference to the baseline, and whether that difference is within the baseline's spread.
    Returns (summaries, the baseline's spread: max - min over its runs, None with one run)."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    values = {n: [r[metric] for r in rows if r["name"] == n and r[metric] is not None] for n in names}
    base = values.get(baseline) or []
    base_mean = statistics.fmean(base) if base else None
    spread = max(base) - min(base) if len(base) > 1 else None
    out = []
    for name in names:
        runs = [r for r in rows if r["name"] == name]
        vals = values[name]
        mean = statistics.fmean(vals) if vals else None
        delta = mean - base_mean if mean is not None and base_mean is not None and name != baseline else None
        out.append({
            "name": name, "overrides": runs[0]["overrides"], "runs": len(runs), "params": runs[0]["params"],
            "mean": mean, "min": min(vals) if vals else None, "max": max(vals) if vals else None,
            "delta": delta, "within_spread": delta is not None and spread is not None and abs(delta) <= spread,
            "tokens_per_second": _mean(r["tokens_per_second"] for r in runs),
            "peak_memory_mb": _max(r["peak_memory_mb"] for r in runs),
            "max_grad_norm": _max(r["max_grad_norm"] for r in runs),
            "loss_spikes": sum(r["loss_spikes"] for r in runs),
            "expert_load_min": _mean(r.get("expert_load_min") for r in runs),
            "expert_load_max": _mean(r.get("expert_load_max") for r in runs),
            "diverged": sum(r["diverged"] for r in runs), "crashed": sum(r["status"] == "crashed" for r in runs),
        })
    return out, spread


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _max(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _load(summary: dict[str, Any]) -> str:
    low, high = summary["expert_load_min"], summary["expert_load_max"]
    return " - |" if low is None else f" {low:.2f} / {high:.2f} |"


def _changes(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('model.overrides.')}={v}" for k, v in overrides.items()) or "(base)"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(rows: list[dict[str, Any]], *, metric: str, baseline: str, budget: tuple[str, float],
                   split: str) -> str:
    """results.md: the variants ranked in sweep order, with the baseline's spread explained."""
    summaries, spread = variant_summaries(rows, metric, baseline)
    label = "val bits/byte" if metric == "val_bits_per_byte" else "val loss"
    experts = any(s["expert_load_min"] is not None for s in summaries)  # a column only when a run has experts
    lines = [f"| variant | changes | params | {label} | Δ vs {baseline} | tokens/s | peak memory (MB) | "
             "max grad-norm | loss spikes | diverged |" + (" expert load min / max |" if experts else ""),
             "|" + "---|" * (10 + experts)]
    for s in summaries:
        value = _num(s["mean"], ".4f")
        if s["runs"] > 1 and s["min"] is not None:
            value += f" ({s['min']:.4f}–{s['max']:.4f}, {s['runs']} runs)"
        if s["crashed"]:
            value += f" ({s['crashed']} crashed)"
        if s["name"] == baseline:
            delta = "baseline"
        elif s["delta"] is None:
            delta = "-"
        else:
            delta = f"{s['delta']:+.4f}" + (" ≈" if s["within_spread"] else "")
        diverged = "no" if not s["diverged"] else ("yes" if s["runs"] == 1 else f"{s['diverged']}/{s['runs']}")
        params = f"{s['params'] / 1e6:.3f}M" if s["params"] else "-"
        lines.append(f"| {s['name']} | {_changes(s['overrides'])} | {params} | {value} | {delta} | "
                     f"{_num(s['tokens_per_second'], ',.0f')} | {_num(s['peak_memory_mb'], ',.0f')} | "
                     f"{_num(s['max_grad_norm'], '.2f')} | {s['loss_spikes']} | {diverged} |"
                     + (_load(s) if experts else ""))
    unit, amount = budget
    notes = [f"Every run: the same data order and seed, {amount:g} {unit} of training; scored on the whole "
             f"{split} split (lower is better)."]
    base_runs = [r for r in rows if r["name"] == baseline and r[metric] is not None]
    if spread is not None:
        seeds = ", ".join(str(r["seed"]) for r in base_runs)
        notes.append(f"Run-to-run spread of {baseline} over {len(base_runs)} seeds ({seeds}): {spread:.4f} "
                     f"(max − min). Differences marked ≈ are no larger than that spread: not distinguishable "
                     "from noise.")
    else:
        notes.append(f"{baseline} ran with one seed, so the run-to-run spread is unknown: add baseline_seeds "
                     "to the sweep to tell real differences from noise.")
    if experts:
        notes.append(f"Expert load: the least and the most loaded expert over all layers, as a multiple of an "
                     f"even share (1: balanced; 0: an expert that received no token), the mean of the last "
                     f"{LOAD_STEPS} steps of each run and of the runs.")
    failed = [r for r in rows if r["status"] != "completed"]
    for r in failed:
        notes.append(f"{r['run']}: {r['status']}: {r['error'] or 'no error message'}")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


# ----------------------------------------------------------------------------------- plots


def _plt():
    try:
        import matplotlib  # optional (lmforge[plot]): no plots without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after use("Agg"): needs no display
    except ImportError:
        return None
    return plt


def _curve(folder: Path, metric: str, x_key: str) -> list[tuple[float, float]]:
    """(x, validation metric) at each evaluation of a run; x from the training record of that step."""
    records = read_metrics(folder)
    at_step = {r["step"]: r for r in records if "loss" in r}
    key = "eval_bits_per_byte" if metric == "val_bits_per_byte" else "eval_loss"
    points = []
    for r in records:
        value = _finite(r.get(key))
        train = at_step.get(r["step"])
        if value is not None and train is not None:
            points.append((train[x_key], value))
    return points


def plot_curves(rows: list[dict[str, Any]], out: Path, *, metric: str, unit: str) -> Path | None:
    """val_curves.png: the validation metric of every run against the budget's unit."""
    plt = _plt()
    if plt is None:
        return None
    x_key, x_label = _X_AXIS[unit]
    names = list(dict.fromkeys(r["name"] for r in rows))
    colors = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, name in enumerate(names):
        for j, row in enumerate(r for r in rows if r["name"] == name):
            points = _curve(out / row["run"], metric, x_key)
            style = {"color": colors(i % colors.N), "alpha": 0.9 if j == 0 else 0.5}
            if row["status"] == "completed" and points:  # the last evaluation read the whole split
                *points, final = points
                ax.plot(*final, "*", ms=8, **style)
            if points:
                ax.plot(*zip(*points, strict=True), "o-", ms=2.5, lw=1.2, label=name if j == 0 else None, **style)
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation bits per byte" if metric == "val_bits_per_byte" else "validation loss")
    ax.set_title("validation during training (lines: the first eval_batches batches; stars: the whole split at the end)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    finals = [r[metric] for r in rows if r[metric] is not None]
    if finals:  # zoom on the end of training, where the variants separate
        low, high = min(finals), max(finals)
        ax.set_ylim(low - 0.05 * max(high - low, 0.1), high + 1.5 * max(high - low, 0.1))
    fig.tight_layout()
    path = out / "val_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(rows: list[dict[str, Any]], out: Path, *, metric: str, baseline: str) -> Path | None:
    """val_bpb.png: the final validation metric per variant (range over seeds), the baseline's spread shaded."""
    plt = _plt()
    if plt is None:
        return None
    summaries, spread = variant_summaries(rows, metric, baseline)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(summaries) + 1.5))
    ys = list(range(len(summaries)))[::-1]
    means = [s["mean"] for s in summaries if s["mean"] is not None]
    low, high = (min(means), max(means)) if means else (0.0, 1.0)
    left, right = low - 0.6 * max(high - low, 0.02), high + 0.4 * max(high - low, 0.02)
    for y, s in zip(ys, summaries, strict=True):
        if s["mean"] is None:
            ax.text(left, y, f"  {'diverged' if s['diverged'] else 'crashed'}", va="center", fontsize=8,
                    color="crimson")
            continue
        err = [[s["mean"] - s["min"]], [s["max"] - s["mean"]]] if s["runs"] > 1 else None
        color = "tab:orange" if s["name"] == baseline else ("tab:gray" if s["within_spread"] else "tab:blue")
        ax.barh(y, s["mean"], xerr=err, color=color, capsize=3)
        ax.text(s["mean"], y, f" {s['mean']:.3f}", va="center", fontsize=7)
    base = next((s for s in summaries if s["name"] == baseline), None)
    if base is not None and base["mean"] is not None and spread is not None:
        ax.axvspan(base["mean"] - spread, base["mean"] + spread, color="tab:orange", alpha=0.15,
                   label=f"{baseline} ± spread")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(left, right)
    ax.set_yticks(ys, [s["name"] for s in summaries], fontsize=8)
    ax.set_xlabel("final validation bits per byte" if metric == "val_bits_per_byte" else "final validation loss")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / "val_bpb.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(rows: list[dict[str, Any]], out: Path, *, baseline: str, metric: str,
                  budget: tuple[str, float], split: str) -> None:
    """results.json, results.md and the two plots (skipped, with a note, without matplotlib)."""
    out = Path(out)
    (out / "results.json").write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    table = markdown_table(rows, metric=metric, baseline=baseline, budget=budget, split=split)
    (out / "results.md").write_text(table)
    print("\n" + table)
    curves = plot_curves(rows, out, metric=metric, unit=budget[0])
    bars = plot_bars(rows, out, metric=metric, baseline=baseline)
    if curves is None or bars is None:
        print("lmforge ablate: no plots (matplotlib is not installed: pip install 'lmforge[plot]')")
