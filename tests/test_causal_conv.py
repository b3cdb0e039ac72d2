"""``causal_conv_silu`` (the Mamba mixers' training convolution, in (batch, length, channels))
equals silu of the causal depthwise ``conv1d`` it replaces: values and all three gradients, in
float64 to rounding, on shapes where the blocks of its weight gradient split rows, lengths shorter
than the kernel, strided inputs, no bias; with packed documents, the document-masked convolution
(``causal_conv_docs``); and under bfloat16 autocast, as the mixers run it."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import causal_conv
from lmforge.models.causal_conv import causal_conv_silu
from lmforge.models.modeling_mamba import causal_conv_docs
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["out", "dx", "dweight", "dbias"]


def _reference(x, weight, bias):
    k, length = weight.shape[-1], x.shape[1]
    out = F.conv1d(x.transpose(1, 2), weight, bias, padding=k - 1, groups=x.shape[-1])[..., :length]
    return F.silu(out).transpose(1, 2)


def _leaves(b, length, c, k, *, bias=True, dtype=torch.float64, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, 2 * c + 3 if strided else c, generator=gen, dtype=dtype)
    x = (x[..., 3 : 3 + 2 * c : 2] if strided else x).detach().requires_grad_()  # a strided view as leaf
    weight = torch.randn(c, 1, k, generator=gen, dtype=dtype, requires_grad=True)
    b_ = torch.randn(c, generator=gen, dtype=dtype, requires_grad=True) if bias else None
    return x, weight, b_


def _values_and_grads(fn, x, weight, bias, seed=1):
    out = fn(x, weight, bias)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    leaves = [v for v in (x, weight, bias) if v is not None]
    return [out, *torch.autograd.grad(out, leaves, g)]


@pytest.mark.parametrize("b, length, c, k", [(2, 37, 5, 4), (3, 2, 4, 4), (1, 9, 3, 2), (2, 5, 6, 1),
                                             (1, 1, 7, 4), (4, 300, 9, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_equals_silu_of_the_causal_conv1d_in_float64(b, length, c, k, bias, strided, monkeypatch):
    monkeypatch.setattr(causal_conv, "BLOCK_ELEMENTS", 4 * c)  # 4-row blocks: the last one is short
    x, weight, b_ = _leaves(b, length, c, k, bias=bias, strided=strided)
    got = _values_and_grads(causal_conv_silu, x, weight, b_)
    want = _values_and_grads(_reference, x, weight, b_)
    assert got[0].shape == (b, length, c)
    for name, g, w in zip(NAMES[: len(got)], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


def _docs_reference(seq_idx):
    def run(x, weight, bias):
        return F.silu(causal_conv_docs(x.transpose(1, 2), weight, bias, seq_idx)).transpose(1, 2)
    return run


SEQ_IDX = {
    "documents": [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]],
    "short documents": [[0, 1, 2, 2, 3, 3, 3, 4, 5, 5, 5, 5, 5, 6], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]],
    "one document": [[3] * 14, [0] * 14],
    "a label again": [[0, 0, 1, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 0], [5, 4, 3, 2, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize("case", list(SEQ_IDX))
@pytest.mark.parametrize("k, bias", [(4, True), (3, False), (1, True)])
def test_packed_documents_equal_the_document_masked_conv_in_float64(case, k, bias):
    seq_idx = torch.tensor(SEQ_IDX[case])
    x, weight, b_ = _leaves(2, 14, 6, k, bias=bias, strided=True)
    got = _values_and_grads(lambda *a: causal_conv_silu(*a, seq_idx=seq_idx), x, weight, b_)
    want = _values_and_grads(_docs_reference(seq_idx), x, weight, b_)
    for name, g, w in zip(NAMES[: len(got)], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
    if case == "one document":  # nothing crosses: the plain convolution
        plain = _values_and_grads(causal_conv_silu, x, weight, b_)
        for g, w in zip(got, plain, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_the_librarys_weight_gradient_used_off_cpu_is_equal_too(monkeypatch):
    monkeypatch.setattr(causal_conv, "BLOCKED_WEIGHT_GRAD", ())  # as on a GPU
    for seq_idx in (None, torch.tensor(SEQ_IDX["documents"])):
        x, weight, b_ = _leaves(2, 14, 6, 4)
        got = _values_and_grads(lambda *a, s=seq_idx: causal_conv_silu(*a, seq_idx=s), x, weight, b_)
        want = _values_and_grads(_docs_reference(seq_idx) if seq_idx is not None else _reference, x, weight, b_)
        for name, g, w in zip(NAMES, got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


def test_gradcheck():
    x, weight, b_ = _leaves(2, 6, 3, 4)
    assert torch.autograd.gradcheck(causal_conv_silu, (x, weight, b_))
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda *a: causal_conv_silu(*a, seq_idx=seq_idx), (x, weight, b_))


def test_float32_at_the_mixers_shape_and_gradient_accumulation():
    """The default block size at a real width (blocks of 170 rows over 256 steps), float32."""
    x, weight, b_ = _leaves(2, 256, 768, 4, dtype=torch.float32)
    got = _values_and_grads(causal_conv_silu, x, weight, b_)
    want = _values_and_grads(_reference, x, weight, b_)
    for name, g, w in zip(NAMES[: len(got)], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4, msg=name)


def test_bfloat16_autocast_runs_in_bfloat16_and_returns_float32_weight_gradients():
    """As conv1d under autocast: bfloat16 values; gradients agree with conv1d's under the same
    autocast to bfloat16 rounding (compared as whole tensors: single entries of a sum of products
    rounded to 8 bits can differ by more)."""
    x, weight, b_ = _leaves(2, 40, 16, 4, dtype=torch.float32)
    def autocast(fn):
        def run(x, weight, bias):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x.to(torch.bfloat16), weight, bias)  # a projection's output under autocast is bfloat16
        return run
    got, want = (_values_and_grads(autocast(fn), x, weight, b_) for fn in (causal_conv_silu, _reference))
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert [g.dtype for g in got[1:]] == [torch.float32] * 3
    for name, g, w in zip(NAMES[: len(got)], got, want, strict=True):
        assert (g.float() - w.float()).norm() <= 1e-2 * w.float().norm(), name


def test_packed_documents_under_bfloat16_autocast():
    seq_idx = torch.tensor(SEQ_IDX["short documents"])
    x, weight, b_ = _leaves(2, 14, 16, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_conv_silu(x.to(torch.bfloat16), weight, b_, seq_idx=seq_idx)
    assert out.dtype == torch.bfloat16
    want = _docs_reference(seq_idx)(x, weight, b_)
    assert (out.float() - want).norm() <= 1e-2 * want.norm()
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="batch, length, channels"):
        causal_conv_silu(torch.zeros(2, 5, 4), torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="batch, length, channels"):
        causal_conv_silu(torch.zeros(5, 4), torch.zeros(4, 1, 4))
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch, length\) = \(2, 5\)"):
        causal_conv_silu(torch.zeros(2, 5, 4), torch.zeros(4, 1, 4), seq_idx=torch.zeros(2, 4, dtype=torch.long))
