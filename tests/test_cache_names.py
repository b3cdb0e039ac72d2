"""The cache argument's old names (transformers < 5.24): ``past_key_values`` (GPT) and
``cache_params`` (Mamba) still work and raise the FutureWarning of the stock Llama / Mamba.

The equivalent of transformers' common ``test_bc_cache_name_forward`` for every lmforge class
that takes a cache (BERT takes none), plus ``generate`` and a saved model loaded without lmforge.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

from lmforge.models import (
    LmforgeGPTConfig,
    LmforgeGPTForCausalLM,
    LmforgeGPTForSequenceClassification,
    LmforgeGPTModel,
    LmforgeMambaConfig,
    LmforgeMambaForCausalLM,
    LmforgeMambaModel,
)
from tests.export_utils import run_isolated
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 61
GPT_KW = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3)
MAMBA_KW = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
OLD_NAME = {"gpt": "past_key_values", "mamba": "cache_params"}


def _model(cls):
    torch.manual_seed(0)
    family = "mamba" if cls in (LmforgeMambaModel, LmforgeMambaForCausalLM) else "gpt"
    config = LmforgeMambaConfig(**MAMBA_KW) if family == "mamba" else LmforgeGPTConfig(**GPT_KW)
    return cls(config).eval(), family


def _stock_message(family: str) -> str:
    """The FutureWarning stock LlamaForCausalLM / MambaForCausalLM raise for the old name."""
    torch.manual_seed(0)
    if family == "gpt":
        stock = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))
    else:
        stock = transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, state_size=8))
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad(), pytest.warns(FutureWarning) as record:
        stock(ids, use_cache=True, **{OLD_NAME[family]: DynamicCache(config=stock.config)})
    (message,) = [str(w.message) for w in record if OLD_NAME[family] in str(w.message)]
    return message.replace(type(stock).__name__, "{cls}")


def _main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(
    "cls", [LmforgeGPTModel, LmforgeGPTForCausalLM, LmforgeGPTForSequenceClassification, LmforgeMambaModel, LmforgeMambaForCausalLM],
    ids=lambda c: c.__name__,
)
def test_old_cache_name_warns_like_the_stock_model_and_continues_the_same_cache(cls):
    model, family = _model(cls)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    old = OLD_NAME[family]
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the current name warns about nothing
            new_cache = model(ids[:, :6], use_cache=True).cache
            new = model(ids[:, 6:], cache=new_cache, use_cache=True)
        old_cache = model(ids[:, :6], use_cache=True).cache
        with pytest.warns(FutureWarning) as record:
            legacy = model(ids[:, 6:], use_cache=True, **{old: old_cache})
        fresh = model(ids[:, 6:], use_cache=False)  # without the prefix: the cache must matter
    assert [str(w.message) for w in record] == [_stock_message(family).format(cls=cls.__name__)]
    assert legacy.cache is old_cache
    torch.testing.assert_close(_main_output(legacy), _main_output(new), atol=0, rtol=0)
    assert not torch.allclose(_main_output(fresh), _main_output(new), atol=1e-3)


@pytest.mark.parametrize("cls", [LmforgeGPTForCausalLM, LmforgeMambaForCausalLM], ids=lambda c: c.__name__)
def test_generate_takes_the_old_cache_name_with_a_warning(cls):
    model, family = _model(cls)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        want = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    with pytest.warns(FutureWarning, match=OLD_NAME[family]):
        got = model.generate(ids, **{OLD_NAME[family]: DynamicCache(config=model.config)}, **kw)
    assert torch.equal(got, want)


def test_saved_models_take_the_old_names_without_lmforge(tmp_path):
    """The exported code (deprecate_kwarg comes from transformers) behaves the same without lmforge."""
    ids = [[5, 6, 7, 8, 9, 10]]
    for cls in (LmforgeGPTForCausalLM, LmforgeMambaForCausalLM):
        model, _ = _model(cls)
        model.save_pretrained(tmp_path / cls.__name__)
    got = run_isolated(
        f"""
        import warnings
        import torch
        from transformers import AutoModelForCausalLM
        out = {{}}
        for name, old in (("LmforgeGPTForCausalLM", "past_key_values"), ("LmforgeMambaForCausalLM", "cache_params")):
            model = AutoModelForCausalLM.from_pretrained(PATH + "/" + name, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            ids = torch.tensor({ids})
            with torch.no_grad():
                new = model(ids[:, 4:], cache=model(ids[:, :4], use_cache=True).cache, use_cache=True).logits
                cache = model(ids[:, :4], use_cache=True).cache
                with warnings.catch_warnings(record=True) as record:
                    warnings.simplefilter("always")
                    legacy = model(ids[:, 4:], use_cache=True, **{{old: cache}}).logits
            out[name] = {{"equal": torch.equal(new, legacy),
                         "warnings": [str(w.message) for w in record if w.category is FutureWarning]}}
        emit(out)
        """,
        path=tmp_path,
    )
    for name, old in (("LmforgeGPTForCausalLM", "past_key_values"), ("LmforgeMambaForCausalLM", "cache_params")):
        assert got[name]["equal"], name
        assert len(got[name]["warnings"]) == 1 and f"`{old}` is deprecated" in got[name]["warnings"][0], got[name]
