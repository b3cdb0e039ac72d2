"""``lmforge ablate``: architecture and tokenizer choices measured as a controlled experiment.

A sweep file names a base pretraining configuration, a budget and the variants to compare::

    base: gpt-debug                            # a pretrain preset, a YAML file, or a mapping of its keys
    budget: {steps: 500}                        # or {tokens: 1000000} or {seconds: 60}
    seeds: [0]                                  # every variant runs once per seed
    baseline: llama                             # compared against (default: the first variant)
    baseline_seeds: [1, 2]                      # extra baseline runs: the run-to-run spread
    tokenizer: {algorithm: bpe, vocab_size: 2048}
    variants:
      llama: {}
      layernorm: {model.overrides.norm_type: layernorm}
      unigram: {tokenizer.algorithm: unigram}
    grid:                                       # expanded into variants named "lr=0.001", ...
      optim.lr: [1.0e-3, 3.0e-3]

Every run trains on the same data in the same order (``train.seed``) for the same budget and is
scored on the validation split in bits per byte, which compares different tokenizers on the same
text. Runs go one after another, each in its own process (a crash or an out-of-memory kill ends
that run only) and each in its own ``lmforge pretrain`` folder, so ``--resume`` skips the finished
runs and continues the others from their last checkpoint. Everything in the sweep is checked
before the first run starts; nothing is written before that.

    rows = ablate(load_config(AblateConfig, "sweep.yaml"))
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import transformers
import yaml

import lmforge
from lmforge.config import (
    Option,
    build_dataclass,
    load_config,
    load_yaml,
    merge,
    nest,
    resolve_input_paths,
    to_dict,
)
from lmforge.data.pipeline import build_lm_dataset
from lmforge.errors import LmforgeError, closest
from lmforge.experiments.results import run_row, write_results
from lmforge.presets import find_preset, is_packaged
from lmforge.runs import SWEEP_FILE, check_run_dir, has_tokenizer, load_tokenizer
from lmforge.tokenizers import train_tokenizer
from lmforge.tokenizers.algorithms import minimum_vocab_size
from lmforge.tokenizers.train import resolve_special_tokens
from lmforge.train.config import PretrainConfig
from lmforge.train.loop import NonFiniteLossError
from lmforge.train.model_presets import (
    build_model,
    check_config_keys,
    count_parameters,
    load_preset,
    resolve_preset,
)
from lmforge.train.pretrain import pretrain, with_resolved_splits

RUN_CONFIG = "ablate.yaml"  # the run's pretraining configuration (the worker reads it)
OUTCOME = "ablation.json"  # written by the worker when the run finished (completed or diverged)
LOG = "log.txt"
TOKENIZER_KEYS = ("algorithm", "vocab_size")
_NAME = re.compile(r"[^A-Za-z0-9._=+,-]+")


@dataclass
class BudgetSection:
    """What every variant gets: exactly one of the three.

    Attributes:
        steps: optimizer steps.
        tokens: training tokens (rows x block size, padding included); the steps follow from
            each variant's batch and block size. Tokenizers differ in bytes per token.
        seconds: wall-clock seconds of training (the schedule is fitted to it; depends on the
            machine and its load, so results are noisier than with steps or tokens).
    """

    steps: int | None = None
    tokens: int | None = None
    seconds: float | None = None


@dataclass
class TokenizerChoice:
    """The tokenizer a variant trains on when the sweep trains tokenizers (see ``AblateConfig``).

    Attributes:
        algorithm: bpe (byte-level), wordpiece or unigram.
        vocab_size: vocabulary size including special tokens.
    """

    algorithm: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    vocab_size: int = 2048

    @property
    def key(self) -> str:
        return f"{self.algorithm}-{self.vocab_size}"


@dataclass
class AblateConfig:
    """A sweep: one base pretraining configuration, a budget, and the variants to compare.

    Attributes:
        base: a pretrain preset (lmforge presets pretrain), a pretraining YAML file (relative to the
            sweep file's folder), or an inline mapping of its keys.
        budget: the budget of every run (one of steps, tokens, seconds).
        seeds: every variant runs once per seed (train.seed: initialisation and data order).
        baseline: the variant the others are compared with (default: the first).
        baseline_seeds: extra seeds run for the baseline only, to measure the run-to-run spread
            that a difference has to exceed.
        tokenizer: the default tokenizer choice. When the base has no data.tokenizer, or any
            variant sets tokenizer.algorithm / tokenizer.vocab_size, every variant uses a tokenizer
            trained on the base's training split (once per distinct choice, under
            OUTPUT/tokenizers/); otherwise every variant uses the base's data.tokenizer.
        variants: variant name -> dotted overrides of the base ({optim.lr: 1.0e-2},
            {model.overrides.norm_type: layernorm}, {tokenizer.algorithm: unigram}); {} is the base.
        grid: dotted key -> list of values; every combination becomes a variant named
            key=value,... (added after variants).
        output_dir: the sweep folder: one run folder per variant (and seed), results.json,
            results.md, val_curves.png and val_bpb.png.
        resume: continue the sweep in output_dir (auto; or name the sweep folder): finished runs are
            kept, unfinished ones continue from their last checkpoint, new variants run.
    """

    base: Annotated[Any, Option(input_path=True, schema=PretrainConfig)] = None
    budget: BudgetSection = field(default_factory=BudgetSection)
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str | None = None
    baseline_seeds: list[int] = field(default_factory=list)
    tokenizer: TokenizerChoice = field(default_factory=TokenizerChoice)
    variants: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] | None = None
    output_dir: str = "runs/ablate"
    resume: Annotated[str | None, Option(const="auto")] = None

    def __post_init__(self):
        if self.resume not in (None, "auto"):  # a sweep folder: continue that one
            self.output_dir, self.resume = self.resume, "auto"
        given = {k: v for k, v in vars(self.budget).items() if v is not None}
        if len(given) != 1:
            raise ValueError("budget: give exactly one of steps, tokens or seconds (e.g. budget: {steps: 500}), "
                             f"got {given or 'none'}")
        (unit, amount), = given.items()
        if not amount > 0:
            raise ValueError(f"budget.{unit} must be > 0, got {amount}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed (default [0])")
        for key in ("seeds", "baseline_seeds"):
            seeds = getattr(self, key)
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"{key}: each seed once, got {seeds}")
        if self.tokenizer.vocab_size < 2:
            raise ValueError(f"tokenizer.vocab_size must be a positive size, got {self.tokenizer.vocab_size}")

    @property
    def budget_unit(self) -> tuple[str, float]:
        return next((k, v) for k, v in vars(self.budget).items() if v is not None)


@dataclass
class Run:
    """One training run of the sweep: a variant with one seed."""

    name: str
    seed: int
    folder: Path
    overrides: dict[str, Any]  # as written in the sweep (dotted)
    tokenizer: TokenizerChoice | None  # None: the base's data.tokenizer
    config: PretrainConfig


@dataclass
class Plan:
    """Every run of a sweep, resolved and checked; nothing is written yet."""

    runs: list[Run]
    baseline: str
    tokenizers: dict[str, TokenizerChoice]  # folder name -> choice, trained under output_dir/tokenizers
    base: PretrainConfig
    metric: str  # the row key the variants are ranked by


# ----------------------------------------------------------------------------------- planning


def expand_variants(config: AblateConfig, source: str) -> dict[str, dict[str, Any]]:
    """``variants`` then every combination of ``grid``, as name -> dotted overrides."""
    variants: dict[str, dict[str, Any]] = {}
    for name, overrides in config.variants.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise LmforgeError(f"{source}: variants.{name} must be a mapping of dotted keys to values "
                               f"(e.g. {{optim.lr: 1.0e-3}}), got {overrides!r}")
        variants[str(name)] = dict(overrides or {})
    if config.grid is not None:
        if not config.grid:
            raise LmforgeError(f"{source}: grid is empty; give dotted keys with lists of values "
                               "(e.g. grid: {optim.lr: [1.0e-3, 3.0e-3]}) or remove it")
        keys = list(config.grid)
        for key, values in config.grid.items():
            if not isinstance(values, list) or not values:
                raise LmforgeError(f"{source}: grid.{key} must be a non-empty list of values, got {values!r}")
        leaves = [k.rsplit(".", 1)[-1] for k in keys]
        labels = [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves, strict=True)]
        for combination in itertools.product(*(config.grid[k] for k in keys)):
            name = ",".join(f"{label}={value}" for label, value in zip(labels, combination, strict=True))
            if name in variants:
                raise LmforgeError(f"{source}: the grid makes a variant named {name!r}, which variants already "
                                   "has; rename that variant")
            variants[name] = dict(zip(keys, combination, strict=True))
    if not variants:
        raise LmforgeError(f"{source}: no variants; give variants (name -> overrides) and/or a grid")
    folders: dict[str, str] = {}
    for name in variants:
        folder = folder_name(name)
        if folder in folders:
            raise LmforgeError(f"{source}: variants {folders[folder]!r} and {name!r} would share the run folder "
                               f"{folder!r}; rename one")
        folders[folder] = name
    return variants


def folder_name(name: str) -> str:
    """A variant name as a folder name (characters other than letters, digits and ._=+,- become _)."""
    folder = _NAME.sub("_", name).strip("._") or "variant"
    return folder


def _base_values(config: AblateConfig, source: str) -> tuple[dict[str, Any], str]:
    base = config.base
    if base is None:
        raise LmforgeError(f"{source}: base is required: a pretraining YAML file or a mapping of its keys")
    if isinstance(base, dict):
        return dict(base), f"{source}: base"
    if isinstance(base, (str, Path)):
        path = find_preset("pretrain", str(base))
        values = load_yaml(path)
        if not is_packaged(path):  # its input paths are relative to its own folder, as for pretrain --config
            values = resolve_input_paths(PretrainConfig, values, path.expanduser().resolve().parent)
        return values, str(path)
    raise LmforgeError(f"{source}: base must be a YAML file path or a mapping, got {base!r}")


def _tokenizer_choice(config: AblateConfig, overrides: dict[str, Any], where: str) -> TokenizerChoice:
    values = {"algorithm": config.tokenizer.algorithm, "vocab_size": config.tokenizer.vocab_size}
    for key, value in overrides.items():
        leaf = key.split(".", 1)[1]
        if leaf not in TOKENIZER_KEYS:
            valid = [f"tokenizer.{k}" for k in TOKENIZER_KEYS]
            meant = closest(key, valid, cutoff=0.5)
            hint = f"; did you mean '{meant[0]}'?" if meant else ""
            raise LmforgeError(f"{where}: unknown key '{key}'{hint} (valid: {', '.join(valid)})")
        values[leaf] = value
    choice = build_dataclass(TokenizerChoice, values, source=where, prefix="tokenizer.")
    special = len(resolve_special_tokens(choice.algorithm, None, None, None).all())
    if choice.vocab_size < minimum_vocab_size(choice.algorithm, special):
        raise LmforgeError(f"{where}: tokenizer.vocab_size {choice.vocab_size} is too small for {choice.algorithm}; "
                           f"use at least {minimum_vocab_size(choice.algorithm, special)}")
    return choice


def _budget_values(config: AblateConfig, resolved: PretrainConfig) -> dict[str, Any]:
    unit, amount = config.budget_unit
    if unit == "steps":
        return {"train.max_steps": int(amount), "train.max_minutes": None}
    if unit == "tokens":
        t = resolved.train
        per_step = t.micro_batch_size * t.grad_accum_steps * resolved.data.block_size
        return {"train.max_steps": max(1, math.ceil(amount / per_step)), "train.max_minutes": None}
    return {"train.max_steps": 10**9, "train.max_minutes": amount / 60}  # the clock ends the run


def _check_model(resolved: PretrainConfig, where: str) -> None:
    """The model settings of a variant: every key declared, every value accepted by the config class."""
    preset = resolve_preset(resolved.model.preset)
    if preset.is_dir():
        if resolved.model.overrides:
            raise LmforgeError(f"{where}: model.overrides cannot change a saved model ({preset}); use a preset")
        return
    values = load_preset(resolved.model.preset, resolved.model.overrides)
    try:
        check_config_keys(values, resolved.model.overrides, preset)
        model_type = values.pop("model_type")
        transformers.AutoConfig.for_model(model_type, **values)
    except (LmforgeError, ValueError) as e:
        raise LmforgeError(f"{where}: {e}") from None


def plan(config: AblateConfig, source: str = "sweep") -> Plan:
    """Resolve and check every run of the sweep (reads only)."""
    variants = expand_variants(config, source)
    baseline = config.baseline or next(iter(variants))
    if baseline not in variants:
        meant = "".join(f"; did you mean {m!r}?" for m in closest(baseline, list(variants))[:1])
        raise LmforgeError(f"{source}: baseline {baseline!r} is not a variant{meant} (variants: {', '.join(variants)})")
    base_values, base_source = _base_values(config, source)
    base = with_resolved_splits(build_dataclass(PretrainConfig, base_values, source=base_source))
    base_values = merge(base_values, {"data": {"train_split": base.data.train_split,
                                               "eval_split": base.data.eval_split}})
    if not base.data.eval_split or base.data.eval_split == "test":
        raise LmforgeError(f"{base_source}: data.eval_split is {base.data.eval_split!r}; variants are compared on "
                           "a validation split (the test split stays untouched for final reports)")
    if base.data.eval_split == base.data.train_split:
        raise LmforgeError(f"{base_source}: data.eval_split and data.train_split are both "
                           f"{base.data.train_split!r}; compare variants on held-out text")
    trains_tokenizers = not base.data.tokenizer or any(
        k.startswith("tokenizer.") for overrides in variants.values() for k in overrides)
    out = Path(config.output_dir)
    runs, tokenizers = [], {}
    for name, overrides in variants.items():
        where = f"{source}: variants.{name}"
        tok_keys = {k: v for k, v in overrides.items() if k.startswith("tokenizer.")}
        others = {k: v for k, v in overrides.items() if k not in tok_keys}
        for key in others:
            if key in ("train.seed", "output_dir", "resume", "overwrite") or key.startswith("push"):
                raise LmforgeError(f"{where}: {key} is set by the sweep (use seeds: for train.seed)")
            if key == "data.tokenizer" and trains_tokenizers:
                raise LmforgeError(f"{where}: data.tokenizer cannot be mixed with tokenizer.* choices in one sweep")
        choice = _tokenizer_choice(config, tok_keys, where) if trains_tokenizers else None
        seeds = list(config.seeds)
        if name == baseline:
            seeds += [s for s in config.baseline_seeds if s not in seeds]
        values = merge(base_values, nest(others))
        budget = _budget_values(config, build_dataclass(PretrainConfig, values, source=where))
        for seed in seeds:
            folder = out / (folder_name(name) if len(seeds) == 1 else f"{folder_name(name)}-seed{seed}")
            controls = {"output_dir": str(folder), "resume": "auto", "overwrite": False, "train.seed": seed,
                        "train.log_every": 1, "train.progress": False, "push_to_hub": None,
                        "push_checkpoints": False, **budget}
            if choice is not None:
                controls["data.tokenizer"] = str(out / "tokenizers" / choice.key)
                tokenizers[choice.key] = choice
            resolved = build_dataclass(PretrainConfig, merge(values, nest(controls)), source=where)
            if seed == seeds[0]:
                _check_model(resolved, where)
                if choice is None and not has_tokenizer(Path(resolved.data.tokenizer)):
                    raise LmforgeError(f"{where}: data.tokenizer {resolved.data.tokenizer!r} is not a tokenizer "
                                       "folder; train one with 'lmforge tokenizer train', or let the sweep "
                                       "train them (tokenizer: {algorithm: bpe, vocab_size: 2048})")
            runs.append(Run(name, seed, folder, overrides, choice, resolved))
    metric = "val_bits_per_byte" if base.objective == "causal" else "val_loss"
    return Plan(runs=runs, baseline=baseline, tokenizers=tokenizers, base=base, metric=metric)


# ----------------------------------------------------------------------------------- the folder


def _sweep_record(config: AblateConfig, the_plan: Plan) -> dict[str, Any]:
    return {"budget": {k: v for k, v in vars(config.budget).items() if v is not None},
            "baseline": the_plan.baseline, "metric": the_plan.metric,
            "base": to_dict(the_plan.base),
            "runs": [{"name": r.name, "seed": r.seed, "folder": r.folder.name, "overrides": r.overrides,
                      "tokenizer": r.tokenizer.key if r.tokenizer else r.config.data.tokenizer} for r in the_plan.runs]}


def check_sweep_folder(config: AblateConfig, the_plan: Plan) -> None:
    """Refuse a folder holding another sweep (without --resume) or something else, and (resuming)
    runs made with other settings (reads only)."""
    out = Path(config.output_dir)
    check_run_dir(out, resuming=config.resume is not None, overwrite=False, files=(SWEEP_FILE,))
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_FILE).is_file():
        raise LmforgeError(f"output_dir {out} holds files but no {SWEEP_FILE}: it is not a sweep folder; "
                           "choose another --output-dir")
    for run in the_plan.runs if config.resume is not None else []:
        stored = run.folder / RUN_CONFIG
        if stored.is_file() and yaml.safe_load(stored.read_text()) != to_dict(run.config):
            raise LmforgeError(f"--resume: run {run.folder} ({run.name}, seed {run.seed}) was made with other "
                               f"settings than the sweep now gives it (see {stored}); use another --output-dir, "
                               "or rename the variant")


def train_tokenizers(the_plan: Plan, out: Path) -> None:
    """Train each distinct tokenizer choice once on the base's training split (kept when present)."""
    data = the_plan.base.data
    block = max(r.config.data.block_size for r in the_plan.runs)
    for key, choice in the_plan.tokenizers.items():
        folder = out / "tokenizers" / key
        if (folder / "tokenizer.json").is_file():
            continue
        print(f"lmforge ablate: training the {choice.algorithm} tokenizer (vocab {choice.vocab_size}) on "
              f"{data.source} ({data.train_split}) -> {folder}", flush=True)
        train_tokenizer(data.source, choice.algorithm, choice.vocab_size, split=data.train_split,
                        text_column=data.text_column, model_max_length=max(block, 1024), output_dir=folder,
                        overwrite=True, show_progress=False)


