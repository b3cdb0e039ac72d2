"""``lmforge convert``: a model to or from the stock transformers classes (Llama, GPT-2, BERT, Mamba)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from lmforge.config import Option
from lmforge.errors import LmforgeError
from lmforge.export.convert import convert as convert_model

_SHORT = ""  # --to-hf / --from-hf given without a folder: the output comes from --output-dir


def convert(model: str, *, to_hf: Annotated[str | None, Option(const=_SHORT)] = None,
            from_hf: Annotated[str | None, Option(const=_SHORT)] = None, output_dir: Path | None = None,
            overwrite: bool = False) -> int:
    """Convert a model to or from the stock transformers classes (Llama, GPT-2, BERT, Mamba).

    --to-hf writes a checkpoint that loads with no remote code at all (trust_remote_code=False),
    so any tool that reads those formats can use it; --from-hf writes the lmforge model with its
    code. The weights are mapped exactly; a configuration the target cannot represent (e.g. an
    ALiBi GPT) is refused naming the switch. The output folder is --output-dir, or the folder
    written right after --to-hf / --from-hf. Examples:
    ``lmforge convert runs/quickstart --to-hf --output-dir stock``,
    ``lmforge convert path/to/llama --from-hf --output-dir runs/from-llama``

    Args:
        model: --to-hf: any folder lmforge wrote (a run, its final/, a quickstart folder) or a
            saved lmforge model; --from-hf: a stock transformers model folder.
        to_hf: convert lmforge -> stock transformers (optionally followed by the output folder).
        from_hf: convert stock transformers -> lmforge (optionally followed by the output folder).
        output_dir: the folder to write the converted model to.
        overwrite: replace the model in a non-empty output folder.
    """
    if (to_hf is None) == (from_hf is None):
        raise LmforgeError("give exactly one of --to-hf (lmforge -> stock transformers) or --from-hf "
                           "(stock transformers -> lmforge)")
    named = to_hf if to_hf is not None else from_hf
    if named and output_dir is not None and Path(named) != Path(output_dir):
        raise LmforgeError(f"two output folders: {named} (after --{'to' if to_hf is not None else 'from'}-hf) "
                           f"and --output-dir {output_dir}; give one")
    output = Path(named) if named else output_dir
    if output is None:
        raise LmforgeError("where should the converted model go? give --output-dir DIR")
    flag = f"--{'to' if to_hf is not None else 'from'}-hf" if named else "--output-dir"
    done = convert_model(model, output, to_hf=to_hf is not None, overwrite=overwrite, flag=flag)
    loads = ("loads without trust_remote_code" if done.to_hf
             else "carries its code: loads with trust_remote_code=True")
    print(f"{done.source_type} {done.source_class} -> {done.target_class}: {done.output} ({loads})")
    if not done.tokenizer:
        print(f"note: {done.source} holds no tokenizer; save one into {done.output}")
    return 0
