"""``export_onnx`` (``lmforge convert MODEL --to-onnx OUT_DIR``): onnxruntime gives PyTorch's outputs
on padded batches of sizes the graph was not traced with, the GPT classifier pools the last real
token, OUT_DIR holds a tokenizer and config that work where lmforge is not installed (the docs'
example runs there), and what cannot be exported writes nothing.

Each model is exported once (module fixture); the tests read the exported folders."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.errors import LmforgeError
from lmforge.export import onnx as onnx_export
from lmforge.export.onnx import OnnxExport, export_onnx
from lmforge.models import (
    LmforgeBertConfig,
    LmforgeBertForSequenceClassification,
    LmforgeBertForTokenClassification,
    LmforgeBertModel,
    LmforgeGPTConfig,
    LmforgeGPTForCausalLM,
    LmforgeGPTForSequenceClassification,
    LmforgeMambaConfig,
    LmforgeMambaForCausalLM,
)
from tests.export_utils import run_isolated
from tests.finetune_fixtures import save_base
from tests.pipeline_fixtures import bert_tokenizer, gpt_tokenizer, make_corpus
from tests.torch_threads import single_thread  # noqa: F401
from tests.train_fixtures import perturb, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the king is dead", "long live the king and all the lords of the realm", "to be"]
PAIRS = ["sweet fair love", "night", "wherefore art thou the queen of the day"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
ATOL = 1e-4
EXAMPLE_DIR = "sentiment-onnx"  # the folder name the docs' example reads

# The docs' example (the --to-onnx section of docs/), run as printed by test_the_docs_example_runs_without_lmforge.
EXAMPLE = '''\
import json

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

out_dir = "sentiment-onnx"  # written by: lmforge convert MODEL --to-onnx sentiment-onnx
tokenizer = AutoTokenizer.from_pretrained(out_dir)
session = ort.InferenceSession(f"{out_dir}/model.onnx")
with open(f"{out_dir}/config.json") as f:
    id2label = json.load(f)["id2label"]

texts = ["the king is dead", "long live the king and all the lords of the realm"]
batch = tokenizer(texts, padding=True, return_tensors="np")
inputs = {i.name: batch[i.name] for i in session.get_inputs()}  # input_ids, attention_mask(, token_type_ids)
(logits,) = session.run(["logits"], inputs)
probs = np.exp(logits - logits.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
for text, p in zip(texts, probs):
    print(f"{id2label[str(p.argmax())]} ({p.max():.2f}): {text}")
'''


# ----------------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    corpus = make_corpus(120)
    bert = bert_tokenizer(corpus)  # returning token_type_ids, as lmforge's trained BERT tokenizers do
    bert = PreTrainedTokenizerFast(tokenizer_object=bert.backend_tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    return {"gpt": gpt_tokenizer(corpus), "bert": bert}


def _bert(tok, preset: str, **changes) -> LmforgeBertConfig:
    return LmforgeBertConfig.from_preset(preset, vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                                         pad_token_id=tok.pad_token_id, **changes)


def _gpt(tok, **changes) -> LmforgeGPTConfig:
    return LmforgeGPTConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_attention_heads=4,
                            num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **changes)


LABELLED = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
# name -> (tokenizer, model); classic BERT has learned positions (checked eagerly, skipped in the graph), the
# encoder has no token types (no token_type_ids input)
MODELS = {
    "bert-classifier": ("bert", lambda tok: LmforgeBertForSequenceClassification(_bert(tok, "classic", **LABELLED))),
    "bert-encoder": ("bert", lambda tok: LmforgeBertModel(_bert(tok, "modern", type_vocab_size=0))),
    "bert-tokens": ("bert", lambda tok: LmforgeBertForTokenClassification(_bert(tok, "modern", num_labels=5))),
    "gpt-classifier": ("gpt", lambda tok: LmforgeGPTForSequenceClassification(_gpt(tok, **LABELLED))),
}


@dataclass
class Case:
    model: Any  # the PyTorch model, eval mode
    tok: Any
    source: Path  # what was passed to export_onnx
    out: Path
    result: OnnxExport


@pytest.fixture(scope="module")
def exported(tmp_path_factory, toks) -> dict[str, Case]:
    """Every model saved and exported: the BERT classifier from a run folder (its final/), the causal
    LM from what a pretraining run saves (``save_base``), the others from model folders."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onnx")
    cases = {}
    for i, (name, (family, build)) in enumerate(MODELS.items()):
        model = perturb(build(toks[family]), seed=i).eval()
        source = root / name
        folder = source / "final" if name == "bert-classifier" else source
        model.save_pretrained(folder)
        toks[family].save_pretrained(folder)
        out = root / "out" / name / (EXAMPLE_DIR if name == "bert-classifier" else "onnx")
        cases[name] = Case(model, toks[family], source, out, export_onnx(source, out))
    base = save_base(root / "gpt-lm", "gpt")
    out = root / "out" / "gpt-lm" / "onnx"
    cases["gpt-lm"] = Case(LmforgeGPTForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base),
                           base, out, export_onnx(base, out))
    torch.set_num_threads(threads)
    return cases


