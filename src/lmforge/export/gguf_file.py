"""GGUF files for llama.cpp and Ollama, written natively with the ``gguf`` package.

A saved model is first converted exactly to its stock transformers class (``lmforge.models.convert``:
the RoPE GPT as Llama, the learned-position GPT as GPT-2, Mamba, BERT), so every switch the stock
class cannot hold is refused by name before anything is written. Its tensors are then renamed with
gguf's own ``TensorNameMap`` (the table llama.cpp's ``convert_hf_to_gguf.py`` uses) and laid out as
llama.cpp reads them:

- ``llama``: q/k rows interleaved per head (llama.cpp's rotary layout), RoPE scaling as metadata;
- ``gpt2``: the fused qkv and projections as (out, in) matrices;
- ``mamba``: ``A = -exp(A_log)`` stored as ``ssm_a``, the conv kernel squeezed to (channels, width);
- ``bert``: the encoder (heads are dropped: llama.cpp runs BERT for embeddings), with the pooling.

The tokenizer goes into the metadata as llama.cpp expects it: byte-level BPE as ``gpt2`` (vocabulary,
merges, GPT-2 pre-tokenizer), WordPiece as ``bert`` (phantom-space spelling), Unigram as ``t5``
(scores, byte pieces); special token ids, control tokens and the chat template.

Weights are written at ``f32``, ``f16``, ``bf16``, ``q8_0`` or ``q4_0``. As llama.cpp's converter does,
vectors, norms, position/type embeddings and Mamba's small SSM tensors stay float32; a matrix whose rows
do not split into 32-value blocks falls back to f16; at ``q4_0`` the output head (or the tied embedding)
is kept at q8_0, as llama-quantize keeps it at higher precision.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.export.convert import (
    converted_model,
    find_model_dir,
    read_config,
    source_model,
    source_tokenizer,
)
from lmforge.runs import first_line

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# model_type -> the llama.cpp architecture, for messages
ARCHITECTURES = {"lmforge_gpt": "llama (RoPE) or gpt2 (learned positions)", "lmforge_mamba": "mamba",
                 "lmforge_bert": "bert (the encoder, for embeddings)"}
STOCK_CAUSAL = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2", "MambaForCausalLM": "mamba"}
STOCK_ENCODERS = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification")
QUANTUM = 32  # values per block of q8_0 / q4_0


@dataclass
class GgufExport:
    """What ``export_gguf`` wrote, for the command's report."""

    source: Path  # the model folder read
    output: Path
    architecture: str  # llama.cpp's name: llama, gpt2, mamba, bert
    dtype: str
    tensor_types: dict[str, int]  # ggml type name -> how many tensors have it
    size: int  # bytes
    tokenizer: str  # the llama.cpp tokenizer model: gpt2, bert, t5
    modelfile: Path | None  # the Ollama Modelfile written beside it
    notes: list[str]


def export_gguf(source: str | Path, output: str | Path, *, dtype: str = "f16", overwrite: bool = False,
                modelfile: bool = True) -> GgufExport:
    """Write the model in ``source`` (any folder lmforge wrote) as one GGUF file ``output``.

    ``dtype``: f32, f16, bf16, q8_0 or q4_0. ``modelfile``: also write ``<output stem>.Modelfile`` for
    ``ollama create`` (causal LMs). Everything is checked (the dtype, the output, the model's switches,
    the tokenizer) before anything is written; the file appears under its name only when complete.
    """
    gguf = _require_gguf()
    if dtype not in DTYPES:
        raise LmforgeError(f"--dtype {dtype!r} is not a GGUF weight type lmforge writes; choose one of {', '.join(DTYPES)}")
    source, output = Path(source), Path(output)
    folder = find_model_dir(source)
    model_type, architecture = read_config(folder)
    if model_type not in ARCHITECTURES:
        raise LmforgeError(f"{folder}: model_type {model_type!r} has no GGUF export; --to-gguf writes "
                           + "; ".join(f"{t} as {a}" for t, a in ARCHITECTURES.items()))
    extra = [output.with_suffix(".Modelfile")] if modelfile and model_type != "lmforge_bert" else []
    _check_outputs([output, *extra], overwrite=overwrite, model_folder=folder)
    tokenizer = source_tokenizer(folder)
    if tokenizer is None:
        raise LmforgeError(f"{folder} holds no tokenizer; a GGUF file carries its tokenizer: save one into {folder}")
    stock = converted_model(source_model(folder, model_type, architecture, to_hf=True), folder, to_hf=True)
    layout = _layout(stock, folder)
    vocab = _vocabulary(tokenizer, stock.config.vocab_size, folder, gguf)
    notes = [*layout.notes, *vocab.notes]

    tensors = list(layout.tensors(stock))
    head = layout.head_name({name for name, _ in tensors})
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex[:8]}.part"
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, layout.arch)
        given = source.resolve()
        writer.add_name(given.parent.name if given.name in ("final", "best") else given.name)  # the run's name
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[dtype]])
        if dtype in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        layout.metadata(writer, stock.config)
        vocab.write(writer, tokenizer)
        for name, tensor in tensors:
            qtype = _tensor_type(name, tensor, dtype, layout, head, gguf)
            data, raw = _encode(tensor, qtype, gguf)
            writer.add_tensor(name, data, raw_dtype=raw)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    written = _write_modelfile(extra[0], output, tokenizer) if extra else None
    return GgufExport(folder, output, layout.arch, dtype, counts, output.stat().st_size, vocab.model, written, notes)


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise LmforgeError("writing GGUF files needs the gguf package: pip install 'lmforge[gguf]'") from None
    return gguf


