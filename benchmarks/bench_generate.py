"""Decoding speed and quality: lmforge's decode path (``lmforge.inference.decoding``) against
transformers' ``generate()`` on the same weights.

    python benchmarks/bench_generate.py                       # everything (about 15 min on a quiet 2-core machine)
    python benchmarks/bench_generate.py --quick               # smoke run: 64 new tokens, 2 timed reps
    python benchmarks/bench_generate.py --parts gpt --sizes 25M   # a subset (parts: bandwidth, gpt, quality, mamba)

Parts:

- ``bandwidth``: the machine's memory bandwidth (``sum``, ``amax``, ``dot`` and ``copy_`` over 512 MiB
  tensors, best of several), measured at the start and again at the end (other jobs' memory traffic
  changes it); weight bandwidths are compared with the better of the two.
- ``gpt``: greedy decoding of 256 new tokens (``--quick``: 64) by two random-init lmforge GPT sizes,
  "quickstart" (the quickstart model's shape, ~0.9M parameters, but 512 positions instead of the
  preset's 256, so that 17 + 256 tokens fit) and "25M", at batch 1 (a 17-token
  prompt) and batch 8 (8 prompts of 5..17 tokens, left-padded; the first is batch 1's). Cases, timed
  interleaved in one process (the order alternates every rep; medians; the first call of each case is
  an untimed warm-up that also compiles, recorded as ``first_call_s``):
    hf_dynamic                  LlamaForCausalLM.generate (dynamic cache): the reference
    hf_static                   generate(cache_implementation="static")
    hf_static_compiled          the same with a CompileConfig that may compile on CPU (``generate``
                                compiles only on GPUs by itself; ``_compile_all_devices`` lifts that)
    hf_static_compiled_forward  the same with ``model.forward = torch.compile(model.forward)`` instead
    lmforge_eager               StaticGPTDecoder, float32, eager
    lmforge_compiled            StaticGPTDecoder, float32, compiled
    lmforge_int8_compiled       StaticGPTDecoder, int8 weight-only, compiled
    lmforge_bf16_compiled       StaticGPTDecoder on a bfloat16 copy of the model, compiled
  The lmforge cases run their own greedy loop (argmax of the logits, as the engine does). Each case
  records the tokens/s (new tokens of all rows per second; a run includes the prompt's forward),
  its speed against hf_dynamic, whether its tokens equal hf_dynamic's (float cases must: the script
  exits with status 1 otherwise, after writing the results) or the share that do (int8, bfloat16),
  and the weight bytes one step reads (every linear weight, LM head included, in its dtype; int8:
  1 byte + the per-channel scales) times steps/s: the effective weight bandwidth, against the
  measured one. At the quickstart size the weights (3.6 MB) fit in the CPU's caches, so that
  figure can exceed the memory bandwidth.
- ``quality``: held-out perplexity of the trained quickstart model (``--trained``, default
  runs/bench_quickstart/model/final) in float32, int8 weights (``decode_copy(model, "int8")``) and
  bfloat16, on the first 50k tokens (``--quick``: 10k) of the Shakespeare test split, in windows of
  the run's training rows and of the model's context (``evaluate_lm_strided``, as ``lmforge eval``).
- ``mamba``: random-init lmforge Mamba (hidden 256, 4 layers, vocab 2048), the same prompts and
  tokens: MambaForCausalLM.generate with mambapy (the reference, via ``to_hf``; mambapy's scan
  only runs the prompt), the lmforge model's own ``generate``, MambaDecoder eager and compiled.

Compiled steps are compiled in a fresh inductor cache directory (deleted at the end), so the
first compile of the run is a cold one (later ones reuse kernels the process already built, and its
compile workers); ``--warm-compile-cache`` uses torch's default cache instead. Dynamo's caches are
reset before every group, so no group runs into its recompile limit.
Writes benchmarks/results/bench_generate.json and the Markdown table bench_generate.md
(``--quick``: bench_generate_quick.json / .md). The machine, threads and load average seen
(sampled every rep) are recorded with the figures.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import finish, machine_info, sample_load  # benchmarks/machine.py, beside this file
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
TRAINED = Path(__file__).resolve().parent.parent / "runs" / "bench_quickstart" / "model" / "final"
PARTS = ("bandwidth", "gpt", "quality", "mamba")

GPT_STYLE = dict(hidden_act="swiglu", position_embedding_type="rope", norm_type="rmsnorm", norm_position="pre",
                 tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_dropout=0.0,
                 attention_dropout=0.0, max_position_embeddings=512, pad_token_id=0, bos_token_id=None,
                 eos_token_id=None)
GPT_SIZES = {
    "quickstart": dict(vocab_size=2048, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=384, **GPT_STYLE),
    "25M": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=7, num_attention_heads=8,
                num_key_value_heads=4, intermediate_size=1408, **GPT_STYLE),
}
MAMBA = dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, state_size=16, expand=2, pad_token_id=0,
             bos_token_id=None, eos_token_id=None)
# prompt lengths per batch size; row 0 of batch 8 is batch 1's prompt
PROMPT_LENGTHS = {1: [17], 8: [17, 9, 14, 5, 12, 16, 7, 11]}
REFERENCE = "hf_dynamic"
MUST_MATCH = ("hf_static", "lmforge_eager", "lmforge_compiled")  # float32 cases whose tokens must equal the reference


# --------------------------------------------------------------------------- shared helpers


def prompts(vocab: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (pad id 0) of ``PROMPT_LENGTHS[batch]``: input_ids, attention_mask (B, T)."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, vocab, (n,), generator=g) for n in PROMPT_LENGTHS[8]]
    lengths = PROMPT_LENGTHS[batch]
    longest = max(lengths)
    ids = torch.zeros((batch, longest), dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, longest - n:] = rows[i][:n]
        mask[i, longest - n:] = 1
    return ids, mask


def greedy(decoder, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The engine's loop, greedy: ``new_tokens`` tokens per row (B, new_tokens)."""
    with torch.inference_mode():
        logits = decoder.start(ids, mask, new_tokens)
        out = []
        for i in range(new_tokens):
            token = logits.argmax(-1)
            out.append(token)
            if i < new_tokens - 1:
                logits = decoder.step(token)
    return torch.stack(out, dim=1)


