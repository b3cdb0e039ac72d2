"""CausalLMCollator and MLMCollator: labels, padding, 80/10/10 statistics, whole-word masking,
and masks that are reproducible and independent of how rows are batched."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lmforge.data.collators import CausalLMCollator, MLMCollator
from lmforge.data.packing import pack
from lmforge.errors import LmforgeError
from tests.pipeline_fixtures import bert_tokenizer, gpt_tokenizer, make_corpus

BLOCK = 64


@pytest.fixture(scope="module")
def bert():
    return bert_tokenizer()


@pytest.fixture(scope="module")
def gpt_with_mask():
    tok = gpt_tokenizer()
    tok.add_special_tokens({"mask_token": "<mask>"})
    return tok


def _rows(tokenizer, n_docs: int, seed: int = 0) -> list[dict]:
    """Packed rows plus, per row, the true word index of each token (-1: separator/padding)."""
    ids, words = [], []
    for doc in make_corpus(n_docs, seed=seed):
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        spans = [m.span() for m in re.finditer(r"\w+|[^\w\s]", doc)]
        ids.append(enc["input_ids"])
        # a token's word: the span holding its last character; a whitespace-only piece (byte-level
        # BPE's lone "Ġ") is a unit of its own
        words.append([next((i for i, (a, b) in enumerate(spans) if a <= e - 1 < b), len(spans) + j)
                      for j, (_, e) in enumerate(enc["offset_mapping"])])
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    rows = pack(ids, BLOCK, sep, pad_id=tokenizer.pad_token_id)
    # global word ids in the same stream order (each doc's words offset so they stay distinct)
    stream, offset = [], 0
    for w in words:
        stream += [x + offset for x in w] + [-1]
        offset += max(w) + 1
    stream += [-1] * (rows["input_ids"].size - len(stream))
    word_ids = np.array(stream).reshape(rows["input_ids"].shape)
    feats = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["input_ids"]))]
    return feats, word_ids


def test_mlm_80_10_10_and_labels(bert):
    feats, _ = _rows(bert, 400)
    batch = MLMCollator(bert, seed=3)(feats)
    original = torch.tensor(np.stack([f["input_ids"] for f in feats])).long()
    pad = torch.tensor(np.stack([f["attention_mask"] for f in feats])) == 0
    special = (original == bert.sep_token_id) | pad
    selected = batch["labels"] != -100
    n_tokens, n_sel = int((~special).sum()), int(selected.sum())
    assert n_tokens > 10_000

    def within(observed: float, p: float, n: int) -> bool:  # 5 standard deviations
        return abs(observed - p) < 5 * (p * (1 - p) / n) ** 0.5

    assert within(n_sel / n_tokens, 0.15, n_tokens)
    assert not (selected & special).any()  # separators and padding are never selected
    assert torch.equal(batch["labels"][selected], original[selected])
    assert torch.equal(batch["input_ids"][~selected], original[~selected])
    new = batch["input_ids"][selected]
    is_mask = new == bert.mask_token_id
    same = (new == original[selected]) & ~is_mask
    v = len(bert)
    assert within(float(is_mask.float().mean()), 0.8 + 0.1 / v, n_sel)
    assert within(float(same.float().mean()), 0.1 + 0.1 / v, n_sel)
    assert within(float((~is_mask & ~same).float().mean()), 0.1 * (1 - 2 / v), n_sel)
    assert "position_ids" in batch and "attention_mask" not in batch


@pytest.mark.parametrize("tok_name", ["bert", "gpt_with_mask"])
def test_whole_word_masks_whole_words(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    feats, word_ids = _rows(tok, 300, seed=1)
    batch = MLMCollator(tok, whole_word=True, seed=0)(feats)
    selected = (batch["labels"] != -100).numpy()
    assert (batch["input_ids"].numpy()[selected] == tok.mask_token_id).all()
    multi_piece = 0
    selected_words = 0
    for r in range(len(feats)):
        for w in np.unique(word_ids[r][word_ids[r] >= 0]):
            at = word_ids[r] == w
            if at[0] and r > 0 and word_ids[r - 1][-1] == w:
                continue  # a word cut by the row boundary is two words for the collator
            assert selected[r][at].all() or not selected[r][at].any(), (r, w)
            multi_piece += int(at.sum() > 1)
            selected_words += int(selected[r][at].all())
    assert multi_piece > 100  # the check had words of several pieces to look at
    n_words = sum(len(np.unique(w[w >= 0])) for w in word_ids)
    assert 0.10 < selected_words / n_words < 0.20


def test_masks_are_reproducible_and_batch_independent(bert):
    feats, _ = _rows(bert, 60, seed=2)
    a = MLMCollator(bert, seed=7)(feats[:6])
    b = MLMCollator(bert, seed=7)(feats[:6])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # row 4 masked alone, or in another batch, or after other calls: the same mask
    collator = MLMCollator(bert, seed=7)
    collator(feats[10:20])
    alone = collator([feats[4]])
    assert torch.equal(alone["labels"][0], a["labels"][4])
    other_seed = MLMCollator(bert, seed=8)(feats[:6])
    assert not torch.equal(other_seed["labels"], a["labels"])
    collator.set_epoch(1)
    assert not torch.equal(collator(feats[:6])["labels"], a["labels"])


@pytest.mark.parametrize("whole_word", [False, True])
def test_mask_of_a_short_row_does_not_depend_on_the_batch_padding(bert, whole_word):
    """Unpacked rows of different lengths: a row's mask is the same alone and padded beside a longer one."""
    g = np.random.default_rng(3)
    vocab = len(bert)
    short = {"input_ids": g.integers(10, vocab, 23).tolist()}
    long = {"input_ids": g.integers(10, vocab, 57).tolist()}
    alone = MLMCollator(bert, seed=1, whole_word=whole_word)([short])
    batched = MLMCollator(bert, seed=1, whole_word=whole_word)([long, short])
    assert torch.equal(batched["input_ids"][1, :23], alone["input_ids"][0])
    assert torch.equal(batched["labels"][1, :23], alone["labels"][0])
    assert (batched["labels"][1, 23:] == -100).all() and (batched["attention_mask"][1, 23:] == 0).all()
    assert (alone["labels"][0] != -100).any()


def test_mlm_needs_a_mask_token():
    with pytest.raises(LmforgeError, match="mask token"):
        MLMCollator(gpt_tokenizer())


def test_causal_collator_pads_variable_length_rows():
    batch = CausalLMCollator(pad_token_id=9, pad_to_multiple_of=4)(
        [{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6, 7]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9], [6, 7, 9, 9, 9, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1, 1] + [0] * 6]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5, -100, -100, -100], [6, 7] + [-100] * 6]
    assert batch["input_ids"].dtype == torch.long


def test_causal_collator_keeps_given_labels_and_pad_equal_to_eos():
    # pad id == a real token id (GPT tokenizers often reuse EOS): real EOS labels must survive
    batch = CausalLMCollator(pad_token_id=0)(
        [{"input_ids": [4, 0], "labels": [-100, 0]}, {"input_ids": [5], "labels": [5]}])
    assert batch["labels"].tolist() == [[-100, 0], [5, -100]]


def test_causal_collator_extra_padding_of_packed_rows_is_a_segment():
    rows = [{"input_ids": [5, 5, 0], "position_ids": [0, 1, 2], "seq_idx": [0, 0, 0]},
            {"input_ids": [6], "position_ids": [0], "seq_idx": [0]}]
    batch = CausalLMCollator(pad_token_id=1)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert batch["seq_idx"].tolist() == [[0, 0, 0], [0, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 0], [-100, -100, -100]]
