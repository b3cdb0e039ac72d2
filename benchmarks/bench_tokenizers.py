"""Tokenizer benchmarks on the Shakespeare corpus, side by side in one process.

    python benchmarks/bench_tokenizers.py            # full train split, 3 interleaved repetitions
    python benchmarks/bench_tokenizers.py --quick    # 1 MB of text, 2 repetitions (smoke run)

1. Training: ``lmforge.tokenizers.train_tokenizer`` (reading the ``datasets`` corpus, wrapping,
   Unigram byte-fallback rebuild) vs the same pipeline written directly with ``tokenizers`` over
   an in-memory list. Goal: lmforge overhead <= 10%. Before timing an algorithm, both sides
   train once and must be the same tokenizer (same trainer settings, same word counts fed, same
   model as far as ``tokenizers`` is deterministic: see tokenizer_identity.py); if they differ
   the benchmark prints the first difference and refuses to time. These two untimed runs also
   warm up both paths.
2. Unigram: lmforge vs the ``sentencepiece`` trainer (unigram, byte fallback, identity
   normalisation, the same text fed line by line as sentencepiece expects, same vocabulary
   size), in rounds of their own: time, and bytes/token on the validation split.
3. Encoding (validation lines): the wrapped ``PreTrainedTokenizerFast`` batch call vs raw
   ``Tokenizer.encode_batch`` (and raw plus converting the ids to Python lists, which the
   wrapper has to do).

Every comparison is two-sided (three for encoding) and alternates which side goes first, so each
side runs as often first as second and after each kind of run. Every measured time is recorded
(wall and process CPU time, all threads), with the number of runs per side; medians and the
median of per-round ratios are reported. Ratios are lmforge time / reference time (> 1 means
lmforge is slower). Training runs ``2 * --reps`` rounds for Unigram, ``3 * --reps`` for BPE and
WordPiece, and ``--reps`` rounds of lmforge vs sentencepiece. The machine (threads, versions,
load average during the run) is recorded by benchmarks/machine.py. JSON goes to
benchmarks/results/bench_tokenizers.json (``--quick``: bench_tokenizers_quick.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

from machine import finish, machine_info, sample_load
from tokenizer_identity import fed_words, same_result, same_work, vocabulary_overlap

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 8192


def interleaved(fns: dict[str, Callable[[], object]], reps: int, info: dict) -> dict[str, list[float]]:
    """Wall seconds per call of each function, ``reps`` rounds, reversing the order every
    round. CPU seconds of the whole process (all threads) go under ``<name>_cpu``: on a shared,
    loaded machine they are far less noisy than wall time. The load average is sampled into
    ``info`` after every round."""
    times: dict[str, list[float]] = {}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times.setdefault(name, []).append(time.perf_counter() - start)
            times.setdefault(f"{name}_cpu", []).append(time.process_time() - cpu)
        sample_load(info)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def summary(times: dict[str, list[float]], ours: str, ref: str) -> dict:
    """Medians, ratios (wall, CPU, median of per-round ratios), runs per side and every time."""
    lm, rf = median(times[ours]), median(times[ref])
    lm_cpu, rf_cpu = median(times[f"{ours}_cpu"]), median(times[f"{ref}_cpu"])
    return {f"{ours}_s": lm, f"{ref}_s": rf, "ratio": lm / rf,
            "paired_ratio": median([a / b for a, b in zip(times[ours], times[ref], strict=True)]),
            f"{ours}_cpu_s": lm_cpu, f"{ref}_cpu_s": rf_cpu, "cpu_ratio": lm_cpu / rf_cpu,
            "paired_cpu_ratio": median([a / b for a, b in zip(times[f"{ours}_cpu"], times[f"{ref}_cpu"],
                                                             strict=True)]),
            "runs": {name: len(times[name]) for name in (ours, ref)}, "times": times}


# --------------------------------------------------------------------------- raw references


def raw_tokenizers_pipeline(algorithm: str, texts: list[str], vocab: int, specials: list[str]):
    """The lmforge pipelines written directly against ``tokenizers`` (same components/settings).
    Returns the trained tokenizer and its trainer (which holds the word counts it was fed)."""
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
    return tok, trainer


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


# --------------------------------------------------------------------------- same tokenizer?


def train_lmforge(train_ds, algorithm: str):
    from lmforge.tokenizers import train_tokenizer

    return train_tokenizer(train_ds, algorithm, VOCAB, show_progress=False)


def train_lmforge_with_trainer(train_ds, algorithm: str):
    """lmforge's tokenizer (the raw ``tokenizers`` object) and the trainer lmforge built for it."""
    from lmforge.tokenizers import train as lmforge_train

    with mock.patch.object(lmforge_train, "_train", wraps=lmforge_train._train) as spy:
        hf = train_lmforge(train_ds, algorithm)
    return hf.backend_tokenizer, spy.call_args.args[1]