def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """``model.generate``, greedy, exactly ``new_tokens`` new tokens per row (B, new_tokens)."""
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs)
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return out[:, ids.shape[1]:]


def no_eos(model: nn.Module) -> nn.Module:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's weight (nn.Linear or DecodeLinear; int8 scales included),
    each tensor counted once (a tied LM head is the embedding, read as the head)."""
    from lmforge.inference.decoding import DecodeLinear

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, DecodeLinear)):
            for t in (module.weight, getattr(module, "scale", None)):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def token_agreement(tokens: torch.Tensor, ref: torch.Tensor) -> dict:
    """Whether ``tokens`` equal ``ref`` (B, N), the share of positions that do, and the first step
    where some row differs (None: none)."""
    same = tokens == ref
    differs = (~same).any(dim=0).nonzero()
    return {"identical_tokens": bool(same.all()), "token_match_share": same.float().mean().item(),
            "first_divergence_step": int(differs[0]) if len(differs) else None}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_cases(title: str, cases: dict[str, Callable[[], torch.Tensor]], reps: int, info: dict,
              ref: str) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """One untimed warm-up call per case (it compiles; its time is kept as ``first_call_s``),
    then ``reps`` timed calls of every case, interleaved, the order alternating every rep.
    Returns per case the times, their median, the median of the per-rep ratios ref/case, and the
    tokens of the warm-up call."""
    tokens, stats = {}, {}
    for name, fn in cases.items():
        seconds, tokens[name] = timed(fn)
        stats[name] = {"first_call_s": seconds, "all_s": []}
        print(f"  [{title}] warm-up {name}: {seconds:.2f} s", flush=True)
        sample_load(info)
    names = list(cases)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            stats[name]["all_s"].append(timed(cases[name])[0])
        sample_load(info)
        print(f"  [{title}] rep {rep + 1}/{reps}: " + ", ".join(f"{n} {stats[n]['all_s'][-1]:.2f}" for n in names)
              + f" s (load {os.getloadavg()[0]:.2f})", flush=True)
    for s in stats.values():
        s["median_s"] = statistics.median(s["all_s"])
        s["paired_speedup_vs_ref"] = statistics.median(
            r / t for r, t in zip(stats[ref]["all_s"], s["all_s"], strict=True))
        s["speedup_vs_ref"] = stats[ref]["median_s"] / s["median_s"]
    return stats, tokens


def summarize(stats: dict[str, dict], tokens: dict[str, torch.Tensor], ref: str, batch: int, new_tokens: int,
              weight_bytes: dict[str, int], compiled: set[str]) -> dict[str, dict]:
    """Per case: speed, token agreement with ``ref``, warm-up/compile time and weight bandwidth."""
    rows = {}
    for name, s in stats.items():
        med = s["median_s"]
        # the fastest rep beside the median: on a shared machine, bursts of contention slow single reps
        row = {"tokens_per_s": batch * new_tokens / med, "steps_per_s": new_tokens / med,
               "tokens_per_s_best": batch * new_tokens / min(s["all_s"]), **s,
               **token_agreement(tokens[name], tokens[ref]), "compiled": name in compiled}
        if name in compiled:  # the warm-up call minus a timed one: the compile's cost
            row["compile_s"] = s["first_call_s"] - med
        if name in weight_bytes:
            row["weight_bytes_per_step"] = weight_bytes[name]
            row["weight_gb_s"] = weight_bytes[name] * new_tokens / med / 1e9
        rows[name] = row
    return rows


def print_rows(title: str, rows: dict[str, dict]) -> None:
    print(f"{title}:", flush=True)
    for name, r in rows.items():
        agree = ("identical tokens" if r["identical_tokens"] else
                 f"tokens equal {r['token_match_share']:.1%} (first difference at step {r['first_divergence_step']})")
        extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
        if "weight_gb_s" in r:
            extra += f", weights {r['weight_bytes_per_step'] / 1e6:.1f} MB/step -> {r['weight_gb_s']:.1f} GB/s"
        print(f"  {name:28s} {r['tokens_per_s']:8.1f} tok/s (best {r['tokens_per_s_best']:8.1f})  "
              f"{r['speedup_vs_ref']:5.2f}x  {agree}{extra}",
              flush=True)


# --------------------------------------------------------------------------- memory bandwidth


def bench_bandwidth(args, info: dict) -> dict:
    """The machine's memory bandwidth with torch's threads, best of ``reps`` per kernel over 512 MiB
    float32 tensors: reads (``sum``, ``amax``, ``dot`` of two tensors) and ``copy_`` (counted as
    read + write bytes, as STREAM does). ``read_gb_s`` is the best read kernel's figure."""
    mib, reps = 512, 5 if args.quick else 15
    n = mib * 2**20 // 4
    x = torch.rand(n)
    y = torch.empty_like(x)
    y.copy_(x)  # touch every page
    kernels = {"sum": (lambda: x.sum(), 4 * n), "amax": (lambda: x.amax(), 4 * n),
               "dot": (lambda: torch.dot(x, y), 8 * n), "copy": (lambda: y.copy_(x), 8 * n)}
    seconds: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(reps):
        for name, (fn, _) in kernels.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    sample_load(info)
    best = {name: nbytes / min(seconds[name]) / 1e9 for name, (_, nbytes) in kernels.items()}
    median = {name: nbytes / statistics.median(seconds[name]) / 1e9 for name, (_, nbytes) in kernels.items()}
    result = {"tensor_mib": mib, "reps": reps, "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
              "read_gb_s": max(best["sum"], best["amax"], best["dot"]), "copy_gb_s": best["copy"],
              "best_gb_s": best, "median_gb_s": median}
    print(f"memory bandwidth ({mib} MiB tensors, best of {reps}, {result['threads']} threads, load "
          f"{result['load_average_1min']:.2f}): " + ", ".join(f"{k} {v:.1f}" for k, v in best.items())
          + " GB/s (copy: read + write)", flush=True)
    return result


