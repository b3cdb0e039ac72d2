"""ONNX export of a saved lmforge model (``lmforge convert MODEL --to-onnx OUT_DIR``).

OUT_DIR gets ``model.onnx`` (one file; weights beside it in ``model.onnx.data`` only past
protobuf's 2 GiB limit), the model's ``config.json`` (labels: ``id2label``) and its tokenizer.
The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for a BERT with token
types), int64 (batch, sequence) with both axes dynamic, and returns ``logits`` for a head,
``last_hidden_state`` and ``pooler_output`` for the bare BERT encoder. A causal LM is exported
without its cache: full-sequence logits, no ``past_key_values``.

The exporter is torch's dynamo-based ``torch.onnx.export`` (``torch.export`` + onnxscript), the
one torch maintains. Tried on torch 2.13 with tiny models of every supported class, the
TorchScript exporter (``dynamo=False``) exported none of them (``aten::rms_norm`` has no ONNX
mapping; transformers builds BERT's padding mask with ``vmap``, which tracing cannot record);
the dynamo exporter exported all of them, with sdpa and eager attention alike, matching PyTorch
on right- and left-padded batches. The model runs with sdpa attention (the default), which the
exporter writes as plain ONNX ops.

Before anything is written the folder is resolved, the class checked and the output folder
checked; the graph is then built and compared with PyTorch by onnxruntime on a padded batch of
another size than the one it was traced with, and written to a temporary sibling folder that is
renamed into place only when complete.

Notation: B batch, T sequence length.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge import models as families
from lmforge.errors import LmforgeError
from lmforge.export.convert import find_model_dir, read_config, source_tokenizer
from lmforge.runs import check_output_dir, first_line, staged_folder

ONNX_FILE = "model.onnx"
INSTALL_HINT = "pip install 'lmforge[onnx]'"
# model_type -> the classes exported and their graph outputs (the bare encoder's pooler_output
# only when it has a pooler)
SUPPORTED: dict[str, dict[str, tuple[str, ...]]] = {
    "lmforge_bert": {
        "LmforgeBertForSequenceClassification": ("logits",),
        "LmforgeBertForTokenClassification": ("logits",),
        "LmforgeBertForMaskedLM": ("logits",),
        "LmforgeBertModel": ("last_hidden_state", "pooler_output"),
    },
    "lmforge_gpt": {
        "LmforgeGPTForSequenceClassification": ("logits",),
        "LmforgeGPTForCausalLM": ("logits",),
    },
}
TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| accepted on real tokens (float32)
# protobuf refuses a file over 2 GiB; keep room for the graph beside the weights
SINGLE_FILE_BYTES = 2**31 - 2**26
# (rows, length) of the batch the graph is traced with and of the one it is checked on: the check
# has other sizes, so a size frozen into the graph by mistake fails it
TRACE_SHAPE = (3, 7)
CHECK_SHAPE = (2, 5)


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote, for the command's report."""

    source: Path  # the model folder read (a run folder's final/)
    output: Path  # OUT_DIR
    model_class: str  # e.g. LmforgeBertForSequenceClassification
    inputs: list[str]  # ONNX graph input names
    outputs: list[str]  # ONNX graph output names
    tokenizer: bool  # whether a tokenizer was written beside it
    max_abs_diff: float | None = None  # onnxruntime vs PyTorch on the check batch; None: not checked


# ----------------------------------------------------------------------------------- inputs


def _supported() -> str:
    return "; ".join(f"model_type {t}: {', '.join(classes)}" for t, classes in SUPPORTED.items())


def _model_class_name(folder: Path, model_type: str, architecture: str) -> str:
    """Today's name of the saved class, refusing what cannot be exported and saying what can."""
    architecture = families.LEGACY_ARCHITECTURES.get(architecture, architecture)  # saved before the renames
    if model_type in SUPPORTED and architecture in SUPPORTED[model_type]:
        return architecture
    what = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
    if architecture:
        what += f" ({architecture})"
    hint = ""
    if model_type in ("bert", "llama", "gpt2"):
        hint = f"; a stock {model_type} model converts to lmforge first: lmforge convert {folder} --from-hf OUT"
    raise LmforgeError(f"{folder}: {what} cannot be exported to ONNX; --to-onnx exports {_supported()}{hint}")


