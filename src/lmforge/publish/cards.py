"""Model cards: the README.md of a trained model, a LoRA adapter or a tokenizer.

Cards are ``huggingface_hub`` ``ModelCard``s: the metadata block (license, library, tags, datasets,
base model, pipeline tag and the evaluation results in the Hub's ``model-index`` format) comes from
``ModelCardData``; the body says what the model is, how to load it, its architecture switches,
size, training and results. The "## Load" section names the model by where it lives: a local
placeholder path when written after training, the repo id once pushed (``load_section`` rewrites
it, see ``lmforge.hub``).

Benchmarks run by ``lmforge eval MODEL --tasks ...`` are saved beside the model
(``harness_results.json``, see ``lmforge.eval.harness``); ``with_harness_results`` puts them into a
card's model-index (source: lm-evaluation-harness) and its "## Benchmarks" section, replacing the
ones an earlier card held. ``build_card`` and ``lmforge push`` call it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from lmforge.eval.harness import read_harness_results
from lmforge.runs import auto_class_name, has_tokenizer
from lmforge.train.hooks import RunSummary

_SECRET_KEY = re.compile(r"token|secret|password|api_key|credential", re.IGNORECASE)
LOCAL_ID = "path/to/this/folder"  # how a card names its model before it is pushed
# config.json keys shown as the architecture (those the model's config has)
ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "position_embedding_type", "rope_theta", "norm_type", "norm_position",
    "hidden_act", "attention_bias", "mlp_bias", "tie_word_embeddings", "max_position_embeddings",
    "state_size", "expand", "conv_kernel", "time_step_rank",
)
_PIPELINES = {"AutoModelForCausalLM": "text-generation", "AutoModelForMaskedLM": "fill-mask",
              "AutoModelForSequenceClassification": "text-classification",
              "AutoModelForTokenClassification": "token-classification", "AutoModel": "feature-extraction"}
_IS_METRIC = re.compile(r"loss|perplexity|bits_per|accuracy|f1|precision|recall|correlation|pearson|spearman|mse|mae")
_METRIC_NAMES = {"bits_per_byte": "Bits per byte", "perplexity": "Perplexity", "loss": "Loss (nats)",
                 "accuracy": "Accuracy", "f1": "F1", "macro_f1": "Macro F1", "micro_f1": "Micro F1",
                 "matthews_correlation": "Matthews correlation", "pearson": "Pearson r",
                 "spearman": "Spearman rho", "mse": "Mean squared error", "masked_accuracy": "Masked-token accuracy",
                 "next_token_accuracy": "Next-token accuracy"}
HARNESS_SOURCE = "lm-evaluation-harness"
HARNESS_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
_HARNESS_METRICS = {"acc": "Accuracy", "acc_norm": "Accuracy (length-normalised)", "exact_match": "Exact match",
                    "word_perplexity": "Word perplexity", "byte_perplexity": "Byte perplexity",
                    "bits_per_byte": "Bits per byte", "perplexity": "Perplexity", "f1": "F1", "mcc": "Matthews correlation"}
_BENCHMARKS = re.compile(r"^## Benchmarks\n.*?(?=^## |\Z)", flags=re.S | re.M)


def _without_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_secrets(v) for k, v in value.items()
                if not (_SECRET_KEY.search(str(k)) and "tokenizer" not in str(k) and "tokens" not in str(k))}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    return value


# ----------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def auto_class(config: dict[str, Any]) -> str:
    """The ``transformers`` Auto class that loads a model with this ``config.json``."""
    return auto_class_name(config.get("architectures"), model_type=config.get("model_type"))


def load_section(folder: str | Path, model_id: str = LOCAL_ID) -> str:
    """The card's "## Load" section for what ``folder`` holds (a model, a LoRA adapter or a tokenizer),
    naming it ``model_id`` (a local path or a Hub repo id, with ``revision`` when given as ``id@rev``)."""
    folder = Path(folder)
    repo, _, revision = model_id.partition("@")
    where = f'"{repo}"' + (f', revision="{revision}"' if revision else "")
    config, adapter = _read_json(folder / "config.json"), _read_json(folder / "adapter_config.json")
    remote = "auto_map" in config
    trust = ", trust_remote_code=True" if remote else ""
    if adapter:
        return _adapter_load(folder, where, adapter, config)
    if not config:  # a tokenizer folder
        return "\n".join(["## Load", "", "```python", "from transformers import AutoTokenizer", "",
                          f"tokenizer = AutoTokenizer.from_pretrained({where})", "```", ""])
    auto = auto_class(config)
    lines = ["## Load", "", "```python", f"from transformers import AutoTokenizer, {auto}", ""]
    if has_tokenizer(folder):
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({where}{trust})")
    lines.append(f"model = {auto}.from_pretrained({where}{trust})")
    if auto == "AutoModelForCausalLM" and has_tokenizer(folder):
        lines += ['inputs = tokenizer("The ", return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20, do_sample=True)[0]))"]
    lines += ["```", ""]
    if remote:
        lines += ["`trust_remote_code=True` loads the model code saved next to the weights (lmforge itself "
                  "need not be installed). The tokenizer needs it too: `AutoTokenizer` reads `config.json` "
                  "first, and without the flag transformers asks whether to run the custom configuration "
                  "code (waiting 15 s on a terminal) and then warns. To load the tokenizer without running "
                  f"any code: `PreTrainedTokenizerFast.from_pretrained({where})`. `lmforge convert --to-hf` "
                  "writes a stock transformers copy that needs no remote code.", ""]
    if not has_tokenizer(folder):
        lines += ["This repository holds no tokenizer: use the one the model was trained with.", ""]
    return "\n".join(lines)


def _adapter_load(folder: Path, where: str, adapter: dict[str, Any], config: dict[str, Any]) -> str:
    base = adapter.get("base_model_name_or_path") or "BASE_MODEL"
    classify = adapter.get("task_type") == "SEQ_CLS"
    auto = "AutoModelForSequenceClassification" if classify else "AutoModelForCausalLM"
    labels = ""
    if classify and config.get("id2label"):
        id2label = {int(k): v for k, v in config["id2label"].items()}
        labels = f", num_labels={len(id2label)}, id2label={id2label!r}"
        if config.get("problem_type"):
            labels += f', problem_type="{config["problem_type"]}"'
    lines = ["## Load", "", "```python", "from peft import PeftModel",
             f"from transformers import AutoTokenizer, {auto}", "",
             f'base = {auto}.from_pretrained("{base}"{labels}, trust_remote_code=True)',
             f"model = PeftModel.from_pretrained(base, {where})"]
    if has_tokenizer(folder):
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({where})")
    lines += ["```", "", f"This is a LoRA adapter for `{base}`: the base model's weights are loaded from there. "
              "`lmforge merge` folds the adapter into the base weights and saves a plain model.", ""]
    return "\n".join(lines)


def retarget(card_text: str, folder: str | Path, model_id: str) -> str:
    """``card_text`` with its "## Load" section rewritten for ``model_id`` (added when missing)."""
    section = load_section(folder, model_id)
    match = re.search(r"^## Load\n.*?(?=^## |\Z)", card_text, flags=re.S | re.M)
    if match:
        return card_text[:match.start()] + section + "\n" + card_text[match.end():].lstrip("\n")
    head = re.search(r"^# .*\n(?:.*\n)*?\n", card_text, flags=re.M)  # after the title paragraph
    at = head.end() if head else len(card_text)
    return card_text[:at] + "\n" + section + "\n" + card_text[at:]


# ----------------------------------------------------------------------------------- cards


@dataclass
class CardFacts:
    """What a card says. ``results`` maps a split name (validation, test) to its metrics."""

    title: str
    summary: str
    model_type: str
    pipeline_tag: str
    dataset: str  # the data source as configured (a Hub dataset id appears in the metadata)
    tags: list[str] = field(default_factory=list)
    license: str | None = None
    base_model: str | None = None
    library_name: str = "transformers"
    architecture: dict[str, Any] = field(default_factory=dict)
    n_params: int | None = None
    training: dict[str, str] = field(default_factory=dict)  # label -> value, in order
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    plot: str | None = None


def is_hub_dataset(source: str) -> bool:
    """True for a Hub dataset id (``owner/name``), not a built-in corpus name or a local path."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not Path(source).exists()


