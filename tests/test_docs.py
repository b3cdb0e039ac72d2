"""Every `lmforge` command shown in docs/ parses and resolves as printed: its verb, flags, presets,
config keys and values (``--print-config``, which checks all of them and runs nothing).

Running them all would take hours (one sweep alone is half an hour), so they are resolved, not run;
the README's commands are run in full by test_readme.py. A command that writes its settings to a
file (``--print-config > my-run.yaml``) does so, for the commands after it that read the file.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from lmforge.cli import main
from lmforge.presets import find_preset

ROOT = Path(__file__).resolve().parents[1]
# files the pages name as the reader's own: what they would hold
USER_FILES = {"my-sweep.yaml": ("ablate", "textbook"), "my-run.yaml": ("pretrain", "gpt-debug")}


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(page, line, argv after `lmforge`) for every lmforge command of docs/*.md's shell blocks,
    also when it follows environment assignments or `accelerate launch ... -m lmforge.cli`."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", page.read_text(encoding="utf-8"),
                                flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                    words = words[1:]
                if words[:1] == ["lmforge"]:
                    found.append((page.name, line.strip(), words[1:]))
                elif "lmforge.cli" in words:
                    found.append((page.name, line.strip(), words[words.index("lmforge.cli") + 1:]))
    return found


def test_the_docs_show_commands():
    assert len(doc_commands()) >= 30


def test_every_docs_command_resolves(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMFORGE_ARGS", raising=False)
    for name, (kind, preset) in USER_FILES.items():
        shutil.copy(find_preset(kind, preset), tmp_path / name)
    failed = []
    for page, line, argv in doc_commands():
        target = None
        if ">" in argv:  # the settings written to a file
            target = argv[argv.index(">") + 1]
            argv = argv[:argv.index(">")]
        code = main([*argv, "--print-config"] if "--print-config" not in argv else argv)
        out, err = capsys.readouterr()
        if code != 0:
            failed.append(f"{page}: {line}\n    {err.strip()}")
        elif target:
            (tmp_path / target).write_text(out)
    assert not failed, "\n".join(failed)
