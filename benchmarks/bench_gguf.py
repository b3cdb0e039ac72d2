"""GGUF export of the quickstart model: file size and held-out perplexity at every GGUF weight type.

    python benchmarks/bench_gguf.py                   # the whole Shakespeare test split (about 3 min on 2 cores)
    python benchmarks/bench_gguf.py --quick           # smoke run: the first 10k test tokens
    python benchmarks/bench_gguf.py --model runs/my_quickstart   # another model (any folder lmforge wrote)

The model is the trained quickstart model ``--model`` (default runs/bench_quickstart, written by
``python benchmarks/bench_quickstart.py``), resolved with ``lmforge.runs.find_model`` (a run
folder, its final/ or a quickstart folder). For each weight type of
``lmforge.export.gguf_file.export_gguf`` (f32, f16, bf16, q8_0, q4_0) the model is exported into a
temporary folder (removed at the end), timed, and its file is read back by transformers
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``: the stock Llama, GPT-2 or Mamba
class, every tensor dequantised to float32; a GPT-2 file's context length and MLP width, which
transformers' mapping does not read, are filled in from the file's metadata). So the perplexity
measures what the stored weights lose by rounding, not llama.cpp's kernels (which also round the
activations for quantised matrix products).

Perplexity is held-out perplexity on the Shakespeare test split (``--quick``: its first 10k tokens)
scored exactly as ``lmforge eval MODEL --data shakespeare --split test`` scores the run:
``lmforge.eval.lm.evaluate_lm_strided`` on the texts ``lmforge eval`` reads (the non-blank ones),
with the run's tokenizer, disjoint windows as long as the run's training rows (``data.block_size``,
``lmforge.eval.model.run_window``; the model's context for a model that is not an lmforge run),
batches of 8 windows. The same call on the original lmforge model (safetensors, float32) is the
baseline row, so that row is the figure ``lmforge eval`` prints for the run.

Per weight type: the file size (bytes, MiB, ratio to the f32 file, tensor data vs metadata such as
the tokenizer), the ggml tensor types and how many tensors have each, the perplexity and its change
against the original model, bits per byte, next-token accuracy, and the export's and read-back's
times. The machine (benchmarks/machine.py), the lmforge commit and the working tree's state are
recorded. Writes benchmarks/results/bench_gguf.json and the Markdown table bench_gguf.md
(``--quick``: bench_gguf_quick.json / .md, not committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
from bench_generate import first_tokens  # beside this file
from machine import finish, machine_info, sample_load  # benchmarks/machine.py, beside this file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MODEL = Path("runs/bench_quickstart")
CORPUS, SPLIT = "shakespeare", "test"
QUICK_TOKENS = 10_000
BATCH_SIZE = 8  # lmforge eval's default --batch-size
MIB = 2**20
F32_TOLERANCE_PCT = 0.01  # the f32 file holds the weights exactly: its perplexity must be the original's
MAKE_MODEL = ("python benchmarks/bench_quickstart.py  (from the repository root; it trains the quickstart model "
              "for 5 minutes and writes runs/bench_quickstart; --run-dir DIR writes it elsewhere)")


# --------------------------------------------------------------------------- inputs


def git_state() -> dict:
    """The lmforge commit, whether the working tree differs from it (and where), and the exporter's hash."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "src", "pyproject.toml")
    exporter = ROOT / "src" / "lmforge" / "export" / "gguf_file.py"
    return {"commit": git("rev-parse", "HEAD"), "describe": git("log", "-1", "--format=%h %s"),
            "uncommitted_source": status.splitlines() if status else [],
            "gguf_file_py_sha256": hashlib.sha256(exporter.read_bytes()).hexdigest() if exporter.is_file() else None}


def heldout_texts(tokenizer, limit: int | None) -> list[str]:
    """The test split's texts as ``lmforge eval`` reads them (non-blank), cut to ``limit`` tokens."""
    from lmforge.data.sources import load_corpus

    texts = [t for t in load_corpus(CORPUS, SPLIT)["text"] if t and t.strip()]
    return first_tokens(tokenizer, texts, limit) if limit else texts


# --------------------------------------------------------------------------- measuring


def perplexity(model, tokenizer, texts: list[str], max_length: int | None) -> dict:
    """``evaluate_lm_strided`` as ``lmforge eval`` calls it (stride = window, batches of 8), timed."""
    from lmforge.eval.lm import evaluate_lm_strided

    start = time.perf_counter()
    with torch.inference_mode():
        figures = evaluate_lm_strided(model, tokenizer, texts, max_length=max_length, batch_size=BATCH_SIZE,
                                      progress=False)
    return {**figures, "eval_s": time.perf_counter() - start}


