"""Typed functions and dataclasses as the one source of truth for CLI flags and YAML keys.

A command is a plain typed function. Its parameters become flags (``vocab_size`` ->
``--vocab-size``), its Google-style docstring ``Args:`` become the help text. A parameter
annotated with a dataclass becomes ``--config FILE.yaml`` plus one flag per (nested) field
(``--optim.lr 3e-4``); flags given on the command line override the YAML file, and unknown
keys in either are refused with the closest valid key suggested.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.errors import LmforgeError

_NO_DEFAULT = inspect.Parameter.empty


# --------------------------------------------------------------------------- type helpers


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def coerce(value: Any, tp: Any, *, name: str) -> Any:
    """Convert a YAML or command-line value to the annotated type, or raise a clear error."""
    tp, optional = _strip_optional(tp)
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
    """Yield (dotted name, type, default, help) for every leaf field of a (nested) dataclass."""
    hints = typing.get_type_hints(cls)
    helps = docstring_args(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            yield from flat_fields(tp, prefix=f"{name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _NO_DEFAULT
        yield name, tp, default, helps.get(f.name, "")


def closest(name: str, valid: list[str], *, cutoff: float = 0.6) -> list[str]:
    """The valid names ``name`` most likely meant: the closest spelling, where a dotted name can
    also be written as its last part alone, so ``lr`` finds ``optim.lr`` (and ``--lr`` finds
    ``--optim.lr``, ``--no-streaming`` finds ``--no-data.streaming``). A last part shared by
    several sections gives them all."""
    spellings: dict[str, list[str]] = {}
    for v in valid:
        spellings.setdefault(v, []).append(v)
        if "." in v:
            leaf = re.match(r"(--(no-)?)?", v).group() + v.rsplit(".", 1)[1]
            spellings.setdefault(leaf, []).append(v)
    match = difflib.get_close_matches(name, list(spellings), n=1, cutoff=cutoff)
    return spellings[match[0]] if match else []


def _closest(key: str, valid: list[str]) -> str:
    match = " or ".join(f"'{m}'" for m in closest(key, valid, cutoff=0.5))
    return f"; did you mean {match}?" if match else ""


def build_dataclass(cls: type, values: dict[str, Any], *, source: str = "config", prefix: str = ""):
    """Build a nested dataclass from a (nested) mapping, refusing unknown keys by name."""
    if not isinstance(values, dict):
        raise LmforgeError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [n for n, *_ in flat_fields(cls, prefix)] + [f"{prefix}{n}" for n in names]
            raise LmforgeError(f"{source}: unknown key '{full}'{_closest(full, sorted(set(valid)))}")
        tp = hints[key]
        if _is_dataclass_type(tp):
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


def load_config(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """YAML file (optional) + dotted overrides -> a validated ``cls`` instance."""
    values = load_yaml(path) if path else {}
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


# --------------------------------------------------------------------------- argparse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_argument(parser: argparse.ArgumentParser, name: str, tp: Any, default: Any, help: str,
                  *, positional: bool, dest: str, required: bool | None = None) -> None:
    base, _ = _strip_optional(tp)
    origin = typing.get_origin(base)
    kwargs: dict[str, Any] = {"help": help or None}
    if origin is Literal:
        kwargs["choices"] = [str(c) for c in typing.get_args(base)]
    if origin in (list, tuple):
        kwargs["nargs"] = "+" if (positional or default is _NO_DEFAULT) else "*"
    if default is not _NO_DEFAULT and help is not None and default not in (None, [], ()):
        kwargs["help"] = f"{help} (default: {default})".strip()
    if positional:
        parser.add_argument(name, metavar=name.upper().replace("-", "_"), **kwargs)
        return
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    metavar = None if "choices" in kwargs else name.split(".")[-1].upper().replace("-", "_")
    parser.add_argument(_flag(name), dest=dest, default=argparse.SUPPRESS, metavar=metavar,
                        required=default is _NO_DEFAULT if required is None else required, **kwargs)


_CONFIG_DEST = "__config__"


def _takes_config_file(fn: Callable) -> bool:
    """Commands with keyword options and no dataclass parameter take ``--config`` for those options."""
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters.values()
    return (not any(_is_dataclass_type(hints.get(p.name)) for p in params)
            and any(p.kind == p.KEYWORD_ONLY for p in params))


def add_function_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    """Add one argument per parameter of ``fn`` (positional when it has no default).

    A dataclass parameter becomes ``--config FILE.yaml`` plus one dotted flag per field. A command
    with keyword-only options takes ``--config FILE.yaml`` holding any of them (keys as the
    parameter names); flags given on the command line override the file.
    """
    hints = typing.get_type_hints(fn)
    helps = docstring_args(fn)
    options_file = _takes_config_file(fn)
    if options_file:
        parser.add_argument("--config", dest=_CONFIG_DEST, default=argparse.SUPPRESS, metavar="FILE.yaml",
                            help="YAML file with any of the options below (keys as the flags without "
                                 "dashes, e.g. vocab_size: 8192); flags given here override it")
    for p in inspect.signature(fn).parameters.values():
        tp = hints.get(p.name, str)
        if _is_dataclass_type(tp):
            parser.add_argument("--config", dest=f"{p.name}.__config__", default=argparse.SUPPRESS,
                                metavar="FILE.yaml", help="YAML file with the settings below; flags override it")
            group = parser.add_argument_group(f"{p.name} settings (YAML keys)")
            for fname, ftp, fdefault, fhelp in flat_fields(tp):
                _add_argument(group, fname, ftp, fdefault if fdefault is not _NO_DEFAULT else None,
                              fhelp, positional=False, dest=f"{p.name}.{fname}")
            continue
        positional = p.default is _NO_DEFAULT and p.kind != p.KEYWORD_ONLY
        _add_argument(parser, p.name.replace("_", "-") if not positional else p.name, tp, p.default,
                      helps.get(p.name, ""), positional=positional, dest=p.name,
                      required=False if options_file else None)  # may come from --config: checked later


def call_with_namespace(fn: Callable, ns: argparse.Namespace) -> Any:
    """Call ``fn`` with the parsed values, coercing types and building dataclass parameters."""
    hints = typing.get_type_hints(fn)
    given = vars(ns)
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        tp = hints.get(p.name, str)
        if _is_dataclass_type(tp):
            prefix = f"{p.name}."
            config_path = given.get(f"{prefix}__config__")
            overrides = {k[len(prefix):]: v for k, v in given.items()
                         if k.startswith(prefix) and not k.endswith("__config__")}
            kwargs[p.name] = load_config(tp, config_path, overrides)
        elif p.name in given:
            kwargs[p.name] = coerce(given[p.name], tp, name=_flag(p.name))
    if _CONFIG_DEST in given:
        _fill_from_file(fn, hints, given[_CONFIG_DEST], kwargs)
    missing = [p.name for p in inspect.signature(fn).parameters.values()
               if p.default is _NO_DEFAULT and p.name not in kwargs]
    if missing:
        where = " (on the command line or in the --config file)" if _takes_config_file(fn) else ""
        raise LmforgeError(f"missing required option(s) {', '.join(map(_flag, missing))}{where}")
    return fn(**kwargs)


def _fill_from_file(fn: Callable, hints: dict[str, Any], path: str, kwargs: dict[str, Any]) -> None:
    """Options from a ``--config`` YAML file, for those not given as flags (flags win)."""
    params = {p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY}
    for key, value in load_yaml(path).items():
        name = str(key).replace("-", "_")
        if name not in params:
            raise LmforgeError(f"{path}: unknown option '{key}'{_closest(name, sorted(params))}; "
                               f"valid: {', '.join(sorted(params))}")
        if name not in kwargs:
            kwargs[name] = coerce(value, hints.get(name, str), name=f"{path}: {key}")
