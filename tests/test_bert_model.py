"""lmforge BERT behaviour: padding invariance, every switch (pairwise) trains and round-trips,
heads and their losses, attention backends, recorded outputs, gradient checkpointing."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from lmforge.models import (
    LmforgeBertConfig,
    LmforgeBertForMaskedLM,
    LmforgeBertForSequenceClassification,
    LmforgeBertForTokenClassification,
    LmforgeBertModel,
)

VOCAB = 128


def tiny(**overrides) -> LmforgeBertConfig:
    """A 2-layer, hidden-32 modern BERT without dropout (deterministic comparisons)."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    return LmforgeBertConfig(**{**kwargs, **overrides})


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ padding invariance

@pytest.mark.parametrize(
    ("position", "side"),
    [("learned", "right"), ("sinusoidal", "right"), ("rope", "right"), ("rope", "left"),
     ("alibi", "right"), ("alibi", "left"), ("none", "left")],
)
@torch.no_grad()
def test_padding_invariance(position, side):
    torch.manual_seed(0)
    model = LmforgeBertModel(tiny(position_embedding_type=position)).eval()
    short, n = _ids(1, 6, seed=1), 6
    longer = _ids(2, 14, seed=2)
    ids = torch.zeros(3, 14, dtype=torch.long)  # pad id 0
    mask = torch.zeros(3, 14, dtype=torch.long)
    ids[1:], mask[1:] = longer, 1
    where = slice(0, n) if side == "right" else slice(14 - n, 14)
    ids[0, where], mask[0, where] = short[0], 1
    alone = model(input_ids=short).last_hidden_state[0]  # (n, D)
    batched = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, where]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


# ------------------------------------------------------- every switch: pairwise covering of values

SWITCHES = {
    "position_embedding_type": ["rope", "alibi", "learned", "sinusoidal", "none"],
    "hidden_act": ["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"],
    "norm_type": ["rmsnorm", "layernorm", "dyt"],
    "norm_position": ["pre", "post", "deepnorm"],
    "num_key_value_heads": [4, 2, 1],  # MHA, GQA, MQA
    "biases": [True, False],  # attention_bias, mlp_bias, norm_bias together
    "type_vocab_size": [2, 0],
    "embedding_norm": [True, False],
    "attn_implementation": ["sdpa", "eager"],
}


def _gain(row: dict, name: str, value, uncovered: set) -> int:
    """How many uncovered pairs setting ``name=value`` in ``row`` would cover."""
    return sum(((n, row[n]), (name, value)) in uncovered or ((name, value), (n, row[n])) in uncovered for n in row)


def pairwise(switches: dict[str, list]) -> list[dict]:
    """A small set of rows covering every pair of values of any two switches (greedy, deterministic)."""
    names = list(switches)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in switches[a] for vb in switches[b]}
    rows = []
    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=lambda p: (names.index(p[0][0]), names.index(p[1][0]), str(p)))
        row = {a: va, b: vb}
        for name in names:
            if name not in row:
                row[name] = max(switches[name], key=lambda v, name=name, row=row: _gain(row, name, v, uncovered))
        uncovered -= {((x, row[x]), (y, row[y])) for x, y in itertools.combinations(names, 2)}
        rows.append(row)
    return rows


COMBOS = pairwise(SWITCHES)


def test_pairwise_rows_cover_every_pair():
    for a, b in itertools.combinations(SWITCHES, 2):
        seen = {(row[a], row[b]) for row in COMBOS}
        assert seen == set(itertools.product(SWITCHES[a], SWITCHES[b])), (a, b)
    assert len(COMBOS) <= 40


def _config_from_row(row: dict) -> LmforgeBertConfig:
    row = dict(row)
    biases = row.pop("biases")
    attn = row.pop("attn_implementation")
    config = tiny(**row, attention_bias=biases, mlp_bias=biases, norm_bias=biases)
    config._attn_implementation = attn
    return config


def _mlm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & (mask == 1)
    chosen[:, 0] = True
    labels = ids.masked_fill(~chosen, -100)
    inputs = ids.masked_fill(chosen, 4)  # 4 plays [MASK]
    return {"input_ids": inputs, "attention_mask": mask, "labels": labels,
            "token_type_ids": (torch.arange(16) >= 8).long().expand(4, -1)}


@pytest.mark.parametrize("row", COMBOS, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_switch_combination_trains_and_round_trips(row, tmp_path):
    config = _config_from_row(row)
    batch = _mlm_batch()
    if config.type_vocab_size == 0:
        batch.pop("token_type_ids")
    torch.manual_seed(0)
    model = LmforgeBertForMaskedLM(config).train()
    assert model.config._attn_implementation == row["attn_implementation"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation=row["attn_implementation"]).eval()
    assert isinstance(loaded, LmforgeBertForMaskedLM)
    assert loaded.lm_head.decoder.weight.data_ptr() == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    with torch.no_grad():
        want, got = model(**batch).logits, loaded(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- heads

def _cls_batch():
    ids = _ids(4, 10, seed=3)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return ids, mask


def test_sequence_classification_single_label_cross_entropy():
    torch.manual_seed(0)
    model = LmforgeBertForSequenceClassification(tiny(num_labels=3)).eval()
    ids, mask = _cls_batch()
    labels = torch.tensor([0, 2, 1, 2])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert model.config.problem_type == "single_label_classification"


def test_sequence_classification_multi_label_bce():
    torch.manual_seed(0)
    model = LmforgeBertForSequenceClassification(tiny(num_labels=3)).eval()
    ids, mask = _cls_batch()
    labels = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))
    assert model.config.problem_type == "multi_label_classification"


