"""The Mamba-2 (SSD) scan: the chunked scan equals the sequential reference (values and gradients),
the decoding step continues it, and the reference equals transformers' Mamba-2 torch code."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.mamba2.modeling_mamba2 import (
    mamba2_chunk_scan,
    mamba2_selective_state_update,
)

from lmforge.models.ssd_scan import DEFAULT_CHUNK_SIZE, ssd_scan, ssd_scan_ref, ssd_step
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["y", "final", "dx", "ddt", "dA", "dB", "dC", "dh0"]


def _inputs(b, length, h, p, g, n, *, dtype=torch.float64, h0=False, seed=0, decay_scale=1.0):
    """Leaves x, dt, A, B, C, h0 (None unless ``h0``) requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, h, p, generator=gen, dtype=dtype)
    # time steps as after softplus, spanning slow and fast decay
    dt = torch.nn.functional.softplus(torch.randn(b, length, h, generator=gen, dtype=dtype) * 1.5 - 1.5)
    A = -torch.exp(torch.randn(h, generator=gen, dtype=dtype)) * decay_scale
    B = torch.randn(b, length, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, length, g, n, generator=gen, dtype=dtype)
    state = torch.randn(b, h, p, n, generator=gen, dtype=dtype) if h0 else None
    return [v.requires_grad_() if v is not None else None for v in (x, dt, A, B, C, state)]


