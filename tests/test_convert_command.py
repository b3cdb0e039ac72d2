"""``lmforge convert``: --to-hf writes a stock checkpoint that loads with no remote code and gives
lmforge's logits; --from-hf writes an lmforge model that loads with its own code and gives the stock
model's logits; to -> from gives the same weights back; what the target cannot hold writes nothing.

Every converted folder is loaded in ONE fresh interpreter where lmforge is not importable."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.export.convert import FROM_HF, TO_HF, convert_folder
from lmforge.models import (
    LmforgeBertConfig,
    LmforgeBertForMaskedLM,
    LmforgeBertForSequenceClassification,
    LmforgeGPTConfig,
    LmforgeGPTForCausalLM,
    LmforgeGPTForSequenceClassification,
    LmforgeMambaConfig,
    LmforgeMambaForCausalLM,
)
from lmforge.models import convert as convert_module
from tests.export_utils import run_isolated
from tests.pipeline_fixtures import bert_tokenizer, gpt_tokenizer, make_corpus
from tests.torch_threads import single_thread  # noqa: F401
from tests.train_fixtures import perturb, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["the king is dead", "long live the king and all the lords of the realm", "to be"]
ENCODE = ["To be, or not to be: sweet fair love.", "héllo 世界 🤗\tTHE KING", "  double  spaces "]
ATOL = 1e-5
SMALL = dict(num_hidden_layers=2, max_position_embeddings=64)
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


# ----------------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def toks():
    corpus = make_corpus(120)
    return {"gpt": gpt_tokenizer(corpus), "bert": bert_tokenizer(corpus)}


def _gpt_ids(tok) -> dict:
    return {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}


def _lmforge_sources(tok_gpt, tok_bert) -> dict[str, tuple]:
    """name -> (model, tokenizer, padding side, stock class it converts to)."""
    n_gpt, n_bert = len(tok_gpt), len(tok_bert)
    bert = dict(vocab_size=n_bert, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                pad_token_id=tok_bert.pad_token_id, **SMALL)
    return {
        "gpt-gqa-untied": (LmforgeGPTForCausalLM(LmforgeGPTConfig(
            vocab_size=n_gpt, hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
            rope_theta=500.0, tie_word_embeddings=False, **SMALL, **_gpt_ids(tok_gpt))),
            tok_gpt, "left", "LlamaForCausalLM"),
        "gpt-mqa-tied-headdim": (LmforgeGPTForCausalLM(LmforgeGPTConfig(
            vocab_size=n_gpt, hidden_size=32, intermediate_size=56, num_attention_heads=4, num_key_value_heads=1,
            head_dim=12, tie_word_embeddings=True, attention_bias=True, **SMALL, **_gpt_ids(tok_gpt))),
            tok_gpt, "left", "LlamaForCausalLM"),
        "gpt-learned": (LmforgeGPTForCausalLM(LmforgeGPTConfig(
            vocab_size=n_gpt, hidden_size=36, intermediate_size=70, num_attention_heads=3, num_key_value_heads=3,
            position_embedding_type="learned", norm_type="layernorm", norm_eps=1e-5, hidden_act="gelu_tanh",
            norm_bias=True, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, **SMALL,
            **_gpt_ids(tok_gpt))), tok_gpt, "left", "GPT2LMHeadModel"),
        "gpt-classifier": (LmforgeGPTForSequenceClassification(LmforgeGPTConfig(
            vocab_size=n_gpt, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **SMALL, **_gpt_ids(tok_gpt))),
            tok_gpt, "left", "LlamaForSequenceClassification"),
        "bert-mlm": (LmforgeBertForMaskedLM(LmforgeBertConfig.from_preset("classic", **bert)),
                     tok_bert, "right", "BertForMaskedLM"),
        "bert-classifier": (LmforgeBertForSequenceClassification(LmforgeBertConfig.from_preset(
            "classic", id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **bert)),
            tok_bert, "right", "BertForSequenceClassification"),
        "mamba": (LmforgeMambaForCausalLM(LmforgeMambaConfig(vocab_size=n_gpt, hidden_size=32, num_hidden_layers=2, state_size=8,
                                               **_gpt_ids(tok_gpt))), tok_gpt, "left", "MambaForCausalLM"),
    }


def _stock_sources(tok_gpt, tok_bert) -> dict[str, tuple]:
    """name -> (stock model, tokenizer, padding side, lmforge class it converts to)."""
    n = len(tok_gpt)
    ids = dict(**_gpt_ids(tok_gpt), bos_token_id=tok_gpt.eos_token_id)
    return {
        "llama": (transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=n, hidden_size=48, intermediate_size=72, num_attention_heads=6, num_key_value_heads=2,
            **SMALL, **ids)), tok_gpt, "left", "LmforgeGPTForCausalLM"),
        "gpt2": (transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=n, n_positions=64, n_embd=32, n_layer=2, n_head=4, **ids)), tok_gpt, "left", "LmforgeGPTForCausalLM"),
        "bert": (transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=len(tok_bert), hidden_size=32, num_attention_heads=4, intermediate_size=48,
            pad_token_id=tok_bert.pad_token_id, **SMALL)), tok_bert, "right", "LmforgeBertForMaskedLM"),
        "mamba": (transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=n, hidden_size=32, num_hidden_layers=2, state_size=8, **ids)), tok_gpt, "left",
            "LmforgeMambaForCausalLM"),
    }


def _save(folder: Path, model, tok) -> Path:
    """What a run's final/ holds: weights, generation config with the tokenizer's ids, tokenizer, card."""
    if model.can_generate():
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "README.md").write_text("# a model card\n")
    return folder


def _inputs(tok, side: str, causal: bool) -> dict[str, torch.Tensor]:
    tok.padding_side = side
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    assert (batch["attention_mask"] == 0).any()
    if causal:  # GPT-2's learned positions count from the first real token only when told so
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def _logits(model, batch: dict) -> torch.Tensor:
    if "position_ids" in batch and "Mamba" in type(model).__name__:
        batch = {k: v for k, v in batch.items() if k != "position_ids"}
    with torch.no_grad():
        out = model(**batch).logits.float()
    return out[batch["attention_mask"].bool()] if out.dim() == 3 else out  # real tokens only


@pytest.fixture(scope="module")
def converted(tmp_path_factory, toks):
    """Every source built, saved and converted; then ONE isolated interpreter loads every output."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("convert")
    cases: dict[tuple[str, str], dict] = {}
    sources = {"to": _lmforge_sources(toks["gpt"], toks["bert"]), "from": _stock_sources(toks["gpt"], toks["bert"])}
    for direction, table in sources.items():
        for i, (name, (model, tok, side, target)) in enumerate(table.items()):
            model = perturb(model, seed=i).eval()
            # a run folder for the first to_hf case (convert reads its final/), model folders for the rest
            run = root / f"{direction}-{name}"
            src = _save((run / "final" if i == 0 else run), model, tok)
            out = root / "out" / f"{direction}-{name}"
            convert_folder(run, out, to_hf=direction == "to")
            causal = model.can_generate()
            batch = _inputs(tok, side, causal)
            cases[direction, name] = dict(
                source=src, run=run, out=out, target=target, model=model, tok=tok, causal=causal,
                batch=batch, logits=_logits(model, batch), encoded=[tok(t)["input_ids"] for t in ENCODE])
    spec = [{"key": list(key), "path": str(c["out"]), "trust": key[0] == "from",
             "auto": "AutoModelForCausalLM" if c["causal"] else (
                 "AutoModelForSequenceClassification" if "classifier" in key[1] else "AutoModelForMaskedLM"),
             "batch": {k: v.tolist() for k, v in c["batch"].items()}} for key, c in cases.items()]
    (root / "out" / "spec.json").write_text(json.dumps({"cases": spec, "texts": ENCODE}))
    results = run_isolated(
        """
        import json, os
        import torch, transformers
        from transformers import AutoTokenizer
        spec = json.loads(open(os.path.join(PATH, "spec.json")).read())
        out = {}
        for case in spec["cases"]:  # to_hf outputs first: trust_remote_code=False
            auto = getattr(transformers, case["auto"])
            model = auto.from_pretrained(case["path"], trust_remote_code=case["trust"]).eval()
            batch = {k: torch.tensor(v) for k, v in case["batch"].items()}
            if "Mamba" in type(model).__name__:
                batch.pop("position_ids", None)
            with torch.no_grad():
                logits = model(**batch).logits.float()
            if logits.dim() == 3:
                logits = logits[batch["attention_mask"].bool()]
            tok = AutoTokenizer.from_pretrained(case["path"], trust_remote_code=case["trust"])
            out["/".join(case["key"])] = {
                "class": type(model).__name__, "module": type(model).__module__, "logits": logits.tolist(),
                "encoded": [tok(t)["input_ids"] for t in spec["texts"]],
                "id2label": {str(k): v for k, v in model.config.id2label.items()},
                "generation": [getattr(gen, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
                if (gen := getattr(model, "generation_config", None)) is not None else None,
            }
        emit(out)
        """,
        path=root / "out",
    )
    torch.set_num_threads(threads)
    for key, case in cases.items():
        case["isolated"] = results["/".join(key)]
    return cases


