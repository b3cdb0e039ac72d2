"""From a text source to packed ``block_size`` rows: ``build_lm_dataset``.

One pass does the work: the fast (Rust) tokenizer encodes a large batch of documents at once
(``encode_batch_fast``: no offsets, no attention masks, no per-call Python padding logic), with
byte-level BPE tokenizers through a memo of repeated text pieces that gives exactly the same ids
(``DocumentEncoder``), and ``lmforge.data.packing.pack`` cuts the token stream into rows as numpy
arrays, so Arrow receives only the packed rows.

Caching: the map runs with an explicit fingerprint made of the source dataset's fingerprint, a
hash of the tokenizer (its full ``tokenizer.json`` plus the separator and pad ids), ``block_size``
and the packing options. A second run on the same source with the same tokenizer loads the
packed rows from the ``datasets`` cache instead of tokenizing again.

Remainder: packing works per map batch of ``batch_size`` documents; each batch's last row is
padded (see ``lmforge.data.packing``), so at most one partly padded row per batch of documents
and no token is lost or duplicated. Streaming and non-streaming use the same batches, so they
yield the same rows.

Distributed: every process gets the same packed rows (process 0 builds the cache while the
others wait, then they load it; streaming, every process packs the whole stream), and the
training loop's ``BatchStream`` gives each process its slice of every global batch. So neither
the packing nor the data order depends on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import partial
from itertools import chain
from typing import Any

import numpy as np
import torch.distributed as dist
from datasets import Dataset, Features, IterableDataset, IterableDatasetDict, List, Value
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from lmforge.data.packing import pack_flat
from lmforge.data.sources import load_corpus
from lmforge.errors import LmforgeError

PIPELINE_VERSION = "1"  # bump when the packed format changes: invalidates old caches
COLUMNS = ("input_ids", "attention_mask", "position_ids", "seq_idx")


def separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token placed after every document: SEP for BERT-style tokenizers (SEP and MASK), else EOS."""
    sep, eos = tokenizer.sep_token_id, tokenizer.eos_token_id
    if sep is not None and tokenizer.mask_token_id is not None:
        return sep
    if eos is not None:
        return eos
    if sep is not None:
        return sep
    raise LmforgeError(
        f"tokenizer {type(tokenizer).__name__} has neither an eos_token nor a sep_token; packing needs "
        "one to separate documents (set tokenizer.eos_token, or train it with --special-tokens gpt or bert)"
    )


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable hash of everything that decides the token ids: the serialized fast tokenizer plus
    the special-token ids packing uses."""
    backend = _backend(tokenizer)
    h = hashlib.sha256(backend.to_str().encode())
    h.update(f"|sep={separator_id(tokenizer)}|pad={tokenizer.pad_token_id}".encode())
    return h.hexdigest()[:16]


def _backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmforgeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; build_lm_dataset needs a "
            "PreTrainedTokenizerFast (lmforge.tokenizers.train_tokenizer returns one)"
        )
    return backend


def _private_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """A copy of the Rust tokenizer with truncation and padding off (documents are whole)."""
    backend = Tokenizer.from_str(_backend(tokenizer).to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


# Where memoised byte-level BPE cuts a document: before a whitespace character that follows a
# printable ASCII (so certainly non-whitespace) character. GPT-2's pre-tokenizer regex ends a
# pre-token there (no alternative continues from a non-space into whitespace) and looks ahead
# only from whitespace, so both sides are tokenized exactly as inside the whole document. With
# add_prefix_space the cut must be before a space: a piece starting with another character
# would get a prefix space.
_CUT = re.compile(r"(?<=[!-~])(?=[ \t\n\r])")
_CUT_BEFORE_SPACE = re.compile(r"(?<=[!-~])(?= )")
_MEMO_LIMIT = 1_000_000  # distinct pieces kept (~100 MB); the memo restarts beyond


class DocumentEncoder:
    """Token ids of documents, identical to ``encode_batch_fast(texts, add_special_tokens=False)``
    of the tokenizer, computed faster when that is provably the same thing.

    For byte-level BPE tokenizers (GPT-2 style: ByteLevel pre-tokenizer with its regex, no
    normalizer, no BPE dropout, no added token that strips neighbouring spaces or contains
    whitespace) documents are cut where the pre-tokenizer always cuts too (see ``_CUT``); each
    distinct piece is encoded once by the Rust tokenizer and remembered, and a document's ids are
    the concatenation of its pieces' ids. Natural text repeats its pieces (" the", " and", ...),
    so most of the regex and BPE work is skipped. Other tokenizers are encoded directly.

    Calling it returns ``(tokens, lengths)``: every document's ids concatenated (int32) and the
    number of ids per document; ``ids(texts)`` returns one list per document.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.backend = _private_backend(tokenizer)
        self.cut = _cut_pattern(self.backend)
        self._reset()

    @property
    def memoised(self) -> bool:
        return self.cut is not None

    def _reset(self) -> None:
        self.memo: dict[str, int] = {}  # piece -> index into the piece table
        self._table = np.zeros(0, dtype=np.int32)  # the pieces' ids, concatenated
        self._starts = np.zeros(0, dtype=np.int64)
        self._lens = np.zeros(0, dtype=np.int64)

    def ids(self, texts: list[str]) -> list[list[int]]:
        tokens, lengths = self(texts)
        return [a.tolist() for a in np.split(tokens, np.cumsum(lengths)[:-1])] if texts else []

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.cut is None:
            return _flatten([e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)])
        if len(self.memo) > _MEMO_LIMIT:
            self._reset()
        memo, new, seq = self.memo, [], []
        pieces_per_doc = np.empty(len(texts), dtype=np.int64)
        for d, text in enumerate(texts):
            pieces = self.cut.split(text)
            pieces_per_doc[d] = len(pieces)
            for piece in pieces:
                index = memo.get(piece)
                if index is None:
                    index = memo[piece] = len(memo)
                    new.append(piece)
                seq.append(index)
        if new:
            self._remember(self.backend.encode_batch_fast(new, add_special_tokens=False))
        seq_a = np.asarray(seq, dtype=np.int64)  # (P,) piece indices of the whole batch
        lens, starts = self._lens[seq_a], self._starts[seq_a]
        ends = np.cumsum(lens)
        # token k of the batch is table[starts[p] + (k - first token of its piece p)]
        tokens = self._table[np.arange(ends[-1] if lens.size else 0) + np.repeat(starts - (ends - lens), lens)]
        doc_end = np.concatenate([[0], ends])[np.cumsum(pieces_per_doc)]
        lengths = np.diff(np.concatenate([[0], doc_end]))
        return tokens, lengths

    def _remember(self, encodings: list) -> None:
        tokens, lengths = _flatten([e.ids for e in encodings])
        self._starts = np.concatenate([self._starts, self._table.size + np.cumsum(lengths) - lengths])
        self._lens = np.concatenate([self._lens, lengths])
        self._table = np.concatenate([self._table, tokens])


