"""One rule for "which position is the last token" (``pooling.last_token_index``), used by the GPT and
Mamba sequence-classification heads: padding either side, mask vs pad id, and the error without either."""

import pytest
import torch

from lmforge.models import (
    LmforgeGPTConfig,
    LmforgeGPTForSequenceClassification,
    LmforgeMambaConfig,
    LmforgeMambaForSequenceClassification,
)
from lmforge.models.pooling import last_token_index
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

PAD, VOCAB = 0, 61


def _index(input_ids=None, attention_mask=None, pad_token_id=None, *, batch_size=None, length=None):
    ref = input_ids if input_ids is not None else attention_mask
    return last_token_index(
        input_ids, attention_mask, pad_token_id,
        batch_size=ref.shape[0] if batch_size is None else batch_size,
        length=ref.shape[1] if length is None else length, device="cpu",
    ).tolist()


# ------------------------------------------------------------------------------ the rule itself


def test_mask_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert _index(attention_mask=right) == [2, 4, 0]
    assert _index(attention_mask=left) == [4, 4, 4]
    # bool and float masks read the same
    assert _index(attention_mask=right.bool()) == [2, 4, 0]
    assert _index(attention_mask=left.float()) == [4, 4, 4]


def test_pad_id_alone_right_and_left_padding():
    ids = torch.tensor([[5, 6, 7, PAD, PAD], [PAD, PAD, 5, 6, 7], [5, 6, 7, 8, 9]])
    assert _index(ids, None, PAD) == [2, 4, 4]


def test_mask_wins_over_a_pad_id_that_is_also_a_real_token():
    # pad id 2 doubles as eos: a real eos ends each text, padding follows in row 0, precedes in row 1
    ids = torch.tensor([[5, 6, 2, 2, 2], [2, 2, 5, 6, 2]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    assert _index(ids, mask, 2) == [2, 4]
    assert _index(ids, None, 2) == [1, 3]  # what the pad id alone would (wrongly) say


def test_batch_of_one_without_mask_or_pad_id_takes_the_last_position():
    assert _index(torch.tensor([[5, 6, 7]]), None, None) == [2]
    assert _index(None, None, None, batch_size=1, length=4) == [3]  # inputs_embeds only


def test_batch_without_mask_or_pad_id_raises():
    with pytest.raises(ValueError, match="attention_mask or config.pad_token_id"):
        _index(torch.tensor([[5, 6, 7], [5, 6, 7]]), None, None)
    with pytest.raises(ValueError, match="batch of 2"):  # inputs_embeds: the pad id cannot help
        _index(None, None, PAD, batch_size=2, length=3)


def test_mask_covering_a_cache_reads_the_new_positions():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])  # 3 cached + 2 new positions
    assert _index(attention_mask=mask, batch_size=2, length=2) == [0, 1]


# ------------------------------------------------------------------------------ both families


def _gpt(pad_token_id=PAD) -> LmforgeGPTForSequenceClassification:
    torch.manual_seed(0)
    config = LmforgeGPTConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
                       pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2, num_labels=3)
    return LmforgeGPTForSequenceClassification(config).eval()


def _mamba(pad_token_id=PAD) -> LmforgeMambaForSequenceClassification:
    torch.manual_seed(0)
    config = LmforgeMambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4,
                         initializer_range=0.5, pad_token_id=pad_token_id, scan_chunk_size=4, num_labels=3,
                         use_bias=True, use_conv_bias=True)
    model = LmforgeMambaForSequenceClassification(config).eval()
    with torch.no_grad():  # biases start at zero: give them values so that padding could leak through them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


FAMILIES = {"gpt": _gpt, "mamba": _mamba}


def _texts(seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in (4, 9, 6)]


def _pad(texts: list[torch.Tensor], side: str, pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(t) for t in texts)
    ids = torch.full((len(texts), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        cols = slice(0, len(t)) if side == "right" else slice(length - len(t), length)
        ids[i, cols], mask[i, cols] = t, 1
    return ids, mask


def _alone(model, texts) -> torch.Tensor:
    """Each text as a batch of one without padding (B, num_labels)."""
    return torch.cat([model(t[None], attention_mask=torch.ones(1, len(t), dtype=torch.long)).logits for t in texts])


# The Mamba model zeroes padded positions after in_proj and after the conv (attention_mask), so its
# state never sees padding: left padding is supported as well as right padding.
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_with_mask_equals_each_row_alone(family, side):
    model, texts = FAMILIES[family](), _texts()
    ids, mask = _pad(texts, side)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, _alone(model, texts), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_right_padded_batch_with_pad_id_only_equals_each_row_alone(family):
    model, texts = FAMILIES[family](), _texts(seed=4)
    ids, _ = _pad(texts, "right")
    torch.testing.assert_close(model(ids).logits, _alone(model, texts), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_mask_wins_when_the_pad_id_is_a_real_token(family):
    eos = 2
    model = FAMILIES[family](pad_token_id=eos)
    texts = [torch.cat([t, torch.tensor([eos])]) for t in _texts(seed=5)]  # each text ends with a real eos
    texts[1][2] = eos  # and one holds it in the middle too
    ids, mask = _pad(texts, "right", pad=eos)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, _alone(model, texts), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_without_mask_or_pad_id(family):
    model, texts = FAMILIES[family](pad_token_id=None), _texts(seed=6)
    one = texts[0][None]
    torch.testing.assert_close(model(one).logits, model(one, attention_mask=torch.ones_like(one)).logits)
    ids, _ = _pad(texts, "right")
    with pytest.raises(ValueError, match="attention_mask or config.pad_token_id"):
        model(ids)
    model(ids, attention_mask=torch.ones_like(ids))  # an explicit mask is always enough
