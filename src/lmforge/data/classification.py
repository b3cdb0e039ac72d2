"""Labelled text for sequence classification: loading, label mapping, encoding, collation.

The flow from a source to model batches::

    ds = load_labelled(source, "train", text_column="text", label_column="label")
    spec = infer_label_spec(ds, "label", where=describe(source, "train"))  # classes from training
    rows = encode_classification(ds, tokenizer, spec, text_column="text", label_column="label",
                                 max_length=128, where=describe(source, "train"))
    collate = ClassificationCollator(tokenizer.pad_token_id, spec.problem_type)
    batch = collate([rows[i] for i in range(8)])  # input_ids, attention_mask, labels tensors

The label mapping comes from the training split only: a label in the validation or test split
that training never saw is an error naming it (the model has no output for it), not a new class.
A model that was already fine-tuned carries its mapping in its config (``LabelSpec.from_config``).

Label values, per problem type:

- ``single_label_classification``: one string, int or bool per row (ints sort numerically,
  strings alphabetically; an int label ``3`` is the class named ``"3"``, so ``3``, ``3.0`` and
  ``"3"`` all name it). Encoded as the class id (int64).
- ``multi_label_classification``: a list of such labels per row (possibly empty). Encoded as a
  multi-hot float row of ``num_labels`` (BCE-with-logits targets).
- ``regression``: a number per row (a column with non-integral floats is regression by
  default). Encoded as a float.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, List, Value

from lmforge.data.collators import _pad_rows
from lmforge.data.sources import load_table
from lmforge.errors import LmforgeError

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]
PROBLEM_TYPES: tuple[str, ...] = get_args(ProblemType)
_SHOWN = 20  # labels / columns listed in an error message before "..."


# --------------------------------------------------------------------------- label mapping


def label_name(value: Any) -> str:
    """The class name a label value stands for: ints (and integral floats) as ``str(int)``,
    strings as they are, bools as ``"True"``/``"False"``."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    return str(value)


