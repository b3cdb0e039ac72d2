"""Tokenizer benchmarks on the Shakespeare corpus, side by side in one process.

    python benchmarks/bench_tokenizers.py            # full train split, 3 interleaved repetitions
    python benchmarks/bench_tokenizers.py --quick    # 1 MB of text, 2 repetitions (smoke run)

1. Training: ``lmforge.tokenizers.train_tokenizer`` (reading the ``datasets`` corpus, wrapping,
   Unigram byte-fallback rebuild) vs the same pipeline written directly with ``tokenizers`` over
   an in-memory list. Goal: lmforge overhead <= 10%.
2. Unigram: lmforge vs the ``sentencepiece`` trainer (unigram, byte fallback, identity
   normalisation, the same text fed line by line as sentencepiece expects, same vocabulary
   size), in the same interleaved rounds: time, and bytes/token on the validation split.
3. Encoding (validation lines): the wrapped ``PreTrainedTokenizerFast`` batch call vs raw
   ``Tokenizer.encode_batch`` (and raw plus converting the ids to Python lists, which the
   wrapper has to do).

Repetitions are interleaved and alternate which side goes first; medians of wall time and of
process CPU time (all threads; steadier on a shared machine) are reported. Ratios are lmforge
time / reference time (> 1 means lmforge is slower). Training runs ``--reps`` rounds for
Unigram and two more for BPE and WordPiece. JSON goes to
benchmarks/results/bench_tokenizers.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 8192


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Wall seconds per call of each function, ``reps`` rounds, alternating the order every
    round. CPU seconds of the whole process (all threads) go under ``<name>_cpu``: on a shared,
    loaded machine they are far less noisy than wall time."""
    times: dict[str, list[float]] = {}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times.setdefault(name, []).append(time.perf_counter() - start)
            times.setdefault(f"{name}_cpu", []).append(time.process_time() - cpu)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --------------------------------------------------------------------------- raw references


