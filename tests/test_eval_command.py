"""``lmforge eval``: strided perplexity, bits per byte, next-token and masked-token accuracy,
model folders of every kind, --compare / --output, and bad input (exit code 2, nothing written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch.nn import functional as F

import lmforge.models  # noqa: F401  (registers the lmforge families)
from lmforge.cli import main
from lmforge.data.collators import MLMCollator
from lmforge.data.packing import pack
from lmforge.data.pipeline import separator_id
from lmforge.errors import LmforgeError
from lmforge.eval.lm import evaluate_lm_strided, evaluate_mlm, joined_ids, strided_windows
from lmforge.eval.perplexity import token_byte_lengths
from tests.train_fixtures import PRESETS, bert_tokenizer, gpt_tokenizer, make_corpus

TEXTS = make_corpus(5, seed=7, max_words=6)  # 61 tokens: one window of 64, several of 6-12


def _config(family: str, tokenizer, **changes):
    values = {**PRESETS[family], **changes}
    special = {k: getattr(tokenizer, k) for k in ("pad_token_id", "eos_token_id") if getattr(tokenizer, k) is not None}
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values, **special, vocab_size=len(tokenizer))


def _fit(model, batches, steps: int = 20, lr: float = 2e-2):
    """A few optimizer steps so that the model predicts better than chance (accuracy > 0)."""
    torch.manual_seed(0)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    return model.eval()


def _causal_batches(tokenizer, n: int = 8, length: int = 32):
    ids = torch.from_numpy(joined_ids(tokenizer, make_corpus(200, seed=1)))
    rows = ids[: (ids.numel() // length) * length].view(-1, length)
    return [{"input_ids": rows[i:i + n], "labels": rows[i:i + n]} for i in range(0, min(len(rows), 64), n)]


@pytest.fixture(scope="module")
def gpt_tok():
    return gpt_tokenizer(make_corpus(200))


@pytest.fixture(scope="module")
def bert_tok():
    return bert_tokenizer(make_corpus(200))


@pytest.fixture(scope="module")
def gpt(gpt_tok):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("gpt", gpt_tok))
    return _fit(model, _causal_batches(gpt_tok))


@pytest.fixture(scope="module")
def mamba(gpt_tok):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_config("mamba", gpt_tok)).eval()


@pytest.fixture(scope="module")
def bert(bert_tok):
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(_config("bert", bert_tok))
    tokens = [bert_tok(t, add_special_tokens=False)["input_ids"] for t in make_corpus(200, seed=1)]
    rows = pack(tokens, 32, separator_id(bert_tok))
    rows = [dict(zip(rows, r, strict=True)) for r in zip(*rows.values(), strict=True)]
    collate = MLMCollator(bert_tok, seed=1)
    batches = [collate(rows[i:i + 8]) for i in range(0, min(len(rows), 128), 8)]
    batches = [{k: v for k, v in b.items() if k != "seq_idx"} for b in batches]
    return _fit(model, batches, steps=40)


# --------------------------------------------------------------------------- strided perplexity


def _full_context(model, ids: np.ndarray, byte_lengths: torch.Tensor) -> dict[str, float]:
    """One forward pass over the whole token sequence, every next token scored."""
    x = torch.from_numpy(ids)[None]
    with torch.no_grad():
        logits = model(x).logits[0, :-1].float()
    targets = x[0, 1:]
    nll = F.cross_entropy(logits, targets, reduction="sum").item()
    nbytes = int(byte_lengths[targets].sum())
    return {"loss": nll / targets.numel(), "tokens": targets.numel(), "bytes": nbytes,
            "bits_per_byte": nll / math.log(2) / nbytes,
            "next_token_accuracy": (logits.argmax(-1) == targets).float().mean().item()}


def _sliding_by_hand(model, ids: np.ndarray, max_length: int, stride: int) -> dict[str, float]:
    """The definition, one target at a time: target t is scored by the first window (start k*stride,
    max_length inputs) whose inputs reach position t-1, with that window's tokens before t as context."""
    nll, correct = 0.0, 0
    for t in range(1, ids.size):
        k = max(0, (t - 1 - max_length) // stride + 1)
        context = torch.from_numpy(ids[k * stride: t])[None]
        assert 1 <= context.shape[1] <= max_length
        with torch.no_grad():
            logits = model(context).logits[0, -1].float()
        nll += F.cross_entropy(logits[None], torch.tensor([int(ids[t])])).item()
        correct += int(logits.argmax()) == int(ids[t])
    n = ids.size - 1
    return {"loss": nll / n, "next_token_accuracy": correct / n, "tokens": n}


@pytest.mark.parametrize("max_length", [None, "exact"])
def test_one_window_equals_the_full_context_figure(gpt, gpt_tok, max_length):
    ids = joined_ids(gpt_tok, TEXTS)
    assert ids.size <= 64  # the model's context: one window covers the text
    length = ids.size - 1 if max_length == "exact" else None  # N-1 inputs predict the N-1 targets
    got = evaluate_lm_strided(gpt, gpt_tok, TEXTS, max_length=length, batch_size=4, progress=False)
    want = _full_context(gpt, ids, token_byte_lengths(gpt_tok, gpt.config.vocab_size))
    assert got["tokens"] == want["tokens"] == ids.size - 1
    assert got["bytes"] == want["bytes"]
    for key in ("loss", "bits_per_byte", "next_token_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert got["perplexity"] == pytest.approx(math.exp(want["loss"]), rel=1e-5)
    assert 0 < got["next_token_accuracy"] < 1  # the fitted model predicts some tokens, not all


@pytest.mark.parametrize("max_length, stride, batch_size", [(8, 3, 4), (8, 8, 1), (12, 5, 3), (6, 1, 16)])
def test_strided_windows_match_the_definition_by_hand(gpt, gpt_tok, max_length, stride, batch_size):
    ids = joined_ids(gpt_tok, TEXTS)
    got = evaluate_lm_strided(gpt, gpt_tok, TEXTS, max_length=max_length, stride=stride,
                              batch_size=batch_size, progress=False)
    want = _sliding_by_hand(gpt, ids, max_length, stride)
    assert got["tokens"] == want["tokens"] == ids.size - 1
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["next_token_accuracy"] == pytest.approx(want["next_token_accuracy"])
    assert (got["max_length"], got["stride"]) == (max_length, stride)


def test_strided_mamba_matches_the_definition_by_hand(mamba, gpt_tok):
    ids = joined_ids(gpt_tok, TEXTS)
    got = evaluate_lm_strided(mamba, gpt_tok, TEXTS, max_length=10, stride=4, batch_size=2, progress=False)
    want = _sliding_by_hand(mamba, ids, 10, 4)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["next_token_accuracy"] == pytest.approx(want["next_token_accuracy"])


def test_less_context_is_a_different_figure(gpt, gpt_tok):
    full = evaluate_lm_strided(gpt, gpt_tok, TEXTS, progress=False)
    windows = evaluate_lm_strided(gpt, gpt_tok, TEXTS, max_length=6, progress=False)
    overlapping = evaluate_lm_strided(gpt, gpt_tok, TEXTS, max_length=6, stride=2, progress=False)
    assert full["tokens"] == windows["tokens"] == overlapping["tokens"]
    assert len({round(r["loss"], 6) for r in (full, windows, overlapping)}) == 3


@pytest.mark.parametrize("n_tokens", [2, 3, 10, 57])
@pytest.mark.parametrize("max_length, stride", [(1, 1), (4, 1), (4, 3), (4, 4), (7, 5), (64, 64)])
def test_every_token_is_scored_exactly_once(n_tokens, max_length, stride):
    windows = strided_windows(n_tokens, max_length, stride)
    scored = [p for _, end, first in windows for p in range(first, end)]
    assert scored == list(range(n_tokens - 1))  # positions 0..N-2 predict tokens 1..N-1, once each
    for k, (begin, end, first) in enumerate(windows):
        assert begin == k * stride and 0 < end - begin <= max_length and begin <= first < end
        if k:  # every scored position sees at least max_length - stride + 1 tokens of its window
            assert first - begin >= max_length - stride


def test_bits_per_byte_is_the_loss_over_the_bytes(gpt, gpt_tok):
    got = evaluate_lm_strided(gpt, gpt_tok, TEXTS, max_length=16, stride=8, progress=False)
    assert got["bits_per_byte"] == pytest.approx(got["loss"] * got["tokens"] / math.log(2) / got["bytes"], rel=1e-9)
    # byte-level BPE: the targets cover all the text but the first token's bytes; separators none
    ids = joined_ids(gpt_tok, TEXTS)
    first = len(gpt_tok.convert_ids_to_tokens(int(ids[0])))
    assert got["bytes"] == sum(len(t.encode("utf-8")) for t in TEXTS) - first


def test_processes_share_the_windows_and_sum_to_one_process(gpt, gpt_tok):
    class FakeAccelerator:  # rank r of 2; reduce adds what the other rank computed
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, rank, other=None):
            self.process_index, self.other, self.seen = rank, other, None

        def reduce(self, totals, reduction):
            assert reduction == "sum"
            self.seen = totals.clone()
            return totals + self.other if self.other is not None else totals

    common = dict(max_length=8, stride=3, batch_size=2, progress=False)
    rank1 = FakeAccelerator(1)
    evaluate_lm_strided(gpt, gpt_tok, TEXTS, accelerator=rank1, **common)
    both = evaluate_lm_strided(gpt, gpt_tok, TEXTS, accelerator=FakeAccelerator(0, rank1.seen), **common)
    one = evaluate_lm_strided(gpt, gpt_tok, TEXTS, **common)
    assert 0 < rank1.seen[1] < one["tokens"]
    assert both["tokens"] == one["tokens"]
    assert both["loss"] == pytest.approx(one["loss"], rel=1e-9)


# --------------------------------------------------------------------------- masked LM


def test_masked_accuracy_by_hand(bert, bert_tok):
    texts = make_corpus(30, seed=9, max_words=30)
    got = evaluate_mlm(bert, bert_tok, texts, max_length=32, batch_size=3, seed=5, progress=False)
    # by hand: the same packed rows and masks, one batch, argmax at the masked positions
    tokens = [bert_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = pack(tokens, 32, separator_id(bert_tok), pad_id=bert_tok.pad_token_id)
    batch = MLMCollator(bert_tok, seed=5)([dict(zip(rows, r, strict=True)) for r in zip(*rows.values(), strict=True)])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = bert(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    mask = labels != -100
    assert got["masked_tokens"] == int(mask.sum()) > 0
    assert got["tokens"] == sum(map(len, tokens)) + len(tokens)  # each text + its separator
    assert got["masked_accuracy"] == pytest.approx((logits[mask].argmax(-1) == labels[mask]).float().mean().item())
    assert got["loss"] == pytest.approx(F.cross_entropy(logits[mask], labels[mask]).item(), rel=1e-5)
    assert 0 < got["masked_accuracy"] < 1
    again = evaluate_mlm(bert, bert_tok, texts, max_length=32, batch_size=8, seed=5, progress=False)
    assert again == pytest.approx(got)  # fixed-seed masking: the batch size changes nothing
    other = evaluate_mlm(bert, bert_tok, texts, max_length=32, seed=6, progress=False)
    assert other["loss"] != pytest.approx(got["loss"])


# --------------------------------------------------------------------------- model folders (CLI)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for split, seed in (("train", 1), ("test", 2)):
        rows = [json.dumps({"text": t}) for t in make_corpus(10, seed=seed, max_words=15)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _texts(data_dir: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (data_dir / "test.jsonl").read_text().splitlines()]


def _run(args: list[str], out: Path) -> dict:
    assert main(["eval", *map(str, args), "--output-json", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_run_folder_and_saved_model(gpt, gpt_tok, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _save(gpt, gpt_tok, run / "final")
    (run / "checkpoints").mkdir()
    (run / "config.yaml").write_text("objective: causal\n")
    result = _run([run, "--data", data_dir, "--max-length", 16, "--stride", 8], tmp_path / "r.json")
    want = evaluate_lm_strided(gpt, gpt_tok, _texts(data_dir), max_length=16, stride=8, progress=False)
    (row,) = result["models"]
    assert row["name"] == "run" and row["path"] == str(run / "final") and row["task"] == "causal"
    assert row["loss"] == pytest.approx(want["loss"], rel=1e-6) and row["tokens"] == want["tokens"]
    assert result["split"] == "test" and result["data"] == str(data_dir)
    out = capsys.readouterr().out
    assert "perplexity" in out and "bits_per_byte" in out and "next_token_accuracy" in out
    saved = _run([run / "final", "--data", data_dir, "--max-length", 16, "--stride", 8], tmp_path / "s.json")
    assert saved["models"][0]["loss"] == pytest.approx(row["loss"], rel=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stock_transformers_models(gpt_tok, data_dir, tmp_path, family):
    ids = {"bos_token_id": gpt_tok.eos_token_id, "eos_token_id": gpt_tok.eos_token_id}
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(gpt_tok), n_positions=32, n_embd=32, n_layer=2, n_head=4, **ids)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=len(gpt_tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=32, **ids)
        model = transformers.LlamaForCausalLM(config)
    folder = _save(model.eval(), gpt_tok, tmp_path / family)
    (row,) = _run([folder, "--data", data_dir, "--stride", 16], tmp_path / "r.json")["models"]
    want = evaluate_lm_strided(model, gpt_tok, _texts(data_dir), max_length=32, stride=16, progress=False)
    assert row["task"] == "causal" and row["max_length"] == 32  # the model's context by default
    assert row["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert row["tokens"] == want["tokens"]
    # and the definition by hand on the stock model too
    got = evaluate_lm_strided(model, gpt_tok, TEXTS[:2], max_length=8, stride=3, batch_size=3, progress=False)
    hand = _sliding_by_hand(model, joined_ids(gpt_tok, TEXTS[:2]), 8, 3)
    assert got["loss"] == pytest.approx(hand["loss"], rel=1e-5) and got["tokens"] == hand["tokens"]


def test_stock_bert_masked_lm(bert_tok, data_dir, tmp_path):
    config = transformers.BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, pad_token_id=bert_tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    folder = _save(model, bert_tok, tmp_path / "bert")
    (row,) = _run([folder, "--data", data_dir, "--seed", 3], tmp_path / "r.json")["models"]
    want = evaluate_mlm(model, bert_tok, _texts(data_dir), seed=3, progress=False)
    assert row["task"] == "mlm" and row["max_length"] == 32
    assert row["masked_tokens"] == want["masked_tokens"] > 0
    assert row["masked_accuracy"] == pytest.approx(want["masked_accuracy"])
    assert row["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_compare_writes_both_models(gpt, mamba, bert, gpt_tok, bert_tok, data_dir, tmp_path, capsys):
    a = _save(gpt, gpt_tok, tmp_path / "gpt")
    b = _save(mamba, gpt_tok, tmp_path / "mamba")
    c = _save(bert, bert_tok, tmp_path / "bert")
    result = _run([a, "--data", data_dir, "--max-length", 16, "--compare", b, c], tmp_path / "cmp.json")
    names = [m["name"] for m in result["models"]]
    assert names == ["gpt", "mamba", "bert"]
    assert [m["task"] for m in result["models"]] == ["causal", "causal", "mlm"]
    texts = _texts(data_dir)
    for model, row in ((gpt, result["models"][0]), (mamba, result["models"][1])):
        assert row["loss"] == pytest.approx(evaluate_lm_strided(model, gpt_tok, texts, max_length=16,
                                                                progress=False)["loss"], rel=1e-6)
    mlm = evaluate_mlm(bert, bert_tok, texts, max_length=16, progress=False)
    assert result["models"][2]["masked_accuracy"] == pytest.approx(mlm["masked_accuracy"])
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "gpt" in line and "mamba" in line)
    assert header.index("gpt") < header.index("mamba") < header.index("bert")  # side by side


def test_lora_adapter_folder(gpt, gpt_tok, data_dir, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    base = _save(gpt, gpt_tok, tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    gpt_tok.save_pretrained(adapter)
    (row,) = _run([adapter, "--data", data_dir, "--max-length", 16], tmp_path / "r.json")["models"]
    peft_model.eval()
    want = evaluate_lm_strided(peft_model, gpt_tok, _texts(data_dir), max_length=16, progress=False)
    plain = evaluate_lm_strided(gpt, gpt_tok, _texts(data_dir), max_length=16, progress=False)
    assert row["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert row["loss"] != pytest.approx(plain["loss"], rel=1e-4)  # the adapter is applied


def test_classifier_folder(bert_tok, tmp_path):
    pytest.importorskip("lmforge.data.classification")
    config = _config("bert", bert_tok, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    folder = _save(model, bert_tok, tmp_path / "clf")
    texts = make_corpus(13, seed=4, max_words=10)
    labels = ["pos" if "love" in t or "sweet" in t else "neg" for t in texts]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n"
                                                 for t, y in zip(texts, labels, strict=True)))
    args = [folder, "--data", tmp_path / "test.jsonl", "--text-column", "sentence", "--label-column", "y",
            "--batch-size", 4]
    (row,) = _run(args, tmp_path / "r.json")["models"]
    enc = bert_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    predicted = logits.argmax(-1)
    truth = torch.tensor([config.label2id[y] for y in labels])
    assert row["task"] == "classification"
    assert row["accuracy"] == pytest.approx((predicted == truth).float().mean().item())
    assert row["loss"] == pytest.approx(F.cross_entropy(logits, truth).item(), rel=1e-4)
    assert {"macro_f1", "matthews_correlation"} <= set(row)


def _lora_classifier(bert, bert_tok, folder: Path, names: dict[int, str], modules: list[str]):
    """What a LoRA classification fine-tune leaves in final/: the adapter, the new modules (trained
    fully: modules_to_save) and the tokenizer; the base is a masked LM without a classifier."""
    from peft import LoraConfig, TaskType, get_peft_model

    base = _save(bert, bert_tok, folder / "base")
    torch.manual_seed(1)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=names, label2id={v: k for k, v in names.items()})
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"], modules_to_save=modules,
                      init_lora_weights=False)
    peft_model = get_peft_model(model, lora).eval()
    peft_model.save_pretrained(folder / "adapter")
    bert_tok.save_pretrained(folder / "adapter")
    return peft_model, folder / "adapter"


@pytest.mark.parametrize("labels_saved", [False, True])
def test_lora_classifier_on_a_base_without_head(bert, bert_tok, tmp_path, labels_saved):
    pytest.importorskip("lmforge.data.classification")
    names = {0: "neg", 1: "pos"} if labels_saved else {0: "0", 1: "1"}
    peft_model, adapter = _lora_classifier(bert, bert_tok, tmp_path, names, ["classifier", "pooler.dense"])
    if labels_saved:
        peft_model.config.save_pretrained(adapter)  # config.json beside the adapter: the label names
    texts = make_corpus(11, seed=4, max_words=10)
    truth = [int("love" in t or "sweet" in t) for t in texts]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": names[y] if labels_saved else y}) + "\n"
                                                 for t, y in zip(texts, truth, strict=True)))
    (row,) = _run([adapter, "--data", tmp_path / "test.jsonl", "--batch-size", 4], tmp_path / "r.json")["models"]
    enc = bert_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = peft_model(**enc).logits
    assert row["task"] == "classification"
    assert row["accuracy"] == pytest.approx((logits.argmax(-1) == torch.tensor(truth)).float().mean().item())
    assert row["loss"] == pytest.approx(F.cross_entropy(logits, torch.tensor(truth)).item(), rel=1e-4)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def saved_gpt(gpt, gpt_tok, tmp_path_factory):
    return _save(gpt, gpt_tok, tmp_path_factory.mktemp("models") / "gpt")


def _fails(args: list, capsys, tmp_path) -> str:
    out = tmp_path / "never.json"
    assert main(["eval", *map(str, args), "--output-json", str(out), "--no-progress"]) == 2
    assert not out.exists()  # nothing written
    err = capsys.readouterr().err  # (after any "Loading weights" progress bar)
    assert err.splitlines()[-1].startswith("lmforge: error: ") and "Traceback" not in err
    return err


def test_folder_without_a_model(tmp_path, data_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    err = _fails([tmp_path / "empty", "--data", data_dir], capsys, tmp_path)
    assert f"{tmp_path / 'empty'}: no model in this folder" in err and "notes.txt" in err
    assert "config.json" in err and "final/" in err
    err = _fails([tmp_path / "nowhere", "--data", data_dir], capsys, tmp_path)
    assert "nowhere: no such folder" in err
    run = tmp_path / "unfinished"
    (run / "checkpoints").mkdir(parents=True)
    assert "no final/ model yet" in _fails([run, "--data", data_dir], capsys, tmp_path)


def test_a_compared_folder_is_checked_before_any_work(saved_gpt, tmp_path, data_dir, capsys):
    err = _fails([saved_gpt, "--data", data_dir, "--compare", tmp_path / "missing"], capsys, tmp_path)
    assert "missing: no such folder" in err


def test_unknown_split(saved_gpt, tmp_path, data_dir, capsys):
    err = _fails([saved_gpt, "--data", data_dir, "--split", "dev"], capsys, tmp_path)
    assert "split 'dev' not found" in err and "available splits: test, train" in err
    err = _fails([saved_gpt, "--data", "shakespeare", "--split", "dev"], capsys, tmp_path)
    assert "unknown split 'dev'" in err and "train, validation, test" in err


@pytest.mark.parametrize("flags, message", [
    (["--stride", "0"], "--stride must be a positive number of tokens, got 0"),
    (["--stride", "-3"], "--stride must be a positive number of tokens, got -3"),
    (["--stride", "20", "--max-length", "16"], "--stride 20 is larger than --max-length 16"),
    (["--stride", "65"], "--stride 65 is larger than --max-length 64"),  # the model's context
    (["--max-length", "1"], "--max-length must be at least 2 tokens, got 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--task", "classification"], "--task classification, but the model has no classification head"),
])
def test_bad_flags(saved_gpt, tmp_path, data_dir, capsys, flags, message):
    assert message in _fails([saved_gpt, "--data", data_dir, *flags], capsys, tmp_path)


def test_task_lm_on_a_classifier(bert_tok, data_dir, tmp_path, capsys):
    folder = tmp_path / "clf"
    _config("bert", bert_tok, num_labels=2, architectures=["LmforgeBertForSequenceClassification"]).save_pretrained(folder)
    err = _fails([folder, "--data", data_dir, "--task", "lm"], capsys, tmp_path)
    assert "--task lm, but the model is a sequence classifier (LmforgeBertForSequenceClassification)" in err


def test_max_length_beyond_learned_positions(gpt_tok, data_dir, tmp_path, capsys):
    config = transformers.GPT2Config(vocab_size=len(gpt_tok), n_positions=16, n_embd=32, n_layer=1, n_head=4)
    folder = _save(transformers.GPT2LMHeadModel(config), gpt_tok, tmp_path / "gpt2")
    err = _fails([folder, "--data", data_dir, "--max-length", 32], capsys, tmp_path)
    assert "--max-length 32 is longer than the model's context of 16 positions" in err


def test_empty_data(saved_gpt, tmp_path, capsys):
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    err = _fails([saved_gpt, "--data", tmp_path / "blank.jsonl"], capsys, tmp_path)
    assert "no text to evaluate on" in err and "blank.jsonl" in err
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl: the file is empty" in _fails([saved_gpt, "--data", tmp_path / "empty.jsonl"], capsys, tmp_path)


def test_library_errors_are_lmforge_errors(gpt, gpt_tok):
    with pytest.raises(LmforgeError, match="no text to evaluate on"):
        evaluate_lm_strided(gpt, gpt_tok, ["", ""], progress=False)
    with pytest.raises(LmforgeError, match="--stride 9 is larger than --max-length 8"):
        evaluate_lm_strided(gpt, gpt_tok, TEXTS, max_length=8, stride=9, progress=False)


def test_adapter_without_its_new_modules(bert, bert_tok, tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text('{"text": "the king", "label": 1}\n')
    _, adapter = _lora_classifier(bert, bert_tok, tmp_path, {0: "0", 1: "1"}, ["classifier"])  # no pooler
    err = _fails([adapter, "--data", tmp_path / "test.jsonl"], capsys, tmp_path)
    assert "has no weights for bert.pooler.dense.bias, bert.pooler.dense.weight" in err
    assert "random weights" in err
