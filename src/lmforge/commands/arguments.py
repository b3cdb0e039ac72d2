"""Typed functions as commands: their parameters are the flags, their docstrings the help.

A command is a plain typed function. A parameter without a default is positional (``MODEL``), one
with a default (or keyword-only) is a flag (``vocab_size`` -> ``--vocab-size``); the docstring's
``Args:`` are the help texts. A parameter annotated with a dataclass (``config: PretrainConfig``)
becomes ``--config NAME|FILE`` (a packaged preset or a YAML file) plus one flag per field, dotted
for nested sections (``--vocab-size 8192``, ``--optim.lr 3e-4``). Flags override the file;
unknown keys are refused with the closest one suggested.

Every command also takes ``--print-config`` (show the resolved settings as YAML and exit), and
accepts flags spelled with underscores (``--vocab_size``, ``--train.max_steps``). A bad flag or
value is answered in one line that names the flag, the value and what is valid.
"""

from __future__ import annotations

import argparse
import inspect
import typing
from collections.abc import Callable
from typing import Any, Literal

import yaml

from lmforge.config import (
    NO_DEFAULT,
    coerce,
    docstring_args,
    flat_fields,
    is_dataclass_type,
    load_config,
    option_of,
    strip_optional,
    to_dict,
    type_hints,
)
from lmforge.errors import LmforgeError, closest
from lmforge.presets import find_preset

_CONFIG_DEST = "__config__"
_PRINT_DEST = "__print_config__"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump) and no abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise LmforgeError(f"{message} ('{self.prog} --help' lists the options)")


