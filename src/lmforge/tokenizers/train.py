"""Train a BPE, WordPiece or Unigram tokenizer and wrap it as a transformers fast tokenizer.

The corpus is streamed to ``Tokenizer.train_from_iterator`` in batches of strings read from a
``datasets`` dataset (memory-mapped Arrow, or lazily when streaming), so a large corpus trains
in bounded memory: the text is never collected into one Python list.

The result is a ``PreTrainedTokenizerFast`` (transformers' tokenizers backend), not a
``BertTokenizer``: that class rebuilds its normalizer from ``do_lower_case`` on reload and would
lowercase a cased WordPiece tokenizer. Saved folders load with ``AutoTokenizer.from_pretrained``
in a plain transformers install.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from lmforge.config import Option
from lmforge.data.sources import iter_text_batches, load_corpus
from lmforge.errors import LmforgeError
from lmforge.runs import check_output_dir
from lmforge.tokenizers.algorithms import (
    ALGORITHMS,
    build_bpe,
    build_unigram,
    build_wordpiece,
    finish_unigram,
    minimum_vocab_size,
    post_processor,
)
from lmforge.tokenizers.special_tokens import (
    DEFAULT_SPECIAL_TOKENS,
    SPECIAL_TOKEN_SETS,
    SpecialTokens,
)

# Files a tokenizer save writes; --overwrite removes exactly these, never anything else.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.txt", "vocab.json",
                   "merges.txt", "lmforge_tokenizer.json")
RECORD = "lmforge_tokenizer.json"


def resolve_special_tokens(algorithm: str, special_tokens: str | None, extra: list[str] | None,
                           chat_template: str | None) -> SpecialTokens:
    """The named set's tokens (default: the algorithm's usual family) plus extra ones; WordPiece
    and Unigram always get an unknown token (byte-level BPE never needs one)."""
    name = special_tokens or DEFAULT_SPECIAL_TOKENS[algorithm]
    if name not in SPECIAL_TOKEN_SETS:
        raise LmforgeError(f"special_tokens: unknown set {name!r}; valid sets: {', '.join(SPECIAL_TOKEN_SETS)}")
    tokens = SPECIAL_TOKEN_SETS[name].with_extra(extra or [])
    if algorithm == "wordpiece":
        tokens = tokens.with_unk("[UNK]")
    elif algorithm == "unigram":
        tokens = tokens.with_unk("<unk>")
    if chat_template:
        path = Path(chat_template).expanduser()
        text = path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.is_file() else chat_template
        tokens = SpecialTokens(**{**tokens.__dict__, "chat_template": text})
    return tokens


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty folder unless ``overwrite``; then remove the files of a tokenizer
    saved there (and nothing else: a tokenizer may be written into a model's folder)."""
    check_output_dir(path, overwrite=overwrite, what="tokenizer", replaceable=None)
    if overwrite:
        for name in TOKENIZER_FILES:
            (path / name).unlink(missing_ok=True)


def _text_batches(data: Any, *, split: str, text_column: str, errors: str, streaming: bool,
                  batch_size: int, counter: dict[str, int]) -> tuple[Iterator[list[str]], int | None]:
    """A batch iterator over the training text and (when known) the number of rows."""
    if isinstance(data, (str, Path)) or hasattr(data, "column_names"):
        data = load_corpus(data, split=split, text_column=text_column, errors=errors, streaming=streaming)
    rows = len(data) if hasattr(data, "__len__") and not isinstance(data, (str, Path)) else None

    def counted() -> Iterator[list[str]]:
        for batch in iter_text_batches(data, batch_size=batch_size):
            counter["texts"] += len(batch)
            counter["bytes"] += sum(len(t.encode("utf-8")) for t in batch)
            yield batch

    return counted(), rows


def _train(tok: Tokenizer, trainer: Any, batches: Iterator[list[str]], rows: int | None,
           algorithm: str, vocab_size: int, n_special: int) -> None:
    try:
        tok.train_from_iterator(batches, trainer=trainer, length=rows)
    except LmforgeError:
        raise
    except Exception as e:
        if "not large enough to contain all chars" in str(e):
            raise LmforgeError(
                f"vocab_size {vocab_size} is too small for unigram on this corpus: it needs 256 byte "
                f"pieces + {n_special} special tokens + every distinct character of the corpus; "
                "increase vocab_size (--vocab-size)") from None
        raise


def wrap(tok: Tokenizer, tokens: SpecialTokens, model_max_length: int) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer around ``tok`` with the set's named special tokens."""
    bert_like = tokens.cls is not None and tokens.sep is not None
    names = ["input_ids", "token_type_ids", "attention_mask"] if bert_like else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        model_input_names=names,
        extra_special_tokens=list(tokens.extra),
        chat_template=tokens.chat_template,
        clean_up_tokenization_spaces=False,  # decoders do their own cleanup; keep BPE lossless
        **tokens.named(),
    )


