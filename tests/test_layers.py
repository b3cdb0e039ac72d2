"""Shared blocks of lmforge.models (norms, positions, attention, MLP, block, losses, init) against reference formulas and transformers modules."""

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lmforge.models import LmforgeGPTConfig, dropout, losses
from lmforge.models.attention import Attention
from lmforge.models.block import TransformerBlock
from lmforge.models.feed_forward import MLP
from lmforge.models.initialization import init_weights
from lmforge.models.norms import DyT, RMSNorm, build_norm, deepnorm_alpha, deepnorm_beta
from lmforge.models.positions import SinusoidalPositionalEmbedding, alibi_bias, alibi_slopes
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def _config(**overrides) -> LmforgeGPTConfig:
    cfg = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg.update(overrides)
    return LmforgeGPTConfig(**cfg)


def test_rmsnorm_matches_llama():
    x = torch.randn(2, 5, 16)
    ours, ref = RMSNorm(16, eps=1e-5), LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


def test_dyt_formula_and_build_norm_switches():
    norm = DyT(8, bias=True, init_alpha=0.7)
    x = torch.randn(3, 8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    torch.testing.assert_close(norm(x), norm.weight * torch.tanh(0.7 * x) + norm.bias)
    assert isinstance(build_norm(_config(norm_type="rmsnorm")), RMSNorm)
    ln = build_norm(_config(norm_type="layernorm", norm_bias=True, norm_eps=1e-12))
    assert isinstance(ln, nn.LayerNorm) and ln.bias is not None and ln.eps == 1e-12
    assert build_norm(_config(norm_type="layernorm", norm_bias=False)).bias is None
    assert build_norm(_config(norm_type="dyt", norm_bias=False), dim=12).weight.shape == (12,)
    bad = _config()
    bad.norm_type = "batchnorm"
    with pytest.raises(ValueError, match="norm_type='batchnorm'"):
        build_norm(bad)


@pytest.mark.parametrize("heads", [4, 6, 8, 12])
def test_alibi_slopes_match_bloom_and_paper(heads):
    torch.testing.assert_close(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")).float())
    if heads == 8:
        torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))


def test_alibi_bias_is_minus_slope_times_distance():
    bias = alibi_bias(2, q_len=2, kv_len=5, q_offset=3, causal=True)  # queries at 3, 4
    slopes = alibi_slopes(2)
    assert bias.shape == (1, 2, 2, 5)
    torch.testing.assert_close(bias[0, 1, 1], -slopes[1] * torch.tensor([4.0, 3, 2, 1, 0]))
    bidir = alibi_bias(2, q_len=3, kv_len=3, q_offset=0, causal=False)
    torch.testing.assert_close(bidir[0, 0, 0], -slopes[0] * torch.tensor([0.0, 1, 2]))


def test_sinusoidal_table_matches_vaswani():
    emb = SinusoidalPositionalEmbedding(6)(torch.tensor([[0, 3]]))
    assert emb.shape == (1, 2, 6)
    expected = [f(3 / 10000 ** (2 * i / 6)) for i in range(3) for f in (math.sin, math.cos)]
    torch.testing.assert_close(emb[0, 1], torch.tensor(expected))
    torch.testing.assert_close(emb[0, 0], torch.tensor([0.0, 1, 0, 1, 0, 1]))