def pack_data(the_plan: Plan) -> None:
    """Tokenize and pack each distinct data setting once, here, so that every run loads its rows
    from the ``datasets`` cache: no run pays for packing in its time or peak memory."""
    done = set()
    for run in the_plan.runs:
        data = run.config.data
        key = (data.source, data.tokenizer, data.block_size, data.document_masks, data.text_column,
               data.train_split, data.eval_split)
        if data.streaming or key in done:
            continue
        done.add(key)
        tokenizer = load_tokenizer(data.tokenizer, what="data.tokenizer")
        for split in (data.train_split, data.eval_split):
            build_lm_dataset(data.source, tokenizer, data.block_size, split=split, text_column=data.text_column,
                             document_masks=data.document_masks)


# ----------------------------------------------------------------------------------- running


def _child_env() -> dict[str, str]:
    """The environment of a run's process: this lmforge importable, the parent's settings kept."""
    src = str(Path(lmforge.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_one(run: Run, index: int, total: int) -> int:
    """Train one run in its own process, echoing its output into its log.txt and the console;
    returns the process's exit code."""
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / RUN_CONFIG).write_text(yaml.safe_dump(to_dict(run.config), sort_keys=False))
    changes = ", ".join(f"{k}={v}" for k, v in run.overrides.items()) or "the base"
    print(f"\n[{index}/{total}] {run.name} (seed {run.seed}): {changes} -> {run.folder}", flush=True)
    command = [sys.executable, "-c", "import sys; from lmforge.experiments.ablate import worker_main; "
               "sys.exit(worker_main(sys.argv[1]))", str(run.folder / RUN_CONFIG)]
    with open(run.folder / LOG, "a", encoding="utf-8") as log:
        # its own session: a Ctrl-C reaches only this process, which passes it on exactly once
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=_child_env(), errors="replace", start_new_session=True)
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if line.strip() and "%|" not in line:  # progress bars stay in the log
                    print(f"    {line.rstrip()}", flush=True)
            code = process.wait()
        except KeyboardInterrupt:  # the run stops at its next step, after a checkpoint
            process.terminate()
            process.wait()
            raise
    return code


