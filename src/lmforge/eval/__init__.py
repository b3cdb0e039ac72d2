"""Evaluation: held-out loss, perplexity, bits per byte, and run reports (model cards, plots)."""

from lmforge.eval.perplexity import evaluate_lm, target_shift, token_byte_lengths

__all__ = ["evaluate_lm", "target_shift", "token_byte_lengths"]
