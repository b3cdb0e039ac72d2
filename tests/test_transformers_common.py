"""transformers' own common model tests (``ModelTesterMixin``) and config tests (``ConfigTester``) on
every lmforge family, as transformers' tests/models/*/test_modeling_*.py run them on its models:
Mamba-2 (pure and a mamba2 + attention + mlp hybrid), the mixture-of-experts GPT, the dense GPT,
BERT and Mamba-1.

The mixins come from the sdist of the installed transformers (``tests/transformers_common.py``).
Where a common test does not apply to a family, it is skipped or overridden with the reason, as
transformers' own model tests do.
"""

from __future__ import annotations

import typing
import unittest
from contextlib import ExitStack
from unittest import mock

import pytest
import transformers
from transformers.models.auto import modeling_auto

from lmforge.models import (
    LmforgeBertConfig,
    LmforgeBertForMaskedLM,
    LmforgeBertForSequenceClassification,
    LmforgeBertForTokenClassification,
    LmforgeBertModel,
    LmforgeGPTConfig,
    LmforgeGPTForCausalLM,
    LmforgeGPTForSequenceClassification,
    LmforgeGPTModel,
    LmforgeMamba2Config,
    LmforgeMamba2ForCausalLM,
    LmforgeMamba2ForSequenceClassification,
    LmforgeMamba2Model,
    LmforgeMambaConfig,
    LmforgeMambaForCausalLM,
    LmforgeMambaForSequenceClassification,
    LmforgeMambaModel,
)
from lmforge.models.positions import RotaryEmbedding
from tests.torch_threads import single_thread  # noqa: F401
from tests.transformers_common import common_tests

modeling_common, configuration_common = common_tests()
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
ids_tensor = modeling_common.ids_tensor
random_attention_mask = modeling_common.random_attention_mask

pytestmark = pytest.mark.usefixtures("single_thread")

# The mixin knows a class's role (base model, causal LM, classifier...) by its name in transformers'
# tables of class names per model type: it gives labels by role, and leaves base models out of the
# training tests. While this module runs, each lmforge class is also in the table of the Auto
# class lmforge registers it with (lmforge.models registers every family in-process).
ROLE_TABLES = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}
_patches = ExitStack()


def setUpModule():
    ours = set()
    for auto_class, table in ROLE_TABLES.items():
        registered = getattr(transformers, auto_class)._model_mapping._extra_content  # config class -> model class
        names = {config.model_type: model.__name__ for config, model in registered.items()
                 if model.__module__.startswith("lmforge.")}
        _patches.enter_context(mock.patch.dict(getattr(modeling_auto, table), names))
        ours |= {model for model in registered.values() if model.__module__.startswith("lmforge.")}
    # The mixin reads the output class from forward's return annotation; lmforge's model files
    # postpone annotations (strings): the evaluated type while this module runs.
    for model in ours:
        hints = typing.get_type_hints(model.forward)
        _patches.enter_context(mock.patch.dict(model.forward.__annotations__, {"return": hints["return"]}))


def tearDownModule():
    _patches.close()


class LmforgeModelTester:
    """Tiny config and inputs of one family, as transformers' per-model ``*ModelTester``."""

    def __init__(self, parent, config_class, batch_size=2, seq_length=7, is_training=True, num_labels=3,
                 **config):
        self.parent, self.config_class = parent, config_class
        self.batch_size, self.seq_length, self.is_training, self.num_labels = (
            batch_size, seq_length, is_training, num_labels)
        self.config_kwargs = config
        built = self.get_config()
        self.vocab_size = built.vocab_size
        self.hidden_size = built.hidden_size
        self.num_hidden_layers = built.num_hidden_layers
        self.num_attention_heads = getattr(built, "num_attention_heads", None)

    def get_config(self):
        return self.config_class(**self.config_kwargs, num_labels=self.num_labels)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class LmforgeCommonTests(ModelTesterMixin):
    """The mixin's tests, and the ConfigTester's."""

    test_can_init_all_missing_weights_before_2023 = True  # (the mixin dates models by a copyright line)
    config_class = None
    config_kwargs: dict = {}
    config_tester_kwargs: dict | None = None  # default: config_kwargs
    common_properties = None

    def setUp(self):
        self.model_tester = LmforgeModelTester(self, self.config_class, **self.config_kwargs)
        kwargs = self.config_kwargs if self.config_tester_kwargs is None else self.config_tester_kwargs
        self.config_tester = ConfigTester(self, config_class=self.config_class,
                                          common_properties=self.common_properties, **kwargs)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_rope_scaling_frequencies(self):
        # lmforge's RotaryEmbedding returns (cos, signed sin) shaped (B, 1, T, hd), ready to broadcast
        # over the heads; the mixin slices positions on axis 1 of transformers' (B, T, hd): the
        # same checks with the head axis squeezed out
        forward = RotaryEmbedding.forward

        def squeezed(self, x, position_ids, **kwargs):
            return tuple(t.squeeze(1) for t in forward(self, x, position_ids, **kwargs))

        with mock.patch.object(RotaryEmbedding, "forward", squeezed):
            super().test_model_rope_scaling_frequencies()

    def test_generation_tester_mixin_inheritance(self):
        if self.all_generative_model_classes:
            self.skipTest("transformers' generate tests (tests/generation/test_utils.py) are not in its sdist; "
                          "lmforge's own tests check generate against transformers' models")
        super().test_generation_tester_mixin_inheritance()


