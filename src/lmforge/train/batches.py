"""Reproducible batches with an exact, saveable data position.

The dataset given here is already this process's shard (``build_lm_dataset(process_index=...)``),
so nothing is re-sharded. A map-style dataset is shuffled per epoch with a generator seeded by
``seed + epoch`` and its position is (epoch, batch index): resuming jumps there without reading
the skipped rows. A streaming dataset is shuffled by ``datasets`` with the same seed per epoch and
resumes by skipping the rows already consumed.

Collation happens when a batch is asked for, never ahead (unlike accelerate's prefetching
dataloader), so a collator that draws random numbers (MLM masking) draws them inside the step
that uses the batch, under that step's seed: this is what makes resume exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DataPosition:
    """Where the next batch starts: epoch and number of batches already taken in it."""

    epoch: int = 0
    batch: int = 0


class BatchStream:
    """Endless micro-batches from a (per-process) dataset, with ``position`` to save and restore.

    Args:
        dataset: a datasets ``Dataset``/``IterableDataset`` or any sequence of row dicts.
        batch_size: rows per micro-batch.
        collate_fn: list of rows -> dict of tensors.
        seed: shuffling seed (epoch ``e`` uses ``seed + e``).
        shuffle: shuffle rows (per epoch).
        batches_per_epoch: cap on batches per epoch (use the minimum over processes so every
            process takes the same number of steps); None: all full batches of this shard.
    """

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Callable[[list[dict]], dict],
                 *, seed: int = 0, shuffle: bool = True, batches_per_epoch: int | None = None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self.shuffle = shuffle
        self.streaming = not hasattr(dataset, "__len__")
        self.batches_per_epoch = batches_per_epoch
        if not self.streaming:
            full = len(dataset) // batch_size
            self.batches_per_epoch = full if batches_per_epoch is None else min(full, batches_per_epoch)
        self.position = DataPosition()
        self._rows: Iterator[list[dict]] | None = None

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a streaming BatchStream has no length")
        return self.batches_per_epoch

    # --------------------------------------------------------------------------- iteration

    def _epoch_rows(self, epoch: int, start_batch: int) -> Iterator[list[dict]]:
        """Row lists for the batches of ``epoch`` from ``start_batch`` on."""
        if self.streaming:
            ds = self.dataset
            if self.shuffle and hasattr(ds, "shuffle"):
                ds = ds.shuffle(seed=self.seed, buffer_size=1000)
                ds.set_epoch(epoch)
            rows = itertools.islice(iter(ds), start_batch * self.batch_size, None)
            b = start_batch
            while self.batches_per_epoch is None or b < self.batches_per_epoch:
                chunk = list(itertools.islice(rows, self.batch_size))
                if len(chunk) < self.batch_size:
                    return
                yield chunk
                b += 1
            return
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        for b in range(start_batch, self.batches_per_epoch):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self._take(idx)

    def _take(self, idx: list[int]) -> list[dict]:
        ds = self.dataset
        if hasattr(ds, "select") and hasattr(ds, "column_names"):
            batch = ds[idx]  # columnar dict of lists
            return [{k: batch[k][i] for k in batch} for i in range(len(idx))]
        return [ds[i] for i in idx]

    def next_rows(self) -> list[dict]:
        """The rows of the next micro-batch (advances the position, wraps around epochs)."""
        for _ in range(2):
            if self._rows is None:
                self._rows = self._epoch_rows(self.position.epoch, self.position.batch)
            rows = next(self._rows, None)
            if rows is not None:
                self.position.batch += 1
                return rows
            if self.position.batch == 0:
                break
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._rows = None
        raise ValueError("the training data yields no full batch: it holds fewer rows than micro_batch_size")

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next collated micro-batch (a collator with ``set_epoch`` learns the rows' epoch)."""
        rows = self.next_rows()
        if hasattr(self.collate_fn, "set_epoch"):
            self.collate_fn.set_epoch(self.position.epoch)  # dynamic MLM masking per pass
        return self.collate_fn(rows)

    # --------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = DataPosition(int(state["epoch"]), int(state["batch"]))
        self._rows = None


def eval_batches(dataset: Any, batch_size: int, collate_fn: Callable[[list[dict]], dict],
                 max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over ``dataset`` in order (the last one may be smaller), at most ``max_batches``."""
    stream = iter(dataset)
    count = 0
    while max_batches is None or count < max_batches:
        rows = list(itertools.islice(stream, batch_size))
        if not rows:
            return
        yield collate_fn(rows)
        count += 1