def check_identical(train_ds, texts: list[str], algorithm: str) -> dict:
    """Train once each way; stop the benchmark, naming the first difference, unless lmforge and
    the reference did the same work and got the same tokenizer (tokenizer_identity.py)."""
    lm_tok, lm_trainer = train_lmforge_with_trainer(train_ds, algorithm)
    ref_tok, ref_trainer = raw_tokenizers_pipeline(algorithm, texts, VOCAB, SPECIALS[algorithm])
    work = same_work(lm_tok, lm_trainer, ref_tok, ref_trainer)
    result = same_result(algorithm, lm_tok, ref_tok)
    report = {"same_work": work is None, "same_result": result is None, "words": len(fed_words(lm_trainer)),
              "lmforge_vs_tokenizers": vocabulary_overlap(lm_tok, ref_tok)}
    if algorithm == "wordpiece":  # not deterministic: how far apart are two reference runs?
        report["tokenizers_vs_itself"] = vocabulary_overlap(ref_tok, raw_tokenizers_pipeline(
            algorithm, texts, VOCAB, SPECIALS[algorithm])[0])
    if work or result:
        raise SystemExit(f"{algorithm}: lmforge and the raw tokenizers pipeline differ, not timing them.\n"
                         f"first difference: {work or result}")
    print(f"check {algorithm:<9} same trainer settings and word counts ({report['words']:,} words), "
          f"{SAME[algorithm]}; vs the reference {report['lmforge_vs_tokenizers']}"
          + (f", reference vs itself {report['tokenizers_vs_itself']}" if algorithm == "wordpiece" else ""))
    return report


SAME = {"bpe": "identical model", "unigram": "same pieces and scores",
        "wordpiece": "same special tokens and alphabet (the vocabulary is not deterministic)"}


# --------------------------------------------------------------------------- benchmarks

# rounds per --reps: BPE and WordPiece train in ~1 s with ~10% run-to-run noise; one Unigram
# training takes ~6 s and single runs of the same training vary by up to ~15%
ROUNDS = {"bpe": 3, "wordpiece": 3, "unigram": 2}


def bench_training(train_ds, texts: list[str], reps: int, info: dict) -> dict:
    """lmforge vs raw ``tokenizers`` per algorithm, each checked identical before timing."""
    out: dict = {}
    for algorithm in ("bpe", "wordpiece", "unigram"):
        identity = check_identical(train_ds, texts, algorithm)
        times = interleaved({
            "lmforge": lambda a=algorithm: train_lmforge(train_ds, a),
            "tokenizers": lambda a=algorithm: raw_tokenizers_pipeline(a, texts, VOCAB, SPECIALS[a]),
        }, ROUNDS[algorithm] * reps, info)
        res = out[algorithm] = {"identity": identity, **summary(times, "lmforge", "tokenizers")}
        print(f"train {algorithm:<9} wall: lmforge {res['lmforge_s']:7.2f} s  tokenizers {res['tokenizers_s']:7.2f} s"
              f"  overhead {100 * (res['ratio'] - 1):+.1f}% (paired rounds {100 * (res['paired_ratio'] - 1):+.1f}%)"
              f"  | cpu: {res['lmforge_cpu_s']:7.2f} s vs {res['tokenizers_cpu_s']:7.2f} s  overhead "
              f"{100 * (res['cpu_ratio'] - 1):+.1f}%  ({res['runs']['lmforge']} runs each)")
    return out


def bench_sentencepiece(train_ds, texts: list[str], valid: list[str], reps: int, info: dict) -> dict:
    """lmforge Unigram vs the ``sentencepiece`` trainer, in rounds of their own."""
    lines = [line for t in texts for line in t.split("\n") if line.strip()]  # spm reads sentences
    models: dict[str, object] = {}
    times = interleaved({
        "lmforge": lambda: models.__setitem__("lmforge", train_lmforge(train_ds, "unigram")),
        "sentencepiece": lambda: models.__setitem__("sentencepiece", train_sentencepiece(lines, VOCAB)),
    }, reps, info)
    return compare_sentencepiece(models, times, valid)


