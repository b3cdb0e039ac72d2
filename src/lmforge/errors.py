"""The one exception type for bad user input (the CLI prints its message, never a traceback), and
the spelling helper its messages use to name what was probably meant."""

from __future__ import annotations

import difflib
import re


class LmforgeError(ValueError):
    """A user-facing error. The message names the file, field or value and what would be valid."""


def closest(name: str, valid: list[str], *, cutoff: float = 0.6) -> list[str]:
    """The valid names ``name`` most likely meant: the closest spelling, where a dotted name can
    also be written as its last part alone, so ``lr`` finds ``optim.lr`` (and ``--lr`` finds
    ``--optim.lr``, ``--no-streaming`` finds ``--no-data.streaming``). A last part shared by
    several sections gives them all."""
    spellings: dict[str, list[str]] = {}
    for v in valid:
        spellings.setdefault(v, []).append(v)
        if "." in v:
            leaf = re.match(r"(--(no-)?)?", v).group() + v.rsplit(".", 1)[1]
            spellings.setdefault(leaf, []).append(v)
    match = difflib.get_close_matches(name, list(spellings), n=1, cutoff=cutoff)
    return spellings[match[0]] if match else []
