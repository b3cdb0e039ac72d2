"""The Mamba-2 (SSD) scan alone: lmforge's ``ssd_scan`` against transformers' CPU torch scan.

    python benchmarks/bench_ssd_scan.py            # every shape, the torch default threads and 1 thread (~10 min)
    python benchmarks/bench_ssd_scan.py --quick    # smoke run: 2 shapes, 2 timed reps

The reference is transformers' own ``mamba2_chunk_scan`` (models/mamba2/modeling_mamba2.py, the
chunked SSD that ``Mamba2Mixer`` runs on CPU when ``mamba_ssm`` is missing), called with time
steps already softplus-ed, no ``D`` and no bias, so that both sides compute the same function:
y (b, l, h, p) from x, dt, A, B, C. Its chunk size is ``Mamba2Config``'s default (256, what a
stock model runs) and also lmforge's default, so that the ratio is not only the chunk choice.
lmforge's scan runs at chunk sizes 32, 64 and 128 (its default chunk size is chosen from these
figures). Inputs are float32 with Mamba-2's initialisation ranges: A = -(1..h), dt log-uniform in
[1e-3, 1e-1]; B, C, x standard normal. Before timing, each case's y is checked against the
reference (relative to its largest entry, 1e-4).

Each case is timed forward only (under ``torch.no_grad``) and forward + backward (``y.backward``
of a fixed random gradient; the leaves are fresh copies requiring grad), interleaved in one
process (the order alternates every rep; one untimed warm-up round), at torch's default threads
and at 1 thread (steadier when other jobs share the machine). Reported: median and fastest wall
time, and speed-ups: ratio of medians, the median of per-rep ratios (each rep's runs are
adjacent, robust to load drifts) and the ratio of the fastest runs; the JSON also holds each
run's process CPU time. The machine (benchmarks/machine.py), load average and the
scan file's hash are recorded. Writes benchmarks/results/ssd_scan.json and ssd_scan.md
(``--quick``: ssd_scan_quick.*, not committed).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch
from bench_models import interleaved  # beside this file
from machine import (  # benchmarks/machine.py, beside this file
    finish,
    machine_info,
    sample_load,
    write_results,
)

from lmforge.models.ssd_scan import DEFAULT_CHUNK_SIZE, ssd_scan

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCAN_FILE = ROOT / "src" / "lmforge" / "models" / "ssd_scan.py"
# (b, l, h, p, g, n)
SHAPES = [(4, 256, 8, 64, 1, 128), (4, 512, 8, 64, 1, 128), (4, 1024, 8, 64, 1, 128),
          (4, 256, 8, 32, 1, 64), (4, 1024, 8, 32, 1, 64), (4, 1024, 8, 64, 1, 64), (4, 512, 8, 64, 4, 128)]
QUICK_SHAPES = [(4, 256, 8, 64, 1, 128), (4, 512, 8, 32, 1, 64)]
OURS_CHUNKS = (32, 64, 128)
HF_DEFAULT_CHUNK = 256  # Mamba2Config.chunk_size


def make_inputs(b: int, length: int, h: int, p: int, g: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    log_dt = torch.rand(b, length, h, generator=gen) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3)
    return {"x": torch.randn(b, length, h, p, generator=gen), "dt": log_dt.exp(), "A": -torch.arange(1.0, h + 1),
            "B": torch.randn(b, length, g, n, generator=gen), "C": torch.randn(b, length, g, n, generator=gen),
            "gy": torch.randn(b, length, h, p, generator=gen)}


def _ours(chunk: int):
    return lambda x, dt, A, B, C: ssd_scan(x, dt, A, B, C, chunk_size=chunk)[0]


def _transformers(chunk: int):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    return lambda x, dt, A, B, C: mamba2_chunk_scan(x, dt, A, B, C, chunk_size=chunk)


def _forward(fn, inputs):
    def run():
        with torch.no_grad():
            fn(*(inputs[k] for k in "x dt A B C".split()))

    return run


def _forward_backward(fn, inputs):
    def run():
        leaves = [inputs[k].clone().requires_grad_() for k in "x dt A B C".split()]
        fn(*leaves).backward(inputs["gy"])

    return run


def _timed(fns: dict, reps: int, refs: list[str]) -> dict:
    """``interleaved`` wall times of ``fns`` plus each run's process CPU time (all threads)."""
    cpu: dict[str, list[float]] = {name: [] for name in fns}

    def with_cpu(name, fn):
        def run():
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)

        return run

    out = _summary(interleaved({name: with_cpu(name, fn) for name, fn in fns.items()}, reps=reps), refs)
    out["cpu_s"] = {name: ts[1:] for name, ts in cpu.items()}  # without the warm-up run
    out["cpu_median_s"] = {name: statistics.median(ts[1:]) for name, ts in cpu.items()}
    return out


