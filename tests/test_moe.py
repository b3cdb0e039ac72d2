"""Mixture-of-experts GPT: equal to transformers' Mixtral on the same weights (logits, routing, loss,
aux loss, gradients, generation), the expert dispatch against a dense float64 oracle, the router
variants, padding, gradient accumulation and checkpointing, conversion refusals, and the trainer's
expert-load statistics and aux-loss-free bias updates."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lmforge.data.collators import CausalLMCollator
from lmforge.models import (
    LmforgeGPTConfig,
    LmforgeGPTForCausalLM,
    LmforgeGPTForSequenceClassification,
)
from lmforge.models.convert import from_hf, to_hf
from lmforge.models.feed_forward import MoE
from lmforge.train import BatchStream, LoopConfig, OptimConfig, Trainer
from lmforge.train.moe_stats import ExpertLoad
from tests.test_grad_parity import _assert_same_grads, _causal_batches, _concat, _in_stock_names
from tests.torch_threads import single_thread  # noqa: F401
from tests.train_fixtures import perturb

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 97  # as tests/test_grad_parity.py's batches
PAD = 0
ATOL = 1e-5


def _config(**overrides) -> LmforgeGPTConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
              num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24, router_aux_loss_coef=0.1)
    return LmforgeGPTConfig(**{**kw, **overrides})


def _moe_lm(seed: int = 0, **overrides) -> LmforgeGPTForCausalLM:
    torch.manual_seed(seed)
    return perturb(LmforgeGPTForCausalLM(_config(**overrides)), seed)


def _mixtral_pair(seed: int = 0):
    ours = _moe_lm(seed)
    hf = to_hf(ours)
    hf.model.embed_tokens.padding_idx = None  # stock: the pad row never trains (tests/test_grad_parity.py)
    return ours, hf


def _picks(logits: torch.Tensor, k: int = 2) -> torch.Tensor:
    return torch.topk(logits.softmax(-1), k).indices


# ----------------------------------------------------------------------------- Mixtral parity


def test_mixtral_parity_logits_routing_loss_aux_and_round_trips():
    ours, hf = _mixtral_pair()
    ours.eval(), hf.eval()
    assert isinstance(hf, transformers.MixtralForCausalLM) and hf.config.num_local_experts == 5
    batch = _concat(_causal_batches())  # 6 rows, left and right padding, -100 labels inside rows
    with torch.no_grad():
        got = ours(**batch, output_router_logits=True)
        want = hf(**batch, output_router_logits=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], want.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)  # cross-entropy + 0.1 x aux
    assert got.aux_loss > 0.1 and len(got.router_logits) == len(want.router_logits) == 2
    flat_real = real.reshape(-1)
    for mine, theirs in zip(got.router_logits, want.router_logits, strict=True):
        assert torch.equal(_picks(mine)[flat_real], _picks(theirs)[flat_real])  # the same experts
    # our aux loss is Mixtral's function of the router logits
    reference = load_balancing_loss_func(got.router_logits, 5, 2, batch["attention_mask"])
    torch.testing.assert_close(got.aux_loss, reference, atol=1e-6, rtol=0)

    back = from_hf(to_hf(ours))
    assert back.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    stock = transformers.MixtralForCausalLM(hf.config)
    perturb(stock, 7)
    again = to_hf(from_hf(stock))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in stock.state_dict().items())


def test_greedy_generation_equals_mixtral_and_cached_decoding_equals_full_forward():
    ours, hf = _mixtral_pair(seed=1)
    ours.eval(), hf.eval()
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, PAD)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    generated = ours.generate(ids, **kw)
    assert torch.equal(generated, hf.generate(ids, **kw))

    full_mask = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = ours(generated, attention_mask=full_mask).logits
        step = ours(generated[:, :7], attention_mask=full_mask[:, :7], use_cache=True)
        cache, pieces = step.cache, [step.logits]
        for t in range(7, generated.shape[1]):
            step = ours(generated[:, t:t + 1], attention_mask=full_mask[:, :t + 1], cache=cache, use_cache=True)
            pieces.append(step.logits)
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=ATOL, rtol=0)


def test_one_training_step_gives_mixtrals_gradient_of_every_parameter():
    ours, hf = _mixtral_pair(seed=2)
    ours.train(), hf.train()
    batch = _concat(_causal_batches())
    grads = []
    for model, extra in ((ours, {}), (hf, {"output_router_logits": True})):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **extra)
        out.loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert ours.model.layers[0].mlp.gate.weight.grad.abs().max() > 0
    _assert_same_grads(_in_stock_names(ours, grads[0]), grads[1], "mixtral, one step")


def test_sequence_classifier_equals_mixtrals_and_adds_the_router_loss():
    torch.manual_seed(0)
    ours = perturb(LmforgeGPTForSequenceClassification(_config(num_labels=3)), 3).eval()
    hf = to_hf(ours).eval()
    assert isinstance(hf, transformers.MixtralForSequenceClassification)
    batch = _concat(_causal_batches())
    batch["labels"] = torch.tensor([0, 1, 2, 2, 1, 0])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        got, want = ours(**batch), hf(**batch)
        torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
        router_logits = ours.model(**inputs, output_router_logits=True).router_logits
        ours.config.router_aux_loss_coef = 0.0
        plain = ours(**batch).loss
    torch.testing.assert_close(plain, want.loss, atol=ATOL, rtol=0)  # Mixtral's classifier has no aux loss
    aux = load_balancing_loss_func(router_logits, 5, 2, batch["attention_mask"])
    torch.testing.assert_close(got.loss - plain, 0.1 * aux, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ dispatch and routing oracles


def _oracle(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """An independent MoE: the router's probabilities, a dense (N, E) weight matrix (0 off the top-k),
    every expert on every token (its own einsum), the shared experts added."""
    e = moe.experts
    probs = torch.softmax(x @ moe.gate.weight.T, dim=-1)  # (N, E)
    top = torch.topk(probs, moe.gate.top_k, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True) if moe.gate.norm_topk_prob else top.values
    dense = torch.zeros_like(probs).scatter(1, top.indices, weights)
    act = e.act_fn
    if e.gated:
        gate, up = torch.einsum("nd,efd->nef", x, e.gate_up_proj).chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(torch.einsum("nd,efd->nef", x, e.up_proj))
    out = torch.einsum("nef,edf,ne->nd", h, e.down_proj, dense)
    if moe.shared_experts is not None:
        s = moe.shared_experts
        hidden = act(s.gate_proj(x)) * s.up_proj(x) if s.gated else act(s.up_proj(x))
        out = out + s.down_proj(hidden)
    return out


@pytest.mark.parametrize("overrides", [
    dict(num_experts=5, num_experts_per_tok=2),
    dict(num_experts=5, num_experts_per_tok=1),  # top-1 (Switch)
    dict(num_experts=3, num_experts_per_tok=3),  # k = E: every expert on every token
    dict(num_experts=6, num_experts_per_tok=2, num_shared_experts=2),
    dict(num_experts=5, num_experts_per_tok=2, norm_topk_prob=False),
    dict(num_experts=7, num_experts_per_tok=3, hidden_act="gelu"),  # ungated experts
], ids=["top2", "top1", "k=E", "shared", "no-renorm", "ungated"])
def test_moe_layer_equals_a_dense_float64_oracle_forward_and_backward(overrides):
    torch.manual_seed(0)
    moe = MoE(_config(**overrides)).double()
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    got = moe(x)
    want = _oracle(moe, x.reshape(-1, 32)).view_as(got)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    cotangent = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, *moe.parameters()], cotangent)
    oracle_grads = torch.autograd.grad(want, [x, *moe.parameters()], cotangent)
    for name, g, o in zip(["x", *dict(moe.named_parameters())], grads, oracle_grads, strict=True):
        torch.testing.assert_close(g, o, atol=1e-12, rtol=0, msg=name)

    # the experts' own dense reference (every expert weighted by the routing), with idle experts
    _, weights, experts = moe.gate(x[0, :2].detach())  # 2 tokens: at most 2k of the experts work
    tokens = x[0, :2].detach()
    torch.testing.assert_close(moe.experts(tokens, experts, weights),
                               moe.experts.reference_forward(tokens, experts, weights), atol=1e-12, rtol=0)


def test_z_loss_is_the_mean_squared_logsumexp_of_the_real_tokens():
    model = _moe_lm(seed=4, router_z_loss_coef=0.01).eval()
    batch = _concat(_causal_batches())
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
        real = batch["attention_mask"].reshape(-1).bool()
        z = torch.stack([torch.logsumexp(r[real], -1).square().mean() for r in out.router_logits]).mean()
        torch.testing.assert_close(out.z_loss, z, atol=1e-6, rtol=0)
        model.config.router_z_loss_coef = 0.0
        without = model(**batch).loss
    torch.testing.assert_close(out.loss - without, 0.01 * z, atol=1e-6, rtol=0)


def _aux_by_hand(router_logits, k, real, per_layer):
    """Float64 load-balancing loss: pooled over layers (Mixtral) or each layer's, averaged."""
    f, p = [], []
    for logits in router_logits:
        probs = logits[real].double().softmax(-1)
        picks = torch.topk(probs, k).indices
        f.append(torch.stack([(picks == e).sum() for e in range(probs.shape[-1])]).double() / len(probs))
        p.append(probs.mean(0))
    f, p = torch.stack(f), torch.stack(p)  # (L, E)
    e = f.shape[-1]
    return e * (f * p).sum(-1).mean() if per_layer else e * (f.mean(0) * p.mean(0)).sum()


