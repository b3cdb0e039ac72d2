"""The one training loop: any model, any objective, one process or many.

Per optimizer step ``s``:
  1. ``torch.manual_seed(step_seed(seed, s, rank))``: dropout and collator randomness depend on
     the step (and the process) only, so a resumed run draws the same numbers as an
     uninterrupted one.
  2. Take ``grad_accum_steps`` micro-batches, count their target tokens, sum over processes:
     ``n`` = targets in the whole window on all processes.
  3. Each micro-batch's loss is (sum of its token losses) / ``n`` (``num_items_in_batch``),
     times the world size because DDP averages gradients: the gradient is exactly the one of a
     single big batch, whatever the padding or masking of each micro-batch. A model whose loss
     is a mean over rows (sequence classification) is weighted by its share of the window's rows.
  4. Non-finite loss/gradient: stop (saving the last good state) or skip the step.
  5. Clip, step, schedule, log, evaluate, checkpoint; Ctrl-C/SIGTERM ends at a step every
     process agrees on, after a checkpoint. Mixture-of-experts models also update their routers'
     selection biases after each step and log their expert load (``moe_stats``).
"""

from __future__ import annotations

import inspect
import math
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.data.batches import BatchStream
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import target_shift
from lmforge.train.checkpoint import (
    TrainerState,
    check_compatible,
    link_tree,
    save_checkpoint,
)
from lmforge.train.config import LoopConfig, OptimConfig
from lmforge.train.distributed import distributed_kind
from lmforge.train.moe_stats import ExpertLoad
from lmforge.train.optim import build_optimizer, build_scheduler, refit_schedule
from lmforge.train.tracking import MetricsLogger, measure_peak_flops


class NonFiniteLossError(LmforgeError):
    """The loss or gradient norm became NaN/inf; the message names the step and the checkpoint."""


@dataclass
class TrainResult:
    """How a ``Trainer.fit`` ended."""

    step: int
    tokens_seen: int
    status: str  # "completed", "interrupted", "time budget" or "early stopped"
    last_checkpoint: Path | None
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_final: bool = False  # last_eval is the full evaluation of the model as training ended
    skipped_steps: int = 0
    elapsed_seconds: float = 0.0
    stop_signal: int | None = None  # SIGINT/SIGTERM that interrupted the run (None: another process's)
    best_step: int | None = None  # model selection: the step of the best evaluation
    best_value: float | None = None

    @property
    def exit_code(self) -> int:
        """What a command should exit with: 0, or 128 + the signal for an interrupted run (130 for
        Ctrl-C, 143 for SIGTERM), as shells expect, so scripts can tell it from a finished run."""
        if self.status != "interrupted":
            return 0
        return 128 + (self.stop_signal or signal.SIGTERM)


@dataclass
class ModelSelection:
    """Keep the best model by an evaluation metric, and stop early when it stops improving.

    After every evaluation, ``metric`` is compared with the best so far; on improvement
    ``on_best(model, step, metrics)`` is called on every process (it saves the model into
    ``folder``, replacing its files rather than rewriting them in place). With ``patience`` > 0
    the run ends ("early stopped") after ``patience`` evaluations in a row without improvement.
    Every checkpoint holds a snapshot of ``folder`` and the best value and count, so a resume
    (into this run folder or another) continues with the selection as it was at that step.
    """

    metric: str
    greater_is_better: bool
    on_best: Callable[[nn.Module, int, dict[str, float]], None]
    patience: int = 0
    folder: Path | None = None

    def improves(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        return best is None or (value > best if self.greater_is_better else value < best)


def rows_of(batch: dict[str, torch.Tensor]) -> int:
    """Loss terms of a batch whose model averages its loss over rows (sequence classification)."""
    return int(batch["labels"].shape[0])


def make_accelerator(run_dir: str | Path, mixed_precision: str = "no", *, trackers: bool = True):
    """The Accelerator the loop expects: scheduler stepped once per optimizer step, and
    tensorboard logging into ``run_dir`` when tensorboard is installed."""
    log_with = None
    if trackers:
        try:
            import tensorboard  # noqa: F401  (optional, lmforge[tensorboard]: logs only when installed)

            log_with = "tensorboard"
        except ImportError:
            pass
    return Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                       log_with=log_with, project_dir=str(run_dir))


