"""The ``lmforge`` command: verbs mapped to the command functions of ``lmforge.commands``.

A command module is imported only for the verb that runs, so ``lmforge --help`` stays fast.

Environment: ``LMFORGE_DEBUG=1`` shows the full traceback behind a reported error;
``LMFORGE_ARGS`` holds arguments appended to every command line (as ``PYTEST_ADDOPTS`` does for
pytest), e.g. ``LMFORGE_ARGS="--train.max-steps 20"`` for a quick try of any pretraining preset.
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys

from lmforge import __version__
from lmforge.errors import LmforgeError, closest

# (command words) -> ("module:function" in lmforge.commands, one-line summary, preset kind of --config)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str | None]] = {
    ("data", "fetch"): ("data:fetch", "download a built-in corpus into the cache", None),
    ("tokenizer", "train"): ("tokenizer:train", "train a BPE, WordPiece or Unigram tokenizer", "tokenizer"),
    ("tokenizer", "eval"): ("tokenizer:evaluate", "compare tokenizers on a corpus", None),
    ("pretrain",): ("pretrain:pretrain", "pretrain a model (causal or masked LM)", "pretrain"),
    ("finetune",): ("finetune:finetune", "fine-tune a model: classification, chat SFT or preference tuning (DPO...), full or LoRA", "finetune"),
    ("eval",): ("eval:evaluate", "evaluate models: perplexity, masked-token or classification metrics, lm-evaluation-harness tasks", None),
    ("merge",): ("merge:merge", "merge a LoRA adapter into a copy of its base model", None),
    ("convert",): ("convert:convert", "convert a model to or from stock transformers classes", None),
    ("generate",): ("generate:generate", "continue prompts with a causal LM, streaming the text", None),
    ("chat",): ("chat:chat", "chat with a model in the terminal, on its chat template", None),
    ("serve",): ("serve:serve", "serve a model over HTTP with the OpenAI API", None),
    ("push",): ("push:push", "push a model, adapter or tokenizer to the Hugging Face Hub", None),
    ("ablate",): ("ablate:ablate", "compare architecture and tokenizer choices on the same data and budget", "ablate"),
    ("quickstart",): ("quickstart:quickstart", "the end-to-end default job on Shakespeare", None),
    ("presets",): ("presets:presets", "list the presets that ship with lmforge", None),
}

_HELP = ("-h", "--help", "help")


def _usage(group: str | None = None) -> str:
    """The commands (or those of one group, such as ``tokenizer``) with their one-line summaries."""
    commands = {words: text for words, (_, text, _) in COMMANDS.items() if group in (None, words[0])}
    name = f"lmforge {group} COMMAND" if group else "lmforge COMMAND"
    lines = [f"usage: {name} [ARGS...]", "", "commands:"]
    width = max(len(" ".join(words)) for words in commands)
    for words, text in commands.items():
        lines.append(f"  {' '.join(words):<{width}}  {text}")
    lines += ["", f"Run '{name} --help' for the options of a command."]
    if group is None:
        lines += ["", "options:", "  -h, --help     show this list", "  -V, --version  show the version"]
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
        raise LmforgeError(f"'lmforge {argv[0]}' needs a subcommand ({', '.join(subs)}){got}")
    names = sorted({w[0] for w in COMMANDS})
    meant = "".join(f" (did you mean '{m}'?)" for m in closest(argv[0], names))
    raise LmforgeError(f"unknown command {argv[0]!r}{meant}; valid commands: {', '.join(names)}")


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in _HELP:
        print(_usage())
        return 0
    if argv[0] in _groups() and len(argv) > 1 and argv[1] in _HELP:
        print(_usage(argv[0]))
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"lmforge {__version__}")
        return 0
    words, rest = _resolve(argv)
    rest = rest + shlex.split(os.environ.get("LMFORGE_ARGS", ""))
    target, text, preset_kind = COMMANDS[words]
    module_name, fn_name = target.split(":")
    # imported here, for the verb that runs: a command module imports torch and transformers
    from lmforge.commands import arguments

    module = importlib.import_module(module_name if "." in module_name else f"lmforge.commands.{module_name}")
    fn = getattr(module, fn_name)
    from lmforge.config import description  # lazy: --help skips yaml and config (~25 ms)

    result = arguments.run(fn, rest, prog="lmforge " + " ".join(words), description=description(fn) or text,
                           preset_kind=preset_kind)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except LmforgeError as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge ... | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0


if __name__ == "__main__":  # accelerate launch -m lmforge.cli ...
    sys.exit(main())
