"""``lmforge quickstart``: the end-to-end default job on the built-in Shakespeare corpus.

Small steps that each take only what they need:

1. ``fetch_step``: the corpus into the lmforge cache (no-op when already there);
2. ``tokenizers_step``: BPE, WordPiece and Unigram trained on the TRAIN split only;
3. ``tokenizer_report_step``: their comparison table on the VALIDATION split;
4. ``model_tokenizer_step``: the small tokenizer the model uses (train split only);
5. ``pretrain_step``: a small GPT pretrained for about 5 minutes (the ``quickstart`` pretrain preset);
6. ``heldout_step``: bits per byte on the held-out TEST plays, from the saved folder, exactly as
   ``lmforge eval`` scores it;
7. ``generate_step``: a sample, from ``AutoModelForCausalLM.from_pretrained``;
8. ``where_step``: where the model is and how to load it.

The folder records its settings in ``quickstart.json``; ``--resume`` continues an interrupted
quickstart from there (its tokenizers are kept, pretraining resumes from its last checkpoint)
to its end.
"""

from __future__ import annotations

import json
from itertools import count
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.config import Option, load_config
from lmforge.data import BUILTIN_CORPORA
from lmforge.data.fetch import fetch
from lmforge.data.sources import load_corpus
from lmforge.errors import LmforgeError
from lmforge.eval.model import evaluate_model
from lmforge.presets import find_preset
from lmforge.publish import run_publisher
from lmforge.runs import CONFIG_FILE, QUICKSTART_FILE, load_model, load_tokenizer, read_run_config
from lmforge.tokenizers import train_tokenizer
from lmforge.tokenizers.evaluation import (
    compare_tokenizers,
    default_json_path,
    format_table,
    write_json,
)
from lmforge.train.config import PretrainConfig
from lmforge.train.model_presets import describe_model, load_preset
from lmforge.train.pretrain import pretrain
from lmforge.train.threads import auto_threads

ALGORITHMS = ("bpe", "wordpiece", "unigram")
MODEL_TOKENIZERS = {"bpe": "byte-level BPE", "unigram": "Unigram with byte fallback"}
DEFAULT_RUN_DIR = Path("runs/quickstart")


def fetch_step(corpus: str, cache_dir: Path | None = None) -> Path:
    """Make sure the built-in corpus is in the cache; returns its folder."""
    return fetch(corpus, cache_dir=cache_dir)  # type: ignore[arg-type]


def tokenizers_step(train_texts: Any, out_dir: Path, *, vocab_size: int, model_max_length: int,
                    algorithms: tuple[str, ...] = ALGORITHMS) -> dict[str, Path]:
    """Train one tokenizer per algorithm on ``train_texts`` into ``out_dir/<algorithm>``.
    The folders belong to this run, so an existing tokenizer in them is replaced."""
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
    tokenizers = {name: load_tokenizer(path) for name, path in paths.items()}
    rows = compare_tokenizers(tokenizers, texts)
    print(f"\nTokenizers measured on {label}:\n")
    print(format_table(rows))
    path = default_json_path(list(paths.values()))
    write_json(rows, path, data=label)
    print(f"\nwrote {path}")
    return rows


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
    path = model_tokenizer_path(out_dir, vocab_size, algorithm)
    print(f"\ntraining the model's tokenizer: {MODEL_TOKENIZERS[algorithm]} (vocab {vocab_size}) -> {path}")
    train_tokenizer(train_texts, algorithm, vocab_size, model_max_length=model_max_length, output_dir=path,
                    overwrite=True, show_progress=False)
    return path