# --------------------------------------------------------------------------- GPT


def hf_compile_config():
    """transformers' default CompileConfig, allowed on CPU (``generate`` compiles the decoding
    forward only on accelerators unless ``_compile_all_devices`` is set)."""
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True
    return config


def gpt_model(size: str) -> nn.Module:
    from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM

    torch.manual_seed(0)
    return no_eos(LmforgeGPTForCausalLM(LmforgeGPTConfig(**GPT_SIZES[size])))


def gpt_group(size: str, batch: int, args, info: dict) -> dict:
    """Every GPT case at one size and batch size (see the module docstring)."""
    from lmforge.inference.decoding import StaticGPTDecoder
    from lmforge.models.convert import to_hf

    torch._dynamo.reset()  # each group compiles afresh, well under dynamo's recompile limit
    ours = gpt_model(size)
    llama = no_eos(to_hf(ours))
    llama_forward = no_eos(to_hf(ours))  # a separate model: its forward is replaced by a compiled one
    llama_forward.forward = torch.compile(llama_forward.forward, fullgraph=True, dynamic=False)
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    decoders = {"lmforge_eager": StaticGPTDecoder(ours),
                "lmforge_compiled": StaticGPTDecoder(ours, compile=True),
                "lmforge_int8_compiled": StaticGPTDecoder(ours, weights="int8", compile=True),
                "lmforge_bf16_compiled": StaticGPTDecoder(bf16, compile=True)}
    ids, mask = prompts(ours.config.vocab_size, batch)
    n = args.new_tokens
    compile_config = hf_compile_config()
    cases = {
        "hf_dynamic": lambda: hf_generate(llama, ids, mask, n),
        "hf_static": lambda: hf_generate(llama, ids, mask, n, cache_implementation="static"),
        "hf_static_compiled": lambda: hf_generate(llama, ids, mask, n, cache_implementation="static",
                                                  compile_config=compile_config),
        "hf_static_compiled_forward": lambda: hf_generate(llama_forward, ids, mask, n, cache_implementation="static"),
        **{name: (lambda d=d: greedy(d, ids, mask, n)) for name, d in decoders.items()},
    }
    title = f"GPT {size} B{batch}"
    stats, tokens = run_cases(title, cases, args.reps, info, REFERENCE)
    hf_bytes = linear_weight_bytes(llama)
    weight_bytes = {name: hf_bytes for name in cases if name.startswith("hf_")}
    weight_bytes.update({name: linear_weight_bytes(d.model) for name, d in decoders.items()})
    compiled = {name for name in cases if "compiled" in name}
    rows = summarize(stats, tokens, REFERENCE, batch, n, weight_bytes, compiled)
    fell_back = [name for name, d in decoders.items() if d.compile and d._run.compiled is None]
    if fell_back:
        print(f"  WARNING: {fell_back} fell back to eager (torch.compile failed)", flush=True)
    for name in fell_back:
        rows[name]["compile_failed_fell_back_to_eager"] = True
    print_rows(f"{title}, {n} new tokens, median of {args.reps}", rows)
    # generate() built its compiled forward (else hf_static_compiled ran eagerly)
    rows["hf_static_compiled"]["compiled_call_built"] = hasattr(llama, "_compiled_call")
    return {"batch": batch, "prompt_lengths": PROMPT_LENGTHS[batch], "new_tokens": n, "reps": args.reps,
            "cases": rows}