def architecture_of(config: Any) -> dict[str, Any]:
    """The architecture switches and sizes of a model config (object or dict) worth a reader's eye."""
    values = config if isinstance(config, dict) else config.to_dict()
    return {k: values[k] for k in ARCHITECTURE_KEYS if values.get(k) is not None}


def dataset_name(source: str) -> str:
    """How the card's metadata names a data source: a Hub id or built-in name as it is, a local
    file or folder by its name only (its path on this disk means nothing to a reader)."""
    return source if is_hub_dataset(source) or not Path(source).exists() else Path(source).name


def _eval_results(facts: CardFacts) -> list[Any]:
    rows, dataset = [], dataset_name(facts.dataset)
    for split, metrics in facts.results.items():
        for name, value in metrics.items():
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not _IS_METRIC.search(name)):
                continue  # counts (tokens, bytes) are not results; nan (undefined) has no place in model-index
            rows.append(EvalResult(task_type=facts.pipeline_tag, dataset_type=dataset,
                                   dataset_name=dataset, dataset_split=split, metric_type=name,
                                   metric_name=_METRIC_NAMES.get(name, name), metric_value=round(float(value), 6)))
    return rows


def harness_eval_results(folder: str | Path, task_type: str | None) -> list[Any]:
    """The model-index rows of the benchmarks saved beside the model in ``folder``
    (``harness_results.json``): one per task and metric, standard errors left out. The dataset is
    named after the task as the Hub's leaderboards name theirs ("hellaswag (10-shot)"), with the
    number of examples when ``--limit`` cut it short."""
    rows = []
    for task, entry in read_harness_results(folder).items():
        shots = entry.get("num_fewshot") or 0
        name = f"{task} ({shots}-shot"
        if entry.get("limit") is not None and entry.get("samples") is not None:
            name += f", first {entry['samples']} of {entry.get('samples_total')} examples"
        for metric, value in (entry.get("metrics") or {}).items():
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or "_stderr" in metric):
                continue
            rows.append(EvalResult(task_type=task_type or "text-generation", dataset_type=task,
                                   dataset_name=name + ")", dataset_split=entry.get("split"),
                                   dataset_args={"num_few_shot": shots}, metric_type=metric,
                                   metric_name=_HARNESS_METRICS.get(metric.split(",")[0], metric),
                                   metric_value=round(float(value), 6), source_name=HARNESS_SOURCE,
                                   source_url=HARNESS_URL))
    return rows


