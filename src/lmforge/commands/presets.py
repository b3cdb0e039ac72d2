"""``lmforge presets``: the presets that ship with lmforge."""

from __future__ import annotations

from typing import Annotated, Literal

from lmforge.config import Option
from lmforge.presets import KINDS, describe, list_presets

Kind = Literal["model", "pretrain", "finetune", "tokenizer", "ablate", "accelerate"]


def presets(kind: Annotated[Kind | None, Option(positional=True)] = None, *, paths: bool = False) -> int:
    """List the presets that ship with lmforge, with what each is.

    Use one by name wherever a --config is taken (``lmforge pretrain --config gpt-debug``), as a
    model.preset (model presets), or as accelerate's --config_file (the path shown by --paths).
    Example: ``lmforge presets pretrain``

    Args:
        kind: only this kind of preset (model, pretrain, finetune, tokenizer, ablate, accelerate).
        paths: show each preset's file path.
    """
    for k in [kind] if kind else KINDS:
        found = list_presets(k)
        print(f"{k} presets:")
        width = max(map(len, found), default=0)
        for name, path in found.items():
            shown = str(path) if paths else describe(path)
            print(f"  {name:<{width}}  {shown}")
        print()
    return 0
