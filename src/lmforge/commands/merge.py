"""``lmforge merge``: fold a LoRA adapter into its base model and save a plain model."""

from __future__ import annotations

from pathlib import Path

from lmforge.export.merge import merge_to_folder


def merge(adapter: str, *, output_dir: Path, base_model: str | None = None, overwrite: bool = False,
          trust_remote_code: bool = False) -> int:
    """Merge a LoRA adapter into (a copy of) its base model and save the result as a plain model.

    The merged folder loads with ``AutoModelFor*.from_pretrained(DIR)`` (lmforge models:
    ``trust_remote_code=True`` where lmforge is not installed) and gives the same logits as base +
    adapter. A trained classification head (``modules_to_save``) is kept. The adapter and the base
    are left as they are. Example: ``lmforge merge runs/rt-lora --output-dir runs/rt-merged``

    Args:
        adapter: the adapter folder (adapter_config.json + adapter_model.safetensors), or the
            fine-tuning run folder whose final/ holds one.
        output_dir: the folder to write the merged model to.
        base_model: the base model (folder or Hub id) instead of base_model_name_or_path in
            adapter_config.json (for an adapter trained on another machine).
        overwrite: replace the model in a non-empty output folder.
        trust_remote_code: allow a base model that needs its own code (lmforge's load without it).
    """
    done = merge_to_folder(adapter, output_dir, base=base_model, overwrite=overwrite,
                           trust_remote_code=trust_remote_code)
    record = done.record
    if record["trained_modules"]:
        print(f"trained in full by the adapter (modules_to_save): {', '.join(record['trained_modules'])}")
    tokenizer = f", tokenizer from {record['tokenizer']}" if done.tokenizer is not None else ""
    print(f"merged {record['peft_type']} adapter {record['adapter']} with its base {record['base']} -> "
          f"{output_dir} ({record['class']}, model_type {record['model_type']}{tokenizer}); the adapter and "
          "the base are unchanged")
    if done.tokenizer is None:
        print(f"note: neither the adapter nor the base model holds a tokenizer; save one into {output_dir}")
    return 0