TO_CASES = ["gpt-gqa-untied", "gpt-mqa-tied-headdim", "gpt-learned", "gpt-classifier", "bert-mlm",
            "bert-classifier", "mamba"]
FROM_CASES = ["llama", "gpt2", "bert", "mamba"]


# ----------------------------------------------------------------------------------- to_hf


@pytest.mark.parametrize("name", TO_CASES)
def test_to_hf_loads_without_remote_code_with_the_same_logits_and_tokens(converted, name):
    case = converted["to", name]
    got = case["isolated"]
    assert got["class"] == case["target"] and got["module"].startswith("transformers.models."), got["module"]
    torch.testing.assert_close(torch.tensor(got["logits"]), case["logits"], atol=ATOL, rtol=0)
    assert got["encoded"] == case["encoded"]
    assert got["id2label"] == {str(k): v for k, v in case["model"].config.id2label.items()}
    if "classifier" in name:
        assert got["id2label"] == {str(k): v for k, v in LABELS.items()}


@pytest.mark.parametrize("name", TO_CASES)
def test_to_hf_folder_is_a_plain_stock_checkpoint(converted, name):
    case = converted["to", name]
    out = case["out"]
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == [case["target"]]
    assert not list(out.glob("*.py")) and not (out / "README.md").exists()
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert "lmforge" not in (out / "tokenizer_config.json").read_text()
    assert not [p for p in out.parent.iterdir() if ".converting-" in p.name]  # no temporary folder left
    if case["causal"]:
        gen = json.loads((out / "generation_config.json").read_text())
        tok = case["tok"]
        assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (
            tok.eos_token_id, tok.eos_token_id, tok.pad_token_id)
        assert case["isolated"]["generation"] == [tok.eos_token_id, tok.eos_token_id, tok.pad_token_id]


