"""Side-by-side model benchmarks: each lmforge family against its transformers reference.

    python benchmarks/bench_models.py                 # every family
    python benchmarks/bench_models.py --family gpt    # one family (gpt, bert, mamba, mamba2)
    python benchmarks/bench_models.py --quick         # fewer repetitions (smoke run)

Timings interleave the two implementations in one process, alternating which goes first, and
report medians; ratios > 1 mean lmforge is faster. Each family writes
benchmarks/results/models_<family>.json (``--quick``: models_<family>_quick.json, not committed).
To add a family: write ``bench_<family>(args) -> dict`` below (use ``interleaved`` and
``report``) and add it to ``FAMILIES``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import finish, machine_info, sample_load  # benchmarks/machine.py, beside this file

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------- shared helpers


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable ``reps`` times, interleaved; the order alternates every repetition.

    Returns seconds per call for each name. ``warmup`` untimed rounds run first.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads, then restore the count it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def report(title: str, times: dict[str, list[float]], ours: str, ref: str, unit_work: float = 1.0, unit: str = "s") -> dict:
    """Print medians and the speed ratio ref/ours (> 1: ours faster); return a JSON-able summary.

    With ``unit_work`` (e.g. tokens per call) the medians are also printed as work per second.
    """
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = med[ref] / med[ours]
    line = f"{title}: " + ", ".join(f"{name} {med[name]:.4f} s" for name in times)
    if unit_work != 1.0:
        line += " | " + ", ".join(f"{name} {unit_work / med[name]:.1f} {unit}/s" for name in times)
    print(f"{line} | speedup {ratio:.3f}x (median of {len(times[ours])} interleaved reps)", flush=True)
    return {"median_s": med, "speedup": ratio, "reps": len(times[ours]), "all_s": times}


def results_path(family: str, quick: bool = False) -> Path:
    """benchmarks/results/models_<family>.json, or models_<family>_quick.json for a ``--quick`` run."""
    return RESULTS / f"models_{family}{'_quick' if quick else ''}.json"


def write_results(family: str, results: dict, quick: bool = False) -> Path:
    """Write ``results_path(family, quick)`` with the machine description."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = results_path(family, quick)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path.write_text(json.dumps({"meta": meta, **results}, indent=2, default=str))
    print(f"wrote {path}")
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB since start or the last ``reset_peak_rss()``."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------ GPT

GPT_BENCH = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
    bos_token_id=None, eos_token_id=None, pad_token_id=0,
)


