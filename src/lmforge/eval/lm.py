"""Language models on raw text: strided sliding-window perplexity and masked-token accuracy.

Causal models (``evaluate_lm_strided``) follow the Hugging Face guide "Perplexity of fixed-length
models": every text is tokenized, each followed by the tokenizer's document separator (EOS, or SEP
for BERT-style tokenizers; see ``lmforge.data.pipeline.separator_id``), and the whole stream
x_0 .. x_{N-1} is read through windows of ``max_length`` tokens whose starts advance by
``stride``. A window's inputs x[b:e] predict x[b+1:e+1]; it scores only the predictions that no
earlier window made, which are always its last ones (the tokens with the most context):

    tokens   x0 x1 x2 x3 x4 x5 x6 x7 x8 x9          max_length 4, stride 2
    window 0 [x0 x1 x2 x3]                          scores x1 x2 x3 x4
    window 1       [x2 x3 x4 x5]                    scores x5 x6
    window 2             [x4 x5 x6 x7]              scores x7 x8
    window 3                   [x6 x7 x8]           scores x9

So every token but the first is scored exactly once, each with at least ``max_length - stride + 1``
tokens of context, and one window covering the text gives the full-context figure. (The guide's
loop labels only the window's own tokens: its last logit goes unused and, with ``stride ==
max_length``, the first token of every window is never scored.)

Figures: ``loss`` (mean NLL in nats per scored token), ``perplexity``, ``bits_per_byte`` (see
``lmforge.eval.perplexity``: separators cover no bytes but their NLL counts),
``next_token_accuracy`` (argmax == target), ``tokens`` (scored) and ``bytes``.

Masked models (``evaluate_mlm``) read the same stream packed into rows as in pretraining and
masked by ``lmforge.data.collators.MLMCollator`` with a fixed seed (the same positions for every
model with the same tokenizer): ``loss``, ``perplexity`` (exp of the masked-token loss),
``masked_accuracy`` and ``masked_tokens``.

With an ``accelerator`` the windows (rows) are dealt round-robin over the processes and the sums
reduced, so the figures do not depend on the number of processes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from lmforge.data.collators import MLMCollator
from lmforge.data.packing import pack_flat
from lmforge.data.pipeline import DocumentEncoder, separator_id
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import text_bytes_scale, token_byte_lengths

_ENCODE_BATCH = 1000
_UNLIMITED = 1_000_000  # tokenizers without a limit report model_max_length = 1e30
DEFAULT_CONTEXT = 1024  # for models without a position limit (Mamba) and no tokenizer limit


# --------------------------------------------------------------------------- inputs


def token_stream(tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The token ids of ``texts`` (empty ones skipped) and their document lengths, without
    separators, as ``lmforge.data.packing.pack_flat`` takes them."""
    encoder = DocumentEncoder(tokenizer)
    tokens, lengths = [], []
    for i in range(0, len(texts), _ENCODE_BATCH):
        batch = [t for t in texts[i:i + _ENCODE_BATCH] if t]
        if batch:
            ids, n = encoder(batch)
            tokens.append(ids)
            lengths.append(n)
    if not tokens:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(tokens).astype(np.int64), np.concatenate(lengths)


