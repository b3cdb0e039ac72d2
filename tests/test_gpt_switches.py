"""Switch coverage: every value of every switch, all pairs (a covering array), the interacting cross
products; each case trains a few steps (loss decreases) and round-trips through save/load.
Invalid combinations raise a clear ValueError, one test each."""

import itertools
import random

import pytest
import torch

from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM
from lmforge.models.attention import build_attention_mask
from tests.torch_threads import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

SWITCHES: dict[str, list] = {
    "hidden_act": ["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"],
    "position_embedding_type": ["rope", "alibi", "learned", "sinusoidal", "none"],
    "norm_type": ["rmsnorm", "layernorm", "dyt"],
    "norm_position": ["pre", "post", "deepnorm"],
    "num_key_value_heads": [4, 2, 1],  # MHA, GQA, MQA
    "attn_implementation": ["eager", "sdpa"],
    "attention_bias": [False, True],
    "mlp_bias": [False, True],
    "norm_bias": [False, True],
    "tie_word_embeddings": [False, True],
    "is_causal": [True, False],
}


def pairwise(params: dict[str, list], seed: int = 0, tries: int = 30) -> list[dict]:
    """A small set of rows covering every pair of values of every two parameters (greedy AETG-style)."""
    names = list(params)
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(names, 2)
        for va in params[a]
        for vb in params[b]
    }
    rng = random.Random(seed)

    def pairs_of(row: dict) -> set:
        return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}

    rows = []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(tries):
            a, va, b, vb = rng.choice(sorted(uncovered, key=repr))
            row = {a: va, b: vb}
            for name in rng.sample(names, len(names)):
                if name in row:
                    continue
                row[name] = max(
                    params[name],
                    key=lambda v, n=name: sum((m, row[m], n, v) in uncovered or (n, v, m, row[m]) in uncovered for m in row),
                )
            gain = len(pairs_of(row) & uncovered)
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append({n: best[n] for n in names})
        uncovered -= pairs_of(best)
    return rows


BASE = {name: values[0] for name, values in SWITCHES.items()}
PAIRWISE_CASES = pairwise(SWITCHES)
CROSS_CASES = (
    [{**BASE, "position_embedding_type": p, "attn_implementation": a}
     for p in SWITCHES["position_embedding_type"] for a in SWITCHES["attn_implementation"]]
    + [{**BASE, "norm_type": n, "norm_position": p} for n in SWITCHES["norm_type"] for p in SWITCHES["norm_position"]]
    + [{**BASE, "rope_parameters": {"rope_type": t, "factor": 2.0}} for t in ("linear", "dynamic")]
)


def test_covering_array_covers_every_pair_and_every_value():
    rows = PAIRWISE_CASES
    for a, b in itertools.combinations(SWITCHES, 2):
        seen = {(r[a], r[b]) for r in rows}
        assert seen == set(itertools.product(SWITCHES[a], SWITCHES[b])), (a, b)
    assert len(rows) < 60  # far below the full product (6*5*3*3*3*2**6 = 155,520)


def _case_id(case: dict) -> str:
    short = {True: "T", False: "F"}
    return "-".join(str(short.get(v, v)) if not isinstance(v, dict) else v["rope_type"] for v in case.values())


def _train_and_round_trip(case: dict, tmp_path) -> None:
    torch.manual_seed(0)
    config = LmforgeGPTConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, **case,
    )
    model = LmforgeGPTForCausalLM(config)
    assert model.config._attn_implementation == case["attn_implementation"]
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    # attn_implementation is a load-time choice (not saved): ask for the same one
    loaded = LmforgeGPTForCausalLM.from_pretrained(tmp_path, attn_implementation=case["attn_implementation"]).eval()
    assert loaded.config._attn_implementation == case["attn_implementation"]
    with torch.no_grad():
        after = loaded(ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("case", PAIRWISE_CASES, ids=_case_id)
def test_pairwise_switches_train_and_round_trip(case, tmp_path):
    _train_and_round_trip(case, tmp_path)


@pytest.mark.parametrize("case", CROSS_CASES, ids=_case_id)
def test_interacting_switches_train_and_round_trip(case, tmp_path):
    _train_and_round_trip(case, tmp_path)


# ------------------------------------------------------------------------- invalid configs

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _invalid(match: str, **overrides):
    with pytest.raises(ValueError, match=match):
        LmforgeGPTConfig(**{**TINY, **overrides})


def test_hidden_size_not_divisible_by_heads():
    _invalid(r"hidden_size=30 is not divisible by num_attention_heads=4", hidden_size=30)


def test_heads_not_divisible_by_kv_heads():
    _invalid(r"num_attention_heads=4 is not divisible by num_key_value_heads=3", num_key_value_heads=3)


@pytest.mark.parametrize(
    "switch,value",
    [("hidden_act", "gelu_fast"), ("position_embedding_type", "xpos"), ("norm_type", "batchnorm"),
     ("norm_position", "sandwich")],
)
def test_unknown_switch_values(switch, value):
    _invalid(rf"{switch}='{value}' is not one of", **{switch: value})


def test_rope_with_odd_head_dim():
    _invalid(r"RoPE needs an even head_dim, got head_dim=7", hidden_size=28)
    LmforgeGPTConfig(**{**TINY, "hidden_size": 28, "position_embedding_type": "alibi"})  # fine without RoPE


@pytest.mark.parametrize("factor", [0.5, None, "2"])
def test_rope_scaling_factor_must_be_at_least_one(factor):
    _invalid(r"factor=.* must be a number >= 1.0", rope_parameters={"rope_type": "linear", "factor": factor})


def test_unknown_rope_type():
    _invalid(r"rope_type='yarn' is not one of", rope_parameters={"rope_type": "yarn", "factor": 2.0})


def test_alibi_with_flash_attention_is_refused():
    _invalid(r"alibi.*flash_attention_2", position_embedding_type="alibi", attn_implementation="flash_attention_2")
    config = LmforgeGPTConfig(**TINY, position_embedding_type="alibi")
    config._attn_implementation = "flash_attention_2"  # e.g. switched after construction
    with pytest.raises(ValueError, match="alibi.*flash_attention_2"):
        build_attention_mask(config, torch.zeros(1, 4, 32), None, None, torch.arange(4)[None])


def test_bad_sizes_and_dropout():
    _invalid(r"num_hidden_layers must be a positive integer", num_hidden_layers=0)
    _invalid(r"hidden_dropout must be in \[0, 1\)", hidden_dropout=1.5)
