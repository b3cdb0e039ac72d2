"""Tokenizer training (BPE, WordPiece, Unigram), special-token sets, and tokenizer evaluation.

``train_tokenizer(data, algorithm="bpe", vocab_size=8192, special_tokens=None, ...)`` returns a
transformers ``PreTrainedTokenizerFast``; ``evaluate_tokenizer(tokenizer, texts)`` measures it.
"""

from lmforge.tokenizers.algorithms import ALGORITHMS
from lmforge.tokenizers.evaluation import evaluate_tokenizer
from lmforge.tokenizers.special_tokens import SPECIAL_TOKEN_SETS, SpecialTokens
from lmforge.tokenizers.train import train_tokenizer

__all__ = ["ALGORITHMS", "SPECIAL_TOKEN_SETS", "SpecialTokens", "evaluate_tokenizer", "train_tokenizer"]
