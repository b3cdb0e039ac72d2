"""``lmforge tokenizer train`` and ``lmforge tokenizer eval``."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

from lmforge.config import Option
from lmforge.data.sources import load_corpus
from lmforge.errors import LmforgeError
from lmforge.runs import load_tokenizer, short_names
from lmforge.tokenizers.evaluation import (
    compare_tokenizers,
    default_json_path,
    format_table,
    write_json,
)
from lmforge.tokenizers.train import TokenizerConfig, train_with


@dataclass(kw_only=True)
class TrainTokenizer(TokenizerConfig):
    """The tokenizer's settings, its corpus and where it goes.

    Attributes:
        data: a built-in corpus (shakespeare, rotten-tomatoes), a local txt/jsonl/csv/parquet
            file, glob or folder, or a Hub dataset id.
        output_dir: the folder to write the tokenizer to.
        overwrite: replace the tokenizer in a non-empty output folder.
        progress: show the trainer's progress bar.
    """

    data: Annotated[str, Option(input_path=True)]
    output_dir: str
    overwrite: bool = False
    progress: bool = True


def train(config: TrainTokenizer) -> int:
    """Train a BPE, WordPiece or Unigram tokenizer on a corpus and save it to a folder.

    The folder loads with ``AutoTokenizer.from_pretrained(DIR)``. Packaged settings:
    ``--config gpt-bpe`` (also bert-wordpiece, chat-bpe, unigram). Example:
    ``lmforge tokenizer train --data shakespeare --vocab-size 8192 --output-dir tok``

    Args:
        config: the tokenizer's settings (see below).
    """
    start = time.perf_counter()
    settings = {f.name: getattr(config, f.name) for f in fields(TokenizerConfig)}
    tokenizer = train_with(config.data, TokenizerConfig(**settings), output_dir=config.output_dir,
                           overwrite=config.overwrite, show_progress=config.progress)
    print(f"{config.algorithm}: vocabulary {len(tokenizer)} -> {config.output_dir} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def evaluate(
    tokenizers: list[Path],
    *,
    data: str = "shakespeare",
    split: str = "validation",
    text_column: str = "text",
    output_json: Path | None = None,
    progress: bool = True,
) -> int:
    """Compare tokenizers on a corpus: fertility, bytes/token, unknowns, round trip, speed.

    Prints a Markdown table and writes the numbers as JSON. Example:
    ``lmforge tokenizer eval tok other-tok --data shakespeare --split validation``

    Args:
        tokenizers: tokenizer folders (as written by lmforge tokenizer train), or model or run
            folders (their tokenizer).
        data: the corpus to measure on (built-in name, local file/glob/folder or Hub id).
        split: which split of the corpus (a single local file ignores it).
        text_column: the column holding the text.
        output_json: where to write the JSON (default: tokenizer_eval.json next to the
            tokenizer folders).
        progress: show progress bars.
    """
    if not tokenizers:
        raise LmforgeError("give at least one tokenizer folder")
    loaded = {name: load_tokenizer(path, what=f"tokenizer {path}")  # every folder before the corpus
              for name, path in zip(short_names(tokenizers), tokenizers, strict=True)}
    texts = load_corpus(data, split=split, text_column=text_column)
    rows = compare_tokenizers(loaded, texts, progress=progress)
    print(f"\nTokenizers on {data} ({split}):\n")
    print(format_table(rows))
    path = Path(output_json) if output_json is not None else default_json_path(tokenizers)
    write_json(rows, path, data=str(data), split=split)
    print(f"\nwrote {path}")
    return 0
