"""Tiny fast tokenizers and corpora for the packing / collator / pipeline / distributed tests.

Built directly with the ``tokenizers`` library (seconds, offline), so these tests do not depend
on ``lmforge.tokenizers``.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

WORDS = ("the king queen lord lady speak thou thee art hath doth wherefore love death night day "
         "sword crown blood heart sweet fair foul unspeakable notwithstanding").split()


def make_corpus(n_docs: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """Documents of random lengths (1..max_words words) from a small vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) + "." for _ in range(n_docs)]


def gpt_tokenizer(corpus: list[str] | None = None, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <|endoftext|> as EOS and a separate <|pad|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or make_corpus(200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", model_max_length=4096)


def bert_tokenizer(corpus: list[str] | None = None, vocab_size: int = 120) -> PreTrainedTokenizerFast:
    """Lower-cased WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK]; small vocab so words split."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(corpus or make_corpus(200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=4096)
