"""The sweep's report without training: rows from a run folder, the variants' summaries against the
baseline's run-to-run spread, the results.md table, loss spikes and variant expansion."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.errors import LmforgeError
from lmforge.experiments.ablate import AblateConfig, BudgetSection, expand_variants, folder_name
from lmforge.experiments.results import loss_spikes, markdown_table, run_row, variant_summaries


def row(name: str, value: float | None, seed: int = 0, status: str = "completed", **extra) -> dict:
    return {"name": name, "run": f"{name}-seed{seed}", "seed": seed, "overrides": extra.pop("overrides", {}),
            "params": 1000, "val_bits_per_byte": value, "val_loss": value, "status": status,
            "diverged": status == "diverged", "error": extra.pop("error", None), "tokens_per_second": 100.0,
            "peak_memory_mb": 500.0, "max_grad_norm": 1.0, "loss_spikes": 0, **extra}


ROWS = [row("base", 2.50, 0), row("base", 2.53, 1), row("base", 2.52, 2),  # spread 0.03, mean 2.5167
        row("close", 2.54, overrides={"model.overrides.norm_type": "layernorm"}),  # +0.023: within the spread
        row("better", 2.40, overrides={"optim.lr": 0.01}),  # -0.117: a real difference
        row("two", 2.60, 0), row("two", 2.70, 1),  # mean 2.65
        row("boom", None, status="diverged", error="the loss became nan at step 3"),
        row("dead", None, status="crashed", error="lmforge: error: out of memory")]


def test_summaries_compare_each_variant_with_the_baseline_spread():
    summaries, spread = variant_summaries(ROWS, "val_bits_per_byte", "base")
    assert spread == pytest.approx(0.03)
    by = {s["name"]: s for s in summaries}
    assert list(by) == ["base", "close", "better", "two", "boom", "dead"]  # sweep order
    assert by["base"]["mean"] == pytest.approx(7.55 / 3) and by["base"]["delta"] is None
    assert by["close"]["delta"] == pytest.approx(2.54 - 7.55 / 3) and by["close"]["within_spread"]
    assert by["better"]["delta"] == pytest.approx(2.40 - 7.55 / 3) and not by["better"]["within_spread"]
    assert (by["two"]["runs"], by["two"]["mean"], by["two"]["min"], by["two"]["max"]) == (2, pytest.approx(2.65), 2.60, 2.70)
    assert by["boom"]["mean"] is None and by["boom"]["diverged"] == 1
    assert by["dead"]["crashed"] == 1


def test_one_baseline_run_has_no_spread_and_marks_nothing():
    rows = [row("base", 2.5), row("close", 2.5001)]
    summaries, spread = variant_summaries(rows, "val_bits_per_byte", "base")
    assert spread is None and not summaries[1]["within_spread"]
    assert "spread is unknown" in markdown_table(rows, metric="val_bits_per_byte", baseline="base",
                                                 budget=("steps", 10), split="validation")


def test_the_table_marks_noise_and_reports_failures():
    md = markdown_table(ROWS, metric="val_bits_per_byte", baseline="base", budget=("steps", 250), split="validation")
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert "2.5167 (2.5000–2.5300, 3 runs)" in lines["base"] and "baseline" in lines["base"]
    assert "+0.0233 ≈" in lines["close"] and "norm_type=layernorm" in lines["close"]
    assert "-0.1167 |" in lines["better"] and "≈" not in lines["better"]
    assert "2.6500 (2.6000–2.7000, 2 runs)" in lines["two"]
    assert lines["boom"].rstrip().endswith("| yes |") and "(1 crashed)" in lines["dead"]
    assert "0.0300 (max − min)" in md and "250 steps" in md
    assert "boom-seed0: diverged: the loss became nan at step 3" in md
    assert "dead-seed0: crashed: lmforge: error: out of memory" in md


def test_loss_spikes():
    flat = [3.0] * 30
    assert loss_spikes(flat) == 0
    assert loss_spikes(flat[:25] + [3.8] + flat[:4]) == 1  # 27% above the median of the 20 before
    assert loss_spikes(flat[:25] + [3.7] + flat[:4]) == 0  # 23%: within
    assert loss_spikes([3.0, float("nan"), 3.0]) == 1  # a non-finite loss is a spike wherever it is
    assert loss_spikes([9.0, 3.0] + flat[:10]) == 0  # no judgement before 20 steps of history


def test_a_run_that_ends_no_better_than_it_started_is_diverged(tmp_path: Path):
    records = [{"step": s, "loss": loss, "grad_norm": 1.0, "tokens_per_s": 10.0, "tokens_seen": 64 * s,
                "elapsed_s": 0.1 * s} for s, loss in ((1, 7.0), (2, 9.0), (3, 8.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = SimpleNamespace(name="v", seed=0, folder=tmp_path, overrides={}, tokenizer=None,
                          config=SimpleNamespace(data=SimpleNamespace(tokenizer="tok")))
    outcome = {"status": "completed", "params": 10, "error": None, "peak_memory_mb": 1.0,
               "final_eval": {"loss": 7.5, "bits_per_byte": 4.0}}
    got = run_row(run, outcome)
    assert (got["status"], got["diverged"], got["val_bits_per_byte"]) == ("diverged", True, None)
    assert "7.5000 is not below the first training loss 7.0000" in got["error"]
    outcome["final_eval"] = {"loss": 6.0, "bits_per_byte": 3.0}
    got = run_row(run, outcome)
    assert (got["status"], got["val_bits_per_byte"], got["steps"], got["tokens_seen"]) == ("completed", 3.0, 3, 192)
    assert got["tokens_per_second"] == 10.0 and got["max_grad_norm"] == 1.0
    crashed = run_row(run, None, error="boom")
    assert (crashed["status"], crashed["error"], crashed["val_bits_per_byte"]) == ("crashed", "boom", None)


def test_expert_load_is_the_mean_of_the_last_steps_and_a_column_only_with_experts(tmp_path: Path):
    from lmforge.experiments import results

    records = [{"step": s, "loss": 5.0, "grad_norm": 1.0, "tokens_per_s": 10.0, "tokens_seen": 64 * s,
                "elapsed_s": 0.1 * s, "moe_load_min": 0.0 if s <= 20 else 0.5 + 0.01 * s,
                "moe_load_max": 3.0 if s <= 20 else 1.2} for s in range(1, 31)]
    records.insert(15, {"step": 15, "eval_loss": 4.0})  # an evaluation record among the steps
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = SimpleNamespace(name="moe", seed=0, folder=tmp_path, overrides={}, tokenizer=None,
                          config=SimpleNamespace(data=SimpleNamespace(tokenizer="tok")))
    got = run_row(run, {"status": "completed", "params": 10, "error": None, "peak_memory_mb": 1.0,
                        "final_eval": {"loss": 4.0, "bits_per_byte": 2.0}})
    tail = [0.5 + 0.01 * s for s in range(31 - results.LOAD_STEPS, 31)]  # steps 21..30
    assert got["expert_load_min"] == pytest.approx(sum(tail) / len(tail), abs=1e-3)
    assert got["expert_load_max"] == pytest.approx(1.2)

    dense = [row("base", 2.5, 0), row("base", 2.52, 1)]
    assert "expert load" not in markdown_table(dense, metric="val_bits_per_byte", baseline="base",
                                               budget=("steps", 30), split="validation")
    mixed = [*dense, {**row("moe", 2.4), "expert_load_min": 0.2, "expert_load_max": 1.4},
             {**row("moe", 2.45, 1), "expert_load_min": 0.4, "expert_load_max": 1.6}]
    md = markdown_table(mixed, metric="val_bits_per_byte", baseline="base", budget=("steps", 30), split="validation")
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert lines["variant"].rstrip().endswith("| expert load min / max |")
    assert lines["moe"].rstrip().endswith("| 0.30 / 1.50 |") and lines["base"].rstrip().endswith("| - |")
    assert "an expert that received no token" in md


def test_grid_and_variants_expand_in_order_with_unique_folders():
    config = AblateConfig(base={}, budget=BudgetSection(steps=1), variants={"base": {}},
                          grid={"optim.lr": [0.001, 0.003], "model.overrides.norm_type": ["rmsnorm", "dyt"]})
    variants = expand_variants(config, "sweep")
    assert list(variants) == ["base", "lr=0.001,norm_type=rmsnorm", "lr=0.001,norm_type=dyt",
                              "lr=0.003,norm_type=rmsnorm", "lr=0.003,norm_type=dyt"]
    assert variants["lr=0.003,norm_type=dyt"] == {"optim.lr": 0.003, "model.overrides.norm_type": "dyt"}
    assert folder_name("a/b c") == "a_b_c"
    clash = AblateConfig(base={}, budget=BudgetSection(steps=1), variants={"a/b": {}, "a b": {"optim.lr": 1.0}})
    with pytest.raises(LmforgeError, match="would share the run folder 'a_b'"):
        expand_variants(clash, "sweep")
    with pytest.raises(ValueError, match="each seed once"):
        AblateConfig(base={}, budget=BudgetSection(steps=1), seeds=[0, 0])