def normalize_flags(argv: list[str]) -> list[str]:
    """``--vocab_size=8`` -> ``--vocab-size=8``: flag names written with underscores, as every
    transformers user types them, are the dashed flags (values are left as they are)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_argument(parser: Any, name: str, tp: Any, default: Any, help: str, *, positional: bool, dest: str,
                  required: bool) -> None:
    tp, option = option_of(tp)
    base, _ = strip_optional(tp)
    origin = typing.get_origin(base)
    kwargs: dict[str, Any] = {"help": help or None}
    if origin is Literal:
        kwargs["choices"] = [str(c) for c in typing.get_args(base)]
    if origin in (list, tuple):
        kwargs["nargs"] = "+" if (positional or required) else "*"
    if default is not NO_DEFAULT and default not in (None, [], ()):
        kwargs["help"] = f"{help} (default: {default})".strip()
    if positional or (option is not None and option.positional):
        if not positional:
            kwargs["nargs"] = "?"
        parser.add_argument(dest, metavar=name.upper().replace("-", "_").replace(".", "_"), **kwargs)
        return
    if required:
        kwargs["help"] = f"{kwargs['help'] or ''} (required)".strip()
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif option is not None and option.has_const:
        kwargs.update(nargs="?", const=option.const)
    flags = [_flag(name)] + ([option.alias] if option is not None and option.alias else [])
    if name.rsplit(".", 1)[-1] == "output_dir":
        flags.append("--output")  # its short form, in every verb
    metavar = None if "choices" in kwargs else name.split(".")[-1].upper().replace("-", "_")
    parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, metavar=metavar, required=required, **kwargs)


def _dataclass_param(fn: Callable) -> inspect.Parameter | None:
    hints = type_hints(fn)
    return next((p for p in inspect.signature(fn).parameters.values() if is_dataclass_type(hints.get(p.name))), None)


def build_parser(fn: Callable, *, prog: str, description: str, preset_kind: str | None = None) -> ArgumentParser:
    """The parser of command ``fn`` (see the module docstring)."""
    parser = ArgumentParser(prog=prog, description=description)
    hints = type_hints(fn)
    helps = docstring_args(fn)
    presets = f"a packaged {preset_kind} preset ('lmforge presets {preset_kind}' lists them) or " if preset_kind else ""
    required_group = parser.add_argument_group("required")
    for p in inspect.signature(fn).parameters.values():
        tp = hints.get(p.name, str)
        if is_dataclass_type(tp):
            parser.add_argument("--config", dest=f"{p.name}.{_CONFIG_DEST}", default=argparse.SUPPRESS,
                                metavar="NAME|FILE", help=f"{presets}a YAML file with the settings below; "
                                                          "flags override it")
            group = parser.add_argument_group(f"{p.name} settings (YAML keys)")
            for fname, ftp, fdefault, fhelp in flat_fields(tp):
                needed = fdefault is NO_DEFAULT  # may come from --config: checked when the config is built
                _add_argument(required_group if needed else group, fname, ftp, fdefault,
                              fhelp + (" (required: here or in --config)" if needed else ""), positional=False,
                              dest=f"{p.name}.{fname}", required=False)
            continue
        positional = p.default is NO_DEFAULT and p.kind != p.KEYWORD_ONLY
        needed = p.default is NO_DEFAULT and not positional
        _add_argument(required_group if needed else parser, p.name, tp, p.default, helps.get(p.name, ""),
                      positional=positional, dest=p.name, required=needed)
    usable = " (usable as --config)" if _dataclass_param(fn) is not None else ""
    parser.add_argument("--print-config", dest=_PRINT_DEST, action="store_true",
                        help=f"print the resolved settings as YAML{usable} and exit")
    return parser


def resolve(fn: Callable, ns: argparse.Namespace, *, preset_kind: str | None = None) -> dict[str, Any]:
    """The keyword arguments of ``fn`` from parsed flags: types coerced, dataclass parameters built
    from ``--config`` and the dotted flags, options filled from an options ``--config`` file."""
    hints = type_hints(fn)
    given = vars(ns)
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        tp = hints.get(p.name, str)
        if is_dataclass_type(tp):
            prefix = f"{p.name}."
            name = given.get(f"{prefix}{_CONFIG_DEST}")
            path = find_preset(preset_kind, name) if (name and preset_kind) else name
            overrides = {k[len(prefix):]: v for k, v in given.items()
                         if k.startswith(prefix) and not k.endswith(_CONFIG_DEST)}
            kwargs[p.name] = load_config(option_of(tp)[0], path, overrides)
        elif p.name in given:
            kwargs[p.name] = coerce(given[p.name], tp, name=_flag(p.name))
    missing = [p.name for p in inspect.signature(fn).parameters.values()
               if p.default is NO_DEFAULT and p.name not in kwargs]
    if missing:  # argparse has refused these already; a caller that built the namespace itself
        raise LmforgeError(f"missing required option(s) {', '.join(map(_flag, missing))}")
    return kwargs


def settings_yaml(fn: Callable, kwargs: dict[str, Any]) -> str:
    """The resolved settings as YAML: a dataclass parameter's keys (a valid ``--config`` file), or
    every option by its name, defaults included."""
    param = _dataclass_param(fn)
    if param is not None:
        values = to_dict(kwargs[param.name])
    else:
        values = {p.name: to_dict(kwargs.get(p.name, p.default)) for p in inspect.signature(fn).parameters.values()}
    return yaml.safe_dump(values, sort_keys=False).rstrip()


def run(fn: Callable, argv: list[str], *, prog: str, description: str, preset_kind: str | None = None) -> Any:
    """Parse ``argv`` for command ``fn`` and call it (or print its settings with --print-config)."""
    parser = build_parser(fn, prog=prog, description=description, preset_kind=preset_kind)
    ns, unknown = parser.parse_known_args(normalize_flags(argv))
    if unknown:
        raise LmforgeError(_unknown_arguments(parser, unknown))
    show = vars(ns).pop(_PRINT_DEST, False)
    kwargs = resolve(fn, ns, preset_kind=preset_kind)
    if show:
        print(settings_yaml(fn, kwargs))
        return 0
    return fn(**kwargs)


def _unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'unrecognized arguments' with the flag(s) each unknown one most likely meant."""
    flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--") and o != "--help"]
    parts = []
    for arg in unknown:
        meant = closest(arg.split("=", 1)[0], flags) if arg.startswith("--") else []
        parts.append(f"{arg} (did you mean {' or '.join(meant)}?)" if meant else arg)
    return f"unrecognized arguments: {' '.join(parts)} ('{parser.prog} --help' lists the options)"