def benchmarks_section(folder: str | Path) -> str:
    """The card's "## Benchmarks" section for the harness figures saved in ``folder`` ("" without any)."""
    saved = read_harness_results(folder)
    if not saved:
        return ""
    lines = ["## Benchmarks", "", f"[lm-evaluation-harness]({HARNESS_URL}) (`lmforge eval MODEL --tasks ...`):", "",
             "| task | n-shot | examples | metric | value | stderr |", "|---|---:|---:|---|---:|---:|"]
    for task, entry in saved.items():
        metrics = entry.get("metrics") or {}
        samples = entry.get("samples")
        shown = f"{samples:,}" if samples is not None else "-"
        if entry.get("limit") is not None and entry.get("samples_total"):
            shown += f" of {entry['samples_total']:,}"
        for metric, value in metrics.items():
            if "_stderr" in metric:
                continue
            stderr = metrics.get(metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr")
            lines.append(f"| {task} | {entry.get('num_fewshot') or 0} | {shown} | {metric} | {value:.4f} | "
                         + (f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "") + " |")
    return "\n".join(lines + [""])


def with_harness_results(card: Any, folder: str | Path) -> Any:
    """``card`` with the benchmarks saved in ``folder`` (see ``harness_eval_results``) in its
    model-index and its "## Benchmarks" section, in place of any it held before; unchanged when
    the folder holds none."""
    rows = harness_eval_results(folder, card.data.pipeline_tag)
    if not rows:
        return card
    kept = [r for r in (card.data.eval_results or []) if r.source_name != HARNESS_SOURCE]
    card.data.eval_results = kept + rows
    if not card.data.model_name:
        folder = Path(folder)
        card.data.model_name = folder.parent.name if folder.name == "final" else folder.name
    text = _BENCHMARKS.sub("", card.text).rstrip("\n") + "\n"
    at = re.search(r"^## (Loss curve|Configuration)\n", text, flags=re.M)  # after the evaluation
    section = benchmarks_section(folder) + "\n"
    card.text = text[:at.start()] + section + text[at.start():] if at else text + "\n" + section
    return card


def build_card(folder: str | Path, facts: CardFacts) -> Any:
    """The ``huggingface_hub.ModelCard`` for the model in ``folder`` described by ``facts``, with
    the benchmarks saved beside the model (``with_harness_results``)."""
    folder = Path(folder)
    eval_results = _eval_results(facts)
    data = ModelCardData(
        license=facts.license, library_name=facts.library_name, pipeline_tag=facts.pipeline_tag,
        tags=list(dict.fromkeys(["lmforge", facts.model_type, *facts.tags])),
        datasets=[facts.dataset] if is_hub_dataset(facts.dataset) else None, base_model=facts.base_model,
        model_name=(folder.parent.name if folder.name == "final" else folder.name) if eval_results else None,
        eval_results=eval_results or None,
    )
    lines = [f"# {facts.title}", "", facts.summary, "", load_section(folder)]
    if facts.architecture or facts.n_params:
        lines += ["## Architecture", "", "| setting | value |", "|---|---|"]
        lines += [f"| model_type | `{facts.model_type}` |"]
        if facts.n_params:
            lines += [f"| parameters | {facts.n_params:,} ({facts.n_params / 1e6:.2f}M) |"]
        lines += [f"| {k} | `{v}` |" for k, v in facts.architecture.items()] + [""]
    if facts.training:
        lines += ["## Training", "", *(f"- {k}: {v}" for k, v in facts.training.items()), ""]
    rows = [f"| {split} | {k} | {v:.4f} |" if isinstance(v, float) else f"| {split} | {k} | {v} |"
            for split, metrics in facts.results.items() for k, v in metrics.items()]
    lines += ["## Evaluation", "", "| split | metric | value |", "|---|---|---|",
              *(rows or ["| (no evaluation) | | |"]), ""]
    if facts.plot:
        lines += ["## Loss curve", "", f"![loss curve]({facts.plot})", ""]
    if facts.config:
        lines += ["## Configuration", "", "```yaml",
                  yaml.safe_dump(_without_secrets(facts.config), sort_keys=False).strip(), "```", ""]
    return with_harness_results(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)), folder)


