"""Batch collators for causal and masked language modelling.

Both take a list of rows (dicts with ``input_ids`` and optionally ``attention_mask``,
``position_ids``, ``seq_idx``, ``labels``: the packed rows of ``build_lm_dataset`` or any
variable-length tokenized examples, which are right-padded) and return a dict of tensors:

- ``input_ids`` (B, T) int64 and ``labels`` (B, T) int64 with -100 where no loss is taken;
- ``position_ids`` (B, T) int64 and ``seq_idx`` (B, T) int32 when the rows carry them;
- ``attention_mask`` (B, T) int64 only when the rows carry no ``position_ids``. transformers
  derives packed-document masks from ``position_ids`` only when ``attention_mask`` is None
  (masking_utils ``_preprocess_mask_arguments``); an all-ones mask would silently let documents
  attend to each other. The padding at the end of a packed row is a segment of its own
  (position_ids restart there), so no real token attends to it either.

Masking is reproducible and independent of batching: each row is masked with a generator seeded
from (seed, epoch, the row's token ids). The same row gets the same mask whichever batch, process
or accumulation micro-batch it lands in, and whatever the call order, so a resumed run (which
skips batches without collating them) masks exactly like an uninterrupted one. Call
``set_epoch`` to draw new masks for a new pass over the data (dynamic masking).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling

from lmforge.errors import LmforgeError

IGNORE_INDEX = -100
_SPACE_MARKERS = ("Ġ", "▁", " ")  # byte-level BPE, SentencePiece/Metaspace, plain


def _pad_rows(rows: Sequence[Any], value: int, length: int) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, r in enumerate(rows):
        r = np.asarray(r)
        out[i, : r.size] = r
    return out


def _stack(features: Sequence[Mapping[str, Any]], pad_token_id: int,
           pad_to_multiple_of: int | None) -> dict[str, np.ndarray]:
    """Right-pad every column to the longest row; ``attention_mask`` marks real tokens."""
    if not features:
        raise LmforgeError("cannot collate an empty list of examples")
    lengths = [len(f["input_ids"]) for f in features]
    t = max(lengths)
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    ids = _pad_rows([f["input_ids"] for f in features], pad_token_id, t)
    if "attention_mask" in features[0]:
        mask = _pad_rows([f["attention_mask"] for f in features], 0, t)
    else:
        mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in features[0]:
        batch["labels"] = _pad_rows([f["labels"] for f in features], IGNORE_INDEX, t)
    if "position_ids" in features[0]:
        pos = _pad_rows([f["position_ids"] for f in features], 0, t)
        batch["position_ids"] = _restart_padding_positions(pos, mask, lengths)
    if "seq_idx" in features[0]:
        seq = _pad_rows([f["seq_idx"] for f in features], 0, t)
        for i, n in enumerate(lengths):  # extra padding: one more segment
            if n < t:
                seq[i, n:] = seq[i, n - 1] + 1 if n else 0
        batch["seq_idx"] = seq
    return batch


def _restart_padding_positions(pos: np.ndarray, mask: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Positions of collate-time padding count 0, 1, ... so it forms its own segment."""
    t = pos.shape[1]
    for i, n in enumerate(lengths):
        if n < t:
            pos[i, n:] = np.arange(t - n)
    return pos


def _finish(batch: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, torch.Tensor]:
    out = {"input_ids": torch.from_numpy(batch["input_ids"]).long(),
           "labels": torch.from_numpy(labels).long()}
    if "position_ids" in batch:
        out["position_ids"] = torch.from_numpy(batch["position_ids"]).long()
    else:
        out["attention_mask"] = torch.from_numpy(batch["attention_mask"]).long()
    if "seq_idx" in batch:
        out["seq_idx"] = torch.from_numpy(batch["seq_idx"]).to(torch.int32)
    return out


