"""lmforge.config (typed dataclasses as YAML keys) and lmforge.commands.arguments (typed functions
as command-line flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pytest

from lmforge.commands.arguments import build_parser, resolve
from lmforge.config import Option, build_dataclass, coerce, docstring_args, load_config
from lmforge.errors import LmforgeError


@dataclass
class Optim:
    """Optimiser.

    Args:
        lr: learning rate.
        betas: Adam betas.
    """

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Job:
    """A job.

    Args:
        name: the run name.
        steps: how many steps.
        optim: optimiser settings.
    """

    name: str
    steps: int = 10
    precision: Literal["fp32", "bf16"] = "fp32"
    optim: Optim = field(default_factory=Optim)


def test_unknown_key_is_refused_with_the_closest_suggestion():
    with pytest.raises(LmforgeError, match="unknown key 'stpes'; did you mean 'steps'"):
        build_dataclass(Job, {"name": "x", "stpes": 3})
    with pytest.raises(LmforgeError, match="unknown key 'optim.learning_rat'"):
        build_dataclass(Job, {"name": "x", "optim": {"learning_rat": 1.0}})
    with pytest.raises(LmforgeError, match="missing required key.*name"):
        build_dataclass(Job, {})


def test_yaml_with_dotted_overrides(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("name: demo\nsteps: '20'\noptim:\n  lr: 1e-3\n", encoding="utf-8")
    job = load_config(Job, path, {"optim.betas": ["0.8", "0.9"], "precision": "bf16"})
    assert job == Job(name="demo", steps=20, precision="bf16", optim=Optim(lr=1e-3, betas=[0.8, 0.9]))
    path.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="top level must be a mapping"):
        load_config(Job, path)
    with pytest.raises(LmforgeError, match="config file not found"):
        load_config(Job, tmp_path / "missing.yaml")


def test_a_key_written_twice_is_refused(tmp_path: Path):
    """PyYAML keeps the last of two equal keys silently; a config file must not lose a setting."""
    path = tmp_path / "job.yaml"
    path.write_text("name: demo\noptim:\n  lr: 1e-3\n  betas: [0.9, 0.95]\n  lr: 1e-2\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"the key 'lr' appears twice in one mapping \(first on line 3\)"):
        load_config(Job, path)
    path.write_text("name: demo\noptim:\n  lr: 1e-3\nsteps: 2\n", encoding="utf-8")  # one lr per mapping
    assert load_config(Job, path).optim.lr == 1e-3


@pytest.mark.parametrize("value, tp, expected", [
    ("3", int, 3), ("1e3", int, 1000), ("yes", bool, True), ("off", bool, False), ("2.5", float, 2.5),
    ("none", int | None, None), ("bf16", Literal["fp32", "bf16"], "bf16"), ("a", list[str], ["a"]),
])
def test_coerce(value, tp, expected):
    assert coerce(value, tp, name="x") == expected


@pytest.mark.parametrize("value, tp, message", [
    ("2.5", int, "expected int"), ("maybe", bool, "expected true/false"),
    ("fp8", Literal["fp32", "bf16"], "not one of fp32, bf16"), (None, int, "a value is required"),
])
def test_coerce_errors_name_the_field(value, tp, message):
    with pytest.raises(LmforgeError, match=f"--flag: .*{message}|--flag: {message}"):
        coerce(value, tp, name="--flag")


def command(data: str, *, vocab_size: int = 8, lower: bool = False, tags: list[str] | None = None,
            mode: Literal["a", "b"] = "a", job: Job | None = None) -> dict:
    """A command.

    Args:
        data: the corpus.
        vocab_size: how many tokens.
        lower: lowercase it.
        tags: extra tags.
        mode: which mode.
    """
    return {"data": data, "vocab_size": vocab_size, "lower": lower, "tags": tags, "mode": mode}


def test_function_signature_becomes_flags():
    assert docstring_args(command)["vocab_size"] == "how many tokens."
    parser = build_parser(command, prog="lmforge command", description="")
    ns = parser.parse_args(["corpus.txt", "--vocab-size", "300", "--lower", "--tags", "x", "y", "--mode", "b"])
    assert command(**resolve(command, ns)) == {"data": "corpus.txt", "vocab_size": 300, "lower": True,
                                               "tags": ["x", "y"], "mode": "b"}
    assert resolve(command, parser.parse_args(["c"])) == {"data": "c"}  # defaults stay the function's
    with pytest.raises(LmforgeError, match=r"^argument --mode: invalid choice: 'z' \(choose from 'a', 'b'\) "
                                           r"\('lmforge command --help' lists the options\)$"):
        parser.parse_args(["c", "--mode", "z"])


@dataclass
class Paths:
    """Inputs.

    Args:
        tokenizer: a folder to read.
        source: a corpus.
        out: where to write.
    """

    tokenizer: Annotated[str, Option(input_path=True)] = ""
    source: Annotated[str, Option(input_path=True)] = "shakespeare"
    out: str = "runs/x"


def test_input_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    """A config file names its inputs from its own folder (run it from anywhere); a name that is not
    there (a built-in corpus, a Hub id) and the outputs stay as written; flags are the current
    folder's."""
    folder = tmp_path / "exp"
    (folder / "tok").mkdir(parents=True)
    (folder / "paths.yaml").write_text("tokenizer: tok\nsource: shakespeare\nout: runs/x\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = load_config(Paths, folder / "paths.yaml")
    assert Path(got.tokenizer) == folder / "tok" and got.source == "shakespeare" and got.out == "runs/x"
    (folder / "paths.yaml").write_text("tokenizer: ./missing\n")  # written as relative: the file's folder
    assert Path(load_config(Paths, folder / "paths.yaml").tokenizer) == folder / "missing"
    (elsewhere / "here").mkdir()
    (folder / "paths.yaml").write_text("tokenizer: here\n")  # only in the current folder: kept
    assert load_config(Paths, folder / "paths.yaml").tokenizer == "here"
    assert load_config(Paths, folder / "paths.yaml", {"tokenizer": "tok"}).tokenizer == "tok"  # a flag
