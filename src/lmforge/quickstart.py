"""``lmforge quickstart``: the end-to-end default job on the built-in Shakespeare corpus.

Written as small steps that each take only what they need, so later stages (pretraining,
evaluation, ...) can be appended to ``quickstart`` without touching the earlier ones:

1. ``fetch_step``: the corpus into the lmforge cache (no-op when already there);
2. ``tokenizers_step``: BPE, WordPiece and Unigram trained on the TRAIN split only;
3. ``tokenizer_report_step``: their comparison table on the VALIDATION split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

ALGORITHMS = ("bpe", "wordpiece", "unigram")


def fetch_step(corpus: str, cache_dir: Path | None = None) -> Path:
    """Make sure the built-in corpus is in the cache; returns its folder."""
    from lmforge.data.fetch import fetch

    return fetch(corpus, cache_dir=cache_dir)  # type: ignore[arg-type]


def tokenizers_step(train_texts: Any, out_dir: Path, *, vocab_size: int, model_max_length: int,
                    algorithms: tuple[str, ...] = ALGORITHMS) -> dict[str, Path]:
    """Train one tokenizer per algorithm on ``train_texts`` into ``out_dir/<algorithm>``.
    The folders belong to this run, so an existing tokenizer in them is replaced."""
    from lmforge.tokenizers import train_tokenizer

    paths = {}
    for algorithm in algorithms:
        path = out_dir / algorithm
        print(f"training {algorithm} (vocab {vocab_size}) -> {path}")
        train_tokenizer(train_texts, algorithm, vocab_size, model_max_length=model_max_length,
                        output_dir=path, overwrite=True)
        paths[algorithm] = path
    return paths


def tokenizer_report_step(paths: dict[str, Path], texts: Any, label: str) -> list[dict[str, Any]]:
    """Evaluate the tokenizers on held-out ``texts``; print the table and write JSON beside them."""
    from lmforge.tokenizers.metrics import (
        compare_tokenizers,
        default_json_path,
        format_table,
        write_json,
    )

    dirs = list(paths.values())
    rows = compare_tokenizers(dirs, texts)
    print(f"\nTokenizers measured on {label}:\n")
    print(format_table(rows))
    path = default_json_path(dirs)
    write_json(rows, path, data=label)
    print(f"\nwrote {path}")
    return rows


def quickstart(
    run_dir: Path = Path("runs/quickstart"),
    corpus: str = "shakespeare",
    vocab_size: int = 8192,
    model_max_length: int = 1024,
    cache_dir: Path | None = None,
) -> int:
    """Run the default job on a built-in corpus: fetch it, train BPE, WordPiece and Unigram
    tokenizers on its train split, and compare them on its validation split.

    Args:
        run_dir: folder for everything this run writes (tokenizers under tokenizers/<algorithm>).
        corpus: built-in corpus to use (shakespeare, rotten-tomatoes).
        vocab_size: vocabulary size of each tokenizer.
        model_max_length: context length saved in the tokenizers.
        cache_dir: the lmforge data cache (default: $LMFORGE_CACHE or ~/.cache/lmforge).
    """
    from lmforge.data import BUILTIN_CORPORA
    from lmforge.data.sources import load_corpus

    if corpus not in BUILTIN_CORPORA:
        raise LmforgeError(f"quickstart runs on a built-in corpus ({', '.join(BUILTIN_CORPORA)}), got {corpus!r}")
    fetch_step(corpus, cache_dir)
    train = load_corpus(corpus, "train", cache_dir=cache_dir)
    validation = load_corpus(corpus, "validation", cache_dir=cache_dir)
    paths = tokenizers_step(train, Path(run_dir) / "tokenizers", vocab_size=vocab_size,
                            model_max_length=model_max_length)
    tokenizer_report_step(paths, validation, f"{corpus} validation (trained on {corpus} train)")
    return 0
