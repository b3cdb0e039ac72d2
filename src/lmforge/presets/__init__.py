"""Presets shipped with lmforge: YAML files in this package, one folder per kind.

    find_preset("pretrain", "gpt-debug")   -> the path of pretrain/gpt-debug.yaml
    find_preset("pretrain", "my.yaml")     -> my.yaml (a path works wherever a name does)
    list_presets("model")                  -> {"bert-classic": path, ...}

Kinds: ``model`` (config keys of a model), ``pretrain``, ``finetune``, ``tokenizer``, ``ablate``
(the ``--config`` of those verbs) and ``accelerate`` (files for ``accelerate launch --config_file``).
A preset's first comment lines describe it; ``lmforge presets`` prints them.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError, closest

KINDS = ("model", "pretrain", "finetune", "tokenizer", "ablate", "accelerate")
_ROOT = Path(__file__).resolve().parent


def preset_dir(kind: str) -> Path:
    """The packaged folder of one kind of preset."""
    if kind not in KINDS:
        raise LmforgeError(f"unknown kind of preset {kind!r}; kinds: {', '.join(KINDS)}")
    return _ROOT / kind


def list_presets(kind: str) -> dict[str, Path]:
    """The packaged presets of ``kind``: name -> path, sorted by name."""
    return {p.stem: p for p in sorted(preset_dir(kind).glob("*.yaml"))}


def is_packaged(path: str | Path) -> bool:
    """Whether ``path`` is one of the presets shipped inside lmforge."""
    return _ROOT in Path(path).resolve().parents


def is_path(name: str) -> bool:
    """Whether ``name`` is written as a file path (a folder in it or a YAML suffix), not a preset name."""
    return "/" in name or "\\" in name or Path(name).suffix in (".yaml", ".yml")


def find_preset(kind: str, name: str | Path) -> Path:
    """A preset ``name`` of ``kind``, or a YAML file path, as a path to an existing file."""
    text = str(name)
    if is_path(text) or Path(text).is_file():
        path = Path(text).expanduser()
        if not path.is_file():
            raise LmforgeError(f"config file not found: {path} (looked in {path.resolve().parent}); "
                               f"or name a packaged {kind} preset: {', '.join(list_presets(kind))}")
        return path
    found = list_presets(kind)
    if text in found:
        return found[text]
    meant = "".join(f" (did you mean {m!r}?)" for m in closest(text, list(found))[:1])
    raise LmforgeError(f"{text!r} is neither a {kind} preset{meant} nor a YAML file; {kind} presets: "
                       f"{', '.join(found) or 'none'} (lmforge presets {kind} describes them)")


def describe(path: Path) -> str:
    """The first comment line of a preset file, without the ``#``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            if text:
                return text
        elif line.strip():
            break
    return ""
