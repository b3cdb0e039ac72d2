"""A saved lmforge BERT loads with trust_remote_code where lmforge cannot be imported, and serves
``pipeline("fill-mask")`` with a WordPiece tokenizer trained by lmforge."""

import json

import torch
from transformers import PreTrainedTokenizerFast

from lmforge.models import (
    LmforgeBertConfig,
    LmforgeBertForMaskedLM,
    LmforgeBertForSequenceClassification,
)
from lmforge.tokenizers import train_tokenizer
from tests.export_utils import run_isolated

TEXT = ["to be , or not to be , that is the question .",
        "whether tis nobler in the mind to suffer the slings and arrows of outrageous fortune ."]


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """lmforge's WordPiece trainer with the BERT preset ([CLS] A [SEP], [MASK], token types), uncased."""
    return train_tokenizer(TEXT * 5, algorithm="wordpiece", vocab_size=120, special_tokens="bert", lowercase=True,
                           min_frequency=1, model_max_length=128, show_progress=False)


def _train_mlm(model: LmforgeBertForMaskedLM, tok: PreTrainedTokenizerFast, steps: int = 30) -> None:
    """Memorise TEXT (every word masked in turn), so fill-mask has a clear answer."""
    batch = tok(TEXT, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (mask == 0)
    rows, positions = (~special).nonzero(as_tuple=True)  # one example per maskable token
    inputs, labels = ids[rows].clone(), torch.full_like(ids[rows], -100)
    example = torch.arange(len(rows))
    labels[example, positions] = ids[rows, positions]
    inputs[example, positions] = tok.mask_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=inputs, attention_mask=mask[rows], labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_saved_bert_loads_without_lmforge_and_fills_masks(tmp_path):
    tok = wordpiece_tokenizer()
    assert tok("to be")["token_type_ids"] == [0, 0, 0, 0]
    config = LmforgeBertConfig.from_preset("classic-debug", vocab_size=len(tok), hidden_size=48,
                                           pad_token_id=tok.pad_token_id, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    mlm = LmforgeBertForMaskedLM(config)
    _train_mlm(mlm, tok)
    mlm_dir, clf_dir = tmp_path / "mlm", tmp_path / "clf"
    mlm.save_pretrained(mlm_dir)
    tok.save_pretrained(mlm_dir)
    clf_config = LmforgeBertConfig.from_preset("debug", num_key_value_heads=2, num_labels=3)  # modern preset
    clf = LmforgeBertForSequenceClassification(clf_config).eval()
    clf.save_pretrained(clf_dir)

    saved = json.loads((mlm_dir / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForMaskedLM"] == "modeling_bert.LmforgeBertForMaskedLM"
    assert saved["auto_map"]["AutoModelForSequenceClassification"] == "modeling_bert.LmforgeBertForSequenceClassification"
    shared = ("switches.py", "norms.py", "positions.py", "attention.py", "feed_forward.py", "block.py", "dropout.py",
              "losses.py", "initialization.py", "compat.py", "registration.py")  # imported siblings
    for name in ("model.safetensors", "modeling_bert.py", "configuration_bert.py", *shared):
        assert (mlm_dir / name).is_file(), name

    prompt = "to be , or not to [MASK] , that is the question ."
    enc = tok(prompt, return_tensors="pt")
    clf_ids = torch.tensor([[2, 17, 30, 41, 3], [2, 9, 3, 0, 0]])
    clf_mask = (clf_ids != 0).long()
    with torch.no_grad():
        mlm_logits = mlm(**enc).logits[0]
        clf_logits = clf(input_ids=clf_ids, attention_mask=clf_mask).logits
    where = enc["input_ids"][0].tolist().index(tok.mask_token_id)
    assert tok.convert_ids_to_tokens(int(mlm_logits[where].argmax())) == "be"  # the model learned TEXT

    got = run_isolated(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline
        mlm = AutoModelForMaskedLM.from_pretrained(PATH, trust_remote_code=True).eval()
        assert type(mlm).__module__.startswith("transformers_modules"), type(mlm).__module__
        ids = torch.tensor([{enc["input_ids"][0].tolist()}])
        with torch.no_grad():
            mlm_logits = mlm(input_ids=ids).logits[0].tolist()
        enc_only = AutoModel.from_pretrained(PATH, trust_remote_code=True)
        head = AutoModelForSequenceClassification.from_pretrained(PATH, trust_remote_code=True, num_labels=2)
        clf = AutoModelForSequenceClassification.from_pretrained({str(clf_dir)!r}, trust_remote_code=True).eval()
        clf_ids = torch.tensor({clf_ids.tolist()})
        with torch.no_grad():
            clf_logits = clf(input_ids=clf_ids, attention_mask=(clf_ids != 0).long()).logits.tolist()
        fill = pipeline("fill-mask", model=PATH, trust_remote_code=True)
        top = fill({prompt!r}, top_k=3)
        emit({{"mlm_logits": mlm_logits, "clf_logits": clf_logits, "top": top,
               "base": type(enc_only).__name__, "head": type(head).__name__,
               "same_encoder": bool(torch.equal(head.bert.layers[0].mlp.up_proj.weight,
                                                mlm.bert.layers[0].mlp.up_proj.weight))}})
        """,
        path=mlm_dir,
    )
    torch.testing.assert_close(torch.tensor(got["mlm_logits"]), mlm_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(got["clf_logits"]), clf_logits, atol=1e-6, rtol=0)
    assert (got["base"], got["head"]) == ("LmforgeBertModel", "LmforgeBertForSequenceClassification")
    assert got["same_encoder"]
    assert got["top"][0]["token_str"] == "be"
    assert got["top"][0]["sequence"].startswith("to be, or not to be")
    assert got["top"][0]["score"] > got["top"][1]["score"]