def _gpt_pair(seed: int = 0):
    """(LmforgeGPTForCausalLM, LlamaForCausalLM) with identical weights (fp32, sdpa)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.models.convert import from_hf

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**GPT_BENCH))
    ours = from_hf(llama)
    for model in (ours, llama):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return ours, llama


def _gpt_train_step(model, opt, ids):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()

    return step


def _gpt_generate(model, prompt, new_tokens: int, use_cache: bool = True):
    def run():
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache)
        assert out.shape[1] == prompt.shape[1] + new_tokens
        return out

    return run


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def _gpt_decode_rss(model, prompt, new_tokens: int) -> list[tuple[int, float]]:
    """Greedy decode step by step with a DynamicCache; RSS (MB) every 128 steps."""
    samples = []
    out = model(prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    for step in range(new_tokens):
        out = model(token, cache=cache, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        if (step + 1) % 128 == 0:
            gc.collect()
            samples.append((step + 1, _rss_mb()))
    return samples


def _gpt_memory_probe(new_tokens: int, batch: int) -> None:
    """Child process: decode ``new_tokens`` twice (fresh cache each time); print RSS samples (JSON).

    If memory leaked per step, the second pass would end higher than the first.
    """
    from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM

    torch.set_num_threads(1)  # memory, not speed, is measured here; one thread keeps it quick on a busy machine
    torch.manual_seed(0)
    model = LmforgeGPTForCausalLM(LmforgeGPTConfig(**GPT_BENCH)).eval()
    prompt = torch.randint(1, 8192, (batch, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(prompt)  # warm-up
        gc.collect()
        base = _rss_mb()
        first = _gpt_decode_rss(model, prompt, new_tokens)
        gc.collect()
        second = _gpt_decode_rss(model, prompt, new_tokens)
    print(json.dumps({"base_mb": base, "first": first, "second": second, "peak_mb": peak_rss_mb()}))


def _gpt_memory(args) -> dict:
    """RSS while decoding 2,048 tokens (batch 4) in a fresh process, twice, against the KV cache size."""
    batch, n = 4, 1024 if args.quick else 2048
    cfg = GPT_BENCH
    kv_bytes_per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * (
        cfg["hidden_size"] // cfg["num_attention_heads"]) * 4 * batch
    proc = subprocess.run(
        [sys.executable, __file__, "--_memory-probe", str(n), "--_batch", str(batch)],
        capture_output=True, text=True, check=True,
    )
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    base = probe["base_mb"]
    print(f"GPT decode memory, {n} tokens, batch {batch} (KV cache {kv_bytes_per_token / 1024:.0f} KiB/token), "
          f"RSS above the loaded model ({base:.0f} MB):")
    for name in ("first", "second"):
        print(f"  {name} pass: " + ", ".join(f"{s}:{rss - base:+.1f}" for s, rss in probe[name][::2]))
    growth = (probe["first"][-1][1] - probe["first"][0][1]) / (probe["first"][-1][0] - probe["first"][0][0])
    print(f"  growth {growth * 1024:.1f} KiB/token (KV cache {kv_bytes_per_token / 1024:.0f} KiB/token); "
          f"second pass ends {probe['second'][-1][1] - probe['first'][-1][1]:+.1f} MB vs the first")
    return {"batch": batch, "new_tokens": n, "kv_cache_bytes_per_token": kv_bytes_per_token,
            "growth_kib_per_token": growth * 1024, **probe}


def _gpt_bench_train(args) -> dict:
    """Training step: fp32, B=8, T=256, AdamW with identical settings on both sides."""
    ours, llama = _gpt_pair()
    ids = torch.randint(0, 8192, (8, 256), generator=torch.Generator().manual_seed(0))
    ours.train()
    llama.train()
    opt_kw = dict(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    steps = {
        "lmforge": _gpt_train_step(ours, torch.optim.AdamW(ours.parameters(), **opt_kw), ids),
        "llama": _gpt_train_step(llama, torch.optim.AdamW(llama.parameters(), **opt_kw), ids),
    }
    times = interleaved(steps, reps=4 if args.quick else 15, warmup=1)
    return report("GPT train step B8 T256", times, "lmforge", "llama", unit_work=8 * 256, unit="tok")


def _gpt_prompt() -> torch.Tensor:
    return torch.randint(1, 8192, (1, 16), generator=torch.Generator().manual_seed(1))


def _gpt_bench_generate(args) -> dict:
    """Greedy generate of 256 tokens from a 16-token prompt (identical weights, identical tokens)."""
    ours, llama = _gpt_pair()
    ours.eval()
    llama.eval()
    prompt = _gpt_prompt()
    assert torch.equal(_gpt_generate(ours, prompt, 32)(), _gpt_generate(llama, prompt, 32)())
    gens = {"lmforge": _gpt_generate(ours, prompt, 256), "llama": _gpt_generate(llama, prompt, 256)}
    times = interleaved(gens, reps=3 if args.quick else 9, warmup=1)
    return report("GPT greedy generate 256", times, "lmforge", "llama", unit_work=256, unit="tok")


def _gpt_bench_cache(args) -> dict:
    """lmforge generate with vs without the KV cache at ``--gpt-cache-tokens`` new tokens."""
    ours, _ = _gpt_pair()
    ours.eval()
    n_new = 256 if args.quick else args.gpt_cache_tokens
    prompt = _gpt_prompt()
    runs = {"cache": _gpt_generate(ours, prompt, n_new), "no_cache": _gpt_generate(ours, prompt, n_new, use_cache=False)}
    times = interleaved(runs, reps=1, warmup=0)  # one rep: the no-cache side is quadratic and slow
    out = report(f"GPT generate {n_new}, cache vs no cache", times, "cache", "no_cache", unit_work=n_new, unit="tok")
    return {**out, "new_tokens": n_new}


GPT_PARTS = {"train": _gpt_bench_train, "generate": _gpt_bench_generate, "cache": _gpt_bench_cache,
             "memory": lambda args: _gpt_memory(args)}


def bench_gpt(args) -> dict:
    """lmforge GPT vs LlamaForCausalLM (same weights): train step, greedy generate, cache speedup, memory.

    ``--gpt-parts`` runs a subset; its results update the existing JSON's other parts.
    """
    parts = args.gpt_parts.split(",") if args.gpt_parts else list(GPT_PARTS)
    unknown = set(parts) - set(GPT_PARTS)
    if unknown:
        raise SystemExit(f"--gpt-parts: unknown {sorted(unknown)}; choose from {sorted(GPT_PARTS)}")
    results = {part: GPT_PARTS[part](args) for part in parts}
    previous = results_path("gpt", args.quick)  # read at the end: another run may have written meanwhile
    if set(parts) != set(GPT_PARTS) and previous.is_file():
        old = {k: v for k, v in json.loads(previous.read_text()).items() if k not in ("meta", *parts)}
        results = {**old, **results}
    return {**results, "config": GPT_BENCH}


# ----------------------------------------------------------------------------------- BERT

BERT_BENCH = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024, max_position_embeddings=512)


def _bert_mlm_batch(batch: int = 8, length: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with 15% of positions masked ([MASK] = 4) and labelled; the rest -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, BERT_BENCH["vocab_size"], (batch, length), generator=g)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    return {"input_ids": ids.masked_fill(chosen, 4), "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids), "labels": ids.masked_fill(~chosen, -100)}


def _bert_mlm_step(model, opt, batch):
    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    return step


def _paired_ratios(times: dict[str, list[float]], ref: str) -> dict[str, float]:
    """Median over repetitions of ref_time / time, each rep's runs adjacent (robust to load drifts)."""
    return {name: statistics.median(r / t for r, t in zip(times[ref], ts, strict=True))
            for name, ts in times.items() if name != ref}


