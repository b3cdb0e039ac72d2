"""``lmforge merge``: a LoRA adapter folded into its base gives the logits of base + adapter, saves as a
normal model of its family (trained classification head included), and bad inputs write nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoTokenizer

import lmforge.models  # noqa: F401  (registers the lmforge model types with the Auto classes)
from lmforge.cli import main
from tests.pipeline_fixtures import bert_tokenizer, gpt_tokenizer, make_corpus
from tests.torch_threads import single_thread  # noqa: F401
from tests.train_fixtures import PRESETS, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

# (family, head) -> Auto class, peft task type, LoRA target modules (our module names: attention.Attention /
# feed_forward.MLP for GPT and BERT, modeling_mamba.LmforgeMambaMixer for Mamba)
CASES = {
    ("gpt", "causal"): ("AutoModelForCausalLM", "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"]),
    ("bert", "cls"): ("AutoModelForSequenceClassification", "SEQ_CLS", ["q_proj", "v_proj"]),
    ("mamba", "causal"): ("AutoModelForCausalLM", "CAUSAL_LM", ["in_proj", "x_proj", "out_proj"]),
    ("mamba", "cls"): ("AutoModelForSequenceClassification", "SEQ_CLS", ["in_proj", "out_proj"]),
}
HEAD = {"bert": "classifier", "gpt": "score", "mamba": "score"}  # peft's SEQ_CLS modules_to_save names
TEXTS = ["the king is dead", "long live the king and all the lords of the realm", "to be"]


@pytest.fixture(scope="module")
def tokenizers():
    corpus = make_corpus(120)
    return {"gpt": gpt_tokenizer(corpus), "mamba": gpt_tokenizer(corpus), "bert": bert_tokenizer(corpus)}


def _auto(name: str):
    return getattr(transformers, name)


def _batch(tok, side: str = "right") -> dict[str, torch.Tensor]:
    tok.padding_side = side
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # a padded batch
    return dict(enc)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).logits
    if out.dim() == 3:  # causal LM: real positions only
        out = out[batch["attention_mask"].bool()]
    return out


def _save_base(tmp: Path, family: str, head: str, tok) -> Path:
    auto, *_ = CASES[family, head]
    config = AutoConfig.for_model(**PRESETS[family], vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, num_labels=3)
    torch.manual_seed(0)
    base_dir = tmp / "base"
    _auto(auto).from_config(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    return base_dir


def _save_adapter(tmp: Path, family: str, head: str, base_dir: Path, *, tokenizer=None) -> tuple[Path, PeftModel]:
    """Base (loaded from base_dir, so the adapter config points there) + LoRA with non-zero B
    matrices and a changed modules_to_save head, saved to tmp/adapter."""
    auto, task, targets = CASES[family, head]
    base = _auto(auto).from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                 task_type=task))
    torch.manual_seed(1)
    changed = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # lora_B starts at 0: the adapter would be a no-op
                p.add_(torch.randn_like(p) * 0.2)
                changed += 1
    assert changed >= len(targets)
    adapter_dir = tmp / "adapter"
    peft_model.save_pretrained(adapter_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter_dir)
    return adapter_dir, peft_model.eval()


def _merge(*args: str) -> int:
    return main(["merge", *map(str, args)])


@pytest.mark.parametrize(("family", "head"), list(CASES), ids=[f"{f}-{h}" for f, h in CASES])
def test_merged_model_gives_the_logits_of_base_plus_adapter(tmp_path, tokenizers, family, head):
    tok = tokenizers[family]
    auto, task, _ = CASES[family, head]
    base_dir = _save_base(tmp_path, family, head, tok)
    adapter_tok = tok if family == "gpt" else None  # gpt: the tokenizer comes from the adapter folder
    adapter_dir, peft_model = _save_adapter(tmp_path, family, head, base_dir, tokenizer=adapter_tok)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    out = tmp_path / "merged"
    assert _merge(adapter_dir, "--output-dir", out) == 0

    merged = _auto(auto).from_pretrained(out).eval()
    base = _auto(auto).from_pretrained(base_dir).eval()
    sides = ["right", "left"] if family == "gpt" else ["right"]  # causal GPT pools/attends with either padding
    for side in sides:
        batch = _batch(AutoTokenizer.from_pretrained(out), side)
        expected = _logits(peft_model, batch)
        assert (expected - _logits(base, batch)).abs().max() > 1e-2  # the adapter changes the model
        torch.testing.assert_close(_logits(merged, batch), expected, atol=1e-5, rtol=0)

    files = {p.name for p in out.iterdir()}
    assert not {f for f in files if f.startswith("adapter_")}, files
    assert {"config.json", "model.safetensors", "tokenizer.json", "lmforge_merge.json"} <= files
    if head == "causal":
        assert "generation_config.json" in files
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == PRESETS[family]["model_type"]
    assert auto in saved["auto_map"] and f"modeling_{family}.py" in files  # loads where lmforge is not installed
    assert type(merged).__name__ == saved["architectures"][0]
    assert not any("lora" in k for k in merged.state_dict())
    record = json.loads((out / "lmforge_merge.json").read_text())
    assert record["base"] == str(base_dir) and record["task_type"] == task
    assert record["tokenizer"] == str(adapter_dir if adapter_tok is not None else base_dir)
    if head == "cls":  # the trained head, not the base's
        trained = peft_model.base_model.model.get_submodule(HEAD[family]).modules_to_save["default"].weight
        merged_head = merged.get_submodule(HEAD[family]).weight
        torch.testing.assert_close(merged_head, trained, atol=0, rtol=0)
        assert not torch.equal(merged_head, base.get_submodule(HEAD[family]).weight)


@pytest.fixture
def gpt_adapter(tmp_path, tokenizers):
    base_dir = _save_base(tmp_path, "gpt", "causal", tokenizers["gpt"])
    adapter_dir, _ = _save_adapter(tmp_path, "gpt", "causal", base_dir)
    return base_dir, adapter_dir


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_not_an_adapter_folder_names_what_is_missing(tmp_path, gpt_adapter, capsys):
    base_dir, adapter_dir = gpt_adapter
    out = tmp_path / "merged"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _merge(empty, "--output-dir", out) == 2
    err = _error(capsys)
    assert "not a LoRA adapter folder" in err and "adapter_config.json" in err and "adapter_model.safetensors" in err

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", no_weights)
    assert _merge(no_weights, "--output-dir", out) == 2
    err = _error(capsys)
    assert "adapter_model.safetensors or adapter_model.bin missing" in err and "adapter_config.json and" not in err

    assert _merge(base_dir, "--output-dir", out) == 2
    assert "holds a full model" in _error(capsys)
    assert _merge(tmp_path / "nowhere", "--output-dir", out) == 2
    assert "no such folder" in _error(capsys)
    assert not out.exists()


def test_unreadable_or_unmergeable_adapter_config(tmp_path, gpt_adapter, capsys):
    _, adapter_dir = gpt_adapter
    out = tmp_path / "merged"
    config_path = adapter_dir / "adapter_config.json"
    good = config_path.read_text()
    config_path.write_text("{not json")
    assert _merge(adapter_dir, "--output-dir", out) == 2
    assert f"{config_path}: not a readable peft adapter config" in _error(capsys)
    prompt = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
              "base_model_name_or_path": json.loads(good)["base_model_name_or_path"]}
    config_path.write_text(json.dumps(prompt))
    assert _merge(adapter_dir, "--output-dir", out) == 2
    assert "no weights to merge" in _error(capsys)
    assert not out.exists()


def test_missing_base_names_the_path_and_base_flag_overrides_it(tmp_path, gpt_adapter, capsys):
    base_dir, adapter_dir = gpt_adapter
    moved = tmp_path / "elsewhere" / "base"
    moved.parent.mkdir()
    base_dir.rename(moved)
    out = tmp_path / "merged"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _merge(adapter_dir, "--output-dir", out) == 2
    err = _error(capsys)
    assert repr(str(base_dir)) in err and "base_model_name_or_path" in err and "--base" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary folder left

    not_a_model = tmp_path / "elsewhere"
    assert _merge(adapter_dir, "--output-dir", out, "--base-model", not_a_model) == 2
    assert "no model in this folder: expected config.json" in _error(capsys)

    assert _merge(adapter_dir, "--output-dir", out, "--base-model", moved) == 0
    assert json.loads((out / "lmforge_merge.json").read_text())["base"] == str(moved)
    assert (out / "tokenizer.json").is_file()  # from the base given with --base


def test_hub_id_that_cannot_be_loaded_offline(tmp_path, gpt_adapter, capsys):
    _, adapter_dir = gpt_adapter
    assert _merge(adapter_dir, "--output-dir", tmp_path / "merged", "--base-model", "nobody/no-such-model") == 2
    err = _error(capsys)
    assert "base model 'nobody/no-such-model' could not be loaded" in err
    assert not (tmp_path / "merged").exists()


def test_existing_output_needs_overwrite_and_inputs_are_never_output(tmp_path, gpt_adapter, capsys):
    base_dir, adapter_dir = gpt_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier model
    (out / "old.txt").write_text("keep me")
    assert _merge(adapter_dir, "--output-dir", out) == 2
    assert "--overwrite" in _error(capsys)
    assert snapshot(out) == {"config.json": b"{}", "old.txt": b"keep me"}

    notes = tmp_path / "notes"  # not a model folder: --overwrite does not empty it
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    assert _merge(adapter_dir, "--output-dir", notes, "--overwrite") == 2
    assert "not a saved model (todo.txt)" in _error(capsys)
    assert snapshot(notes) == {"todo.txt": b"x"}

    adapter_before, base_before = snapshot(adapter_dir), snapshot(base_dir)
    for target in (adapter_dir, base_dir, tmp_path):  # the inputs, or a folder around them
        assert _merge(adapter_dir, "--output-dir", target, "--overwrite") == 2
        assert "is, holds or is inside the input folder" in _error(capsys)
    assert snapshot(adapter_dir) == adapter_before and snapshot(base_dir) == base_before

    assert _merge(adapter_dir, "--output-dir", out, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".merging-" in p.name] == []


def test_run_folder_final_is_found(tmp_path, gpt_adapter):
    _, adapter_dir = gpt_adapter
    run = tmp_path / "run"
    run.mkdir()
    adapter_dir.rename(run / "final")
    assert _merge(run, "--output-dir", tmp_path / "merged") == 0
    assert json.loads((tmp_path / "merged" / "lmforge_merge.json").read_text())["adapter"] == str(run / "final")


def _headless_adapter(tmp: Path, family: str, tok, *, labels: list[str], save_config: bool):
    """The fine-tune flow: a base without a classification head (a causal or masked LM), loaded
    with a new head for ``labels``; LoRA + the new modules trained fully (modules_to_save)."""
    lm_auto = "AutoModelForMaskedLM" if family == "bert" else "AutoModelForCausalLM"
    config = AutoConfig.for_model(**PRESETS[family], vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    base_dir = tmp / "lm-base"
    _auto(lm_auto).from_config(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    id2label = dict(enumerate(labels))
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        problem_type="multi_label_classification", output_loading_info=True)
    new_modules = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    assert HEAD[family] in new_modules
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"] if family == "bert" else
                                                  ["in_proj"], task_type="SEQ_CLS", modules_to_save=new_modules))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.2)
    adapter_dir = tmp / "adapter"
    peft_model.save_pretrained(adapter_dir)
    if save_config:  # the fine-tuned model's config (labels, problem_type) beside the adapter
        model.config.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, peft_model.eval()


@pytest.mark.parametrize("family", ["bert", "mamba"])
@pytest.mark.parametrize("save_config", [True, False], ids=["labels-from-config", "labels-from-head"])
def test_new_head_on_a_base_without_one(tmp_path, tokenizers, family, save_config):
    labels = ["comedy", "history", "tragedy", "romance"]  # not the base config's default of 2 labels
    base_dir, adapter_dir, peft_model = _headless_adapter(tmp_path, family, tokenizers[family], labels=labels,
                                                          save_config=save_config)
    out = tmp_path / "merged"
    assert _merge(adapter_dir, "--output-dir", out) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.num_labels == len(labels)
    if save_config:
        assert list(merged.config.id2label.values()) == labels
        assert merged.config.problem_type == "multi_label_classification"
    batch = _batch(AutoTokenizer.from_pretrained(out))
    torch.testing.assert_close(_logits(merged, batch), _logits(peft_model, batch), atol=1e-5, rtol=0)


def test_adapter_without_the_head_the_base_lacks_is_refused(tmp_path, tokenizers, capsys):
    from safetensors.torch import load_file, save_file

    base_dir, adapter_dir, _ = _headless_adapter(tmp_path, "bert", tokenizers["bert"], labels=["a", "b"],
                                                 save_config=False)
    weights = adapter_dir / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".classifier." not in k}, weights)
    out = tmp_path / "merged"
    assert _merge(adapter_dir, "--output-dir", out) == 2
    err = _error(capsys)
    assert "has no weights for classifier.bias, classifier.weight" in err and "modules_to_save" in err
    assert not out.exists()


def test_help_and_required_output(capsys):
    with pytest.raises(SystemExit) as info:
        main(["merge", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("ADAPTER", "--output-dir", "--base-model", "--overwrite")), out
    assert main(["merge", "somewhere"]) == 2
    assert "the following arguments are required: --output-dir" in capsys.readouterr().err