def _outcome(run: Run) -> dict[str, Any] | None:
    path = run.folder / OUTCOME
    return json.loads(path.read_text()) if path.is_file() else None


def _last_error(run: Run, exit_code: int) -> str:
    lines = [ln.strip() for ln in (run.folder / LOG).read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("lmforge: error:") or "Error" in ln.split(":")[0]]
    if errors:
        return errors[-1]
    return f"the run's process exited with code {exit_code}" + (f" (signal {-exit_code})" if exit_code < 0 else "")


def ablate(config: AblateConfig, *, source: str = "sweep") -> list[dict[str, Any]]:
    """Run the sweep ``config`` (see ``AblateConfig``); returns the rows written to results.json."""
    the_plan = plan(config, source)
    check_sweep_folder(config, the_plan)
    out = Path(config.output_dir)
    unit, amount = config.budget_unit
    variants = len({r.name for r in the_plan.runs})
    print(f"lmforge ablate: {len(the_plan.runs)} run(s) of {variants} variant(s), budget {amount:g} {unit} each, "
          f"compared on {the_plan.base.data.source} ({the_plan.base.data.eval_split}); output {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_FILE).write_text(yaml.safe_dump(_sweep_record(config, the_plan), sort_keys=False))
    train_tokenizers(the_plan, out)
    pack_data(the_plan)
    with _sigterm_as_interrupt():
        rows = _run_all(the_plan)
    write_results(rows, out, baseline=the_plan.baseline, metric=the_plan.metric, budget=(unit, amount),
                  split=the_plan.base.data.eval_split)
    return rows


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the sweep like Ctrl-C: the running run saves a checkpoint first."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_all(the_plan: Plan) -> list[dict[str, Any]]:
    """Each run in turn (finished ones kept); the results.json rows."""
    rows = []
    for i, run in enumerate(the_plan.runs, 1):
        exit_code = None
        if _outcome(run) is None:
            exit_code = run_one(run, i, len(the_plan.runs))
            if exit_code in (130, 143):  # interrupted: its checkpoint is saved, the sweep stops here
                raise KeyboardInterrupt
        else:
            print(f"\n[{i}/{len(the_plan.runs)}] {run.name} (seed {run.seed}): finished earlier, kept ({run.folder})")
        outcome = _outcome(run)
        error = None if outcome is not None else _last_error(run, exit_code or 0)
        row = run_row(run, outcome, error=error)
        rows.append(row)
        figure = row[the_plan.metric]
        shown = f"{the_plan.metric} {figure:.4f}" if figure is not None else "no result"
        print(f"[{i}/{len(the_plan.runs)}] {run.name}: {shown} ({row['status']})", flush=True)
    return rows


# ----------------------------------------------------------------------------------- one run


def _count_parameters(config: PretrainConfig) -> int:
    """Parameters of the run's model, counted on the meta device (no memory, no initialisation)."""
    tokenizer = load_tokenizer(config.data.tokenizer, what="data.tokenizer")
    with torch.device("meta"):
        model = build_model(config.objective, config.model.preset, tokenizer, overrides=config.model.overrides,
                            block_size=config.data.block_size, seed=config.train.seed)
    return count_parameters(model)


def _peak_memory_mb() -> float:
    """This process's peak resident memory (the GPU's peak allocation when training on one).

    Linux's VmHWM belongs to this program's own memory; ``ru_maxrss`` would carry over the
    parent's peak through fork and exec (the sweep's process holds the packed data)."""
    import resource  # Unix only: a top-level import would break importing this module on Windows

    status = Path("/proc/self/status")
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.M) if status.is_file() else None
    if hwm:
        rss = int(hwm.group(1)) / 1024
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)
    if torch.cuda.is_available():
        return max(rss, torch.cuda.max_memory_allocated() / 2**20)
    return rss


def work(config_path: str) -> int:
    """The process of one run: pretrain, then write ablation.json (completed or diverged)."""
    config = load_config(PretrainConfig, config_path)
    params = _count_parameters(config)
    outcome: dict[str, Any] = {"params": params}
    try:
        result = pretrain(config)
    except NonFiniteLossError as e:
        outcome.update(status="diverged", error=str(e), final_eval={}, stopped="non-finite loss")
    else:
        if result.train.status == "interrupted":
            return result.train.exit_code
        outcome.update(status="completed", error=None, final_eval=result.train.last_eval,
                       stopped=result.train.status)
    outcome["peak_memory_mb"] = round(_peak_memory_mb(), 1)
    path = Path(config.output_dir) / OUTCOME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome, indent=2, allow_nan=True))
    tmp.replace(path)
    return 0


def worker_main(config_path: str) -> int:
    """Entry of a run's process (started by ``run_one``): ``work`` with errors as one line."""
    try:
        return work(config_path)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
