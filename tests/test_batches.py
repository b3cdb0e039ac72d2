"""BatchStream: the rows of every optimizer step depend only on rows per step (processes x
micro-batch x accumulation), across several epochs with shuffling, map-style and streaming;
positions resume exactly, also in another geometry with the same rows per step; eval batches
cover the split once, whatever the number of processes."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from lmforge.data.batches import BatchStream, eval_batches
from lmforge.errors import LmforgeError

N_ROWS = 53  # not a multiple of any step size below: every epoch drops a different tail


def rows_dataset(streaming: bool):
    ds = Dataset.from_dict({"row": list(range(N_ROWS))})
    return ds.to_iterable_dataset(num_shards=4) if streaming else ds


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([r["row"] for r in rows])
    return {"input_ids": ids[:, None], "labels": ids[:, None]}


def steps_seen(ds, *, micro: int, accum: int, procs: int, steps: int, resume_at: int | None = None,
               resume_geometry: tuple[int, int, int] | None = None) -> list[list[int]]:
    """The rows of each optimizer step, gathered over all (simulated) processes; optionally saved
    at ``resume_at`` and continued by fresh streams (in ``resume_geometry``)."""
    streams = [BatchStream(ds, micro, collate, seed=7, grad_accum_steps=accum, process_index=r,
                           num_processes=procs) for r in range(procs)]
    out = []
    for step in range(steps):
        if step == resume_at:
            state = streams[0].state_dict()
            assert all(s.state_dict() == state for s in streams)
            micro, accum, procs = resume_geometry or (micro, accum, procs)
            streams = [BatchStream(ds, micro, collate, seed=7, grad_accum_steps=accum, process_index=r,
                                   num_processes=procs) for r in range(procs)]
            for s in streams:
                s.load_state_dict(state)
        rows = [int(i) for _ in range(accum) for s in streams for i in s.next_batch()["input_ids"][:, 0]]
        out.append(sorted(rows))
    return out


GEOMETRIES = [(12, 1, 1), (6, 1, 2), (4, 1, 3), (3, 2, 2), (2, 3, 2), (6, 2, 1), (1, 12, 1)]  # 12 rows a step


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_each_step_holds_the_same_rows_at_any_geometry(streaming):
    ds = rows_dataset(streaming)
    steps = 3 * (N_ROWS // 12) + 2  # more than three epochs
    reference = steps_seen(ds, micro=12, accum=1, procs=1, steps=steps)
    assert all(len(set(rows)) == 12 for rows in reference)  # no row twice within a step
    epoch0, epoch1 = reference[:N_ROWS // 12], reference[N_ROWS // 12:2 * (N_ROWS // 12)]
    assert epoch0 != epoch1  # reshuffled per epoch
    assert reference[0] != list(range(12))  # shuffled at all
    for micro, accum, procs in GEOMETRIES[1:]:
        assert steps_seen(ds, micro=micro, accum=accum, procs=procs, steps=steps) == reference, (micro, accum, procs)


def test_processes_take_disjoint_slices_of_each_micro_batch():
    ds = rows_dataset(False)
    streams = [BatchStream(ds, 3, collate, seed=1, grad_accum_steps=2, process_index=r, num_processes=2)
               for r in range(2)]
    for _ in range(5):
        for _ in range(2):
            a, b = (set(s.next_batch()["input_ids"][:, 0].tolist()) for s in streams)
            assert len(a) == len(b) == 3 and not a & b


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
@pytest.mark.parametrize("geometry", [(12, 1, 1), (6, 1, 2), (3, 2, 2), (4, 3, 1)])
def test_resume_continues_exactly_in_any_geometry_with_the_same_step(streaming, geometry):
    ds = rows_dataset(streaming)
    steps = 2 * (N_ROWS // 12) + 3
    reference = steps_seen(ds, micro=12, accum=1, procs=1, steps=steps)
    resumed = steps_seen(ds, micro=6, accum=1, procs=2, steps=steps, resume_at=N_ROWS // 12 + 1,
                         resume_geometry=geometry)
    assert resumed == reference


def test_a_position_in_another_step_size_is_refused():
    ds = rows_dataset(False)
    stream = BatchStream(ds, 4, collate, num_processes=1)
    stream.next_batch()
    other = BatchStream(ds, 8, collate)
    with pytest.raises(LmforgeError, match="steps hold 4 rows"):
        other.load_state_dict(stream.state_dict())
    with pytest.raises(LmforgeError, match="older lmforge"):
        other.load_state_dict({"epoch": 0, "batch": 3})


def test_too_little_data_for_one_step_is_an_error():
    stream = BatchStream(rows_dataset(False), 20, collate, num_processes=3, process_index=1)
    assert len(stream) == 0
    with pytest.raises(LmforgeError, match="fewer than 60 rows"):
        stream.next_batch()


@pytest.mark.parametrize("procs", [1, 2, 3, 5])
def test_eval_batches_cover_the_split_once_with_the_same_count_per_process(procs):
    ds = rows_dataset(False)
    per_proc = [list(eval_batches(ds, 4, collate, process_index=r, num_processes=procs)) for r in range(procs)]
    assert len({len(batches) for batches in per_proc}) == 1  # sharded models need equal forwards
    seen = [int(i) for batches in per_proc for b in batches for i, lab in zip(b["input_ids"][:, 0], b["labels"][:, 0],
                                                                              strict=True) if lab != -100]
    assert sorted(seen) == list(range(N_ROWS))
    limited = [list(eval_batches(ds, 4, collate, 2, process_index=r, num_processes=procs)) for r in range(procs)]
    seen = sorted(int(i) for batches in limited for b in batches for i in b["input_ids"][:, 0])
    assert seen == list(range(min(N_ROWS, 2 * 4 * procs)))  # the first 2 global batches
