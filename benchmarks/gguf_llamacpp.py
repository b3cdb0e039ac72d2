"""GGUF files lmforge writes, run by llama.cpp itself: logits, greedy tokens, tokenization, embeddings.

The test suite checks GGUF files with transformers' GGUF reader and gguf's own reader; this script
checks them with the runtime they are for, through llama-cpp-python (which compiles llama.cpp:
``pip install llama-cpp-python``, about 20 minutes on 2 cores; not a test dependency for that
reason). For tiny models of every family (perturbed so that a wrong layout shows) and every
tokenizer algorithm, and for the quickstart model when it exists, it compares:

- llama.cpp's tokenization of a Unicode-rich text (special tokens parsed) with the tokenizer's;
- llama.cpp's logits on a sequence with lmforge's float32 forward (f32 and q8_0 files);
- 32 greedy tokens from llama.cpp with lmforge's ``generate``;
- for BERT, llama.cpp's mean-pooled embedding with lmforge's (cosine similarity);
- for the quickstart model, the held-out perplexity llama.cpp computes at every GGUF weight type
  (llama.cpp's own kernels, which also round activations in quantised products), scored as
  ``lmforge eval`` scores the run (the same token stream and disjoint windows).

    python benchmarks/gguf_llamacpp.py [--quickstart runs/bench_quickstart]

Writes results/gguf_llamacpp.json and the tables results/gguf_llamacpp.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from machine import finish, machine_info

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"
TEXT = "To be, or not to be: héllo 世界 🤗\tTHE KING  double  spaces \n\nthe end"
CHAT = "<|user|>\nhi there<|end|>\n"


def tiny_models(tmp: Path) -> dict[str, Path]:
    """name -> saved model folder, for every GGUF architecture and tokenizer algorithm."""
    import yaml

    from lmforge.models import (
        LmforgeBertConfig,
        LmforgeBertModel,
        LmforgeMambaConfig,
        LmforgeMambaForCausalLM,
    )
    from lmforge.tokenizers.train import train_tokenizer
    from lmforge.train.model_presets import build_model
    from tests.finetune_fixtures import chat_tokenizer
    from tests.pipeline_fixtures import make_corpus
    from tests.train_fixtures import perturb

    corpus = make_corpus(300) + ["héllo 世界 🤗 café naïve THE KING"]
    chat = chat_tokenizer()
    unigram = train_tokenizer(corpus, algorithm="unigram", vocab_size=400)
    wordpiece = train_tokenizer(corpus, algorithm="wordpiece", vocab_size=400, lowercase=True)  # llama.cpp's is uncased
    gpt = dict(model_type="lmforge_gpt", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0,
               norm_eps=1e-5)
    gpt2 = dict(gpt, position_embedding_type="learned", norm_type="layernorm", hidden_act="gelu_tanh",
                norm_bias=True, attention_bias=True, mlp_bias=True, num_key_value_heads=4, tie_word_embeddings=True)
    cases = {
        "llama-bpe-chat": (gpt, chat),
        "llama-tied-headdim-unigram": (dict(gpt, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True), unigram),
        "gpt2-bpe": (gpt2, chat),
    }
    folders = {}
    for name, (preset, tok) in cases.items():
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(preset))
        model = perturb(build_model("causal", str(path), tok, seed=0)).eval()
        folders[name] = _save(tmp / name, model, tok)
    mamba = perturb(LmforgeMambaForCausalLM(LmforgeMambaConfig(
        vocab_size=len(chat), hidden_size=64, num_hidden_layers=2, state_size=8, eos_token_id=chat.eos_token_id))).eval()
    folders["mamba-bpe"] = _save(tmp / "mamba-bpe", mamba, chat)
    bert = perturb(LmforgeBertModel(LmforgeBertConfig.from_preset(
        "classic", vocab_size=len(wordpiece), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=128, pad_token_id=wordpiece.pad_token_id)), seed=1).eval()
    folders["bert-wordpiece"] = _save(tmp / "bert-wordpiece", bert, wordpiece)
    return folders


def _save(folder: Path, model, tok) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def check(name: str, folder: Path, tmp: Path, dtype: str) -> dict:
    from llama_cpp import Llama
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from lmforge.export.gguf_file import export_gguf

    out = tmp / f"{name}-{dtype}.gguf"
    done = export_gguf(folder, out, dtype=dtype, overwrite=True, modelfile=False)
    tok = AutoTokenizer.from_pretrained(folder)
    row = {"model": name, "dtype": dtype, "architecture": done.architecture, "tokenizer": done.tokenizer}
    encoder = done.architecture == "bert"
    llm = Llama(model_path=str(out), n_ctx=128, logits_all=not encoder, embedding=encoder, verbose=False,
                n_threads=2, pooling_type=1 if encoder else -1, type_k=0, type_v=0)  # a float32 KV cache
    texts = [TEXT, CHAT] if tok.chat_template else [TEXT]
    theirs_ids = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]
    row["tokenization_equal"] = theirs_ids == [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    row["llamacpp_unknown_tokens"] = sum(ids.count(tok.unk_token_id) for ids in theirs_ids) if tok.unk_token else 0
    if encoder:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        ids = tok(TEXT)["input_ids"]
        ours = model(torch.tensor([ids])).last_hidden_state[0].mean(0).detach().numpy()
        theirs = np.array(llm.create_embedding(TEXT)["data"][0]["embedding"])
        row["embedding_cosine"] = float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs))
        return row
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:48]
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    row["logits_max_abs_diff"] = float(np.abs(theirs - ours).max())
    row["logits_scale"] = float(np.abs(ours).max())
    prompt = ids[:6]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                  pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    llm.reset()
    got = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(token)
        if len(got) == 32:
            break
    row["greedy_32_equal"] = got == expected
    row["greedy_first_difference"] = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None)
    return row


def llamacpp_perplexity(folder: Path, tmp: Path) -> list[dict]:
    """Held-out perplexity of the model in ``folder`` run by llama.cpp at every dtype, beside lmforge's."""
    import math

    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.data.sources import load_corpus
    from lmforge.eval.lm import evaluate_lm_strided, joined_ids, strided_windows
    from lmforge.eval.model import run_window
    from lmforge.export.gguf_file import DTYPES, export_gguf
    from lmforge.runs import find_model

    found = find_model(folder)
    tok = AutoTokenizer.from_pretrained(found.path)
    texts = [t for t in load_corpus("shakespeare", "test")["text"] if t and t.strip()]
    window = run_window(found)
    ids = joined_ids(tok, texts)
    model = AutoModelForCausalLM.from_pretrained(found.path, trust_remote_code=True).eval()
    reference = evaluate_lm_strided(model, tok, texts, max_length=window, progress=False)
    rows = [{"weights": "lmforge (safetensors, float32)", "perplexity": reference["perplexity"],
             "tokens": reference["tokens"]}]
    for dtype in DTYPES:
        out = tmp / f"ppl-{dtype}.gguf"
        export_gguf(found.path, out, dtype=dtype, overwrite=True, modelfile=False)
        llm = Llama(model_path=str(out), n_ctx=window, n_batch=window, logits_all=True, verbose=False, n_threads=2,
                    type_k=0, type_v=0)
        nll, count = 0.0, 0
        for begin, end, first in strided_windows(ids.size, window, window):
            llm.reset()
            llm.eval(ids[begin:end].tolist())
            logits = np.array(llm.scores[: end - begin], dtype=np.float64)
            logits -= logits.max(-1, keepdims=True)
            logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            positions = np.arange(first, end)
            nll -= logprobs[positions - begin, ids[positions + 1]].sum()
            count += positions.size
        rows.append({"weights": f"llama.cpp {dtype}", "size_bytes": out.stat().st_size,
                     "perplexity": math.exp(nll / count), "tokens": count})
        print(json.dumps(rows[-1]))
    base = rows[1]["perplexity"]
    for row in rows:
        row["change_vs_llamacpp_f32_percent"] = 100 * (row["perplexity"] / base - 1)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# GGUF files run by llama.cpp", "",
             f"Written by `benchmarks/gguf_llamacpp.py`; llama-cpp-python {m.get('llama_cpp_python')}, "
             f"{m.get('cpu')}, lmforge {result['commit'][:7]}. Logits: llama.cpp (float32 KV cache) against "
             "lmforge's float32 forward on 48 tokens; greedy: 32 tokens against `generate()`; BERT: cosine of the "
             "mean-pooled embeddings.", "",
             "| model | weights | architecture | tokenizer | same token ids | unknown in llama.cpp | "
             "max logit diff (scale) | greedy 32 equal | embedding cosine |", "|---|---|---|---|---|---:|---|---|---:|"]
    for r in result["rows"]:
        logits = f"{r['logits_max_abs_diff']:.2g} ({r['logits_scale']:.1f})" if "logits_max_abs_diff" in r else ""
        cosine = f"{r['embedding_cosine']:.7f}" if "embedding_cosine" in r else ""
        greedy = {True: "yes", False: f"no (from token {r.get('greedy_first_difference')})"}.get(
            r.get("greedy_32_equal"), "")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['architecture']} | {r['tokenizer']} | "
                     f"{'yes' if r['tokenization_equal'] else 'no'} | {r['llamacpp_unknown_tokens']} | {logits} | "
                     f"{greedy} | {cosine} |")
    if result["quickstart_perplexity"]:
        rows = result["quickstart_perplexity"]
        lines += ["", f"Quickstart model, held-out perplexity on {rows[0]['tokens']:,} Shakespeare test tokens "
                  "(disjoint windows of the run's 64 tokens, as `lmforge eval` scores the run), computed by llama.cpp:",
                  "", "| weights | file bytes | perplexity | change vs llama.cpp f32 |", "|---|---:|---:|---:|"]
        for r in rows:
            size = f"{r['size_bytes']:,}" if "size_bytes" in r else ""
            lines.append(f"| {r['weights']} | {size} | {r['perplexity']:.4f} | "
                         f"{r['change_vs_llamacpp_f32_percent']:+.3f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", default="runs/bench_quickstart", help="a quickstart run to check too")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("needs llama-cpp-python: pip install llama-cpp-python (compiles llama.cpp)", file=sys.stderr)
        return 1
    info = machine_info()
    info["llama_cpp_python"] = llama_cpp.__version__
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = tiny_models(tmp)
        quickstart = ROOT / args.quickstart
        if quickstart.exists():
            from lmforge.runs import find_model

            folders["quickstart"] = find_model(quickstart).path
        for name, folder in folders.items():
            for dtype in ("f32", "q8_0") if name != "bert-wordpiece" else ("f32",):
                row = check(name, folder, tmp, dtype)
                print(json.dumps(row))
                rows.append(row)
        perplexities = llamacpp_perplexity(quickstart, tmp) if quickstart.exists() else []
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "gguf_llamacpp", "commit": commit, "machine": finish(info), "rows": rows,
              "quickstart_perplexity": perplexities}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_llamacpp.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "gguf_llamacpp.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
