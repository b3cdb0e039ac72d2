"""``lmforge tokenizer train`` and ``lmforge tokenizer eval``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

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
from lmforge.tokenizers.train import train_tokenizer


def train(
    *,
    data: Annotated[str, Option(input_path=True)],
    output_dir: Path,
    algorithm: Literal["bpe", "wordpiece", "unigram"] = "bpe",
    vocab_size: int = 8192,
    special_tokens: Literal["gpt", "bert", "chat"] | None = None,
    extra_special_tokens: list[str] | None = None,
    chat_template: Annotated[str | None, Option(input_path=True)] = None,
    model_max_length: int = 1024,
    lowercase: bool = False,
    strip_accents: bool | None = None,
    min_frequency: int = 2,
    split: str = "train",
    text_column: str = "text",
    errors: Literal["strict", "replace"] = "strict",
    streaming: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> int:
    """Train a BPE, WordPiece or Unigram tokenizer on a corpus and save it to a folder.

    The folder loads with ``AutoTokenizer.from_pretrained(DIR)``. Packaged settings:
    ``--config gpt-bpe`` (also bert-wordpiece, chat-bpe, unigram). Example:
    ``lmforge tokenizer train --data shakespeare --vocab-size 8192 --output-dir tok``

    Args:
        data: a built-in corpus (shakespeare, rotten-tomatoes), a local txt/jsonl/csv/parquet
            file, glob or folder, or a Hub dataset id.
        output_dir: the folder to write the tokenizer to.
        algorithm: bpe (byte-level, GPT-2 style), wordpiece (BERT style) or unigram
            (SentencePiece style, byte fallback).
        vocab_size: vocabulary size including special tokens.
        special_tokens: the special-token set of a model family (default: gpt for bpe/unigram,
            bert for wordpiece; chat adds role markers and a chat template).
        extra_special_tokens: more special tokens to add.
        chat_template: a Jinja chat template or a .jinja file (the chat set has one).
        model_max_length: the model's context length, saved in the tokenizer.
        lowercase: wordpiece: lowercase the text.
        strip_accents: wordpiece: strip accents (default: same as --lowercase).
        min_frequency: bpe/wordpiece: minimum frequency of a merged pair.
        split: which split of the corpus to train on.
        text_column: the column holding the text.
        errors: strict refuses non-UTF-8 bytes; replace decodes them as U+FFFD.
        streaming: read the corpus lazily (useful for large Hub datasets).
        overwrite: replace the tokenizer in a non-empty output folder.
        progress: show the trainer's progress bar.
    """
    start = time.perf_counter()
    tokenizer = train_tokenizer(
        data, algorithm, vocab_size, special_tokens, extra_special_tokens=extra_special_tokens,
        chat_template=chat_template, model_max_length=model_max_length, lowercase=lowercase,
        strip_accents=strip_accents, min_frequency=min_frequency, split=split, text_column=text_column,
        errors=errors, streaming=streaming, output_dir=output_dir, overwrite=overwrite, show_progress=progress)
    print(f"{algorithm}: vocabulary {len(tokenizer)} -> {output_dir} ({time.perf_counter() - start:.1f} s)")
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
