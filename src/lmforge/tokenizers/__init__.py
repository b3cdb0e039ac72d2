"""Tokenizer training (BPE, WordPiece, Unigram), presets of special tokens, and metrics.

``train_tokenizer(data, algorithm="bpe", vocab_size=8192, preset=None, ...)`` returns a
transformers ``PreTrainedTokenizerFast``; ``evaluate_tokenizer(tokenizer, texts)`` measures it.
"""

from lmforge.tokenizers.algorithms import ALGORITHMS
from lmforge.tokenizers.metrics import evaluate_tokenizer
from lmforge.tokenizers.presets import PRESETS, SpecialTokens
from lmforge.tokenizers.train import train_tokenizer

__all__ = ["ALGORITHMS", "PRESETS", "SpecialTokens", "evaluate_tokenizer", "train_tokenizer"]
