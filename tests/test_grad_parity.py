"""Gradient parity: one training step of lmforge and of the stock transformers class on the same
weights and batch gives the same gradient for every parameter.

The loss, the attention/dropout paths and Mamba's scan backward are lmforge's own code; forward
parity alone would not catch a wrong backward. Each case runs in train mode (dropout 0) on a
batch built to break things: rows left-padded and right-padded in one batch, labels ignored
(-100) at the pads and in the middle of rows, a vocabulary of 97, odd widths (GQA for Llama).
Our gradients are mapped to the stock names by the converter itself (``to_hf`` of a copy whose
weights are the gradients: renames, GPT-2's transposes and fused qkv, tied weights), then every
stock parameter's gradient is compared at atol 1e-5 x its largest entry, fp32.

Gradient accumulation: two micro-batches with different numbers of targets, each loss divided
by the window's target count (``num_items_in_batch``), equal the stock accumulation and one
big batch. A second backward through the graph (``retain_graph=True``) adds the same gradient
again, as with the stock loss.

One known difference, pinned by its own test: stock Llama never trains the embedding row of
``pad_token_id`` (``nn.Embedding(padding_idx=...)``); lmforge GPT trains it, as GPT-2 does. The
other Llama comparisons switch the stock ``padding_idx`` off.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from transformers.loss.loss_utils import ForMaskedLMLoss, ForSequenceClassificationLoss

from lmforge.models import (
    LmforgeGPTConfig,
    LmforgeGPTForCausalLM,
    LmforgeGPTForSequenceClassification,
)
from lmforge.models.convert import from_hf, to_hf
from tests.torch_threads import single_thread  # noqa: F401
from tests.train_fixtures import perturb

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 97  # not a power of two
PAD = 0
REL_ATOL = 1e-5  # x the largest |gradient| entry of each parameter
# Below NOISE x the model's largest gradient entry a gradient is rounding, not signal: the only
# parameters allowed there are key biases without RoPE, whose gradient is zero in exact
# arithmetic (they add q.b to every score of a query's row, which softmax ignores).
NOISE = 1e-6
ZERO_IN_EXACT_ARITHMETIC = re.compile(r"(k_proj|\.key)\.bias$")


# ----------------------------------------------------------------------------------- batches


def _padded_ids(lengths: list[tuple[int, str]], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) (B, width): each row has ``n`` real tokens, padded on ``side``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, (n, side) in enumerate(lengths):
        if side == "left":
            mask[row, width - n :] = 1
        else:
            mask[row, :n] = 1
    return ids.masked_fill(mask == 0, PAD), mask


# Two micro-batches of the same width with different numbers of targets, mixing both paddings.
MICRO_ROWS = (
    [(13, "right"), (9, "left"), (6, "right")],
    [(4, "left"), (13, "left"), (11, "right")],
)
WIDTH = 13


def _lm_batch(rows, seed: int, ignored: list[tuple[int, int]], positions: bool = False) -> dict:
    """Inputs and labels of a causal or masked LM: ids as labels, -100 at the pads and at ``ignored``."""
    ids, mask = _padded_ids(rows, WIDTH, seed)
    labels = ids.masked_fill(mask == 0, -100)
    for row, col in ignored:
        labels[row, col] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if positions:  # GPT2Model uses arange positions when none are given (see PITFALLS)
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


def _causal_batches(positions: bool = False) -> list[dict]:
    return [
        _lm_batch(MICRO_ROWS[0], seed=1, ignored=[(0, 5), (0, 6), (1, 8)], positions=positions),
        _lm_batch(MICRO_ROWS[1], seed=2, ignored=[(2, 3)], positions=positions),
    ]


def _mlm_batches() -> list[dict]:
    """BERT batches: token types, and labels on about a third of the real tokens only."""
    batches = []
    for i, rows in enumerate(MICRO_ROWS):
        batch = _lm_batch(rows, seed=3 + i, ignored=[])
        g = torch.Generator().manual_seed(10 + i)
        unlabelled = torch.rand(batch["labels"].shape, generator=g) > (0.35 if i == 0 else 0.6)
        batch["labels"] = batch["labels"].masked_fill(unlabelled, -100)
        types = torch.zeros_like(batch["input_ids"])
        types[:, WIDTH // 2 :] = 1
        batch["token_type_ids"] = types * batch["attention_mask"]
        batches.append(batch)
    return batches


def _classification_batches(bert: bool) -> list[dict]:
    """Sequence labels (3 classes); micro-batches of 3 and 2 rows (different target counts)."""
    batches = []
    for i, rows in enumerate((MICRO_ROWS[0], MICRO_ROWS[1][:2])):
        ids, mask = _padded_ids(rows, WIDTH, seed=20 + i)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([2, 0, 1][: len(rows)])}
        if bert:
            batch["token_type_ids"] = torch.zeros_like(ids)
        batches.append(batch)
    return batches


def _targets(batch: dict, kind: str) -> int:
    labels = batch["labels"]
    if kind == "causal":
        labels = labels[:, 1:]  # the first position predicts nothing
    return int((labels != -100).sum()) if kind != "seqcls" else labels.numel()


def _concat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


# ------------------------------------------------------------------------------------- models


def _train(model: torch.nn.Module) -> torch.nn.Module:
    return model.float().train()


def _llama_pair(stock_pad_row_frozen: bool = False):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=60, intermediate_size=93, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, attention_bias=True, max_position_embeddings=32, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2))  # GQA: 3 query heads per KV head of width 10
    perturb(hf, 1)
    ours = from_hf(hf)
    if not stock_pad_row_frozen:  # see test_stock_llama_alone_freezes_the_pad_embedding_row
        hf.model.embed_tokens.padding_idx = None
    return _train(ours), _train(hf)


def _gpt2_pair():
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=48, n_layer=2, n_head=3, n_inner=83, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=PAD))  # tied
    perturb(hf, 2)
    return _train(from_hf(hf)), _train(hf)


def _bert_config(**overrides) -> transformers.BertConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
              intermediate_size=83, max_position_embeddings=32, type_vocab_size=2, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, pad_token_id=PAD)
    return transformers.BertConfig(**{**kw, **overrides})


def _bert_mlm_pair():
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(_bert_config())  # decoder tied to the word embedding
    perturb(hf, 3)
    return _train(from_hf(hf)), _train(hf)


def _bert_classifier_pair():
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(_bert_config(num_labels=3, classifier_dropout=0.0))
    perturb(hf, 4)
    return _train(from_hf(hf)), _train(hf)


def _gpt_classifier_pair():
    torch.manual_seed(0)
    ours = LmforgeGPTForSequenceClassification(LmforgeGPTConfig(
        vocab_size=VOCAB, hidden_size=60, intermediate_size=93, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=32, pad_token_id=PAD, num_labels=3))
    perturb(ours, 5)
    return _train(ours), _train(to_hf(ours))


def _mamba_pair():
    # transformers on CPU: mamba_inner_fn is None without mamba_ssm and use_mambapy=False, so its
    # reference is the sequential scan under plain autograd (the associative scan needs compile);
    # ours is the chunked scan with its own backward. No in_proj bias: transformers masks padding
    # before in_proj, lmforge after it, which differ only when in_proj has a bias.
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=36, num_hidden_layers=2, state_size=5, conv_kernel=3, expand=2,
        use_bias=False, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, use_mambapy=False))
    perturb(hf, 6)
    ours = from_hf(hf)
    ours.config.scan_chunk_size = 4  # 13 positions: three full chunks and a partial one
    return _train(ours), _train(hf)


@dataclass
class Case:
    pair: Callable[[], tuple[torch.nn.Module, torch.nn.Module]]
    batches: Callable[[], list[dict]]
    kind: str  # "causal", "masked" or "seqcls"
    # whether forward(num_items_in_batch=...) reaches the loss; if not, the stock loss of that
    # kind is computed from the logits with num_items_in_batch (transformers' own functions)
    ours_takes_num_items: bool = True
    stock_takes_num_items: bool = True


CASES = {
    "llama": Case(_llama_pair, _causal_batches, "causal"),
    "gpt2": Case(_gpt2_pair, lambda: _causal_batches(positions=True), "causal"),
    "bert-mlm": Case(_bert_mlm_pair, _mlm_batches, "masked", stock_takes_num_items=False),
    "bert-classifier": Case(_bert_classifier_pair, lambda: _classification_batches(bert=True), "seqcls",
                            stock_takes_num_items=False),
    "llama-classifier": Case(_gpt_classifier_pair, lambda: _classification_batches(bert=False), "seqcls",
                             ours_takes_num_items=False, stock_takes_num_items=False),
    "mamba": Case(_mamba_pair, _causal_batches, "causal"),
}


# --------------------------------------------------------------------------------- the step


def _loss(model, batch: dict, kind: str, num_items: int | None, takes_num_items: bool) -> torch.Tensor:
    """The training loss of one micro-batch: the model's own, or transformers' loss of that kind."""
    if num_items is None or takes_num_items:
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        return model(**batch, **extra).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if kind == "masked":
        return ForMaskedLMLoss(logits, batch["labels"], model.config.vocab_size, num_items_in_batch=num_items)
    assert kind == "seqcls"
    return ForSequenceClassificationLoss(batch["labels"], logits, model.config, num_items_in_batch=num_items)


def _grads(model, batches: list[dict], kind: str, takes_num_items: bool, accumulate: bool) -> dict:
    """Gradients after backward over ``batches`` (accumulated with num_items_in_batch, or one mean)."""
    model.zero_grad(set_to_none=True)
    total = sum(_targets(b, kind) for b in batches) if accumulate else None
    for batch in batches:
        _loss(model, batch, kind, total, takes_num_items).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    missing = [name for name, g in grads.items() if g is None]
    assert not missing, f"{type(model).__name__}: no gradient for {missing}"
    return {name: g.clone() for name, g in grads.items()}


def _in_stock_names(ours: torch.nn.Module, grads: dict) -> dict:
    """Our gradients under the stock parameter names, mapped by the converter (``to_hf`` of a copy
    whose weights are the gradients: renames, transposes, fused qkv and tied weights included)."""
    shadow = copy.deepcopy(ours)
    with torch.no_grad():
        for name, p in shadow.named_parameters():
            p.copy_(grads[name])
    return to_hf(shadow).state_dict()


def _assert_same_grads(got: dict, want: dict, what: str) -> None:
    """Every parameter of ``want``: |got - want| <= REL_ATOL x max |want|; gradients at rounding
    level only where they are zero in exact arithmetic, and there on both sides."""
    assert want, what
    top = max(float(g.abs().max()) for g in want.values())
    for name, ref in want.items():
        scale = float(ref.abs().max())
        if scale <= NOISE * top:
            assert ZERO_IN_EXACT_ARITHMETIC.search(name), f"{what}: {name} has no gradient to compare"
            assert float(got[name].abs().max()) <= NOISE * top, f"{what}: {name} should have no gradient"
            continue
        torch.testing.assert_close(got[name], ref, atol=REL_ATOL * scale, rtol=0,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_one_training_step_gives_the_stock_gradient_of_every_parameter(name):
    case = CASES[name]
    ours, stock = case.pair()
    batch = _concat(case.batches())
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).loss, stock(**batch).loss, atol=1e-5, rtol=0)
    got = _grads(ours, [batch], case.kind, case.ours_takes_num_items, accumulate=False)
    want = _grads(stock, [batch], case.kind, case.stock_takes_num_items, accumulate=False)
    _assert_same_grads(_in_stock_names(ours, got), want, f"{name}, one step")


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_accumulation_equals_stock_and_one_big_batch(name):
    case = CASES[name]
    ours, stock = case.pair()
    batches = case.batches()
    assert _targets(batches[0], case.kind) != _targets(batches[1], case.kind)
    ours_acc = _grads(ours, batches, case.kind, case.ours_takes_num_items, accumulate=True)
    stock_acc = _grads(stock, batches, case.kind, case.stock_takes_num_items, accumulate=True)
    _assert_same_grads(_in_stock_names(ours, ours_acc), stock_acc, f"{name}, accumulated vs stock")
    big = [_concat(batches)]
    ours_big = _grads(ours, big, case.kind, case.ours_takes_num_items, accumulate=False)
    stock_big = _grads(stock, big, case.kind, case.stock_takes_num_items, accumulate=False)
    _assert_same_grads(ours_acc, ours_big, f"{name}, lmforge accumulated vs one batch")
    _assert_same_grads(stock_acc, stock_big, f"{name}, stock accumulated vs one batch")


@pytest.mark.parametrize("name", ["llama", "bert-mlm", "mamba"])
def test_second_backward_with_retain_graph_doubles_every_gradient_like_stock(name):
    """lmforge's LM losses reuse their saved log-probabilities in backward; with retain_graph=True
    they must not, and a second backward adds exactly the first gradient again."""
    case = CASES[name]
    ours, stock = case.pair()
    batch = _concat(case.batches())
    grads = []
    for model in (ours, stock):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward(retain_graph=True)
        once = {n: p.grad.clone() for n, p in model.named_parameters()}
        loss.backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, 2 * once[n], atol=0, rtol=0, msg=n)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    _assert_same_grads(_in_stock_names(ours, grads[0]), grads[1], f"{name}, after two backwards")


def test_gpt_causal_lm_and_classifier_convert_to_their_llama_classes():
    config = LmforgeGPTConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, num_labels=4)
    for ours, stock in ((LmforgeGPTForCausalLM(config), "LlamaForCausalLM"),
                        (LmforgeGPTForSequenceClassification(config), "LlamaForSequenceClassification")):
        hf = to_hf(ours)
        assert type(hf).__name__ == stock and hf.config.num_labels == 4
        assert type(from_hf(hf)) is type(ours)


def test_stock_llama_alone_freezes_the_pad_embedding_row():
    """LlamaModel builds ``nn.Embedding(vocab, d, padding_idx=pad_token_id)``, so the pad row gets
    no gradient; lmforge GPT has no padding_idx (like GPT2Model). The true gradient of that row is
    not zero with left padding: ForCausalLMLoss shifts the labels, so the last pad position
    predicts the first real token. Everything but that row agrees."""
    ours, stock = _llama_pair(stock_pad_row_frozen=True)
    batch = _concat(_causal_batches())
    got = _in_stock_names(ours, _grads(ours, [batch], "causal", True, accumulate=False))
    want = _grads(stock, [batch], "causal", True, accumulate=False)
    name = "model.embed_tokens.weight"
    assert not want[name][PAD].any() and got[name][PAD].abs().max() > 1e-3
    rows = torch.arange(VOCAB) != PAD
    got[name], want[name] = got[name][rows], want[name][rows]
    _assert_same_grads(got, want, "llama, pad row frozen in the stock model")