def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers (bools, ints, integral floats) before strings; numbers numerically."""
    if isinstance(value, bool | int | float | np.number):
        return 0, float(value)
    return 1, str(value)


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(repr(x) for x in items[:_SHOWN])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOWN else "")


@dataclass
class LabelSpec:
    """The classes a classifier predicts and how its targets are shaped.

    Args:
        problem_type: ``single_label_classification``, ``multi_label_classification`` or
            ``regression`` (the values of transformers' ``config.problem_type``).
        labels: class names in id order; empty for regression.
    """

    problem_type: ProblemType
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.problem_type not in PROBLEM_TYPES:
            raise LmforgeError(f"problem_type {self.problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
        self.labels = [str(x) for x in self.labels]
        if self.problem_type == "regression" and self.labels:
            raise LmforgeError(f"a regression target has no classes, got labels {_listing(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            dup = next(x for i, x in enumerate(self.labels) if x in self.labels[:i])
            raise LmforgeError(f"label {dup!r} appears twice in {_listing(self.labels)}")

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head: one per class, 1 for regression."""
        return 1 if self.problem_type == "regression" else len(self.labels)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that give a transformers config this head: ``num_labels``,
        ``problem_type`` and, for classes, ``id2label``/``label2id`` (for ``from_pretrained``)."""
        out: dict[str, Any] = {"num_labels": self.num_labels, "problem_type": self.problem_type}
        if self.problem_type != "regression":
            out.update(id2label=self.id2label, label2id=self.label2id)
        return out

    @classmethod
    def from_config(cls, config: Any) -> LabelSpec:
        """The mapping a fine-tuned model carries: ``config.id2label`` and ``config.problem_type``.

        A config without a ``problem_type`` (a model fine-tuned elsewhere) is regression when it
        has one output and single-label classification otherwise, as transformers' loss assumes.
        """
        num_labels = int(getattr(config, "num_labels", 0) or 0)
        problem_type = getattr(config, "problem_type", None)
        if problem_type is None:
            problem_type = "regression" if num_labels == 1 else "single_label_classification"
        if problem_type == "regression":
            return cls(problem_type, [])
        id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        if sorted(id2label) != list(range(num_labels)):
            raise LmforgeError(f"the model config's id2label has ids {sorted(id2label)}, not 0..{num_labels - 1} "
                               f"for its num_labels {num_labels}")
        return cls(problem_type, [id2label[i] for i in range(num_labels)])


# --------------------------------------------------------------------------- loading


def describe(source: Any, split: str) -> str:
    """How error messages name a split of a source: ``"reviews.csv (test split)"``."""
    name = type(source).__name__ if hasattr(source, "column_names") else str(source)
    return f"{name} ({split} split)"


def _check_columns(ds: Dataset, where: str, text_column: str, text_pair_column: str | None,
                   label_column: str | None) -> None:
    """The named columns exist (else list the ones that do); the text columns hold strings."""
    have = list(ds.column_names)
    roles = (("text column", text_column), ("text pair column", text_pair_column),
             ("label column", label_column))
    for role, name in roles:
        if name is None:
            continue
        if name not in have:
            raise LmforgeError(f"{where}: no {role} {name!r}; the columns are {', '.join(have)}")
        if role != "label column":
            dtype = getattr(ds.features[name], "dtype", None)
            if dtype not in ("string", "large_string"):
                kind = dtype or type(ds.features[name]).__name__
                raise LmforgeError(f"{where}: {role} {name!r} holds {kind}, not text")


def _check_texts(ds: Dataset, column: str, where: str) -> None:
    """Refuse missing, empty and whitespace-only texts, naming the first row and the count."""
    bad = [i for i, t in enumerate(ds[column]) if t is None or not t.strip()]
    if bad:
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise LmforgeError(f"{where}: row {bad[0]} (counting from 0){more} has an empty text in column "
                           f"{column!r}; remove such rows or fill them in")


def load_labelled(source: Any, split: str, *, text_column: str, text_pair_column: str | None = None,
                  label_column: str | None = None) -> Dataset:
    """Load a split of labelled (or, with ``label_column=None``, unlabelled) text.

    Args:
        source: anything ``lmforge.data.sources.load_table`` reads (built-in corpus,
            jsonl/csv/parquet file or split-aware folder, Hub id) or a ``datasets.Dataset``.
        split: ``train``, ``validation`` or ``test``.
        text_column: the column holding the text.
        text_pair_column: a second text column (sentence pairs: entailment, paraphrase), or None.
        label_column: the column holding the labels, or None for unlabelled data.

    Returns:
        The split with all its columns (names unchanged).

    Raises:
        LmforgeError: a missing column (listing the columns that exist), a text column that does
            not hold strings, an empty or whitespace-only text, a missing label (naming the row),
            or a split without rows.
    """
    where = describe(source, split)
    ds = load_table(source, split)
    if len(ds) == 0:
        raise LmforgeError(f"{where}: the split has no rows")
    _check_columns(ds, where, text_column, text_pair_column, label_column)
    for column in (text_column, text_pair_column):
        if column is not None:
            _check_texts(ds, column, where)
    if label_column is not None:
        missing = [i for i, v in enumerate(label_values(ds, label_column)) if v is None]
        if missing:
            more = f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""
            raise LmforgeError(f"{where}: row {missing[0]} (counting from 0){more} has no value in label column "
                               f"{label_column!r}")
    return ds


# --------------------------------------------------------------------------- inferring the labels


def _class_label(ds: Dataset, column: str) -> Any:
    """The ``datasets.ClassLabel`` of a label column (or of its lists' items), else None."""
    feature = ds.features[column]
    inner = getattr(feature, "feature", None)  # List(ClassLabel) for multi-label columns
    return next((f for f in (feature, inner) if isinstance(f, ClassLabel)), None)


def label_values(ds: Dataset, column: str) -> list[Any]:
    """A label column's values as Python objects; ``ClassLabel`` ids (Hub datasets) become their
    names and its "no label" id -1 becomes None."""
    values = list(ds[column])
    names = _class_label(ds, column)
    if names is None:
        return values

    def name(v: Any) -> str | None:
        return names.int2str(v) if v is not None and v >= 0 else None

    return [[name(x) for x in v] if isinstance(v, list) else name(v) for v in values]



def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)


def _integral(value: Any) -> bool:
    return not isinstance(value, float | np.floating) or float(value).is_integer()


def _check_label_value(value: Any, row: int, where: str, column: str) -> None:
    if value is None:
        raise LmforgeError(f"{where}: row {row} (counting from 0) has no value in label column {column!r}")
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        raise LmforgeError(f"{where}: row {row} (counting from 0) has the label {value!r} in column {column!r}")


def _guess_problem_type(values: list[Any], where: str, column: str) -> ProblemType:
    lists = [isinstance(v, list) for v in values]
    if any(lists):
        if not all(lists):
            row = lists.index(False)
            raise LmforgeError(f"{where}: label column {column!r} mixes lists (multi-label) and single values "
                               f"(row {row}: {values[row]!r})")
        return "multi_label_classification"
    if any(_is_number(v) and not _integral(v) for v in values):
        return "regression"
    return "single_label_classification"


def infer_label_spec(ds: Dataset, label_column: str, *, where: str,
                     problem_type: ProblemType | None = None) -> LabelSpec:
    """The classes of a (training) split's label column.

    Strings, ints and bools make single-label classification (classes sorted: ints numerically,
    strings alphabetically); lists make multi-label classification (the union of all rows'
    labels, sorted); numbers with a fractional part make regression. A ``datasets.ClassLabel``
    column (Hub datasets) gives its names in its own order. ``problem_type`` overrides the
    guess, e.g. ``regression`` for integer ratings.

    Raises:
        LmforgeError: a missing column, empty, nan or infinite labels, values that do not fit
            ``problem_type``, or fewer than 2 classes (naming ``where``, the column and the class).
    """
    if label_column not in ds.column_names:
        raise LmforgeError(f"{where}: no label column {label_column!r}; the columns are {', '.join(ds.column_names)}")
    values = label_values(ds, label_column)
    for row, value in enumerate(values):
        for v in (value if isinstance(value, list) else [value]):
            _check_label_value(v, row, where, label_column)
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise LmforgeError(f"problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
    guessed = _guess_problem_type(values, where, label_column)
    problem_type = problem_type or guessed
    if problem_type == "regression":
        bad = next((i for i, v in enumerate(values) if not _is_number(v)), None)
        if bad is not None:
            raise LmforgeError(f"{where}: regression needs a number in label column {label_column!r}; "
                               f"row {bad} has {values[bad]!r}")
        return LabelSpec("regression", [])
    if (problem_type == "multi_label_classification") != (guessed == "multi_label_classification"):
        need = "a list of labels" if problem_type == "multi_label_classification" else "one label"
        row = next(i for i, v in enumerate(values) if isinstance(v, list) != (need == "a list of labels"))
        raise LmforgeError(f"{where}: {problem_type} needs {need} per row in column {label_column!r}; "
                           f"row {row} has {values[row]!r}")
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    fractional = next((v for v in flat if _is_number(v) and not _integral(v)), None)
    if fractional is not None:
        raise LmforgeError(f"{where}: label column {label_column!r} holds the fractional value {fractional!r}, "
                           "which is no class; use problem_type regression for numeric targets")
    unique: dict[str, Any] = {}
    for v in flat:
        unique.setdefault(label_name(v), v)
    seen = [label_name(v) for v in sorted(unique.values(), key=_sort_key)]
    declared = _class_label(ds, label_column)  # a ClassLabel's names, in its id order, win
    labels = list(declared.names) if declared is not None else seen
    if len(seen) < 2:
        what = f"only the class {seen[0]!r}" if seen else "no labels at all"
        raise LmforgeError(f"{where}: label column {label_column!r} has {what}; classification needs at "
                           "least 2 classes")
    return LabelSpec(problem_type, labels)


# --------------------------------------------------------------------------- encoding


def _encode_labels(values: list[Any], spec: LabelSpec, where: str, column: str) -> list[Any]:
    """Targets for the model: class id, multi-hot float row or float, per row."""
    if spec.problem_type == "regression":
        out = []
        for row, v in enumerate(values):
            _check_label_value(v, row, where, column)
            if not _is_number(v):
                raise LmforgeError(f"{where}: regression needs a number in label column {column!r}; "
                                   f"row {row} has {v!r}")
            out.append(float(v))
        return out
    ids = spec.label2id
    multi = spec.problem_type == "multi_label_classification"

    def class_id(v: Any, row: int) -> int:
        _check_label_value(v, row, where, column)
        name = label_name(v)
        if name not in ids:
            raise LmforgeError(f"{where}: row {row} (counting from 0) has the label {v!r}, which the training "
                               f"data never had; the labels seen in training are {_listing(spec.labels)}")
        return ids[name]

    out = []
    for row, value in enumerate(values):
        if isinstance(value, list) != multi:
            need = "a list of labels" if multi else "one label"
            raise LmforgeError(f"{where}: {spec.problem_type} needs {need} per row in column {column!r}; "
                               f"row {row} has {value!r}")
        if multi:
            hot = [0.0] * spec.num_labels
            for v in value:
                hot[class_id(v, row)] = 1.0
            out.append(hot)
        else:
            out.append(class_id(value, row))
    return out


def _label_feature(spec: LabelSpec) -> Any:
    if spec.problem_type == "multi_label_classification":
        return List(Value("float32"), length=spec.num_labels)
    return Value("float32") if spec.problem_type == "regression" else Value("int64")


def encode_classification(ds: Dataset, tokenizer: Any, spec: LabelSpec, *, text_column: str,
                          text_pair_column: str | None = None, label_column: str | None = None,
                          max_length: int, where: str) -> Dataset:
    """Tokenize texts (and pairs) and encode labels for a sequence-classification model.

    Args:
        ds: rows with the text (and pair, label) columns, e.g. from ``load_labelled``.
        tokenizer: a transformers tokenizer; BERT-style tokenizers add [CLS]/[SEP] and give the
            pair's tokens ``token_type_ids`` 1.
        spec: the label mapping (from the training split, or ``LabelSpec.from_config``).
        text_column, text_pair_column, label_column: column names; ``label_column=None``
            encodes unlabelled rows (no ``labels`` column).
        max_length: longest encoding in tokens (special tokens included); longer texts are
            truncated (for pairs, the longer of the two first).
        where: names the data in error messages, e.g. ``"reviews.csv (test split)"``.

    Returns:
        An in-memory dataset with ``input_ids``, ``attention_mask``, ``token_type_ids`` (when
        the tokenizer makes them) and ``labels``: class id (int64), multi-hot float row, or float.

    Raises:
        LmforgeError: a missing column, an empty text, a label the spec does not know (naming
            the row, the value and the labels seen in training), or a ``max_length`` that leaves
            no room for text.
    """
    _check_columns(ds, where, text_column, text_pair_column, label_column)
    specials = tokenizer.num_special_tokens_to_add(pair=text_pair_column is not None)
    if not isinstance(max_length, int) or max_length <= specials:
        raise LmforgeError(f"max_length must be an integer above the {specials} special tokens the tokenizer "
                           f"adds, got {max_length!r}")
    for column in (text_column, text_pair_column):
        if column is not None:
            _check_texts(ds, column, where)
    labels = _encode_labels(label_values(ds, label_column), spec, where, label_column) if label_column else None
    pairs = list(ds[text_pair_column]) if text_pair_column else None
    enc = tokenizer(list(ds[text_column]), pairs, truncation=True, max_length=max_length)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    columns: dict[str, Any] = {n: enc[n] for n in names}
    features = {n: List(Value("int32") if n == "input_ids" else Value("int8")) for n in names}
    if labels is not None:
        columns["labels"], features["labels"] = labels, _label_feature(spec)
    return Dataset.from_dict(columns, features=Features(features))


# --------------------------------------------------------------------------- collation


class ClassificationCollator:
    """Right-pad encoded rows into a batch for ``...ForSequenceClassification`` models.

    ``input_ids`` (B, T) pad with ``pad_token_id``, ``attention_mask`` and ``token_type_ids``
    (B, T) with 0; ``labels`` are (B,) int64 class ids for single-label classification, (B, L)
    float32 multi-hot rows for multi-label, (B,) float32 for regression. Rows without labels
    (unlabelled data) give a batch without ``labels``.

    Args:
        pad_token_id: the tokenizer's pad id (GPT-style tokenizers: their pad or eos token).
        problem_type: ``single_label_classification``, ``multi_label_classification`` or
            ``regression``.
    """

    def __init__(self, pad_token_id: int, problem_type: ProblemType):
        if pad_token_id is None:
            raise LmforgeError("the tokenizer has no pad token; set one (for GPT-style tokenizers, "
                               "tokenizer.pad_token = tokenizer.eos_token)")
        if problem_type not in PROBLEM_TYPES:
            raise LmforgeError(f"problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
        self.pad_token_id = int(pad_token_id)
        self.problem_type = problem_type

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise LmforgeError("cannot collate an empty list of examples")
        lengths = [len(r["input_ids"]) for r in rows]
        t = max(lengths)
        batch = {"input_ids": torch.from_numpy(_pad_rows([r["input_ids"] for r in rows], self.pad_token_id, t))}
        if "attention_mask" in rows[0]:
            batch["attention_mask"] = torch.from_numpy(_pad_rows([r["attention_mask"] for r in rows], 0, t))
        else:
            batch["attention_mask"] = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = torch.from_numpy(_pad_rows([r["token_type_ids"] for r in rows], 0, t))
        if "labels" in rows[0]:
            dtype = torch.long if self.problem_type == "single_label_classification" else torch.float32
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=dtype)
        return batch