def test_sequence_classification_regression_mse():
    torch.manual_seed(0)
    model = LmforgeBertForSequenceClassification(tiny(num_labels=1)).eval()
    ids, mask = _cls_batch()
    labels = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (4, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), labels))
    assert model.config.problem_type == "regression"


def test_sequence_classification_learns_and_padding_does_not_leak():
    """Label = whether token 7 occurs; a few steps separate the classes; padding changes nothing."""
    torch.manual_seed(0)
    model = LmforgeBertForSequenceClassification(tiny(num_labels=2))
    ids = _ids(16, 8, seed=4).masked_fill(_ids(16, 8, seed=5) == 7, 8)
    labels = torch.arange(16) % 2
    ids[labels == 1, 3] = 7
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert (logits.argmax(-1) == labels).float().mean() == 1.0
        padded = torch.cat([ids, torch.zeros(16, 5, dtype=torch.long)], 1)
        mask = (torch.arange(13) < 8).long().expand(16, -1)
        torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits, logits, atol=1e-5, rtol=0)


def test_token_classification_ignores_minus_100():
    torch.manual_seed(0)
    model = LmforgeBertForTokenClassification(tiny(num_labels=5)).eval()
    ids, mask = _cls_batch()
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(0))
    labels = labels.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (4, 10, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.view(-1, 5), labels.view(-1), ignore_index=-100))


def test_masked_lm_loss_only_on_labelled_tokens():
    torch.manual_seed(0)
    model = LmforgeBertForMaskedLM(tiny()).eval()
    batch = _mlm_batch()
    out = model(**batch)
    assert out.logits.shape == (4, 16, VOCAB)
    labels = batch["labels"]
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[labels != -100], labels[labels != -100]))


def test_classifier_loads_from_a_pretrained_masked_lm(tmp_path):
    """Pretrain (MLM) -> save -> fine-tune: the encoder weights carry over, the head is new."""
    torch.manual_seed(0)
    mlm = LmforgeBertForMaskedLM(tiny())
    mlm.save_pretrained(tmp_path)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert isinstance(clf, LmforgeBertForSequenceClassification)
    for name, p in mlm.bert.layers.state_dict().items():
        torch.testing.assert_close(clf.bert.layers.state_dict()[name], p, atol=0, rtol=0)


# ------------------------------------------------------------- backends, outputs, checkpointing

@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
@torch.no_grad()
def test_eager_and_sdpa_agree_on_real_tokens(position):
    torch.manual_seed(0)
    model = LmforgeBertForMaskedLM(tiny(position_embedding_type=position, num_key_value_heads=2)).eval()
    batch = _mlm_batch()
    sdpa = model(**batch).logits
    model.set_attn_implementation("eager")
    eager = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=0)


@torch.no_grad()
def test_hidden_states_and_attentions_are_recorded():
    torch.manual_seed(0)
    model = LmforgeBertModel(tiny(norm_position="post")).eval()
    model.set_attn_implementation("eager")
    ids, mask = _cls_batch()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (4, 4, 10, 10)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(4, 4, 10))
    assert out.attentions[1][2, :, :, 6:].abs().max() == 0  # no attention to padding


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = _mlm_batch()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LmforgeBertForMaskedLM(tiny()).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.bert.layers)
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0, msg=name)


@torch.no_grad()
def test_inputs_embeds_equal_input_ids():
    torch.manual_seed(0)
    model = LmforgeBertModel(tiny()).eval()
    ids, mask = _cls_batch()
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))


def test_resize_token_embeddings_keeps_the_decoder_tied():
    model = LmforgeBertForMaskedLM(tiny())
    model.resize_token_embeddings(VOCAB + 7)
    assert model.get_output_embeddings().weight.shape == (VOCAB + 7, 32)
    assert model.lm_head.decoder.bias.shape == (VOCAB + 7,)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model(input_ids=torch.tensor([[VOCAB + 6, 5]])).logits.shape == (1, 2, VOCAB + 7)


def test_learned_positions_refuse_too_long_inputs():
    model = LmforgeBertModel(tiny(position_embedding_type="learned", max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=_ids(1, 17))


def test_sparse_prediction_same_loss_and_gradients():
    batch = _mlm_batch()
    results = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = LmforgeBertForMaskedLM(tiny(sparse_prediction=sparse)).train()
        out = model(**batch)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (dense, dense_grads), (sparse, sparse_grads) = results
    labelled = batch["labels"] != -100
    assert sparse.logits.shape == (int(labelled.sum()), VOCAB)
    torch.testing.assert_close(sparse.logits, dense.logits[labelled], atol=1e-6, rtol=0)
    torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-6, rtol=0)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("positions", ["rope", "learned", "alibi"])
def test_packed_documents_via_position_ids_equal_separate_documents(positions):
    """document_masks for BERT: a packed row whose position_ids restart at each document attends
    only within each document (and never to the padding that ends a packed batch's last row,
    which starts a segment of its own)."""
    config = tiny(position_embedding_type=positions, hidden_dropout=0.0, attention_dropout=0.0)
    model = LmforgeBertForMaskedLM(config).eval()
    a, b, pad = _ids(1, 7, seed=3), _ids(1, 5, seed=4), torch.zeros(1, 3, dtype=torch.long)
    packed = torch.cat([a, b, pad], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5), torch.arange(3)])[None]
    with torch.no_grad():
        got = model(packed, position_ids=position_ids).logits[:, :12]
        sep = torch.cat([model(a).logits, model(b).logits], dim=1)
    torch.testing.assert_close(got, sep, atol=1e-5, rtol=0)