@pytest.mark.parametrize("act,gated", [("swiglu", True), ("geglu", True), ("gelu", False), ("relu", False)])
def test_mlp_variants(act, gated):
    mlp = MLP(_config(hidden_act=act, mlp_bias=True))
    x = torch.randn(2, 3, 32)
    fn = {"swiglu": nn.functional.silu, "geglu": nn.functional.gelu, "gelu": nn.functional.gelu,
          "relu": torch.relu}[act]
    if gated:
        expected = mlp.down_proj(fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    else:
        assert mlp.gate_proj is None
        expected = mlp.down_proj(fn(mlp.up_proj(x)))
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_eager_equals_sdpa(kv_heads, causal):
    torch.manual_seed(0)
    config = _config(num_key_value_heads=kv_heads, is_causal=causal, position_embedding_type="none")
    attn = Attention(config, layer_idx=0).eval()
    x = torch.randn(2, 7, 32)
    config._attn_implementation = "sdpa"
    sdpa, _ = attn(x)
    config._attn_implementation = "eager"
    eager, weights = attn(x)
    torch.testing.assert_close(sdpa, eager, atol=1e-6, rtol=0)
    future = weights[:, :, 0, 1:].abs().sum()
    assert (future == 0) if causal else (future > 0)


def _bert_and_block(hidden_dropout: float):
    """A BertLayer and a post-norm bidirectional TransformerBlock holding the same weights."""
    torch.manual_seed(0)
    bert_cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48, hidden_act="gelu",
                          layer_norm_eps=1e-12, hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=0.0)
    bert_cfg._attn_implementation = "eager"
    bert = BertLayer(bert_cfg)
    config = _config(num_key_value_heads=4, is_causal=False, norm_position="post", norm_type="layernorm",
                     norm_bias=True, norm_eps=1e-12, hidden_act="gelu", attention_bias=True, mlp_bias=True,
                     hidden_dropout=hidden_dropout, position_embedding_type="learned")
    config._attn_implementation = "eager"
    block = TransformerBlock(config, layer_idx=0)
    pairs = {
        "self_attn.q_proj": bert.attention.self.query, "self_attn.k_proj": bert.attention.self.key,
        "self_attn.v_proj": bert.attention.self.value, "self_attn.o_proj": bert.attention.output.dense,
        "attn_norm": bert.attention.output.LayerNorm, "mlp.up_proj": bert.intermediate.dense,
        "mlp.down_proj": bert.output.dense, "mlp_norm": bert.output.LayerNorm,
    }
    with torch.no_grad():
        for name, ref in pairs.items():
            mine = block.get_submodule(name)
            mine.weight.copy_(ref.weight.data.normal_(0, 0.2) if "norm" not in name else ref.weight)
            mine.bias.copy_(ref.bias.data.normal_(0, 0.1))
    return bert, block


