"""``lmforge quickstart`` keeps earlier runs: the default folder moves on to runs/quickstart-2, ...;
an explicit folder that holds files is refused (before anything is fetched or trained) unless
``--overwrite``."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.quickstart import choose_run_dir


def test_default_run_dir_never_replaces_an_earlier_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert choose_run_dir(None, overwrite=False) == Path("runs/quickstart")
    (tmp_path / "runs" / "quickstart" / "model").mkdir(parents=True)
    assert choose_run_dir(None, overwrite=False) == Path("runs/quickstart-2")
    (tmp_path / "runs" / "quickstart-2" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart-3").mkdir()  # empty: free
    assert choose_run_dir(None, overwrite=False) == Path("runs/quickstart-3")


def test_explicit_run_dir_with_files_needs_overwrite(tmp_path, capsys):
    run = tmp_path / "mine"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.yaml").write_text("kept\n")
    with pytest.raises(LmforgeError, match="already holds files.*--overwrite"):
        choose_run_dir(run, overwrite=False)
    assert choose_run_dir(run, overwrite=True) == run
    assert choose_run_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"
    # through the command: refused at once, before any tokenizer is trained; nothing changed
    assert main(["quickstart", "--run-dir", str(run), "--minutes", "0.01"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (run / "model" / "config.yaml").read_text() == "kept\n"


def test_quickstart_end_to_end_on_shakespeare(tmp_path, capsys):
    """The README's main command with a few seconds of pretraining: tokenizers, table, model,
    held-out test figure, sample, and the loading snippet; a second run keeps the first."""
    run = tmp_path / "qs"
    args = ["quickstart", "--run-dir", str(run), "--minutes", "0.05", "--vocab-size", "1000",
            "--model-vocab-size", "512"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Tokenizers measured on shakespeare validation" in out and "held-out test plays" in out
    assert "AutoModelForCausalLM.from_pretrained" in out
    final = run / "model" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    before = (final / "model.safetensors").read_bytes()
    assert main(args) == 2  # the explicit folder holds the first run: refused, kept
    assert (final / "model.safetensors").read_bytes() == before