def raw_tokenizers_pipeline(algorithm: str, texts: list[str], vocab: int, specials: list[str]):
    """The lmforge pipelines written directly against ``tokenizers`` (same components/settings)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    def batches():
        for i in range(0, len(texts), 1000):
            yield texts[i:i + 1000]

    if algorithm == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(batches(), trainer=trainer, length=len(texts))
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif algorithm == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab, min_frequency=2, special_tokens=specials,
                                            show_progress=False)
        tok.train_from_iterator(batches(), trainer=trainer, length=len(texts))
        cls, sep = "[CLS]", "[SEP]"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            pre_tokenizers.Metaspace(prepend_scheme="never")])
        trainer = trainers.UnigramTrainer(vocab_size=vocab - 256, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
        tok.train_from_iterator(batches(), trainer=trainer, length=len(texts))
        state = json.loads(tok.model.__getstate__())
        floor = min(s for _, s in state["vocab"]) - 1.0
        tok.model = models.Unigram([tuple(v) for v in state["vocab"]] + [(f"<0x{b:02X}>", floor) for b in range(256)],
                                   unk_id=state["unk_id"], byte_fallback=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


SPECIALS = {
    "bpe": ["<|pad|>", "<|endoftext|>"],
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "unigram": ["<|pad|>", "<unk>", "<|endoftext|>"],
}


def train_sentencepiece(lines: list[str], vocab: int):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="unigram", vocab_size=vocab,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
        minloglevel=2, unk_id=1, bos_id=-1, eos_id=2, pad_id=0,
        unk_piece="<unk>", eos_piece="<|endoftext|>", pad_piece="<|pad|>")
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


# --------------------------------------------------------------------------- benchmarks


def bench_training(train_ds, texts: list[str], valid: list[str], reps: int) -> dict:
    """lmforge vs raw ``tokenizers`` per algorithm; Unigram also vs ``sentencepiece`` (same rounds)."""
    from lmforge.tokenizers import train_tokenizer

    lines = [line for t in texts for line in t.split("\n") if line.strip()]  # spm reads sentences
    out: dict = {}
    models: dict[str, object] = {}
    for algorithm in ("bpe", "wordpiece", "unigram"):
        fns = {
            "lmforge": lambda a=algorithm: models.__setitem__("lmforge", train_tokenizer(
                train_ds, a, VOCAB, show_progress=False)),
            "tokenizers": lambda a=algorithm: raw_tokenizers_pipeline(a, texts, VOCAB, SPECIALS[a]),
        }
        if algorithm == "unigram":
            fns["sentencepiece"] = lambda: models.__setitem__("sentencepiece", train_sentencepiece(lines, VOCAB))
        # BPE and WordPiece train in ~1 s here and run-to-run noise is ~10%: take more rounds
        times = interleaved(fns, reps if algorithm == "unigram" else 3 * reps)
        lm, ref = median(times["lmforge"]), median(times["tokenizers"])
        lm_cpu, ref_cpu = median(times["lmforge_cpu"]), median(times["tokenizers_cpu"])
        paired = median([a / b for a, b in zip(times["lmforge"], times["tokenizers"], strict=True)])
        out[algorithm] = {"lmforge_s": lm, "tokenizers_s": ref, "ratio": lm / ref, "paired_ratio": paired,
                          "lmforge_cpu_s": lm_cpu, "tokenizers_cpu_s": ref_cpu, "cpu_ratio": lm_cpu / ref_cpu,
                          "times": times}
        print(f"train {algorithm:<9} wall: lmforge {lm:7.2f} s  tokenizers {ref:7.2f} s  overhead "
              f"{100 * (lm / ref - 1):+.1f}% (paired rounds {100 * (paired - 1):+.1f}%)  | cpu: {lm_cpu:7.2f} s "
              f"vs {ref_cpu:7.2f} s  overhead {100 * (lm_cpu / ref_cpu - 1):+.1f}%")
    out["unigram_vs_sentencepiece"] = compare_sentencepiece(models, times, valid)
    return out


def compare_sentencepiece(models: dict, times: dict[str, list[float]], valid: list[str]) -> dict:
    """Time and bytes/token of the last lmforge Unigram and sentencepiece models on ``valid``."""
    lm_tok, sp = models["lmforge"], models["sentencepiece"]
    n_bytes = sum(len(t.encode("utf-8")) for t in valid)
    lm_ids = lm_tok(valid, add_special_tokens=False, verbose=False)["input_ids"]
    sp_ids = sp.encode(valid)
    res = {
        "lmforge_s": median(times["lmforge"]), "sentencepiece_s": median(times["sentencepiece"]),
        "lmforge_bytes_per_token": n_bytes / sum(map(len, lm_ids)),
        "sentencepiece_bytes_per_token": n_bytes / sum(map(len, sp_ids)),
        "lmforge_exact_docs": sum(lm_tok.decode(i) == t for i, t in zip(lm_ids, valid, strict=True)),
        "sentencepiece_exact_docs": sum(sp.decode(i) == t for i, t in zip(sp_ids, valid, strict=True)),
        "docs": len(valid), "times": times,
    }
    # sentencepiece trains on lines (its unit) and so never learns "\n": compare on lines too
    lines = [line for t in valid for line in t.split("\n") if line.strip()]
    line_bytes = sum(len(x.encode("utf-8")) for x in lines)
    res["lmforge_bytes_per_token_lines"] = line_bytes / sum(
        map(len, lm_tok(lines, add_special_tokens=False)["input_ids"]))
    res["sentencepiece_bytes_per_token_lines"] = line_bytes / sum(map(len, sp.encode(lines)))
    res["time_ratio"] = res["lmforge_s"] / res["sentencepiece_s"]
    res["lmforge_cpu_s"] = median(times["lmforge_cpu"])
    res["sentencepiece_cpu_s"] = median(times["sentencepiece_cpu"])
    res["cpu_ratio"] = res["lmforge_cpu_s"] / res["sentencepiece_cpu_s"]
    print(f"unigram   lmforge {res['lmforge_s']:7.2f} s  sentencepiece {res['sentencepiece_s']:7.2f} s  "
          f"ratio {res['time_ratio']:.2f} (cpu {res['cpu_ratio']:.2f}); bytes/token {res['lmforge_bytes_per_token']:.3f} vs "
          f"{res['sentencepiece_bytes_per_token']:.3f} (per line {res['lmforge_bytes_per_token_lines']:.3f} vs "
          f"{res['sentencepiece_bytes_per_token_lines']:.3f}); exact docs {res['lmforge_exact_docs']} vs "
          f"{res['sentencepiece_exact_docs']} of {len(valid)}")
    return res


def bench_encoding(train_ds, valid: list[str], reps: int) -> dict:
    from lmforge.tokenizers import train_tokenizer

    out = {}
    n_bytes = sum(len(t.encode("utf-8")) for t in valid)
    lines = [line for t in valid for line in t.split("\n") if line.strip()]
    for algorithm in ("bpe", "wordpiece", "unigram"):
        tok = train_tokenizer(train_ds, algorithm, VOCAB, show_progress=False)
        raw = tok.backend_tokenizer
        times = interleaved({
            "wrapped": lambda t=tok: t(lines, add_special_tokens=False, return_attention_mask=False,
                                       return_token_type_ids=False),
            "raw": lambda r=raw: r.encode_batch(lines, add_special_tokens=False),
            "raw_ids": lambda r=raw: [e.ids for e in r.encode_batch(lines, add_special_tokens=False)],
        }, reps)
        w, r, ri = median(times["wrapped"]), median(times["raw"]), median(times["raw_ids"])
        out[algorithm] = {"wrapped_mb_s": n_bytes / w / 1e6, "raw_mb_s": n_bytes / r / 1e6,
                          "raw_ids_mb_s": n_bytes / ri / 1e6, "ratio": w / r, "ratio_vs_raw_ids": w / ri,
                          "times": times}
        print(f"encode {algorithm:<9} wrapped {n_bytes / w / 1e6:6.2f} MB/s  raw encode_batch "
              f"{n_bytes / r / 1e6:6.2f} MB/s (+ids {n_bytes / ri / 1e6:6.2f})  time ratio {w / r:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 MB of training text, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 3)

    from lmforge.data import load_corpus

    train_ds = load_corpus("shakespeare", "train")
    if args.quick:
        train_ds = train_ds.select(range(8))
    texts = list(train_ds["text"])
    valid = list(load_corpus("shakespeare", "validation")["text"])
    from lmforge.tokenizers import train_tokenizer

    train_tokenizer(["warm up the imports"] * 4, "bpe", 300, show_progress=False)  # untimed
    load_before = os.getloadavg()
    print(f"corpus: {sum(map(len, texts)) / 1e6:.2f} MB train, {len(valid)} validation docs; "
          f"{reps} reps; load average {load_before[0]:.1f}")
    start = time.time()
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_start": load_before},
        "settings": {"vocab_size": VOCAB, "reps": reps, "train_bytes": sum(len(t.encode()) for t in texts)},
        "training": bench_training(train_ds, texts, valid, reps),
        "encoding": bench_encoding(train_ds, valid, max(reps, 5)),
    }
    results["machine"]["load_average_end"] = os.getloadavg()
    results["seconds"] = time.time() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "bench_tokenizers.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
