"""LmforgeBertConfig: presets, YAML presets, validation, save/load."""

import pytest
import yaml
from transformers import AutoConfig

import lmforge.models  # noqa: F401  (registers lmforge_bert with the Auto classes)
from lmforge.models.configuration_bert import PRESETS, LmforgeBertConfig
from lmforge.presets import find_preset


def test_default_is_modern():
    default, modern = LmforgeBertConfig(), LmforgeBertConfig.from_preset("modern")
    assert default.to_dict() == modern.to_dict()
    assert (default.position_embedding_type, default.norm_type, default.norm_position, default.hidden_act) == (
        "rope", "rmsnorm", "pre", "geglu")
    assert not (default.attention_bias or default.mlp_bias or default.norm_bias)
    assert default.is_causal is False


def test_classic_preset_matches_bert():
    c = LmforgeBertConfig.from_preset("classic")
    assert (c.position_embedding_type, c.norm_type, c.norm_position, c.hidden_act) == (
        "learned", "layernorm", "post", "gelu")
    assert c.attention_bias and c.mlp_bias and c.norm_bias and c.embedding_norm
    assert (c.norm_eps, c.type_vocab_size, c.head_dim, c.num_key_value_heads) == (1e-12, 2, 64, 12)


@pytest.mark.parametrize("name", ["bert-classic", "bert-modern", "bert-debug"])
def test_yaml_presets_build_the_named_preset(name):
    fields = yaml.safe_load(find_preset("model", name).read_text())
    config = AutoConfig.for_model(**fields)
    assert isinstance(config, LmforgeBertConfig)
    preset = {"bert-classic": "classic", "bert-modern": "modern", "bert-debug": "debug"}[name]
    expected = LmforgeBertConfig.from_preset(preset, vocab_size=config.vocab_size)
    assert config.to_dict() == expected.to_dict()


def test_debug_preset_is_tiny():
    assert PRESETS["debug"]["hidden_size"] <= 64 and PRESETS["debug"]["num_hidden_layers"] <= 2


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_act": "gelu_fast"}, "hidden_act"),
        ({"position_embedding_type": "absolute"}, "position_embedding_type"),
        ({"norm_type": "batchnorm"}, "norm_type"),
        ({"norm_position": "sandwich"}, "norm_position"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"problem_type": "ranking"}, "problem_type"),
        ({"pad_token_id": 5000, "vocab_size": 100}, "pad_token_id"),
        ({"hidden_dropout": 1.5}, "hidden_dropout"),
        ({"head_dim": 7, "position_embedding_type": "rope"}, "head_dim"),
        ({"is_causal": True}, "is_causal"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_bad_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        LmforgeBertConfig(**overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="classic"):
        LmforgeBertConfig.from_preset("ancient")


def test_save_load_round_trip(tmp_path):
    c = LmforgeBertConfig.from_preset("debug", num_key_value_heads=2, num_labels=3,
                                      problem_type="multi_label_classification")
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LmforgeBertConfig)
    assert loaded.to_diff_dict() == c.to_diff_dict()
    assert loaded.num_labels == 3 and loaded.problem_type == "multi_label_classification"