@pytest.mark.parametrize("name", TO_CASES)
def test_to_hf_then_from_hf_gives_identical_weights(converted, name, tmp_path):
    case = converted["to", name]
    back = convert_folder(case["out"], tmp_path / "back", to_hf=False)
    before, after = load_file(case["source"] / "model.safetensors"), load_file(back / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    cfg_before = json.loads((case["source"] / "config.json").read_text())
    cfg_after = json.loads((back / "config.json").read_text())
    switches = ("model_type", "architectures", "auto_map", "tie_word_embeddings", "id2label", "hidden_size",
                "num_key_value_heads", "head_dim", "position_embedding_type", "norm_type", "hidden_act")
    assert {k: cfg_before.get(k) for k in switches} == {k: cfg_after.get(k) for k in switches}


def test_to_hf_keeps_the_dtype(tmp_path, toks):
    tok = toks["gpt"]
    model = perturb(LmforgeGPTForCausalLM(LmforgeGPTConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                              num_attention_heads=4, **SMALL)), seed=5).eval().to(torch.bfloat16)
    src = _save(tmp_path / "bf16", model, tok)
    out = convert_folder(src, tmp_path / "out", to_hf=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    stock = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert stock.dtype == torch.bfloat16
    batch = _inputs(tok, "left", causal=True)
    # two implementations in bf16 round differently: a few bf16 steps apart at most
    torch.testing.assert_close(_logits(stock, batch), _logits(model, batch), atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------- from_hf


@pytest.mark.parametrize("name", FROM_CASES)
def test_from_hf_loads_with_its_own_code_and_the_same_logits(converted, name):
    case = converted["from", name]
    got = case["isolated"]
    assert got["class"] == case["target"] and got["module"].startswith("transformers_modules"), got["module"]
    torch.testing.assert_close(torch.tensor(got["logits"]), case["logits"], atol=ATOL, rtol=0)
    assert got["encoded"] == case["encoded"]
    config = json.loads((case["out"] / "config.json").read_text())
    assert config["model_type"].startswith("lmforge_") and config["auto_map"]
    assert not (case["out"] / "README.md").exists()
    if case["causal"]:
        tok = case["tok"]
        assert got["generation"] == [tok.eos_token_id, tok.eos_token_id, tok.pad_token_id]


# ----------------------------------------------------------------------------------- refusals


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _gpt(folder: Path, tok, **switches) -> Path:
    config = LmforgeGPTConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_attention_heads=4,
                       **SMALL, **switches)
    return _save(folder, LmforgeGPTForCausalLM(config), tok)


@pytest.mark.parametrize("switches,named", [
    ({"position_embedding_type": "alibi"}, "position_embedding_type='alibi'"),
    ({"norm_type": "dyt"}, "norm_type='dyt'"),
    ({"hidden_act": "geglu"}, "hidden_act='geglu'"),
])
def test_a_config_the_target_cannot_hold_is_refused_naming_the_switch(tmp_path, capsys, toks, switches, named):
    src = _gpt(tmp_path / "src", toks["gpt"], **switches)
    before = snapshot(tmp_path)
    code, text = _cli(capsys, src, "--to-hf", tmp_path / "out")
    assert code == 2 and named in text and str(src) in text, text
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_modern_bert_is_refused_naming_the_switch(tmp_path, toks):
    tok = toks["bert"]
    model = LmforgeBertForMaskedLM(LmforgeBertConfig.from_preset(
        "modern", vocab_size=len(tok), hidden_size=32, num_attention_heads=4, intermediate_size=48,
        hidden_act="gelu", **SMALL))
    src = _save(tmp_path / "src", model, tok)
    with pytest.raises(LmforgeError, match="position_embedding_type='rope'"):
        convert_folder(src, tmp_path / "out", to_hf=True)


def test_adapter_tokenizer_only_and_unknown_folders_are_refused(tmp_path, capsys, toks):
    adapter_run = tmp_path / "lora-run"
    (adapter_run / "final").mkdir(parents=True)
    (adapter_run / "final" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter_run / "final" / "config.json").write_text(json.dumps({"model_type": "lmforge_gpt"}))
    tok_only = tmp_path / "tok"
    toks["gpt"].save_pretrained(tok_only)
    unknown = tmp_path / "t5"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = {
        adapter_run: ["merge it first: lmforge merge"],
        tok_only: ["a tokenizer but no model", "lmforge_gpt", "llama"],
        unknown: ["model_type 't5' cannot be converted", "lmforge_bert", "GPT2LMHeadModel", "mamba"],
        empty: ["no model in this folder", "lmforge_mamba"],
        tmp_path / "missing": ["no such folder"],
    }
    for source, parts in expected.items():
        code, text = _cli(capsys, source, "--to-hf", tmp_path / "out")
        assert code == 2 and all(p in text for p in parts), (source, text)
    assert not (tmp_path / "out").exists()


def test_supported_tables_match_the_converters():
    assert set(TO_HF) == set(convert_module._TO_HF) and set(FROM_HF) == set(convert_module._FROM_HF)


def test_wrong_direction_and_unconvertible_class_are_refused(tmp_path, capsys, toks, converted):
    stock = converted["to", "gpt-gqa-untied"]["out"]  # a LlamaForCausalLM folder
    code, text = _cli(capsys, stock, "--to-hf", tmp_path / "a")
    assert code == 2 and "already a stock transformers model" in text and "--from-hf" in text
    code, text = _cli(capsys, converted["to", "mamba"]["source"], "--from-hf", tmp_path / "b")
    assert code == 2 and "is an lmforge model" in text and "--to-hf" in text
    folder = tmp_path / "llama-qa"
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                      num_hidden_layers=1)
    transformers.LlamaForQuestionAnswering(config).save_pretrained(folder)  # a class convert does not handle
    code, text = _cli(capsys, folder, "--from-hf", tmp_path / "c")
    assert code == 2 and "LlamaForQuestionAnswering has no lmforge equivalent" in text and "LlamaForCausalLM" in text
    assert not any((tmp_path / n).exists() for n in "abc")