@pytest.mark.parametrize("per_layer", [False, True])
def test_aux_loss_pooled_or_per_layer_equals_the_formula_over_real_tokens(per_layer):
    model = _moe_lm(seed=8, num_hidden_layers=3, router_aux_loss_per_layer=per_layer).eval()
    batch = _concat(_causal_batches())
    real = batch["attention_mask"].reshape(-1).bool()
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
        want = _aux_by_hand(out.router_logits, 2, real, per_layer)
        torch.testing.assert_close(out.aux_loss.double(), want, atol=1e-6, rtol=0)
        other = _aux_by_hand(out.router_logits, 2, real, not per_layer)
        assert abs(float(want - other)) > 1e-4  # the two scopes differ on this batch
        model.config.router_aux_loss_coef = 0.0
        without = model(**batch).loss
    torch.testing.assert_close(out.loss - without, 0.1 * out.aux_loss, atol=1e-6, rtol=0)


def test_per_layer_aux_loss_sees_the_imbalance_pooling_hides():
    """Two layers routing every token to opposite experts: pooled, the load looks balanced (aux near
    k = 1, its balanced value); per layer, each layer uses one expert (aux near E = 2)."""
    from lmforge.models.feed_forward import router_losses

    n = 64
    to_first = torch.tensor([[8.0, -8.0]]).expand(n, 2)
    layers = (to_first, to_first.flip(-1))
    pooled, _, counts = router_losses(layers, 1, [None, None])
    per_layer, _, _ = router_losses(layers, 1, [None, None], per_layer=True)
    assert counts.tolist() == [[n, 0], [0, n]]
    assert abs(float(pooled) - 1.0) < 1e-3 and abs(float(per_layer) - 2.0) < 1e-3
    ties = (torch.zeros(n, 2), torch.zeros(n, 2))  # equal scores: top-1 picks expert 0 every time
    spread = (torch.randn(n, 2, generator=torch.Generator().manual_seed(0)) * 1e-3,) * 2
    for logits in (ties, spread):
        a, _, _ = router_losses(logits, 1, [None, None])
        b, _, _ = router_losses(logits, 1, [None, None], per_layer=True)
        torch.testing.assert_close(a, b)  # identical layers: the scopes agree


