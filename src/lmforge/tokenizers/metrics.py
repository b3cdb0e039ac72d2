"""Compare tokenizers on a corpus: ``lmforge tokenizer eval DIR... --data ...``.

Per tokenizer: vocabulary size, fertility (tokens per whitespace-separated word), bytes per
token (UTF-8 bytes of the text / tokens), share of unknown tokens, round-trip exactness (share
of non-empty lines with ``decode(encode(line)) == line``) and encode throughput (MB/s of UTF-8
text through the wrapped transformers tokenizer, batched).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmforge.errors import LmforgeError

COLUMNS = [  # (key, header, format)
    ("name", "tokenizer", "{}"),
    ("algorithm", "algorithm", "{}"),
    ("vocab_size", "vocab", "{:,}"),
    ("fertility", "tokens/word", "{:.3f}"),
    ("bytes_per_token", "bytes/token", "{:.3f}"),
    ("unk_share", "unk %", "{:.3%}"),
    ("round_trip", "round-trip lines", "{:.1%}"),
    ("encode_mb_s", "encode MB/s", "{:.2f}"),
]


def _algorithm(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(backend.model).__name__ if backend is not None else type(tokenizer).__name__


def evaluate_tokenizer(tokenizer: Any, texts: Any, *, name: str | None = None,
                       batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Measure one tokenizer on ``texts`` (a dataset with a ``text`` column or an iterable of
    strings), streaming over batches. Returns a dict with the table's columns."""
    from lmforge.data.sources import iter_text_batches

    unk_id = tokenizer.unk_token_id
    n_tokens = n_words = n_bytes = n_unk = lines = exact = 0
    seconds = 0.0
    total = len(texts) if hasattr(texts, "__len__") else None
    bar = tqdm(total=total, desc=f"eval {name or ''}".strip(), unit="doc", disable=not progress, leave=False)
    for batch in iter_text_batches(texts, batch_size=batch_size):
        start = time.perf_counter()
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
        seconds += time.perf_counter() - start
        n_tokens += sum(map(len, ids))
        n_unk += sum(seq.count(unk_id) for seq in ids) if unk_id is not None else 0
        n_words += sum(len(t.split()) for t in batch)
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        batch_lines = [line for t in batch for line in t.split("\n") if line.strip()]
        line_ids = tokenizer(batch_lines, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False, verbose=False)["input_ids"]
        decoded = tokenizer.batch_decode(line_ids, skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
        lines += len(batch_lines)
        exact += sum(a == b for a, b in zip(batch_lines, decoded, strict=True))
        bar.update(len(batch))
    bar.close()
    if n_tokens == 0:
        raise LmforgeError("no text to evaluate on (every row is empty)")
    return {
        "name": name or getattr(tokenizer, "name_or_path", "") or "tokenizer",
        "algorithm": _algorithm(tokenizer),
        "vocab_size": len(tokenizer),
        "fertility": n_tokens / max(n_words, 1),
        "bytes_per_token": n_bytes / n_tokens,
        "unk_share": n_unk / n_tokens,
        "round_trip": exact / max(lines, 1),
        "encode_mb_s": n_bytes / 1e6 / max(seconds, 1e-9),
        "tokens": n_tokens, "words": n_words, "bytes": n_bytes, "lines": lines,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``evaluate_tokenizer`` results (pastes into a README)."""
    cells = [[fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows]
    headers = [header for _, header, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if i < 2 else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(values, widths, strict=True))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(c) for c in cells)])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_tokenizer(folder: str | Path) -> bool:
    """True when ``folder`` holds saved tokenizer files (``save_pretrained``'s)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def auto_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` that never asks about custom code.

    transformers 5 reads a folder's ``config.json`` before its tokenizer files. In a model folder
    (a run's ``final/``) that config is ``lmforge_gpt``/``_bert``/``_mamba`` with an ``auto_map``:
    unless lmforge's families are registered, transformers asks "Do you wish to run the custom
    code? [y/N]" (15 s on a terminal), then warns "You are using a model of type `lmforge_gpt` to
    instantiate a model of type ``". Registering them first resolves the config locally.
    """
    from transformers import AutoTokenizer

    if (Path(path).expanduser() / "config.json").is_file():
        import lmforge.models  # noqa: F401  (registers lmforge's model types with AutoConfig)
    return AutoTokenizer.from_pretrained(path)


def load_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained`` on a local folder, with a clear error."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LmforgeError(f"{folder}: tokenizer folder not found")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise LmforgeError(f"{folder}: no tokenizer.json or tokenizer_config.json in it")
    try:
        return auto_tokenizer(folder)
    except Exception as e:
        raise LmforgeError(f"{folder}: could not load the tokenizer: {type(e).__name__}: {e}") from None


def _names(dirs: list[Path]) -> list[str]:
    """Short unique names: the folder names, or paths relative to the common parent."""
    plain = [Path(d).name for d in dirs]
    if len(set(plain)) == len(plain):
        return plain
    common = Path(os.path.commonpath([str(Path(d).resolve()) for d in dirs]))
    return [str(Path(d).resolve().relative_to(common)) for d in dirs]


def compare_tokenizers(dirs: list[Path], texts: Any, *, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every tokenizer folder on the same texts (all are loaded first: fail fast)."""
    tokenizers = [load_tokenizer(d) for d in dirs]
    return [evaluate_tokenizer(tok, texts, name=name, progress=progress)
            for tok, name in zip(tokenizers, _names(dirs), strict=True)]


def default_json_path(dirs: list[Path]) -> Path:
    """``tokenizer_eval.json`` in the folder that holds the tokenizers."""
    parents = {str(Path(d).expanduser().resolve().parent) for d in dirs}
    parent = Path(os.path.commonpath(sorted(parents)))
    return parent / "tokenizer_eval.json"


def write_json(rows: list[dict[str, Any]], path: Path, **meta: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "tokenizers": rows}, indent=2) + "\n", encoding="utf-8")


def eval_command(
    dirs: list[Path],
    *,
    data: str = "shakespeare",
    split: str = "validation",
    text_column: str = "text",
    output_json: Path | None = None,
) -> list[dict[str, Any]]:
    """Compare tokenizers on a corpus: fertility, bytes/token, unknowns, round trip, speed.

    Prints a Markdown table and writes the numbers as JSON.

    Args:
        dirs: tokenizer folders (as written by ``lmforge tokenizer train``).
        data: the corpus to measure on (built-in name, local file/glob/folder or Hub id).
        split: which split of the corpus (a single local file ignores it).
        text_column: the column holding the text.
        output_json: where to write the JSON (default: tokenizer_eval.json next to the
            tokenizer folders).
    """
    from lmforge.data.sources import load_corpus

    if not dirs:
        raise LmforgeError("give at least one tokenizer folder")
    for d in dirs:  # a wrong folder is reported before the corpus is read
        load_tokenizer(d)
    texts = load_corpus(data, split=split, text_column=text_column)
    rows = compare_tokenizers([Path(d) for d in dirs], texts)
    print(f"\nTokenizers on {data} ({split}):\n")
    print(format_table(rows))
    path = Path(output_json) if output_json is not None else default_json_path(dirs)
    write_json(rows, path, data=str(data), split=split)
    print(f"\nwrote {path}")
    return rows
