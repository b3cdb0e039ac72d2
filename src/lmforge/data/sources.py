"""Load any data source as a ``datasets`` dataset.

``load_table(source, split)`` returns the source with all its columns (labelled text,
conversations, ...); ``load_corpus(source, split)`` is ``load_table`` plus picking the text
column, renamed to ``text``, and refusing a loaded (not streamed) split without rows.

A source is, in this order of precedence:

1. an existing ``datasets.Dataset`` / ``IterableDataset`` (passed through);
2. a built-in corpus name (``shakespeare``, ``rotten-tomatoes``, ``rotten-tomatoes-pairs``) fetched into the cache by
   ``lmforge data fetch NAME``;
3. a local file, glob or folder of ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet``
   files (a folder with ``train.*`` / ``validation.*`` / ``test.*`` files is read split-aware;
   otherwise all the files make up the source and ``split`` is ignored);
4. otherwise a Hugging Face Hub dataset id (needs network access to the Hub).

Local text files are checked before ``datasets`` sees them, so a missing, empty, binary or
non-UTF-8 file is reported by name (and byte offset) instead of a traceback from pyarrow.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import datasets
from datasets import Dataset, IterableDataset

from lmforge.data import BUILTIN_CORPORA, SPLITS
from lmforge.data import cache_dir as default_cache_dir
from lmforge.data.fetch import is_fetched
from lmforge.errors import LmforgeError

# file suffix -> datasets packaged builder
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
           ".csv": "csv", ".parquet": "parquet"}
_CHUNK = 1 << 20
_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------- file checks


def _first_bad_utf8(path: Path) -> tuple[int, bytes] | None:
    """Byte offset and bytes of the first invalid UTF-8 sequence in ``path``, or None."""
    pos, carry = 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            data, base = carry + chunk, pos - len(carry)
            pos += len(chunk)
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and e.end == len(data):
                    carry = data[e.start:]  # a character cut by the chunk boundary
                else:
                    return base + e.start, data[e.start:e.end]
    return (pos - len(carry), carry) if carry else None


def check_text_file(path: Path, errors: Literal["strict", "replace"] = "strict") -> bool:
    """Raise a clear LmforgeError for a missing, empty, binary or (strict) non-UTF-8 file.

    Returns True when the file has invalid UTF-8 that must be replaced (``errors="replace"``).
    """
    if not path.exists():
        raise LmforgeError(f"{path}: file not found")
    if not path.is_file():
        raise LmforgeError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise LmforgeError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\x00" in head:
        raise LmforgeError(f"{path}: looks like a binary file (NUL byte at offset {head.index(0)}); "
                           "expected UTF-8 text")
    if not _has_content(path):
        raise LmforgeError(f"{path}: the file is empty (whitespace only)")
    bad = _first_bad_utf8(path)
    if bad is None:
        return False
    if errors == "replace":
        return True
    offset, raw = bad
    raise LmforgeError(f"{path}: not valid UTF-8 at byte offset {offset} (bytes {raw!r}); re-encode "
                       "the file as UTF-8, or decode with replacement characters (errors='replace')")


def _has_content(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if chunk.strip():
                return True
    return False


def check_parquet_file(path: Path) -> None:
    if not path.is_file():
        raise LmforgeError(f"{path}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise LmforgeError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise LmforgeError(f"{path}: not a parquet file (missing the PAR1 magic bytes)")


def _repaired_copy(path: Path, root: Path) -> Path:
    """A UTF-8 copy of ``path`` with invalid bytes replaced by U+FFFD, kept in the cache."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = root / "repaired" / key / path.name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(path, encoding="utf-8", errors="replace", newline="") as src, \
                open(tmp, "w", encoding="utf-8", newline="") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
        tmp.replace(out)
    return out


# --------------------------------------------------------------------------- resolving


def _is_pathlike(text: str) -> bool:
    p = Path(text)
    return (text.startswith((".", "/", "~")) or p.suffix.lower() in FORMATS
            or any(c in text for c in _GLOB_CHARS))


def _split_of(path: Path) -> str | None:
    """The split a file is named after (``train.jsonl``, ``train-0001.parquet``), if any."""
    stem = path.name.split(".")[0].lower()
    return next((s for s in SPLITS if stem == s or stem.startswith((f"{s}-", f"{s}_"))), None)


def _split_files(files: list[Path], split: str) -> list[Path]:
    """From a folder's files, those named after ``split``; all files when none is named after any split."""
    named = [p for p in files if _split_of(p) is not None]
    if not named:
        return files
    chosen = [p for p in named if _split_of(p) == split]
    if not chosen:
        have = sorted({_split_of(p) for p in named})
        raise LmforgeError(f"split {split!r} not found among the files; available splits: {', '.join(have)}")
    return chosen


