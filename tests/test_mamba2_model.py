"""lmforge Mamba-2 (pure and hybrid): parity with transformers' Mamba2ForCausalLM (logits, loss,
every gradient, conversion both ways), cached decoding, generate, padding, packed documents,
heads, save / remote-code loading, gradient checkpointing and config validation."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache

from lmforge.models import (
    LmforgeMamba2Config,
    LmforgeMamba2ForCausalLM,
    LmforgeMamba2ForSequenceClassification,
)
from lmforge.models.convert import from_hf, to_hf
from tests.export_utils import run_isolated
from tests.torch_threads import single_thread  # noqa: F401
from tests.train_fixtures import perturb

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 97
HYBRID = ["mamba2", "attention", "mamba2", "mlp"]
# name -> config changes: the pure model, the hybrid (no positions in attention), the hybrid with RoPE
KINDS = {
    "pure": {},
    "pure-clamped": {"time_step_limit": (0.01, 0.05), "n_groups": 2},  # dt clamped, 2 groups of 4 heads
    "hybrid": {"layer_types": HYBRID},
    "hybrid-rope": {"layer_types": HYBRID, "attention_position_embedding": "rope"},
}
REL_ATOL = 1e-5  # gradients: x the largest |entry| of each parameter, as tests/test_grad_parity.py


def tiny_config(**overrides) -> LmforgeMamba2Config:
    # 8 SSM heads of 8 (expand 2), chunks of 8: the test lengths are not multiples of it; a wide
    # init so that random models have peaked, non-degenerate next-token distributions
    kw = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, head_dim=8, conv_kernel=4, chunk_size=8,
              num_attention_heads=4, num_key_value_heads=2, mlp_intermediate_size=48, initializer_range=0.5,
              pad_token_id=0)
    if "layer_types" not in overrides:
        kw["num_hidden_layers"] = 2
    return LmforgeMamba2Config(**{**kw, **overrides})


def tiny_model(seed=0, kind="pure", **overrides) -> LmforgeMamba2ForCausalLM:
    """A random tiny model with every parameter moved off its initialisation (zero biases, unit
    norms and D would hide mistakes)."""
    torch.manual_seed(seed)
    return perturb(LmforgeMamba2ForCausalLM(tiny_config(**KINDS[kind], **overrides)).eval(), seed)


def random_ids(b, length, seed=0):
    return torch.randint(1, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def padded(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) with each prompt padded (id 0) on ``side``."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_heads": 3}, r"num_heads \* head_dim \(3 \* 8 = 24\) must equal intermediate_size"),
        ({"head_dim": 5}, "head_dim=5 does not divide intermediate_size=64"),
        ({"n_groups": 3}, "n_groups=3 must divide num_heads=8"),
        ({"layer_types": ["mamba2", "transformer"]}, r"layer_types\[1\]='transformer' is not one of"),
        ({"layer_types": "mamba2"}, "layer_types must be a list"),
        ({"layer_types": HYBRID, "num_hidden_layers": 3}, "num_hidden_layers=3 does not match the 4 entries"),
        ({"layer_types": HYBRID, "num_attention_heads": 5}, "hidden_size=32 is not divisible by num_attention_heads"),
        ({"layer_types": HYBRID, "num_key_value_heads": 3}, "num_attention_heads=4 is not divisible by num_key_value"),
        ({"layer_types": HYBRID, "attention_position_embedding": "alibi"}, "attention_position_embedding='alibi'"),
        ({"layer_types": HYBRID, "hidden_act": "swish"}, "hidden_act='swish'"),
        ({"layer_types": HYBRID, "attention_dropout": 1.0}, "attention_dropout"),
        ({"state_size": 0}, "state_size must be a positive integer"),
        ({"chunk_size": 0}, "chunk_size must be None or a positive integer"),
        ({"time_step_min": 0.5, "time_step_max": 0.1}, "time_step_min <= time_step_max"),
        ({"time_step_limit": (1.0, 0.5)}, "time_step_limit"),
        ({"layer_norm_epsilon": 0.0}, "norm_eps"),
    ],
)
def test_bad_config_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_config_derives_sizes_and_stores_layer_types_as_transformers_cache_names():
    cfg = tiny_config(layer_types=["mamba", "attention", "mamba2", "mlp", "mamba2"], layer_norm_epsilon=1e-6)
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_heads, cfg.attention_head_dim) == (5, 64, 8, 8)
    assert cfg.norm_eps == 1e-6 and cfg.has_attention
    assert cfg.layer_types == ["linear_attention", "full_attention", "linear_attention", "mlp", "linear_attention"]
    cache = DynamicCache(config=cfg)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "LinearAttentionLayer", "DynamicLayer", "LinearAttentionLayer", "DummyLayer", "LinearAttentionLayer"]
    pure = tiny_config(num_attention_heads=5)  # attention settings matter only with attention layers
    assert pure.layer_types == ["linear_attention"] * 2 and not pure.has_attention


def test_initialisation_follows_mamba2():
    """A uniform in [1, 16] per head, D = 1, softplus(dt_bias) log-uniform in [time_step_min,
    time_step_max], zero conv bias, PyTorch's default out_proj; rescale_prenorm_residual divides
    every layer's output projection (SSD out_proj, attention o_proj, MLP down_proj) by sqrt(layers)."""
    stds = {}
    for rescale in (False, True):
        torch.manual_seed(0)
        config = LmforgeMamba2Config(vocab_size=VOCAB, hidden_size=64, state_size=8, head_dim=4, layer_types=HYBRID,
                                     time_step_min=0.01, time_step_max=0.02, rescale_prenorm_residual=rescale)
        model = LmforgeMamba2ForCausalLM(config).requires_grad_(False)
        mixer, attention, mlp = (model.backbone.layers[i].mixer for i in (0, 1, 3))
        a = mixer.A_log.exp()
        assert 1 <= a.min() and a.max() <= 16 and a.std() > 2  # 32 heads: spread over the range
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert 0.01 - 1e-6 <= dt.min() and dt.max() <= 0.02 + 1e-6 and dt.std() > 1e-3
        assert torch.equal(mixer.D, torch.ones(32)) and not mixer.conv1d.bias.any()
        assert mixer.out_proj.weight.abs().max() <= 128**-0.5 / (2 if rescale else 1)
        stds[rescale] = [float(w.std()) for w in (mixer.out_proj.weight, attention.o_proj.weight,
                                                  mlp.down_proj.weight, attention.q_proj.weight)]
    for unscaled, scaled in zip(stds[False][:3], stds[True][:3], strict=True):
        assert scaled == pytest.approx(unscaled / 2, rel=0.1)  # 4 layers
    assert stds[True][3] == pytest.approx(stds[False][3], rel=0.1) == pytest.approx(0.02, rel=0.1)


