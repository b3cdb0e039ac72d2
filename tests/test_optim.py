"""The optimizers and schedules: Muon's parameter split, the combined Muon + AdamW optimizer
against the two torch optimizers it wraps, its state round trip, gradient accumulation with Muon,
the warmup-stable-decay schedule (also under the time budget) and the refusals."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import lmforge.models  # noqa: F401  (registers the families)
from lmforge.data.collators import CausalLMCollator
from lmforge.errors import LmforgeError
from lmforge.train import BatchStream, LoopConfig, OptimConfig, PretrainConfig, Trainer
from lmforge.train.optim import (
    MuonWithAdamW,
    Schedule,
    build_optimizer,
    build_scheduler,
    muon_parameters,
    refit_schedule,
)
from tests.train_fixtures import gpt_tokenizer, make_corpus

MUON = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, warmup_steps=0, weight_decay=0.1)


def tiny(family: str, vocab: int = 97, **kw) -> nn.Module:
    from lmforge.models import (
        LmforgeBertConfig,
        LmforgeBertForMaskedLM,
        LmforgeGPTConfig,
        LmforgeGPTForCausalLM,
        LmforgeGPTForSequenceClassification,
        LmforgeMambaConfig,
        LmforgeMambaForCausalLM,
    )

    torch.manual_seed(0)
    if family.startswith("gpt"):
        cfg = LmforgeGPTConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
        return LmforgeGPTForSequenceClassification(cfg) if family == "gpt-classifier" else LmforgeGPTForCausalLM(cfg)
    if family == "bert":
        cfg = LmforgeBertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, **kw)
        return LmforgeBertForMaskedLM(cfg)
    return LmforgeMambaForCausalLM(LmforgeMambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=8, **kw))


def split(model: nn.Module) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in muon_parameters(model)}
    return muon, set(names.values()) - muon


# ------------------------------------------------------------------------- which parameter goes where


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_block_matrices_and_adamw_the_rest_gpt(tied):
    model = tiny("gpt", tie_word_embeddings=tied, attention_bias=True, mlp_bias=True)
    muon, adamw = split(model)
    projections = {f"model.layers.{i}.{m}.weight" for i in range(2)
                   for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert muon == projections
    assert "model.embed_tokens.weight" in adamw
    assert ("lm_head.weight" in adamw) != tied  # an untied head is AdamW's too (tied: it is the embedding)
    assert any(n.endswith("bias") for n in adamw) and any("norm" in n for n in adamw)


def test_muon_split_for_bert_mamba_and_a_classification_head():
    muon, adamw = split(tiny("bert"))
    assert muon and all(".layers." in n and n.endswith("proj.weight") for n in muon)
    assert not any("embed" in n or "norm" in n or "head" in n or "pooler" in n for n in muon)

    muon, adamw = split(tiny("mamba"))
    assert muon == {f"backbone.layers.{i}.mixer.{m}.weight" for i in range(2)
                    for m in ("in_proj", "x_proj", "dt_proj", "out_proj")}
    assert {"backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.conv1d.weight"} <= adamw  # 2-D / 3-D, not linear

    muon, adamw = split(tiny("gpt-classifier", num_labels=3))
    assert "score.weight" in adamw and not any("score" in n for n in muon)


def test_frozen_parameters_go_to_neither_optimizer():
    model = tiny("gpt")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    optimizer = build_optimizer(model, MUON)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.model.layers[0].self_attn.q_proj.weight) not in held
    assert id(model.model.embed_tokens.weight) not in held
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_the_split_is_printed_at_start(capsys):
    build_optimizer(tiny("gpt"), MUON, log=True)
    out = capsys.readouterr().out
    assert "Muon (lr 0.02) on 14 block matrices" in out and "AdamW (lr 0.003)" in out


def test_param_groups_keep_adamw_first_with_its_decay_rule():
    model = tiny("gpt", tie_word_embeddings=False)
    optimizer = build_optimizer(model, MUON)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]
    (lr0, wd0, decayed), (lr1, wd1, plain), (lr2, wd2, matrices) = groups
    assert (lr0, wd0, decayed) == (3e-3, 0.1, {"lm_head.weight"})  # the head: AdamW, decayed
    assert lr1 == 3e-3 and wd1 == 0.0 and "model.embed_tokens.weight" in plain
    assert lr2 == 0.02 and wd2 == 0.1 and len(matrices) == 14


# ------------------------------------------------------------------------- the combined optimizer


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, 16), generator=gen) for _ in range(n)]


def run_steps(model: nn.Module, optimizers: list[torch.optim.Optimizer], data: list[torch.Tensor]) -> None:
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def torch_newton_schulz_in(dtype: torch.dtype):
    """torch.optim.Muon's own orthogonalization with its bfloat16 cast replaced by ``dtype``."""
    from torch.optim import _muon

    original = _muon._zeropower_via_newtonschulz

    def newton_schulz(grad, ns_coefficients, ns_steps, eps):
        with torch.autocast("cpu", enabled=False):
            real_bfloat16 = torch.Tensor.bfloat16
            torch.Tensor.bfloat16 = lambda t: t.to(dtype)
            try:
                return original(grad, ns_coefficients, ns_steps, eps)
            finally:
                torch.Tensor.bfloat16 = real_bfloat16

    return newton_schulz