def gguf_layout(path: Path) -> dict:
    """The file's tensor data bytes and the rest (header, metadata: the tokenizer, alignment)."""
    import gguf

    reader = gguf.GGUFReader(path)
    data = sum(int(t.n_bytes) for t in reader.tensors)
    return {"tensor_bytes": data, "metadata_bytes": path.stat().st_size - data, "tensors": len(reader.tensors)}


def read_back(path: Path):
    """The GGUF file loaded by transformers (dequantised to float32). Its GPT-2 mapping reads neither
    the context length into n_positions nor the MLP width into n_inner: they come from the file."""
    import gguf
    import transformers

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type == "gpt2":
        fields = {name: f.contents() for name, f in gguf.GGUFReader(path).fields.items()}
        config.n_positions = fields["gpt2.context_length"]
        config.n_inner = fields["gpt2.feed_forward_length"]
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config).eval()


def measure_dtype(folder, dtype: str, out_dir: Path, tokenizer, texts: list[str], max_length: int | None) -> dict:
    from lmforge.export.gguf_file import export_gguf

    path = out_dir / f"model-{dtype}.gguf"
    start = time.perf_counter()
    done = export_gguf(folder.path, path, dtype=dtype, modelfile=False)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    model = read_back(path)
    load_s = time.perf_counter() - start
    row = {"dtype": dtype, "architecture": done.architecture, "read_back_class": type(model).__name__,
           "size_bytes": done.size, "size_mib": done.size / MIB, **gguf_layout(path),
           "tensor_types": dict(sorted(done.tensor_types.items())), "export_s": export_s, "read_back_s": load_s,
           "notes": done.notes, **perplexity(model, tokenizer, texts, max_length)}
    path.unlink()
    return row


# --------------------------------------------------------------------------- output


