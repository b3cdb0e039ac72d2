"""Training benchmarks, two sections writing one JSON file (benchmarks/results/bench_train.json):

- ``loop``: lmforge's training loop (Trainer.fit) vs a bare PyTorch loop on the same model,
  rows, batch and optimizer; interleaved repetitions in one process. Target: overhead <= 10%.
- ``tokenize_pack``: the data-pipeline section (tokenize + pack throughput).

Run ``python benchmarks/bench_train.py [loop|tokenize_pack ...]`` (default: every section).
Each section updates only its own key of the JSON file.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "bench_train.json"


def _update_results(section: str, payload: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[section] = payload
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------- loop


LOOP = {"vocab": 512, "hidden": 64, "layers": 2, "block": 64, "batch": 8, "steps": 40, "reps": 5}


def _loop_model():
    import lmforge.models  # noqa: F401
    from lmforge.models import GPTConfig, GPTForCausalLM

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=LOOP["vocab"], hidden_size=LOOP["hidden"], intermediate_size=4 * LOOP["hidden"],
                    num_hidden_layers=LOOP["layers"], num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=LOOP["block"])
    return GPTForCausalLM(cfg)


def _loop_rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    n = LOOP["batch"] * LOOP["steps"]
    ids = torch.randint(0, LOOP["vocab"], (n, LOOP["block"]), generator=g)
    pos = torch.arange(LOOP["block"]).repeat(n, 1)
    return [{"input_ids": i.tolist(), "position_ids": p.tolist()} for i, p in zip(ids, pos, strict=True)]


def _bare_loop(rows, collate) -> float:
    """What one would write by hand: same AdamW groups, schedule, clipping, batches."""
    from lmforge.train.config import OptimConfig
    from lmforge.train.optim import build_optimizer, build_scheduler

    model = _loop_model()
    model.train()
    opt_cfg = OptimConfig(warmup_steps=5)
    opt = build_optimizer(model, opt_cfg)
    sched = build_scheduler(opt, opt_cfg, LOOP["steps"])
    b = LOOP["batch"]
    start = time.perf_counter()
    for step in range(LOOP["steps"]):
        batch = collate(rows[step * b:(step + 1) * b])
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _lmforge_loop(rows, collate) -> float:
    """Trainer.fit with logging, per-step seeding and token counting; no eval, no periodic
    checkpoints. Timed up to the last optimizer step (the end-of-run checkpoint is not counted)."""
    from lmforge.train import BatchStream, LoopConfig, OptimConfig, Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        stream = BatchStream(rows, LOOP["batch"], collate, shuffle=False)
        cfg = LoopConfig(micro_batch_size=LOOP["batch"], max_steps=LOOP["steps"], log_every=10,
                         eval_every=0, save_every=0, progress_bar=False)
        trainer = Trainer(_loop_model(), stream, cfg, OptimConfig(warmup_steps=5), run_dir)
        return trainer.fit().elapsed_seconds


def bench_loop() -> dict:
    from lmforge.data.collators import CausalLMCollator

    rows, collate = _loop_rows(), CausalLMCollator(0)
    _bare_loop(rows, collate)  # warm up both paths once
    _lmforge_loop(rows, collate)
    bare, ours = [], []
    for rep in range(LOOP["reps"]):
        first, second = (_bare_loop, _lmforge_loop) if rep % 2 == 0 else (_lmforge_loop, _bare_loop)
        t1, t2 = first(rows, collate), second(rows, collate)
        (bare.append(t1), ours.append(t2)) if first is _bare_loop else (ours.append(t1), bare.append(t2))
        print(f"  rep {rep}: bare {bare[-1]:.2f}s  lmforge {ours[-1]:.2f}s  ratio {ours[-1] / bare[-1]:.3f}")
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    result = {
        "setup": {**LOOP, "threads": torch.get_num_threads(), "model": "lmforge_gpt"},
        "bare_s_median": statistics.median(bare), "lmforge_s_median": statistics.median(ours),
        "ratio_median": statistics.median(ratios), "ratios": ratios,
        "overhead_pct": 100 * (statistics.median(ratios) - 1),
        "note": "interleaved repetitions in one process; the machine was shared with other jobs",
    }
    print(f"loop: lmforge/bare median ratio {result['ratio_median']:.3f} "
          f"(overhead {result['overhead_pct']:+.1f}%, target <= +10%)")
    return result


# --------------------------------------------------------------------------- tokenize_pack
# (data-pipeline section: defines bench_tokenize_pack() -> dict and registers it in SECTIONS)


SECTIONS = {"loop": bench_loop}


def main(argv: list[str]) -> int:
    names = argv or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            print(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
            return 2
        print(f"[{name}]")
        _update_results(name, SECTIONS[name]())
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
