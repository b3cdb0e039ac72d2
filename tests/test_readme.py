"""Every `lmforge` command of the README, exactly as printed, in the README's order, in a fresh
folder: so an example can no longer rot.

The commands run as the README says (after `make quickstart`: `lmforge quickstart` is its first
command). Budgets are shortened through the one documented way to add arguments to any command,
the ``LMFORGE_ARGS`` environment variable; the command text itself is the README's. The push goes
to a fake Hub through the real client. The README's Python snippet runs too.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lmforge.cli import main
from tests.train_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INFERENCE_DOC = ROOT / "docs" / "inference.md"

# shorter runs per verb (the first word of a command), appended through LMFORGE_ARGS: smaller budgets,
# and for the sweep two of its variants and no extra baseline seeds
SHORTER = {
    "quickstart": "--minutes 0.05 --vocab-size 1000 --model-vocab-size 512",
    "pretrain": "--train.max-steps 3",
    "finetune": "--train.epochs null --train.max-steps 3 --train.eval-every 3",
    "ablate": "--budget.steps 2 --baseline-seeds --variants '{llama: {}, tok-unigram: {tokenizer.algorithm: unigram}}'",
}


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def readme_commands() -> list[str]:
    """The ``lmforge ...`` lines of the README's bash blocks, in order."""
    return [line.strip() for block in readme_blocks("bash") for line in block.splitlines()
            if line.strip().startswith("lmforge ")]


def test_the_readme_is_a_front_page():
    assert len(README.read_bytes()) <= 25_000
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(pages) >= 5
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)", README.read_text(encoding="utf-8")):
        assert (ROOT / link).is_file(), link
    verbs = {shlex.split(c)[1] for c in readme_commands()}
    assert verbs >= {"data", "tokenizer", "pretrain", "finetune", "eval", "generate", "serve", "merge", "convert",
                     "push", "ablate", "quickstart", "presets"}, verbs


def test_every_readme_command_runs_as_printed(tmp_path, monkeypatch, fake_hub, capsys):
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert commands[0] == "lmforge quickstart"  # what `make quickstart` runs: the others build on it
    for command in commands:
        words = shlex.split(command)[1:]
        if words[0] == "serve":
            serve_and_ask(words, tmp_path)
            continue
        monkeypatch.setenv("LMFORGE_ARGS", SHORTER.get(words[0], ""))
        code = main(words)
        out, err = capsys.readouterr()
        assert code == 0, f"{command}\n{out[-3000:]}\n{err[-3000:]}"
        if words[0] == "quickstart":
            # the README's Python snippet loads what the quickstart wrote
            namespace: dict = {}
            exec(readme_blocks("python")[0], namespace)  # noqa: S102 - the README's own code
            assert namespace["model"].config.model_type == "lmforge_gpt"
            # so does docs/inference.md's Python example of the generation engine
            engine_example = re.findall(r"^```python\n(from lmforge.inference.*?)^```", INFERENCE_DOC.read_text(),
                                        flags=re.S | re.M)
            assert len(engine_example) == 1
            exec(engine_example[0], {})  # noqa: S102 - the docs' own code
            assert re.search(r" (stop|length) \d+$", capsys.readouterr().out, flags=re.M)  # reason, token count
    assert (tmp_path / "runs" / "quickstart-llama" / "config.json").is_file()
    assert (tmp_path / "runs" / "quickstart.gguf").is_file() and (tmp_path / "runs" / "quickstart.Modelfile").is_file()
    assert (tmp_path / "runs" / "rt-merged" / "model.safetensors").is_file()
    assert "config.json" in fake_hub.files("me/shakespeare-gpt")
    assert (tmp_path / "runs" / "ablate" / "textbook" / "results.md").is_file()


def serve_and_ask(words: list[str], folder: Path) -> None:
    """`lmforge serve` as a user runs it (its own process, on a free port given through
    LMFORGE_ARGS), asked by the README's client snippet (its port replaced by that one), then
    stopped with Ctrl-C (SIGINT), which must end it cleanly."""
    port = free_port()
    env = {**os.environ, "LMFORGE_ARGS": f"--port {port} --compile no"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *words], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the model loads, then the server listens
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
        snippet = readme_blocks("python")[1]
        assert "127.0.0.1:8000" in snippet
        namespace: dict = {}
        exec(snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), namespace)  # noqa: S102 - the README's code
        assert namespace["answer"].choices[0].text and namespace["answer"].usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
