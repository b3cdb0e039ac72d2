"""The training loop itself: gradient accumulation, non-finite losses, checkpoints, schedule,
optimizer groups and bits per byte (tiny models, one process)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lmforge.models  # noqa: F401  (registers the families)
from lmforge.data.collators import CausalLMCollator, MLMCollator
from lmforge.eval.perplexity import evaluate_lm, text_bytes_scale, token_byte_lengths
from lmforge.runs import latest_checkpoint, list_checkpoints
from lmforge.train import BatchStream, LoopConfig, NonFiniteLossError, OptimConfig, Trainer
from lmforge.train.checkpoint import TrainerState
from lmforge.train.optim import Schedule, param_groups
from tests.train_fixtures import bert_tokenizer, gpt_tokenizer, make_corpus


def tiny_gpt(vocab: int, **kw):
    from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM

    torch.manual_seed(0)
    cfg = LmforgeGPTConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return LmforgeGPTForCausalLM(cfg)


def tiny_bert(vocab: int):
    from lmforge.models import LmforgeBertConfig, LmforgeBertForMaskedLM

    torch.manual_seed(0)
    cfg = LmforgeBertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, hidden_dropout=0.0,
                            attention_dropout=0.0)
    return LmforgeBertForMaskedLM(cfg)


def variable_rows(tokenizer, n: int, pad_to: int | None = None) -> list[dict]:
    """Rows of different lengths, shortest first, so micro-batches differ in targets. With
    ``pad_to`` each row is pre-padded (attention_mask 0): the MLM collator seeds each row's mask
    from its ids, so rows must not change with the batch they are padded in."""
    texts = sorted(make_corpus(n, seed=3, max_words=20), key=len)
    rows = [tokenizer(t)["input_ids"][:48] for t in texts]
    if pad_to is None:
        return [{"input_ids": ids} for ids in rows]
    return [{"input_ids": ids + [tokenizer.pad_token_id] * (pad_to - len(ids)),
             "attention_mask": [1] * len(ids) + [0] * (pad_to - len(ids))} for ids in rows]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loop_grads(make_model, rows, collate, micro: int, accum: int, tmp_path) -> dict[str, torch.Tensor]:
    model = make_model()
    stream = BatchStream(rows, micro, collate, shuffle=False, grad_accum_steps=accum)
    cfg = LoopConfig(micro_batch_size=micro, grad_accum_steps=accum, max_steps=1, progress=False)
    trainer = Trainer(model, stream, cfg, OptimConfig(max_grad_norm=0.0), tmp_path / f"run{micro}x{accum}")
    trainer._train_step()
    return grads(trainer.model)


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_grad_accumulation_equals_one_big_batch(objective, tmp_path):
    if objective == "causal":
        tok = gpt_tokenizer()
        make, collate = (lambda: tiny_gpt(len(tok))), CausalLMCollator(tok.pad_token_id)
    else:
        tok = bert_tokenizer()
        make, collate = (lambda: tiny_bert(len(tok))), MLMCollator(tok, seed=0)
    rows = variable_rows(tok, 8, pad_to=None if objective == "causal" else 48)
    counts = [int((collate(rows[i:i + 2])["labels"][:, int(objective == "causal"):] != -100).sum())
              for i in range(0, 8, 2)]
    assert len(set(counts)) > 1  # the micro-batches really hold different numbers of targets

    accumulated = loop_grads(make, rows, collate, micro=2, accum=4, tmp_path=tmp_path)
    single = loop_grads(make, rows, collate, micro=8, accum=1, tmp_path=tmp_path)
    reference = make()  # plain PyTorch: mean loss over every target of the big batch
    reference(**collate(rows)).loss.backward()
    expected = grads(reference)
    assert accumulated.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(single[name], g, rtol=1e-5, atol=1e-7, msg=name)

    # the naive mean of micro-batch means gives a different gradient: the test can fail
    naive = make()
    for i in range(0, 8, 2):
        (naive(**collate(rows[i:i + 2])).loss / 4).backward()
    assert any(not torch.allclose(p.grad, expected[n], rtol=1e-3) for n, p in naive.named_parameters())


# ------------------------------------------------------------------------- non-finite losses


class PoisonModel(nn.Module):
    """A model-agnostic stand-in: embedding + linear head; a batch flagged ``poison`` gives NaN."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, input_ids, labels, poison=None, num_items_in_batch=None):
        logits = self.head(self.emb(input_ids))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss = loss / num_items_in_batch
        if poison is not None and bool(poison.any()):
            loss = loss * float("nan")
        return SimpleNamespace(loss=loss, logits=logits)