def resolve_local_files(source: str | Path, split: str) -> list[Path]:
    """The data files a local file, glob or folder names (sorted, deterministic)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in FORMATS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise LmforgeError(f"{path}: folder has no data files ({', '.join(FORMATS)})")
        return _split_files(files, split)
    if any(c in text for c in _GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(str(Path(text).expanduser()), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise LmforgeError(f"no files match {text!r}")
        return files
    if not path.exists():
        raise LmforgeError(f"{path}: file not found")
    return [path]


def available_splits(source: Any) -> list[str] | None:
    """The splits a source offers: a built-in corpus' three, the split-named files of a folder
    (``train.jsonl``, ``validation.jsonl``, ...), ``["train"]`` for a file, glob or folder without
    split names (all of it is training data), None when it cannot be told (a Hub id, a dataset)."""
    if _is_dataset(source):
        return None
    text = str(source)
    if text in BUILTIN_CORPORA:
        return list(SPLITS)
    path = Path(text).expanduser()
    if not (path.exists() or _is_pathlike(text)):
        return None
    if path.is_dir():
        found = {_split_of(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS}
        return [s for s in SPLITS if s in found] or ["train"]
    return ["train"]


def resolve_split(source: Any, split: str | None, *, default: str, what: str) -> str | None:
    """The split to read for a setting ``what`` (``data.eval_split``...): ``auto`` is ``default``
    when the source has it and none otherwise; None is none; a split named explicitly must be one
    the source has (``available_splits``; a source that cannot tell is trusted)."""
    available = available_splits(source)
    if split == "auto":
        return default if available is None or default in available else None
    if split is not None and available is not None and split not in available:
        raise LmforgeError(f"{what}: {source} has no split {split!r} (it has: {', '.join(available)}; a file or "
                           "folder without split names is all training data); name one of those, or null for none")
    return split


def _format_of(files: list[Path]) -> str:
    formats = {FORMATS.get(p.suffix.lower()) for p in files}
    if None in formats:
        bad = next(p for p in files if p.suffix.lower() not in FORMATS)
        raise LmforgeError(f"{bad}: unsupported file type {bad.suffix or '(no suffix)'!r}; "
                           f"supported: {', '.join(FORMATS)}")
    if len(formats) > 1:
        raise LmforgeError(f"mixed file types in one source ({', '.join(sorted(formats))}); use one format")
    return formats.pop()


# --------------------------------------------------------------------------- loading


def _load_local(files: list[Path], *, streaming: bool, errors: str, root: Path,
                sample_by: str) -> Dataset | IterableDataset:
    builder = _format_of(files)
    ready: list[Path] = []
    for path in files:
        if builder == "parquet":
            check_parquet_file(path)
            ready.append(path)
        else:
            needs_repair = check_text_file(path, errors=errors)  # type: ignore[arg-type]
            ready.append(_repaired_copy(path, root) if needs_repair else path)
    kwargs: dict[str, Any] = {"sample_by": sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files={"train": [str(p) for p in ready]},
                                     split="train", streaming=streaming, **kwargs)
    except Exception as e:  # pyarrow / pandas parse errors: name the files instead
        names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        raise LmforgeError(f"could not read {names} as {builder}: {type(e).__name__}: {e}") from None


def _load_builtin(name: str, split: str, *, streaming: bool, root: Path) -> Dataset | IterableDataset:
    if split not in SPLITS:
        raise LmforgeError(f"{name}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not is_fetched(name, root):
        raise LmforgeError(f"built-in corpus {name!r} is not in the cache ({root / name}); "
                           f"run `lmforge data fetch {name}` first")
    return _load_local([root / name / f"{split}.jsonl"], streaming=streaming, errors="strict",
                       root=root, sample_by="line")


def _load_hub(name: str, split: str, *, streaming: bool) -> Dataset | IterableDataset:
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:
        raise LmforgeError(
            f"{name!r} is not a built-in corpus ({', '.join(BUILTIN_CORPORA)}) nor an existing local "
            f"path, and loading it as a Hugging Face Hub dataset failed: {type(e).__name__}: {e}") from None


def _select_text(ds: Dataset | IterableDataset, text_column: str, source: str) -> Dataset | IterableDataset:
    columns = ds.column_names
    if columns is None:  # streaming without known features: trust the caller
        return ds if text_column == "text" else ds.rename_column(text_column, "text")
    if text_column not in columns:
        raise LmforgeError(f"{source}: no column {text_column!r}; columns are {', '.join(columns)} "
                           "(choose one with text_column)")
    feature = ds.features[text_column] if ds.features else None
    dtype = getattr(feature, "dtype", "string")
    if dtype not in ("string", "large_string"):
        raise LmforgeError(f"{source}: column {text_column!r} holds {dtype}, not text")
    if text_column != "text":
        if "text" in columns:
            ds = ds.remove_columns("text")
        ds = ds.rename_column(text_column, "text")
    return ds


def _is_dataset(source: Any) -> bool:
    return hasattr(source, "column_names") and hasattr(source, "features")


def load_table(
    source: Any,
    split: str = "train",
    *,
    streaming: bool = False,
    errors: Literal["strict", "replace"] = "strict",
    sample_by: Literal["line", "paragraph", "document"] = "line",
    cache_dir: Path | None = None,
) -> Dataset | IterableDataset:
    """Load a split of any source with all its columns (names unchanged).

    The source is resolved like ``load_corpus`` resolves it (see the module docstring), with
    the same errors: a built-in corpus name, a local file / glob / folder, else a Hub dataset id.
    An existing dataset is returned as it is, whatever ``split``. Unlike ``load_corpus`` no
    column is required or renamed, and a split without rows is returned (the caller decides
    whether that is an error).

    Args:
        source: a built-in corpus name, a local file / glob / folder (txt, jsonl, json, csv,
            parquet), a Hub dataset id, or an existing dataset.
        split: which split to load (built-in corpora, split-named files in a folder, Hub).
            A single local file or glob is the whole source and ignores it.
        streaming: return an IterableDataset that reads lazily.
        errors: ``strict`` refuses non-UTF-8 bytes (naming file and byte offset); ``replace``
            decodes them as U+FFFD.
        sample_by: for .txt files, one row per line, paragraph or whole file.
        cache_dir: the lmforge cache (default: ``lmforge.data.cache_dir()``).

    Returns:
        The split as a Dataset (or IterableDataset when ``streaming``) with every column.
    """
    if errors not in ("strict", "replace"):
        raise LmforgeError(f"errors: {errors!r} is not one of strict, replace")
    if _is_dataset(source):
        return source
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    text = str(source)
    if text in BUILTIN_CORPORA:
        return _load_builtin(text, split, streaming=streaming, root=root)
    if Path(text).expanduser().exists() or _is_pathlike(text):
        files = resolve_local_files(text, split)
        return _load_local(files, streaming=streaming, errors=errors, root=root, sample_by=sample_by)
    return _load_hub(text, split, streaming=streaming)


def load_corpus(
    source: Any,
    split: str = "train",
    *,
    streaming: bool = False,
    text_column: str = "text",
    errors: Literal["strict", "replace"] = "strict",
    sample_by: Literal["line", "paragraph", "document"] = "line",
    cache_dir: Path | None = None,
) -> Dataset | IterableDataset:
    """Load a corpus as a ``datasets`` Dataset (or IterableDataset when ``streaming``).

    ``load_table`` (which resolves the source) followed by the choice of the text column.

    Args:
        source: a built-in corpus name, a local file / glob / folder (txt, jsonl, json, csv,
            parquet), a Hub dataset id, or an existing dataset.
        split: which split to load (built-in corpora, split-named files in a folder, Hub).
            A single local file or glob is the whole corpus and ignores it.
        streaming: return an IterableDataset that reads lazily.
        text_column: the column holding the text; it is renamed to ``text``.
        errors: ``strict`` refuses non-UTF-8 bytes (naming file and byte offset); ``replace``
            decodes them as U+FFFD.
        sample_by: for .txt files, one row per line, paragraph or whole file.
        cache_dir: the lmforge cache (default: ``lmforge.data.cache_dir()``).

    Returns:
        A dataset whose ``text`` column holds the documents.
    """
    ds = load_table(source, split, streaming=streaming, errors=errors, sample_by=sample_by,
                    cache_dir=cache_dir)
    if _is_dataset(source):  # passed in: used as it is, named by its type
        return _select_text(ds, text_column, type(source).__name__)
    text = str(source)
    if not streaming and len(ds) == 0:
        raise LmforgeError(f"{text}: the corpus has no rows")
    return _select_text(ds, text_column, text)


def iter_text_batches(texts: Any, batch_size: int = 1000) -> Iterator[list[str]]:
    """Yield lists of at most ``batch_size`` non-empty strings from a dataset (its ``text``
    column) or any iterable of strings, without materialising the corpus."""
    if hasattr(texts, "column_names") and hasattr(texts, "iter"):
        ds = texts.select_columns(["text"]) if texts.column_names else texts
        for batch in ds.iter(batch_size=batch_size):
            out = [t for t in batch["text"] if t]
            if out:
                yield out
        return
    yield from _batched(texts, batch_size)


def _batched(texts: Iterable[str], batch_size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        if not isinstance(t, str):
            raise LmforgeError(f"expected text strings, got {type(t).__name__}")
        if t:
            batch.append(t)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
