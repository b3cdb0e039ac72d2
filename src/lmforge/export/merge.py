"""Fold a LoRA adapter into its base weights and save a plain model.

peft does the work (``PeftModel.from_pretrained`` then ``merge_and_unload``); ``lmforge.runs``
finds the adapter and its base, loads the base in the Auto class of the adapter's task (with the
labels of a classification adapter) and checks that every newly initialised weight is carried by
the adapter. A ``modules_to_save`` module (the classification head of a LoRA fine-tune) is
replaced by its trained copy, so the merged model carries the trained head. Every check runs
before anything is written, and the output is written to a temporary sibling folder that is
renamed into place only when complete. The adapter and the base are never changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.runs import (
    adapter_base,
    check_output_dir,
    find_model,
    has_tokenizer,
    load_model,
    read_adapter_config,
    write_model_folder,
)

MERGE_RECORD = "lmforge_merge.json"  # in the merged folder: which adapter and base it came from


@dataclass
class Merge:
    """What ``merge_adapter`` made: the merged model, its tokenizer and where they came from."""

    model: Any
    tokenizer: Any | None
    record: dict[str, Any]  # adapter, base, peft_type, task_type, class, model_type, tokenizer, num_labels


def find_adapter(path: str | Path) -> Path:
    """The folder holding a LoRA adapter (a fine-tuning run folder: its ``final/``)."""
    folder = Path(path)
    if folder.is_dir() and not any(folder.iterdir()):
        raise LmforgeError(f"{folder} is not a LoRA adapter folder: adapter_config.json and adapter_model.safetensors "
                           "missing (lmforge merge takes the folder a LoRA fine-tune, method: lora, saves)")
    found = find_model(path, what="adapter folder")
    if not found.is_adapter:
        raise LmforgeError(f"{found.path} holds a full model, not a LoRA adapter: it has nothing to merge "
                           "(lmforge merge takes the folder a LoRA fine-tune, method: lora, saves)")
    peft_config = read_adapter_config(found.path)
    if peft_config.is_prompt_learning:
        raise LmforgeError(f"{found.path / 'adapter_config.json'}: a {peft_config.peft_type} adapter adds virtual "
                           "tokens and has no weights to merge; only weight adapters such as LoRA can be merged")
    return found.path


def merge_adapter(adapter: str | Path, base: str | None = None, *, trust_remote_code: bool = False) -> Merge:
    """Load the adapter on its base (``base``, else the one its config records) and merge."""
    adapter_dir = find_adapter(adapter)
    loaded = load_model(adapter_dir, base=base, trust_remote_code=trust_remote_code)
    peft_config = loaded.model.peft_config[loaded.model.active_adapter]  # as loaded from adapter_config.json
    new = [name for name, _ in loaded.model.named_modules() if name.endswith("modules_to_save")]
    merged = loaded.model.merge_and_unload()
    record = {
        "adapter": str(adapter_dir), "base": loaded.base, "peft_type": str(peft_config.peft_type.value),
        "task_type": peft_config.task_type, "class": type(merged).__name__,
        "model_type": merged.config.model_type,
        "tokenizer": None if loaded.tokenizer is None else str(adapter_dir) if has_tokenizer(adapter_dir) else loaded.base,
        "num_labels": merged.config.num_labels if peft_config.task_type == "SEQ_CLS" else None,
        "trained_modules": sorted({n.rsplit(".modules_to_save", 1)[0].removeprefix("base_model.model.") for n in new}),
    }
    return Merge(merged, loaded.tokenizer, record)


def check_merge(adapter: str | Path, output: Path, *, base: str | None = None, overwrite: bool = False) -> Path:
    """Every check of a merge that needs no model loaded (reads only): the adapter folder, its
    base, and the output folder (never over, around or inside the adapter or the base)."""
    adapter_dir = find_adapter(adapter)
    base_path = adapter_base(adapter_dir, read_adapter_config(adapter_dir), base)
    inputs = (adapter_dir,) + ((Path(base_path),) if Path(base_path).is_dir() else ())
    check_output_dir(output, overwrite=overwrite, inputs=inputs, what="merged model")
    return adapter_dir


def merge_to_folder(adapter: str | Path, output: str | Path, *, base: str | None = None, overwrite: bool = False,
                    trust_remote_code: bool = False) -> Merge:
    """Merge a LoRA adapter into its base and write model (safetensors), generation config,
    tokenizer and ``lmforge_merge.json`` (where it came from) into ``output``."""
    output = Path(output)
    check_merge(adapter, output, base=base, overwrite=overwrite)
    done = merge_adapter(adapter, base, trust_remote_code=trust_remote_code)
    write_model_folder(output, done.model, done.tokenizer, overwrite=overwrite, doing="merging",
                       files={MERGE_RECORD: json.dumps(done.record, indent=2) + "\n"})
    return done
