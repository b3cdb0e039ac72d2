"""GPT behaviour: KV cache, attention backends, caches, save/load, packing, heads and training hooks."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from lmforge.models import (
    LmforgeGPTConfig,
    LmforgeGPTForCausalLM,
    LmforgeGPTForSequenceClassification,
    LmforgeGPTModel,
)
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

POSITIONS = ["rope", "rope-linear", "rope-dynamic", "alibi", "learned", "sinusoidal", "none"]


def _config(position: str = "rope", **overrides) -> LmforgeGPTConfig:
    kind, _, scaling = position.partition("-")
    cfg = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
               position_embedding_type=kind, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if scaling:
        cfg["rope_parameters"] = {"rope_type": scaling, "factor": 2.0}
    cfg.update(overrides)
    return LmforgeGPTConfig(**cfg)


def _model(position: str = "rope", seed: int = 0, **overrides) -> LmforgeGPTForCausalLM:
    torch.manual_seed(seed)
    return LmforgeGPTForCausalLM(_config(position, **overrides)).eval()


def _ids(b: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 61, (b, t), generator=torch.Generator().manual_seed(seed))


# Dynamic-NTK RoPE recomputes its frequencies from the longest position in each call. Below
# max_position_embeddings (as here) nothing is rescaled and cached decoding matches; past it, a cached
# step (positions up to t) and a full pass (up to T) use different frequencies by design (measured
# ~3e-4 apart at 60 tokens with max 40), so that regime is excluded from cache equality.
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_incremental_decoding_equals_full_forward_at_every_position(position, attn):
    model = _model(position, attn_implementation=attn)
    ids = _ids(t=14)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in row 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        steps, cache = [out.logits], out.cache
        for i in range(4, ids.shape[1]):
            out = model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], use_cache=True, cache=cache)
            steps.append(out.logits)
    inc = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_eager_equals_sdpa(position):
    model = _model(position)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(sdpa[real], eager[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_dynamic_cache_equals_static_cache(position):
    model = _model(position)
    ids = _ids(b=2, t=6)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    dyn = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    static = model.generate(ids, cache=StaticCache(config=model.config, max_cache_len=24), **kw)
    assert torch.equal(dyn, static)
    # and the static cache's logits match a full pass
    cache = StaticCache(config=model.config, max_cache_len=24)
    with torch.no_grad():
        full = model(dyn).logits
        first = model(dyn[:, :6], cache=cache, use_cache=True).logits
        step = model(dyn[:, 6:7], cache=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, step], 1), full[:, :7], atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_save_from_pretrained_identical_logits(tmp_path, position):
    model = _model(position, tie_word_embeddings=position == "learned")
    ids = _ids(t=20)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LmforgeGPTForCausalLM
    with torch.no_grad():
        after = loaded(ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    if position.startswith("rope"):
        torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_from_pretrained_dtype_and_generation_config(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = LmforgeGPTForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert loaded(_ids()).logits.dtype == torch.bfloat16
    gc = loaded.generation_config
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id) == (1, 2, 0)


def test_packed_documents_via_position_ids_equal_separate_documents():
    model = _model("rope")
    a, b = _ids(b=1, t=7, seed=3), _ids(b=1, t=5, seed=4)
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        got = model(packed, position_ids=position_ids, use_cache=False).logits
        sep = torch.cat([model(a).logits, model(b).logits], dim=1)
    torch.testing.assert_close(got, sep, atol=1e-5, rtol=0)


def test_logits_to_keep_and_loss_with_num_items_in_batch():
    model = _model()
    ids = _ids(b=4, t=10)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (4, 1, 61)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)

    labels = ids.clone()
    labels[0, 5:] = -100
    # two micro-batches with num_items_in_batch summed over both == one big batch
    n_items = int((labels[:, 1:] != -100).sum())
    big = model(ids, labels=labels).loss
    parts = sum(model(ids[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=n_items).loss for i in (0, 2))
    torch.testing.assert_close(parts, big, atol=1e-6, rtol=0)
    mean_of_means = sum(model(ids[i : i + 2], labels=labels[i : i + 2]).loss for i in (0, 2)) / 2
    assert abs(mean_of_means.item() - big.item()) > 1e-4  # the difference num_items_in_batch fixes


def test_gradient_checkpointing_gives_same_gradients():
    ids = _ids(b=2, t=8)
    grads = []
    for checkpointing in (False, True):
        model = _model(hidden_dropout=0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.layers[0].gradient_checkpointing
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_resize_token_embeddings_and_tied_head():
    model = _model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.resize_token_embeddings(70)
    assert model.get_input_embeddings().weight.shape == (70, 32)
    assert model.lm_head.weight.shape == (70, 32) and model.config.vocab_size == 70
    assert model(_ids()).logits.shape[-1] == 70
    untied = _model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_output_hidden_states_and_attentions():
    model = _model(attn_implementation="eager")
    out = model(_ids(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.attentions[0].shape == (2, 4, 12, 12)


def test_sequence_classification_uses_last_real_token():
    torch.manual_seed(0)
    model = LmforgeGPTForSequenceClassification(_config(num_labels=3)).eval()
    ids = _ids(b=2, t=8)
    right = torch.ones_like(ids)
    right[1, 5:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=right, labels=torch.tensor([0, 2]))
        alone = model(ids[1:, :5]).logits
    assert out.logits.shape == (2, 3) and out.loss.item() > 0
    torch.testing.assert_close(out.logits[1:], alone, atol=1e-5, rtol=0)


def test_base_model_and_bidirectional_switch():
    torch.manual_seed(0)
    causal = LmforgeGPTModel(_config())
    ids = _ids(b=1, t=6)
    with torch.no_grad():
        h = causal(ids).last_hidden_state
        h_prefix = causal(ids[:, :3]).last_hidden_state
    torch.testing.assert_close(h[:, :3], h_prefix, atol=1e-5, rtol=0)  # causal: the future is invisible
    torch.manual_seed(0)
    bidir = LmforgeGPTModel(_config(is_causal=False))
    with torch.no_grad():
        hb = bidir(ids).last_hidden_state
        hb_prefix = bidir(ids[:, :3]).last_hidden_state
    assert (hb[:, :3] - hb_prefix).abs().max() > 1e-4  # bidirectional: it is visible


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_absolute_positions_refuse_long_inputs(position):
    model = _model(position)
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        model(_ids(b=1, t=41))


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_relative_positions_run_past_max_positions(position):
    model = _model(position)
    assert model(_ids(b=1, t=50)).logits.shape == (1, 50, 61)


def _preset(name: str) -> LmforgeGPTConfig:
    import yaml
    from transformers import AutoConfig

    from lmforge.presets import find_preset

    fields = yaml.safe_load(find_preset("model", name).read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@pytest.mark.parametrize("name", ["gpt-debug", "gpt-small", "gpt2-small"])
def test_presets_build(name):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = _preset(name)
    assert isinstance(config, LmforgeGPTConfig)
    if name == "gpt-debug":
        model = LmforgeGPTForCausalLM(config)
        assert model(torch.randint(0, config.vocab_size, (1, 8))).logits.shape == (1, 8, config.vocab_size)
        return
    with torch.device("meta"):
        model = LmforgeGPTForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        if name == "gpt2-small":  # same parameter count as the real GPT-2 small (124M)
            assert n_params == sum(p.numel() for p in GPT2LMHeadModel(GPT2Config()).parameters())
        else:
            assert 100e6 < n_params < 130e6