def bench_bert(args) -> dict:
    """MLM training step (fp32, B8 T256, 15% masked): lmforge classic vs BertForMaskedLM (same
    weights); classic with sparse prediction (same loss) and the modern preset beside it."""
    from transformers import BertConfig, BertForMaskedLM

    from lmforge.models import LmforgeBertConfig, LmforgeBertForMaskedLM
    from lmforge.models.convert import from_hf

    torch.manual_seed(0)
    hf = BertForMaskedLM(BertConfig(**BERT_BENCH, type_vocab_size=2, pad_token_id=0)).train()
    classic = from_hf(hf).train()  # identical weights, dropout 0.1 on both
    sparse = from_hf(hf).train()
    sparse.config.sparse_prediction = True
    modern = LmforgeBertForMaskedLM(LmforgeBertConfig.from_preset("modern", **BERT_BENCH)).train()
    batch = _bert_mlm_batch()
    with torch.no_grad():  # same weights, same loss (dropout off for the check)
        for model in (hf, classic, sparse):
            model.eval()
        want = hf(**batch).loss
        torch.testing.assert_close(classic(**batch).loss, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(sparse(**batch).loss, want, atol=1e-5, rtol=0)
        for model in (hf, classic, sparse):
            model.train()
    opt_kw = dict(lr=1e-4, weight_decay=0.01)
    models = {"lmforge_classic": classic, "transformers_bert": hf, "lmforge_classic_sparse": sparse,
              "lmforge_modern": modern}
    steps = {name: _bert_mlm_step(m, torch.optim.AdamW(m.parameters(), **opt_kw), batch) for name, m in models.items()}
    times = interleaved(steps, reps=4 if args.quick else 12, warmup=2)
    tokens = 8 * 256
    result = report("BERT MLM train step B8 T256", times, "lmforge_classic", "transformers_bert",
                    unit_work=tokens, unit="tok")
    result["paired_speedup_vs_transformers"] = _paired_ratios(times, "transformers_bert")
    result["params"] = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    med = result["median_s"]
    for name in ("lmforge_classic", "lmforge_classic_sparse", "lmforge_modern"):
        print(f"  {name}: {tokens / med[name]:.0f} tok/s, {med['transformers_bert'] / med[name]:.3f}x transformers "
              f"(median of paired ratios {result['paired_speedup_vs_transformers'][name]:.3f}x; "
              f"{result['params'][name] / 1e6:.2f}M params)", flush=True)
    return {"config": {**BERT_BENCH, "batch": 8, "seq_len": 256, "mlm_probability": 0.15}, "mlm_train_step": result}


# ---------------------------------------------------------------------------------- Mamba
# The references are transformers' MambaForCausalLM on the same weights, on its fastest stock CPU
# path first: ``use_mambapy=True`` with the ``mambapy`` package installed (mambapy's parallel scan
# over the materialised (B, D, L, N) tensors; pip install "lmforge[bench]"). Its default
# sequential loop (``use_mambapy=False``, close to a minute per training step here) is the second
# row, with fewer repetitions. Every row records the repetitions each side really ran.

MAMBA_BENCH = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, state_size=16, expand=2,
                   pad_token_id=0, bos_token_id=None, eos_token_id=None)
