"""Run reports: the loss-curve PNG and the model card (README.md) of a trained model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_SECRET_KEY = re.compile(r"token|secret|password|api_key|credential", re.IGNORECASE)


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path | None:
    """Train loss (and eval loss / bits per byte when present) against step; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    bpb = [(r["step"], r["eval_bits_per_byte"]) for r in records if "eval_bits_per_byte" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.5)
    if bpb:
        ax.plot(*zip(*bpb, strict=True), "s--", label="eval bits/byte", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per token / bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _without_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_secrets(v) for k, v in value.items()
                if not (_SECRET_KEY.search(str(k)) and "tokenizer" not in str(k) and "tokens" not in str(k))}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    return value


def write_model_card(folder: str | Path, *, model_type: str, objective: str, config: dict[str, Any],
                     data: str, steps: int, tokens_seen: int, metrics: dict[str, float],
                     n_params: int, plot: str | None = None, status: str = "completed") -> Path:
    """Write ``folder/README.md``: metadata header, how to load, data, training, results, config.

    Keys that look like credentials (token, secret, password...) are dropped from the config.
    """
    auto = "AutoModelForCausalLM" if objective == "causal" else "AutoModelForMaskedLM"
    task = "text-generation" if objective == "causal" else "fill-mask"
    header = {"library_name": "transformers", "pipeline_tag": task, "tags": ["lmforge", model_type]}
    results = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in metrics.items()) or "| (no evaluation) | |"
    config_yaml = yaml.safe_dump(_without_secrets(config), sort_keys=False).strip()
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {model_type} pretrained with lmforge", "",
        f"A {n_params / 1e6:.2f}M-parameter `{model_type}` model trained from scratch with the "
        f"{'causal' if objective == 'causal' else 'masked'} language-modelling objective.", "",
        "## Load", "", "```python",
        f"from transformers import AutoTokenizer, {auto}", "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        f'model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        "```", "",
        "`trust_remote_code=True` loads the model code saved next to the weights (lmforge itself "
        "need not be installed). The tokenizer needs it too: `AutoTokenizer` reads this folder's "
        "`config.json` first, and without the flag transformers asks whether to run the custom "
        "configuration code (waiting 15 s on a terminal) and then warns. To load the tokenizer "
        "without running any code from this folder: "
        '`PreTrainedTokenizerFast.from_pretrained("path/to/this/folder")`.', "",
        "## Training", "",
        f"- data: `{data}`",
        f"- optimizer steps: {steps} ({status})",
        f"- tokens seen: {tokens_seen:,}", "",
        "## Evaluation (held-out split)", "", "| metric | value |", "|---|---|", results, "",
    ]
    if plot:
        lines += ["## Loss curve", "", f"![loss curve]({plot})", ""]
    lines += ["## Configuration", "", "```yaml", config_yaml, "```", ""]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines))
    return path


def write_finetune_card(folder: str | Path, *, base_model: str, model_type: str, task: str, method: str,
                        config: dict[str, Any], data: str, steps: int, metrics: dict[str, dict[str, float]],
                        trainable: int, total: int, labels: list[str] | None = None,
                        plot: str | None = None) -> Path:
    """Write ``folder/README.md`` for a fine-tuned model or LoRA adapter: metadata naming the base
    model, how to load it, the data, the selected model's eval/test metrics and the configuration."""
    adapter = method == "lora"
    pipeline = "text-classification" if task == "classification" else "text-generation"
    header = {"library_name": "peft" if adapter else "transformers", "base_model": base_model,
              "pipeline_tag": pipeline, "tags": ["lmforge", model_type, task] + (["lora"] if adapter else [])}
    rows = [f"| {split} | {k} | {v:.4f} |" if isinstance(v, float) else f"| {split} | {k} | {v} |"
            for split, values in metrics.items() for k, v in values.items()]
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    if adapter:
        load = ["from peft import PeftModel", f"from transformers import AutoTokenizer, {auto}", "",
                f'base = {auto}.from_pretrained("{base_model}", trust_remote_code=True)',
                'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")']
    else:
        load = [f"from transformers import AutoTokenizer, {auto}", "",
                f'model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")']
    what = "a LoRA adapter for" if adapter else "a fine-tune of"
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {task} fine-tune of {base_model} (lmforge)", "",
        f"This folder holds {what} `{base_model}` ({model_type}), trained with `lmforge finetune` "
        f"({method}; {trainable:,} of {total:,} parameters trained).", "",
        "## Load", "", "```python", *load, "```", "",
    ]
    if adapter:
        lines += ["`lmforge merge path/to/this/folder --output merged/` folds the adapter into the base "
                  "weights and saves a plain model.", ""]
    lines += ["## Training", "", f"- task: {task}", f"- data: `{data}`", f"- optimizer steps: {steps}"]
    if labels:
        lines.append(f"- labels: {', '.join(map(str, labels))}")
    lines += ["", "## Evaluation (the selected model)", "", "| split | metric | value |", "|---|---|---|",
              *(rows or ["| (no evaluation) | | |"]), ""]
    if plot:
        lines += ["## Loss curve", "", f"![loss curve]({plot})", ""]
    lines += ["## Configuration", "", "```yaml", yaml.safe_dump(_without_secrets(config), sort_keys=False).strip(),
              "```", ""]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines))
    return path
