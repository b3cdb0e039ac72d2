"""Reproducible batches with an exact, saveable data position, the same at any process count.

Every process sees the whole packed dataset (a memory-mapped Arrow table, or the whole stream).
An epoch's order is ONE permutation of all rows, seeded by ``seed + epoch``, and training takes it
in steps of ``rows_per_step = micro_batch_size x grad_accum_steps x num_processes`` rows. Within
a step, micro-batch ``j`` of process ``r`` holds the step's rows ``[(j*P + r)*b, (j*P + r + 1)*b)``
(``P`` processes, ``b`` rows per micro-batch)::

    epoch order  [ step 0: 8 rows ][ step 1: 8 rows ] ... (tail < 8 rows dropped)
    P=2, b=4     [ r0 j0 | r1 j0 ]                       one process, b=8:  [    j0     ]
    P=1, b=4     [ j0    | j1    ]  (grad_accum_steps 2)

So the rows of optimizer step ``k`` depend only on ``rows_per_step``: 2 processes x 4 rows, one
process x 8 rows and one process x 4 rows x 2 accumulation steps train on the same rows at every
step, and a checkpoint written by one of them resumes in another. The position is (epoch, rows
of the epoch already consumed); resuming jumps there without reading the skipped rows. A
streaming dataset is shuffled by ``datasets`` with the same seed on every process, every process
reads the whole stream and keeps its slices, and resume skips the rows already consumed.

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

from lmforge.errors import LmforgeError


@dataclass
class DataPosition:
    """Where the next step starts: epoch and rows of that epoch's order already consumed."""

    epoch: int = 0
    row: int = 0


