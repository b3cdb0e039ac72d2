"""``lmforge quickstart`` keeps earlier runs: the default folder moves on to runs/quickstart-2, ...;
an explicit folder that holds files is refused (before anything is fetched or trained) unless
``--overwrite``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.commands.quickstart import choose_run_dir
from lmforge.errors import LmforgeError


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
    assert main(["quickstart", "--output-dir", str(run), "--minutes", "0.01"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (run / "model" / "config.yaml").read_text() == "kept\n"


def test_quickstart_interrupted_then_resumed_to_its_end(tmp_path, capsys):
    """The README's main command with seconds of pretraining, stopped by Ctrl-C while the model trains
    (it saves and says how to finish), then finished with --resume: the test figure, which
    ``lmforge eval`` of the same folder reproduces exactly, the sample and the loading snippet; a
    second run into the same folder is refused and keeps the first."""
    import json
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "qs"
    args = ["quickstart", "--output-dir", str(run), "--minutes", "0.25", "--vocab-size", "1000",
            "--model-vocab-size", "512", "--num-threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("lmforge pretrain:"):  # the run folder is written; training starts
            time.sleep(4)
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stdout.readlines()
    printed = "".join(lines)
    assert proc.wait(timeout=300) == 130, printed
    assert "Tokenizers measured on shakespeare validation" in printed
    assert "pretraining a 3-layer, 128-wide lmforge_gpt" in printed  # names what it trains
    assert f"finish the quickstart with: lmforge quickstart --resume {run}" in printed
    assert not (run / "model" / "final").exists() and any((run / "model" / "checkpoints").iterdir())

    assert main(["quickstart", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "continuing the pretraining of" in out and "resuming from" in out
    assert "held-out test plays" in out and "sample (prompt" in out and "AutoModelForCausalLM.from_pretrained" in out
    final = run / "model" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert (final / "README.md").is_file()  # the model card
    figure = float(out.split("bits per byte ")[1].split()[0])

    assert main(["eval", str(run), "--data", "shakespeare", "--split", "test", "--no-progress",
                 "--output-json", str(tmp_path / "eval.json")]) == 0
    scored = json.loads((tmp_path / "eval.json").read_text())["models"][0]
    assert round(scored["bits_per_byte"], 4) == figure and scored["window"] == "run"
    assert "windows of 64 tokens (the run's data.block_size)" in capsys.readouterr().out

    before = (final / "model.safetensors").read_bytes()
    assert main(args) == 2  # the explicit folder holds the first run: refused, kept
    assert "--resume" in capsys.readouterr().err
    assert (final / "model.safetensors").read_bytes() == before
    assert main(["quickstart", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a quickstart folder" in capsys.readouterr().err


def test_auto_threads_leaves_the_cores_other_work_uses(monkeypatch):
    from lmforge.train.threads import auto_threads

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert auto_threads(busy=0.1) is None  # quiet: torch's default
    assert auto_threads(busy=1.0) == 1
    assert auto_threads(busy=3.5) == 1  # oversubscribed: still 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert auto_threads(busy=2.2) == 14


def test_busy_cores_sees_work_that_started_a_moment_ago():
    """A process that started spinning just now (the 1-minute load average has barely moved) keeps
    one core busy, and the sample says so."""
    import subprocess
    import sys

    from lmforge.train.threads import busy_cores

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
    from lmforge.commands.quickstart import model_tokenizer_path, model_tokenizer_step

    with pytest.raises(LmforgeError, match="'wordpiece' is not one of bpe, unigram"):
        model_tokenizer_step(["a text"], tmp_path, vocab_size=300, model_max_length=64, algorithm="wordpiece")
    assert not any(tmp_path.iterdir())
    assert model_tokenizer_path(tmp_path, 2048, "unigram") == tmp_path / "unigram-2048"
    assert main(["quickstart", "--output-dir", str(tmp_path / "q"), "--model-tokenizer", "wordpiece"]) == 2
    assert "invalid choice: 'wordpiece'" in capsys.readouterr().err


def test_the_quickstart_pretrains_on_the_corpus_it_is_given(tmp_path, monkeypatch):
    """--data rotten-tomatoes: the tokenizers and the model both learn the movie reviews."""
    from lmforge.commands import quickstart as command

    seen = {}
    monkeypatch.setattr(command, "_finish", lambda run_dir, config, data, *rest: seen.update(config=config, data=data) or 0)
    assert main(["quickstart", "--data", "rotten-tomatoes", "--output-dir", str(tmp_path / "q"), "--vocab-size", "600",
                 "--model-vocab-size", "400"]) == 0
    assert seen["data"] == "rotten-tomatoes" and seen["config"].data.source == "rotten-tomatoes"
    record = json.loads((tmp_path / "q" / "tokenizers" / "bpe" / "lmforge_tokenizer.json").read_text())
    assert record["texts"] > 8000  # the review sentences of the training split
