"""``lmforge merge``: fold a LoRA adapter into its base weights and save a normal model.

peft does the work (``PeftModel.from_pretrained`` then ``merge_and_unload``); this module finds the
base model, picks the Auto class from the adapter's ``task_type``, and writes the merged model,
its generation config and the tokenizer into a fresh folder. A ``modules_to_save`` module (the
classification head of a LoRA fine-tune) is replaced by its trained copy, so the merged model
carries the trained head. Every check runs before anything is written, and the output is written
to a temporary sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_RECORD = "lmforge_merge.json"  # in the merged folder: which adapter and base it came from

# peft task_type -> the transformers Auto class of the base model
_TASK_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
# without a task_type: the Auto class from the base class name's ending
_SUFFIX_AUTO_CLASS = {
    "ForCausalLM": "AutoModelForCausalLM",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForQuestionAnswering": "AutoModelForQuestionAnswering",
    "ForConditionalGeneration": "AutoModelForSeq2SeqLM",
}


# ----------------------------------------------------------------------------------- inputs


def find_adapter_dir(path: Path) -> Path:
    """The folder holding ``adapter_config.json`` and the adapter weights (a run folder's ``final/``
    too), or ``LmforgeError`` naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"adapter folder {path} does not exist" if not path.exists()
                           else f"{path} is a file; lmforge merge takes a LoRA adapter folder")
    if not (path / ADAPTER_CONFIG).is_file() and (path / "final" / ADAPTER_CONFIG).is_file():
        path = path / "final"  # an lmforge fine-tuning run folder
    missing = [name for name, present in (
        (ADAPTER_CONFIG, (path / ADAPTER_CONFIG).is_file()),
        (" or ".join(ADAPTER_WEIGHTS), any((path / w).is_file() for w in ADAPTER_WEIGHTS)),
    ) if not present]
    if missing:
        full_model = (path / "config.json").is_file()
        hint = (" (it holds a full model, which has nothing to merge)" if full_model
                else "; lmforge merge takes the folder a LoRA fine-tune (method: lora) saves")
        raise LmforgeError(f"{path} is not a LoRA adapter folder: {' and '.join(missing)} missing{hint}")
    return path


def read_adapter_config(adapter_dir: Path) -> Any:
    """The adapter's ``PeftConfig`` (its peft subclass), refusing adapters that cannot merge."""
    from peft import PeftConfig

    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, KeyError, OSError) as e:  # bad JSON, unknown peft_type or keys
        raise LmforgeError(f"{path}: not a readable peft adapter config ({e})") from None
    if config.is_prompt_learning:
        raise LmforgeError(f"{path}: a {config.peft_type} adapter adds virtual tokens and has no weights "
                           "to merge; only weight adapters such as LoRA can be merged")
    if config.task_type is not None and config.task_type not in _TASK_AUTO_CLASS:
        raise LmforgeError(f"{path}: task_type {config.task_type!r} is not one of "
                           f"{', '.join(_TASK_AUTO_CLASS)}")
    return config


def resolve_base(adapter_dir: Path, peft_config: Any, base: str | None) -> str:
    """Where the base model is: ``base`` if given, else ``base_model_name_or_path`` from the
    adapter config. A local folder (or an lmforge run folder, through its ``final/``) must hold a
    config.json; anything else is taken as a Hub id and tried when loading."""
    where = f"base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG}"
    name = base if base is not None else peft_config.base_model_name_or_path
    source = "--base" if base is not None else where
    if not name:
        raise LmforgeError(f"{where} is empty: pass the base model with --base PATH")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
            path = path / "final"  # an lmforge run folder
        if not (path / "config.json").is_file():
            raise LmforgeError(f"base model {name!r} ({source}) is a folder without config.json, not a "
                               "saved model" + ("" if base is not None else "; pass the base with --base PATH"))
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        what = "is a file, not a model folder" if path.exists() else "was not found"
        raise LmforgeError(f"base model {name!r} ({source}) {what}"
                           + ("" if base is not None else
                              "; the adapter was trained from it: pass its location with --base PATH"))
    return name  # a Hub id