@pytest.mark.parametrize("ns_dtype", ["auto", "bfloat16"])
def test_combined_optimizer_equals_torch_muon_plus_torch_adamw(monkeypatch, ns_dtype):
    """The reference path: torch.optim.Muon and torch.optim.AdamW stepped side by side over the
    same split. On the CPU lmforge orthogonalizes in float32 (torch: bfloat16), so the reference's
    Newton-Schulz runs in float32 too; the rest of the step is torch's own code. Batching the
    same-shaped matrices changes only float rounding: float32 noise, or a few bfloat16 steps of
    the update when both run in bfloat16."""
    from torch.optim import _muon

    data = batches(5)
    ours = tiny("gpt")
    run_steps(ours, [build_optimizer(ours, dataclasses.replace(MUON, muon_ns_dtype=ns_dtype))], data)

    ref = tiny("gpt")
    matrices = muon_parameters(ref)
    ids = {id(p) for p in matrices}
    from lmforge.train.optim import param_groups

    if ns_dtype == "auto":  # float32 on the CPU
        monkeypatch.setattr(_muon, "_zeropower_via_newtonschulz", torch_newton_schulz_in(torch.float32))
    muon = torch.optim.Muon(matrices, lr=0.02, momentum=0.95, weight_decay=0.1)
    adamw = torch.optim.AdamW(param_groups(ref, 0.1, exclude=ids), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    run_steps(ref, [muon, adamw], data)
    start = tiny("gpt")
    for (name, a), b, s in zip(ours.named_parameters(), ref.parameters(), start.parameters(), strict=True):
        moved = (b - s).abs().max().item()
        assert moved > 1e-4, name
        tol = 1e-5 if ns_dtype == "auto" else 2**-5
        torch.testing.assert_close(a, b, rtol=0, atol=tol * moved, msg=name)


def test_orthogonalize_is_batched_newton_schulz_in_float32_on_cpu():
    """Each matrix of a stack (wide and tall ones) comes out as torch's iteration run alone, in
    float32: singular values near 1 (the quintic's 0.5-1.5 band), the shape kept."""
    from torch.optim import _muon

    from lmforge.train.optim import orthogonalize

    gen = torch.Generator().manual_seed(0)
    reference = torch_newton_schulz_in(torch.float32)
    for shape in [(3, 16, 40), (2, 40, 16), (4, 24, 24)]:
        stack = torch.randn(shape, generator=gen) * 1e-3
        got = orthogonalize(stack, (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C), 5, 1e-7)
        assert got.shape == stack.shape and got.dtype == torch.float32
        for one, matrix in zip(got, stack, strict=True):
            want = reference(matrix, (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C), 5, 1e-7)
            torch.testing.assert_close(one, want, rtol=0, atol=1e-5)
            singular = torch.linalg.svdvals(one)
            assert singular.min() > 0.3 and singular.max() < 1.5


def test_state_dict_round_trip_continues_exactly():
    """Save after 3 steps, load into a fresh optimizer (and a fresh scheduler), continue: the same
    weights as never stopping. Both optimizers' state (AdamW moments, Muon momentum) travels."""
    data = batches(6, seed=1)
    config = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, warmup_steps=2, scheduler="wsd")

    straight = tiny("gpt")
    opt = build_optimizer(straight, config)
    sched = build_scheduler(opt, config, 6)
    for ids in data:
        run_steps(straight, [opt], [ids])
        sched.step()

    first = tiny("gpt")
    opt = build_optimizer(first, config)
    sched = build_scheduler(opt, config, 6)
    for ids in data[:3]:
        run_steps(first, [opt], [ids])
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    kinds = {k for s in saved_opt["state"].values() for k in s}
    assert {"exp_avg", "exp_avg_sq", "momentum_buffer"} <= kinds

    second = tiny("gpt")
    second.load_state_dict(first.state_dict())
    opt = build_optimizer(second, config)
    sched = build_scheduler(opt, config, 6)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    assert isinstance(opt, MuonWithAdamW) and opt.muon.state is opt.state and opt.adamw.state is opt.state
    for ids in data[3:]:
        run_steps(second, [opt], [ids])
        sched.step()
    for (name, a), b in zip(straight.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name


def assert_same_step(before: dict, want: nn.Module, got: nn.Module, want_opt, got_opt, label: str) -> None:
    """One optimizer step taken two ways from the same state: the optimizer state (AdamW moments,
    Muon momentum: float32 functions of the gradient) and AdamW-updated weights agree to float
    noise; Muon-updated matrices to 1e-4 of the step's largest change (Muon orthogonalizes in
    float32 on the CPU, where a 1e-7 difference in the gradient moves its update by about 1e-6 of
    the step; a wrong gradient moves it by tens of percent)."""
    matrices = {id(p) for p in muon_parameters(want)}
    for (name, a), b in zip(want.named_parameters(), got.parameters(), strict=True):
        moved = (a - before[name]).abs().max().item()
        atol = 1e-4 * moved if id(a) in matrices else 1e-6
        torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=f"{label}: {name}")
    state_a, state_b = want_opt.state_dict()["state"], got_opt.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index, values in state_a.items():
        for key, value in values.items():
            torch.testing.assert_close(state_b[index][key], value, rtol=1e-5, atol=1e-8, msg=f"{label}: {key}")