# ------------------------------------------------------------------ parity via convert


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("n_groups, use_bias, padding", [(1, False, True), (2, False, True), (4, True, False)],
                         ids=["groups1-padded", "groups2-padded", "groups4-bias"])
def test_logits_loss_gradients_and_greedy_tokens_match_transformers_mamba2(n_groups, use_bias, padding):
    # transformers zeroes padding before in_proj, lmforge after it (its bias must not leak into the
    # conv state): the two agree on padded batches only without an in_proj bias. A moderate init:
    # at 0.5 the float32 gradients of both are ~1e-4 (relative) away from the float64 values.
    model = tiny_model(n_groups=n_groups, use_bias=use_bias, initializer_range=0.2)
    hf = to_hf(model)
    assert isinstance(hf, transformers.Mamba2ForCausalLM) and hf.config.n_groups == n_groups
    if padding:  # 3 rows of 21 positions (chunks of 8): left- and right-padded rows
        ids, mask = padded([random_ids(1, n, seed=n)[0] for n in (21, 13, 17)], "left")
        ids[2], mask[2] = torch.roll(ids[2], -4), torch.roll(mask[2], -4)  # the last row right-padded
    else:
        ids, mask = random_ids(3, 21), torch.ones(3, 21, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    with torch.no_grad():
        ours, theirs = model(**batch), hf(**batch)
    assert ours.logits.abs().max() > 1.0  # a meaningful comparison, not of near-zero logits
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)

    model.train(), hf.train()
    got, want = _grads(model, batch), _grads(hf, batch)
    assert got.keys() == want.keys()
    for name, ref in want.items():
        scale = float(ref.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(got[name], ref, atol=REL_ATOL * scale, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    model.eval(), hf.eval()

    with torch.no_grad():
        ours_gen = model.generate(ids[:1], max_new_tokens=10, do_sample=False)
        theirs_gen = hf.generate(ids[:1], max_new_tokens=10, do_sample=False)
    assert ours_gen.tolist() == theirs_gen.tolist() and len(set(ours_gen[0, 21:].tolist())) > 1


def test_conversion_round_trips_exactly_both_ways():
    model = tiny_model(seed=1, n_groups=2)
    hf = to_hf(model)
    back = from_hf(hf)
    assert isinstance(back, LmforgeMamba2ForCausalLM)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() == hf.state_dict().keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = random_ids(2, 19, seed=2)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    # and from a stock model: its own config and init, dt clamped (time_step_limit) where it bites
    torch.manual_seed(3)
    stock = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, num_heads=4, head_dim=16, n_groups=2,
        chunk_size=8, time_step_limit=(0.01, 0.05), pad_token_id=0)).eval()
    ours_model = from_hf(stock)
    assert ours_model.config.num_heads == 4 and ours_model.config.chunk_size == 8
    assert ours_model.config.time_step_limit == (0.01, 0.05)
    assert all(torch.equal(v, stock.state_dict()[k]) for k, v in to_hf(ours_model).state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(ours_model(ids).logits, stock(ids).logits, atol=1e-4, rtol=0)
    backbone = to_hf(ours_model.backbone)
    assert isinstance(backbone, transformers.Mamba2Model)


def test_conversion_refuses_hybrids_and_the_classifier():
    with pytest.raises(ValueError, match=r"Mamba-2 layers only.*1: 'full_attention', 3: 'mlp'.*hybrid"):
        to_hf(tiny_model(kind="hybrid"))
    with pytest.raises(ValueError, match="Mamba2ForCausalLM.*no Mamba2 sequence-classification class"):
        to_hf(LmforgeMamba2ForSequenceClassification(tiny_config(num_labels=2)))


# ---------------------------------------------------------------------- decoding state


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_decoding_equals_full_forward(kind):
    """Prefill 6 tokens, continue with a chunk of 5 (the scan from a carried state), then one
    token at a time (ssd_step): the logits of the full forward, float64."""
    model = tiny_model(seed=2, kind=kind).double()
    ids = random_ids(2, 20, seed=4)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        cache = out.cache
        assert isinstance(cache, DynamicCache)
        mamba = [i for i, t in enumerate(model.config.layer_types) if t == "linear_attention"]
        sizes = [(cache.layers[i].conv_states[0].shape, cache.layers[i].recurrent_states[0].shape) for i in mamba]
        steps = [out.logits, model(ids[:, 6:11], cache=cache, use_cache=True).logits]
        for t in range(11, 20):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)
    # constant-size Mamba-2 states (B, Dc, K) and (B, nh, P, N); attention keys grow
    conv_channels = 64 + 2 * model.config.n_groups * 8  # x, B and C
    assert sizes[0] == (torch.Size([2, conv_channels, 4]), torch.Size([2, 8, 8, 8]))
    assert [(cache.layers[i].conv_states[0].shape, cache.layers[i].recurrent_states[0].shape) for i in mamba] == sizes
    if model.config.has_attention:
        assert cache.layers[1].keys.shape == (2, 2, 20, 8)