def check_output_dir(output: Path, *, overwrite: bool, inputs: list[Path], flag: str = "--output",
                     what: str = "merged model") -> None:
    """Refuse an existing non-empty folder unless ``overwrite``, and even then one that holds no
    saved model (``--overwrite`` replaces an earlier result, not any folder); never write over,
    around or inside an input folder. Messages name the option ``flag`` and the ``what`` written."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise LmforgeError(f"{flag} {output} is a file; give a folder for the {what}")
    out = output.resolve()
    for folder in inputs:
        if out == folder.resolve() or out in folder.resolve().parents or folder.resolve() in out.parents:
            raise LmforgeError(f"{flag} {output} is, holds or is inside the input folder {folder}; write the "
                               f"{what} to another folder")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise LmforgeError(f"{flag} {output} exists and is not empty; choose another folder or pass "
                           "--overwrite to replace the model in it")
    if not (output / "config.json").is_file():
        names = sorted(p.name for p in output.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise LmforgeError(f"{flag} {output} holds files that are not a saved model ({shown}); "
                           "--overwrite only replaces a model folder: choose another folder")


# ----------------------------------------------------------------------------------- loading


def auto_class_name(peft_config: Any, base_config: Any) -> str:
    """The transformers Auto class that loads the base: from the task type, else from the base
    class name (the adapter's ``auto_mapping`` or the base config's ``architectures``)."""
    if peft_config.task_type is not None:
        return _TASK_AUTO_CLASS[peft_config.task_type]
    names = [(peft_config.auto_mapping or {}).get("base_model_class")]
    names += list(getattr(base_config, "architectures", None) or [])
    for name in filter(None, names):
        for suffix, auto in _SUFFIX_AUTO_CLASS.items():
            if name.endswith(suffix):
                return auto
    return "AutoModel"


def _needs_remote_code(base: str) -> bool:
    """True when the base's model_type is unknown here but its folder carries code (``auto_map``)."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_dict, _ = PretrainedConfig.get_config_dict(base)
    return "auto_map" in config_dict and config_dict.get("model_type") not in CONFIG_MAPPING


