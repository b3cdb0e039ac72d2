"""Correctness oracle: lmforge GPT equals LlamaForCausalLM / GPT2LMHeadModel on the same weights."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM
from lmforge.models.convert import from_hf, to_hf
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5


def _left_padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    """(ids, attention_mask) for a left-padded batch; pad id 0."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, t - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _llama(kv_heads: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=97, hidden_size=60, intermediate_size=93, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=kv_heads, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.mark.parametrize(
    "kv_heads,overrides",
    [
        (6, {}),  # MHA
        (2, {"attention_bias": True, "mlp_bias": True}),  # GQA with biases
        (1, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}),  # MQA, scaled RoPE
        (3, {"tie_word_embeddings": True, "head_dim": 14}),  # odd head count per group, explicit head_dim
    ],
    ids=["mha", "gqa-bias", "mqa-linear-rope", "gqa-tied-headdim"],
)
def test_llama_parity_left_padding_and_greedy(kv_heads, overrides):
    hf = _llama(kv_heads, **overrides)
    ours = from_hf(hf).eval()
    assert isinstance(ours, LmforgeGPTForCausalLM) and ours.config.num_key_value_heads == kv_heads
    ids, mask = _left_padded_batch(97, [11, 7, 3])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=ATOL, rtol=0)

    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), hf.generate(ids, **kw))

    back = to_hf(ours).eval()
    assert isinstance(back, LlamaForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask).logits[real], ref[real], atol=0, rtol=0)


def test_gpt2_parity_both_ways_and_greedy():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=97, n_positions=48, n_embd=36, n_layer=2, n_head=3, n_inner=70,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ).eval()
    ours = from_hf(hf).eval()
    c = ours.config
    assert (c.position_embedding_type, c.norm_type, c.hidden_act, c.tie_word_embeddings) == (
        "learned", "layernorm", "gelu_tanh", True)
    ids, mask = _left_padded_batch(97, [9, 4, 6])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # GPT2Model would otherwise use arange
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=ATOL, rtol=0)

    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), hf.generate(ids, **kw))

    back = to_hf(ours).eval()
    assert isinstance(back, GPT2LMHeadModel)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=0, rtol=0)


def _tiny(**overrides) -> LmforgeGPTForCausalLM:
    cfg = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    cfg.update(overrides)
    return LmforgeGPTForCausalLM(LmforgeGPTConfig(**cfg))


@pytest.mark.parametrize(
    "overrides,switch",
    [
        ({"position_embedding_type": "alibi"}, "position_embedding_type"),
        ({"norm_type": "layernorm"}, "norm_type"),
        ({"norm_position": "post"}, "norm_position"),
        ({"hidden_act": "geglu"}, "hidden_act"),
        ({"hidden_dropout": 0.1}, "hidden_dropout"),
        ({"position_embedding_type": "learned", "norm_type": "layernorm", "hidden_act": "gelu_tanh",
          "norm_bias": True, "attention_bias": True, "mlp_bias": True}, "num_key_value_heads"),
    ],
)
def test_to_hf_refuses_unrepresentable_switches(overrides, switch):
    with pytest.raises(ValueError, match=switch):
        to_hf(_tiny(**overrides))


def test_from_hf_refuses_unknown_model_and_activation():
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(_llama(6, hidden_act="gelu"))
    with pytest.raises(ValueError, match="no converter"):
        from_hf(SimpleNamespace(config=SimpleNamespace(model_type="nope")))