def _documents(b, length, seed, p=0.12):
    """(b, l) document index: random boundaries plus two forced ones that differ between rows."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(b, length, generator=gen) < p
    for row in range(b):
        for pos in (1 + row, length // 2 + 3 * row):
            if 0 < pos < length:
                starts[row, pos] = True
    starts[:, 0] = False
    return torch.cumsum(starts.long(), dim=1)


def _values_and_grads(fn, args, seq_idx, seed=1, **kw):
    """y, the final state and the gradients of a random linear function of both."""
    y, final = fn(*args[:5], h0=args[5], seq_idx=seq_idx, **kw)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    gf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    leaves = [a for a in args if a is not None]
    return [y, final, *torch.autograd.grad((y * gy).sum() + (final * gf).sum(), leaves)]


def _assert_close(got, want, atol, rtol=0.0):
    assert len(got) == len(want)
    for name, a, b in zip(NAMES, got, want, strict=False):
        assert a.shape == b.shape, name
        err = (a.to(b.dtype) - b).abs().max().item()
        assert torch.allclose(a.to(b.dtype), b, atol=atol, rtol=rtol), (name, err)


@pytest.mark.parametrize(
    "b, length, h, p, g, n, chunk, h0, docs",
    [
        (2, 37, 4, 3, 2, 5, 8, False, False),  # chunk does not divide l; groups between 1 and h
        (2, 40, 4, 3, 1, 5, 8, True, False),  # chunk divides l; one group; initial state
        (3, 37, 4, 3, 4, 2, 8, True, True),  # one group per head; documents and h0
        (2, 23, 6, 2, 3, 3, 1, True, True),  # chunks of one step
        (2, 20, 2, 3, 1, 4, 64, True, True),  # chunk longer than l: one chunk
        (3, 1, 4, 2, 2, 3, None, True, False),  # one step
        (2, 1, 2, 2, 1, 3, 4, False, True),  # one step, documents (one each)
        (2, 48, 4, 3, 2, 5, 16, False, True),  # documents without h0
        (2, 2 * DEFAULT_CHUNK_SIZE + 3, 4, 2, 2, 4, None, True, True),  # default chunks, padded
    ],
)
def test_chunked_scan_equals_reference_float64(b, length, h, p, g, n, chunk, h0, docs):
    args = _inputs(b, length, h, p, g, n, h0=h0, seed=length + g)
    seq_idx = _documents(b, length, seed=length) if docs else None
    want = _values_and_grads(ssd_scan_ref, args, seq_idx)
    got = _values_and_grads(ssd_scan, args, seq_idx, chunk_size=chunk)
    _assert_close(got, want, atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 3), length=st.integers(1, 40), heads_per_group=st.integers(1, 3), g=st.integers(1, 2),
    p=st.integers(1, 3), n=st.integers(1, 4), chunk=st.integers(1, 20), h0=st.booleans(), docs=st.booleans(),
)
def test_chunked_scan_random_shapes(b, length, heads_per_group, g, p, n, chunk, h0, docs):
    args = _inputs(b, length, heads_per_group * g, p, g, n, h0=h0, seed=b * 1000 + length)
    seq_idx = _documents(b, length, seed=length) if docs else None
    want = _values_and_grads(ssd_scan_ref, args, seq_idx, seed=2)
    got = _values_and_grads(ssd_scan, args, seq_idx, seed=2, chunk_size=chunk)
    _assert_close(got, want, atol=1e-10)


@pytest.mark.parametrize("chunk, h0, docs", [(4, True, True), (3, False, False), (16, True, False)])
def test_scan_gradients_pass_gradcheck(chunk, h0, docs):
    """Finite differences against the hand-written backward, every input."""
    args = _inputs(2, 10, 4, 2, 2, 3, h0=h0, seed=chunk)  # chunks of 4 or 3: the last one padded
    seq_idx = _documents(2, 10, seed=4, p=0.2) if docs else None
    leaves = tuple(a for a in args if a is not None)

    def f(*leaves):
        x, dt, A, B, C, *rest = leaves
        return ssd_scan(x, dt, A, B, C, h0=rest[0] if rest else None, seq_idx=seq_idx, chunk_size=chunk)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


def test_documents_are_independent():
    """A document in the middle of a packed row scans as if alone (zero start, whatever h0 is),
    and no gradient crosses a document boundary; on both scans."""
    x, dt, A, B, C, h0 = _inputs(2, 30, 4, 3, 2, 5, h0=True, seed=11)
    seq_idx = torch.tensor([[0] * 9 + [1] * 13 + [2] * 8, [4] * 20 + [5] * 10])
    for fn, kw in ((ssd_scan_ref, {}), (ssd_scan, {"chunk_size": 8})):
        y, final = fn(x, dt, A, B, C, h0=h0, seq_idx=seq_idx, **kw)
        alone, alone_final = fn(x[:1, 9:22], dt[:1, 9:22], A, B[:1, 9:22], C[:1, 9:22], **kw)
        assert torch.allclose(y[:1, 9:22], alone, atol=1e-12)
        last, last_final = fn(x[1:, 20:], dt[1:, 20:], A, B[1:, 20:], C[1:, 20:], **kw)
        assert torch.allclose(final[1:], last_final, atol=1e-12)
        first, _ = fn(x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], h0=h0, **kw)
        assert torch.allclose(y[0, :9], first[0], atol=1e-12)  # h0 starts the first document
        (gx, gh0) = torch.autograd.grad(y[0, 9:22].sum(), (x, h0))
        assert gx[0, :9].abs().max() == 0 and gx[0, 22:].abs().max() == 0 and gx[0, 9:22].abs().max() > 0
        assert gh0.abs().max() == 0  # h0 does not reach the second document


def test_seq_idx_boundaries_are_where_it_changes():
    """Document indices need not increase: the state is zeroed wherever seq_idx changes."""
    x, dt, A, B, C, h0 = _inputs(1, 12, 2, 2, 1, 3, h0=True, seed=3)
    ids = torch.tensor([[7, 7, 7, 2, 2, 7, 7, 7, 7, 0, 0, 0]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]])
    for fn, kw in ((ssd_scan_ref, {}), (ssd_scan, {"chunk_size": 4})):
        want = fn(x, dt, A, B, C, h0=h0, seq_idx=segments, **kw)
        got = fn(x, dt, A, B, C, h0=h0, seq_idx=ids, **kw)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want, strict=True))


def test_step_by_step_equals_reference():
    x, dt, A, B, C, h0 = _inputs(2, 9, 6, 3, 3, 4, h0=True, seed=5)
    with torch.no_grad():
        y_all, final = ssd_scan_ref(x, dt, A, B, C, h0=h0)
        state, ys = h0, []
        for s in range(9):
            y, state = ssd_step(state, x[:, s], dt[:, s], A, B[:, s], C[:, s])
            ys.append(y)
    assert torch.allclose(torch.stack(ys, 1), y_all, atol=1e-12) and torch.allclose(state, final, atol=1e-12)


@pytest.mark.parametrize("split", [5, 16, 30])
def test_scan_continues_from_a_prefix_state(split):
    """Scanning a prefix, then the rest from its final state, equals scanning the whole sequence."""
    x, dt, A, B, C, h0 = _inputs(2, 37, 4, 3, 2, 5, h0=True, seed=split)
    with torch.no_grad():
        y_all, final_all = ssd_scan(x, dt, A, B, C, h0=h0, chunk_size=8)
        y1, mid = ssd_scan(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], h0=h0, chunk_size=8)
        y2, final = ssd_scan(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], h0=mid, chunk_size=8)
    assert torch.allclose(torch.cat([y1, y2], 1), y_all, atol=1e-12)
    assert torch.allclose(final, final_all, atol=1e-12)


# float32: rounding of one chunk's sums, of the cumulative decays and of the products. Against the
# float64 reference, measured errors stay below ~1e-5 relative to the largest entry of each output
# or gradient; the bound asserted is 1e-4 of that scale (the float32 sequential reference itself
# is off by a few 1e-6 on these inputs).
def _assert_close_relative(got, want, tol=1e-4):
    for name, a, b in zip(NAMES, got, want, strict=False):
        assert torch.isfinite(a).all(), name
        scale = b.abs().max().item()
        err = (a.double() - b).abs().max().item()
        assert err <= tol * scale, (name, err, scale)


@pytest.mark.parametrize("decay_scale, chunk", [(1.0, None), (1.0, 16), (30.0, None)])
def test_float32_scan_close_to_float64_reference(decay_scale, chunk):
    """Also with strong decay (dt * |A| up to ~100 a step): every exponent is <= 0, nothing overflows."""
    args64 = _inputs(2, 150, 4, 8, 2, 16, h0=True, seed=7, decay_scale=decay_scale)
    args32 = [a.detach().float().requires_grad_() for a in args64]
    seq_idx = _documents(2, 150, seed=7, p=0.02)
    want = _values_and_grads(ssd_scan_ref, args64, seq_idx, seed=3)
    got = _values_and_grads(ssd_scan, args32, seq_idx, seed=3, chunk_size=chunk)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _assert_close_relative(got, want)


def test_compute_dtypes():
    """float32 for float32 and lower precisions, float64 stays float64; the same for the step."""
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)):
        x, dt, A, B, C, h0 = (v.detach() for v in _inputs(1, 5, 2, 2, 1, 3, dtype=dtype, h0=True))
        for fn in (ssd_scan_ref, ssd_scan):
            y, final = fn(x, dt, A, B, C, h0=h0)
            assert y.dtype == want and final.dtype == want
        y, state = ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
        assert y.dtype == want and state.dtype == want


def test_float32_under_bfloat16_autocast():
    """Mixed-precision training must not turn the scan's products into bfloat16 ones."""
    x, dt, A, B, C, h0 = _inputs(2, 37, 4, 3, 2, 5, dtype=torch.float32, h0=True, seed=13)
    want = _values_and_grads(ssd_scan, [x, dt, A, B, C, h0], None, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _values_and_grads(ssd_scan, [x, dt, A, B, C, h0], None, chunk_size=8)
        y, state = ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    _assert_close(got, want, atol=1e-6)
    want_y, want_state = ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    assert torch.allclose(y, want_y, atol=1e-6) and torch.allclose(state, want_state, atol=1e-6)


def test_non_contiguous_inputs():
    """Inputs that are slices of a projection (as in the mixer) give the same results."""
    b, length, h, p, g, n = 2, 21, 4, 3, 2, 5
    proj = torch.randn(b, length, h * p + 2 * g * n + h + 7, dtype=torch.float64)
    x, B, C, dt = torch.split(proj[..., :-7], [h * p, g * n, g * n, h], dim=-1)
    x, B, C = x.view(b, length, h, p), B.view(b, length, g, n), C.view(b, length, g, n)
    dt, A = torch.nn.functional.softplus(dt[:, :, :]), -torch.rand(h, dtype=torch.float64)
    assert not x.is_contiguous() and not B.is_contiguous()
    want = ssd_scan(*(v.contiguous() for v in (x, dt, A, B, C)), chunk_size=8)
    got = ssd_scan(x, dt.transpose(0, 1).contiguous().transpose(0, 1), A, B, C, chunk_size=8)
    assert all(torch.allclose(a, w, atol=1e-12) for a, w in zip(got, want, strict=True))


def test_invalid_arguments_raise():
    x, dt, A, B, C, _ = (v.detach() if v is not None else None for v in _inputs(1, 6, 4, 2, 2, 3))
    with pytest.raises(ValueError, match="groups"):
        ssd_scan(x, dt, A, B[:, :, :1].expand(1, 6, 3, 3), C[:, :, :1].expand(1, 6, 3, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="h0"):
        ssd_scan_ref(x, dt, A, B, C, h0=torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="seq_idx"):
        ssd_scan(x, dt, A, B, C, seq_idx=torch.zeros(1, 5, dtype=torch.long))


# ------------------------------------------------------------- transformers as an oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_equals_transformers_chunk_scan(dtype):
    """transformers' Mamba-2 torch scan (``mamba2_chunk_scan``, the chunked SSD of its CPU path,
    called with dt already softplus-ed, no D, no bias) on the same inputs, with an initial state.

    It computes in float32 whatever the inputs (it calls ``.float()``), so the bound is float32
    rounding over these sums: 1e-5 of each output's largest entry (measured: ~1e-6).
    """
    x, dt, A, B, C, h0 = (v.detach() for v in _inputs(2, 45, 4, 3, 2, 6, dtype=dtype, h0=True, seed=9))
    y, final = ssd_scan_ref(x, dt, A, B, C, h0=h0)
    y_hf, final_hf = mamba2_chunk_scan(x, dt, A, B, C, chunk_size=16, initial_states=h0, return_final_states=True)
    for ours, theirs in ((y, y_hf), (final, final_hf)):
        assert (ours.double() - theirs.double()).abs().max() <= 1e-5 * theirs.abs().max()


def test_step_equals_transformers_state_update():
    """transformers' one-token update (``mamba2_selective_state_update``, head-expanded dt and A)."""
    b, h, p, g, n = 2, 4, 3, 2, 5
    x, dt, A, B, C, h0 = (v.detach() for v in _inputs(b, 1, h, p, g, n, h0=True, seed=12))
    y, state = ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    state_hf = h0.clone()
    y_hf = mamba2_selective_state_update(
        state_hf, x[:, 0], dt[:, 0, :, None].expand(b, h, p), A[:, None, None].expand(h, p, n), B[:, 0], C[:, 0]
    )
    # transformers rounds exp(dt * A) to float32: that is the difference
    assert torch.allclose(y, y_hf, rtol=1e-6, atol=1e-6) and torch.allclose(state, state_hf, rtol=1e-6, atol=1e-6)