@dataclass
class TokenizerConfig:
    """How a tokenizer is trained: the keys of the tokenizer presets (``lmforge presets tokenizer``).

    Attributes:
        algorithm: bpe (byte-level, GPT-2 style, never an unknown token), wordpiece (BERT style)
            or unigram (SentencePiece style, with byte fallback).
        vocab_size: vocabulary size including special tokens (and, for unigram, the 256 byte pieces).
        special_tokens: the special-token set of a model family: gpt, bert or chat (default: gpt
            for bpe and unigram, bert for wordpiece; chat adds role markers and a chat template).
        extra_special_tokens: more special tokens, added after the set's.
        chat_template: a Jinja chat template, or a .jinja file (the chat set has one).
        model_max_length: the model's context length, saved in the tokenizer.
        lowercase: wordpiece: lowercase the text.
        strip_accents: wordpiece: strip accents (default: the same as lowercase).
        min_frequency: bpe/wordpiece: minimum frequency of a merged pair.
        split: which split of the corpus to train on.
        text_column: the column holding the text.
        errors: strict refuses non-UTF-8 bytes; replace decodes them as U+FFFD.
        streaming: read the corpus lazily (e.g. a large Hub dataset); local files are
            memory-mapped Arrow either way.
        batch_size: texts per batch streamed to the trainer.
    """

    algorithm: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    vocab_size: int = 8192
    special_tokens: Literal["gpt", "bert", "chat"] | None = None
    extra_special_tokens: list[str] | None = None
    chat_template: Annotated[str | None, Option(input_path=True)] = None
    model_max_length: int = 1024
    lowercase: bool = False
    strip_accents: bool | None = None
    min_frequency: int = 2
    split: str = "train"
    text_column: str = "text"
    errors: Literal["strict", "replace"] = "strict"
    streaming: bool = False
    batch_size: int = 1000

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise LmforgeError(f"unknown algorithm {self.algorithm!r}; valid algorithms: {', '.join(ALGORITHMS)}")
        if self.model_max_length < 1:
            raise LmforgeError(f"model_max_length must be positive, got {self.model_max_length}")
        if self.batch_size < 1:
            raise LmforgeError(f"batch_size must be positive, got {self.batch_size}")


def train_tokenizer(data: Any, algorithm: str = "bpe", vocab_size: int = 8192, special_tokens: str | None = None,
                    *, output_dir: str | Path | None = None, overwrite: bool = False, show_progress: bool = True,
                    **options: Any) -> PreTrainedTokenizerFast:
    """Train a tokenizer on a corpus and return it as a transformers fast tokenizer.

    Args:
        data: a corpus source for ``lmforge.data.load_corpus`` (built-in name, local
            file/glob/folder, Hub id), a ``datasets`` dataset, or an iterable of strings.
        algorithm, vocab_size, special_tokens, **options: the settings of ``TokenizerConfig``.
        output_dir: save the tokenizer here (``save_pretrained``).
        overwrite: replace the tokenizer in a non-empty ``output_dir``.
        show_progress: show the trainer's progress bar.

    Returns:
        The trained ``PreTrainedTokenizerFast``.
    """
    try:
        config = TokenizerConfig(algorithm=algorithm, vocab_size=vocab_size, special_tokens=special_tokens, **options)
    except TypeError as e:
        raise LmforgeError(f"train_tokenizer: {e}; the settings are {', '.join(TokenizerConfig.__annotations__)}") from None
    return train_with(data, config, output_dir=output_dir, overwrite=overwrite, show_progress=show_progress)


def train_with(data: Any, config: TokenizerConfig, *, output_dir: str | Path | None = None, overwrite: bool = False,
               show_progress: bool = True) -> PreTrainedTokenizerFast:
    """``train_tokenizer`` with its settings as a ``TokenizerConfig``."""
    c = config
    algorithm, vocab_size = c.algorithm, c.vocab_size
    tokens = resolve_special_tokens(algorithm, c.special_tokens, c.extra_special_tokens, c.chat_template)
    n_special = len(tokens.all())
    minimum = minimum_vocab_size(algorithm, n_special)
    if vocab_size < minimum:
        raise LmforgeError(
            f"vocab_size {vocab_size} is smaller than the {algorithm} alphabet plus "
            f"{n_special} special tokens: use at least {minimum}")
    out = Path(output_dir).expanduser() if output_dir is not None else None
    if out is not None:
        prepare_output_dir(out, overwrite)

    if algorithm == "bpe":
        tok, trainer = build_bpe(vocab_size, tokens, c.min_frequency, show_progress)
    elif algorithm == "wordpiece":
        tok, trainer = build_wordpiece(vocab_size, tokens, c.min_frequency, show_progress,
                                       lowercase=c.lowercase, strip_accents=c.strip_accents)
    else:
        tok, trainer = build_unigram(vocab_size, tokens, show_progress)

    counter = {"texts": 0, "bytes": 0}
    start = time.perf_counter()
    batches, rows = _text_batches(data, split=c.split, text_column=c.text_column, errors=c.errors,
                                  streaming=c.streaming, batch_size=c.batch_size, counter=counter)
    _train(tok, trainer, batches, rows, algorithm, vocab_size, n_special)
    seconds = time.perf_counter() - start
    if counter["texts"] == 0:
        raise LmforgeError("the corpus has no text to train on (every row is empty)")
    if algorithm == "unigram":
        tok = finish_unigram(tok)
    if tok.get_vocab_size() > vocab_size:
        raise LmforgeError(
            f"vocab_size {vocab_size} is smaller than this corpus' alphabet plus special tokens: "
            f"{algorithm} needs at least {tok.get_vocab_size()} here; increase vocab_size (--vocab-size)")
    tok.post_processor = post_processor(tok, algorithm, tokens)
    hf = wrap(tok, tokens, c.model_max_length)
    if out is not None:
        record = {"algorithm": algorithm, "vocab_size": len(hf), "requested_vocab_size": vocab_size,
                  "special_token_set": c.special_tokens or DEFAULT_SPECIAL_TOKENS[algorithm],
                  "special_tokens": tokens.all(), "model_max_length": c.model_max_length, "lowercase": c.lowercase,
                  "data": str(data) if isinstance(data, (str, Path)) else type(data).__name__,
                  "split": c.split, "texts": counter["texts"], "bytes": counter["bytes"],
                  "train_seconds": round(seconds, 3)}
        save(hf, out, record)
    return hf


def save(hf: PreTrainedTokenizerFast, out: Path, record: dict[str, Any]) -> None:
    """``save_pretrained`` plus a small record of how the tokenizer was trained."""
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