def bench_gpt(args, info: dict) -> dict:
    results = {"reference": REFERENCE, "hf_compile_config": {**hf_compile_config().to_dict(),
                                                            "_compile_all_devices": True}}
    for size in args.sizes:
        model = gpt_model(size)
        params = sum(p.numel() for p in model.parameters())
        print(f"GPT {size}: {params / 1e6:.2f}M parameters ({params * 4 / 1e6:.1f} MB fp32), "
              f"linear weights {linear_weight_bytes(model) / 1e6:.1f} MB", flush=True)
        results[size] = {"config": GPT_SIZES[size], "parameters": params}
        del model
        for batch in (1, 8):
            results[size][f"batch_{batch}"] = gpt_group(size, batch, args, info)
            gc.collect()
    return results


# --------------------------------------------------------------------------- quality


def first_tokens(tokenizer, texts: list[str], limit: int) -> list[str]:
    """The texts cut after their first ``limit`` tokens in all (at a token boundary)."""
    out, left = [], limit
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= left:
            out.append(text)
            left -= len(enc["input_ids"])
        else:
            out.append(text[:enc["offset_mapping"][left - 1][1]])
            left = 0
        if left <= 0:
            break
    return out


def bench_quality(args) -> dict:
    """Held-out perplexity of the trained quickstart model: float32 vs int8 weights vs bfloat16."""
    from lmforge.data.sources import load_corpus
    from lmforge.eval.lm import evaluate_lm_strided, model_context
    from lmforge.eval.model import run_window
    from lmforge.inference.decoding import decode_copy
    from lmforge.runs import load_model

    if not (args.trained / "config.json").is_file():
        print(f"quality: SKIPPED, no trained model at {args.trained} (train one with `lmforge quickstart` and "
              "pass its model/final folder as --trained)", flush=True)
        return {"skipped": f"no trained model at {args.trained}"}
    loaded = load_model(args.trained)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    texts = [t for t in load_corpus("shakespeare", "test")["text"] if t and t.strip()]
    texts = first_tokens(tokenizer, texts, args.quality_tokens)
    variants = {"float32": model, "int8": decode_copy(model, "int8"),
                "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    windows = {"run": run_window(loaded.folder), "context": model_context(model, tokenizer)}
    results = {"model": str(args.trained), "parameters": sum(p.numel() for p in model.parameters()),
               "data": "shakespeare test split, first tokens", "token_limit": args.quality_tokens, "windows": {}}
    for window, length in windows.items():
        if length is None:
            continue
        figures = {}
        for name, m in variants.items():
            start = time.perf_counter()
            with torch.inference_mode():
                figures[name] = evaluate_lm_strided(m, tokenizer, texts, max_length=length, progress=False)
            figures[name]["seconds"] = time.perf_counter() - start
        base = figures["float32"]["perplexity"]
        for name in ("int8", "bfloat16"):
            figures[name]["perplexity_change"] = figures[name]["perplexity"] / base - 1
        results["windows"][window] = {"max_length": length, "figures": figures}
        print(f"perplexity, {figures['float32']['tokens']} held-out tokens in windows of {length} ({window}): "
              + ", ".join(f"{name} {f['perplexity']:.4f}" + (f" ({f['perplexity_change']:+.3%})" if name != "float32"
                                                             else "") for name, f in figures.items()), flush=True)
    return results


# --------------------------------------------------------------------------- Mamba


def mamba_models() -> tuple[nn.Module, nn.Module]:
    """lmforge Mamba and transformers' MambaForCausalLM with mambapy's scan, same weights."""
    from transformers.utils.import_utils import is_mambapy_available

    from lmforge.models import LmforgeMambaConfig, LmforgeMambaForCausalLM
    from lmforge.models.convert import to_hf

    if not is_mambapy_available():
        raise SystemExit("bench_generate --parts mamba: the reference needs mambapy (pip install 'lmforge[bench]')")
    torch.manual_seed(0)
    ours = no_eos(LmforgeMambaForCausalLM(LmforgeMambaConfig(**MAMBA)))
    stock = to_hf(ours)
    config = copy.deepcopy(stock.config)
    config.use_mambapy = True  # read when the mixers are built: a new model
    hf = type(stock)(config)
    hf.load_state_dict(stock.state_dict())
    return ours, no_eos(hf)


MAMBA_REFERENCE = "hf_mambapy_generate"


def mamba_group(ours: nn.Module, hf: nn.Module, batch: int, args, info: dict) -> dict:
    """Every Mamba case at one batch size (see the module docstring)."""
    from lmforge.inference.decoding import MambaDecoder

    torch._dynamo.reset()
    ref = MAMBA_REFERENCE
    decoders = {"lmforge_decoder_eager": MambaDecoder(ours), "lmforge_decoder_compiled": MambaDecoder(ours, compile=True)}
    ids, mask = prompts(MAMBA["vocab_size"], batch)
    n = args.new_tokens
    cases = {ref: lambda: hf_generate(hf, ids, mask, n),
             "lmforge_generate": lambda: hf_generate(ours, ids, mask, n),
             **{name: (lambda d=d: greedy(d, ids, mask, n)) for name, d in decoders.items()}}
    title = f"Mamba B{batch}"
    stats, tokens = run_cases(title, cases, args.reps, info, ref)
    weight_bytes = {ref: linear_weight_bytes(hf), "lmforge_generate": linear_weight_bytes(ours)}
    weight_bytes.update({name: linear_weight_bytes(d.model) for name, d in decoders.items()})
    rows = summarize(stats, tokens, ref, batch, n, weight_bytes, {"lmforge_decoder_compiled"})
    for name, row in rows.items():
        row["speedup_vs_lmforge_generate"] = stats["lmforge_generate"]["median_s"] / stats[name]["median_s"]
        row["vs_lmforge_generate"] = token_agreement(tokens[name], tokens["lmforge_generate"])
    if decoders["lmforge_decoder_compiled"]._compiled is None:
        print("  WARNING: the compiled MambaDecoder fell back to eager (torch.compile failed)", flush=True)
        rows["lmforge_decoder_compiled"]["compile_failed_fell_back_to_eager"] = True
    print_rows(f"{title}, {n} new tokens, median of {args.reps}", rows)
    return {"batch": batch, "prompt_lengths": PROMPT_LENGTHS[batch], "new_tokens": n, "reps": args.reps,
            "cases": rows}


def bench_mamba(args, info: dict) -> dict:
    ours, hf = mamba_models()
    results = {"config": MAMBA, "parameters": sum(p.numel() for p in ours.parameters()),
               "reference": MAMBA_REFERENCE}
    for batch in (1, 8):
        results[f"batch_{batch}"] = mamba_group(ours, hf, batch, args, info)
        gc.collect()
    return results


# --------------------------------------------------------------------------- output


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _agreement(row: dict) -> str:
    if row["identical_tokens"]:
        return "identical"
    return f"{row['token_match_share']:.1%} (from step {row['first_divergence_step']})"


def markdown(results: dict) -> str:
    """The results as Markdown tables (written beside the JSON)."""
    machine = results["machine"]
    lines = [f"# Decoding benchmark{' (--quick: smoke run, not a measurement)' if results['quick'] else ''}", "",
             "Written by `benchmarks/bench_generate.py` (see its docstring); figures from "
             f"`{results['json']}`.", "",
             f"{machine['date']}, {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['versions']['torch']} "
             f"({machine['torch_threads']} threads), transformers {machine['versions']['transformers']}; load average "
             f"(1 min) {machine['load_average_start'][0]:.2f} at start, {machine['load_average_max_1min']:.2f} highest, "
             f"{machine['load_average_end'][0]:.2f} at end.", ""]
    bandwidth = results.get("bandwidth")
    if bandwidth:
        start, end = bandwidth["start"], bandwidth["end"]
        lines += [f"Memory bandwidth ({start['tensor_mib']} MiB tensors, best of {start['reps']}, at the start and at "
                  f"the end): read (best of `sum`, `amax`, `dot`) {start['read_gb_s']:.1f} / {end['read_gb_s']:.1f} "
                  f"GB/s, copy (read + write) {start['copy_gb_s']:.1f} / {end['copy_gb_s']:.1f} GB/s; the shares "
                  f"below are of {bandwidth['read_gb_s']:.1f} GB/s.", ""]
    gpt = results.get("gpt")
    if gpt:
        lines += ["## GPT, greedy", "",
                  "Tokens/s: new tokens of all rows per second (a run includes the prompt's forward), median "
                  "and fastest rep. Speed-up (of medians; paired: median of the per-rep ratios): against `hf_dynamic` (`LlamaForCausalLM.generate`, same weights). Tokens: "
                  "agreement with `hf_dynamic`'s. Weights GB/s: linear weight bytes one step reads x steps/s "
                  "(the quickstart size's weights fit in the CPU caches).", ""]
        for size in GPT_SIZES:
            if size not in gpt:
                continue
            for batch in (1, 8):
                group = gpt[size][f"batch_{batch}"]
                lines += [f"### {size} ({gpt[size]['parameters'] / 1e6:.2f}M parameters), batch {batch}, "
                          f"{group['new_tokens']} new tokens, median of {group['reps']}", ""]
                rows = []
                for name, r in group["cases"].items():
                    bw = f"{r['weight_gb_s']:.1f}"
                    if "weight_share_of_read_bandwidth" in r:
                        bw += f" ({r['weight_share_of_read_bandwidth']:.0%})"
                    rows.append([name, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s_best']:.1f}",
                                 f"{r['speedup_vs_ref']:.2f}x",
                                 f"{r['paired_speedup_vs_ref']:.2f}x", _agreement(r),
                                 f"{r['first_call_s']:.1f}", f"{r['weight_bytes_per_step'] / 1e6:.1f}", bw])
                lines += _table(["case", "tokens/s", "best tokens/s", "speed-up", "paired", "tokens", "first call s",
                                 "weights MB/step", "weights GB/s (of read bw)"], rows) + [""]
    quality = results.get("quality")
    if quality and "skipped" not in quality:
        lines += ["## Quality of the lower-precision weights", "",
                  f"Held-out perplexity of the trained quickstart model (`{quality['model']}`) on the first "
                  f"{quality['token_limit']} tokens of the Shakespeare test split.", ""]
        rows = []
        for window, w in quality["windows"].items():
            for name, f in w["figures"].items():
                change = f"{f['perplexity_change']:+.3%}" if "perplexity_change" in f else ""
                rows.append([f"{window} ({w['max_length']})", name, str(f["tokens"]), f"{f['perplexity']:.4f}", change,
                             f"{f['next_token_accuracy']:.4f}"])
        lines += _table(["window", "weights", "tokens", "perplexity", "change", "next-token accuracy"], rows) + [""]
    elif quality:
        lines += ["## Quality of the lower-precision weights", "", f"Skipped: {quality['skipped']}.", ""]
    mamba = results.get("mamba")
    if mamba:
        lines += ["## Mamba, greedy", "",
                  f"{mamba['parameters'] / 1e6:.2f}M parameters ({', '.join(f'{k} {v}' for k, v in mamba['config'].items() if k.endswith(('size', 'layers')))}). "
                  "Speed-up against `hf_mambapy_generate` (`MambaForCausalLM.generate`, mambapy, same weights); "
                  "tokens: agreement with it.", ""]
        for batch in (1, 8):
            group = mamba[f"batch_{batch}"]
            lines += [f"### batch {batch}, {group['new_tokens']} new tokens, median of {group['reps']}", ""]
            rows = [[name, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s_best']:.1f}", f"{r['speedup_vs_ref']:.2f}x",
                     f"{r['speedup_vs_lmforge_generate']:.2f}x", _agreement(r), _agreement(r["vs_lmforge_generate"]),
                     f"{r['first_call_s']:.1f}"] for name, r in group["cases"].items()]
            lines += _table(["case", "tokens/s", "best tokens/s", "speed-up", "vs lmforge generate", "tokens vs reference",
                             "tokens vs lmforge generate", "first call s"], rows) + [""]
    return "\n".join(lines)


def add_bandwidth_shares(results: dict) -> None:
    """The best read and copy bandwidth of the two measurements, and every timed case's weight
    bandwidth as a share of that read bandwidth."""
    bandwidth = results["bandwidth"]
    runs = [bandwidth[k] for k in ("start", "end")]
    bandwidth["read_gb_s"] = max(r["read_gb_s"] for r in runs)
    bandwidth["copy_gb_s"] = max(r["copy_gb_s"] for r in runs)
    groups = [g for size in GPT_SIZES for g in results.get("gpt", {}).get(size, {}).values() if isinstance(g, dict)
              and "cases" in g]
    groups += [g for g in results.get("mamba", {}).values() if isinstance(g, dict) and "cases" in g]
    for group in groups:
        for row in group["cases"].values():
            if "weight_gb_s" in row:
                row["weight_share_of_read_bandwidth"] = row["weight_gb_s"] / bandwidth["read_gb_s"]


def mismatches(results: dict) -> list[str]:
    """Float cases whose tokens differ from the reference's (GPT) or from lmforge generate's (Mamba)."""
    bad = []
    for size in GPT_SIZES:
        for batch in (1, 8):
            group = results.get("gpt", {}).get(size, {}).get(f"batch_{batch}")
            if group:
                bad += [f"GPT {size} batch {batch} {name}" for name in MUST_MATCH
                        if not group["cases"][name]["identical_tokens"]]
    for key, group in results.get("mamba", {}).items():
        if key.startswith("batch_"):
            bad += [f"Mamba {key} {name}" for name in ("lmforge_decoder_eager", "lmforge_decoder_compiled")
                    if not group["cases"][name]["vs_lmforge_generate"]["identical_tokens"]]
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 new tokens, 2 timed reps, 10k tokens of text")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default all)")
    parser.add_argument("--sizes", default=",".join(GPT_SIZES), help=f"GPT sizes: comma list of {', '.join(GPT_SIZES)}")
    parser.add_argument("--reps", type=int, default=None, help="timed reps per case (default 7; --quick 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 256; --quick 64)")
    parser.add_argument("--quality-tokens", type=int, default=None, help="held-out tokens (default 50000; --quick 10000)")
    parser.add_argument("--trained", type=Path, default=TRAINED, help="the trained quickstart model folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--warm-compile-cache", action="store_true", help="use torch's inductor cache (default: a fresh one)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    args.sizes = [s for s in args.sizes.split(",") if s]
    if set(parts) - set(PARTS) or set(args.sizes) - set(GPT_SIZES):
        parser.error(f"unknown part or size in {parts} / {args.sizes}")
    args.reps = args.reps or (2 if args.quick else 7)
    args.new_tokens = args.new_tokens or (64 if args.quick else 256)
    args.quality_tokens = args.quality_tokens or (10_000 if args.quick else 50_000)
    if args.threads:
        torch.set_num_threads(args.threads)
    fresh_cache = None
    if not args.warm_compile_cache:  # read when inductor first compiles: compile times are cold ones
        fresh_cache = tempfile.mkdtemp(prefix="bench_generate_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh_cache
    name = "bench_generate_quick" if args.quick else "bench_generate"
    info = machine_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {info['cpu']}; load average "
          f"{info['load_average_start'][0]:.2f}{' (--quick: smoke run)' if args.quick else ''}", flush=True)
    results: dict = {"quick": args.quick, "json": f"benchmarks/results/{name}.json", "parts": parts,
                     "settings": {"reps": args.reps, "new_tokens": args.new_tokens, "quality_tokens": args.quality_tokens,
                                  "inductor_cache": "default" if args.warm_compile_cache else "fresh",
                                  "dynamo_recompile_limit": torch._dynamo.config.recompile_limit}}
    try:
        if "bandwidth" in parts:
            with torch.inference_mode():
                results["bandwidth"] = {"start": bench_bandwidth(args, info)}
        if "gpt" in parts:
            results["gpt"] = bench_gpt(args, info)
        if "quality" in parts:
            results["quality"] = bench_quality(args)
            sample_load(info)
        if "mamba" in parts:
            results["mamba"] = bench_mamba(args, info)
        if "bandwidth" in parts:  # again: the load (other jobs' memory traffic) may have changed
            with torch.inference_mode():
                results["bandwidth"]["end"] = bench_bandwidth(args, info)
            add_bandwidth_shares(results)
    finally:
        if fresh_cache:
            shutil.rmtree(fresh_cache, ignore_errors=True)
    results["machine"] = finish(info)
    results["token_mismatches"] = bad = mismatches(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(results) + "\n")
    print(f"load average (1 min): {info['load_average_start'][0]:.2f} at start, {info['load_average_max_1min']:.2f} "
          f"highest, {info['load_average_end'][0]:.2f} at end\nwrote {RESULTS / f'{name}.json'} and {name}.md", flush=True)
    if bad:
        print(f"TOKEN MISMATCH: {bad} differ from the reference", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
