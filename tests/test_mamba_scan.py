"""The chunked selective scan equals the sequential reference (values and gradients)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.models.mamba_scan import (
    STEP_ELEMENTS,
    default_chunk_size,
    selective_scan,
    selective_scan_ref,
    selective_state_step,
    seq_idx_to_reset,
)
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(b, length, d, n, *, dtype=torch.float64, h0=False, seed=0, decay_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, d, generator=g, dtype=dtype)
    # time steps as after softplus, spanning slow and fast decay
    dt = torch.nn.functional.softplus(torch.randn(b, length, d, generator=g, dtype=dtype) * 1.5 - 1.5)
    A = -torch.exp(torch.randn(d, n, generator=g, dtype=dtype)) * decay_scale
    B = torch.randn(b, length, n, generator=g, dtype=dtype)
    C = torch.randn(b, length, n, generator=g, dtype=dtype)
    state = torch.randn(b, d, n, generator=g, dtype=dtype) if h0 else None
    return [v.requires_grad_() if v is not None else None for v in (x, dt, A, B, C, state)]


def _random_reset(b, length, p, seed):
    g = torch.Generator().manual_seed(seed)
    seq_idx = torch.cumsum((torch.rand(b, length, generator=g) < p).long(), dim=1)
    return seq_idx_to_reset(seq_idx)


def _values_and_grads(fn, args, reset, seed, **kw):
    """y, final state and the gradients of a random linear function of both."""
    y, h = fn(*args[:5], h0=args[5], reset=reset, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    leaves = [a for a in args if a is not None]
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    return [y, h, *grads]


def _assert_close(got, want, atol, rtol=0.0):
    names = ["y", "h_last", "dx", "ddt", "dA", "dB", "dC", "dh0"]
    for name, a, b in zip(names, got, want, strict=False):
        assert torch.allclose(a.to(b.dtype), b, atol=atol, rtol=rtol), (name, (a - b).abs().max().item())


@pytest.mark.parametrize(
    "b, length, d, n, chunk, block, h0, resets",
    [
        (2, 37, 5, 3, 8, 3, False, False),  # chunk does not divide L, block does not divide chunk
        (2, 40, 4, 4, 8, 8, True, False),  # chunk divides L, initial state
        (1, 16, 3, 2, 64, 8, True, True),  # chunk size above L: one chunk
        (2, 37, 5, 3, 37, 8, True, True),  # one chunk, block does not divide L
        (3, 50, 6, 4, 1, 1, True, True),  # chunk of one step
        (2, 65, 3, 2, None, 8, False, True),  # default chunk size
        (1, 700, 4, 3, None, 8, True, True),  # long sequence, default chunks (44 of 16 steps)
        (2, 1, 3, 2, None, 8, True, True),  # one step (reset at 0 ignores h0)
        (3, 1, 4, 5, 4, 8, False, False),  # one step, no state
    ],
)
def test_chunked_scan_equals_reference_float64(b, length, d, n, chunk, block, h0, resets):
    args = _inputs(b, length, d, n, h0=h0, seed=length)
    reset = _random_reset(b, length, 0.05, seed=length) if resets else None
    want = _values_and_grads(selective_scan_ref, args, reset, seed=1)
    got = _values_and_grads(selective_scan, args, reset, seed=1, chunk_size=chunk, block=block)
    _assert_close(got, want, atol=1e-10)


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 3), length=st.integers(1, 70), d=st.integers(1, 5), n=st.integers(1, 5),
    chunk=st.integers(1, 33), block=st.integers(1, 9), h0=st.booleans(), p_reset=st.sampled_from([0.0, 0.1]),
)
def test_chunked_scan_random_shapes(b, length, d, n, chunk, block, h0, p_reset):
    args = _inputs(b, length, d, n, h0=h0, seed=b * 1000 + length)
    reset = _random_reset(b, length, p_reset, seed=length) if p_reset else None
    want = _values_and_grads(selective_scan_ref, args, reset, seed=2)
    got = _values_and_grads(selective_scan, args, reset, seed=2, chunk_size=chunk, block=block)
    _assert_close(got, want, atol=1e-10)


def test_scan_gradients_pass_gradcheck():
    """Finite differences against the hand-written backward, every input, chunks and one chunk."""
    for chunk, block in ((3, 2), (None, 8)):
        x, dt, A, B, C, h0 = _inputs(2, 11, 3, 2, h0=True, seed=chunk or 0)
        reset = _random_reset(2, 11, 0.15, seed=4)

        def f(x, dt, A, B, C, h0, chunk=chunk, block=block, reset=reset):
            return selective_scan(x, dt, A, B, C, h0=h0, reset=reset, chunk_size=chunk, block=block)

        assert torch.autograd.gradcheck(f, (x, dt, A, B, C, h0), eps=1e-6, atol=1e-7)


def test_float32_scan_close_to_float64_reference():
    args64 = _inputs(2, 300, 8, 16, h0=True, seed=7)
    args32 = [a.detach().float().requires_grad_() for a in args64]
    reset = _random_reset(2, 300, 0.02, seed=7)
    want = _values_and_grads(selective_scan_ref, args64, reset, seed=3)
    got = _values_and_grads(selective_scan, args32, reset, seed=3, chunk_size=32)
    assert got[0].dtype == torch.float32
    _assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_reset_blocks_state_across_documents():
    """With a document boundary, the second document scans as if alone; no gradient crosses back."""
    x, dt, A, B, C, _ = _inputs(1, 30, 4, 3, seed=11)
    seq_idx = torch.tensor([[0] * 12 + [1] * 18])
    y, _ = selective_scan(x, dt, A, B, C, reset=seq_idx_to_reset(seq_idx), chunk_size=8)
    alone, _ = selective_scan(x[:, 12:], dt[:, 12:], A, B[:, 12:], C[:, 12:], chunk_size=8)
    assert torch.allclose(y[:, 12:], alone, atol=1e-12)
    (gx,) = torch.autograd.grad(y[:, 12:].sum(), x)
    assert gx[:, :12].abs().max() == 0 and gx[:, 12:].abs().max() > 0


def test_state_step_continues_the_scan():
    x, dt, A, B, C, h0 = _inputs(2, 9, 4, 3, h0=True, seed=5)
    with torch.no_grad():
        y_all, h_all = selective_scan_ref(x, dt, A, B, C, h0=h0)
        _, h = selective_scan(x[:, :8], dt[:, :8], A, B[:, :8], C[:, :8], h0=h0)
        y, h = selective_state_step(h, x[:, 8], dt[:, 8], A, B[:, 8], C[:, 8])
    assert torch.allclose(y, y_all[:, 8], atol=1e-12) and torch.allclose(h, h_all, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 16])
def test_float32_strong_decay_stays_finite_and_close(chunk):
    """dt * |A| up to ~100 per step: every exponent is <= 0, nothing overflows."""
    args64 = _inputs(2, 96, 8, 16, h0=True, seed=8, decay_scale=20.0)
    args32 = [a.detach().float().requires_grad_() for a in args64]
    want = _values_and_grads(selective_scan_ref, args64, None, seed=4)
    got = _values_and_grads(selective_scan, args32, None, seed=4, chunk_size=chunk)
    assert all(torch.isfinite(v).all() for v in got)
    _assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_default_chunking_keeps_steps_wide():
    """One chunk when a step is wide enough; otherwise chunks side by side, each >= 16 steps."""
    assert default_chunk_size(256, 8 * 512 * 16) == 256
    assert default_chunk_size(2048, 512 * 16) == 2048 // (STEP_ELEMENTS // (512 * 16))
    assert default_chunk_size(40, 1) == 20  # 2 chunks: not shorter than 16 steps
    assert default_chunk_size(1, 1) == 1


def test_backward_saves_no_state_sequence():
    """Memory stays bounded: what the scan keeps for backward is a fraction of the (B, L, D, N) states."""
    b, length, d, n = 2, 256, 32, 16
    args = _inputs(b, length, d, n, dtype=torch.float32, h0=True, seed=9)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y, h = selective_scan(*args[:5], h0=args[5], chunk_size=length, block=8)
    # x, dt, A, B, C, h0 and the state at every 8th step: (256 / 8 + 1) * (B, D, N)
    assert max(saved) == (length // 8 + 1) * b * d * n, saved
    assert sum(saved) < b * length * d * n / 3, saved
    y.sum().backward()