def build_pretrain_config(config_path: Path, tokenizer: Path, out_dir: Path, *, minutes: float,
                          threads: int | None, overwrite: bool = False,
                          overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """The pretraining configuration of the small GPT (``config_path`` plus the quickstart's
    settings and ``overrides``, e.g. ``{"optim.lr": 1e-3}``), checked before anything is trained."""
    overrides = {**(overrides or {}), "output_dir": str(out_dir), "overwrite": overwrite,
                 "data.tokenizer": str(tokenizer), "train.max_minutes": minutes, "train.num_threads": threads}
    return load_config(PretrainConfig, config_path, overrides)


def pretrain_step(config: PretrainConfig) -> Any:
    """Pretrain the small GPT of ``config`` for about its ``train.max_minutes`` (its model card
    written into final/)."""
    model = load_preset(config.model.preset, config.model.overrides)  # the model's settings, for the message
    verb = "continuing the pretraining of" if config.resume else "pretraining"
    print(f"\n{verb} a {describe_model(model)} on {config.data.source} for ~{config.train.max_minutes:g} min "
          f"({config.train.num_threads or 'default'} thread(s)) -> {config.output_dir}")
    return pretrain(config, hooks=run_publisher(config, is_main=True))


def heldout_step(model_dir: Path, corpus: str, split: str, *, cache_dir: Path | None = None,
                 batch_size: int = 16) -> dict[str, float]:
    """Loss, perplexity and bits per byte of the saved model on the held-out texts of ``split``,
    scored as ``lmforge eval MODEL --data CORPUS --split SPLIT`` scores it (windows of the run's
    training rows)."""
    loaded = load_model(model_dir, auto_class="AutoModelForCausalLM")
    texts = load_corpus(corpus, split, cache_dir=cache_dir)
    docs = [t for t in texts["text"] if t and t.strip()]
    metrics = evaluate_model(loaded, "causal", texts=docs, batch_size=batch_size, progress=False)
    titled = "title" in texts.column_names
    what = f"plays ({', '.join(texts['title'])})" if titled else f"texts of {corpus} ({len(docs):,})"
    print(f"\nheld-out {split} {what}: {metrics['bytes']:,} bytes in windows of {metrics['max_length']} "
          f"tokens, loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}, "
          f"bits per byte {metrics['bits_per_byte']:.4f}")
    return metrics


def generate_step(model_dir: Path, prompt: str = "ROMEO:\n", *, max_new_tokens: int = 120, seed: int = 0) -> str:
    """Load the saved model the way anyone would and sample a continuation of ``prompt``."""
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
          f"    model = AutoModelForCausalLM.from_pretrained(\"{model_dir}\", trust_remote_code=True)\n\n"
          f"or use it from the command line: lmforge generate {model_dir} --prompt \"ROMEO:\"  "
          f"(lmforge serve {model_dir}: an OpenAI-compatible server)\n")