def compare_sentencepiece(models: dict, times: dict[str, list[float]], valid: list[str]) -> dict:
    """Times, and bytes/token of the last lmforge Unigram and sentencepiece models on ``valid``."""
    lm_tok, sp = models["lmforge"], models["sentencepiece"]
    n_bytes = sum(len(t.encode("utf-8")) for t in valid)
    lm_ids = lm_tok(valid, add_special_tokens=False, verbose=False)["input_ids"]
    sp_ids = sp.encode(valid)
    res = {
        **summary(times, "lmforge", "sentencepiece"),
        "lmforge_bytes_per_token": n_bytes / sum(map(len, lm_ids)),
        "sentencepiece_bytes_per_token": n_bytes / sum(map(len, sp_ids)),
        "lmforge_exact_docs": sum(lm_tok.decode(i) == t for i, t in zip(lm_ids, valid, strict=True)),
        "sentencepiece_exact_docs": sum(sp.decode(i) == t for i, t in zip(sp_ids, valid, strict=True)),
        "docs": len(valid),
    }
    # sentencepiece trains on lines (its unit) and so never learns "\n": compare on lines too
    lines = [line for t in valid for line in t.split("\n") if line.strip()]
    line_bytes = sum(len(x.encode("utf-8")) for x in lines)
    res["lmforge_bytes_per_token_lines"] = line_bytes / sum(
        map(len, lm_tok(lines, add_special_tokens=False)["input_ids"]))
    res["sentencepiece_bytes_per_token_lines"] = line_bytes / sum(map(len, sp.encode(lines)))
    print(f"unigram   lmforge {res['lmforge_s']:7.2f} s  sentencepiece {res['sentencepiece_s']:7.2f} s  "
          f"ratio {res['ratio']:.2f} (cpu {res['cpu_ratio']:.2f}); bytes/token {res['lmforge_bytes_per_token']:.3f} vs "
          f"{res['sentencepiece_bytes_per_token']:.3f} (per line {res['lmforge_bytes_per_token_lines']:.3f} vs "
          f"{res['sentencepiece_bytes_per_token_lines']:.3f}); exact docs {res['lmforge_exact_docs']} vs "
          f"{res['sentencepiece_exact_docs']} of {len(valid)}")
    return res


def bench_encoding(train_ds, valid: list[str], reps: int, info: dict) -> dict:
    out = {}
    n_bytes = sum(len(t.encode("utf-8")) for t in valid)
    lines = [line for t in valid for line in t.split("\n") if line.strip()]
    for algorithm in ("bpe", "wordpiece", "unigram"):
        tok = train_lmforge(train_ds, algorithm)
        raw = tok.backend_tokenizer
        times = interleaved({
            "wrapped": lambda t=tok: t(lines, add_special_tokens=False, return_attention_mask=False,
                                       return_token_type_ids=False),
            "raw": lambda r=raw: r.encode_batch(lines, add_special_tokens=False),
            "raw_ids": lambda r=raw: [e.ids for e in r.encode_batch(lines, add_special_tokens=False)],
        }, reps, info)
        w, r, ri = median(times["wrapped"]), median(times["raw"]), median(times["raw_ids"])
        out[algorithm] = {"wrapped_mb_s": n_bytes / w / 1e6, "raw_mb_s": n_bytes / r / 1e6,
                          "raw_ids_mb_s": n_bytes / ri / 1e6, "ratio": w / r, "ratio_vs_raw_ids": w / ri,
                          "runs": {name: len(times[name]) for name in ("wrapped", "raw", "raw_ids")},
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
    info = machine_info()

    from lmforge.data import load_corpus

    train_ds = load_corpus("shakespeare", "train")
    if args.quick:
        train_ds = train_ds.select(range(8))
    texts = list(train_ds["text"])
    valid = list(load_corpus("shakespeare", "validation")["text"])
    train_lmforge(["warm up the imports"] * 4, "bpe")  # untimed
    print(f"corpus: {sum(map(len, texts)) / 1e6:.2f} MB train, {len(valid)} validation docs; "
          f"{reps} reps; load average {os.getloadavg()[0]:.1f}")
    start = time.time()
    results = {
        "settings": {"vocab_size": VOCAB, "reps": reps, "quick": args.quick,
                     "train_bytes": sum(len(t.encode()) for t in texts)},
        "training": bench_training(train_ds, texts, reps, info),
        "unigram_vs_sentencepiece": bench_sentencepiece(train_ds, texts, valid, reps, info),
        "encoding": bench_encoding(train_ds, valid, max(reps, 5), info),
    }
    results["seconds"] = time.time() - start
    results["machine"] = finish(info)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("bench_tokenizers_quick.json" if args.quick else "bench_tokenizers.json")
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path} ({results['seconds']:.0f} s; load average max {info['load_average_max_1min']:.1f})")


if __name__ == "__main__":
    main()