def test_output_rules(tmp_path, capsys, toks, converted):
    src = converted["to", "mamba"]["source"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, text = _cli(capsys, src, "--to-hf", taken)
    assert code == 2 and "--to-hf" in text and "--overwrite" in text and "--output" not in text, text
    code, text = _cli(capsys, src, "--to-hf", taken, "--overwrite")  # --overwrite replaces only a model
    assert code == 2 and "not a saved model" in text and (taken / "notes.txt").read_text() == "mine"
    for inside in (src, src / "hf"):
        code, text = _cli(capsys, src, "--to-hf", inside)
        assert code == 2 and "converted model to another folder" in text, text
    assert not (src / "hf").exists()
    code, text = _cli(capsys, src, "--to-hf", tmp_path / "x", "--from-hf", tmp_path / "y")
    assert code == 2 and "exactly one of --to-hf" in text
    code, text = _cli(capsys, src)
    assert code == 2 and "exactly one of --to-hf" in text

    out = tmp_path / "out"
    code, text = _cli(capsys, src, "--to-hf", out)
    assert code == 0 and f"lmforge_mamba LmforgeMambaForCausalLM -> MambaForCausalLM: {out} (loads without " in text
    first = snapshot(out)
    code, text = _cli(capsys, converted["to", "gpt-learned"]["source"], "--to-hf", out)
    assert code == 2 and snapshot(out) == first  # no --overwrite: untouched
    code, text = _cli(capsys, converted["to", "gpt-learned"]["source"], "--to-hf", out, "--overwrite")
    assert code == 0 and "-> GPT2LMHeadModel" in text
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch, converted):
    import lmforge.export.convert as export

    def broken(folder):
        class Tok:
            def save_pretrained(self, path):
                raise OSError("disk full")
        return Tok()

    monkeypatch.setattr(export, "source_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_folder(converted["to", "mamba"]["source"], tmp_path / "out", to_hf=True)
    assert list(tmp_path.iterdir()) == []


def test_without_a_tokenizer_the_model_converts_with_a_note(tmp_path, capsys, converted):
    src = tmp_path / "model-only"
    converted["to", "gpt-classifier"]["model"].save_pretrained(src)
    code, text = _cli(capsys, src, "--to-hf", tmp_path / "out")
    assert code == 0 and "-> LlamaForSequenceClassification" in text and "holds no tokenizer" in text
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()