def joined_ids(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """Every text's token ids followed by the document separator, as one (N,) int64 array."""
    tokens, lengths = token_stream(tokenizer, texts)
    lengths = lengths[lengths > 0]
    return np.insert(tokens, np.cumsum(lengths), separator_id(tokenizer))


def model_context(model: Any, tokenizer: Any = None) -> int | None:
    """The longest input the model takes (its position table), else the tokenizer's limit, else None."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < _UNLIMITED else None


def check_window(model: Any, tokenizer: Any, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """``max_length`` (default: the model's context) and ``stride`` (default: ``max_length``), checked."""
    context = model_context(model, tokenizer)
    if max_length is None:
        max_length = context or DEFAULT_CONTEXT
    elif max_length < 2:
        raise LmforgeError(f"--max-length must be at least 2 tokens, got {max_length}")
    elif context is not None and max_length > context and _has_position_limit(model):
        raise LmforgeError(f"--max-length {max_length} is longer than the model's context of {context} "
                           f"positions (config.max_position_embeddings); use at most {context}")
    if stride is None:
        stride = max_length
    if stride <= 0:
        raise LmforgeError(f"--stride must be a positive number of tokens, got {stride}")
    if stride > max_length:
        raise LmforgeError(f"--stride {stride} is larger than --max-length {max_length}: the tokens "
                           f"between two windows would never be scored; use a stride of 1..{max_length}")
    return max_length, stride


def _has_position_limit(model: Any) -> bool:
    """Whether inputs longer than the position table fail (learned/sinusoidal tables do; RoPE,
    ALiBi and models without positions run past it)."""
    kind = getattr(model.config, "position_embedding_type", "learned")
    return kind in ("learned", "absolute", "sinusoidal", None)


def _unwrapped(model: Any) -> Any:
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def forward_params(model: Any) -> set[str]:
    """The keyword arguments the model's ``forward`` names (peft and DDP wrappers looked through)."""
    params = inspect.signature(_unwrapped(model).forward).parameters.values()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def model_inputs_filter(model: Any, collate: Any) -> Any:
    """``collate`` whose batches keep only the columns the model's forward names, and ``labels``
    (seq_idx for GPT, position_ids for Mamba, token_type_ids for GPT are dropped)."""
    names = forward_params(model) | {"labels"}

    def collate_for_model(rows: list[dict]) -> dict:
        return {k: v for k, v in collate(rows).items() if k in names}

    if hasattr(collate, "set_epoch"):
        collate_for_model.set_epoch = collate.set_epoch  # dynamic masking per epoch
    return collate_for_model


def _device(model: Any, accelerator: Any) -> torch.device:
    return accelerator.device if accelerator is not None else next(model.parameters()).device


def _reduce(totals: torch.Tensor, accelerator: Any) -> list[float]:
    if accelerator is not None and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return totals.tolist()


def _rank(accelerator: Any) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


# --------------------------------------------------------------------------- causal LM


def strided_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` per window: inputs ``ids[begin:end]`` predict ``ids[begin+1:end+1]``
    and positions ``first..end-1`` are scored (their targets were not scored before)."""
    last = n_tokens - 1  # positions 0 .. N-2 have a next token
    windows, scored, begin = [], 0, 0
    while scored < last:
        end = min(begin + max_length, last)
        windows.append((begin, end, scored))
        scored, begin = end, begin + stride
    return windows


def _window_batches(windows: list[tuple[int, int, int]], batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Batches of windows of one length (all are ``max_length`` long but the last)."""
    batch: list[tuple[int, int, int]] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w[1] - w[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


@torch.no_grad()
def evaluate_lm_strided(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None,
                        stride: int | None = None, batch_size: int = 8, accelerator: Any = None,
                        progress: bool = True) -> dict[str, float]:
    """Strided sliding-window loss, perplexity, bits per byte and next-token accuracy of a causal LM.

    Args:
        model: a causal LM (``logits`` of shape (B, T, V) predicting the next token).
        tokenizer: its tokenizer.
        texts: the documents, joined with the tokenizer's separator.
        max_length: tokens per window (default: the model's context).
        stride: how far a window's start advances (default ``max_length``: disjoint windows).
        batch_size: windows per forward pass.
        accelerator: reduce the sums over its processes (each takes every P-th batch).
        progress: show a progress bar (main process only).

    Returns:
        ``loss``, ``perplexity``, ``bits_per_byte``, ``next_token_accuracy``, ``tokens``, ``bytes``,
        ``max_length``, ``stride``.

    Raises:
        LmforgeError: a bad ``max_length``/``stride``, or texts with fewer than two tokens.
    """
    if batch_size < 1:
        raise LmforgeError(f"--batch-size must be at least 1, got {batch_size}")
    max_length, stride = check_window(model, tokenizer, max_length, stride)
    ids = joined_ids(tokenizer, texts)
    if ids.size < 2:
        raise LmforgeError(f"no text to evaluate on: the texts make {ids.size} token(s) "
                           "(empty data?); perplexity needs at least 2")
    device = _device(model, accelerator)
    vocab = getattr(model.config, "vocab_size", None)
    byte_lengths = token_byte_lengths(tokenizer, vocab)
    scale = text_bytes_scale(texts, [ids], byte_lengths)  # per byte of the text, whatever the tokenizer drops
    byte_lengths = byte_lengths.to(device)
    stream = torch.from_numpy(ids).to(device)
    windows = strided_windows(ids.size, max_length, stride)
    batches = list(_window_batches(windows, batch_size))
    rank, world = _rank(accelerator)
    names = forward_params(model)
    extra = {k: v for k, v in (("use_cache", False),) if k in names}
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nll, tokens, bytes, correct
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", leave=False,
               disable=not progress or rank != 0)
    for batch in batches[rank::world]:
        keep = max(end - first for _, end, first in batch)  # scored positions are each window's last
        if "logits_to_keep" in names:
            extra["logits_to_keep"] = keep
        inputs = torch.stack([stream[b:e] for b, e, _ in batch])  # (B, T)
        logits = model(input_ids=inputs, **extra).logits[:, -keep:].float()  # (B, keep, V)
        ends = torch.tensor([end for _, end, _ in batch], device=device)  # (B,)
        counts = torch.tensor([end - first for _, end, first in batch], device=device)  # (B,)
        j = torch.arange(keep, device=device)
        targets = stream[ends[:, None] - keep + 1 + j]  # (B, keep): the token after each kept position
        mask = j >= keep - counts[:, None]  # (B, keep): each window's last `count` positions
        scored, targets = logits[mask], targets[mask]  # (M, V), (M,)
        totals[0] += F.cross_entropy(scored, targets, reduction="sum").double()
        totals[1] += targets.numel()
        totals[2] += byte_lengths[targets].sum()
        totals[3] += (scored.argmax(-1) == targets).sum()
        bar.update(len(batch) * world)
    bar.close()
    model.train(was_training)
    nll, tokens, nbytes, correct = _reduce(totals, accelerator)
    nbytes *= scale
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nll / math.log(2) / nbytes if nbytes else float("nan"),
            "next_token_accuracy": correct / tokens, "tokens": int(tokens), "bytes": round(nbytes),
            "max_length": max_length, "stride": stride}


# --------------------------------------------------------------------------- masked LM


@torch.no_grad()
def evaluate_mlm(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None,
                 batch_size: int = 8, mlm_probability: float = 0.15, seed: int = 0,
                 accelerator: Any = None, progress: bool = True) -> dict[str, float]:
    """Masked-token loss and accuracy of a masked LM, on a fixed-seed masking of the texts.

    The texts are packed into rows of ``max_length`` tokens as ``lmforge pretrain`` packs them
    (with per-document attention for lmforge models) and masked by ``MLMCollator`` (80% mask token,
    10% random, 10% unchanged; the prediction is scored at every selected position).

    Args:
        model: a masked LM.
        tokenizer: its tokenizer (needs a mask token).
        texts: the documents.
        max_length: tokens per row (default: the model's context).
        batch_size: rows per forward pass.
        mlm_probability: share of tokens selected for prediction.
        seed: masking seed (the same seed selects the same positions).
        accelerator: reduce the sums over its processes.
        progress: show a progress bar (main process only).

    Returns:
        ``loss``, ``perplexity``, ``masked_accuracy``, ``masked_tokens``, ``tokens``, ``max_length``.
    """
    if batch_size < 1:
        raise LmforgeError(f"--batch-size must be at least 1, got {batch_size}")
    max_length, _ = check_window(model, tokenizer, max_length, None)
    collate = MLMCollator(tokenizer, mlm_probability=mlm_probability, seed=seed)
    tokens, lengths = token_stream(tokenizer, texts)
    if tokens.size == 0:
        raise LmforgeError("no text to evaluate on: every text is empty")
    sep = separator_id(tokenizer)
    names = forward_params(model)
    document_masks = "position_ids" in names and model.config.model_type.startswith("lmforge_")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    packed = pack_flat(tokens, lengths, max_length, sep, pad_id=pad, document_masks=document_masks)
    rows = [dict(zip(packed, values, strict=True)) for values in zip(*packed.values(), strict=True)]
    device = _device(model, accelerator)
    rank, world = _rank(accelerator)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nll, masked, correct, tokens
    starts = range(0, len(rows), batch_size)
    bar = tqdm(total=len(starts), desc="masked LM", unit="batch", leave=False, disable=not progress or rank != 0)
    for start in starts[rank::world]:
        chunk = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items() if k in names or k == "labels"}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()  # (B, T, V)
        mask = labels != -100
        scored, targets = logits[mask], labels[mask]  # (M, V), (M,)
        totals[0] += F.cross_entropy(scored, targets, reduction="sum").double()
        totals[1] += mask.sum()
        totals[2] += (scored.argmax(-1) == targets).sum()
        totals[3] += sum(int(r["attention_mask"].sum()) for r in chunk)
        bar.update(world)
    bar.close()
    model.train(was_training)
    nll, masked, correct, n_tokens = _reduce(totals, accelerator)
    if masked == 0:
        raise LmforgeError(f"no token was masked in {int(n_tokens)} tokens (too little text for "
                           f"mlm_probability {mlm_probability})")
    loss = nll / masked
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "masked_accuracy": correct / masked,
            "masked_tokens": int(masked), "tokens": int(n_tokens), "max_length": max_length}