def test_padding_changes_neither_the_router_losses_nor_the_load_of_real_tokens():
    model = _moe_lm(seed=5).train()
    rows = [torch.randint(1, VOCAB, (n,)) for n in (9, 4, 6)]

    def padded(width: int, pad: int) -> dict:  # right padding: real tokens never see the pads
        ids = torch.full((3, width), pad)
        mask = torch.zeros(3, width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask}

    results = []
    for width, pad in ((9, 0), (14, 5)):
        out = model(**padded(width, pad))
        results.append((out.aux_loss, out.z_loss, [layer.mlp.take_load() for layer in model.model.layers]))
    (aux1, z1, load1), (aux2, z2, load2) = results
    torch.testing.assert_close(aux1, aux2, atol=1e-6, rtol=0)
    torch.testing.assert_close(z1, z2, atol=1e-6, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(load1, load2, strict=True))
    assert all(int(load.sum()) == 2 * 19 for load in load1)  # k picks of each of the 19 real tokens
    model(**{k: v for k, v in padded(14, 5).items() if k != "attention_mask"})  # without a mask: pads count
    assert all(int(layer.mlp.take_load().sum()) == 2 * 42 for layer in model.model.layers)
    model.eval()
    with torch.no_grad():
        model(**padded(9, 0), labels=padded(9, 0)["input_ids"])  # eval: a loss, no counting
    assert all(int(layer.mlp.take_load().sum()) == 0 for layer in model.model.layers)


