"""Pack tokenized documents into fixed-length rows for language-model pretraining.

A batch of documents becomes one token stream, each document followed by one separator token
(EOS for causal tokenizers, SEP for BERT-style ones), cut into rows of exactly ``block_size``:

    docs   [a a a] [b b] [c c c c]                    separator S, block_size 4
    stream  a a a S b b S c c c c S
    rows   [a a a S] [b b S c] [c c c S]
    pos    [0 1 2 3] [0 1 2 0] [0 1 2 3]               position_ids (restart at each document
    seq    [0 0 0 0] [0 0 0 1] [0 0 0 0]               and each row); seq_idx: document index in row

Remainder: the stream of a batch rarely fills its last row. With ``remainder="pad"`` (default) the
tail is completed with ``pad_id`` and those positions get ``attention_mask == 0``; they form a
segment of their own (position_ids restart, seq_idx + 1), so no real token attends to them and
collators give them label -100. No token is lost or duplicated. ``remainder="drop"`` discards the
tail instead (fewer than ``block_size`` tokens per batch), as the classic ``run_clm`` recipe does.
Documents with no tokens are skipped (they would only add a separator).

Everything here is numpy; ``pack`` is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Literal

import numpy as np

from lmforge.errors import LmforgeError

Remainder = Literal["pad", "drop"]


def pack(
    documents: Sequence[Sequence[int]],
    block_size: int,
    separator_id: int,
    *,
    pad_id: int | None = None,
    document_masks: bool = True,
    remainder: Remainder = "pad",
) -> dict[str, np.ndarray]:
    """Pack token-id documents into rows of ``block_size`` tokens (see the module docstring).

    Args:
        documents: token ids of each document, without separators.
        block_size: tokens per row.
        separator_id: token appended after every document (EOS or SEP).
        pad_id: token used to fill the last row; defaults to ``separator_id``.
        document_masks: also return ``position_ids`` (restarting at 0 at each document start and
            at each row start) and ``seq_idx`` (document index within the row).
        remainder: ``"pad"`` keeps every token (last row padded), ``"drop"`` drops the tail.

    Returns:
        ``input_ids`` and ``attention_mask`` (1 = real token, 0 = padding), plus ``position_ids``
        and ``seq_idx`` when ``document_masks``; each int32 of shape (rows, block_size).
    """
    lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    tokens = np.fromiter(chain.from_iterable(documents), dtype=np.int32, count=int(lengths.sum()))
    return pack_flat(tokens, lengths, block_size, separator_id, pad_id=pad_id,
                     document_masks=document_masks, remainder=remainder)


def pack_flat(
    tokens: np.ndarray,
    lengths: np.ndarray,
    block_size: int,
    separator_id: int,
    *,
    pad_id: int | None = None,
    document_masks: bool = True,
    remainder: Remainder = "pad",
) -> dict[str, np.ndarray]:
    """``pack`` for documents given as one flat token array and their lengths (same result)."""
    if block_size < 1:
        raise LmforgeError(f"block_size must be a positive integer, got {block_size}")
    if remainder not in ("pad", "drop"):
        raise LmforgeError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
    pad_id = separator_id if pad_id is None else pad_id
    tokens = np.asarray(tokens, dtype=np.int32)
    lengths = np.asarray(lengths, dtype=np.int64)
    lengths = lengths[lengths > 0]  # empty documents contribute nothing (not even a separator)
    stream = np.insert(tokens, np.cumsum(lengths), separator_id)  # separator after each doc
    seg_lengths = lengths + 1  # (D,) document + its separator

    n_real = stream.size
    n_rows, tail = divmod(n_real, block_size)
    if tail and remainder == "pad":
        n_rows += 1
        pad = block_size - tail
        stream = np.concatenate([stream, np.full(pad, pad_id, dtype=np.int32)])
        seg_lengths = np.append(seg_lengths, pad)  # the padding is a segment of its own
    n = n_rows * block_size
    out = {
        "input_ids": stream[:n].reshape(n_rows, block_size),
        "attention_mask": (np.arange(n) < n_real).astype(np.int32).reshape(n_rows, block_size),
    }
    if document_masks:
        out.update(_document_positions(seg_lengths, n_rows, block_size))
    return out


def _document_positions(seg_lengths: np.ndarray, n_rows: int, block_size: int) -> dict[str, np.ndarray]:
    """position_ids and seq_idx for a stream of segments cut into ``n_rows`` rows."""
    n = n_rows * block_size
    seg_of_token = np.repeat(np.arange(seg_lengths.size), seg_lengths)[:n]  # (N,)
    seg_start = np.concatenate([[0], np.cumsum(seg_lengths)[:-1]])[seg_of_token]  # (N,)
    idx = np.arange(n)
    row_start = idx - idx % block_size
    # a document continuing from the previous row restarts at 0: the row cannot see its start
    position_ids = idx - np.maximum(seg_start, row_start)
    first_seg_of_row = seg_of_token[row_start]
    seq_idx = seg_of_token - first_seg_of_row
    shape = (n_rows, block_size)
    return {
        "position_ids": position_ids.astype(np.int32).reshape(shape),
        "seq_idx": seq_idx.astype(np.int32).reshape(shape),
    }


def unpack(rows: dict[str, np.ndarray]) -> np.ndarray:
    """The token stream of packed rows without padding (the inverse of ``pack``'s cutting)."""
    ids = np.asarray(rows["input_ids"]).reshape(-1)
    mask = np.asarray(rows["attention_mask"]).reshape(-1).astype(bool)
    return ids[mask]