def test_post_norm_block_equals_bert_layer():
    bert, block = _bert_and_block(hidden_dropout=0.0)
    x = torch.randn(2, 6, 32)
    ref = bert.eval()(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(block.eval()(x), ref, atol=1e-5, rtol=0)


def test_post_norm_block_dropout_order_equals_bert_layer(monkeypatch):
    """LN(x + dropout(attn)), LN(h + dropout(mlp)): same dropout calls in the same order as BertLayer
    (lmforge draws its CPU masks differently, so both sides use torch's dropout here)."""
    monkeypatch.setattr("lmforge.models.block.apply_dropout", lambda x, p, training: nn.functional.dropout(x, p, training))
    bert, block = _bert_and_block(hidden_dropout=0.3)
    x = torch.randn(2, 6, 32)
    torch.manual_seed(5)
    ref = bert.train()(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.manual_seed(5)
    got = block.train()(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_deepnorm_residual_scale_and_init_gain():
    n = 6
    assert deepnorm_alpha(n) == pytest.approx((2 * n) ** 0.25)
    assert deepnorm_beta(n) == pytest.approx((8 * n) ** -0.25)
    config = _config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                     num_hidden_layers=n, norm_position="deepnorm", norm_type="layernorm")
    torch.manual_seed(0)
    block = TransformerBlock(config, layer_idx=0).eval()
    for module in block.modules():
        init_weights(module, config)
    xavier = math.sqrt(2 / (256 + 256))
    assert block.self_attn.v_proj.weight.std().item() == pytest.approx(deepnorm_beta(n) * xavier, rel=0.05)
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(xavier, rel=0.05)
    up_xavier = math.sqrt(2 / (256 + 512))
    assert block.mlp.up_proj.weight.std().item() == pytest.approx(deepnorm_beta(n) * up_xavier, rel=0.05)

    x = torch.randn(2, 5, 256)
    alpha = deepnorm_alpha(n)
    h = block.attn_norm(alpha * x + block.self_attn(x)[0])
    expected = block.mlp_norm(alpha * h + block.mlp(h))
    torch.testing.assert_close(block(x), expected)


def test_pre_norm_block_formula():
    torch.manual_seed(0)
    config = _config()
    config._attn_implementation = "eager"
    block = TransformerBlock(config, layer_idx=0).eval()
    x = torch.randn(2, 5, 32)
    h = x + block.self_attn(block.attn_norm(x))[0]
    torch.testing.assert_close(block(x), h + block.mlp(block.mlp_norm(h)))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p_and_rescales(p):
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout.apply_dropout(x, p, training=True)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / (1 - p))  # gradient flows through kept entries only
    torch.manual_seed(0)
    assert torch.equal(dropout.apply_dropout(x, p, training=True), y)  # seeded: reproducible
    assert dropout.apply_dropout(x, p, training=False) is x
    assert dropout.apply_dropout(x, 0.0, training=True) is x
    assert not dropout.apply_dropout(x, 1.0, training=True).any()


@pytest.mark.parametrize("num_items", [None, 37, "tensor"])
@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_lm_losses_equal_transformers_in_value_and_gradient(kind, num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss

    ours, ref = {"causal": (losses.causal_lm_loss, ForCausalLMLoss),
                 "masked": (losses.masked_lm_loss, ForMaskedLMLoss)}[kind]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, generator=g)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100  # padding
    labels[2, 7:] = -100
    n = torch.tensor(37) if num_items == "tensor" else num_items
    grads, values = [], []
    for fn in (ours, ref):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels, vocab_size=50, num_items_in_batch=n)
        loss.backward()
        values.append(loss.detach())
        grads.append(x.grad)
    torch.testing.assert_close(values[0], values[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-6)
    with torch.no_grad():  # evaluation takes torch's path: the same value
        torch.testing.assert_close(ours(logits, labels, vocab_size=50, num_items_in_batch=n), values[1])


def test_lm_loss_backward_in_bf16():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 20, generator=g).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 20, (2, 6), generator=g)
    loss = losses.causal_lm_loss(logits, labels, vocab_size=20)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_lm_loss_second_backward_with_retain_graph_adds_the_same_gradient(kind):
    """The backward rewrites its saved log-probabilities in place only when the graph is freed
    after it: with ``retain_graph=True`` every further backward gives the stock gradient again."""
    from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss

    ours, ref = {"causal": (losses.causal_lm_loss, ForCausalLMLoss),
                 "masked": (losses.masked_lm_loss, ForMaskedLMLoss)}[kind]
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 30, generator=g)
    labels = torch.randint(0, 30, (3, 7), generator=g)
    labels[1, 2:5] = -100
    grads = []
    for fn in (ours, ref):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels, vocab_size=30, num_items_in_batch=11)
        loss.backward(retain_graph=True)
        once = x.grad.clone()
        (again,) = torch.autograd.grad(loss, x, retain_graph=True)
        loss.backward()  # the last one frees the graph (and may reuse the saved tensors)
        torch.testing.assert_close(again, once, atol=0, rtol=0)
        torch.testing.assert_close(x.grad, 2 * once, atol=0, rtol=0)
        grads.append(x.grad)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()  # once the graph is freed: torch's own error, for both losses
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-6)


def test_lm_loss_traces_into_one_graph_under_torch_compile():
    """Dynamo traces the loss's backward with its forward: the keep-graph query (a C builtin it
    cannot call) must not be reached while compiling, or every loss call breaks the graph."""
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(3))
    explained = torch._dynamo.explain(lambda x: losses.causal_lm_loss(x, labels, vocab_size=11))(logits)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_models_train_with_lmforge_loss_and_accept_a_replacement():
    from transformers.loss.loss_utils import ForCausalLMLoss

    from lmforge.models import LmforgeGPTForCausalLM

    config = _config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, vocab_size=40)
    model = LmforgeGPTForCausalLM(config)
    assert model.loss_function is losses.causal_lm_loss
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    ours = model(ids, labels=ids).loss
    model.loss_function = ForCausalLMLoss
    torch.testing.assert_close(model(ids, labels=ids).loss, ours)