# ------------------------------------------------- gradient accumulation and gradient checkpointing


def _targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def test_accumulated_router_term_is_each_micro_batch_weighted_by_its_share_of_targets():
    model = _moe_lm(seed=6, router_z_loss_coef=0.01).eval()
    batches = _causal_batches()
    n = [_targets(b) for b in batches]
    assert n[0] != n[1]
    with torch.no_grad():
        total = 0.0
        expected = 0.0
        for batch, count in zip(batches, n, strict=True):
            out = model(**batch, num_items_in_batch=torch.tensor(sum(n)))
            total += out.loss
            logits = out.logits[:, :-1].reshape(-1, VOCAB)
            ce_sum = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), reduction="sum")
            expected += ce_sum / sum(n) + count / sum(n) * (0.1 * out.aux_loss + 0.01 * out.z_loss)
    torch.testing.assert_close(total, expected, atol=1e-6, rtol=0)


def test_accumulation_of_the_z_loss_equals_one_big_batch_without_padding():
    """Unpadded micro-batches of 1 and 3 rows: different target counts but the same ratio of real
    tokens to targets, so the target-weighted z-loss (and the cross-entropy) accumulate to the big
    batch's exactly. (With -100 labels or padding the ratios differ, and so does the z term.)"""
    model = _moe_lm(seed=7, router_aux_loss_coef=0.0, router_z_loss_coef=0.05).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (4, 10), generator=g)
    labels = ids.clone()
    halves = [{"input_ids": ids[:1], "labels": labels[:1]}, {"input_ids": ids[1:], "labels": labels[1:]}]

    def grads(batches, num_items=None):
        model.zero_grad(set_to_none=True)
        for b in batches:
            model(**b, **({} if num_items is None else {"num_items_in_batch": num_items})).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    accumulated = grads(halves, num_items=sum(_targets(b) for b in halves))
    big = grads([{"input_ids": ids, "labels": labels}])
    _assert_same_grads(accumulated, big, "z-loss accumulated vs one batch")


def test_gradient_checkpointing_keeps_every_gradient_of_the_router_losses():
    batch = _concat(_causal_batches())
    grads = []
    for checkpointing in (False, True):
        model = _moe_lm(seed=8, router_z_loss_coef=0.01).train()
        if checkpointing:
            model.activation_checkpointing_enable()  # non-reentrant: transformers' default
        model(**batch).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    _assert_same_grads(grads[1], grads[0], "checkpointed vs plain")
    router = "model.layers.1.mlp.gate.weight"
    model.config.router_aux_loss_coef = model.config.router_z_loss_coef = 0.0
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    assert (model.get_parameter(router).grad - grads[1][router]).abs().max() > 1e-4  # the router losses count


# --------------------------------------------------------------------- config, conversion, dense