def _flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())), lengths


def _cut_pattern(backend: Any) -> re.Pattern | None:
    """The cut pattern when cutting provably leaves the tokenization unchanged, else None."""
    if not _memoisable(backend):
        return None
    add_prefix_space = json.loads(backend.to_str())["pre_tokenizer"].get("add_prefix_space", False)
    return _CUT_BEFORE_SPACE if add_prefix_space else _CUT


def _memoisable(backend: Any) -> bool:
    """Whether the tokenizer is GPT-2-style byte-level BPE with nothing that looks across a cut."""
    spec = json.loads(backend.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if spec.get("normalizer") is not None or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        return False
    if model.get("type") != "BPE" or model.get("dropout"):
        return False
    return all(not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
               and not any(c.isspace() for c in t.get("content", ""))
               for t in spec.get("added_tokens") or [])


def _tokenize_and_pack(batch: dict[str, list], *, encoder: DocumentEncoder, text_column: str,
                       block_size: int, sep: int, pad: int, document_masks: bool) -> dict[str, np.ndarray]:
    tokens, lengths = encoder([t for t in batch[text_column] if t])
    return pack_flat(tokens, lengths, block_size, sep, pad_id=pad, document_masks=document_masks, remainder="pad")


def _features(block_size: int, document_masks: bool) -> Any:
    names = COLUMNS if document_masks else COLUMNS[:2]
    return Features({name: List(Value("int32"), length=block_size) for name in names})


class _MainProcessFirst:
    """Let process 0 build the cache while the others wait, then let them load it."""

    def __init__(self):
        self.sync = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.main = not self.sync or dist.get_rank() == 0

    def __enter__(self):
        if self.sync and not self.main:
            dist.barrier()

    def __exit__(self, *exc):
        if self.sync and self.main:
            dist.barrier()


def build_lm_dataset(
    source: Any,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    split: str = "train",
    streaming: bool = False,
    document_masks: bool = True,
    text_column: str = "text",
    seed: int = 0,
    batch_size: int = 1000,
    shuffle_buffer: int = 0,
) -> Dataset | IterableDataset:
    """Tokenize and pack a text source into rows of exactly ``block_size`` tokens.

    Args:
        source: anything ``lmforge.data.load_corpus`` accepts (built-in name, local path/glob/folder,
            Hub id, or a ``datasets`` dataset).
        tokenizer: a fast tokenizer; EOS (or SEP for BERT-style tokenizers) separates documents and
            the pad token (else the separator) fills the last row of each batch.
        block_size: tokens per row.
        split: which split of the source.
        streaming: return an ``IterableDataset`` that tokenizes lazily (corpora larger than memory).
        document_masks: add ``position_ids`` (restarting at each document) and ``seq_idx`` (document
            index within the row) so attention and state do not cross documents.
        text_column: the column holding the text.
        seed: seeds the streaming shuffle (with ``shuffle_buffer > 0``); map-style rows are
            shuffled by the training loop's sampler, the packed content never depends on it.
        batch_size: documents tokenized and packed together (one padded row at most per batch).
        shuffle_buffer: streaming only: shuffle packed rows through a buffer of this many rows
            (and the shard order), seeded by ``seed``; 0 keeps the source order.

    Returns:
        A dataset with int32 columns ``input_ids``, ``attention_mask`` (0 on the padding of a
        batch's last row) and, with ``document_masks``, ``position_ids`` and ``seq_idx``.

    Raises:
        LmforgeError: bad block_size, no text column, or no tokens left after filtering.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise LmforgeError(f"block_size must be an integer >= 2, got {block_size!r}")
    ds = load_corpus(source, split, streaming=streaming, text_column=text_column)
    column = "text"  # load_corpus renames text_column to "text"
    sep = separator_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    fn = partial(_tokenize_and_pack, encoder=DocumentEncoder(tokenizer), text_column=column,
                 block_size=block_size, sep=sep, pad=pad, document_masks=document_masks)
    features = _features(block_size, document_masks)
    if streaming:
        packed = _build_streaming(ds, fn, features, column, batch_size, source)
        return packed.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else packed
    fingerprint = _fingerprint(ds._fingerprint, tokenizer, block_size, document_masks, column, batch_size)
    with _MainProcessFirst():
        packed = ds.select_columns([column]).map(
            fn, batched=True, batch_size=batch_size, remove_columns=[column], features=features,
            new_fingerprint=fingerprint, desc="lmforge: tokenize + pack",
        )
    if len(packed) == 0:
        raise LmforgeError(f"{source}: no tokens left after dropping empty documents (split {split!r})")
    return packed


def _fingerprint(source_fp: str, tokenizer: PreTrainedTokenizerBase, block_size: int,
                 document_masks: bool, column: str, batch_size: int) -> str:
    key = "|".join(map(str, (PIPELINE_VERSION, source_fp, tokenizer_hash(tokenizer), block_size,
                             document_masks, column, batch_size)))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _build_streaming(ds: IterableDataset | IterableDatasetDict, fn: Any, features: Any, column: str,
                     batch_size: int, source: Any) -> IterableDataset:
    if ds.column_names is not None:
        ds = ds.select_columns([column])
    packed = ds.map(fn, batched=True, batch_size=batch_size, remove_columns=[column], features=features)
    if next(iter(packed), None) is None:
        raise LmforgeError(f"{source}: no tokens left after dropping empty documents (streaming)")
    return packed
