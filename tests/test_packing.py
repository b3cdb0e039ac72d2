"""lmforge.data.packing.pack: no token lost or duplicated, separators, document positions, and
document-boundary masks that really block cross-document attention in a training forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.collators import CausalLMCollator
from lmforge.data.packing import pack, unpack
from lmforge.errors import LmforgeError

SEP, PAD = 0, 1
documents = st.lists(st.lists(st.integers(2, 50), max_size=40), max_size=25)


def _expected_stream(docs: list[list[int]]) -> list[int]:
    return [t for d in docs if d for t in [*d, SEP]]


@settings(max_examples=200, deadline=None)
@given(docs=documents, block_size=st.integers(1, 64), document_masks=st.booleans())
def test_pad_keeps_every_token_once_in_order(docs, block_size, document_masks):
    rows = pack(docs, block_size, SEP, pad_id=PAD, document_masks=document_masks)
    stream = _expected_stream(docs)
    assert rows["input_ids"].shape == (-(-len(stream) // block_size), block_size)
    assert unpack(rows).tolist() == stream
    # padding only at the very end
    mask = rows["attention_mask"].reshape(-1)
    assert mask[: len(stream)].all() and not mask[len(stream):].any()
    assert (rows["input_ids"].reshape(-1)[len(stream):] == PAD).all()


@settings(max_examples=100, deadline=None)
@given(docs=documents, block_size=st.integers(1, 64))
def test_drop_keeps_the_full_rows_only(docs, block_size):
    rows = pack(docs, block_size, SEP, remainder="drop")
    stream = _expected_stream(docs)
    n_full = len(stream) // block_size
    assert rows["input_ids"].shape == (n_full, block_size)
    assert rows["input_ids"].reshape(-1).tolist() == stream[: n_full * block_size]
    assert rows["attention_mask"].all()


def _reference_positions(docs: list[list[int]], block_size: int) -> tuple[list[int], list[int]]:
    """position within document (restarting at row starts) and document index within the row,
    computed token by token."""
    segments = [len(d) + 1 for d in docs if d]
    total = sum(segments)
    if total % block_size:
        segments.append(block_size - total % block_size)  # padding segment
    pos, seg = [], []
    for s, length in enumerate(segments):
        for i in range(length):
            pos.append(i)
            seg.append(s)
    out_pos, out_seq = [], []
    for r in range(0, len(pos), block_size):
        first = seg[r]
        row_start_seg_pos = pos[r]
        for j in range(r, r + block_size):
            same_seg_as_row_start = seg[j] == first
            out_pos.append(pos[j] - row_start_seg_pos if same_seg_as_row_start else pos[j])
            out_seq.append(seg[j] - first)
    return out_pos, out_seq


@settings(max_examples=150, deadline=None)
@given(docs=documents, block_size=st.integers(1, 64))
def test_position_ids_and_seq_idx(docs, block_size):
    rows = pack(docs, block_size, SEP, pad_id=PAD)
    if rows["input_ids"].size == 0:
        return
    pos, seq = _reference_positions(docs, block_size)
    assert rows["position_ids"].reshape(-1).tolist() == pos
    assert rows["seq_idx"].reshape(-1).tolist() == seq
    # every row starts at position 0 of document 0
    assert (rows["position_ids"][:, 0] == 0).all() and (rows["seq_idx"][:, 0] == 0).all()


def test_separators_small_example():
    rows = pack([[5, 5, 5], [6, 6], [7, 7, 7, 7]], 4, SEP)
    assert rows["input_ids"].tolist() == [[5, 5, 5, 0], [6, 6, 0, 7], [7, 7, 7, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    assert rows["seq_idx"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert rows["attention_mask"].all()


def test_empty_documents_add_nothing_and_padding_is_its_own_segment():
    rows = pack([[5, 5], [], [6]], 4, SEP, pad_id=PAD)
    assert rows["input_ids"].tolist() == [[5, 5, 0, 6], [0, PAD, PAD, PAD]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert rows["seq_idx"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]


def test_bad_arguments():
    with pytest.raises(LmforgeError, match="block_size"):
        pack([[1]], 0, SEP)
    with pytest.raises(LmforgeError, match="remainder"):
        pack([[1]], 4, SEP, remainder="wrap")


# --------------------------------------------------------------------------- attention masks


def _lmforge_gpt(vocab: int) -> torch.nn.Module:
    from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM

    return LmforgeGPTForCausalLM(LmforgeGPTConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64))


def _lmforge_mamba(vocab: int) -> torch.nn.Module:
    from lmforge.models import LmforgeMambaConfig, LmforgeMambaForCausalLM

    return LmforgeMambaForCausalLM(LmforgeMambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=4))


@pytest.mark.parametrize("build", [_lmforge_gpt, _lmforge_mamba], ids=["gpt", "mamba"])
def test_document_masks_block_cross_document_attention(build):
    """Logits of each document inside a packed training batch equal its logits alone."""
    torch.manual_seed(0)
    model = build(64).eval()
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(2, 64, (n,), generator=gen).tolist() for n in (7, 11, 5)]
    rows = pack(docs, 26, SEP, pad_id=PAD)  # 7+1 + 11+1 + 5+1 = 26: one row, three documents
    batch = CausalLMCollator(PAD)([{k: v[0] for k, v in rows.items()}])
    assert "attention_mask" not in batch  # it would switch packed-document masking off
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "seq_idx")}
    if build is _lmforge_mamba:
        inputs.pop("position_ids")
    else:
        inputs.pop("seq_idx")
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([[*doc, SEP]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(doc) + 1], alone, rtol=1e-5, atol=1e-5)
            start += len(doc) + 1
        # and the masks matter: without them document 2 sees document 1
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(plain[8:20], packed[8:20], atol=1e-3)


def test_labels_skip_document_starts_and_padding():
    rows = pack([[5, 5, 5], [6, 6]], 4, SEP, pad_id=PAD)  # [5 5 5 S] [6 6 S pad]
    batch = CausalLMCollator(PAD)([{k: v[i] for k, v in rows.items()} for i in range(2)])
    assert batch["labels"].tolist() == [[-100, 5, 5, SEP], [-100, 6, SEP, -100]]
    assert np.array_equal(batch["position_ids"].numpy(), rows["position_ids"])
    assert batch["seq_idx"].dtype == torch.int32
