"""Did lmforge and the raw ``tokenizers`` reference train the same tokenizer? Checked before any
timing in bench_tokenizers.py, in two parts:

1. Same work: the two trainers, serialized after training, are equal: every setting and the
   whole word-count table they were fed (``words``). Together with equal normalizers and
   pre-tokenizers this means both trained on the same input in the same way.
2. Same result, as far as ``tokenizers`` itself is deterministic (its trainers iterate Rust
   ``HashMap``s, whose order is seeded at random in every process):
   - BPE: the whole model is equal (vocabulary with ids, merges). Deterministic.
   - Unigram: the same pieces; the score at every id equal within ``SCORE_TOL`` (so pieces can
     only trade ids with pieces of the same score: the trainer sorts by score and breaks ties in
     hash order); each piece's score equal within ``SCORE_TOL`` (the E-step sums the word table
     in hash order: differences of ~1e-11), except the characters the trainer appends below its
     last piece at ``min_score + k * FLOOR_STEP``, k in hash-set order (``finalize`` in
     tokenizers' unigram/trainer.rs): those may trade their k.
   - WordPiece: special tokens at the same ids and the same alphabet (characters and ``##``
     characters). The rest of the vocabulary is not compared: two runs of the reference differ
     from each other (the ``##`` continuation characters get ids in hash order and merge ties
     are broken by id, so the merges, and even the vocabulary size when ``min_frequency`` stops
     the merges early, change from run to run); the check records how far lmforge is from the
     reference next to how far the reference is from itself.

The post-processor is not compared: it is not trained, and transformers' wrapper rewrites it.
Each check returns the first difference as a sentence, or None.
"""

from __future__ import annotations

import json
import re
from typing import Any

SCORE_TOL = 1e-9
FLOOR_STEP = 1e-4
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two JSON values first differ (``path`` names the key), or None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}: only in {'lmforge' if key in a else 'tokenizers'}"
            diff = first_difference(a[key], b[key], f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items (lmforge) vs {len(b)} (tokenizers)"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: {a!r} (lmforge) vs {b!r} (tokenizers)"


def trainer_state(trainer: Any) -> dict:
    """A trainer's settings and word-count table (``initial_alphabet`` is a set: sorted)."""
    def canonical(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: sorted(v) if k == "initial_alphabet" else canonical(v) for k, v in value.items()}
        return value

    return canonical(json.loads(trainer.__getstate__()))


def fed_words(trainer: Any) -> dict[str, int]:
    """The word-count table a trainer was fed (WordPiece keeps it in its inner BPE trainer)."""
    (state,) = trainer_state(trainer).values()
    return state["words"] if "words" in state else state["bpe_trainer"]["words"]


def same_work(lm_tok: Any, lm_trainer: Any, ref_tok: Any, ref_trainer: Any) -> str | None:
    """Same trainer settings, same word counts fed, same normalizer / pre-tokenizer / decoder."""
    diff = first_difference(trainer_state(lm_trainer), trainer_state(ref_trainer), "trainer")
    if diff:
        return diff
    lm, ref = json.loads(lm_tok.to_str()), json.loads(ref_tok.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder", "added_tokens"):
        diff = first_difference(lm[part], ref[part], part)
        if diff:
            return diff
    return None


def same_result(algorithm: str, lm_tok: Any, ref_tok: Any) -> str | None:
    """Same trained model (see the module docstring for what "same" means per algorithm)."""
    lm, ref = json.loads(lm_tok.to_str())["model"], json.loads(ref_tok.to_str())["model"]
    if algorithm == "bpe":
        return first_difference(lm, ref, "model")
    if algorithm == "unigram":
        settings = first_difference({k: v for k, v in lm.items() if k != "vocab"},
                                    {k: v for k, v in ref.items() if k != "vocab"}, "model")
        return settings or unigram_difference(lm["vocab"], ref["vocab"])
    return wordpiece_difference(lm["vocab"], ref["vocab"], n_special=len(lm_tok.get_added_tokens_decoder()))


def unigram_difference(lm: list[list], ref: list[list]) -> str | None:
    """Unigram pieces ``[[piece, score], ...]`` (id = position), compared as described above."""
    lm_score, ref_score = dict(lm), dict(ref)
    if lm_score.keys() != ref_score.keys():
        only_lm, only_ref = sorted(lm_score.keys() - ref_score.keys()), sorted(ref_score.keys() - lm_score.keys())
        return f"pieces differ: only in lmforge {only_lm[:5]}, only in tokenizers {only_ref[:5]}"
    for i, ((p, s), (q, t)) in enumerate(zip(lm, ref, strict=True)):
        if abs(s - t) > SCORE_TOL:
            return f"id {i}: lmforge {p!r} score {s!r} vs tokenizers {q!r} score {t!r}"
    floor = floor_characters(lm) | floor_characters(ref)
    for piece, s in lm_score.items():
        tol = FLOOR_STEP * len(floor) if piece in floor else SCORE_TOL
        if abs(s - ref_score[piece]) > tol:
            return f"piece {piece!r}: score {s!r} (lmforge) vs {ref_score[piece]!r} (tokenizers)"
    return None


def floor_characters(vocab: list[list]) -> set[str]:
    """Characters scored ``min_score + k * FLOOR_STEP``: appended by the trainer's ``finalize``."""
    low = min(s for p, s in vocab if not _BYTE_PIECE.fullmatch(p))
    chars = [(p, s) for p, s in vocab if len(p) == 1]

    def on_step(s: float) -> bool:  # k counts the characters appended before this one
        k = round((s - low) / FLOOR_STEP)
        return 0 <= k < len(chars) and abs(s - low - k * FLOOR_STEP) < SCORE_TOL

    return {p for p, s in chars if on_step(s)}


def wordpiece_difference(lm: dict[str, int], ref: dict[str, int], n_special: int) -> str | None:
    """Special-token ids and the alphabet (single characters and ``##`` + character)."""
    def first_ids(vocab: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(vocab.items(), key=lambda kv: kv[1])[:n_special]

    if first_ids(lm) != first_ids(ref):
        return f"special tokens {first_ids(lm)} (lmforge) vs {first_ids(ref)} (tokenizers)"
    alphabet = [{t for t in v if len(t.removeprefix("##")) == 1} for v in (lm, ref)]
    if alphabet[0] != alphabet[1]:
        return f"alphabet differs: {sorted(alphabet[0] ^ alphabet[1])[:10]}"
    return None


def vocabulary_overlap(a: Any, b: Any) -> dict[str, int]:
    """How far two vocabularies are apart: tokens in only one of them, tokens with another id."""
    va, vb = a.get_vocab(), b.get_vocab()
    return {"sizes": [len(va), len(vb)], "tokens_in_only_one": len(va.keys() ^ vb.keys()),
            "tokens_with_other_id": sum(1 for t, i in va.items() if t in vb and vb[t] != i)}