# lmforge GPT with about the same parameter count (tied embeddings, narrower MLP): 3.81M vs 3.85M
MAMBA_GPT_PEER = dict(vocab_size=8192, hidden_size=256, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None)
MAMBA_KINDS = ("lmforge", "transformers_mambapy", "transformers_sequential")


def _mamba_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """LmforgeMambaForCausalLM and transformers' MambaForCausalLM with mambapy's scan and with its
    sequential loop, all three with the same weights (fp32), keyed by ``MAMBA_KINDS``."""
    from transformers.utils.import_utils import is_mambapy_available

    from lmforge.models import LmforgeMambaConfig, LmforgeMambaForCausalLM
    from lmforge.models.convert import to_hf

    if not is_mambapy_available():
        raise SystemExit("bench_models --family mamba: the reference needs mambapy (pip install 'lmforge[bench]')")
    torch.manual_seed(seed)
    ours = LmforgeMambaForCausalLM(LmforgeMambaConfig(**MAMBA_BENCH))
    sequential = to_hf(ours)
    assert not sequential.config.use_mambapy
    config = copy.deepcopy(sequential.config)
    config.use_mambapy = True
    mambapy = type(sequential)(config)
    mambapy.load_state_dict(sequential.state_dict())
    models = dict(zip(MAMBA_KINDS, (ours, mambapy, sequential), strict=True))
    for model in models.values():
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return models


def _mamba_pscan_calls(model, ids) -> int:
    """Calls of mambapy's parallel scan during one forward of ``model`` (transformers imports
    ``mambapy.pscan.pscan`` on every call of its scan, so a wrapper there sees them)."""
    import mambapy.pscan

    original, calls = mambapy.pscan.pscan, []
    mambapy.pscan.pscan = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        mambapy.pscan.pscan = original
    return len(calls)


def _mamba_check_paths(models: dict, ids) -> dict[str, int]:
    """Fail unless the mambapy reference runs mambapy's scan in every layer and the sequential one never."""
    calls = {name: _mamba_pscan_calls(models[name], ids) for name in MAMBA_KINDS[1:]}
    want = {"transformers_mambapy": MAMBA_BENCH["num_hidden_layers"], "transformers_sequential": 0}
    if calls != want:
        raise SystemExit(f"mambapy scan calls per forward: {calls}, expected {want}")
    return calls