def _check_outputs(paths: list[Path], *, overwrite: bool, model_folder: Path) -> None:
    """Refuse a folder, a path inside the model folder, or an existing file without ``overwrite``
    (reads only)."""
    for path in paths:
        what = "--to-gguf" if path.suffix != ".Modelfile" else "the Ollama Modelfile"
        if path.is_dir():
            raise LmforgeError(f"{what} {path} is a folder; give a file name such as {path / 'model.gguf'}")
        if path.resolve().is_relative_to(model_folder.resolve()):
            raise LmforgeError(f"{what} {path} would be written inside the model folder {model_folder}; "
                               "give a path outside it")
        if path.exists() and not overwrite:
            raise LmforgeError(f"{what} {path} already exists; pass --overwrite to replace it")


# ------------------------------------------------------------------------------ architectures


@dataclass
class Layout:
    """How one stock architecture goes into GGUF: its llama.cpp name, metadata and tensors."""

    arch: str
    metadata: Callable[[Any, Any], None]  # (writer, stock config)
    transform: Callable[[str, torch.Tensor, Any], torch.Tensor]  # (gguf name, tensor, config) -> llama.cpp's layout
    keep_f32: tuple[str, ...] = ()  # gguf name parts kept float32 at every dtype
    prefix: str = ""  # the base model's attribute in a model with a head (BERT's "bert."), dropped
    dropped: tuple[str, ...] = ()  # parameters llama.cpp does not run (BERT's pooler and heads)
    has_head: bool = True  # an LM head: kept at q8_0 when writing q4_0 (the tied embedding when it is tied)
    notes: tuple[str, ...] = ()

    def head_name(self, names: set[str]) -> str | None:
        if not self.has_head:
            return None
        return "output.weight" if "output.weight" in names else "token_embd.weight"

    def tensors(self, stock: Any):
        """(gguf name, float32 tensor) in the stock state dict's order, renamed with gguf's map."""
        gguf = _require_gguf()
        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.arch)
        names = gguf.get_tensor_name_map(arch, stock.config.num_hidden_layers)
        state = stock.state_dict()
        tied = bool(getattr(stock.config, "tie_word_embeddings", False))
        for key, value in state.items():
            if key.endswith("position_ids") or (tied and key == "lm_head.weight") or key.startswith(self.dropped):
                continue
            name = names.get_name(key.removeprefix(self.prefix), try_suffixes=(".weight", ".bias"))
            if name is None:
                raise LmforgeError(f"{type(stock).__name__}: no GGUF {self.arch} tensor name for {key}")
            yield name, self.transform(name, value.detach().to(torch.float32), stock.config)


def _layout(stock: Any, folder: Path) -> Layout:
    name = type(stock).__name__
    if name in STOCK_CAUSAL:
        arch = STOCK_CAUSAL[name]
        if arch == "llama":
            _check_llama(stock.config, folder)
        if arch == "mamba":
            _check_mamba(stock.config, folder)
        return LAYOUTS[arch]
    if name in STOCK_ENCODERS:
        notes = () if name == "BertModel" else (
            f"{name}'s head is not written: llama.cpp runs BERT as an encoder (mean-pooled embeddings); "
            "--to-onnx exports the whole model",)
        return replace(LAYOUTS["bert"], notes=notes)
    raise LmforgeError(f"{folder}: {name} has no GGUF form; GGUF holds causal LMs (GPT, Mamba) and BERT "
                       "encoders; use --to-onnx for classifiers")


def _check_llama(config: Any, folder: Path) -> None:
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise LmforgeError(f"{folder}: rope_parameters rope_type={rope.get('rope_type')!r} cannot be written to GGUF "
                           "(llama.cpp has no dynamic NTK scaling); GGUF holds rope_type 'default' or 'linear'")


