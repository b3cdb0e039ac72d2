"""Cost of lmforge's mixture-of-experts layer (forward + backward) against dense MLPs and Mixtral's.

    python benchmarks/bench_moe.py --threads 1   # every size, 7 interleaved repetitions
    python benchmarks/bench_moe.py --quick       # smallest size, 3 repetitions (smoke run)

On a machine other jobs are using, run one thread: with two threads under contention the MoE's
many small kernels wait on OpenMP barriers, and its repetitions varied several-fold.

At each size (N tokens, width D; E = 8 experts, k = 2 per token, expert width F = D) one
forward + backward of, on the same input and output gradient:

    moe             lmforge ``feed_forward.MoE`` (softmax top-2 router, tokens sorted by expert,
                    one matmul per active expert)
    dense_active    a SwiGLU MLP of width k F: the same active parameters per token (a perfect
                    dispatch costs this plus the router)
    dense_total     a SwiGLU MLP of width E F: the same total parameters
    mixtral_grouped transformers' ``MixtralSparseMoeBlock`` with the same weights, its default
                    experts implementation (``grouped_mm``); ``mixtral_eager``: its per-expert loop

and, at the middle size, ``moe_shared`` (k routed experts + one shared expert of width F) against
``dense_active_shared`` (width (k + 1) F). The router is freshly initialised, so the load is close
to balanced (the best case; the results list the tokens each expert got). Ratios are of medians:
time / moe's, and moe's time / dense_active's (the price of routing and dispatch). The
interleaving alternates the order every repetition. Writes benchmarks/results/moe_cost.json and
moe_cost.md (``--quick``: moe_cost_quick.*).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from bench_models import interleaved  # beside this file
from machine import (  # benchmarks/machine.py, beside this file
    finish,
    machine_info,
    sample_load,
    write_results,
)

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [(2048, 256), (4096, 384), (8192, 512)]  # (tokens, hidden size)
EXPERTS, TOP_K = 8, 2


def _config(d: int, f: int, **moe):
    from lmforge.models import LmforgeGPTConfig

    return LmforgeGPTConfig(vocab_size=16, hidden_size=d, intermediate_size=f, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=4, **moe)


def _normal_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module


def _layers(d: int, shared: bool) -> dict[str, torch.nn.Module]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from lmforge.models.feed_forward import MLP, MoE

    f = d
    layers = {}
    torch.manual_seed(0)
    moe = _normal_(MoE(_config(d, f, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                               num_shared_experts=int(shared))))
    if shared:
        layers["moe_shared"] = moe
        layers["dense_active_shared"] = _normal_(MLP(_config(d, (TOP_K + 1) * f)))
        return layers
    layers["moe"] = moe
    layers["dense_active"] = _normal_(MLP(_config(d, TOP_K * f)))
    layers["dense_total"] = _normal_(MLP(_config(d, EXPERTS * f)))
    for impl in ("grouped_mm", "eager"):
        config = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=EXPERTS,
                               num_experts_per_tok=TOP_K)
        config._experts_implementation = impl
        block = MixtralSparseMoeBlock(config)
        block.load_state_dict(moe.state_dict(), strict=True)  # gate.weight, experts.gate_up_proj / down_proj
        layers[f"mixtral_{impl.split('_')[0]}"] = block
    return layers


def _step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run():
        layer.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True)
        layer(inp).backward(grad)

    return run


def bench_size(tokens: int, d: int, shared: bool, reps: int, info: dict) -> dict:
    layers = _layers(d, shared)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, d, generator=g)
    grad = torch.randn(1, tokens, d, generator=g)
    ours = "moe_shared" if shared else "moe"
    with torch.no_grad():
        if not shared:  # the same weights give Mixtral's output
            for name in ("mixtral_grouped", "mixtral_eager"):
                diff = float((layers[name](x) - layers["moe"](x)).abs().max())
                assert diff < 1e-5, f"{name} differs from lmforge's MoE by {diff}"
        _, _, picks = layers[ours].gate(x[0])
        load = torch.bincount(picks.reshape(-1), minlength=EXPERTS).tolist()
    times = interleaved({name: _step(layer, x, grad) for name, layer in layers.items()}, reps)
    sample_load(info)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    dense = "dense_active_shared" if shared else "dense_active"
    row = {
        "tokens": tokens, "hidden_size": d, "expert_width": d, "experts": EXPERTS, "top_k": TOP_K,
        "shared_experts": int(shared), "load_per_expert": load, "reps": reps, "median_s": med, "all_s": times,
        "time_over_moe": {name: med[name] / med[ours] for name in med},
        "moe_over_dense_active": med[ours] / med[dense],
    }
    if not shared:
        row["moe_over_dense_total"] = med[ours] / med["dense_total"]
    shown = ", ".join(f"{name} {med[name] * 1e3:.1f} ms" for name in med)
    print(f"N {tokens}, D {d}{' + shared' if shared else ''}: {shown} | moe / dense_active "
          f"{row['moe_over_dense_active']:.2f}" + (f", moe / dense_total {row['moe_over_dense_total']:.2f}"
                                                   if not shared else ""), flush=True)
    return row


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# MoE layer cost", "",
        "Written by `benchmarks/bench_moe.py` (see its docstring); figures from "
        f"`{results['json']}`.", "",
        f"{m['date']}, {m['cpu']}, {m['cpus']} CPUs, torch {m['versions']['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['versions']['transformers']}; load average (1 min) {m['load_average_start'][0]:.2f} at "
        f"start, {m['load_average_max_1min']:.2f} highest, {m['load_average_end'][0]:.2f} at end.", "",
        f"One forward + backward of one layer, fp32, median of interleaved repetitions; E = {EXPERTS} experts, "
        f"k = {TOP_K}, expert width F = D. dense_active: SwiGLU MLP of width kF (the MoE's active parameters); "
        "dense_total: width EF (its total parameters); mixtral_*: transformers' MixtralSparseMoeBlock, same "
        "weights. x / moe: a case's time over the MoE's.", "",
        "| tokens | D | case | ms | x / moe |", "|---:|---:|---|---:|---:|",
    ]
    for row in results["rows"]:
        for name, s in row["median_s"].items():
            lines.append(f"| {row['tokens']} | {row['hidden_size']} | {name} | {s * 1e3:.1f} | "
                         f"{row['time_over_moe'][name]:.2f} |")
    lines += ["", "| tokens | D | shared | moe / dense_active | moe / dense_total | routed tokens per expert |",
              "|---:|---:|---:|---:|---:|---|"]
    for row in results["rows"]:
        total = f"{row['moe_over_dense_total']:.2f}" if "moe_over_dense_total" in row else "-"
        lines.append(f"| {row['tokens']} | {row['hidden_size']} | {row['shared_experts']} | "
                     f"{row['moe_over_dense_active']:.2f} | {total} | {row['load_per_expert']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest size, 3 repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    sizes = SIZES[:1] if args.quick else SIZES
    name = "moe_cost_quick" if args.quick else "moe_cost"
    info = machine_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {info['cpu']}; load average "
          f"{info['load_average_start'][0]:.2f}", flush=True)
    rows = [bench_size(tokens, d, False, reps, info) for tokens, d in sizes]
    middle = sizes[len(sizes) // 2]
    rows.append(bench_size(*middle, True, reps, info))
    results = {"quick": args.quick, "json": f"benchmarks/results/{name}.json", "rows": rows, "machine": finish(info)}
    write_results(RESULTS, name, results, markdown(results))


if __name__ == "__main__":
    main()
