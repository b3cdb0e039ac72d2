"""``lmforge quickstart``: the end-to-end default job on the built-in Shakespeare corpus.

Written as small steps that each take only what they need, so later stages (pretraining,
evaluation, ...) can be appended to ``quickstart`` without touching the earlier ones:

1. ``fetch_step``: the corpus into the lmforge cache (no-op when already there);
2. ``tokenizers_step``: BPE, WordPiece and Unigram trained on the TRAIN split only;
3. ``tokenizer_report_step``: their comparison table on the VALIDATION split;
4. ``model_tokenizer_step``: the small tokenizer the model uses (train split only);
5. ``pretrain_step``: a small GPT pretrained for about 5 minutes (configs/pretrain/quickstart.yaml);
6. ``heldout_step``: bits per byte on the held-out TEST plays, from the saved folder;
7. ``generate_step``: a sample, from ``AutoModelForCausalLM.from_pretrained``;
8. ``where_step``: where the model is and how to load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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


MODEL_TOKENIZERS = {"bpe": "byte-level BPE", "unigram": "Unigram with byte fallback"}


def model_tokenizer_path(out_dir: Path, vocab_size: int, algorithm: str = "bpe") -> Path:
    """Where the model's tokenizer goes. Lossless algorithms only (bits per byte scores every byte
    of the text); anything else is refused here, before anything is trained."""
    if algorithm not in MODEL_TOKENIZERS:
        raise LmforgeError(f"model tokenizer: {algorithm!r} is not one of {', '.join(MODEL_TOKENIZERS)} "
                           "(the model's tokenizer must spell every byte of the text)")
    return out_dir / f"{algorithm}-{vocab_size}"


def model_tokenizer_step(train_texts: Any, out_dir: Path, *, vocab_size: int, model_max_length: int,
                         algorithm: str = "bpe") -> Path:
    """The tokenizer the model uses (train split only), sized for a small model: ``bpe`` or
    ``unigram`` (see ``model_tokenizer_path``)."""
    from lmforge.tokenizers import train_tokenizer

    path = model_tokenizer_path(out_dir, vocab_size, algorithm)
    print(f"\ntraining the model's tokenizer: {MODEL_TOKENIZERS[algorithm]} (vocab {vocab_size}) -> {path}")
    train_tokenizer(train_texts, algorithm, vocab_size, model_max_length=model_max_length, output_dir=path,
                    overwrite=True, show_progress=False)
    return path


def build_pretrain_config(config_path: Path, tokenizer: Path, out_dir: Path, *, minutes: float,
                          threads: int | None, overwrite: bool = False,
                          overrides: dict[str, Any] | None = None) -> Any:
    """The pretraining configuration of the small GPT (``config_path`` plus the quickstart's
    settings and ``overrides``, e.g. ``{"optim.lr": 1e-3}``), checked before anything is trained."""
    from lmforge.config import load_config
    from lmforge.train import PretrainConfig

    overrides = {**(overrides or {}), "output_dir": str(out_dir), "overwrite": overwrite,
                 "data.tokenizer": str(tokenizer), "train.max_minutes": minutes, "train.num_threads": threads}
    return load_config(PretrainConfig, config_path, overrides)


def pretrain_step(config: Any) -> Any:
    """Pretrain the small GPT of ``config`` for about its ``train.max_minutes``."""
    from lmforge.train.pretrain import pretrain

    print(f"\npretraining {config.model.preset} {config.model.overrides} for ~{config.train.max_minutes:g} min "
          f"({config.train.num_threads or 'default'} thread(s)) -> {config.output_dir}")
    return pretrain(config)


def heldout_step(model_dir: Path, corpus: str, split: str, *, block_size: int, batch_size: int = 16,
                 cache_dir: Path | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte of the saved model on the held-out plays of ``split``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.data.collators import CausalLMCollator
    from lmforge.data.pipeline import build_lm_dataset
    from lmforge.data.sources import load_corpus
    from lmforge.eval.perplexity import (
        evaluate_lm,
        packed_token_ids,
        text_bytes_scale,
        token_byte_lengths,
    )
    from lmforge.train.batches import eval_batches

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    texts = load_corpus(corpus, split, cache_dir=cache_dir)
    rows = build_lm_dataset(texts, tokenizer, block_size, split=split)
    collate = CausalLMCollator(tokenizer.pad_token_id)
    batches = ({k: v for k, v in b.items() if k != "seq_idx"} for b in eval_batches(rows, batch_size, collate))
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    metrics = evaluate_lm(model, batches, byte_lengths=byte_lengths,
                          bytes_scale=text_bytes_scale(texts["text"], packed_token_ids(rows), byte_lengths))
    titles = ", ".join(texts["title"]) if "title" in texts.column_names else f"{len(texts)} documents"
    print(f"\nheld-out {split} plays ({titles}): {metrics['bytes']:,} bytes, loss {metrics['loss']:.4f}, "
          f"perplexity {metrics['perplexity']:.2f}, bits per byte {metrics['bits_per_byte']:.4f}")
    return metrics


def generate_step(model_dir: Path, prompt: str = "ROMEO:\n", *, max_new_tokens: int = 120, seed: int = 0) -> str:
    """Load the saved model the way anyone would and sample a continuation of ``prompt``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                         pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    print(f"\nsample (prompt {prompt!r}, top-k 40, temperature 0.8):\n\n{text}\n")
    return text


