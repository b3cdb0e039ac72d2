"""The three tokenizer pipelines, built from ``tokenizers`` components (never hand-edited JSON).

Each ``build_*`` returns an untrained ``Tokenizer`` and its trainer; ``finish_*`` turns the
trained model into the final one. ``post_processor`` adds the special-token set's template.

- BPE: byte-level like GPT-2. The trainer gets ``initial_alphabet=ByteLevel.alphabet()`` so all
  256 byte symbols are in the vocabulary; without it unseen bytes are silently dropped.
- WordPiece: BERT-style normalizer (lowercase / accent stripping optional), BERT
  pre-tokenizer, ``##`` continuation pieces and the WordPiece decoder.
- Unigram: SentencePiece-style Metaspace (spaces become "▁"), with newline runs split off as
  their own pieces and no dummy prefix. The ``UnigramTrainer`` has no byte-fallback flag, so it
  trains ``vocab_size - 256`` pieces and the model is rebuilt with the 256
  ``<0x00>``..``<0xFF>`` byte pieces and ``byte_fallback=True``. The decoder is
  ``Replace("▁", " ") -> ByteFallback -> Fuse`` (a Metaspace decoder placed after ByteFallback
  would remove all spaces). Round trip is exact except for a literal "▁" in the input.
"""

from __future__ import annotations

import json

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

from lmforge.tokenizers.special_tokens import SpecialTokens

ALGORITHMS = ("bpe", "wordpiece", "unigram")
N_BYTES = 256


def minimum_vocab_size(algorithm: str, n_special: int) -> int:
    """The smallest vocabulary that holds the algorithm's fixed alphabet plus the special tokens.
    (WordPiece and Unigram also need room for every character of the corpus; checked after
    training for WordPiece and by the trainer for Unigram.)"""
    if algorithm == "bpe":
        return N_BYTES + n_special
    if algorithm == "unigram":
        return N_BYTES + n_special + 1  # + at least one trained piece
    return n_special + 1


def build_bpe(vocab_size: int, tokens: SpecialTokens, min_frequency: int,
              show_progress: bool) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=tokens.all(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    return tok, trainer


def build_wordpiece(vocab_size: int, tokens: SpecialTokens, min_frequency: int, show_progress: bool,
                    *, lowercase: bool, strip_accents: bool | None) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.WordPiece(unk_token=tokens.unk, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=tokens.all(),
        continuing_subword_prefix="##", show_progress=show_progress)
    return tok, trainer


def _unigram_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Newline runs become their own pieces. No dummy "▁" prefix (prepend "never"): a word at the
    # start of a text is treated like one at the start of a line, and since nothing is added
    # the decoder strips nothing, so leading and repeated spaces round-trip exactly (with
    # SentencePiece's dummy prefix a text starting with a space loses it on decode).
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
    ])


def build_unigram(vocab_size: int, tokens: SpecialTokens, show_progress: bool,
                  *, max_piece_length: int = 16) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = _unigram_pre_tokenizer()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - N_BYTES, special_tokens=tokens.all(), unk_token=tokens.unk,
        max_piece_length=max_piece_length, show_progress=show_progress)
    return tok, trainer


def finish_unigram(tok: Tokenizer) -> Tokenizer:
    """Rebuild the trained Unigram model with 256 byte pieces and byte fallback."""
    state = json.loads(tok.model.__getstate__())
    vocab = [(piece, score) for piece, score in state["vocab"]]
    have = {piece for piece, _ in vocab}
    floor = min(score for _, score in vocab) - 1.0  # bytes only where nothing else matches
    vocab += [(f"<0x{b:02X}>", floor) for b in range(N_BYTES) if f"<0x{b:02X}>" not in have]
    tok.model = models.Unigram(vocab, unk_id=state["unk_id"], byte_fallback=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def post_processor(tok: Tokenizer, algorithm: str, tokens: SpecialTokens) -> processors.PostProcessor | None:
    """BERT-style sets: ``[CLS] A [SEP] B [SEP]`` with token types 0/1. GPT-style: nothing
    added (GPT-2 behaviour; packing adds eos between documents). Byte-level BPE keeps its
    ByteLevel offsets processor in front."""
    steps: list[processors.PostProcessor] = []
    if algorithm == "bpe":
        steps.append(processors.ByteLevel(trim_offsets=False))
    if tokens.cls is not None and tokens.sep is not None:
        cls, sep = tokens.cls, tokens.sep
        steps.append(processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0",
            pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)