def test_grad_accumulation_equals_a_bigger_batch_with_muon(tmp_path):
    """Every optimizer step of 8 rows, as one micro-batch of 8 or as 2 x 4 accumulated, is the same
    step from the same state (weights, AdamW moments, Muon momentum), five steps in a row."""
    tok = gpt_tokenizer()
    texts = sorted(make_corpus(48, seed=3, max_words=20), key=len)
    rows = [{"input_ids": tok(t)["input_ids"][:40]} for t in texts]  # different lengths: unequal targets
    collate = CausalLMCollator(tok.pad_token_id)

    def trainer(micro: int, accum: int) -> Trainer:
        stream = BatchStream(rows, micro, collate, shuffle=True, seed=1, grad_accum_steps=accum)
        loop = LoopConfig(micro_batch_size=micro, grad_accum_steps=accum, max_steps=5, progress=False)
        return Trainer(tiny("gpt", vocab=len(tok)), stream, loop, MUON, tmp_path / f"run{micro}x{accum}")

    def step(t: Trainer) -> None:
        t._train_step()
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.scheduler.step()

    big, accumulated = trainer(8, 1), trainer(4, 2)
    start = {n: p.detach().clone() for n, p in big.model.named_parameters()}
    for i in range(5):
        accumulated.model.load_state_dict(big.model.state_dict())
        accumulated.optimizer.load_state_dict(copy.deepcopy(big.optimizer.state_dict()))  # not shared tensors
        before = {n: p.detach().clone() for n, p in big.model.named_parameters()}
        step(big)
        step(accumulated)
        assert_same_step(before, big.model, accumulated.model, big.optimizer, accumulated.optimizer, f"step {i + 1}")
    moved = max((p - start[n]).abs().max().item() for n, p in big.model.named_parameters())
    assert moved > 1e-2  # the steps really changed the weights


