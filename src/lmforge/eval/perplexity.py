"""Held-out loss, perplexity and bits per byte.

Bits per byte = (sum of the token negative log-likelihoods in nats) / ln 2 / (UTF-8 bytes of the
text those target tokens cover). It compares models with different tokenizers (and a
character-level model) on the same text. Special tokens (document separators) cover no text:
their NLL still counts, which makes the figure slightly pessimistic, never flattering.

A tokenizer that drops part of the text (WordPiece drops whitespace; ``[UNK]`` stands for no
bytes) covers fewer bytes than the text has, which would inflate its figure (by 23% for a
2048-token WordPiece on Shakespeare). ``text_bytes_scale`` measures that share on the evaluated
text and ``evaluate_lm(bytes_scale=...)`` divides by the text's own bytes instead; for a lossless
tokenizer (byte-level BPE, Unigram with byte fallback) the scale is exactly 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte -> the byte (``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _uses_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    text = backend.to_str()
    return '"type":"ByteLevel"' in text.replace(" ", "")


def token_byte_lengths(tokenizer: Any, vocab_size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes of text each token id stands for (0 for special tokens), as a (V,) tensor.

    Exact for byte-level BPE (each character of a token is one byte) and byte-fallback pieces
    (``<0xNN>``); for other tokenizers the token's text with ``▁``/``##`` markers resolved.
    """
    vocab = tokenizer.get_vocab()
    size = max(vocab_size or 0, len(tokenizer), max(vocab.values()) + 1)
    lengths = torch.zeros(size, dtype=torch.long)
    special = set(getattr(tokenizer, "all_special_ids", []))
    byte_level = _uses_byte_level(tokenizer)
    alphabet = _byte_level_alphabet() if byte_level else {}
    added = {t.content if hasattr(t, "content") else str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    for token, idx in vocab.items():
        if idx in special or idx >= size:
            continue
        if byte_level and token not in added and all(ch in alphabet for ch in token):
            lengths[idx] = len(token)
        elif _BYTE_TOKEN.match(token):
            lengths[idx] = 1
        else:
            text = token[2:] if token.startswith("##") else token.replace("▁", " ")
            lengths[idx] = len(text.encode("utf-8"))
    return lengths


def text_bytes_scale(texts: Iterable[str], token_ids: Iterable[Any], byte_lengths: torch.Tensor) -> float:
    """UTF-8 bytes of ``texts`` per byte of text their tokens stand for: 1.0 for a lossless
    tokenizer, above 1 for one that drops text (see the module docstring).

    ``token_ids``: every token of ``texts`` (arrays or lists of ids, padding excluded; special
    tokens count zero bytes).
    """
    lengths = byte_lengths.numpy()
    covered = sum(int(lengths[np.asarray(ids, dtype=np.int64)].sum()) for ids in token_ids)
    total = sum(len(t.encode("utf-8")) for t in texts if t)
    return total / covered if covered else 1.0


def packed_token_ids(rows: Any, batch_size: int = 1024) -> Iterable[np.ndarray]:
    """The tokens of packed rows (``build_lm_dataset``: ``input_ids`` with ``attention_mask``),
    padding left out, a batch of rows at a time: the ``token_ids`` of ``text_bytes_scale``."""
    for batch in rows.with_format("numpy").iter(batch_size=batch_size):
        yield batch["input_ids"][batch["attention_mask"] == 1]


def target_shift(model: nn.Module) -> int:
    """1 when the model's loss predicts the next token (causal LM), 0 when labels are aligned (MLM).

    Read from the loss transformers would use for the model (``loss_type``), like its Trainer.
    """
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    loss = LOSS_MAPPING.get(getattr(model, "loss_type", None) or "")
    if loss is not None:
        return int(loss is ForCausalLMLoss and not getattr(model.config, "is_encoder_decoder", False))
    return int("CausalLM" in type(model).__name__)


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *,
                byte_lengths: torch.Tensor | None = None, accelerator: Any = None,
                shift: int | None = None, bytes_scale: float = 1.0) -> dict[str, float]:
    """Loss (mean NLL per target token), perplexity and, with ``byte_lengths``, bits per byte
    (the bytes of the target tokens times ``bytes_scale``: see ``text_bytes_scale``).

    Sums are reduced over all processes when ``accelerator`` is given. Batches carry ``labels``
    (``-100`` ignored); ``shift`` is 1 for causal LM (default: inferred from the model).
    """
    was_training = model.training
    model.eval()
    shift = target_shift(model) if shift is None else shift
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        extra = {"use_cache": False} if shift else {}  # a cache would disable packed-document masks
        logits = model(**batch, **extra).logits.float()
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != -100
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                              ignore_index=-100, reduction="sum")
        totals[0] += nll.double()
        totals[1] += mask.sum()
        if byte_lengths is not None:
            totals[2] += byte_lengths.to(device)[labels[mask]].sum()
    if accelerator is not None and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    nll, tokens, nbytes = totals.tolist()
    nbytes *= bytes_scale
    if tokens == 0:
        raise ValueError("evaluation saw no target tokens (empty eval data?)")
    loss = nll / tokens
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}
    if byte_lengths is not None and nbytes > 0:
        out["bits_per_byte"] = nll / math.log(2) / nbytes
        out["bytes"] = round(nbytes)
    return out