@pytest.mark.parametrize("overrides,field", [
    (dict(num_experts=-1), "num_experts"),
    (dict(num_experts=2.5), "num_experts"),
    (dict(num_experts_per_tok=6), "num_experts_per_tok"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
    (dict(router_z_loss_coef=float("nan")), "router_z_loss_coef"),
    (dict(router_bias_update_rate=-1e-3), "router_bias_update_rate"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    (dict(router_aux_loss_per_layer=1), "router_aux_loss_per_layer"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_config_refuses_bad_expert_settings(overrides, field):
    with pytest.raises(ValueError, match=field):
        _config(**overrides)


def test_a_dense_config_ignores_the_expert_settings():
    config = _config(num_experts=0, num_experts_per_tok=9, mlp_bias=True)  # top-k unused: no error
    model = LmforgeGPTForCausalLM(config)
    names = list(model.state_dict())
    assert not [n for n in names if "gate." in n or "experts" in n]
    assert [n for n, _ in model.named_buffers()] == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    ids = torch.randint(1, VOCAB, (2, 6))
    out = model(ids, labels=ids, output_router_logits=True)
    assert type(out) is transformers.modeling_outputs.CausalLMOutputWithPast and list(out.keys()) == [
        "loss", "logits", "cache"]
    assert isinstance(to_hf(model), transformers.LlamaForCausalLM)


@pytest.mark.parametrize("overrides,field", [
    (dict(num_shared_experts=1), "num_shared_experts=1.*Qwen2-MoE.*sigmoid"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(router_z_loss_coef=1e-3), "router_z_loss_coef"),
    (dict(router_bias_update_rate=1e-3), "router_bias_update_rate"),
    (dict(router_aux_loss_per_layer=True), "router_aux_loss_per_layer"),
    (dict(position_embedding_type="learned"), "position_embedding_type"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_to_mixtral_refuses_what_mixtral_cannot_represent(overrides, field):
    with pytest.raises(ValueError, match=field):
        to_hf(LmforgeGPTForCausalLM(_config(num_hidden_layers=1, **overrides)))


def test_from_mixtral_refuses_router_jitter_and_sliding_windows():
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4)
    for overrides, field in ((dict(router_jitter_noise=0.1), "router_jitter_noise"),
                             (dict(sliding_window=8), "sliding_window")):
        stock = transformers.MixtralForCausalLM(transformers.MixtralConfig(**base, **overrides))
        with pytest.raises(ValueError, match=field):
            from_hf(stock)


@pytest.mark.parametrize("position", ["pre", "deepnorm"])
def test_experts_and_router_are_initialised_like_the_dense_mlp(position):
    """normal(0.02), or under DeepNorm xavier_normal_ with gain (8N)^(-1/4) as each (F, D) matrix of
    the dense MLP (F = 24 on both sides); the router normal(0.02) either way."""
    torch.manual_seed(0)
    dense = LmforgeGPTForCausalLM(_config(num_experts=0, intermediate_size=24, norm_position=position))
    moe = LmforgeGPTForCausalLM(_config(num_shared_experts=1, norm_position=position)).model.layers[0].mlp
    std = lambda weight: float(weight.detach().std())  # noqa: E731
    want = std(dense.model.layers[0].mlp.gate_proj.weight)
    assert want == pytest.approx(0.02 if position == "pre" else 0.5 * (2 / (32 + 24)) ** 0.5, rel=0.1)
    for weight in (moe.experts.gate_up_proj, moe.experts.down_proj, moe.shared_experts.down_proj.weight):
        assert std(weight) == pytest.approx(want, rel=0.1)
    assert std(moe.gate.weight) == pytest.approx(0.02, rel=0.1)


def test_selection_bias_is_saved_and_restored(tmp_path):
    model = _moe_lm(seed=9, router_bias_update_rate=1e-3).eval()
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, 0.5]))
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
    model.save_pretrained(tmp_path)
    loaded = LmforgeGPTForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.layers[1].mlp.gate.e_score_correction_bias, bias)
    ids = torch.randint(1, VOCAB, (2, 8))
    with torch.no_grad():  # equal weights; matmul kernels may round differently on reloaded memory
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_moe_debug_preset_builds_and_converts_to_mixtral():
    import yaml
    from transformers import AutoConfig

    from lmforge.presets import find_preset

    fields = yaml.safe_load(find_preset("model", "gpt-moe-debug").read_text())
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = LmforgeGPTForCausalLM(config)
    assert isinstance(model.model.layers[0].mlp, MoE) and config.num_experts == 4
    assert isinstance(to_hf(model), transformers.MixtralForCausalLM)


# ------------------------------------------------------------------------------- the trainer


def _rows(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, VOCAB, (int(length),), generator=g).tolist()}
            for length in torch.randint(5, 12, (n,), generator=g)]


def _fit(model, tmp_path, steps: int = 2) -> list[dict]:
    cfg = LoopConfig(micro_batch_size=4, grad_accum_steps=2, max_steps=steps, log_every=1, save_every=0,
                     progress=False)
    stream = BatchStream(_rows(), 4, CausalLMCollator(PAD), shuffle=False, grad_accum_steps=2)
    Trainer(model, stream, cfg, OptimConfig(lr=1e-3, warmup_steps=0), tmp_path).fit()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_expert_load_figures_are_window_means_and_loads_relative_to_uniform():
    model = _moe_lm(seed=13).train()
    expert_load = ExpertLoad(model)
    losses, counts = [], torch.zeros(2, 5)
    for batch in _causal_batches():
        with torch.no_grad():  # training mode counts with or without gradients
            out = model(**batch, output_router_logits=True)
        losses.append((float(out.aux_loss), float(out.z_loss)))
        real = batch["attention_mask"].reshape(-1).bool()
        for layer, logits in enumerate(out.router_logits):  # the picks of the real tokens, counted again
            counts[layer] += torch.bincount(_picks(logits)[real].reshape(-1), minlength=5)
    load = counts * 5 / counts.sum(1, keepdim=True)
    two_processes = lambda values: [2 * v for v in values]  # noqa: E731  (the same counts on two processes)
    figures = expert_load.figures(two_processes)
    assert figures == pytest.approx({"moe_aux_loss": sum(a for a, _ in losses) / 2,
                                     "moe_z_loss": sum(z for _, z in losses) / 2,
                                     "moe_load_max": float(load.max()), "moe_load_min": float(load.min())})
    assert expert_load.figures(two_processes) == {}  # read and reset


def test_trainer_logs_router_losses_and_expert_load(tmp_path):
    records = [r for r in _fit(_moe_lm(seed=10), tmp_path) if "loss" in r]
    assert len(records) == 2
    for r in records:
        assert 0 < r["moe_aux_loss"] <= 5 and r["moe_z_loss"] > 0  # aux <= E: sum f <= k, each P <= 1... <= E
        assert 0 <= r["moe_load_min"] < 1 < r["moe_load_max"] <= 5 / 2  # top-2: at most E/k


def test_trainer_with_a_router_forced_to_one_expert_logs_load_max_e_and_moves_the_bias(tmp_path):
    model = _moe_lm(seed=11, num_experts_per_tok=1, router_bias_update_rate=1e-2)
    for layer in model.model.layers:  # the selection bias outweighs any probability: expert 3 takes all
        layer.mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0]))
    records = [r for r in _fit(model, tmp_path) if "loss" in r]
    assert [(r["moe_load_max"], r["moe_load_min"]) for r in records] == [(5.0, 0.0), (5.0, 0.0)]
    for layer in model.model.layers:  # two steps of rate * sign(mean load - load)
        torch.testing.assert_close(layer.mlp.gate.e_score_correction_bias,
                                   torch.tensor([0.02, 0.02, 0.02, 10.0 - 0.02, 0.02]), atol=1e-6, rtol=0)


def test_a_dense_model_logs_no_expert_figures(tmp_path):
    torch.manual_seed(0)
    records = [r for r in _fit(LmforgeGPTForCausalLM(_config(num_experts=0)), tmp_path, steps=1) if "loss" in r]
    assert records and not any(k.startswith("moe_") for k in records[0])


def test_lora_default_targets_leave_router_and_experts_frozen():
    from peft import LoraConfig, TaskType, get_peft_model

    from lmforge.train.finetune import DEFAULT_LORA_TARGETS

    model = _moe_lm(seed=12, num_shared_experts=1)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4,
                                                  target_modules=DEFAULT_LORA_TARGETS["lmforge_gpt"]))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "self_attn" in n for n in trained)
    batch = _concat(_causal_batches())
    out = peft_model(**batch)
    out.loss.backward()
    assert out.aux_loss is not None and all(p.grad is not None for n, p in peft_model.named_parameters() if
                                             p.requires_grad)
