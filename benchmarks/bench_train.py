"""Training benchmarks, two sections writing one JSON file (benchmarks/results/bench_train.json):

- ``loop``: lmforge's training loop (Trainer.fit) vs a bare PyTorch loop on the same model,
  rows, batch and optimizer; interleaved repetitions in one process. Target: overhead <= 10%.
- ``tokenize_pack``: the data-pipeline section (tokenize + pack throughput).

Run ``python benchmarks/bench_train.py [loop|tokenize_pack ...]`` (or ``--section NAME``; default:
every section).
Each section updates only its own key of the JSON file, and records the machine it ran on
(threads, versions, load average during the section: benchmarks/machine.py) and every measured
time.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import finish, machine_info, sample_load

RESULTS = Path(__file__).parent / "results" / "bench_train.json"


def _update_results(section: str, payload: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[section] = payload
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------- loop


LOOP = {"vocab": 512, "hidden": 64, "layers": 2, "block": 64, "batch": 8, "steps": 40, "reps": 7, "threads": 1}
# CPU time of this process (time.process_time) is the measure: on a machine shared with other jobs
# wall time swings by 2-4x between repetitions, CPU time with one thread does not.


def _loop_model():
    import lmforge.models  # noqa: F401
    from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM

    torch.manual_seed(0)
    cfg = LmforgeGPTConfig(vocab_size=LOOP["vocab"], hidden_size=LOOP["hidden"], intermediate_size=4 * LOOP["hidden"],
                    num_hidden_layers=LOOP["layers"], num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=LOOP["block"])
    return LmforgeGPTForCausalLM(cfg)


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
    start = time.process_time()
    for step in range(LOOP["steps"]):
        batch = collate(rows[step * b:(step + 1) * b])
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.process_time() - start


def _lmforge_loop(rows, collate) -> float:
    """Trainer.fit with logging, per-step seeding and token counting; no eval, no periodic
    checkpoints. Timed up to the last optimizer step (the end-of-run checkpoint is not counted)."""
    from lmforge.train import BatchStream, LoopConfig, OptimConfig, Trainer

    class TimedTrainer(Trainer):
        end: float | None = None

        def _save(self):  # the end-of-run checkpoint: stop the clock before it
            if self.end is None:
                self.end = time.process_time()
            return super()._save()

    with tempfile.TemporaryDirectory() as run_dir:
        stream = BatchStream(rows, LOOP["batch"], collate, shuffle=False)
        cfg = LoopConfig(micro_batch_size=LOOP["batch"], max_steps=LOOP["steps"], log_every=10,
                         eval_every=0, save_every=0, progress=False)
        trainer = TimedTrainer(_loop_model(), stream, cfg, OptimConfig(warmup_steps=5), run_dir)
        start = time.process_time()
        trainer.fit()
        return trainer.end - start


def bench_loop() -> dict:
    from lmforge.data.collators import CausalLMCollator

    torch.set_num_threads(LOOP["threads"])
    info = machine_info()
    rows, collate = _loop_rows(), CausalLMCollator(0)
    _bare_loop(rows, collate)  # warm up both paths once
    _lmforge_loop(rows, collate)
    bare, ours = [], []
    for rep in range(LOOP["reps"]):
        first, second = (_bare_loop, _lmforge_loop) if rep % 2 == 0 else (_lmforge_loop, _bare_loop)
        t1, t2 = first(rows, collate), second(rows, collate)
        (bare.append(t1), ours.append(t2)) if first is _bare_loop else (ours.append(t1), bare.append(t2))
        sample_load(info)
        print(f"  rep {rep}: bare {bare[-1]:.2f}s  lmforge {ours[-1]:.2f}s  ratio {ours[-1] / bare[-1]:.3f} (CPU s)")
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    result = {
        "setup": {**LOOP, "model": "lmforge_gpt", "measure": "process CPU time, 1 thread"},
        "bare_s_median": statistics.median(bare), "lmforge_s_median": statistics.median(ours),
        "ratio_median": statistics.median(ratios), "ratios": ratios,
        "overhead_pct": 100 * (statistics.median(ratios) - 1),
        "runs": {"bare": len(bare), "lmforge": len(ours)}, "bare_s": bare, "lmforge_s": ours,
        "note": "interleaved repetitions in one process, alternating which loop goes first",
        "machine": finish(info),
    }
    print(f"loop: lmforge/bare median ratio {result['ratio_median']:.3f} "
          f"(overhead {result['overhead_pct']:+.1f}%, target <= +10%)")
    return result


# --------------------------------------------------------------------------- tokenize_pack


PACK = {"megabytes": 10, "doc_chars": 4000, "block": 512, "vocab": 8192, "reps": 3}


def _pack_corpus() -> list[str]:
    """About 10 MB of real text: the Shakespeare plays (all splits) cut at blank lines into
    documents of ~4,000 characters, repeated until the target size."""
    from lmforge.data import load_corpus

    plays = [t for split in ("train", "validation", "test") for t in load_corpus("shakespeare", split)["text"]]
    docs: list[str] = []
    for play in plays:
        cur = ""
        for para in play.split("\n\n"):
            cur = f"{cur}\n\n{para}" if cur else para
            if len(cur) >= PACK["doc_chars"]:
                docs.append(cur)
                cur = ""
        if cur:
            docs.append(cur)
    target = PACK["megabytes"] * 1_000_000
    out, size = [], 0
    while size < target:
        for d in docs:
            out.append(d)
            size += len(d.encode())
            if size >= target:
                break
    return out


def _straightforward(ds, tokenizer) -> int:
    """The usual recipe: ``ds.map(lambda b: tokenizer(b["text"]), batched=True)``."""
    out = ds.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    return sum(len(ids) for ids in out["input_ids"])


def _lmforge_pipeline(ds, tokenizer) -> int:
    from lmforge.data.pipeline import build_lm_dataset

    out = build_lm_dataset(ds, tokenizer, PACK["block"])  # in-memory source: no cache files, recomputed
    return int(out.with_format("numpy")[:]["attention_mask"].sum())


def _time_tokenize_pack(docs: list[str], tokenizer, info: dict) -> dict:
    import datasets

    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    ds = datasets.Dataset.from_dict({"text": docs})
    runs = {"straightforward": _straightforward, "lmforge": _lmforge_pipeline}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for rep in range(PACK["reps"]):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            tokens[name] = runs[name](ds, tokenizer)
            seconds[name].append(time.perf_counter() - start)
        sample_load(info)
        print(f"  {megabytes:.1f} MB rep {rep}: straightforward {seconds['straightforward'][-1]:.2f}s  "
              f"lmforge {seconds['lmforge'][-1]:.2f}s")
    med = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "megabytes": round(megabytes, 2), "documents": len(docs),
        "straightforward_mb_s_median": megabytes / med["straightforward"],
        "lmforge_mb_s_median": megabytes / med["lmforge"],
        "speedup_median": med["straightforward"] / med["lmforge"],
        # lmforge adds one EOS per document; the baseline tokens are the documents alone
        "runs": {name: len(v) for name, v in seconds.items()}, "seconds": seconds, "tokens": tokens,
    }


def bench_tokenize_pack() -> dict:
    import datasets

    from lmforge.tokenizers import train_tokenizer

    datasets.disable_progress_bars()
    info = machine_info()
    docs = _pack_corpus()
    tokenizer = train_tokenizer("shakespeare", "bpe", PACK["vocab"], special_tokens="gpt", show_progress=False)
    tokenizer.model_max_length = 10**9  # whole documents, no truncation warnings in the baseline
    # 10 MB repeats the 5 MB of plays; the 5 MB run (each play once) shows the gain without repeats
    half = len(docs) // 2
    result = {
        "setup": {**PACK, "tokenizer": "lmforge byte-level BPE (gpt special tokens) trained on the Shakespeare train split"},
        "10mb": _time_tokenize_pack(docs, tokenizer, info),
        "5mb_no_repeats": _time_tokenize_pack(docs[:half], tokenizer, info),
        "note": "lmforge = build_lm_dataset (tokenize + pack into 512-token rows with document "
                "positions; identical ids to the tokenizer); straightforward = "
                "datasets.map(batched=True) tokenization only, no packing. Interleaved repetitions "
                "in one process.",
        "machine": finish(info),
    }
    for key in ("10mb", "5mb_no_repeats"):
        r = result[key]
        print(f"tokenize_pack {key}: straightforward {r['straightforward_mb_s_median']:.2f} MB/s, lmforge "
              f"{r['lmforge_mb_s_median']:.2f} MB/s, speedup {r['speedup_median']:.2f}x (target >= 2x)")
    return result


SECTIONS = {"loop": bench_loop, "tokenize_pack": bench_tokenize_pack}


def main(argv: list[str]) -> int:
    names = [a.removeprefix("--section=") for a in argv if a != "--section"] or list(SECTIONS)  # --section X too
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
