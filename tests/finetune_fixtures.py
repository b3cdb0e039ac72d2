"""Tiny base models, labelled data and chat data for the fine-tuning tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

from tests.pipeline_fixtures import WORDS, bert_tokenizer, gpt_tokenizer, make_corpus
from tests.train_fixtures import PRESETS

POSITIVE = {"sweet", "fair", "love"}


def save_base(folder: Path, family: str, *, seed: int = 0, chat: bool = False, **changes: Any) -> Path:
    """A randomly initialised tiny lmforge model saved with its tokenizer (what a pretraining
    run's final/ holds): GPT/Mamba as causal LMs, BERT as a masked LM (no pooler, no head)."""
    import transformers

    import lmforge.models  # noqa: F401
    from lmforge.train.model_presets import build_model

    folder = Path(folder)
    if chat:
        tokenizer = chat_tokenizer()
    else:
        tokenizer = (bert_tokenizer if family == "bert" else gpt_tokenizer)(make_corpus(200))
    preset = folder.parent / f"{folder.name}-preset.yaml"
    preset.write_text(yaml.safe_dump({**PRESETS[family], "hidden_dropout": 0.0, "attention_dropout": 0.0,
                                      **changes} if family != "mamba" else {**PRESETS[family], **changes}))
    model = build_model("mlm" if family == "bert" else "causal", str(preset), tokenizer, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert isinstance(model, transformers.PreTrainedModel)
    return folder


def chat_tokenizer():
    """A byte-level BPE with the chat preset's role tokens and template (built in seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lmforge.tokenizers.special_tokens import CHAT_TEMPLATE, SPECIAL_TOKEN_SETS

    special = SPECIAL_TOKEN_SETS["chat"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special.all(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_corpus(200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=list(special.extra), **special.named())


def label_of(text: str) -> str:
    return "pos" if POSITIVE & set(text.rstrip(".").split()) else "neg"


def write_labelled(folder: Path, n_train: int = 96, n_eval: int = 24, n_test: int = 24, *,
                   kind: str = "single", seed: int = 0) -> Path:
    """train/validation/test jsonl with a learnable rule.

    kind: single (string labels pos/neg), int (0/1), multi (a list of the POSITIVE words present,
    or ["none"]), regression (the share of POSITIVE words, a float).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 1), ("validation", n_eval, 2), ("test", n_test, 3)):
        rows = []
        for text in make_corpus(n, seed=seed * 10 + offset, max_words=12):
            words = text.rstrip(".").split()
            if kind == "single":
                label: Any = label_of(text)
            elif kind == "int":
                label = int(label_of(text) == "pos")
            elif kind == "multi":
                label = sorted(POSITIVE & set(words)) or ["none"]
            else:
                label = round(sum(w in POSITIVE for w in words) / len(words), 4) + 0.001
            rows.append(json.dumps({"text": text, "label": label}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def write_chats(folder: Path, n_train: int = 48, n_eval: int = 12, n_test: int = 12, seed: int = 0) -> Path:
    """Chat jsonl: the user names a word, the assistant repeats it three times (learnable)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 1), ("validation", n_eval, 2), ("test", n_test, 3)):
        rng = random.Random(seed * 10 + offset)
        rows = []
        for _ in range(n):
            word = rng.choice(WORDS)
            messages = [{"role": "user", "content": f"say {word}"},
                        {"role": "assistant", "content": " ".join([word] * 3)}]
            if rng.random() < 0.5:
                messages = [{"role": "system", "content": "be brief"}, *messages]
            rows.append(json.dumps({"messages": messages}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def write_pairs(folder: Path, n_train: int = 48, n_eval: int = 12, n_test: int = 12, seed: int = 0, *,
                chat: bool = False) -> Path:
    """Preference jsonl: the prompt names a word, the chosen completion repeats it twice, the rejected
    one puts another word first (learnable); ``chat``: the same as conversations."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 1), ("validation", n_eval, 2), ("test", n_test, 3)):
        rng = random.Random(seed * 10 + offset)
        rows = []
        for _ in range(n):
            word, other = rng.sample(WORDS, 2)
            prompt, chosen, rejected = f"say {word}", f" {word} {word}", f" {other} {word}"
            if chat:
                prompt = [{"role": "user", "content": prompt}]
                chosen = [{"role": "assistant", "content": chosen.strip()}]
                rejected = [{"role": "assistant", "content": rejected.strip()}]
            rows.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def finetune_config(out: Path, model: Path, data_dir: Path, /, *, task: str = "classification", method: str = "full",
                    **sections: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuning config for the tiny models (no progress bar, logs every step)."""
    config: dict[str, Any] = {
        "task": task, "method": method, "output_dir": str(out),
        "model": {"path": str(model)},
        "data": {"source": str(data_dir), "max_length": 32},
        "optim": {"lr": 5e-3, "warmup_steps": 0, "eps": 1e-6},
        "train": {"micro_batch_size": 8, "epochs": None, "max_steps": 12, "log_every": 1, "eval_every": 4,
                  "save_every": 4, "keep_last": 10, "progress": False},
    }
    for key, values in sections.items():
        config[key] = {**config.get(key, {}), **values}
    return config


def run_finetune(config: dict[str, Any]):
    """``lmforge finetune`` from Python: the run with its card and Hub pushes (``run_publisher``)."""
    from lmforge.config import build_dataclass
    from lmforge.publish import run_publisher
    from lmforge.train.config import FinetuneConfig
    from lmforge.train.finetune import finetune

    built = build_dataclass(FinetuneConfig, config)
    return finetune(built, hooks=run_publisher(built))


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]
