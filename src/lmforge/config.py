"""Typed dataclasses as the one source of truth for YAML keys (and, through ``lmforge.commands``,
for command-line flags).

A configuration is a (nested) dataclass whose fields are documented in its docstring's
``Attributes:``. ``load_config(cls, path, overrides)`` reads a YAML file, applies dotted overrides
(``{"optim.lr": 3e-4}``), refuses unknown keys with the closest valid one suggested, converts
every value to its annotated type and validates the result. ``Option`` (through
``typing.Annotated``) says more about a field: a short flag spelling, the value of a flag given
without one, or that it names an input path (resolved against the config file's folder).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.errors import LmforgeError, closest
from lmforge.presets import is_packaged

NO_DEFAULT = inspect.Parameter.empty
_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Option:
    """More about a setting, given as ``Annotated[str, Option(...)]`` on a field or parameter.

    Attributes:
        alias: another flag for it (``--data`` for ``data.source``).
        const: the value of its flag given without a value (``--resume`` alone means ``auto``).
        input_path: it names a file or folder to read: a relative path in a config file is looked
            up from that file's folder first (packaged presets: from the current folder).
        positional: an optional positional argument (``lmforge presets [KIND]``), not a flag.
        schema: the value may be a mapping of this dataclass's keys, whose input paths resolve too
            (an ablate sweep's inline ``base``).
    """

    alias: str | None = None
    const: Any = _UNSET
    input_path: bool = False
    positional: bool = False
    schema: type | None = None

    @property
    def has_const(self) -> bool:
        return self.const is not _UNSET


def option_of(tp: Any) -> tuple[Any, Option | None]:
    """``Annotated[X, Option(...)]`` -> (X, the Option); anything else -> (tp, None)."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *extras = typing.get_args(tp)
        return base, next((e for e in extras if isinstance(e, Option)), None)
    return tp, None


def type_hints(obj: Any) -> dict[str, Any]:
    """The annotations of a function or dataclass, ``Annotated`` extras kept."""
    return typing.get_type_hints(obj, include_extras=True)


# --------------------------------------------------------------------------- type helpers


def strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False) (``Annotated`` extras dropped)."""
    tp = option_of(tp)[0]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def is_dataclass_type(tp: Any) -> bool:
    tp = option_of(tp)[0]
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def coerce(value: Any, tp: Any, *, name: str) -> Any:
    """Convert a YAML or command-line value to the annotated type, or raise a clear error."""
    tp, optional = strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise LmforgeError(f"{name}: a value is required (got null)")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise LmforgeError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = value if isinstance(value, (list, tuple)) else [value]
        out = [coerce(v, item_tp, name=name) for v in items]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):  # from the command line: a YAML/JSON mapping such as {num_hidden_layers: 4}
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise LmforgeError(f"{name}: expected a mapping such as {{key: value}}, got {value!r} ({e})") from None
        if not isinstance(value, dict):
            raise LmforgeError(f"{name}: expected a mapping such as {{key: value}}, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise LmforgeError(f"{name}: expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, str):
                return int(float(value)) if re.fullmatch(r"[-+]?\d+(\.0*)?(e\+?\d+)?", value) else int(value)
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise LmforgeError(f"{name}: expected {tp.__name__}, got {value!r}") from None
    if tp in (str, Path):
        return tp(value)
    return value


def docstring_args(fn: Callable) -> dict[str, str]:
    """Parse the ``Args:`` section of a Google-style docstring into {name: help}.

    For a class, the sections of its bases count too (a subclass documents only what it adds
    or changes)."""
    if inspect.isclass(fn):
        out: dict[str, str] = {}
        for klass in reversed(fn.__mro__):
            doc = klass.__dict__.get("__doc__")
            if isinstance(doc, str) and klass is not object:
                out.update(_parse_args(inspect.cleandoc(doc)))
        return out
    return _parse_args(inspect.getdoc(fn) or "")


def _parse_args(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    in_args, current = False, None
    for line in doc.splitlines():
        if re.match(r"^(Args|Arguments|Attributes|Fields):\s*$", line):
            in_args = True
            continue
        if in_args:
            if line and not line.startswith(" "):
                break
            m = re.match(r"^\s{2,8}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
            if m:
                current = m.group(1)
                out[current] = m.group(2).strip()
            elif current and line.strip():
                out[current] += " " + line.strip()
    return out


def summary(fn: Callable) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def description(fn: Callable) -> str:
    """The docstring without its Args section, for ``--help``."""
    doc = inspect.getdoc(fn) or ""
    return re.split(r"\n(?:Args|Arguments|Returns|Raises):\s*\n", doc)[0].strip()


# --------------------------------------------------------------------------- dataclasses


def flat_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted name, type, default, help) for every leaf field of a (nested) dataclass; the
    type keeps its ``Annotated`` ``Option``."""
    hints = type_hints(cls)
    helps = docstring_args(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if is_dataclass_type(tp):
            yield from flat_fields(tp, prefix=f"{name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = NO_DEFAULT
        yield name, tp, default, helps.get(f.name, "")


def _closest(key: str, valid: list[str]) -> str:
    match = " or ".join(f"'{m}'" for m in closest(key, valid, cutoff=0.5))
    return f"; did you mean {match}?" if match else ""


def check_keys(cls: type, values: dict[str, Any], *, source: str = "config", prefix: str = "") -> None:
    """Refuse a key of ``values`` (a nested mapping) that ``cls`` has no field for, naming the
    closest valid one."""
    if not isinstance(values, dict):
        raise LmforgeError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {values!r}")
    hints = type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [n for n, *_ in flat_fields(cls, prefix)] + [f"{prefix}{n}" for n in names]
            raise LmforgeError(f"{source}: unknown key '{full}'{_closest(full, sorted(set(valid)))}")
        if is_dataclass_type(hints[key]) and value is not None:
            check_keys(option_of(hints[key])[0], value, source=source, prefix=f"{full}.")


def build_dataclass(cls: type, values: dict[str, Any], *, source: str = "config", prefix: str = ""):
    """Build a nested dataclass from a (nested) mapping, refusing unknown keys by name."""
    check_keys(cls, values, source=source, prefix=prefix)
    hints = type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        tp = hints[key]
        if is_dataclass_type(tp):
            kwargs[key] = build_dataclass(tp, value or {}, source=source, prefix=f"{full}.")
        else:
            kwargs[key] = coerce(value, tp, name=f"{source}: {full}")
    missing = [
        f"{prefix}{f.name}" for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise LmforgeError(f"{source}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"{source}: {e}") from None


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'optim.lr': 1} -> {'optim': {'lr': 1}}"""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key written twice in one mapping is an error (PyYAML keeps
    the last one silently: a second ``lr:`` or two variants with one name would be lost)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping (first on line "
                    f"{seen[key].start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: the top level must be a mapping of keys to values")
    return data


def resolve_path(value: str, folder: Path) -> str:
    """A relative input path from a config file in ``folder``: the file's folder first, then the
    current folder; when neither has it, the file's folder for a path written as relative
    (``./x``, ``../x``), else the value as it is (a built-in name or a Hub id)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    near = folder / path
    if near.exists():
        return str(near)
    if path.exists():
        return value
    return str(near) if value.startswith(("./", "../")) else value


def resolve_input_paths(cls: type, values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``values`` (a nested mapping for ``cls``) with the relative paths of its input-path fields
    (``Option(input_path=True)``) looked up from ``folder`` (see ``resolve_path``)."""
    if not isinstance(values, dict):
        return values
    hints = type_hints(cls)
    out = dict(values)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        tp = hints[f.name]
        option = option_of(tp)[1] or Option()
        if is_dataclass_type(tp):
            out[f.name] = resolve_input_paths(option_of(tp)[0], out[f.name], folder)
        elif option.schema is not None and isinstance(out[f.name], dict):
            out[f.name] = resolve_input_paths(option.schema, out[f.name], folder)
        elif option.input_path and isinstance(out[f.name], str) and out[f.name]:
            out[f.name] = resolve_path(out[f.name], folder)
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """YAML file (optional) + dotted overrides -> a validated ``cls`` instance.

    Input paths in the file are relative to its folder (a packaged preset's: to the current folder,
    where the files it names are written); overrides (command-line flags) to the current folder.
    """
    values = load_yaml(path) if path else {}
    if path:
        check_keys(cls, values, source=str(path))  # the file's own mistakes, named as the file's
    if path and not is_packaged(path):
        values = resolve_input_paths(cls, values, Path(path).expanduser().resolve().parent)
    source = str(path) if path else "config"
    if overrides:
        source = f"{source} + command-line flags" if path else "command-line flags"
    values = merge(values, nest(overrides or {}))
    return build_dataclass(cls, values, source=source)


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-able data (Paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