def _check_mamba(config: Any, folder: Path) -> None:
    if config.use_bias:
        raise LmforgeError(f"{folder}: use_bias=True cannot be written to GGUF (llama.cpp's mamba has no biases on "
                           "its in/out projections); GGUF holds use_bias=False")


def _permute_rotary(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' half-split rotary layout to llama.cpp's interleaved one (per head)."""
    return tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def _llama_tensor(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    if ".attn_q." in name:
        return _permute_rotary(tensor, config.num_attention_heads)
    if ".attn_k." in name:
        return _permute_rotary(tensor, config.num_key_value_heads)
    return tensor


def _llama_metadata(writer: Any, config: Any) -> None:
    gguf = _require_gguf()
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    rope = config.rope_parameters or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _gpt2_tensor(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    # transformers' Conv1D stores (in, out); llama.cpp wants (out, in) like every other matrix
    matrices = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")
    return tensor.t().contiguous() if name.endswith(matrices) else tensor


def _gpt2_metadata(writer: Any, config: Any) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _mamba_tensor(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    if name.endswith(".ssm_a"):
        return -torch.exp(tensor)  # llama.cpp stores A itself, transformers its log
    if name.endswith(".ssm_conv1d.weight"):
        return tensor.squeeze(1)  # (channels, 1, width) -> (channels, width)
    return tensor


def _mamba_metadata(writer: Any, config: Any) -> None:
    writer.add_context_length(2**20)  # no limit: llama.cpp's converter writes this value too
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_ssm_conv_kernel(config.conv_kernel)
    writer.add_ssm_inner_size(config.intermediate_size)
    writer.add_ssm_state_size(config.state_size)
    writer.add_ssm_time_step_rank(config.time_step_rank)
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_ssm_dt_b_c_rms(False)


def _bert_metadata(writer: Any, config: Any) -> None:
    gguf = _require_gguf()
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)  # lmforge's sentence embedding (eval, pooling.py): the mean
    writer.add_token_type_count(config.type_vocab_size)


LAYOUTS = {
    "llama": Layout("llama", _llama_metadata, _llama_tensor),
    "gpt2": Layout("gpt2", _gpt2_metadata, _gpt2_tensor, keep_f32=("position_embd",)),
    "mamba": Layout("mamba", _mamba_metadata, _mamba_tensor,
                    keep_f32=("ssm_conv1d", "ssm_x", "ssm_dt", "ssm_a", "ssm_d")),
    "bert": Layout("bert", _bert_metadata, lambda name, tensor, config: tensor,
                   keep_f32=("position_embd", "token_types"), prefix="bert.",
                   dropped=("cls.", "classifier.", "pooler.", "bert.pooler."), has_head=False),
}


# ---------------------------------------------------------------------------------- weights

# --dtype -> the general.file_type it writes (a gguf.LlamaFileType name)
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def _tensor_type(name: str, tensor: torch.Tensor, dtype: str, layout: Layout, head: str | None, gguf: Any):
    """The ggml type of one tensor at ``dtype`` (llama.cpp's converter's rules, see the module doc)."""
    types = gguf.GGMLQuantizationType
    if dtype == "f32" or tensor.ndim <= 1 or name.endswith("_norm.weight") or any(k in name for k in layout.keep_f32):
        return types.F32
    if dtype == "f16":
        return types.F16
    if dtype == "bf16":
        return types.BF16
    if tensor.shape[-1] % QUANTUM:
        return types.F16  # rows that do not split into blocks
    return types.Q8_0 if dtype == "q8_0" or name == head else types.Q4_0


def _encode(tensor: torch.Tensor, qtype: Any, gguf: Any) -> tuple[np.ndarray, Any]:
    array = tensor.numpy()
    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return array.astype(np.float32), None
    if qtype == types.F16:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


# -------------------------------------------------------------------------------- tokenizer


@dataclass
class Vocabulary:
    """The tokenizer as llama.cpp's metadata spells it."""

    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE), bert (WordPiece), t5 (Unigram)
    tokens: list[str]
    types: list[int]
    merges: list[str] | None = None
    scores: list[float] | None = None
    pre: str | None = None
    notes: tuple[str, ...] = ()

    def write(self, writer: Any, tokenizer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        if self.model == "t5":
            writer.add_add_space_prefix(False)  # lmforge's Unigram prepends no space
            writer.add_remove_extra_whitespaces(False)
        ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad", "sep",
                                                                               "mask", "cls")}
        if self.model == "bert":  # llama.cpp's BERT begins with [CLS] (its bos) and ends with [SEP] (its eos)
            ids["bos"], ids["eos"] = ids["cls"], ids["sep"]
        for name in ("bos", "eos", "unk", "pad", "sep", "mask"):
            if ids[name] is not None:
                getattr(writer, f"add_{name}_token_id")(ids[name])
        added = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        writer.add_add_bos_token(len(added) > len(plain) and added[0] == ids["bos"])
        writer.add_add_eos_token(len(added) > len(plain) and added[-1] == ids["eos"])
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str) and template:
            writer.add_chat_template(template)


