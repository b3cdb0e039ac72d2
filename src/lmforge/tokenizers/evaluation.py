"""Measure and compare tokenizers on a corpus (``lmforge tokenizer eval``).

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

from lmforge.data.sources import iter_text_batches
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


def compare_tokenizers(tokenizers: dict[str, Any], texts: Any, *, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every tokenizer (name -> loaded tokenizer) on the same texts."""
    return [evaluate_tokenizer(tok, texts, name=name, progress=progress) for name, tok in tokenizers.items()]


def default_json_path(dirs: list[Path]) -> Path:
    """``tokenizer_eval.json`` in the folder that holds the tokenizers."""
    parents = {str(Path(d).expanduser().resolve().parent) for d in dirs}
    parent = Path(os.path.commonpath(sorted(parents)))
    return parent / "tokenizer_eval.json"


def write_json(rows: list[dict[str, Any]], path: Path, **meta: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "tokenizers": rows}, indent=2) + "\n", encoding="utf-8")