def step_seed(seed: int, step: int, process_index: int = 0) -> int:
    """The seed of optimizer step ``step`` on one process: the same on resume, distinct per process
    (so data-parallel replicas do not draw the same dropout masks for their different rows)."""
    return seed + step + process_index * 1_000_003


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _StopFlag:
    """SIGINT/SIGTERM set a flag (the loop stops at the next step boundary); a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self.signal: int | None = None  # the signal that asked to stop
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = self.signal or signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Train ``model`` on micro-batches from ``train_data`` with AdamW and a warmup schedule.

    Args:
        model: a transformers-style model returning ``.loss`` when given ``labels``.
        train_data: this process's ``BatchStream`` (built with this run's grad_accum_steps,
            process_index and num_processes).
        config: the loop settings.
        optim: optimizer and schedule settings.
        run_dir: where metrics.jsonl and checkpoints/ go.
        accelerator: from ``make_accelerator`` (one is created when None).
        evaluate: called with the (prepared) model and ``final`` (True for the last evaluation, which
            may use the whole eval split); returns metrics such as loss and bits_per_byte.
        flops_per_token: training FLOPs per token for the MFU estimate (None: not reported).
        clock: the wall clock of the time budget (seconds; tests pass a simulated one).
        count_targets: for a model whose ``loss`` is a mean over something other than the
            ``labels != -100`` tokens (sequence classification: rows, see ``rows_of``), the count
            of that in a micro-batch; each micro-batch's loss is then weighted by its share of the
            window. None: token-level losses, normalized through ``num_items_in_batch``.
        select: keep the best model by an eval metric and stop early (see ``ModelSelection``).
        on_checkpoint: ``(trainer, checkpoint_dir)`` called on every process after each saved
            checkpoint (to publish that point of training; collectives are allowed).
        objective: ``(model, batch) -> output`` computing the loss instead of ``model(**batch).loss``
            (preference tuning): ``output.loss`` is a mean over the micro-batch's ``count_targets``
            units and ``output.sums`` per-unit figures summed over them, logged as means per unit
            of the step (rewards, margins).
    """

    def __init__(self, model: nn.Module, train_data: BatchStream, config: LoopConfig, optim: OptimConfig,
                 run_dir: str | Path, *, accelerator: Any = None,
                 evaluate: Callable[[nn.Module, bool], dict[str, float]] | None = None,
                 flops_per_token: float | None = None, clock: Callable[[], float] = time.perf_counter,
                 count_targets: Callable[[dict[str, torch.Tensor]], int] | None = None,
                 select: ModelSelection | None = None,
                 on_checkpoint: Callable[[Trainer, Path], None] | None = None,
                 objective: Callable[[nn.Module, dict[str, torch.Tensor]], Any] | None = None):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator or make_accelerator(run_dir, config.mixed_precision)
        self.train_data = train_data
        self.evaluate_fn = evaluate
        self.flops_per_token = flops_per_token
        self.clock = clock
        self.select = select
        self.on_checkpoint = on_checkpoint
        self._early_stop = False
        self._count_fn = count_targets
        if objective is not None and count_targets is None:
            raise LmforgeError("Trainer: an objective needs count_targets (the units its loss is a mean over)")
        self.objective = objective
        self._step_figures: dict[str, float] = {}
        self._experts = ExpertLoad(model)  # MoE layers' load and router losses (none: a dense model)
        self.shift = target_shift(model)
        if config.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise LmforgeError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._check_stream(train_data)
        kind = distributed_kind(self.accelerator)
        if optim.name == "muon" and kind in ("FSDP", "DEEPSPEED"):
            raise LmforgeError(f"optim.name: muon cannot run under {kind}, which shards or wraps the weight "
                               "matrices that Muon orthogonalizes whole; launch with DDP, or use optim.name: adamw")
        optimizer = build_optimizer(model, optim, log=self.accelerator.is_main_process)
        scheduler = build_scheduler(optimizer, optim, config.max_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.forward = torch.compile(self.model) if config.compile else self.model
        forward_fn = self.accelerator.unwrap_model(self.model).forward
        self._pass_num_items = count_targets is None and _accepts(forward_fn, "num_items_in_batch")
        self._pass_no_cache = _accepts(forward_fn, "use_cache") and self.shift == 1
        self.max_grad_norm = optim.max_grad_norm
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._plain_clip = self._can_clip_plainly()
        self.state = TrainerState(world_size=self.accelerator.num_processes,
                                  micro_batch_size=config.micro_batch_size,
                                  grad_accum_steps=config.grad_accum_steps, total_steps=config.max_steps)
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, float] = {}
        self._announced_total = config.max_steps  # the step count the time budget last printed

    def _check_stream(self, data: BatchStream) -> None:
        acc, cfg = self.accelerator, self.config
        want = (cfg.micro_batch_size, cfg.grad_accum_steps, acc.process_index, acc.num_processes)
        got = (data.batch_size, data.micro_per_step, data.process_index, data.num_processes)
        if want != got:
            names = "(micro_batch_size, grad_accum_steps, process_index, num_processes)"
            raise LmforgeError(f"train_data: the BatchStream was built for {names} = {got} but the loop runs "
                               f"{want}; build it with the loop's settings and the accelerator's ranks")

    # --------------------------------------------------------------------------- resume

    def resume(self, checkpoint: str | Path) -> None:
        """Restore model, optimizer, scheduler, RNG and the data position from ``checkpoint``."""
        checkpoint = Path(checkpoint)
        state = TrainerState.read(checkpoint)
        check_compatible(state, world_size=self.accelerator.num_processes,
                         micro_batch_size=self.config.micro_batch_size,
                         grad_accum_steps=self.config.grad_accum_steps, checkpoint=checkpoint)
        self.accelerator.load_state(str(checkpoint))
        self.train_data.load_state_dict(state.data)
        folder = self.select.folder if self.select is not None else None
        if folder is not None and (checkpoint / folder.name).is_dir() and state.best_step is not None:
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:  # the best model as of the checkpoint
                if folder.exists():
                    shutil.rmtree(folder)
                link_tree(checkpoint / folder.name, folder)
            self.accelerator.wait_for_everyone()
        self.state = state
        self.last_checkpoint = checkpoint
        if (state.total_steps != self.config.max_steps and self.config.max_minutes is None
                and self.accelerator.is_main_process):
            print(f"note: {checkpoint} belongs to a run of {state.total_steps} steps (its learning-rate schedule "
                  f"ends there), which continues as it was; train.max_steps {self.config.max_steps} applies to a "
                  "new run (start one from this run's final model to train longer)", flush=True)

    # --------------------------------------------------------------------------- one step

    def _count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        if self._count_fn is not None:
            return self._count_fn(batch)
        labels = batch["labels"]
        if self.shift:
            labels = labels[..., self.shift:]
        return int((labels != -100).sum())

    def _global_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def _train_step(self) -> tuple[float, float, int]:
        """Forward/backward over one accumulation window; returns (loss, grad norm, tokens). The
        objective's figures of the window (means over all processes) go to ``_step_figures``."""
        acc, cfg = self.accelerator, self.config
        torch.manual_seed(step_seed(cfg.seed, self.state.step, acc.process_index))
        micro = [self.train_data.next_batch() for _ in range(cfg.grad_accum_steps)]
        counts = [self._count_targets(b) for b in micro]
        local_tokens = sum(int(b["input_ids"].numel()) for b in micro)
        total_targets, tokens = self._global_sum([sum(counts), local_tokens])
        if total_targets == 0:
            raise LmforgeError(f"step {self.state.step}: the batch holds no target tokens (all labels are -100)")
        world = acc.num_processes
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        figure_sums: dict[str, torch.Tensor] = {}
        for i, (batch, count) in enumerate(zip(micro, counts, strict=True)):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            kwargs = {}
            if self._pass_no_cache:
                kwargs["use_cache"] = False
            if self._pass_num_items:
                kwargs["num_items_in_batch"] = torch.tensor(total_targets, device=acc.device)
            sync = acc.no_sync(self.model) if i < len(micro) - 1 else nullcontext()
            with sync:
                if self.objective is not None:
                    out = self.objective(self.forward, batch)
                    loss = out.loss
                    for name, value in out.sums.items():
                        figure_sums[name] = figure_sums.get(name, 0.0) + value.detach().double()
                else:
                    loss = self.forward(**batch, **kwargs).loss
                if not self._pass_num_items:  # a mean over this micro-batch -> its share of the window
                    loss = loss * (count / total_targets)
                acc.backward(loss * world)
            loss_sum += loss.detach().double()
        names = list(figure_sums)
        window_loss, *figures = self._global_sum([loss_sum.item(), *(float(figure_sums[n]) for n in names)])
        self._step_figures = {name: value / total_targets for name, value in zip(names, figures, strict=True)}
        grad_norm = float("nan")
        if self.max_grad_norm > 0:
            clip = torch.nn.utils.clip_grad_norm_ if self._plain_clip else acc.clip_grad_norm_
            grad_norm = float(clip(self._params, self.max_grad_norm))
        return window_loss, grad_norm, int(tokens)

    def _can_clip_plainly(self) -> bool:
        """torch's clip_grad_norm_ is what accelerate ends up calling for plain tensors without an
        fp16 grad scaler; calling it directly avoids accelerate's per-call package probing (~5 ms
        a step, measured in benchmarks/bench_train.py). Sharded/DeepSpeed/fp16 go through accelerate."""
        kind = distributed_kind(self.accelerator)
        return (kind in ("NO", "MULTI_CPU", "MULTI_GPU") and self.accelerator.mixed_precision != "fp16"
                and not any(isinstance(p, DTensor) for p in self._params))

    # --------------------------------------------------------------------------- the loop

    def fit(self) -> TrainResult:
        """Train until ``max_steps`` (or the time budget, or a stop signal)."""
        acc, cfg, state = self.accelerator, self.config, self.state
        logger = MetricsLogger(acc, self.run_dir, resume_step=state.step if state.step else None,
                               progress_bar=cfg.progress, total_steps=state.total_steps,
                               use_trackers=bool(acc.log_with))
        peak = (cfg.peak_tflops * 1e12 if cfg.peak_tflops else
                measure_peak_flops(acc.device) if self.flops_per_token else None)
        status = "completed"
        clock = _Clock(state.elapsed_seconds, cfg.max_minutes, state.step, now=self.clock)
        window_start, window_tokens = time.perf_counter(), 0
        self.model.train()
        try:
            with _StopFlag() as stop:
                while state.step < state.total_steps:
                    before = (dict(self.train_data.state_dict()), state.step)
                    loss, grad_norm, tokens = self._train_step()
                    if not (math.isfinite(loss) and (math.isfinite(grad_norm) or self.max_grad_norm <= 0)):
                        if not cfg.skip_nonfinite:
                            self.optimizer.zero_grad(set_to_none=True)
                            self._stop_on_nonfinite(loss, grad_norm, before, logger)
                        state.skipped_steps += 1
                        logger.write(f"step {state.step + 1}: loss {loss} / grad norm {grad_norm} is not finite; "
                                     "step skipped (train.skip_nonfinite)")
                        self.optimizer.zero_grad(set_to_none=True)
                    else:
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        self._experts.after_step(self._global_sum)
                    self.scheduler.step()
                    state.step += 1
                    state.tokens_seen += tokens
                    window_tokens += tokens
                    state.data = self.train_data.state_dict()
                    state.elapsed_seconds = clock.elapsed()

                    if state.step % cfg.log_every == 0 or state.step == state.total_steps:
                        dt = max(time.perf_counter() - window_start, 1e-9)
                        record = {"step": state.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                                  "grad_norm": grad_norm, "tokens_seen": state.tokens_seen,
                                  "tokens_per_s": window_tokens / dt, "elapsed_s": state.elapsed_seconds,
                                  **self._step_figures, **self._experts.figures(self._global_sum)}
                        if peak and self.flops_per_token:
                            record["mfu"] = self.flops_per_token * record["tokens_per_s"] / acc.num_processes / peak
                        logger.log(record)
                        window_start, window_tokens = time.perf_counter(), 0
                    logger.progress(state.step, state.total_steps, {"loss": f"{loss:.3f}"})

                    stop_requested, new_total, over_budget = self._agree(
                        stop.requested, clock.decide(state.step, state.total_steps, cfg.max_steps))
                    if new_total:
                        self._refit(int(new_total), logger)
                    if state.step == state.total_steps:
                        break
                    if cfg.eval_every and state.step % cfg.eval_every == 0:
                        self._evaluate(logger)
                    if cfg.save_every and state.step % cfg.save_every == 0 or self._early_stop:
                        self._save()
                    if self._early_stop:
                        status = "early stopped"
                        logger.write(f"step {state.step}: {self.select.metric} has not improved for "
                                     f"{state.evals_since_best} evaluations; stopping early (best: "
                                     f"{state.best_value:.4f} at step {state.best_step})")
                        break
                    if stop_requested:
                        status = "interrupted"
                        break
                    if over_budget:
                        status = "time budget"
                        break
            final_eval = status not in ("interrupted", "early stopped") and self.evaluate_fn is not None
            if final_eval:
                self._evaluate(logger, final=True)
            if self.last_checkpoint is None or self.last_checkpoint.name != f"step_{state.step}":
                self._save()
        finally:
            logger.close()
            if acc.log_with:
                acc.end_training()
        if status == "interrupted":
            logger.write(f"stopped at step {state.step}; resume with resume: auto (--resume auto) "
                         f"(checkpoint {self.last_checkpoint})")
        return TrainResult(step=state.step, tokens_seen=state.tokens_seen, status=status,
                           last_checkpoint=self.last_checkpoint, last_eval=self.last_eval,
                           last_eval_final=final_eval, skipped_steps=state.skipped_steps, elapsed_seconds=state.elapsed_seconds,
                           stop_signal=stop.signal, best_step=state.best_step, best_value=state.best_value)

    # --------------------------------------------------------------------------- helpers

    def _agree(self, stop: bool, clock: tuple[int, bool]) -> tuple[bool, int, bool]:
        """(stop, new total steps or 0, over the time budget), the same on every process: a stop
        signal on any process stops all of them at this step; the time budget is the main
        process's decision. One collective per step when several processes run."""
        values = [float(stop), *(map(float, clock) if self.accelerator.is_main_process else (0.0, 0.0))]
        if self.accelerator.num_processes > 1:
            values = self._global_sum(values)
        return values[0] > 0, int(values[1]), values[2] > 0

    def _refit(self, total: int, logger: MetricsLogger) -> None:
        """Stretch or shrink the run (and its learning-rate schedule) to ``total`` steps."""
        self.state.total_steps = total
        refit_schedule(getattr(self.scheduler, "scheduler", self.scheduler), total)
        if abs(total - self._announced_total) > 0.05 * self._announced_total:  # not every small refit
            logger.write(f"time budget {self.config.max_minutes} min: training for {total} steps")
            self._announced_total = total

    def _evaluate(self, logger: MetricsLogger, final: bool = False) -> None:
        if self.evaluate_fn is None:
            return
        self.last_eval = self.evaluate_fn(self.model, final)
        logger.log({"step": self.state.step, **{f"eval_{k}": v for k, v in self.last_eval.items()}})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items() if isinstance(v, float))
        logger.write(f"step {self.state.step}: eval {shown}")
        if self.select is not None:
            self._select(self.last_eval)
        self.model.train()

    def _select(self, metrics: dict[str, float]) -> None:
        """Track the best evaluation, save its model, and decide on early stopping."""
        select, state = self.select, self.state
        if select.metric not in metrics:
            raise LmforgeError(f"train.metric_for_best: the evaluation reports no {select.metric!r}; it "
                               f"reports {', '.join(sorted(metrics))}")
        value = float(metrics[select.metric])
        if select.improves(value, state.best_value):
            state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
            select.on_best(self.model, state.step, metrics)
        else:
            state.evals_since_best += 1
            self._early_stop = 0 < select.patience <= state.evals_since_best

    def _save(self) -> Path:
        folder = self.select.folder if self.select is not None else None
        extra = {folder.name: folder} if folder is not None and self.state.best_step is not None else None
        self.last_checkpoint = save_checkpoint(self.accelerator, self.run_dir, self.state, self.config.keep_last,
                                               extra=extra)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self, self.last_checkpoint)
        return self.last_checkpoint

    def _stop_on_nonfinite(self, loss: float, grad_norm: float, before: tuple[dict, int],
                           logger: MetricsLogger) -> None:
        """Save the state before the bad step (weights are untouched) and stop with the step number."""
        data, step = before
        self.state.data = data
        self.state.step = step
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step_{step}":
            self._save()
        logger.close()
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise NonFiniteLossError(
            f"the {what} became {loss if what == 'loss' else grad_norm} at step {step + 1}; training stopped. "
            f"The last good state (step {step}) is in {self.last_checkpoint}. Lower optim.lr, check the "
            f"data, or set train.skip_nonfinite=true to skip such steps.")