def adapter_tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors in the adapter's weights file (read lazily for safetensors)."""
    path = adapter_dir / ADAPTER_WEIGHTS[0]
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch

    state = torch.load(adapter_dir / ADAPTER_WEIGHTS[1], map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def saved_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The full weights an adapter carries (``modules_to_save``, e.g. a trained head), by their
    name in the base model: peft saves them as ``base_model.model.<name>``."""
    prefix = "base_model.model."
    return {k.removeprefix(prefix): v for k, v in shapes.items() if "lora_" not in k}


def head_overrides(adapter_dir: Path, peft_config: Any, carried: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Config values the base needs so the adapter's classification head fits: the labels of a
    ``config.json`` saved beside the adapter (the fine-tuned model's config), else the number of
    labels read from the head the adapter carries."""
    if peft_config.task_type != "SEQ_CLS":
        return {}
    saved = adapter_dir / "config.json"
    if saved.is_file():
        try:
            values = json.loads(saved.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{saved}: invalid JSON ({e})") from None
        out = {k: values[k] for k in ("label2id", "problem_type") if values.get(k) is not None}
        if values.get("id2label"):
            out["id2label"] = {int(k): v for k, v in values["id2label"].items()}
            out["num_labels"] = len(out["id2label"])
        return out
    for name in ("classifier.weight", "score.weight", "classifier.out_proj.weight"):
        if name in carried:
            return {"num_labels": carried[name][0]}
    return {}


def load_base(base: str, peft_config: Any, *, source: str, overrides: dict[str, Any] | None = None):
    """The base model in the Auto class of the adapter's task, whether it needed remote code, and
    the names of its weights that were newly initialised (missing from the base or resized)."""
    import transformers

    import lmforge.models  # noqa: F401  (registers lmforge model types with the Auto classes)

    try:
        remote = _needs_remote_code(base)
        config = transformers.AutoConfig.from_pretrained(base, trust_remote_code=remote)
        auto = getattr(transformers, auto_class_name(peft_config, config))
        kwargs = dict(overrides or {})
        if kwargs.get("num_labels", config.num_labels) != config.num_labels:
            kwargs["ignore_mismatched_sizes"] = True  # the base's head has another size: the adapter's replaces it
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its load report lists the head as missing: checked below
        try:
            model, info = auto.from_pretrained(base, trust_remote_code=remote, output_loading_info=True, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except OSError as e:
        raise LmforgeError(f"base model {base!r} ({source}) could not be loaded: {_first_line(e)}; "
                           "pass its location with --base PATH") from None
    except (ValueError, RuntimeError) as e:  # an Auto class that does not know this model type, bad weights
        raise LmforgeError(f"base model {base!r} ({source}): {_first_line(e)}") from None
    resized = {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())}  # (key, shapes)
    return model.eval(), remote, set(info.get("missing_keys", ())) | resized


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tokenizer(adapter_dir: Path, base: str, *, remote: bool) -> tuple[Any, str] | tuple[None, None]:
    """The tokenizer saved with the adapter, else the base's; (None, None) when neither has one."""
    from transformers import AutoTokenizer

    for where in (str(adapter_dir), base):
        if Path(where).is_dir() and not (Path(where) / "tokenizer_config.json").is_file():
            continue
        try:
            return AutoTokenizer.from_pretrained(where, trust_remote_code=remote), where
        except (OSError, ValueError):
            continue
    return None, None


# ----------------------------------------------------------------------------------- merge


def merge_adapter(adapter_dir: Path, base: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Load base + adapter and merge: (merged model, tokenizer or None, a summary dict)."""
    adapter_dir = find_adapter_dir(adapter_dir)
    peft_config = read_adapter_config(adapter_dir)
    base_path = resolve_base(adapter_dir, peft_config, base)
    return _merge(adapter_dir, peft_config, base_path, explicit_base=base is not None)


def _merge(adapter_dir: Path, peft_config: Any, base_path: str, *,
           explicit_base: bool) -> tuple[Any, Any, dict[str, Any]]:
    from peft import PeftModel

    source = "--base" if explicit_base else f"base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG}"
    carried = saved_modules(adapter_tensor_shapes(adapter_dir))
    overrides = head_overrides(adapter_dir, peft_config, carried)
    model, remote, new = load_base(base_path, peft_config, source=source, overrides=overrides)
    uncovered = sorted(new - set(carried))
    if uncovered:  # merging would save these as random weights
        raise LmforgeError(
            f"base model {base_path!r} has no weights for {', '.join(uncovered)} (newly initialised when "
            f"loading it for {peft_config.task_type}) and adapter {adapter_dir} does not carry them "
            "(modules_to_save): the merged model would be random there; check the base (--base)")
    tokenizer, tokenizer_from = load_tokenizer(adapter_dir, base_path, remote=remote)
    if tokenizer is not None and tokenizer_from == str(adapter_dir):
        # tokens added during fine-tuning (chat markers): the adapter holds the resized embeddings
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), config=peft_config)
    except (ValueError, RuntimeError, KeyError) as e:  # target modules or shapes that do not fit
        raise LmforgeError(f"adapter {adapter_dir} does not fit base model {base_path!r}: {e}") from None
    merged = peft_model.merge_and_unload()
    if new:
        print(f"from the adapter (modules_to_save): {', '.join(sorted({k.rsplit('.', 1)[0] for k in new}))}")
    summary = {
        "adapter": str(adapter_dir), "base": base_path, "peft_type": str(peft_config.peft_type.value),
        "task_type": peft_config.task_type, "class": type(merged).__name__,
        "model_type": merged.config.model_type, "tokenizer": tokenizer_from,
        "num_labels": merged.config.num_labels if peft_config.task_type == "SEQ_CLS" else None,
    }
    return merged, tokenizer, summary


def save_merged(model: Any, tokenizer: Any, output: Path, *, overwrite: bool, record: dict[str, Any]) -> None:
    """Write model (safetensors), generation config, tokenizer and ``lmforge_merge.json`` (where it
    came from) into place (see ``write_model_folder``)."""
    write_model_folder(output, model, tokenizer, overwrite=overwrite, doing="merging", flag="--output ",
                       files={MERGE_RECORD: json.dumps(record, indent=2) + "\n"})


def write_model_folder(output: Path, model: Any, tokenizer: Any, *, overwrite: bool, doing: str, flag: str = "",
                       files: dict[str, str] | None = None) -> None:
    """Save model (safetensors, + generation config when it generates), tokenizer and ``files``
    (name -> text) into a temporary sibling of ``output``, then move it into place (replacing
    ``output`` when ``overwrite``): a failure part-way leaves nothing behind."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.{doing}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # the umask's permissions, as a folder the user made (mkdtemp's are 0700)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if output.exists():
            if not overwrite and any(output.iterdir()):  # filled meanwhile
                raise LmforgeError(f"{flag}{output} was filled while {doing}; nothing replaced")
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def merge_command(adapter_dir: Path, *, output: Path, base: str | None = None, overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save the result as a normal model.

    The merged folder loads with ``AutoModelFor*.from_pretrained(OUTPUT)`` (lmforge models:
    ``trust_remote_code=True`` where lmforge is not installed) and gives the same logits as base +
    adapter. A trained classification head (``modules_to_save``) is kept. Example:
    ``lmforge merge runs/sst-lora/final --output runs/sst-merged``

    Args:
        adapter_dir: the adapter folder (adapter_config.json + adapter_model.safetensors), or an
            lmforge run folder whose final/ holds one.
        output: the folder to write the merged model to.
        base: the base model (folder or Hub id) instead of base_model_name_or_path in
            adapter_config.json (for an adapter trained on another machine).
        overwrite: replace a non-empty output folder.
    """
    adapter_dir, output = find_adapter_dir(Path(adapter_dir)), Path(output)
    peft_config = read_adapter_config(adapter_dir)
    base_path = resolve_base(adapter_dir, peft_config, base)
    inputs = [adapter_dir] + ([Path(base_path)] if Path(base_path).is_dir() else [])
    check_output_dir(output, overwrite=overwrite, inputs=inputs)
    merged, tokenizer, summary = _merge(adapter_dir, peft_config, base_path, explicit_base=base is not None)
    save_merged(merged, tokenizer, output, overwrite=overwrite, record=summary)
    tok = f", tokenizer from {summary['tokenizer']}" if tokenizer is not None else ""
    print(f"merged {summary['peft_type']} adapter {summary['adapter']} into {summary['base']} -> {output} "
          f"({summary['class']}, model_type {summary['model_type']}{tok})")
    if tokenizer is None:
        print(f"note: neither {adapter_dir} nor the base model holds a tokenizer; save one into {output}")
    return output