def _check_dependencies() -> None:
    """The exporter's optional dependencies are installed (imported here: lmforge runs without them)."""
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise LmforgeError(f"ONNX export needs the {name!r} package: {INSTALL_HINT}") from None


def _load(name: str, folder: Path) -> Any:
    """The model in ``folder`` as lmforge's class ``name``, float32, sdpa attention, eval mode."""
    cls = getattr(families, name)
    try:
        return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise LmforgeError(f"{folder}: {name} cannot load it: {first_line(e)}") from None


# ----------------------------------------------------------------------------------- the graph


class _Graph(nn.Module):
    """The model as the ONNX graph sees it: named tensors in, a tuple of tensors out."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...], token_types: bool):
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
        self.is_bert = model.config.model_type == "lmforge_bert"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.is_bert:
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
        else:
            kwargs["use_cache"] = False
        out = self.model(**kwargs, return_dict=True)
        return tuple(getattr(out, name) for name in self.outputs)


def _graph_outputs(model: nn.Module, name: str) -> tuple[str, ...]:
    outputs = SUPPORTED[model.config.model_type][name]
    if "pooler_output" in outputs and getattr(model, "pooler", None) is None:
        outputs = tuple(o for o in outputs if o != "pooler_output")
    return outputs


def _example_batch(graph: _Graph, rows: int, length: int, *, seed: int = 0,
                   left: bool = False) -> dict[str, torch.Tensor]:
    """A batch of ``rows`` rows of different lengths (the first full, the last shortest, each at
    least 1 token) of random token ids, padded on the right (or ``left``); token types 0 then 1
    in each row."""
    config = graph.model.config
    length = max(2, min(length, config.max_position_embeddings or length))
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (rows, length), generator=g)  # (B, T)
    real = torch.linspace(length, max(1, length // 3), rows).round().long()[:, None]  # (B, 1) tokens per row
    positions = torch.arange(length)[None]  # (1, T)
    attention_mask = (positions >= length - real if left else positions < real).long()  # (B, T)
    if config.pad_token_id is not None:
        input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in graph.input_names:
        second = positions >= real // 2  # (B, T) the second half of each (right-padded) row
        if config.type_vocab_size < 2:
            second = torch.zeros_like(second)
        batch["token_type_ids"] = (second & attention_mask.bool()).long()
    return batch


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.export and the ONNX exporter warn and log (with whole graphs) about every traced
    shortcut and about torchvision's ops when it is not installed; what counts is the
    comparison with PyTorch that follows, so they are silenced while tracing."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch.fx", "torch._export", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _trace(graph: _Graph, batch: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """``torch.export`` of the graph with dynamic batch and sequence axes."""
    dims = {name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for name in batch}
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # a failure prints the partial graph there
            return torch.export.export(graph, tuple(batch.values()), dynamic_shapes=dims, strict=False)
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds
        raise LmforgeError(f"torch.export cannot trace {type(graph.model).__name__}: {first_line(e)}") from None


def _write_onnx(graph: _Graph, batch: dict[str, torch.Tensor], path: Path, *, opset: int | None,
                external: bool) -> None:
    """Trace ``graph`` on ``batch`` and save it as ONNX at ``path`` (weights in ``path``.data when ``external``)."""
    with _quiet_exporter():
        program = _trace(graph, batch)
        try:
            onnx_program = torch.onnx.export(
                program, (), input_names=list(batch), output_names=list(graph.outputs), opset_version=opset,
                dynamic_shapes=tuple({0: "batch", 1: "sequence"} for _ in batch),  # names the axes
                dynamo=True, verbose=False, optimize=True)
            onnx_program.save(str(path), external_data=external)
        except Exception as e:  # noqa: BLE001 - the exporter's errors vary by op and version
            raise LmforgeError(f"the ONNX exporter cannot convert {type(graph.model).__name__}: "
                               f"{type(e).__name__}: {first_line(e)}") from None


def _verify(graph: _Graph, path: Path, batch: dict[str, torch.Tensor]) -> float | None:
    """Largest |onnxruntime - PyTorch| over the outputs on ``batch`` (per-token outputs on real
    tokens only: padded positions are not defined alike); ``LmforgeError`` past ``TOLERANCE``.
    None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(list(graph.outputs), {name: t.numpy() for name, t in batch.items()})
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise LmforgeError(f"onnxruntime cannot run the exported {type(graph.model).__name__}: "
                           f"{first_line(e)}; nothing written") from None
    with torch.no_grad():  # the model as called in PyTorch, not through the graph's wrapper
        returned = graph.model(**batch)
    expected = [getattr(returned, name) for name in graph.outputs]
    real = batch["attention_mask"].bool()  # (B, T)
    worst = 0.0
    for name, want, have in zip(graph.outputs, expected, got, strict=True):
        have = torch.from_numpy(have)
        if want.shape != have.shape:
            raise LmforgeError(f"the exported {name} has shape {tuple(have.shape)}, PyTorch's "
                               f"{tuple(want.shape)}; nothing written")
        if want.dim() == 3:  # (B, T, X): real tokens only
            want, have = want[real], have[real]
        diff = float((want - have).abs().max())
        if not diff <= TOLERANCE:  # NaN fails too
            raise LmforgeError(f"the exported {type(graph.model).__name__} differs from PyTorch: max |diff| "
                               f"of {name} is {diff:.3g} > {TOLERANCE:g} on a padded batch; nothing written")
        worst = max(worst, diff)
    return worst


