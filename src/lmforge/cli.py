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
    ("finetune",): ("lmforge.train.finetune:finetune_command", "fine-tune a model: classification or chat SFT, full or LoRA"),
    ("eval",): ("lmforge.eval.command:eval_command", "evaluate models: perplexity, masked-token or classification metrics"),
    ("quickstart",): ("lmforge.quickstart:quickstart", "the end-to-end default job on Shakespeare"),
    ("merge",): ("lmforge.train.merge:merge_command", "merge a LoRA adapter into its base model"),
    ("push",): ("lmforge.hub:push_command", "push a model, adapter or tokenizer to the Hugging Face Hub"),
    ("convert",): ("lmforge.export:convert_command", "convert a model to or from stock transformers classes"),
    ("ablate",): ("lmforge.train.ablate:ablate_command", "compare architecture and tokenizer choices on the same data and budget"),
}

_HELP = ("-h", "--help", "help")


def _usage(group: str | None = None) -> str:
    """The commands (or those of one group, such as ``tokenizer``) with their one-line summaries."""
    commands = {words: text for words, (_, text) in COMMANDS.items() if group in (None, words[0])}
    name = f"lmforge {group} COMMAND" if group else "lmforge COMMAND"
    lines = [f"usage: {name} [ARGS...]", "", "commands:"]
    width = max(len(" ".join(words)) for words in commands)
    for words, text in commands.items():
        lines.append(f"  {' '.join(words):<{width}}  {text}")
    lines += ["", f"Run '{name} --help' for the options of a command."]
    return "\n".join(lines)


def _groups() -> set[str]:
    """The first words of commands that take a subcommand (``data``, ``tokenizer``)."""
    return {words[0] for words in COMMANDS if len(words) > 1}


def _resolve(argv: list[str]) -> tuple[tuple[str, ...], list[str]]:
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            return words, argv[n:]
    if argv[0] in _groups():
        subs = [w[1] for w in COMMANDS if w[0] == argv[0] and len(w) > 1]
        got = f", got {argv[1]!r}" if len(argv) > 1 else ""
        raise LmforgeError(f"'lmforge {argv[0]}' needs a subcommand ({', '.join(subs)}){got}\n\n{_usage(argv[0])}")
    from lmforge.config import closest

    names = sorted({w[0] for w in COMMANDS})
    meant = "".join(f" (did you mean '{m}'?)" for m in closest(argv[0], names))
    raise LmforgeError(f"unknown command {argv[0]!r}{meant}; valid commands: {', '.join(names)}")


def _unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'unrecognized arguments' with the flag(s) each unknown one most likely meant."""
    from lmforge.config import closest

    flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--") and o != "--help"]
    parts = []
    for arg in unknown:
        meant = closest(arg.split("=", 1)[0], flags) if arg.startswith("--") else []
        parts.append(f"{arg} (did you mean {' or '.join(meant)}?)" if meant else arg)
    return (f"{parser.prog}: unrecognized arguments: {' '.join(parts)}; "
            f"'{parser.prog} --help' lists the options")


def main(argv: list[str] | None = None) -> int:
    from lmforge.config import add_function_arguments, call_with_namespace, description

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in _HELP:
        print(_usage())
        return 0
    if argv[0] in _groups() and len(argv) > 1 and argv[1] in _HELP:
        print(_usage(argv[0]))
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
            allow_abbrev=False,  # --minute must not quietly stand for --minutes
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