class _Clock:
    """Wall time of the run (across resumes) and its time budget.

    Every 2% of the budget until the end, the number of steps is fitted to the speed of the last
    20% of the budget (or of the run so far, early on), in both directions: a stall costs the
    time it lasted, not the rest of the run, and a slowdown late in the run shortens it. Past
    110% of the budget the run stops whatever the step count.
    """

    REFIT_EVERY = 0.02
    WINDOW = 0.2
    HARD_STOP = 1.1

    def __init__(self, elapsed: float, max_minutes: float | None, step: int,
                 now: Callable[[], float] = time.perf_counter):
        self.now = now
        self.offset = elapsed
        self.start = now()
        self.budget = max_minutes * 60 if max_minutes else None
        self.samples = deque([(elapsed, step)])  # (elapsed seconds, step) at each refit
        self.next_refit = elapsed + self.REFIT_EVERY * (self.budget or 0)

    def elapsed(self) -> float:
        return self.offset + self.now() - self.start

    def decide(self, step: int, total_steps: int, max_steps: int) -> tuple[int, bool]:
        """(steps to train in all, or 0 for no change; True when past the hard stop)."""
        if self.budget is None:
            return 0, False
        t = self.elapsed()
        if t > self.HARD_STOP * self.budget:
            return 0, True
        if t < self.next_refit:
            return 0, False
        self.next_refit = t + self.REFIT_EVERY * self.budget
        self.samples.append((t, step))
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.WINDOW * self.budget:
            self.samples.popleft()
        t0, step0 = self.samples[0]
        rate = (step - step0) / max(t - t0, 1e-9)
        total = min(max_steps, step + max(1, round(rate * (self.budget - t))))
        return (total if total != total_steps else 0), False