class BatchStream:
    """Endless micro-batches for one process, with ``position`` to save and restore.

    Args:
        dataset: a datasets ``Dataset``/``IterableDataset`` or any sequence of row dicts: the
            WHOLE training data (every process gets the same one).
        batch_size: rows per micro-batch (on each process).
        collate_fn: list of rows -> dict of tensors.
        seed: shuffling seed (epoch ``e`` uses ``seed + e``).
        shuffle: shuffle rows (per epoch).
        grad_accum_steps: micro-batches per optimizer step.
        process_index: this process's rank.
        num_processes: number of processes sharing each step.
    """

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Callable[[list[dict]], dict],
                 *, seed: int = 0, shuffle: bool = True, grad_accum_steps: int = 1,
                 process_index: int = 0, num_processes: int = 1):
        if not 0 <= process_index < num_processes:
            raise LmforgeError(f"process_index {process_index} is not in [0, {num_processes})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.num_processes = num_processes
        self.micro_per_step = grad_accum_steps
        self.rows_per_step = batch_size * grad_accum_steps * num_processes
        self.streaming = not hasattr(dataset, "__len__")
        self.steps_per_epoch = None if self.streaming else len(dataset) // self.rows_per_step
        self.position = DataPosition()
        self._steps: Iterator[list[dict]] | None = None  # the current epoch's remaining steps (rows)
        self._micro: list[list[dict]] = []  # this process's micro-batches left in the current step

    def __len__(self) -> int:
        """Optimizer steps per epoch (map-style datasets only)."""
        if self.steps_per_epoch is None:
            raise TypeError("a streaming BatchStream has no length")
        return self.steps_per_epoch

    # --------------------------------------------------------------------------- iteration

    def _epoch_steps(self, epoch: int, start_row: int) -> Iterator[list[dict]]:
        """The rows of each step of ``epoch`` (all processes' rows), from ``start_row`` on."""
        if self.streaming:
            ds = self.dataset
            if self.shuffle and hasattr(ds, "shuffle"):
                ds = ds.shuffle(seed=self.seed, buffer_size=1000)
                ds.set_epoch(epoch)
            rows = itertools.islice(iter(ds), start_row, None)
            while len(step := list(itertools.islice(rows, self.rows_per_step))) == self.rows_per_step:
                yield step
            return
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        for start in range(start_row, self.steps_per_epoch * self.rows_per_step, self.rows_per_step):
            yield self._take(order[start:start + self.rows_per_step])

    def _mine(self, step_rows: list[dict]) -> list[list[dict]]:
        """This process's micro-batches of a step's rows (see the module docstring)."""
        b, p, r = self.batch_size, self.num_processes, self.process_index
        return [step_rows[(j * p + r) * b:(j * p + r + 1) * b] for j in range(self.micro_per_step)]

    def _take(self, idx: list[int]) -> list[dict]:
        ds = self.dataset
        if hasattr(ds, "select") and hasattr(ds, "column_names"):
            batch = ds[idx]  # columnar dict of lists
            return [{k: batch[k][i] for k in batch} for i in range(len(idx))]
        return [ds[i] for i in idx]

    def _next_step(self) -> list[list[dict]]:
        for _ in range(2):
            if self._steps is None:
                self._steps = self._epoch_steps(self.position.epoch, self.position.row)
            step = next(self._steps, None)
            if step is not None:
                self.position.row += self.rows_per_step
                return self._mine(step)
            if self.position.row == 0:
                break
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._steps = None
        raise LmforgeError(
            f"the training data yields no full optimizer step: it holds fewer than {self.rows_per_step} rows "
            f"(micro_batch_size {self.batch_size} x grad_accum_steps {self.micro_per_step} x "
            f"{self.num_processes} process(es))")

    def next_rows(self) -> list[dict]:
        """This process's rows of the next micro-batch (wraps around epochs at step boundaries)."""
        if not self._micro:
            self._micro = self._next_step()
        return self._micro.pop(0)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next collated micro-batch (a collator with ``set_epoch`` learns the rows' epoch)."""
        rows = self.next_rows()
        if hasattr(self.collate_fn, "set_epoch"):
            self.collate_fn.set_epoch(self.position.epoch)  # dynamic MLM masking per pass
        return self.collate_fn(rows)

    # --------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, int]:
        """The position at the last step boundary, and the step size it counts in."""
        if self._micro:
            raise LmforgeError("the data position can be saved only between optimizer steps")
        return {"epoch": self.position.epoch, "row": self.position.row, "rows_per_step": self.rows_per_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "row" not in state:
            raise LmforgeError("this checkpoint's data position comes from an older lmforge that shuffled "
                               "each process's shard separately; it cannot be resumed exactly")
        if int(state["rows_per_step"]) != self.rows_per_step:
            raise LmforgeError(f"the checkpoint's steps hold {state['rows_per_step']} rows, this run's "
                               f"{self.rows_per_step}")
        self.position = DataPosition(int(state["epoch"]), int(state["row"]))
        self._steps = None
        self._micro = []


def eval_batches(dataset: Any, batch_size: int, collate_fn: Callable[[list[dict]], dict],
                 max_batches: int | None = None, *, process_index: int = 0,
                 num_processes: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over ``dataset`` in order, at most ``max_batches`` global batches.

    Global batch ``i`` is rows ``[i*B*P, (i+1)*B*P)`` of the dataset and process ``r`` takes its
    ``r``-th slice of ``B`` rows, so the rows evaluated do not depend on the number of processes.
    Every process yields the same number of batches (sharded models need every process in every
    forward): a process whose slice of the last global batch is empty yields one row whose labels
    are all ignored.
    """
    stream = iter(dataset)
    count = 0
    first: dict | None = None
    while max_batches is None or count < max_batches:
        rows = list(itertools.islice(stream, batch_size * num_processes))
        if not rows:
            return
        first = first or rows[0]
        mine = rows[process_index * batch_size:(process_index + 1) * batch_size]
        if mine:
            yield collate_fn(mine)
        else:
            batch = collate_fn([first])
            batch["labels"] = torch.full_like(batch["labels"], -100)
            yield batch
        count += 1
