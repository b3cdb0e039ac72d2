"""The data of lmforge's harness tasks, read from lmforge's offline cache.

The task YAML files name these functions as ``custom_dataset: !function builtin_data.NAME``; the
harness loads this file by its path and calls the function with the task's metadata (and, from its
command line, the ``--model_args``), which are not needed here.
"""

from __future__ import annotations

import re
from typing import Any

from datasets import Dataset, DatasetDict

from lmforge.data.sources import load_corpus, load_table

PASSAGE_CHARS = 2000  # a passage of lmforge_shakespeare: whole paragraphs, about this many characters
_PARAGRAPH_END = re.compile(r"(?<=\n\n)(?=[^\n])")  # after a blank line, before the next paragraph


def passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """``text`` cut after blank lines into consecutive passages of at least ``size`` characters
    (the last may be shorter), each stripped of surrounding whitespace: a passage is a slice of
    the text, and together they hold every paragraph once."""
    out, current = [], ""
    for paragraph in _PARAGRAPH_END.split(text):
        current += paragraph
        if len(current) >= size:
            out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out


def rotten_tomatoes(**_metadata: Any) -> DatasetDict:
    """The built-in ``rotten-tomatoes`` sentences (``text``, ``label`` 0 negative / 1 positive,
    ``rating``), all three splits."""
    return DatasetDict({split: load_table("rotten-tomatoes", split) for split in ("train", "validation", "test")})


def shakespeare_passages(**_metadata: Any) -> DatasetDict:
    """The built-in ``shakespeare`` test split as passages (``passages``): ``text``, ``title`` of
    the play, ``passage`` (its number within the play)."""
    rows = [{"text": text, "title": play["title"], "passage": i}
            for play in load_corpus("shakespeare", "test") for i, text in enumerate(passages(play["text"]))]
    return DatasetDict({"test": Dataset.from_list(rows)})