class CausalLMCollator:
    """Collate rows for causal LM: labels are the input ids (the model shifts them), with -100 on
    padding and, for packed rows, on each document's first token (it cannot be predicted from
    inside the previous document, which is all its predecessor position may see).

    Args:
        pad_token_id: id used for collate-time padding of variable-length rows.
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _stack(features, self.pad_token_id, self.pad_to_multiple_of)
        labels = batch["labels"] if "labels" in batch else batch["input_ids"].copy()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        if "position_ids" in batch:
            labels[batch["position_ids"] == 0] = IGNORE_INDEX
        return _finish(batch, labels)


class MLMCollator:
    """Collate rows for masked LM with transformers' ``DataCollatorForLanguageModeling`` masking.

    ``mlm_probability`` of the (non-special, non-padding) tokens are selected; of those 80% become
    the mask token, 10% a random token, 10% stay unchanged; labels are -100 everywhere else. With
    ``whole_word`` the selection is per word (every piece of a selected word is masked) and, as in
    transformers, every selected token becomes the mask token. Word pieces are found from the
    vocabulary: WordPiece ``##`` continuations; for other tokenizers a piece continues a word when
    it does not start with a space marker (``Ġ``/``▁``) and both it and the previous piece touch
    with letters or digits.

    Args:
        tokenizer: a tokenizer with a mask token.
        mlm_probability: fraction of tokens (or words) selected for prediction.
        whole_word: mask whole words.
        seed: base seed of the per-row masking generators.
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(self, tokenizer: Any, mlm_probability: float = 0.15, whole_word: bool = False,
                 seed: int = 0, pad_to_multiple_of: int | None = None):
        if tokenizer.mask_token_id is None:
            raise LmforgeError(f"{type(tokenizer).__name__} has no mask token; masked LM needs one "
                               "(train the tokenizer with --special-tokens bert, or use a causal objective)")
        if not 0.0 < mlm_probability < 1.0:
            raise LmforgeError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        with warnings.catch_warnings():  # whole-word: "Setting mask_replace_prob to 1" is expected
            warnings.simplefilter("ignore")
            self._hf = DataCollatorForLanguageModeling(
                tokenizer, mlm=True, mlm_probability=mlm_probability, whole_word_mask=whole_word)
        self.tokenizer = tokenizer
        self.whole_word = whole_word
        self.seed = int(seed)
        self.epoch = 0
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._special = np.zeros(len(tokenizer), dtype=bool)
        self._special[[i for i in tokenizer.all_special_ids if i < len(tokenizer)]] = True
        self._continues, self._ends_alnum = (_continuation_table(tokenizer) if whole_word
                                             else (None, None))

    def set_epoch(self, epoch: int) -> None:
        """Draw different (but still reproducible) masks for pass ``epoch`` over the data."""
        self.epoch = int(epoch)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _stack(features, self.pad_token_id, self.pad_to_multiple_of)
        ids = batch["input_ids"]
        no_mask = self._special[ids] | (batch["attention_mask"] == 0)  # (B, T)
        out_ids, labels = ids.copy(), np.full_like(ids, IGNORE_INDEX)
        for i, f in enumerate(features):
            n = len(f["input_ids"])  # the row itself, without this batch's padding: same mask in any batch
            out_ids[i, :n], labels[i, :n] = self._mask_row(ids[i, :n], no_mask[i, :n])
        batch["input_ids"] = out_ids
        return _finish(batch, labels)

    def row_seed(self, ids: np.ndarray) -> int:
        """The masking seed of one row: a hash of (seed, epoch, token ids)."""
        h = hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=8,
                            key=f"{self.seed}:{self.epoch}".encode())
        return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)

    def _mask_row(self, ids: np.ndarray, no_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._hf.generator = torch.Generator().manual_seed(self.row_seed(ids))
        inputs = torch.from_numpy(ids.copy())[None]  # (1, T)
        special = torch.from_numpy(no_mask)[None]
        offsets = self._word_offsets(ids, no_mask)[None] if self.whole_word else None
        masked, labels = self._hf.torch_mask_tokens(inputs, special_tokens_mask=special,
                                                    offset_mapping=offsets)
        return masked[0].numpy(), labels[0].numpy()

    def _word_offsets(self, ids: np.ndarray, no_mask: np.ndarray) -> np.ndarray:
        """Synthetic character offsets (T, 2) that make transformers' whole-word logic see our
        words: a continuation piece starts exactly where the previous piece ends, a new word
        leaves a gap."""
        t = ids.size
        cont = self._continues[ids].copy()
        if self._ends_alnum is not None:
            cont[1:] &= self._ends_alnum[ids[:-1]]
        cont[0] = False
        cont[1:] &= ~no_mask[:-1]  # nothing continues a special token or padding
        ends = 2 * np.arange(t) + 1
        starts = np.where(cont, ends - 2, ends - 1)
        return np.stack([starts, ends], axis=1)


def _continuation_table(tokenizer: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Per vocabulary id: can this piece continue the previous piece's word? Plus, for
    non-WordPiece vocabularies, whether a piece ends in a letter or digit (a continuation must
    follow such a piece), else None."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    vocab = [tok or "" for tok in vocab]
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None)
    if type(model).__name__ == "WordPiece" and prefix:
        return np.array([tok.startswith(prefix) for tok in vocab], dtype=bool), None
    cont = np.array([bool(tok) and not tok.startswith(_SPACE_MARKERS) and tok[0].isalnum()
                     for tok in vocab], dtype=bool)
    ends_alnum = np.array([bool(tok) and tok[-1].isalnum() for tok in vocab], dtype=bool)
    return cont, ends_alnum