def _run(case: Case, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """The exported graph on ``batch`` (numpy or torch), outputs by name."""
    session = onnxruntime.InferenceSession(str(case.out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: np.asarray(batch[i.name], dtype=np.int64) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def _torch(case: Case, batch: dict[str, Any]) -> Any:
    """The PyTorch model's output on the same batch (token types only where the graph takes them)."""
    names = case.result.inputs
    with torch.no_grad():
        return case.model(**{k: torch.as_tensor(np.asarray(batch[k]), dtype=torch.long) for k in names})


def _encode(case: Case, texts: list[str], side: str = "right", pairs: list[str] | None = None) -> dict[str, Any]:
    case.tok.padding_side = side
    batch = dict(case.tok(texts, pairs, padding=True, return_tensors="np"))
    assert (batch["attention_mask"] == 0).any() and len(set(batch["attention_mask"].sum(-1))) > 1
    return batch


def _close(got: np.ndarray, want: torch.Tensor, mask: np.ndarray | None = None) -> None:
    got, want = torch.from_numpy(got), want.float()
    if mask is not None:  # per-token outputs: real tokens only
        got, want = got[torch.from_numpy(mask).bool()], want[torch.from_numpy(mask).bool()]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("side", ["right", "left"])
def test_bert_classifier_logits_match_pytorch_with_token_types(exported, side):
    """Left padding moves [CLS] off position 0 (not how BERT is used), but the graph must still
    compute what PyTorch computes."""
    case = exported["bert-classifier"]
    assert case.result.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    batch = _encode(case, TEXTS, side, PAIRS)
    assert (batch["token_type_ids"] == 1).any()
    got = _run(case, batch)["logits"]
    assert got.shape == (3, 3)
    _close(got, _torch(case, batch).logits)
    no_types = _run(case, {**batch, "token_type_ids": np.zeros_like(batch["token_type_ids"])})["logits"]
    assert np.abs(no_types - got).max() > 1e-3  # the token types reach the graph


def test_bert_encoder_hidden_states_match_pytorch_on_real_tokens(exported):
    case = exported["bert-encoder"]
    assert case.result.inputs == ["input_ids", "attention_mask"]  # type_vocab_size=0
    assert case.result.outputs == ["last_hidden_state", "pooler_output"]
    batch = _encode(case, TEXTS)
    got, want = _run(case, batch), _torch(case, batch)
    assert got["last_hidden_state"].shape == (3, batch["input_ids"].shape[1], 32)
    _close(got["last_hidden_state"], want.last_hidden_state, batch["attention_mask"])
    _close(got["pooler_output"], want.pooler_output)
    alone = _run(case, dict(case.tok(TEXTS[2:], return_tensors="np")))  # the padding mask reaches the graph
    n = int(batch["attention_mask"][2].sum())
    np.testing.assert_allclose(got["last_hidden_state"][2, :n], alone["last_hidden_state"][0], atol=ATOL, rtol=0)


def test_bert_token_classifier_logits_match_pytorch_on_real_tokens(exported):
    case = exported["bert-tokens"]
    batch = _encode(case, TEXTS, pairs=PAIRS)
    got = _run(case, batch)["logits"]
    assert got.shape == (*batch["input_ids"].shape, 5)
    _close(got, _torch(case, batch).logits, batch["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt_classifier_pools_the_last_real_token(exported, side):
    case = exported["gpt-classifier"]
    batch = _encode(case, TEXTS, side)
    got = _run(case, batch)["logits"]
    _close(got, _torch(case, batch).logits)
    for i, text in enumerate(TEXTS):  # each padded row scores as the text alone (no padding)
        alone = _run(case, dict(case.tok([text], return_tensors="np")))["logits"]
        np.testing.assert_allclose(got[i], alone[0], atol=ATOL, rtol=0)
    last_position = _run(case, {**batch, "attention_mask": np.ones_like(batch["attention_mask"])})["logits"]
    assert np.abs(last_position - got).max() > 1e-3  # reading the last position instead would differ


def test_gpt_causal_lm_exports_logits_without_a_cache(exported):
    case = exported["gpt-lm"]
    assert case.result.outputs == ["logits"]
    model = onnx.load(str(case.out / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["logits"]  # no past_key_values / present.*
    batch = _encode(case, TEXTS, "left")
    got = _run(case, batch)["logits"]
    assert got.shape == (*batch["input_ids"].shape, len(case.tok))
    _close(got, _torch(case, batch).logits, batch["attention_mask"])


@pytest.mark.parametrize("name", ["bert-classifier", "bert-encoder", "bert-tokens", "gpt-classifier", "gpt-lm"])
@pytest.mark.parametrize("rows, length", [(5, 23), (1, 1)])
def test_batch_and_sequence_axes_are_dynamic(exported, name, rows, length):
    """Sizes other than the traced (3, 7) and checked (2, 5) ones, padded rows of random tokens."""
    case = exported[name]
    model = onnx.load(str(case.out / "model.onnx"))
    for value in model.graph.input:
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"], value.name
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, len(case.tok), (rows, length), generator=g)
    mask = (torch.arange(length)[None] < torch.linspace(length, 1, rows).round()[:, None]).long()
    batch = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": (ids % 2).numpy()}
    got, want = _run(case, batch), _torch(case, batch)
    for output in case.result.outputs:
        _close(got[output], getattr(want, output), mask.numpy() if got[output].ndim == 3 else None)


# ----------------------------------------------------------------------------------- the folder


def test_the_folder_holds_the_graph_config_and_tokenizer(exported):
    for name, case in exported.items():
        assert {p.name for p in case.out.iterdir()} == {"model.onnx", "config.json", "tokenizer.json",
                                                         "tokenizer_config.json"}, name
        assert not [p for p in case.out.parent.iterdir() if p.name != case.out.name]  # no temporary folder left
        folder = case.source / "final" if name == "bert-classifier" else case.source
        assert case.result.source == folder and case.result.output == case.out and case.result.tokenizer
        assert case.result.model_class == type(case.model).__name__
        assert case.result.max_abs_diff is not None and case.result.max_abs_diff <= ATOL
        assert (case.out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
        saved = AutoTokenizer.from_pretrained(case.out)
        assert saved(TEXTS, PAIRS)["input_ids"] == case.tok(TEXTS, PAIRS)["input_ids"], name


def test_the_docs_example_runs_without_lmforge(exported):
    case = exported["bert-classifier"]
    assert case.out.name == EXAMPLE_DIR
    got = run_isolated(EXAMPLE + "\nemit({'logits': logits.tolist(), 'probs': probs.tolist(), "
                                 "'labels': [id2label[str(p.argmax())] for p in probs]})\n", path=case.out)
    batch = _encode(case, TEXTS[:2])
    want = _torch(case, batch).logits
    torch.testing.assert_close(torch.tensor(got["logits"]), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(got["probs"]), want.softmax(-1), atol=ATOL, rtol=0)
    assert got["labels"] == [LABELS[i] for i in want.argmax(-1).tolist()]


def test_the_docs_show_this_example():
    """The page with the onnxruntime example shows this code (the one the test above runs)."""
    pages = [p for p in (ROOT / "docs").glob("*.md") if "ort.InferenceSession" in p.read_text(encoding="utf-8")]
    if not pages:
        pytest.skip("no docs page shows the onnxruntime example yet")
    assert any(f"```python\n{EXAMPLE}```" in p.read_text(encoding="utf-8") for p in pages)


# ----------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def unsupported(tmp_path_factory, toks) -> dict[str, Path]:
    """A Mamba model, a LoRA adapter of a tiny GPT and a run whose final/ is that adapter."""
    root = tmp_path_factory.mktemp("unsupported")
    tok = toks["gpt"]
    mamba = LmforgeMambaForCausalLM(LmforgeMambaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                        state_size=8))
    mamba.save_pretrained(root / "mamba")
    base = LmforgeGPTForCausalLM(_gpt(tok))
    base.save_pretrained(root / "base")
    adapter = get_peft_model(LmforgeGPTForCausalLM.from_pretrained(root / "base"),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    adapter.save_pretrained(root / "adapter")
    adapter.save_pretrained(root / "lora-run" / "final")
    return {"mamba": root / "mamba", "adapter": root / "adapter", "lora-run": root / "lora-run",
            "missing": root / "no-such-model"}


@pytest.mark.parametrize("name, message", [
    ("mamba", r"model_type 'lmforge_mamba' \(LmforgeMambaForCausalLM\) cannot be exported to ONNX; --to-onnx "
              r"exports model_type lmforge_bert: LmforgeBertForSequenceClassification"),
    ("adapter", r"holds a LoRA adapter, not a full model; merge it first: lmforge merge"),
    ("lora-run", r"final holds a LoRA adapter"),
    ("missing", r"no-such-model: no such folder"),
])
def test_what_cannot_be_exported_is_refused_before_writing(unsupported, tmp_path, name, message):
    out = tmp_path / "onnx"
    with pytest.raises(LmforgeError, match=message):
        export_onnx(unsupported[name], out)
    assert not list(tmp_path.iterdir())


def test_an_existing_output_is_refused_and_left_as_it_was(exported, tmp_path):
    source = exported["gpt-classifier"].source
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(LmforgeError, match=r"--to-onnx .*onnx exists and is not empty; .*--overwrite"):
        export_onnx(source, out)
    with pytest.raises(LmforgeError, match="holds files that are not a saved model"):
        export_onnx(source, out, overwrite=True)  # --overwrite replaces an ONNX export, not other files
    with pytest.raises(LmforgeError, match="is, holds or is inside the input folder"):
        export_onnx(source, source / "onnx")
    assert snapshot(tmp_path) == before and not (source / "onnx").exists()


def test_a_missing_exporter_dependency_names_the_extra(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(LmforgeError, match=r"'onnxscript' package: pip install 'lmforge\[onnx\]'"):
        export_onnx(exported["gpt-classifier"].source, tmp_path / "onnx")
    assert not list(tmp_path.iterdir())


def test_an_export_that_differs_from_pytorch_is_not_written(exported, tmp_path, monkeypatch):
    """Even with --overwrite, a failed check leaves the earlier export as it was and no temporary folder."""
    case = exported["gpt-classifier"]
    out = tmp_path / "onnx"
    shutil.copytree(case.out, out)
    before = snapshot(tmp_path)
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # any difference, even 0, now fails the check
    with pytest.raises(LmforgeError, match="differs from PyTorch: max .* of logits .*; nothing written"):
        export_onnx(case.source, out, overwrite=True)
    assert snapshot(tmp_path) == before
