"""The ``lmforge`` command. Each subcommand is a plain typed function (see ``lmforge.config``).

Modules are imported only for the subcommand that runs, so ``lmforge --help`` stays fast.
Run ``LMFORGE_DEBUG=1 lmforge ...`` to see a full traceback for a reported error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmforge.errors import LmforgeError

# (command words) -> ("module:function", one-line summary). The function's signature and
# docstring define the flags and help of the subcommand.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("data", "fetch"): ("lmforge.data.fetch:fetch", "download a built-in corpus into the cache"),
    ("tokenizer", "train"): ("lmforge.tokenizers.train:train_command", "train a BPE, WordPiece or Unigram tokenizer"),
    ("tokenizer", "eval"): ("lmforge.tokenizers.metrics:eval_command", "compare tokenizers on a corpus"),
    ("pretrain",): ("lmforge.train.pretrain:pretrain_command", "pretrain a model (causal or masked LM)"),
    ("quickstart",): ("lmforge.quickstart:quickstart", "the end-to-end default job on Shakespeare"),
}


def _usage() -> str:
    lines = ["usage: lmforge COMMAND [ARGS...]", "", "commands:"]
    width = max(len(" ".join(words)) for words in COMMANDS)
    for words, (_, text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<{width}}  {text}")
    lines += ["", "Run 'lmforge COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[tuple[str, ...], list[str]]:
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            return words, argv[n:]
    groups = sorted({w[0] for w in COMMANDS})
    if argv and argv[0] in groups:
        subs = [w[1] for w in COMMANDS if w[0] == argv[0] and len(w) > 1]
        got = argv[1] if len(argv) > 1 else None
        raise LmforgeError(f"'lmforge {argv[0]}' needs a subcommand ({', '.join(subs)}), got {got!r}")
    raise LmforgeError(f"unknown command {argv[0]!r}; valid commands: {', '.join(groups)}")


def _unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'unrecognized arguments' with the closest valid flag for each unknown one."""
    import difflib

    flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    parts = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6) if flag.startswith("--") else []
        parts.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return (f"{parser.prog}: unrecognized arguments: {' '.join(parts)}; "
            f"'{parser.prog} --help' lists the options")


def main(argv: list[str] | None = None) -> int:
    from lmforge.config import add_function_arguments, call_with_namespace, description

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmforge import __version__

        print(f"lmforge {__version__}")
        return 0
    try:
        words, rest = _resolve(argv)
        target, text = COMMANDS[words]
        module_name, fn_name = target.split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        parser = argparse.ArgumentParser(
            prog="lmforge " + " ".join(words),
            description=description(fn) or text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_function_arguments(parser, fn)
        ns, unknown = parser.parse_known_args(rest)
        if unknown:
            raise LmforgeError(_unknown_arguments(parser, unknown))
        result = call_with_namespace(fn, ns)
    except LmforgeError as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