def _table(headers: list[str], rows: list[list[str]], text: tuple[int, ...] = (0,)) -> list[str]:
    """A Markdown table; the ``text`` columns are left-aligned, the others (figures) right-aligned."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i in text else "---:" for i in range(len(headers))) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict) -> str:
    """The results as a Markdown table (written beside the JSON)."""
    machine, base, git = results["machine"], results["original"], results["git"]
    dirty = " (working tree: uncommitted changes in the sources, see the JSON)" if git["uncommitted_source"] else ""
    lines = [f"# GGUF export: size and perplexity{' (--quick: smoke run, not a measurement)' if results['quick'] else ''}",
             "", f"Written by `benchmarks/bench_gguf.py` (see its docstring); figures from `{results['json']}`.", "",
             f"{machine['date']}, {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['versions']['torch']} "
             f"({machine['torch_threads']} threads), transformers {machine['versions']['transformers']}, gguf "
             f"{results['gguf_version']}; lmforge {(git['commit'] or '?')[:7]}{dirty}; load average (1 min) "
             f"{machine['load_average_start'][0]:.2f} at start, {machine['load_average_max_1min']:.2f} highest, "
             f"{machine['load_average_end'][0]:.2f} at end.", "",
             f"Model `{results['model']}` ({results['parameters'] / 1e6:.2f}M parameters, {results['architecture']}; "
             f"GGUF architecture {results['dtypes'][0]['architecture']}, read back as "
             f"{results['dtypes'][0]['read_back_class']}). "
             f"Perplexity: {base['tokens']:,} held-out tokens of the {CORPUS} {SPLIT} split"
             f"{' (its first tokens)' if results['token_limit'] else ''}, `evaluate_lm_strided` in disjoint windows of "
             f"{base['max_length']} tokens (the run's training rows), as `lmforge eval {results['model']} --data "
             f"{CORPUS} --split {SPLIT}` scores it. Each GGUF file is read back by transformers "
             "(`from_pretrained(..., gguf_file=...)`, dequantised to float32): the figures are the stored "
             "weights' rounding, not llama.cpp's kernels. Change: perplexity against the original model's. "
             "Sizes include the tokenizer in the metadata "
             f"({results['dtypes'][0]['metadata_bytes'] / 1024:.0f} KiB here).", ""]
    rows = [["original (safetensors, float32)", f"{base['size_bytes']:,}", f"{base['size_mib']:.2f}",
             f"{base['size_vs_f32']:.3f}", "F32 (safetensors)", f"{base['perplexity']:.4f}", "",
             f"{base['bits_per_byte']:.4f}", ""]]
    for r in results["dtypes"]:
        types = ", ".join(f"{k} {v}" for k, v in r["tensor_types"].items())
        rows.append([r["dtype"], f"{r['size_bytes']:,}", f"{r['size_mib']:.2f}", f"{r['size_vs_f32']:.3f}", types,
                     f"{r['perplexity']:.4f}", f"{r['perplexity_change_pct']:+.3f}%", f"{r['bits_per_byte']:.4f}",
                     f"{r['export_s']:.2f}"])
    lines += _table(["weights", "file bytes", "MiB", "size vs f32", "tensor types", "perplexity", "change",
                     "bits per byte", "export s"], rows, text=(0, 4))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="the quickstart model: any folder lmforge wrote (default runs/bench_quickstart "
                             "in the repository)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: the first {QUICK_TOKENS:,} test tokens")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"held-out tokens (default: the whole test split; --quick {QUICK_TOKENS:,})")
    args = parser.parse_args(argv)

    import transformers

    from lmforge.errors import LmforgeError
    from lmforge.eval.model import run_window
    from lmforge.export.gguf_file import DTYPES
    from lmforge.runs import find_model, load_model

    transformers.utils.logging.disable_progress_bar()
    try:
        folder = find_model(args.model or ROOT / DEFAULT_MODEL, what="--model")
    except LmforgeError as err:
        print(f"bench_gguf: {err}\nThe trained quickstart model is made by:\n    {MAKE_MODEL}", file=sys.stderr)
        return 2
    limit = args.tokens or (QUICK_TOKENS if args.quick else None)
    name = "bench_gguf_quick" if args.quick else "bench_gguf"
    info = machine_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {info['cpu']}; load average "
          f"{info['load_average_start'][0]:.2f}{' (--quick: smoke run)' if args.quick else ''}", flush=True)

    loaded = load_model(folder, auto_class="AutoModelForCausalLM")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    texts = heldout_texts(tokenizer, limit)
    window = run_window(folder)  # None (not an lmforge run): the model's context, as lmforge eval does
    safetensors = sorted(folder.path.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in safetensors)
    original = {"weights": "original (safetensors, float32)", "files": [p.name for p in safetensors],
                "size_bytes": size, "size_mib": size / MIB, **perplexity(model, tokenizer, texts, window)}
    print(f"original: {size:,} bytes, perplexity {original['perplexity']:.4f} on {original['tokens']:,} tokens in "
          f"windows of {original['max_length']} ({original['eval_s']:.1f} s)", flush=True)
    sample_load(info)
    shown = folder.path.relative_to(ROOT) if folder.path.is_relative_to(ROOT) else folder.path
    results: dict = {
        "quick": args.quick, "json": f"benchmarks/results/{name}.json",
        "command": "python benchmarks/bench_gguf.py" + (" --quick" if args.quick else "")
                   + (f" --model {args.model}" if args.model else "")
                   + (f" --tokens {args.tokens}" if args.tokens else ""),
        "model": str(args.model or DEFAULT_MODEL), "model_folder": str(shown), "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": {"corpus": CORPUS, "split": SPLIT, "texts": len(texts)}, "token_limit": limit,
        "scoring": {"function": "lmforge.eval.lm.evaluate_lm_strided", "max_length": original["max_length"],
                    "stride": original["stride"], "batch_size": BATCH_SIZE,
                    "window": "run (data.block_size)" if window else "the model's context"},
        "gguf_version": metadata.version("gguf"),
        "git": git_state(), "original": original, "dtypes": []}
    del loaded, model

    out_dir = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    try:
        for dtype in DTYPES:
            row = measure_dtype(folder, dtype, out_dir, tokenizer, texts, window)
            row["perplexity_change_pct"] = (row["perplexity"] / original["perplexity"] - 1) * 100
            results["dtypes"].append(row)
            sample_load(info)
            print(f"{dtype:5s}: {row['size_bytes']:>10,} bytes, {row['tensor_types']}, export {row['export_s']:.2f} s, "
                  f"perplexity {row['perplexity']:.4f} ({row['perplexity_change_pct']:+.3f}%, {row['eval_s']:.1f} s)",
                  flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    f32 = next((r["size_bytes"] for r in results["dtypes"] if r["dtype"] == "f32"), None)
    for row in (original, *results["dtypes"]):
        row["size_vs_f32"] = row["size_bytes"] / f32 if f32 else None
    f32_change = next((r["perplexity_change_pct"] for r in results["dtypes"] if r["dtype"] == "f32"), 0.0)
    results["f32_matches_original"] = abs(f32_change) < F32_TOLERANCE_PCT
    results["machine"] = finish(info)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(results))
    print(markdown(results), flush=True)
    print(f"wrote {RESULTS / f'{name}.json'} and {name}.md", flush=True)
    if not results["f32_matches_original"]:
        print(f"F32 MISMATCH: the f32 file's perplexity differs from the original model's by {f32_change:+.4f}% "
              f"(more than {F32_TOLERANCE_PCT}%): the export or the read-back is not exact", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
