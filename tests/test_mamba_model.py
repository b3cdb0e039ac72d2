"""lmforge Mamba: parity with transformers' MambaForCausalLM, cached decoding, padding, packing, heads."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache

from lmforge.models import (
    LmforgeMambaConfig,
    LmforgeMambaForCausalLM,
    LmforgeMambaForSequenceClassification,
)
from lmforge.models.convert import from_hf, to_hf
from tests.export_utils import run_isolated
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 97


def tiny_config(**overrides) -> LmforgeMambaConfig:
    # a wide init so that random models have peaked, non-degenerate next-token distributions
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4,
              initializer_range=0.5, pad_token_id=0, scan_chunk_size=8)
    return LmforgeMambaConfig(**{**kw, **overrides})


def tiny_model(seed=0, **overrides) -> LmforgeMambaForCausalLM:
    """A random tiny model; biases (zero at init) get random values so that they matter."""
    torch.manual_seed(seed)
    model = LmforgeMambaForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
    return model


def random_ids(b, length, seed=0):
    return torch.randint(1, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"state_size": 0}, "state_size"),
        ({"d_state": 2.5}, "state_size"),
        ({"expand": 0}, "expand"),
        ({"expand": 1.5}, "expand"),
        ({"conv_kernel": 0}, "conv_kernel"),
        ({"d_conv": -2}, "conv_kernel"),
        ({"time_step_min": 0.0}, "time_step_min"),
        ({"time_step_min": 0.5, "time_step_max": 0.1}, "time_step_max"),
        ({"dt_max": float("inf")}, "time_step_max"),
        ({"time_step_floor": -1.0}, "time_step_floor"),
        ({"time_step_rank": 0}, "time_step_rank"),
        ({"time_step_init_scheme": "zeros"}, "time_step_init_scheme"),
        ({"scan_chunk_size": 0}, "scan_chunk_size"),
    ],
)
def test_bad_config_values_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LmforgeMambaConfig(**kwargs)


def test_config_derives_sizes_and_accepts_mamba_names():
    cfg = LmforgeMambaConfig(d_model=48, n_layer=3, d_state=4, d_conv=2, expand=3, dt_min=0.01, dt_max=0.2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.state_size, cfg.conv_kernel) == (48, 3, 4, 2)
    assert (cfg.intermediate_size, cfg.time_step_rank, cfg.time_step_min) == (144, 3, 0.01)
    assert cfg.layer_types == ["linear_attention"] * 3


# ------------------------------------------------------------------ parity via convert


@pytest.mark.parametrize("use_bias", [False, True])
def test_logits_and_greedy_tokens_match_transformers_mamba(use_bias):
    model = tiny_model(use_bias=use_bias)
    hf = to_hf(model)
    assert isinstance(hf, transformers.MambaForCausalLM) and not hf.config.use_mambapy
    ids = random_ids(2, 21)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
        assert ours.abs().max() > 1.0  # a meaningful comparison, not of near-zero logits
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)
        ours_gen = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
        theirs_gen = hf.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert ours_gen.tolist() == theirs_gen.tolist()
    assert len(set(ours_gen[0, 21:].tolist())) > 1


def test_from_transformers_model_and_sampling_match():
    torch.manual_seed(1)
    hf_cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8,
                                      initializer_range=0.5, use_mambapy=False, pad_token_id=0)
    hf = transformers.MambaForCausalLM(hf_cfg).eval()
    model = from_hf(hf)
    assert isinstance(model, LmforgeMambaForCausalLM)
    ids = random_ids(1, 10, seed=3)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
        samples = []
        for m in (model, hf):
            torch.manual_seed(123)
            samples.append(m.generate(ids, max_new_tokens=10, do_sample=True, top_k=0).tolist())
    assert samples[0] == samples[1]


def test_conversion_refuses_unsupported_models():
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        to_hf(LmforgeMambaForSequenceClassification(tiny_config(num_labels=2)))


# ---------------------------------------------------------------------- decoding state


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_step_by_step_decoding_equals_full_forward(dtype, atol):
    model = tiny_model(seed=2).to(dtype)
    ids = random_ids(2, 20, seed=4)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        cache = out.cache
        assert isinstance(cache, DynamicCache)
        assert type(cache.layers[0]).__name__ == "LinearAttentionLayer"
        sizes = [(layer.conv_states[0].shape, layer.recurrent_states[0].shape) for layer in cache.layers]
        steps = [out.logits]
        for t in range(6, 20):
            out = model(ids[:, t : t + 1], use_cache=True, cache=cache)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=atol, rtol=0)
    # constant-size state: nothing grew with the number of decoded tokens
    assert [(layer.conv_states[0].shape, layer.recurrent_states[0].shape) for layer in cache.layers] == sizes
    assert sizes[0] == (torch.Size([2, 64, 4]), torch.Size([2, 64, 8]))


def test_prefill_in_two_chunks_continues_the_state():
    model = tiny_model(seed=3).double()
    ids = random_ids(1, 30, seed=5)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :13], use_cache=True)
        second = model(ids[:, 13:], cache=first.cache, use_cache=True)
    assert torch.allclose(torch.cat([first.logits, second.logits], 1), full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("use_bias", [False, True])
def test_left_padded_batch_generates_like_unbatched(use_bias):
    model = tiny_model(seed=4, use_bias=use_bias)
    prompts = [random_ids(1, n, seed=n)[0] for n in (7, 3, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=8, do_sample=False)
            assert batched[i, width:].tolist() == alone[0, len(p) :].tolist()
            last_batched = model(ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0, -1]
            assert torch.allclose(last_batched, model(p[None]).logits[0, -1], atol=1e-5, rtol=0)


# -------------------------------------------------------------------- packed documents


def test_seq_idx_keeps_documents_apart():
    model = tiny_model(seed=5).double()
    a, b = random_ids(1, 7, seed=6), random_ids(1, 9, seed=7)
    packed = torch.cat([a, b], dim=1)
    seq_idx = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        logits = model(packed, seq_idx=seq_idx).logits
        assert torch.allclose(logits[:, :7], model(a).logits, atol=1e-10, rtol=0)
        assert torch.allclose(logits[:, 7:], model(b).logits, atol=1e-10, rtol=0)
        leaky = model(packed).logits[:, 7:]
    assert not torch.allclose(leaky, logits[:, 7:], atol=1e-3)  # without seq_idx the state does leak
    # training on packed rows: the loss of document b has no gradient through document a's tokens
    model.train()
    embeds = model.get_input_embeddings()(packed).detach().requires_grad_()
    out = model(inputs_embeds=embeds, seq_idx=seq_idx)
    (grad,) = torch.autograd.grad(out.logits[:, 7:].sum(), embeds)
    assert grad[:, :7].abs().max() == 0 and grad[:, 7:].abs().max() > 0
    with pytest.raises(ValueError, match="seq_idx"):
        model(packed, seq_idx=seq_idx, use_cache=True)


# ------------------------------------------------------------------- training features


def test_training_step_with_gradient_checkpointing_matches():
    model = tiny_model(seed=6).train()
    ids = random_ids(2, 16, seed=8)
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.activation_checkpointing_enable()
    loss_ckpt = model(ids, labels=ids).loss
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()))
    assert torch.allclose(loss, loss_ckpt)
    for g1, g2 in zip(grads, grads_ckpt, strict=True):
        assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-5)


def test_sequence_classification_head_pools_last_real_token():
    torch.manual_seed(7)
    model = LmforgeMambaForSequenceClassification(tiny_config(num_labels=3)).eval()
    texts = [random_ids(1, n, seed=10 + n)[0] for n in (5, 9)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        ids[i, : len(t)], mask[i, : len(t)] = t, 1  # right padding
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, t in enumerate(texts):
            assert torch.allclose(batched[i], model(t[None]).logits[0], atol=1e-5, rtol=0)
        # without a mask, pad_token_id marks the padding
        assert torch.allclose(model(ids).logits, batched, atol=1e-6, rtol=0)
    model.train()
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.logits.shape == (2, 3) and model.score.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------ save / export


def test_save_and_from_pretrained_give_identical_logits(tmp_path):
    model = tiny_model(seed=8)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LmforgeMambaForCausalLM)
    ids = random_ids(2, 12, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    torch.manual_seed(9)
    cls = LmforgeMambaForSequenceClassification(tiny_config(num_labels=2)).eval()
    cls.save_pretrained(tmp_path / "cls")
    cls_loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    with torch.no_grad():
        assert torch.equal(cls_loaded(ids).logits, cls(ids).logits)


def test_saved_mamba_loads_and_generates_without_lmforge(tmp_path):
    model = tiny_model(seed=10)
    out_dir = tmp_path / "mamba"
    model.save_pretrained(out_dir)
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_mamba.LmforgeMambaForCausalLM"
    for name in ("modeling_mamba.py", "configuration_mamba.py", "mamba_scan.py", "causal_conv.py", "norms.py", "losses.py",
                 "pooling.py", "switches.py", "compat.py", "registration.py"):
        assert (out_dir / name).is_file(), name
    ids = random_ids(1, 9, seed=11)
    with torch.no_grad():
        logits = model(ids).logits[0].tolist()
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
    got = run_isolated(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.tensor([{ids[0].tolist()}])
        with torch.no_grad():
            logits = model(ids).logits[0].tolist()
            greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
        emit({{"logits": logits, "greedy": greedy}})
        """,
        path=out_dir,
    )
    assert torch.allclose(torch.tensor(got["logits"]), torch.tensor(logits), atol=1e-6, rtol=0)
    assert got["greedy"] == greedy
