"""Labelled data for sequence classification (lmforge.data.classification): loading every column
of a split, inferring the label mapping from the training split, encoding texts, pairs and
labels, collating; and each bad input refused with a message naming the data, the row or column
and what would be valid."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from lmforge.data.batches import eval_batches
from lmforge.data.classification import (
    ClassificationCollator,
    LabelSpec,
    encode_classification,
    infer_label_spec,
    label_name,
    load_labelled,
)
from lmforge.errors import LmforgeError
from tests.pipeline_fixtures import bert_tokenizer, gpt_tokenizer

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"


@pytest.fixture(scope="module")
def bert():
    """The WordPiece fixture with BERT's post-processor: [CLS] A [SEP] B [SEP], token types 0/1."""
    base = bert_tokenizer()
    tok = Tokenizer.from_str(base.backend_tokenizer.to_str())
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


@pytest.fixture(scope="module")
def gpt():
    return gpt_tokenizer()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A split-aware folder: sentence pairs with string labels, a score, and a column named text."""
    rows = {
        "train": [("the king speaks", "a lord listens", "yes", 0.5), ("thou art fair", "the night is foul", "no", 1.25),
                  ("sweet love", "sweet death", "maybe", 2.0), ("the queen", "the crown", "yes", 0.0)],
        "validation": [("the lady", "the lord", "no", 1.0), ("a sword", "blood", "yes", 3.5)],
        "test": [("day", "night", "perhaps", 0.25)],
    }
    for split, items in rows.items():
        _write_jsonl(tmp_path / "pairs" / f"{split}.jsonl",
                     [{"premise": a, "hypothesis": b, "verdict": v, "score": s, "text": f"note {i}"}
                      for i, (a, b, v, s) in enumerate(items)])
    return tmp_path / "pairs"


# --------------------------------------------------------------------------- loading


def test_load_labelled_keeps_every_column_of_the_split(folder):
    ds = load_labelled(str(folder), "validation", text_column="premise", text_pair_column="hypothesis",
                       label_column="verdict")
    assert ds.column_names == ["premise", "hypothesis", "verdict", "score", "text"]  # names unchanged
    assert ds["premise"] == ["the lady", "a sword"] and ds["verdict"] == ["no", "yes"]
    unlabelled = load_labelled(str(folder), "test", text_column="premise")
    assert len(unlabelled) == 1


def test_builtin_rotten_tomatoes_labels_and_ratings():
    ds = load_labelled("rotten-tomatoes", "test", text_column="text", label_column="label")
    assert {"text", "label", "rating"} <= set(ds.column_names) and len(ds) > 1000
    spec = infer_label_spec(ds, "label", where="rotten-tomatoes (test split)")
    assert spec == LabelSpec(SINGLE, ["0", "1"])
    assert infer_label_spec(ds, "rating", where="rotten-tomatoes (test split)") == LabelSpec(REGRESSION, [])


def test_csv_file_with_string_labels(tmp_path, bert):
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        writer.writerows([["the king is fair", "positive"], ["foul night", "negative"], ["sweet love", "positive"]])
    ds = load_labelled(str(path), "train", text_column="review", label_column="sentiment")
    spec = infer_label_spec(ds, "sentiment", where=str(path))
    assert spec.labels == ["negative", "positive"] and spec.label2id == {"negative": 0, "positive": 1}
    enc = encode_classification(ds, bert, spec, text_column="review", label_column="sentiment", max_length=16,
                                where=str(path))
    assert enc["labels"] == [1, 0, 1]


@pytest.mark.parametrize("role,missing,kwargs", [
    ("text column", "sentence", {"text_column": "sentence"}),
    ("text pair column", "hypothesis2", {"text_column": "premise", "text_pair_column": "hypothesis2"}),
    ("label column", "label", {"text_column": "premise", "label_column": "label"}),
])
def test_missing_column_lists_the_columns_that_exist(folder, role, missing, kwargs):
    with pytest.raises(LmforgeError) as e:
        load_labelled(str(folder), "train", **kwargs)
    assert str(e.value) == (f"{folder} (train split): no {role} {missing!r}; the columns are premise, hypothesis, "
                            "verdict, score, text")


def test_text_column_must_hold_text(folder):
    with pytest.raises(LmforgeError, match=r"text column 'score' holds float64, not text"):
        load_labelled(str(folder), "train", text_column="score", label_column="verdict")


@pytest.mark.parametrize("bad,column", [("", "premise"), ("   \n\t", "premise"), (None, "premise"),
                                        ("", "hypothesis")])
def test_empty_texts_are_refused_naming_the_row(tmp_path, bad, column):
    rows = [{"premise": "the king", "hypothesis": "a lord", "label": 1} for _ in range(5)]
    rows[2][column] = bad
    rows[4][column] = bad
    path = _write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    with pytest.raises(LmforgeError) as e:
        load_labelled(str(path.parent), "train", text_column="premise", text_pair_column="hypothesis",
                      label_column="label")
    assert f"(train split): row 2 (counting from 0) (and 1 more rows) has an empty text in column {column!r}" in str(e.value)
    with pytest.raises(LmforgeError, match="row 2 "):  # encoding a dataset from elsewhere checks too
        encode_classification(_dataset(rows), gpt_tokenizer(), LabelSpec(SINGLE, ["0", "1"]), text_column="premise",
                              text_pair_column="hypothesis", label_column="label", max_length=16, where="rows")


def test_missing_label_is_refused_naming_the_row(tmp_path):
    path = _write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}, {"text": "c", "label": "y"}])
    with pytest.raises(LmforgeError, match=r"row 1 \(counting from 0\) has no value in label column 'label'"):
        load_labelled(str(path.parent), "train", text_column="text", label_column="label")


def test_unknown_split_is_reported():
    with pytest.raises(LmforgeError, match="unknown split 'dev'"):
        load_labelled("rotten-tomatoes", "dev", text_column="text", label_column="label")


# --------------------------------------------------------------------------- the label mapping


@pytest.mark.parametrize("values,problem_type,labels", [
    (["pos", "neg", "pos", "neutral"], SINGLE, ["neg", "neutral", "pos"]),
    ([10, 2, 1, 2], SINGLE, ["1", "2", "10"]),  # ints sort numerically
    ([True, False, True], SINGLE, ["False", "True"]),
    ([1.0, 0.0, 2.0], SINGLE, ["0", "1", "2"]),  # integral floats (a CSV column with gaps) are classes
    ([0.5, 1.0, -2.25], REGRESSION, []),
    ([["b", "a"], [], ["c"], ["a"]], MULTI, ["a", "b", "c"]),
    ([[3, 1], [20], []], MULTI, ["1", "3", "20"]),
])
def test_infer_label_spec(values, problem_type, labels):
    ds = _dataset([{"text": "x", "label": v} for v in values])
    spec = infer_label_spec(ds, "label", where="data")
    assert spec == LabelSpec(problem_type, labels)
    assert spec.num_labels == (1 if problem_type == REGRESSION else len(labels))
    assert spec.id2label == dict(enumerate(labels)) and spec.label2id == {n: i for i, n in enumerate(labels)}


def test_class_label_columns_use_their_names(bert):
    """Hub datasets store classes as ClassLabel ids: the names (in ClassLabel order) are the labels,
    id -1 ("no label", e.g. GLUE test splits) is a missing label."""
    from datasets import ClassLabel, Dataset, Features, List, Value

    names = ClassLabel(names=["negative", "positive", "neutral"])
    ds = Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]},
                           features=Features({"text": Value("string"), "label": names}))
    spec = infer_label_spec(ds, "label", where="train")
    assert spec == LabelSpec(SINGLE, ["negative", "positive", "neutral"])
    enc = encode_classification(ds, bert, spec, text_column="text", label_column="label", max_length=8, where="train")
    assert enc["labels"] == [1, 0, 1]
    tags = Dataset.from_dict({"text": ["a", "b"], "tags": [[2, 0], []]},
                             features=Features({"text": Value("string"), "tags": List(names)}))
    assert infer_label_spec(tags, "tags", where="train") == LabelSpec(MULTI, ["negative", "positive", "neutral"])
    unlabelled = Dataset.from_dict({"text": ["a", "b"], "label": [-1, -1]},
                                   features=Features({"text": Value("string"), "label": names}))
    with pytest.raises(LmforgeError, match=r"Dataset \(test split\): row 0 \(counting from 0\) \(and 1 more rows\) has no value in label"):
        load_labelled(unlabelled, "test", text_column="text", label_column="label")


def test_problem_type_overrides_the_guess():
    ints = _dataset([{"text": "x", "label": v} for v in (1, 5, 3)])
    assert infer_label_spec(ints, "label", where="data", problem_type=REGRESSION) == LabelSpec(REGRESSION, [])
    with pytest.raises(LmforgeError, match=r"multi_label_classification needs a list of labels per row in column 'label'; row 0 has 1"):
        infer_label_spec(ints, "label", where="data", problem_type=MULTI)
    floats = _dataset([{"text": "x", "label": v} for v in (0.5, 1.0)])
    with pytest.raises(LmforgeError, match="fractional value 0.5, which is no class; use problem_type regression"):
        infer_label_spec(floats, "label", where="data", problem_type=SINGLE)
    strings = _dataset([{"text": "x", "label": v} for v in ("a", "b")])
    with pytest.raises(LmforgeError, match="regression needs a number in label column 'label'; row 0 has 'a'"):
        infer_label_spec(strings, "label", where="data", problem_type=REGRESSION)
    with pytest.raises(LmforgeError, match="problem_type 'ranking' is not one of"):
        infer_label_spec(strings, "label", where="data", problem_type="ranking")


@pytest.mark.parametrize("values,seen", [
    (["yes", "yes", "yes"], "only the class 'yes'"),
    ([1, 1], "only the class '1'"),
    ([["a"], ["a"], []], "only the class 'a'"),
    ([[], []], "no labels at all"),
])
def test_fewer_than_two_classes_is_refused(values, seen):
    ds = _dataset([{"text": "x", "label": v} for v in values])
    with pytest.raises(LmforgeError) as e:
        infer_label_spec(ds, "label", where="train.jsonl (train split)")
    assert str(e.value) == (f"train.jsonl (train split): label column 'label' has {seen}; classification needs "
                            "at least 2 classes")


def test_bad_label_values_are_refused():
    mixed = _dataset([{"text": "x", "label": v} for v in (["a"], ["b"])]).add_item({"text": "y", "label": None})
    with pytest.raises(LmforgeError, match=r"row 2 \(counting from 0\) has no value in label column 'label'"):
        infer_label_spec(mixed, "label", where="data")
    nan = _dataset([{"text": "x", "label": v} for v in (0.5, math.nan, 1.5)])
    with pytest.raises(LmforgeError, match="row 1 .* has the label nan"):
        infer_label_spec(nan, "label", where="data")
    with pytest.raises(LmforgeError, match="data: no label column 'y'; the columns are text, label"):
        infer_label_spec(nan, "y", where="data")


def test_label_names_make_3_and_3point0_and_string_3_one_class():
    assert label_name(3) == label_name(3.0) == label_name("3") == "3"
    assert label_name(True) == "True" and label_name(2.5) == "2.5"


def test_label_spec_round_trips_through_a_model_config(tmp_path):
    from transformers import AutoConfig

    from lmforge.models import LmforgeBertConfig

    for spec in (LabelSpec(SINGLE, ["neg", "neutral", "pos"]), LabelSpec(MULTI, ["a", "b"]),
                 LabelSpec(REGRESSION, [])):
        LmforgeBertConfig(**spec.config_kwargs()).save_pretrained(tmp_path / spec.problem_type)
        config = AutoConfig.from_pretrained(tmp_path / spec.problem_type)  # id2label keys came back from JSON
        assert LabelSpec.from_config(config) == spec
    # configs without a problem_type (fine-tuned elsewhere): 1 output is regression, else single-label
    assert LabelSpec.from_config(LmforgeBertConfig(num_labels=1)) == LabelSpec(REGRESSION, [])
    assert LabelSpec.from_config(LmforgeBertConfig(num_labels=2)) == LabelSpec(SINGLE, ["LABEL_0", "LABEL_1"])


def test_label_spec_validates_itself():
    with pytest.raises(LmforgeError, match="label 'a' appears twice"):
        LabelSpec(SINGLE, ["a", "b", "a"])
    with pytest.raises(LmforgeError, match="a regression target has no classes"):
        LabelSpec(REGRESSION, ["a"])
    with pytest.raises(LmforgeError, match="problem_type 'binary' is not one of"):
        LabelSpec("binary", ["a", "b"])
    assert LabelSpec(SINGLE, [0, 1]).labels == ["0", "1"]


# --------------------------------------------------------------------------- encoding


def test_encode_single_label_with_a_spec_from_training(folder, bert):
    train = load_labelled(str(folder), "train", text_column="premise", label_column="verdict")
    spec = infer_label_spec(train, "verdict", where="train")
    assert spec.labels == ["maybe", "no", "yes"]
    enc = encode_classification(train, bert, spec, text_column="premise", label_column="verdict", max_length=32,
                                where="train")
    assert enc.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels"]
    assert enc["labels"] == [2, 1, 0, 2]
    assert enc["input_ids"][0] == bert("the king speaks")["input_ids"]
    assert enc["input_ids"][0][0] == bert.cls_token_id and enc["input_ids"][0][-1] == bert.sep_token_id


def test_label_unseen_in_training_is_refused(folder, bert):
    train = load_labelled(str(folder), "train", text_column="premise", label_column="verdict")
    spec = infer_label_spec(train, "verdict", where="train")
    test = load_labelled(str(folder), "test", text_column="premise", label_column="verdict")
    with pytest.raises(LmforgeError) as e:
        encode_classification(test, bert, spec, text_column="premise", label_column="verdict", max_length=32,
                              where=f"{folder} (test split)")
    assert str(e.value) == (f"{folder} (test split): row 0 (counting from 0) has the label 'perhaps', which the "
                            "training data never had; the labels seen in training are 'maybe', 'no', 'yes'")
    multi = _dataset([{"text": "x", "label": ["a", "z"]}])
    with pytest.raises(LmforgeError, match="has the label 'z', which the training data never had"):
        encode_classification(multi, bert, LabelSpec(MULTI, ["a", "b"]), text_column="text", label_column="label",
                              max_length=8, where="dev")


def test_encode_ints_floats_and_strings_name_the_same_classes(bert):
    spec = infer_label_spec(_dataset([{"text": "x", "label": v} for v in (0, 1, 2)]), "label", where="train")
    ds = _dataset([{"text": "the king", "label": v} for v in ("2", "0", "1")])
    enc = encode_classification(ds, bert, spec, text_column="text", label_column="label", max_length=8, where="dev")
    assert enc["labels"] == [2, 0, 1]
    floats = _dataset([{"text": "the king", "label": v} for v in (2.0, 0.0)])
    assert encode_classification(floats, bert, spec, text_column="text", label_column="label", max_length=8,
                                 where="dev")["labels"] == [2, 0]


def test_encode_multi_label_and_regression_and_unlabelled(bert):
    multi = _dataset([{"text": "the king", "tags": t} for t in (["b"], [], ["c", "a"])])
    spec = infer_label_spec(multi, "tags", where="train")
    enc = encode_classification(multi, bert, spec, text_column="text", label_column="tags", max_length=8, where="train")
    assert enc["labels"] == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
    scores = _dataset([{"text": "the king", "score": s} for s in (0.25, -3.5, 2.0)])
    spec = infer_label_spec(scores, "score", where="train")
    enc = encode_classification(scores, bert, spec, text_column="text", label_column="score", max_length=8, where="train")
    assert enc["labels"] == [0.25, -3.5, 2.0]
    words = _dataset([{"text": "the king", "score": s} for s in ("high", "low")])
    with pytest.raises(LmforgeError, match="regression needs a number in label column 'score'; row 0 has 'high'"):
        encode_classification(words, bert, spec, text_column="text", label_column="score", max_length=8, where="dev")
    bare = encode_classification(scores, bert, spec, text_column="text", label_column=None, max_length=8, where="eval")
    assert "labels" not in bare.column_names and len(bare) == 3


def test_text_pairs_get_token_types_and_truncation(folder, bert, gpt):
    ds = load_labelled(str(folder), "train", text_column="premise", text_pair_column="hypothesis",
                       label_column="verdict")
    spec = infer_label_spec(ds, "verdict", where="train")
    enc = encode_classification(ds, bert, spec, text_column="premise", text_pair_column="hypothesis",
                                label_column="verdict", max_length=64, where="train")
    a, b = bert("the king speaks", add_special_tokens=False)["input_ids"], bert("a lord listens", add_special_tokens=False)["input_ids"]
    cls, sep = bert.cls_token_id, bert.sep_token_id
    assert enc["input_ids"][0] == [cls, *a, sep, *b, sep]
    assert enc["token_type_ids"][0] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    short = encode_classification(ds, bert, spec, text_column="premise", text_pair_column="hypothesis",
                                  label_column="verdict", max_length=7, where="train")
    assert max(len(ids) for ids in short["input_ids"]) == 7
    assert all(ids[0] == cls and ids.count(sep) == 2 for ids in short["input_ids"])  # both texts kept
    # a GPT tokenizer: no special tokens, no token types; texts joined as they are
    enc = encode_classification(ds, gpt, spec, text_column="premise", text_pair_column="hypothesis",
                                label_column="verdict", max_length=64, where="train")
    assert enc.column_names == ["input_ids", "attention_mask", "labels"]
    assert enc["input_ids"][0] == gpt("the king speaks")["input_ids"] + gpt("a lord listens")["input_ids"]
    single = encode_classification(ds, gpt, spec, text_column="premise", label_column="verdict", max_length=2,
                                   where="train")
    assert [len(ids) for ids in single["input_ids"]] == [2, 2, 2, 2]
    with pytest.raises(LmforgeError, match="max_length must be an integer above the 3 special tokens"):
        encode_classification(ds, bert, spec, text_column="premise", text_pair_column="hypothesis",
                              label_column="verdict", max_length=3, where="train")


# --------------------------------------------------------------------------- collation


def _encoded(bert, problem_type: str):
    labels = {SINGLE: [1, 0, 1], MULTI: [["a"], ["a", "b"], []], REGRESSION: [0.5, -1.0, 2.0]}[problem_type]
    ds = _dataset([{"a": a, "b": b, "label": y} for a, b, y in
                   zip(["the king", "a queen speaks of love and death", "night"], ["lord", "day", "sweet crown"],
                       labels, strict=True)])
    spec = infer_label_spec(ds, "label", where="train")
    return encode_classification(ds, bert, spec, text_column="a", text_pair_column="b", label_column="label",
                                 max_length=32, where="train"), spec


@pytest.mark.parametrize("problem_type,dtype,shape", [(SINGLE, torch.long, (3,)), (MULTI, torch.float32, (3, 2)),
                                                      (REGRESSION, torch.float32, (3,))])
def test_collator_pads_right_and_shapes_labels(bert, problem_type, dtype, shape):
    enc, spec = _encoded(bert, problem_type)
    rows = [enc[i] for i in range(len(enc))]
    batch = ClassificationCollator(bert.pad_token_id, spec.problem_type)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["input_ids"].dtype == torch.long
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][i, n:] == bert.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["token_type_ids"][i].tolist() == row["token_type_ids"] + [0] * (max(lengths) - n)
    assert batch["labels"].dtype == dtype and tuple(batch["labels"].shape) == shape
    assert batch["labels"].tolist() == [r["labels"] for r in rows]


def test_collator_without_labels_and_with_eval_filler_rows(bert):
    enc, spec = _encoded(bert, MULTI)
    collate = ClassificationCollator(bert.pad_token_id, spec.problem_type)
    bare = collate([{k: v for k, v in enc[i].items() if k != "labels"} for i in range(2)])
    assert "labels" not in bare and bare["input_ids"].shape[0] == 2
    # 3 rows, 1 per process, 4 processes: process 3 gets a filler row whose labels are all -100
    batches = list(eval_batches(enc, 1, collate, process_index=3, num_processes=4))
    assert len(batches) == 1 and (batches[0]["labels"] == -100).all() and batches[0]["labels"].shape == (1, 2)
    with pytest.raises(LmforgeError, match="no pad token"):
        ClassificationCollator(None, SINGLE)
    with pytest.raises(LmforgeError, match="empty list"):
        collate([])