def _mamba_train_step(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return step


def _mamba_train_memory_probe(kind: str) -> None:
    """Child process: peak RSS added by one training step of ``kind`` (one of MAMBA_KINDS), JSON."""
    model = _mamba_models()[kind].train()
    ids = torch.randint(0, 8192, (8, 256), generator=torch.Generator().manual_seed(0))
    gc.collect()
    if not reset_peak_rss():
        raise SystemExit("peak-RSS reset (/proc/self/clear_refs) is not available here")
    before = _rss_mb()
    _mamba_train_step(model, ids)()
    print(json.dumps({"step_peak_mb": peak_rss_mb() - before, "before_mb": before}))


def _mamba_child(fn: str, *args) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import bench_models; bench_models.{fn}(*{args!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _with_cpu_time(fn: Callable[[], object], sink: list[float]) -> Callable[[], None]:
    """``fn`` that also appends its process CPU time (all threads) to ``sink``."""
    def run():
        start = time.process_time()
        fn()
        sink.append(time.process_time() - start)

    return run


def _mamba_row(title: str, steps: dict, ours: str, ref: str, reps: int, warm: tuple[str, ...],
              unit_work: int = 8 * 256) -> dict:
    """Interleave ``steps`` ``reps`` times each after one untimed run of those in ``warm``.

    Wall times are the measure (``report``); the process CPU times of the same runs are recorded
    beside them (with one thread, steadier than wall time when other jobs share the machine; with
    more, they include OpenMP threads spinning), and the real count of runs per side.
    """
    for name in warm:
        steps[name]()
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    wall = interleaved({name: _with_cpu_time(fn, cpu[name]) for name, fn in steps.items()}, reps=reps, warmup=0)
    row = report(title, wall, ours, ref, unit_work=unit_work, unit="tok")
    row["reps_per_side"] = {name: len(ts) for name, ts in wall.items()}
    row["warm_up_runs"] = {name: int(name in warm) for name in steps}
    row["paired_speedup"] = _paired_ratios(wall, ref)[ours]
    row["cpu_s"] = cpu
    row["cpu_median_s"] = {name: statistics.median(ts) for name, ts in cpu.items()}
    row["cpu_speedup"] = row["cpu_median_s"][ref] / row["cpu_median_s"][ours]
    print(f"  median of paired ratios {row['paired_speedup']:.3f}x; process CPU time "
          + ", ".join(f"{name} {t:.3f} s" for name, t in row["cpu_median_s"].items())
          + f" ({row['cpu_speedup']:.3f}x)", flush=True)
    return row


def _mamba_train(args, info: dict) -> dict:
    """Training step (forward + backward, fp32, B8 T256): lmforge against both transformers paths."""
    models = {name: model.train() for name, model in _mamba_models().items()}
    ids = torch.randint(0, 8192, (8, 256), generator=torch.Generator().manual_seed(0))
    pscan_calls = _mamba_check_paths(models, ids)
    with torch.no_grad():  # the same function before timing it
        want = models["lmforge"](ids, labels=ids).loss
        for name in MAMBA_KINDS[1:]:
            torch.testing.assert_close(models[name](ids, labels=ids).loss, want, atol=1e-4, rtol=0)
    steps = {name: _mamba_train_step(model, ids) for name, model in models.items()}
    fast = _mamba_row("Mamba train step B8 T256, vs transformers + mambapy",
                      {name: steps[name] for name in MAMBA_KINDS[:2]}, "lmforge", "transformers_mambapy",
                      reps=3 if args.quick else 10, warm=MAMBA_KINDS[:2])
    sample_load(info)
    # one thread: no OpenMP fork/join per operation, so this row holds up when other jobs load the machine
    threads = torch.get_num_threads()
    with torch_threads(1):
        fast_1 = _mamba_row("Mamba train step B8 T256, vs transformers + mambapy, 1 thread",
                            {name: steps[name] for name in MAMBA_KINDS[:2]}, "lmforge", "transformers_mambapy",
                            reps=2 if args.quick else 6, warm=MAMBA_KINDS[:2])
    sample_load(info)
    # the sequential path takes close to a minute a step: fewer reps, no warm-up run of it
    slow = _mamba_row("Mamba train step B8 T256, vs transformers sequential",
                      {name: steps[name] for name in MAMBA_KINDS[::2]}, "lmforge", "transformers_sequential",
                      reps=1 if args.quick else 2, warm=())
    sample_load(info)
    peak = {kind: _mamba_child("_mamba_train_memory_probe", kind)["step_peak_mb"] for kind in MAMBA_KINDS}
    print(f"  peak RSS added by one step (MB): {peak}", flush=True)
    return {"threads": threads, "vs_transformers_mambapy": fast, "vs_transformers_mambapy_1_thread": fast_1,
            "vs_transformers_sequential": slow, "step_peak_rss_mb": peak, "pscan_calls_per_forward": pscan_calls}


def _mamba_scan(args) -> dict:
    """The selective scan alone, forward + backward at the train step's size (B8, L256, D512, N16):
    lmforge's ``selective_scan`` vs transformers' ``mamba_selective_scan`` on mambapy's path (both
    from softplus-ed time steps, without the D skip and the gate)."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    from lmforge.models.mamba_scan import selective_scan

    b, length, d, n = 8, 256, 2 * MAMBA_BENCH["hidden_size"], MAMBA_BENCH["state_size"]
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(b, length, d, generator=g), torch.randn(b, length, d, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, length, d, generator=g) - 4.0)
    A = -torch.arange(1.0, n + 1).expand(d, n)  # the S4D-real initialisation
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)

    def ours():
        leaves = [v.clone().requires_grad_() for v in (x, dt, A, B, C)]
        selective_scan(*leaves)[0].backward(gy)

    def theirs():  # transformers' layout: (B, D, L) and (B, N, L)
        leaves = [v.clone().requires_grad_() for v in (x, dt, A, B, C)]
        xt, dtt, a, bt, ct = (v.transpose(1, 2) if v.dim() == 3 else v for v in leaves)
        mamba_selective_scan(xt, dtt, a, bt, ct, use_mambapy=True).transpose(1, 2).backward(gy)

    times = interleaved({"lmforge": ours, "transformers_mambapy": theirs}, reps=3 if args.quick else 9, warmup=1)
    result = report("Mamba selective scan alone, forward + backward", times, "lmforge", "transformers_mambapy")
    result["reps_per_side"] = {name: len(ts) for name, ts in times.items()}
    result["shape_b_l_d_n"] = [b, length, d, n]
    return result


def _mamba_decode_step(model, cache, token):
    def run():
        with torch.no_grad():
            return model(token, cache=cache, use_cache=True).logits

    return run


def _mamba_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (*layer.conv_states.values(), *layer.recurrent_states.values()) if t is not None)


def _decode_latency(args, model, family: str) -> dict:
    """Per-token decode latency of a state-space ``model`` after a 64- vs 4096-token prompt, and its
    state size after each: flat if decoding is O(1) per token."""
    runs, sizes = {}, {}
    for ctx in (64, 4096):
        prompt = torch.randint(1, 8192, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        with torch.no_grad():
            cache = model(prompt, use_cache=True).cache
        sizes[ctx] = _mamba_cache_bytes(cache)
        # each timed call decodes 64 tokens (feeding the same token keeps the state size fixed)
        step = _mamba_decode_step(model, cache, prompt[:, -1:])
        runs[f"ctx{ctx}"] = lambda step=step: [step() for _ in range(64)]
    times = interleaved(runs, reps=5 if args.quick else 21, warmup=1)
    times = {name: [t / 64 for t in ts] for name, ts in times.items()}
    result = report(f"{family} decode latency per token, ctx 64 vs 4096", times, "ctx64", "ctx4096")
    result["ratio_ctx4096_over_ctx64"] = result["speedup"]  # report() divides ref (ctx4096) by ours (ctx64)
    result["cache_bytes"] = sizes
    return result


def _mamba_decode(args) -> dict:
    """Per-token decode latency after a 64- vs 4096-token prompt; state size and RSS along a long decode."""
    ours = _mamba_models()["lmforge"].eval()
    result = _decode_latency(args, ours, "Mamba")
    sizes = result["cache_bytes"]
    # RSS along a 2048-token decode from a 64-token prompt
    prompt = torch.randint(1, 8192, (1, 64), generator=torch.Generator().manual_seed(7))
    samples = []
    with torch.no_grad():
        out = ours(prompt, use_cache=True)
        for i in range(2048):
            out = ours(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
            if (i + 1) % 512 == 0:
                gc.collect()
                samples.append((i + 1, _rss_mb()))
    result["rss_mb_along_decode"] = samples
    print(f"  state bytes after ctx 64 / 4096: {sizes[64]} / {sizes[4096]}; RSS (step, MB) along a 2048-token "
          f"decode: {', '.join(f'{s}:{r:.1f}' for s, r in samples)}", flush=True)
    return result


def _mamba_generate(model, prompt, new_tokens: int):
    def run():
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        assert out.shape[1] == prompt.shape[1] + new_tokens
        return out

    return run


def _mamba_prefill_generate(args) -> dict:
    """Prefill 256 + greedy-generate 256 tokens: lmforge Mamba vs both transformers paths vs lmforge GPT."""
    from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM

    mambas = {name: model.eval() for name, model in _mamba_models().items()}
    torch.manual_seed(0)
    gpt = LmforgeGPTForCausalLM(LmforgeGPTConfig(**MAMBA_GPT_PEER))
    gpt.generation_config.eos_token_id, gpt.generation_config.pad_token_id = None, 0
    models = {**mambas, "lmforge_gpt": gpt.eval()}
    prompt = torch.randint(1, 8192, (1, 256), generator=torch.Generator().manual_seed(3))
    want = _mamba_generate(mambas["lmforge"], prompt, 16)()
    for name in MAMBA_KINDS[1:]:
        assert torch.equal(_mamba_generate(mambas[name], prompt, 16)(), want), name
    gens = {name: _mamba_generate(m, prompt, 256) for name, m in models.items()}
    times = interleaved(gens, reps=3 if args.quick else 7, warmup=1)
    result = report("Prefill 256 + generate 256", times, "lmforge", "transformers_mambapy",
                    unit_work=256, unit="new tok")
    result["reps_per_side"] = {name: len(ts) for name, ts in times.items()}
    med = result["median_s"]
    result["vs_transformers_sequential"] = med["transformers_sequential"] / med["lmforge"]
    result["vs_lmforge_gpt"] = med["lmforge_gpt"] / med["lmforge"]
    result["params"] = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print(f"  lmforge Mamba vs transformers sequential {result['vs_transformers_sequential']:.3f}x, "
          f"vs lmforge GPT ({result['params']}) {result['vs_lmforge_gpt']:.3f}x", flush=True)
    return result


def bench_mamba(args) -> dict:
    """lmforge Mamba vs transformers MambaForCausalLM (mambapy scan, then sequential): train step +
    memory, prefill + generate, the scan alone, and lmforge's decode latency against context length.

    Batch-1 decoding is many tiny ops: it runs single-threaded (on a shared 2-core machine, OpenMP
    threads spinning on tiny ops dominate otherwise); the training step uses the default threads,
    then one thread. The machine, thread counts and the load average seen go into the results.
    """
    info = machine_info()
    with torch_threads(1):
        results = {"config": MAMBA_BENCH, "decode_threads": 1, "prefill_generate_256": _mamba_prefill_generate(args)}
        sample_load(info)
        results["scan_1_thread"] = _mamba_scan(args)
        sample_load(info)
        results["decode"] = _mamba_decode(args)
        sample_load(info)
    results["train_step"] = _mamba_train(args, info)
    results["machine"] = finish(info)
    print(f"  load average (1 min) at start {info['load_average_start'][0]:.2f}, highest seen "
          f"{info['load_average_max_1min']:.2f}, at end {info['load_average_end'][0]:.2f}", flush=True)
    return results


# ----------------------------------------------------------------------------------- Mamba-2

# Mamba-2 at the Mamba-1 benchmark's width, with Mamba-2's usual SSM shape (the 130M model's and
# Mamba2Config's defaults): 8 heads of 64 channels, one B/C group, state 128
MAMBA2_BENCH = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, state_size=128, expand=2, head_dim=64,
                    n_groups=1, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def _mamba2_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """LmforgeMamba2ForCausalLM and transformers' Mamba2ForCausalLM (its torch path: no CUDA kernels
    on a CPU) with the same weights, fp32."""
    from transformers.models.mamba2 import modeling_mamba2

    from lmforge.models import LmforgeMamba2Config, LmforgeMamba2ForCausalLM
    from lmforge.models.convert import to_hf

    if getattr(modeling_mamba2, "is_fast_path_available", False):
        raise SystemExit("bench_models --family mamba2: the reference must run its torch path (no CUDA kernels)")
    torch.manual_seed(seed)
    ours = LmforgeMamba2ForCausalLM(LmforgeMamba2Config(**MAMBA2_BENCH))
    models = {"lmforge": ours, "transformers": to_hf(ours)}
    for model in models.values():
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return models


LINEAR_FLOOR = "linear_layers_alone"


def _linear_layers_step(model: torch.nn.Module, tokens: int) -> Callable[[], None]:
    """Forward and backward (input and weight gradients) of every ``nn.Linear`` of ``model`` alone,
    on random activations of a ``tokens``-token step: matrix products that any implementation of
    the same model does, the same calls in lmforge and transformers. A floor for the step's time."""
    gen = torch.Generator().manual_seed(0)
    work = [(m, torch.randn(tokens, m.in_features, generator=gen, requires_grad=True),
             torch.randn(tokens, m.out_features, generator=gen))
            for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def step():
        for module, x, grad in work:
            weight = module.weight.detach().requires_grad_()
            torch.autograd.grad(torch.nn.functional.linear(x, weight, module.bias), (x, weight), grad)

    return step


def _mamba2_train(args, info: dict) -> dict:
    """Training step (forward + backward, fp32, B8 T256 and B4 T1024) against Mamba2ForCausalLM's torch path."""
    models = {name: model.train() for name, model in _mamba2_models().items()}
    rows = {}
    for batch, length in ((8, 256), (4, 1024)):
        ids = torch.randint(0, 8192, (batch, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():  # the same function before timing it
            want = models["transformers"](ids, labels=ids).loss
            torch.testing.assert_close(models["lmforge"](ids, labels=ids).loss, want, atol=1e-4, rtol=0)
        steps = {name: _mamba_train_step(model, ids) for name, model in models.items()}
        steps[LINEAR_FLOOR] = _linear_layers_step(models["lmforge"], batch * length)
        for threads in (torch.get_num_threads(), 1):
            with torch_threads(threads):
                title = f"Mamba-2 train step B{batch} T{length}, vs transformers torch path, {threads} thread(s)"
                row = _mamba_row(title, steps, "lmforge", "transformers", reps=2 if args.quick else 6,
                                 warm=tuple(steps), unit_work=batch * length)
            med = row["median_s"]
            row["speedup_ceiling"] = med["transformers"] / med[LINEAR_FLOOR]
            print(f"  the linear layers alone take {med[LINEAR_FLOOR]:.3f} s: a step that spent nothing "
                  f"else would be {row['speedup_ceiling']:.2f}x transformers'", flush=True)
            rows[f"B{batch}_T{length}_{threads}_threads"] = row
            sample_load(info)
    return rows


def _mamba2_scan(args, batch: int, length: int) -> dict:
    """The scan alone at the model's shape, forward + backward (one thread): lmforge's ``ssd_scan`` vs
    transformers' ``mamba2_chunk_scan`` at the chunk size its model uses (Mamba2Config's 256)."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    from lmforge.models.ssd_scan import ssd_scan

    h, p, n = 2 * MAMBA2_BENCH["hidden_size"] // MAMBA2_BENCH["head_dim"], MAMBA2_BENCH["head_dim"], MAMBA2_BENCH["state_size"]
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(batch, length, h, p, generator=g), torch.randn(batch, length, h, p, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, h, generator=g) - 4.0)
    A = -torch.rand(h, generator=g) * 15 - 1
    B, C = torch.randn(batch, length, 1, n, generator=g), torch.randn(batch, length, 1, n, generator=g)

    def run(scan):
        def step():
            leaves = [v.clone().requires_grad_() for v in (x, dt, A, B, C)]
            scan(*leaves).backward(gy)
        return step

    times = interleaved({"lmforge": run(lambda *v: ssd_scan(*v)[0]),
                         "transformers": run(lambda *v: mamba2_chunk_scan(*v, chunk_size=256))},
                        reps=3 if args.quick else 9, warmup=1)
    result = report(f"Mamba-2 scan alone B{batch} T{length}, forward + backward", times, "lmforge", "transformers")
    result["reps_per_side"] = {name: len(ts) for name, ts in times.items()}
    result["shape_b_l_h_p_g_n"] = [batch, length, h, p, 1, n]
    return result


def _mamba2_decode(args) -> dict:
    """Per-token decode latency after a 64- vs 4096-token prompt (one thread): flat if O(1) per token."""
    result = _decode_latency(args, _mamba2_models()["lmforge"].eval(), "Mamba-2")
    sizes = result["cache_bytes"]
    print(f"  state bytes after ctx 64 / 4096: {sizes[64]} / {sizes[4096]}", flush=True)
    return result


def _mamba2_prefill_generate(args) -> dict:
    """Prefill 256 + greedy-generate 128 tokens: lmforge against transformers (the same tokens first)."""
    models = {name: model.eval() for name, model in _mamba2_models().items()}
    prompt = torch.randint(1, 8192, (1, 256), generator=torch.Generator().manual_seed(3))
    want = _mamba_generate(models["transformers"], prompt, 16)()
    assert torch.equal(_mamba_generate(models["lmforge"], prompt, 16)(), want)
    gens = {name: _mamba_generate(m, prompt, 128) for name, m in models.items()}
    times = interleaved(gens, reps=3 if args.quick else 7, warmup=1)
    result = report("Mamba-2 prefill 256 + generate 128", times, "lmforge", "transformers",
                    unit_work=128, unit="new tok")
    result["reps_per_side"] = {name: len(ts) for name, ts in times.items()}
    return result


def bench_mamba2(args) -> dict:
    """lmforge Mamba-2 vs transformers Mamba2ForCausalLM's CPU torch path: the training step (default
    threads, then one), prefill + generate and the decode latency against context length (one thread)."""
    info = machine_info()
    results = {"config": MAMBA2_BENCH, "train_step": _mamba2_train(args, info)}
    with torch_threads(1):
        results["decode_threads"] = 1
        results["scan_1_thread"] = {f"B{b}_T{t}": _mamba2_scan(args, b, t) for b, t in ((8, 256), (4, 1024))}
        sample_load(info)
        results["prefill_generate"] = _mamba2_prefill_generate(args)
        sample_load(info)
        results["decode"] = _mamba2_decode(args)
        sample_load(info)
    results["machine"] = finish(info)
    return results


# --------------------------------------------------------------------------------- driver

# family name -> benchmark function returning a JSON-able dict. BERT and Mamba add theirs here.
FAMILIES: dict[str, Callable[[argparse.Namespace], dict]] = {
    "gpt": bench_gpt,
    "bert": bench_bert,
    "mamba": bench_mamba,
    "mamba2": bench_mamba2,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append", help="family to run (repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--gpt-parts", default="", help="GPT: comma list of train,generate,cache,memory (default all)")
    parser.add_argument("--gpt-cache-tokens", type=int, default=1024, help="GPT: new tokens for cache vs no cache")
    parser.add_argument("--_memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_batch", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_probe is not None:
        _gpt_memory_probe(args._memory_probe, args._batch)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of interleaved reps "
          "(the machine may be shared: expect noise)")
    for family in args.family or list(FAMILIES):
        info = machine_info()
        results = FAMILIES[family](args)
        results.setdefault("machine", finish(info))  # Mamba samples the load along the way itself
        write_results(family, results, quick=args.quick)


if __name__ == "__main__":
    main()