def _vocabulary(tokenizer: Any, vocab_size: int, folder: Path, gguf: Any) -> Vocabulary:
    """The tokenizer's vocabulary for GGUF, padded to the model's ``vocab_size`` with unused tokens."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    kind = model["type"]
    added = {entry["id"]: entry for entry in state.get("added_tokens", [])}
    control, user = gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED
    if kind == "Unigram":
        pieces = [entry[0] for entry in model["vocab"]]
        scores = [float(entry[1]) for entry in model["vocab"]]
    else:
        pieces = [None] * len(model["vocab"])
        for token, index in model["vocab"].items():
            pieces[index] = token
        scores = None
    size = max(len(pieces), 1 + max(added, default=-1))
    if size > vocab_size:
        raise LmforgeError(f"{folder}: the tokenizer has {size} tokens, more than the model's vocab_size={vocab_size}")
    tokens, types = [], []
    for index in range(vocab_size):
        token = pieces[index] if index < len(pieces) else None
        if index in added:
            token = added[index]["content"]
            kind_of = control if added[index].get("special") else user
        elif token is None:
            token, kind_of = f"[PAD{index}]", gguf.TokenType.UNUSED
        elif kind == "Unigram" and index == model.get("unk_id"):
            kind_of = gguf.TokenType.UNKNOWN
        elif kind == "Unigram" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind_of = gguf.TokenType.BYTE
        else:
            kind_of = gguf.TokenType.NORMAL
        tokens.append(token)
        types.append(int(kind_of))
    if scores is not None:
        scores = scores + [-1e9] * (vocab_size - len(scores))
    if kind == "BPE":
        _check_byte_level(state, folder)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        return Vocabulary("gpt2", tokens, types, merges=merges, pre="gpt-2")
    if kind == "WordPiece":
        _check_uncased(state, folder)
        prefix = model.get("continuing_subword_prefix", "##")
        spelled = [t if ty == control else (t[len(prefix):] if t.startswith(prefix) else "\u2581" + t)
                   for t, ty in zip(tokens, types, strict=True)]  # llama.cpp's phantom-space spelling
        return Vocabulary("bert", spelled, types, pre="default")
    if kind == "Unigram":
        return Vocabulary("t5", tokens, types, scores=scores, notes=(
            "llama.cpp's Unigram tokenizer has no byte fallback: characters outside the vocabulary become "
            "its unknown token instead of byte pieces",))
    raise LmforgeError(f"{folder}: a {kind} tokenizer has no GGUF form; GGUF holds byte-level BPE, WordPiece and "
                       "Unigram tokenizers")


def _check_uncased(state: dict, folder: Path) -> None:
    """llama.cpp's WordPiece lowercases and strips accents, whatever the vocabulary: refuse a cased one,
    whose GGUF would tokenize differently (measured with llama.cpp: "THE" -> "the", "é" -> "e")."""
    norm = state.get("normalizer") or {}
    if not (norm.get("type") == "BertNormalizer" and norm.get("lowercase") and norm.get("strip_accents") in (None, True)):
        raise LmforgeError(f"{folder}: the WordPiece tokenizer is cased (its normalizer: lowercase="
                           f"{norm.get('lowercase')}, strip_accents={norm.get('strip_accents')}); llama.cpp's WordPiece "
                           "always lowercases and strips accents, so the GGUF would tokenize differently. Train an "
                           "uncased tokenizer (lmforge tokenizer train --algorithm wordpiece --lowercase) or use "
                           "--to-onnx")


def _check_byte_level(state: dict, folder: Path) -> None:
    """llama.cpp's ``gpt2`` tokenizer is byte-level BPE split with GPT-2's pattern: refuse other BPEs."""
    pre = state.get("pre_tokenizer") or {}
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")):
        raise LmforgeError(f"{folder}: the BPE tokenizer's pre-tokenizer is {first_line(json.dumps(pre))[:120]}; "
                           "GGUF export holds byte-level BPE split as GPT-2 splits (ByteLevel, use_regex, "
                           "no prefix space), as lmforge trains it")


# -------------------------------------------------------------------------------- Modelfile


def _write_modelfile(path: Path, gguf_path: Path, tokenizer: Any) -> Path:
    from lmforge.export.ollama import modelfile

    path.write_text(modelfile(gguf_path.name, tokenizer))
    return path