# ----------------------------------------------------------------------------- Mamba-2

MAMBA2 = dict(vocab_size=99, hidden_size=32, state_size=8, head_dim=8, n_groups=2, conv_kernel=4, chunk_size=4,
              num_attention_heads=4, num_key_value_heads=2, mlp_intermediate_size=48, pad_token_id=0)
HYBRID = {**MAMBA2, "attention_position_embedding": "rope"}  # RoPE in the attention layer: more paths


class LmforgeMamba2ModelTest(LmforgeCommonTests, unittest.TestCase):
    all_model_classes = (LmforgeMamba2Model, LmforgeMamba2ForCausalLM, LmforgeMamba2ForSequenceClassification)
    config_class = LmforgeMamba2Config
    config_kwargs = {**MAMBA2, "num_hidden_layers": 2}
    common_properties = ["hidden_size", "num_hidden_layers"]
    has_attentions = False  # no attention layers


class LmforgeMamba2HybridModelTest(LmforgeCommonTests, unittest.TestCase):
    all_model_classes = (LmforgeMamba2Model, LmforgeMamba2ForCausalLM, LmforgeMamba2ForSequenceClassification)
    config_class = LmforgeMamba2Config
    config_kwargs = {**HYBRID, "layer_types": ["mamba2", "attention", "mlp"]}
    # (the config stores layer_types in transformers' cache vocabulary; ConfigTester compares the
    # JSON with its arguments, so it gets the stored names)
    config_tester_kwargs = {**HYBRID, "layer_types": ["linear_attention", "full_attention", "mlp"]}
    common_properties = ["hidden_size", "num_hidden_layers", "num_attention_heads"]

    @unittest.skip("LmforgeMamba2Model returns no attention weights (no output_attentions; Mamba2Output has no attentions)")
    def test_attention_outputs(self):
        pass

    @unittest.skip("LmforgeMamba2Model returns no attention weights (no output_attentions; Mamba2Output has no attentions)")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    def test_num_layers_is_small(self):
        # one layer of each kind (as transformers' own exceptions for its hybrids: Zamba, Lfm3)
        self.assertLessEqual(self.model_tester.num_hidden_layers, 3)


# ----------------------------------------------------------------------------- GPT

GPT = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


class LmforgeGPTMoEModelTest(LmforgeCommonTests, unittest.TestCase):
    all_model_classes = (LmforgeGPTModel, LmforgeGPTForCausalLM, LmforgeGPTForSequenceClassification)
    config_class = LmforgeGPTConfig
    config_kwargs = {**GPT, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                     "num_shared_experts": 1}

    def test_moe_models_record_router_logits(self):
        # The mixin's test, which finds sparse-expert models by transformers' experts interface
        # (@use_experts_implementation) in their source; lmforge's MoE has its own experts
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            recordable = set().union(*((m._can_record_outputs or {}).keys() for m in model.modules()
                                       if isinstance(m, transformers.PreTrainedModel)))
            self.assertIn("router_logits", recordable, f"{model_class.__name__} does not record them.")
            if model_class in self.all_generative_model_classes:
                return_type = model_class.forward.__annotations__.get("return")
                fields = set().union(*(getattr(t, "__dataclass_fields__", {}).keys()
                                       for t in (typing.get_args(return_type) or (return_type,))))
                self.assertIn("router_logits", fields, f"{model_class.__name__} does not return them.")


class LmforgeGPTModelTest(LmforgeCommonTests, unittest.TestCase):
    all_model_classes = (LmforgeGPTModel, LmforgeGPTForCausalLM, LmforgeGPTForSequenceClassification)
    config_class = LmforgeGPTConfig
    config_kwargs = GPT

    @unittest.skip("a dense GPT (num_experts=0) has no router: it returns CausalLMOutputWithPast, without "
                   "router_logits (forward's return annotation names the MoE output too)")
    def test_output_router_logits_from_config(self):
        pass


# ----------------------------------------------------------------------------- BERT and Mamba-1

BERT = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0)


class LmforgeBertModelTest(LmforgeCommonTests, unittest.TestCase):
    all_model_classes = (LmforgeBertModel, LmforgeBertForMaskedLM, LmforgeBertForSequenceClassification,
                         LmforgeBertForTokenClassification)
    config_class = LmforgeBertConfig
    config_kwargs = BERT


class LmforgeMambaModelTest(LmforgeCommonTests, unittest.TestCase):
    all_model_classes = (LmforgeMambaModel, LmforgeMambaForCausalLM, LmforgeMambaForSequenceClassification)
    config_class = LmforgeMambaConfig
    config_kwargs = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4,
                         pad_token_id=0)
    common_properties = ["hidden_size", "num_hidden_layers"]
    has_attentions = False  # no attention layers
