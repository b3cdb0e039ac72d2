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


def test_auto_threads_leaves_the_cores_other_work_uses(monkeypatch):
    from lmforge import quickstart

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert quickstart.auto_threads(busy=0.1) is None  # quiet: torch's default
    assert quickstart.auto_threads(busy=1.0) == 1
    assert quickstart.auto_threads(busy=3.5) == 1  # oversubscribed: still 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert quickstart.auto_threads(busy=2.2) == 14


def test_busy_cores_sees_work_that_started_a_moment_ago():
    """A process that started spinning just now (the 1-minute load average has barely moved) keeps
    one core busy, and the sample says so."""
    import subprocess
    import sys

    from lmforge.quickstart import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = busy_cores(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.8
    assert busy_cores(0.1, stat=Path("/no/such/stat")) is None


def test_the_model_tokenizer_must_be_lossless(tmp_path, capsys):
    """bits per byte scores every byte of the text, so the model's tokenizer is BPE or Unigram (with
    byte fallback); WordPiece, which drops whitespace, is refused before anything is trained."""
    from lmforge.quickstart import model_tokenizer_path, model_tokenizer_step

    with pytest.raises(LmforgeError, match="'wordpiece' is not one of bpe, unigram"):
        model_tokenizer_step(["a text"], tmp_path, vocab_size=300, model_max_length=64, algorithm="wordpiece")
    assert not any(tmp_path.iterdir())
    assert model_tokenizer_path(tmp_path, 2048, "unigram") == tmp_path / "unigram-2048"
    with pytest.raises(SystemExit):
        main(["quickstart", "--run-dir", str(tmp_path / "q"), "--model-tokenizer", "wordpiece"])
    assert "invalid choice: 'wordpiece'" in capsys.readouterr().err
