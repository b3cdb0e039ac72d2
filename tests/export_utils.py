"""Helpers for export tests: run code in a Python where lmforge cannot be imported.

A saved lmforge model must load with ``trust_remote_code=True`` from its own copied code.
``run_isolated(code)`` runs ``code`` in a subprocess of this venv's interpreter after removing
every ``sys.path`` entry that provides ``lmforge`` (the editable install's src dir, the repo
root) and asserting ``import lmforge`` fails. Used by the GPT, BERT and Mamba export tests.

    out = run_isolated('''
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
        emit({"n": sum(p.numel() for p in m.parameters())})
    ''', path=saved_dir)
    assert out["n"] == ...

Inside ``code``: ``PATH`` is the ``path`` argument and ``emit(obj)`` sends one JSON-able result back.
``run_on_terminal(code, path=...)`` does the same on a pseudo-terminal and also returns what the
terminal showed (for questions and warnings that transformers prints only to a terminal).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

_PRELUDE = """
import importlib.util, json, os, sys
sys.path[:] = [p for p in sys.path
               if p and not os.path.isdir(os.path.join(p, "lmforge"))
               and os.path.abspath(p) != os.path.abspath(os.getcwd())]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
assert importlib.util.find_spec("lmforge") is None, "lmforge is still importable"
try:
    import lmforge  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("import lmforge succeeded in the isolated interpreter")
PATH = os.environ["LMFORGE_EXPORT_PATH"]
_RESULT_MARK = "@@LMFORGE_RESULT@@"
def emit(obj):
    print(_RESULT_MARK + json.dumps(obj), flush=True)
"""
_RESULT_MARK = "@@LMFORGE_RESULT@@"


def _env(path: Path) -> tuple[Path, dict[str, str]]:
    """The subprocess's working folder (``path``'s parent) and offline environment."""
    workdir = path.parent if path.is_dir() else path
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(workdir / "hf_modules_cache"),
        "LMFORGE_EXPORT_PATH": str(path),
        "PYTHONNOUSERSITE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # tiny models; avoids thread spinning on a loaded machine
    }
    return workdir, env


def _results(stdout: str) -> dict | list | None:
    results = [line.split(_RESULT_MARK, 1)[1].strip() for line in stdout.splitlines() if _RESULT_MARK in line]
    return json.loads(results[-1]) if results else None


def run_isolated(
    code: str, *, path: str | Path = "", timeout: float = 300.0, env: dict[str, str] | None = None
) -> dict | list | None:
    """Run ``code`` in a fresh interpreter that cannot import lmforge; return what it ``emit``-ted.

    The subprocess runs in ``path``'s parent folder (not the repo), offline, with its own
    ``HF_MODULES_CACHE`` so the remote code is copied fresh. ``env`` is merged over that
    environment last, e.g. ``env=fake_hub.env()`` to go online against a fake Hub. Raises
    AssertionError with the subprocess's stderr when it fails.
    """
    workdir, base = _env(Path(path) if path else Path.cwd())
    base.pop("PYTHONPATH", None)
    env = {**base, **(env or {})}
    program = _PRELUDE + "\n" + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", program],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"isolated run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return _results(proc.stdout)


@dataclass
class TerminalRun:
    returncode: int
    output: str  # stdout and stderr as the terminal showed them
    result: dict | list | None  # what the code emit-ted


def run_on_terminal(code: str, *, path: str | Path, isolated: bool = True, timeout: float = 120.0) -> TerminalRun:
    """Run ``code`` as ``run_isolated`` does, but on a pseudo-terminal (``script -qec``).

    transformers asks "Do you wish to run the custom code? [y/N]" only when it can read an
    answer; without a terminal it skips the question silently, so a test that needs to see the
    question must give it one. stdin is empty: the question, if asked, is answered at once
    (EOF) instead of waiting 15 s. With ``isolated=False`` lmforge stays importable (the
    caller's PYTHONPATH is kept) to test lmforge's own loaders in a fresh process.
    """
    script = shutil.which("script")
    assert script is not None, "the `script` command (util-linux) is needed to give the subprocess a terminal"
    workdir, env = _env(Path(path))
    if isolated:
        env.pop("PYTHONPATH", None)
    prelude = _PRELUDE if isolated else _PRELUDE[_PRELUDE.index("PATH = "):]
    with tempfile.TemporaryDirectory() as tmp:  # the program's folder becomes sys.path[0]: keep it empty
        program = Path(tmp) / "program.py"
        program.write_text("import json, os\n" + prelude + "\n" + textwrap.dedent(code))
        proc = subprocess.run(
            [script, "-qec", shlex.join([sys.executable, str(program)]), "/dev/null"],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )
    output = proc.stdout.replace("\r\n", "\n")
    return TerminalRun(proc.returncode, output, _results(output))


def tiny_tokenizer(vocab_size: int = 300, *, bert: bool = False):
    """A small byte-level BPE tokenizer (GPT-style: bos/eos/pad) trained in-memory; offline and fast.

    With ``bert=True`` it has [CLS]/[SEP]/[PAD]/[MASK]/[UNK] instead.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["<|pad|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 20
    tok.train_from_iterator(text, trainer)
    if bert:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|pad|>", model_max_length=128,
    )