def where_step(model_dir: Path) -> None:
    """Say where the model is and how to load it."""
    print(f"the model is in {model_dir.resolve()} (model card: {model_dir / 'README.md'}). Load it with:\n\n"
          "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
          f"    tokenizer = AutoTokenizer.from_pretrained(\"{model_dir}\", trust_remote_code=True)\n"
          f"    model = AutoModelForCausalLM.from_pretrained(\"{model_dir}\", trust_remote_code=True)\n")


def busy_cores(seconds: float = 0.5, stat: Path = Path("/proc/stat")) -> float | None:
    """How many cores other work keeps busy right now: the machine's non-idle share over a short
    sample of ``stat`` times its cores (this process sleeps meanwhile). None where there is no
    ``/proc/stat``."""
    import os
    import time

    def times() -> tuple[int, int]:
        values = [int(v) for v in stat.read_text().splitlines()[0].split()[1:9]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    try:
        total0, idle0 = times()
        time.sleep(seconds)
        total1, idle1 = times()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads(busy: float | None = None) -> int | None:
    """torch's default (None) on a quiet machine; else the cores other work leaves free (at least
    1): oversubscribed cores make torch several times slower.

    ``busy`` (cores in use by other work) is sampled now (``busy_cores``); the load average is the
    fallback where that is not possible. A sample, not the load average, because the load average
    remembers the last minute: a quickstart started right after ``make setup``'s installs would
    train a 2-core machine's model on 1 thread, at about 60% of the speed.
    """
    import os

    cores = os.cpu_count() or 1
    if busy is None:
        busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            return None
    if busy <= 0.5:
        return None
    return max(1, round(cores - busy))


DEFAULT_RUN_DIR = Path("runs/quickstart")


def choose_run_dir(run_dir: Path | None, overwrite: bool) -> Path:
    """The folder of this quickstart: ``run_dir`` (refused when it holds files, unless
    ``overwrite``), or by default the first free one of runs/quickstart, runs/quickstart-2, ...
    so that running the quickstart again keeps the earlier model."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
            raise LmforgeError(f"run_dir {run_dir} already holds files (an earlier quickstart?); pass "
                               "--overwrite to replace them, or another --run-dir")
        return run_dir
    from itertools import count

    candidates = (DEFAULT_RUN_DIR.with_name(f"{DEFAULT_RUN_DIR.name}-{i}") if i > 1 else DEFAULT_RUN_DIR
                  for i in count(1))
    return next(c for c in candidates if not c.exists() or not any(c.iterdir()))


def default_pretrain_config() -> Path:
    """configs/pretrain/quickstart.yaml of the current folder, else of the lmforge repository."""
    local = Path("configs/pretrain/quickstart.yaml")
    return local if local.is_file() else Path(__file__).resolve().parents[2] / local


def quickstart(
    run_dir: Path | None = None,
    corpus: str = "shakespeare",
    vocab_size: int = 8192,
    model_max_length: int = 1024,
    cache_dir: Path | None = None,
    minutes: float = 5.0,
    model_vocab_size: int = 2048,
    model_tokenizer: Literal["bpe", "unigram"] = "bpe",
    pretrain_config: Path | None = None,
    threads: int | None = None,
    prompt: str = "ROMEO:\n",
    overwrite: bool = False,
) -> int:
    """Run the default job on a built-in corpus: fetch it, train BPE, WordPiece and Unigram
    tokenizers on its train split and compare them on its validation split, then pretrain a small
    GPT for about ``minutes``, measure bits per byte on the held-out test split, sample from it
    and say how to load it.

    Args:
        run_dir: folder for everything this run writes (tokenizers under tokenizers/<algorithm>, the
            model under model/). Default: runs/quickstart, or runs/quickstart-2, -3, ... when an
            earlier quickstart is there (it is kept).
        corpus: built-in corpus to use (shakespeare, rotten-tomatoes).
        vocab_size: vocabulary size of each tokenizer.
        model_max_length: context length saved in the tokenizers.
        cache_dir: the lmforge data cache (default: $LMFORGE_CACHE or ~/.cache/lmforge).
        minutes: wall-clock budget of the pretraining (the schedule is fitted to it).
        model_vocab_size: vocabulary of the tokenizer the model uses.
        model_tokenizer: the model's tokenizer: bpe (byte-level) or unigram (with byte fallback).
        pretrain_config: the pretraining YAML (default: configs/pretrain/quickstart.yaml).
        threads: torch threads for training (default: torch's default on a quiet machine, else
            the cores that other work leaves free, at least 1).
        prompt: the start of the generated sample.
        overwrite: replace what an earlier run left in an explicit run_dir.
    """
    from lmforge.data import BUILTIN_CORPORA
    from lmforge.data.sources import load_corpus

    if corpus not in BUILTIN_CORPORA:
        raise LmforgeError(f"quickstart runs on a built-in corpus ({', '.join(BUILTIN_CORPORA)}), got {corpus!r}")
    run_dir = choose_run_dir(run_dir, overwrite)
    config_path = Path(pretrain_config) if pretrain_config else default_pretrain_config()
    model_tok = model_tokenizer_path(run_dir / "tokenizers", model_vocab_size, model_tokenizer)
    config = build_pretrain_config(config_path, model_tok, run_dir / "model", minutes=minutes, overwrite=overwrite,
                                   threads=threads if threads is not None else auto_threads())
    print(f"quickstart: everything goes to {run_dir}")
    fetch_step(corpus, cache_dir)
    train = load_corpus(corpus, "train", cache_dir=cache_dir)
    validation = load_corpus(corpus, "validation", cache_dir=cache_dir)
    paths = tokenizers_step(train, run_dir / "tokenizers", vocab_size=vocab_size,
                            model_max_length=model_max_length)
    tokenizer_report_step(paths, validation, f"{corpus} validation (trained on {corpus} train)")
    model_tokenizer_step(train, run_dir / "tokenizers", vocab_size=model_vocab_size,
                         model_max_length=model_max_length, algorithm=model_tokenizer)
    result = pretrain_step(config)
    if result.final_dir is None:
        print(f"pretraining stopped early ({result.train.status}); resume it with: lmforge pretrain "
              f"--config {result.run_dir / 'config.yaml'} --resume auto")
        return result.train.exit_code or 1
    heldout_step(result.final_dir, corpus, "test", block_size=config.data.block_size, cache_dir=cache_dir)
    generate_step(result.final_dir, prompt)
    where_step(result.final_dir)
    return 0