def _summary(times: dict[str, list[float]], refs: list[str]) -> dict:
    """Medians, fastest, and for every case its speed-up over each reference (ratio of medians,
    median of per-rep ratios, ratio of the fastest runs)."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    fastest = {name: min(ts) for name, ts in times.items()}
    out = {"median_s": med, "min_s": fastest, "reps": len(next(iter(times.values()))),
           "all_s": times, "speedup": {}, "paired_speedup": {}, "fastest_speedup": {}}
    for ref in refs:
        out["speedup"][ref] = {name: med[ref] / med[name] for name in times}
        out["paired_speedup"][ref] = {name: statistics.median(r / t for r, t in zip(times[ref], ts, strict=True))
                                      for name, ts in times.items()}
        out["fastest_speedup"][ref] = {name: fastest[ref] / fastest[name] for name in times}
    return out


def bench_shape(shape: tuple[int, ...], reps: int, info: dict) -> dict:
    b, length, h, p, g, n = shape
    inputs = make_inputs(*shape)
    hf_chunks = sorted({HF_DEFAULT_CHUNK, DEFAULT_CHUNK_SIZE})
    fns = {f"transformers_chunk{c}": _transformers(c) for c in hf_chunks}
    fns |= {f"lmforge_chunk{c}": _ours(c) for c in OURS_CHUNKS}
    args = [inputs[k] for k in "x dt A B C".split()]
    with torch.no_grad():  # the same function before timing it
        want = fns[f"transformers_chunk{HF_DEFAULT_CHUNK}"](*args)
        errors = {name: ((fn(*args) - want).abs().max() / want.abs().max()).item() for name, fn in fns.items()}
    if max(errors.values()) > 1e-4:
        raise SystemExit(f"shape {shape}: outputs differ from transformers' (max |diff| / max |y|): {errors}")
    refs = [f"transformers_chunk{c}" for c in hf_chunks]
    fwd = _timed({name: _forward(fn, inputs) for name, fn in fns.items()}, reps, refs)
    sample_load(info)
    fwd_bwd = _timed({name: _forward_backward(fn, inputs) for name, fn in fns.items()}, reps, refs)
    sample_load(info)
    ref = f"transformers_chunk{HF_DEFAULT_CHUNK}"
    print(f"  b{b} l{length} h{h} p{p} g{g} n{n}: " + ", ".join(
        f"{name} {fwd['median_s'][name] * 1e3:.1f} / {fwd_bwd['median_s'][name] * 1e3:.1f} ms "
        f"({fwd['speedup'][ref][name]:.2f}x / {fwd_bwd['speedup'][ref][name]:.2f}x)" for name in fns), flush=True)
    return {"shape": dict(zip("b l h p g n".split(), shape, strict=True)), "max_rel_diff_vs_transformers": errors,
            "forward": fwd, "forward_backward": fwd_bwd}


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "src")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_source": status.splitlines() if status else [],
            "ssd_scan_py_sha256": hashlib.sha256(SCAN_FILE.read_bytes()).hexdigest()}


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict) -> str:
    machine = results["machine"]
    ref, same = f"transformers_chunk{HF_DEFAULT_CHUNK}", f"transformers_chunk{results['default_chunk']}"
    lines = [f"# Mamba-2 SSD scan{' (--quick: smoke run, not a measurement)' if results['quick'] else ''}", "",
             f"Written by `benchmarks/bench_ssd_scan.py` (see its docstring); figures from `{results['json']}`.", "",
             f"{machine['date']}, {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['versions']['torch']}, "
             f"transformers {machine['versions']['transformers']}; load average (1 min) "
             f"{machine['load_average_start'][0]:.2f} at start, {machine['load_average_max_1min']:.2f} highest, "
             f"{machine['load_average_end'][0]:.2f} at end; lmforge {(results['git']['commit'] or '?')[:7]}"
             f"{' + uncommitted changes' if results['git']['uncommitted_source'] else ''}.", "",
             "lmforge `ssd_scan` against transformers' `mamba2_chunk_scan` (its CPU torch path), float32, same "
             "inputs and outputs. Times: median of interleaved reps, milliseconds. Speed-up: median time of "
             f"`{ref}` (a stock `Mamba2Config`'s chunk size) or of `{same}` (lmforge's default chunk size) "
             "over the case's; in brackets the median of per-rep ratios. With 2 threads on a machine that other "
             "jobs load (see the load average), a run's time is dominated by waiting for descheduled threads at "
             "every operation's barrier: the 1-thread figures are the measure of the computation.", "",
             f"## Summary: lmforge's default chunk size ({results['default_chunk']}) against transformers", ""]
    ours = f"lmforge_chunk{results['default_chunk']}"
    rows = []
    for run in results["runs"]:
        for case in run["shapes"]:
            s = case["shape"]
            best = min(results["ours_chunks"], key=lambda c: case["forward_backward"]["median_s"][f"lmforge_chunk{c}"])
            cells = [str(run["threads"]), f"{s['b']}, {s['l']}, {s['h']}, {s['p']}, {s['g']}, {s['n']}"]
            for part in ("forward", "forward_backward"):
                r = case[part]
                cells += [f"{r['median_s'][ours] * 1e3:.1f}"]
                cells += [f"{r['speedup'][key][ours]:.2f}x ({r['paired_speedup'][key][ours]:.2f}x)" for key in (ref, same)]
            rows.append(cells + [str(best)])
    lines += _table(["threads", "b, l, h, p, g, n", "fwd ms", f"fwd vs {ref}", f"fwd vs {same}", "fwd+bwd ms",
                     f"fwd+bwd vs {ref}", f"fwd+bwd vs {same}", "fastest lmforge chunk (fwd+bwd)"], rows) + [""]
    for run in results["runs"]:
        lines += [f"## {run['threads']} thread{'s' if run['threads'] > 1 else ''}", ""]
        for case in run["shapes"]:
            s = case["shape"]
            lines += [f"### b {s['b']}, l {s['l']}, h {s['h']}, p {s['p']}, g {s['g']}, n {s['n']} "
                      f"({case['forward']['reps']} reps)", ""]
            rows = []
            for name in case["forward"]["median_s"]:
                cells = [name]
                for part in ("forward", "forward_backward"):
                    r = case[part]
                    cells += [f"{r['median_s'][name] * 1e3:.1f}"]
                    cells += [f"{r['speedup'][key][name]:.2f}x ({r['paired_speedup'][key][name]:.2f}x)" for key in (ref, same)]
                rows.append(cells)
            lines += _table(["case", "fwd ms", f"fwd vs {ref}", f"fwd vs {same}", "fwd+bwd ms",
                             f"fwd+bwd vs {ref}", f"fwd+bwd vs {same}"], rows) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, 2 timed reps")
    parser.add_argument("--reps", type=int, default=None, help="timed reps per case (default 7; --quick 2)")
    args = parser.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()  # the "falling back to torch" notice, once per call site
    reps = args.reps or (2 if args.quick else 7)
    name = "ssd_scan_quick" if args.quick else "ssd_scan"
    info = machine_info()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {default_threads} threads, {info['cpu']}; load average "
          f"{info['load_average_start'][0]:.2f}; ms forward / forward+backward (speed-up vs transformers, "
          f"chunk {HF_DEFAULT_CHUNK})", flush=True)
    runs = []
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        print(f"{threads} thread(s):", flush=True)
        runs.append({"threads": threads,
                     "shapes": [bench_shape(shape, reps, info) for shape in (QUICK_SHAPES if args.quick else SHAPES)]})
    torch.set_num_threads(default_threads)
    results = {"quick": args.quick, "json": f"benchmarks/results/{name}.json",
               "command": "python benchmarks/bench_ssd_scan.py" + (" --quick" if args.quick else "")
               + (f" --reps {args.reps}" if args.reps else ""),
               "ours_chunks": list(OURS_CHUNKS), "default_chunk": DEFAULT_CHUNK_SIZE,
               "transformers_default_chunk": HF_DEFAULT_CHUNK,
               "git": git_state(), "runs": runs, "machine": finish(info)}
    write_results(RESULTS, name, results, markdown(results))


if __name__ == "__main__":
    main()