# ------------------------------------------------------------------------- warmup-stable-decay


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    wsd = Schedule("wsd", warmup_steps=10, total_steps=110, min_lr_ratio=0.1, decay_fraction=0.2)
    assert wsd(0) < wsd(5) < wsd(9) < 1.0
    assert all(wsd(s) == 1.0 for s in range(10, 89))  # decay starts at 110 - 22 = 88
    assert wsd(88) == 1.0 and wsd(99) == pytest.approx(0.55) and wsd(110) == pytest.approx(0.1)
    assert wsd(500) == pytest.approx(0.1)
    values = [wsd(s) for s in range(88, 111)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert Schedule("wsd", 0, 100, 0.0, decay_fraction=1.0)(50) == pytest.approx(0.5)  # all decay: linear


def test_wsd_follows_a_refitted_time_budget():
    """refit_schedule moves the decay with the new end: a stretched run stays flat longer and
    still ends at the floor."""
    model = tiny("gpt")
    config = OptimConfig(scheduler="wsd", warmup_steps=5, decay_fraction=0.25, min_lr_ratio=0.0, lr=1e-3)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, 100)
    schedule = scheduler.lr_lambdas[0]
    assert schedule(75) == 1.0 and schedule(80) == pytest.approx(0.8)  # decays over steps 75-100
    refit_schedule(scheduler, 400)
    assert schedule(80) == 1.0 and schedule(299) == 1.0 and schedule(350) == pytest.approx(0.5)
    assert schedule(400) == 0.0


def test_wsd_and_muon_run_under_the_time_budget(tmp_path):
    """The real loop with a simulated clock (0.5 s a step, a one-minute budget): the schedule is
    fitted to ~120 steps, the learning rate holds at the peak, then decays to the floor at the end."""
    tok = gpt_tokenizer()
    collate = CausalLMCollator(tok.pad_token_id)
    rows = [{"input_ids": tok(t)["input_ids"][:32]} for t in make_corpus(64, seed=2, max_words=20)]
    now = [0.0]

    def timed(batch):
        now[0] += 0.5
        return collate(batch)

    loop = LoopConfig(micro_batch_size=4, max_steps=10**6, max_minutes=1, progress=False, log_every=1,
                      save_every=0, eval_every=0)
    optim = OptimConfig(name="muon", scheduler="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.1,
                        lr=1e-3, muon_lr=0.01)
    trainer = Trainer(tiny("gpt", vocab=len(tok)), BatchStream(rows, 4, timed),
                      loop, optim, tmp_path / "run", clock=lambda: now[0])
    result = trainer.fit()
    from lmforge.runs import read_metrics

    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert result.status == "completed" and result.step == pytest.approx(120, abs=3)
    flat = [lr for lr in lrs if lr == pytest.approx(1e-3)]
    assert len(flat) >= 0.75 * len(lrs)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)  # decayed to the floor at the budget's end
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


# ------------------------------------------------------------------------- refusals


def test_muon_with_fsdp_is_refused_by_the_config():
    with pytest.raises(ValueError, match="optim.name: muon cannot run with distributed: fsdp"):
        PretrainConfig(distributed="fsdp", optim=OptimConfig(name="muon"))
    PretrainConfig(distributed="ddp", optim=OptimConfig(name="muon"))


def test_muon_refuses_a_model_without_block_matrices():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(LmforgeError, match="no trainable linear layers inside repeated blocks"):
        build_optimizer(NoBlocks(), MUON)


@pytest.mark.parametrize("key, value, match", [
    ("muon_lr", 0.0, "optim.muon_lr must be > 0"),
    ("muon_momentum", 1.0, "optim.muon_momentum must be in"),
    ("decay_fraction", 0.0, "optim.decay_fraction must be in"),
    ("decay_fraction", 1.5, "optim.decay_fraction must be in"),
])
def test_bad_optimizer_settings_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**{key: value})


def test_a_closure_runs_once_and_its_loss_is_returned():
    model = tiny("gpt")
    optimizer = build_optimizer(model, MUON)
    ids = batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    loss = optimizer.step(closure)
    assert len(calls) == 1 and torch.isfinite(loss)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)  # Muon stepped too
