"""Atomic checkpoints: ``run_dir/checkpoints/step_N``, keep the last K (``lmforge.runs`` finds them).

A checkpoint is written by every process into ``.tmp-step_N`` (accelerate's ``save_state``
plus ``trainer_state.json``); only after ``wait_for_everyone()`` does the main process rename it
to ``step_N``. A crash while saving leaves a ``.tmp-*`` folder that is ignored (and cleaned up
next time), never a half-written ``step_N``: the latest complete checkpoint stays the latest.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.runs import STATE_FILE, checkpoints_dir, link_or_copy, list_checkpoints


@dataclass
class TrainerState:
    """What the loop needs beyond accelerate's state to continue exactly.

    ``data`` is the data position (``BatchStream.state_dict()``); the batch geometry is stored so
    a resume whose steps would hold another number of rows is refused instead of silently diverging.
    ``best_*`` and ``evals_since_best`` carry model selection and early stopping across a resume.
    """

    step: int = 0
    tokens_seen: int = 0
    data: dict[str, int] = field(default_factory=dict)
    world_size: int = 1
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    total_steps: int = 0
    skipped_steps: int = 0
    elapsed_seconds: float = 0.0
    best_value: float | None = None  # model selection: the best eval metric so far
    best_step: int | None = None
    evals_since_best: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, checkpoint: Path) -> TrainerState:
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            raise LmforgeError(f"{checkpoint} is not an lmforge checkpoint (no {STATE_FILE})")
        values = json.loads(path.read_text())
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def check_compatible(state: TrainerState, *, world_size: int, micro_batch_size: int,
                     grad_accum_steps: int, checkpoint: Path) -> None:
    """Refuse a resume whose optimizer steps hold another number of rows.

    The data position counts rows of one global order (``lmforge.data.batches``), so any
    geometry with the same rows per step (processes x micro_batch_size x grad_accum_steps)
    continues on exactly the same rows: 2 processes x 4 rows resume as 1 process x 8 rows.
    """
    old = (state.world_size, state.micro_batch_size, state.grad_accum_steps)
    new = (world_size, micro_batch_size, grad_accum_steps)
    old_rows, new_rows = old[0] * old[1] * old[2], new[0] * new[1] * new[2]
    if old_rows == new_rows:
        return
    raise LmforgeError(
        f"cannot resume {checkpoint}: its optimizer steps hold {old_rows} rows ({old[0]} process(es) x "
        f"micro_batch_size {old[1]} x grad_accum_steps {old[2]}), this run's hold {new_rows} ({new[0]} x "
        f"{new[1]} x {new[2]}). Another global batch would change the optimization itself (the gradient "
        f"of each step, the learning-rate schedule per row, the data position), so the run would not be "
        f"the one that was saved. Resume with processes x train.micro_batch_size x train.grad_accum_steps "
        f"= {old_rows} (any split of it continues exactly), or start a new run from its weights."
    )


class _TiedWeightNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextmanager
def _quiet_tied_weight_notice():
    """accelerate warns on every save that it stored a tied LM head once; the models re-tie it on
    load (exact resume is tested), so inside the progress bar the notice is only noise."""
    logger, notice = logging.getLogger("accelerate.utils.other"), _TiedWeightNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def link_tree(source: Path, target: Path) -> None:
    """Copy the folder ``source`` to ``target`` by hard links where the file system allows (the
    files of ``source`` are replaced, never rewritten in place, so a link stays a snapshot)."""
    shutil.copytree(source, target, copy_function=link_or_copy)


def save_checkpoint(accelerator: Any, run_dir: str | Path, state: TrainerState, keep_last: int,
                    extra: dict[str, Path] | None = None) -> Path:
    """Write ``step_N`` atomically on all processes; return its final path.

    ``extra``: folders to snapshot into the checkpoint under the given names (the best model so
    far, so that resuming from this checkpoint restores the selection it had made)."""
    root = checkpoints_dir(run_dir)
    final = root / f"step_{state.step}"
    tmp = root / f".tmp-step_{state.step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _quiet_tied_weight_notice():
        accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        for name, folder in (extra or {}).items():
            if folder.is_dir():
                link_tree(folder, tmp / name)
        (tmp / STATE_FILE).write_text(state.to_json())
    accelerator.wait_for_everyone()  # every process has finished writing
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep_last: int) -> None:
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = list_checkpoints(root.parent)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