# ----------------------------------------------------------------------------------- writing


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def export_onnx(source: str | Path, output: str | Path, *, overwrite: bool = False,
                opset: int | None = None, flag: str = "--to-onnx") -> OnnxExport:
    """Export the model lmforge saved in ``source`` (a model, run or quickstart folder) to ONNX in ``output``.

    Writes ``model.onnx``, ``config.json`` and the tokenizer (when the model has one). Exports the
    BERT encoder and its heads and the GPT classifier and causal LM (logits, no cache); anything
    else, a LoRA adapter (merge it first), a missing onnx/onnxscript, a non-empty ``output``
    without ``overwrite`` or an output inside the source raise ``LmforgeError`` before anything
    is written. The graph is compared with PyTorch by onnxruntime (when installed) on a padded
    batch; a difference over ``TOLERANCE`` raises and writes nothing. ``opset``: the ONNX opset
    (default: the exporter's); ``flag`` names the output in messages.
    """
    source, output = Path(source), Path(output)
    folder = find_model_dir(source)
    model_type, architecture = read_config(folder)
    name = _model_class_name(folder, model_type, architecture)
    check_output_dir(output, overwrite=overwrite, inputs=(source, folder), what="ONNX model", flag=flag,
                     replaceable=(ONNX_FILE,))
    _check_dependencies()
    tokenizer = source_tokenizer(folder)
    model = _load(name, folder)
    graph = _Graph(model, _graph_outputs(model, name),
                   token_types=model_type == "lmforge_bert" and model.config.type_vocab_size > 0)
    with staged_folder(output, overwrite=overwrite, doing="exporting") as tmp:
        _write_onnx(graph, _example_batch(graph, *TRACE_SHAPE), tmp / ONNX_FILE, opset=opset,
                    external=_weight_bytes(model) > SINGLE_FILE_BYTES)
        # left padding for a causal model: its real tokens never see right padding, so only left
        # padding shows whether the graph reads the attention mask
        check = _example_batch(graph, *CHECK_SHAPE, seed=1, left=model.config.is_causal)
        max_diff = _verify(graph, tmp / ONNX_FILE, check)
        shutil.copyfile(folder / "config.json", tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return OnnxExport(folder, output, name, list(graph.input_names), list(graph.outputs), tokenizer is not None,
                      max_diff)