def choose_run_dir(run_dir: Path | None, overwrite: bool) -> Path:
    """The folder of this quickstart: ``run_dir`` (refused when it holds files, unless
    ``overwrite``), or by default the first free one of runs/quickstart, runs/quickstart-2, ...
    so that running the quickstart again keeps the earlier model."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
            raise LmforgeError(f"--output-dir {run_dir} already holds files (an earlier quickstart?); continue it "
                               f"with --resume {run_dir}, replace it with --overwrite, or choose another --output-dir")
        return run_dir
    candidates = (DEFAULT_RUN_DIR.with_name(f"{DEFAULT_RUN_DIR.name}-{i}") if i > 1 else DEFAULT_RUN_DIR
                  for i in count(1))
    return next(c for c in candidates if not c.exists() or not any(c.iterdir()))


def find_unfinished(resume: str) -> Path:
    """The quickstart folder ``--resume`` names: a folder, or (``auto``) the newest default folder
    that holds a quickstart without its final model."""
    if resume != "auto":
        folder = Path(resume)
        if not (folder / QUICKSTART_FILE).is_file():
            raise LmforgeError(f"--resume {resume}: not a quickstart folder (no {QUICKSTART_FILE}); give the "
                               "folder an interrupted quickstart wrote, e.g. runs/quickstart")
        return folder
    candidates = [DEFAULT_RUN_DIR] + sorted(DEFAULT_RUN_DIR.parent.glob(f"{DEFAULT_RUN_DIR.name}-*"),
                                            key=lambda p: p.stat().st_mtime)
    unfinished = [p for p in candidates if (p / QUICKSTART_FILE).is_file()
                  and not (p / "model" / "final" / "config.json").is_file()]
    if not unfinished:
        raise LmforgeError(f"--resume: no interrupted quickstart under {DEFAULT_RUN_DIR.parent} (every one has "
                           "its final model); name the folder to finish with --resume DIR")
    return unfinished[-1]


def _settings(**values: Any) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def quickstart(
    output_dir: Path | None = None,
    data: Literal["shakespeare", "rotten-tomatoes"] = "shakespeare",
    vocab_size: int = 8192,
    model_max_length: int = 1024,
    cache_dir: Path | None = None,
    minutes: float = 5.0,
    model_vocab_size: int = 2048,
    model_tokenizer: Literal["bpe", "unigram"] = "bpe",
    pretrain_config: str = "quickstart",
    num_threads: int | None = None,
    prompt: str = "ROMEO:\n",
    overwrite: bool = False,
    resume: Annotated[str | None, Option(const="auto")] = None,
) -> int:
    """Run the default job on a built-in corpus: fetch it, train BPE, WordPiece and Unigram
    tokenizers on its train split and compare them on its validation split, then pretrain a small
    GPT for about ``minutes``, measure bits per byte on the held-out test split, sample from it
    and say how to load it. Ctrl-C saves the model's training; ``--resume`` finishes the job.

    Args:
        output_dir: folder for everything this run writes (tokenizers under tokenizers/<algorithm>,
            the model's run folder under model/). Default: runs/quickstart, or runs/quickstart-2,
            -3, ... when an earlier quickstart is there (it is kept).
        data: built-in corpus to use (shakespeare, rotten-tomatoes).
        vocab_size: vocabulary size of each compared tokenizer.
        model_max_length: context length saved in the tokenizers.
        cache_dir: the lmforge data cache (default: $LMFORGE_CACHE or ~/.cache/lmforge).
        minutes: wall-clock budget of the pretraining (the schedule is fitted to it).
        model_vocab_size: vocabulary of the tokenizer the model uses.
        model_tokenizer: the model's tokenizer: bpe (byte-level) or unigram (with byte fallback).
        pretrain_config: the pretraining settings: a pretrain preset or a YAML file.
        num_threads: torch threads for training (default: torch's default on a quiet machine, else
            the cores that other work leaves free, at least 1).
        prompt: the start of the generated sample.
        overwrite: replace what an earlier run left in an explicit output_dir.
        resume: finish an interrupted quickstart: auto (the newest unfinished one under
            runs/) or its folder. Its recorded settings are used.
    """
    if resume is not None:
        return _resume(find_unfinished(resume), num_threads=num_threads, cache_dir=cache_dir)
    if data not in BUILTIN_CORPORA:
        raise LmforgeError(f"quickstart runs on a built-in corpus ({', '.join(BUILTIN_CORPORA)}), got {data!r}")
    run_dir = choose_run_dir(output_dir, overwrite)
    config_path = find_preset("pretrain", pretrain_config)
    model_tok = model_tokenizer_path(run_dir / "tokenizers", model_vocab_size, model_tokenizer)
    config = build_pretrain_config(config_path, model_tok, run_dir / "model", minutes=minutes, overwrite=overwrite,
                                   threads=num_threads if num_threads is not None else auto_threads(),
                                   overrides={"data.source": data})
    print(f"quickstart: everything goes to {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / QUICKSTART_FILE).write_text(json.dumps(_settings(
        data=data, vocab_size=vocab_size, model_max_length=model_max_length, minutes=minutes,
        model_vocab_size=model_vocab_size, model_tokenizer=model_tokenizer, pretrain_config=config_path,
        prompt=prompt), indent=2) + "\n")
    fetch_step(data, cache_dir)
    train = load_corpus(data, "train", cache_dir=cache_dir)
    validation = load_corpus(data, "validation", cache_dir=cache_dir)
    paths = tokenizers_step(train, run_dir / "tokenizers", vocab_size=vocab_size, model_max_length=model_max_length)
    tokenizer_report_step(paths, validation, f"{data} validation (trained on {data} train)")
    model_tokenizer_step(train, run_dir / "tokenizers", vocab_size=model_vocab_size,
                         model_max_length=model_max_length, algorithm=model_tokenizer)
    return _finish(run_dir, config, data, prompt, cache_dir)


def _resume(run_dir: Path, *, num_threads: int | None, cache_dir: Path | None) -> int:
    """Finish the quickstart in ``run_dir``: continue its pretraining, then score and sample."""
    settings = json.loads((run_dir / QUICKSTART_FILE).read_text())
    saved = run_dir / "model" / CONFIG_FILE
    if read_run_config(run_dir / "model") is None:
        raise LmforgeError(f"--resume {run_dir}: the quickstart stopped before its pretraining started (no "
                           f"{saved}); start it again with --output-dir {run_dir} --overwrite")
    overrides = {"resume": "auto", "overwrite": False,
                 "train.num_threads": num_threads if num_threads is not None else auto_threads()}
    config = load_config(PretrainConfig, saved, overrides)
    print(f"quickstart: finishing {run_dir}")
    return _finish(run_dir, config, settings["data"], settings["prompt"], cache_dir)


def _finish(run_dir: Path, config: PretrainConfig, data: str, prompt: str, cache_dir: Path | None) -> int:
    result = pretrain_step(config)
    if result.final_dir is None:
        print(f"pretraining stopped early ({result.train.status}); finish the quickstart with: "
              f"lmforge quickstart --resume {run_dir}")
        return result.train.exit_code or 1
    heldout_step(result.final_dir, data, "test", cache_dir=cache_dir)
    generate_step(result.final_dir, prompt)
    where_step(result.final_dir)
    return 0