def poison_collate(bad_rows: set[int]):
    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        poison = torch.tensor([r["row"] in bad_rows for r in rows])
        return {"input_ids": ids, "labels": ids.clone(), "poison": poison}
    return collate


def poison_rows(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 16, (8,), generator=g).tolist(), "row": i} for i in range(n)]


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_state(tmp_path):
    rows = poison_rows()
    cfg = LoopConfig(micro_batch_size=4, max_steps=6, save_every=2, progress=False)
    trainer = Trainer(PoisonModel(), BatchStream(rows, 4, poison_collate({13}), shuffle=False), cfg,
                      OptimConfig(lr=1e-2, warmup_steps=0), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 4;.*step 3"):
        trainer.fit()
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_3"
    state = TrainerState.read(latest)
    assert state.step == 3 and state.data == {"epoch": 0, "row": 12, "rows_per_step": 4}  # the bad batch is not consumed
    weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    from safetensors.torch import load_file

    saved = load_file(latest / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    for k, v in saved.items():
        assert torch.equal(v, weights[k])  # the checkpoint holds the weights before the bad step


def test_nonfinite_loss_can_be_skipped(tmp_path):
    cfg = LoopConfig(micro_batch_size=4, max_steps=6, save_every=0, skip_nonfinite=True, progress=False)
    trainer = Trainer(PoisonModel(), BatchStream(poison_rows(), 4, poison_collate({13, 14})), cfg,
                      OptimConfig(lr=1e-2, warmup_steps=0), tmp_path)
    result = trainer.fit()
    assert result.status == "completed" and result.step == 6
    assert 1 <= result.skipped_steps <= 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ------------------------------------------------------------------------- checkpoints


def test_checkpoints_keep_last_k_and_survive_a_crash_while_saving(tmp_path, monkeypatch):
    cfg = LoopConfig(micro_batch_size=4, max_steps=5, save_every=2, keep_last=2, progress=False)
    trainer = Trainer(PoisonModel(), BatchStream(poison_rows(), 4, poison_collate(set())), cfg,
                      OptimConfig(lr=1e-2), tmp_path)
    trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4", "step_5"]

    # a crash in the middle of writing step_7 leaves step_5 as the latest complete checkpoint
    original = trainer.accelerator.save_state

    def crash(output_dir, **kw):
        original(output_dir, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(trainer.accelerator, "save_state", crash)
    trainer.state.step = 7
    with pytest.raises(OSError):
        trainer._save()
    assert latest_checkpoint(tmp_path).name == "step_5"
    assert (tmp_path / "checkpoints" / ".tmp-step_7").is_dir()
    monkeypatch.setattr(trainer.accelerator, "save_state", original)
    trainer.state.step = 8
    trainer._save()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_5", "step_8"]  # stale temp folder cleaned, keep-2 applied


# ------------------------------------------------------------------------- schedule and groups


def test_schedule_warmup_cosine_linear_constant():
    cos = Schedule("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert cos(0) < cos(5) < cos(9) < 1.0 and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    lin = Schedule("linear", 0, 100, 0.0)
    assert lin(50) == pytest.approx(0.5)
    assert Schedule("constant", 5, 100)(80) == 1.0


def test_no_weight_decay_on_norms_biases_embeddings():
    model = tiny_gpt(64, attention_bias=True, tie_word_embeddings=True)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("proj.weight") or "mlp" in n for n in decayed)
    assert not any("norm" in n or n.endswith("bias") or "embed" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------- bits per byte


def test_bits_per_byte_counts_the_bytes_of_the_text():
    tok = gpt_tokenizer()
    lengths = token_byte_lengths(tok)
    text = "Wherefore art thou, sweet lady? Ça va — ünïcødé ✓"
    ids = tok(text)["input_ids"]
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tok.eos_token_id] == 0

    model = tiny_gpt(len(tok))
    ids_t = torch.tensor([ids])
    batch = {"input_ids": ids_t, "labels": ids_t.clone()}
    out = evaluate_lm(model, [batch], byte_lengths=lengths)
    logits = model(ids_t).logits[0, :-1]
    nll = nn.functional.cross_entropy(logits, ids_t[0, 1:], reduction="sum").item()
    covered = len(tok.decode(ids[1:]).encode("utf-8"))
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / covered, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-6)


def test_bits_per_byte_counts_the_text_a_tokenizer_drops():
    """WordPiece drops the spaces between words: per byte of its tokens it would look 15-25% worse
    than a lossless tokenizer on the same text. The scale divides by the text's own bytes."""
    texts = make_corpus(30, seed=5)
    raw = sum(len(t.encode("utf-8")) for t in texts)
    gpt, bert = gpt_tokenizer(), bert_tokenizer()
    for tok in (gpt, bert):
        lengths = token_byte_lengths(tok)
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        covered = sum(int(lengths[i].sum()) for i in ids)
        scale = text_bytes_scale(texts, ids, lengths)
        assert scale == raw / covered
        if tok is gpt:
            assert scale == 1.0  # byte-level BPE covers every byte
            continue
        assert scale > 1.1  # the spaces (and lower-cased nothing else: ASCII) are not covered
        model = tiny_gpt(len(tok))
        row = torch.tensor([ids[0]])
        out = evaluate_lm(model, [{"input_ids": row, "labels": row.clone()}], byte_lengths=lengths,
                          bytes_scale=scale)
        nll = nn.functional.cross_entropy(model(row).logits[0, :-1], row[0, 1:], reduction="sum").item()
        target_bytes = int(lengths[row[0, 1:]].sum())
        assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / (target_bytes * scale), rel=1e-6)


# ------------------------------------------------------------------------- time budget


def simulate_budget(step_seconds, minutes: float = 10.0, max_steps: int = 10**6) -> tuple[float, int]:
    """The loop's time-budget decisions on a fake clock where a step started at time t takes
    ``step_seconds(t)``; returns (elapsed seconds at the end, steps)."""
    from lmforge.train.loop import _Clock

    now = [1000.0]
    clock = _Clock(0.0, minutes, 0, now=lambda: now[0])
    step, total = 0, max_steps
    while step < total:
        now[0] += step_seconds(clock.elapsed())
        step += 1
        new_total, over = clock.decide(step, total, max_steps)
        total = new_total or total
        if over:
            break
    return clock.elapsed(), step


@pytest.mark.parametrize("name, step_seconds", [
    ("steady", lambda t: 0.1),
    ("stall early", lambda t: 2.0 if t < 15 or 40 < t < 55 else 0.1),  # two stalls, one before the first fit
    ("slower late", lambda t: 0.1 if t < 420 else 0.5),
    ("faster late", lambda t: 0.5 if t < 420 else 0.1),
    ("noisy", lambda t: 0.05 + 0.1 * ((int(t * 7) * 7919) % 13) / 13),
])
def test_time_budget_ends_near_the_budget_whatever_the_speed(name, step_seconds):
    elapsed, steps = simulate_budget(step_seconds)
    assert 0.98 * 600 <= elapsed <= 1.02 * 600, (name, elapsed, steps)


def test_time_budget_respects_max_steps_and_stops_hard():
    elapsed, steps = simulate_budget(lambda t: 0.1, max_steps=500)
    assert steps == 500 and elapsed == pytest.approx(50)  # max_steps is an upper bound
    elapsed, steps = simulate_budget(lambda t: 0.1 if t < 590 else 100.0)  # one step hangs past the budget
    assert elapsed > 600 and steps < 5910


def test_time_budget_recovers_from_an_injected_slow_phase(tmp_path):
    """The real loop on a simulated clock: the first 15 s of a one-minute budget crawl (a slow data
    source: 3 s a step), then steps take 0.5 s. Training still fills its budget; it used to fix
    the step count from the slow start and stop after a third of it."""
    tok = gpt_tokenizer()
    collate = CausalLMCollator(tok.pad_token_id)
    now = [0.0]

    def slow_start_collate(rows):
        now[0] += 3.0 if now[0] < 15 else 0.5
        return collate(rows)

    cfg = LoopConfig(micro_batch_size=4, max_steps=10**6, max_minutes=1, progress=False, log_every=1000,
                     save_every=0, eval_every=0)
    trainer = Trainer(tiny_gpt(len(tok)), BatchStream(variable_rows(tok, 64), 4, slow_start_collate), cfg,
                      OptimConfig(), tmp_path / "run", clock=lambda: now[0])
    result = trainer.fit()
    assert result.status == "completed"
    assert 0.98 * 60 <= result.elapsed_seconds <= 1.02 * 60, result
    assert result.step == pytest.approx(5 + (60 - 15) / 0.5, abs=3)