def write_card(folder: str | Path, facts: CardFacts) -> Path:
    """Write ``folder/README.md`` (see ``build_card``). Keys that look like credentials (token,
    secret, password...) are dropped from the configuration shown."""
    path = Path(folder) / "README.md"
    path.write_text(str(build_card(folder, facts)))
    return path


def duration(seconds: float) -> str:
    """``3725`` -> ``1 h 2 min 5 s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h"] * bool(hours) + [f"{minutes} min"] * bool(minutes or hours) + [f"{secs} s"]
    return " ".join(parts)


def run_facts(summary: RunSummary) -> CardFacts:
    """The card of a trained model: a pretraining run's or a fine-tuning run's final model (or
    checkpoint), described by its ``RunSummary``."""
    return _finetune_facts(summary) if summary.kind == "finetune" else _pretrain_facts(summary)


def _pretrain_facts(s: RunSummary) -> CardFacts:
    model_type = s.model_config.model_type
    causal = s.objective == "causal"
    return CardFacts(
        title=f"{model_type} pretrained with lmforge",
        summary=(f"A {s.n_params / 1e6:.2f}M-parameter `{model_type}` model trained from scratch by lmforge "
                 f"with the {'causal' if causal else 'masked'} language-modelling objective."),
        model_type=model_type, pipeline_tag="text-generation" if causal else "fill-mask", dataset=s.data,
        tags=["causal-lm" if causal else "masked-lm"], license=s.license,
        architecture=architecture_of(s.model_config), n_params=s.n_params,
        training={"data": f"`{s.data}`", "optimizer steps": f"{s.steps} ({s.status})",
                  "tokens seen": f"{s.tokens_seen:,}", "training time": duration(s.elapsed_seconds)},
        results=s.metrics, config=s.config, plot=s.plot,
    )


def _finetune_facts(s: RunSummary) -> CardFacts:
    adapter = s.method == "lora"
    training = {"task": s.task, "method": s.method, "data": f"`{s.data}`", "optimizer steps": str(s.steps),
                "trained parameters": f"{s.trainable:,} of {s.n_params:,}", "tokens seen": f"{s.tokens_seen:,}",
                "training time": duration(s.elapsed_seconds)}
    if s.labels:
        training["labels"] = ", ".join(map(str, s.labels))
    what = "A LoRA adapter for" if adapter else "A fine-tune of"
    return CardFacts(
        title=f"{s.task} fine-tune of `{s.base_model}` (lmforge)",
        summary=(f"{what} `{s.base_model}` ({s.model_config.model_type}), trained with `lmforge finetune` "
                 f"({s.method}; {s.trainable:,} of {s.n_params:,} parameters trained)."),
        model_type=s.model_config.model_type,
        pipeline_tag="text-classification" if s.task == "classification" else "text-generation",
        dataset=s.data, tags=[s.task] + (["lora"] if adapter else []), license=s.license, base_model=s.base_model,
        library_name="peft" if adapter else "transformers", architecture=architecture_of(s.model_config),
        n_params=s.n_params, training=training, results=s.metrics, config=s.config, plot=s.plot,
    )


def folder_facts(folder: str | Path) -> CardFacts:
    """A card for a folder lmforge did not write one for (a saved or converted model, a tokenizer)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if not config:
        vocab = len(_read_json(folder / "tokenizer.json").get("model", {}).get("vocab", {})) or None
        return CardFacts(title=f"tokenizer {folder.name}", summary="A `tokenizers` tokenizer"
                         + (f" with {vocab:,} tokens" if vocab else "") + ", saved for `transformers`.",
                         model_type="tokenizer", pipeline_tag=None, dataset="", tags=["tokenizer"])
    auto = auto_class(config)
    model_type = config.get("model_type", "model")
    return CardFacts(title=f"{model_type} model", summary=f"A `{model_type}` model ({', '.join(config.get('architectures') or [])}).",
                     model_type=model_type, pipeline_tag=_PIPELINES[auto], dataset="",
                     architecture=architecture_of(config))