def test_old_cache_argument_name_still_works():
    model = tiny_model(seed=3)
    ids = random_ids(1, 9, seed=5)
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).cache
        with pytest.warns(FutureWarning, match="cache_params"):
            old = model(ids[:, 5:], cache_params=cache, use_cache=True).logits
        full = model(ids).logits
    torch.testing.assert_close(old, full[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", [*KINDS, "static-cache"])
def test_greedy_generate_with_cache_equals_without_and_left_padding_equals_each_row_alone(kind):
    # "pure" with an in_proj bias: padding must be zeroed after in_proj; "static-cache": a hybrid of
    # Mamba-2 and attention layers in a StaticCache, for which generate() prepares masks per layer type
    changes = {"use_bias": True} if kind == "pure" else {}
    cache_kw = {}
    if kind == "static-cache":
        kind, changes = "pure", {"layer_types": ["mamba2", "attention", "mamba2"]}
        cache_kw = {"cache_implementation": "static"}
    model = tiny_model(seed=4, kind=kind, **changes)
    prompts = [random_ids(1, n, seed=n)[0] for n in (7, 3, 11)]
    ids, mask = padded(prompts, "left")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True, **cache_kw)
        assert type(out.cache).__name__ == ("StaticCache" if cache_kw else "DynamicCache")
        batched = out.sequences
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
        assert batched.tolist() == uncached.tolist()
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=8, do_sample=False)
            assert batched[i, ids.shape[1] :].tolist() == alone[0, len(p) :].tolist(), i
            alone_uncached = model.generate(p[None], max_new_tokens=8, do_sample=False, use_cache=False)
            assert alone_uncached.tolist() == alone.tolist()
    assert len(set(batched[:, ids.shape[1] :].flatten().tolist())) > 3  # not one token repeated


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("kind", ["pure", "hybrid-rope"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_row_its_own_logits(kind, side):
    model = tiny_model(seed=5, kind=kind, use_bias=True).double()
    prompts = [random_ids(1, n, seed=20 + n)[0] for n in (13, 6, 10)]
    ids, mask = padded(prompts, side)
    with torch.no_grad():  # (RoPE positions count the real tokens of attention_mask)
        logits = model(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            real = mask[i].bool()
            torch.testing.assert_close(logits[i, real], model(p[None]).logits[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["pure", "hybrid-rope"])
def test_sequence_classifier_pools_the_last_real_token(kind):
    torch.manual_seed(7)
    model = perturb(LmforgeMamba2ForSequenceClassification(tiny_config(**KINDS[kind], num_labels=3)).eval(), 7)
    texts = [random_ids(1, n, seed=10 + n)[0] for n in (5, 9)]
    with torch.no_grad():
        alone = torch.stack([model(t[None]).logits[0] for t in texts])
        for side in ("right", "left"):
            ids, mask = padded(texts, side)
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, alone, atol=1e-5, rtol=0)
        ids, _ = padded(texts, "right")  # without a mask, pad_token_id marks the padding
        torch.testing.assert_close(model(ids).logits, alone, atol=1e-5, rtol=0)
    model.train()
    out = model(ids, attention_mask=(ids != 0).long(), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.logits.shape == (2, 3) and model.score.weight.grad.abs().sum() > 0


# -------------------------------------------------------------------- packed documents


@pytest.mark.parametrize("kind", ["pure", "hybrid-rope"])
def test_seq_idx_keeps_packed_documents_apart(kind):
    """Two rows of two documents each (boundaries inside chunks): each document's logits are those
    of the document alone. In hybrids the attention mask is block-diagonal and RoPE positions
    restart in each document."""
    model = tiny_model(seed=6, kind=kind).double()
    docs = [[random_ids(1, 7, seed=6), random_ids(1, 9, seed=7)],
            [random_ids(1, 12, seed=8), random_ids(1, 4, seed=9)]]
    packed = torch.cat([torch.cat(row, dim=1) for row in docs])
    seq_idx = torch.tensor([[0] * 7 + [1] * 9, [0] * 12 + [1] * 4])
    with torch.no_grad():
        logits = model(packed, seq_idx=seq_idx).logits
        for row, (a, b) in enumerate(docs):
            torch.testing.assert_close(logits[row, : a.shape[1]], model(a).logits[0], atol=1e-10, rtol=0)
            torch.testing.assert_close(logits[row, a.shape[1] :], model(b).logits[0], atol=1e-10, rtol=0)
        leaky = model(packed).logits[0, 7:]
    assert not torch.allclose(leaky, logits[0, 7:], atol=1e-3)  # without seq_idx the documents do mix
    # training on packed rows: the loss of document b gets no gradient through document a's tokens
    model.train()
    embeds = model.get_input_embeddings()(packed).detach().requires_grad_()
    out = model(inputs_embeds=embeds, seq_idx=seq_idx)
    (grad,) = torch.autograd.grad(out.logits[0, 7:].sum(), embeds)
    assert grad[0, :7].abs().max() == 0 and grad[0, 7:].abs().max() > 0 and grad[1].abs().max() == 0
    with pytest.raises(ValueError, match="seq_idx"):
        model(packed, seq_idx=seq_idx, use_cache=True)
    if model.config.has_attention:
        mask = torch.ones_like(packed)
        mask[1, -2:] = 0
        with pytest.raises(ValueError, match="mark padding as a document of its own in seq_idx"):
            model(packed, seq_idx=seq_idx, attention_mask=mask)


# ------------------------------------------------------------------- training features


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_model(seed=8, kind="hybrid-rope").train()
    ids = random_ids(2, 16, seed=8)
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.backbone.layers)
    loss_ckpt = model(ids, labels=ids).loss
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()))
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    for g1, g2 in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------ save / export


@pytest.mark.parametrize("kind", ["pure", "hybrid-rope"])
def test_save_and_from_pretrained_give_identical_logits(tmp_path, kind):
    model = tiny_model(seed=9, kind=kind)
    model.save_pretrained(tmp_path / "lm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()  # RoPE buffers are recomputed
    assert isinstance(loaded, LmforgeMamba2ForCausalLM) and loaded.config.layer_types == model.config.layer_types
    ids = random_ids(2, 12, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    cls = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2).eval()
    assert isinstance(cls, LmforgeMamba2ForSequenceClassification)
    assert torch.equal(cls.backbone.embeddings.weight, model.backbone.embeddings.weight)


def test_saved_models_load_and_generate_without_lmforge(tmp_path):
    expected = {}
    ids = random_ids(1, 9, seed=11)
    for kind in ("pure", "hybrid-rope"):
        model = tiny_model(seed=10, kind=kind)
        model.save_pretrained(tmp_path / "models" / kind)
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
            expected[kind] = (model(ids).logits[0], greedy)
    saved = json.loads((tmp_path / "models" / "pure" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_mamba2.LmforgeMamba2ForCausalLM"
    for name in ("modeling_mamba2.py", "configuration_mamba2.py", "ssd_scan.py", "causal_conv.py", "attention.py",
                 "feed_forward.py", "modeling_mamba.py", "positions.py", "norms.py"):
        assert (tmp_path / "models" / "hybrid-rope" / name).is_file(), name
    got = run_isolated(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        out = {{}}
        for kind in ("pure", "hybrid-rope"):
            model = AutoModelForCausalLM.from_pretrained(PATH + "/" + kind, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            ids = torch.tensor([{ids[0].tolist()}])
            with torch.no_grad():
                out[kind] = (model(ids).logits[0].tolist(),
                             model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist())
        emit(out)
        """,
        path=tmp_path / "models",
    )
    for kind, (logits, greedy) in expected.items():
        torch.testing.assert_close(torch.tensor(got[kind][0]), logits, atol=1e-6, rtol=0)
        assert got[kind][1] == greedy, kind
