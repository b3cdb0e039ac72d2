"""Mamba's fast decode path (``MambaDecoder``): the O(1) state step gives token-for-token what
``generate()`` gives (odd prompt lengths, left-padded batches, with and without biases, compiled or
not), logits equal to the full forward, and int8 weights that stay close."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

import lmforge
from lmforge.inference.decoding import MambaDecoder, compiler_available
from lmforge.models import LmforgeMambaConfig, LmforgeMambaForCausalLM
from tests.torch_threads import single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

PRESET = Path(lmforge.__file__).parent / "presets" / "model" / "mamba-debug.yaml"
STEPS = 32


def mamba(seed: int = 0, **changes) -> LmforgeMambaForCausalLM:
    """The mamba-debug preset (2 layers, hidden 64, vocabulary 1024), randomly initialised with
    larger weights (at the default initializer_range of 0.02 greedy decoding repeats one token)
    and random biases (they start at zero)."""
    torch.manual_seed(seed)
    settings = {**yaml.safe_load(PRESET.read_text()), "initializer_range": 0.15, **changes}
    model = LmforgeMambaForCausalLM(LmforgeMambaConfig(**settings)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and ".dt_proj." not in name:
                parameter.normal_(std=0.15)
    return model


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given lengths: input_ids, attention_mask (B, max)."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros((len(lengths), longest), dtype=torch.long)
    mask = torch.zeros((len(lengths), longest), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, longest - n:] = torch.randint(3, 1024, (n,), generator=g)
        mask[i, longest - n:] = 1
    return ids, mask


def greedy(decoder, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (B, steps) and the logits each was picked from (B, steps, V)."""
    logits = decoder.start(ids, mask, steps)
    tokens, all_logits = [], []
    for _ in range(steps):
        token = logits.argmax(-1)
        tokens.append(token)
        all_logits.append(logits)
        logits = decoder.step(token)
    return torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1)


def reference(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("changes", [
    {},  # conv bias, float32 residual
    {"use_bias": True},  # biases in in_proj / out_proj: padding must be zeroed after in_proj
    {"use_conv_bias": False, "residual_in_fp32": False},
], ids=["preset", "biases", "no-conv-bias"])
@pytest.mark.parametrize("lengths", [[7], [9, 2, 5]], ids=["odd-length", "left-padded"])
def test_greedy_equals_generate(changes, lengths):
    model = mamba(**changes)
    ids, mask = padded_batch(lengths)
    want = reference(model, ids, mask, STEPS)
    assert len(set(want.flatten().tolist())) > 5  # not one token repeated: the test can tell
    assert torch.equal(greedy(MambaDecoder(model), ids, mask, STEPS)[0], want)


def test_logits_equal_the_full_forward():
    model = mamba(seed=1, use_bias=True)
    ids, mask = padded_batch([9, 2, 6], seed=2)
    tokens, logits = greedy(MambaDecoder(model), ids, mask, 12)
    seq = torch.cat([ids, tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        full = model(seq, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_int8_weights_stay_close_and_leave_the_model_alone():
    model = mamba(seed=3)
    ids, mask = padded_batch([12, 7])
    tokens, float_logits = greedy(MambaDecoder(model), ids, mask, STEPS)
    int8 = MambaDecoder(model, weights="int8")
    logits = [int8.start(ids, mask, STEPS)]  # teacher-forced with the float decoder's tokens
    logits += [int8.step(token) for token in tokens[:, :-1].unbind(1)]
    int8_logits = torch.stack(logits, dim=1)
    error = (int8_logits - float_logits).abs().max()
    assert 0 < error < 0.05 * float_logits.abs().max()
    assert (int8_logits.argmax(-1) == tokens).float().mean() > 0.9
    mixer = int8.model.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.int8 and mixer.dt_proj.weight.dtype == torch.float32
    assert all(type(m).__name__ != "DecodeLinear" for m in model.modules())


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C++ compiler")
def test_compiled_step_equals_generate(caplog):
    model = mamba(seed=4, use_bias=True)
    decoder = MambaDecoder(model, compile=True)
    with caplog.at_level(logging.WARNING, logger="lmforge.inference.decoding"):
        for seed, lengths in ((0, [11, 4]), (5, [3, 8])):  # the second batch reuses the compiled step
            ids, mask = padded_batch(lengths, seed=seed)
            assert torch.equal(greedy(decoder, ids, mask, STEPS)[0], reference(model, ids, mask, STEPS))
    assert "torch.compile failed" not in caplog.text
