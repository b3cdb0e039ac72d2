"""The allowed values of every architecture switch, stated once; configs validate against them.

GPT and BERT share one switchboard (positions, norm type and placement, activation, RoPE scaling);
Mamba has its own time-step initialisation switch. ``check_switches`` is the one check of the
shared switchboard, so every config words a bad value the same way.

This file is copied next to saved weights: it imports only the standard library.
"""

from __future__ import annotations

POSITION_TYPES = ("rope", "alibi", "learned", "sinusoidal", "none")
NORM_TYPES = ("rmsnorm", "layernorm", "dyt")
NORM_POSITIONS = ("pre", "post", "deepnorm")
# hidden_act -> (ACT2FN name, gated)
ACTIVATIONS: dict[str, tuple[str, bool]] = {
    "gelu": ("gelu", False),  # exact (erf) GELU, as in BERT
    "gelu_tanh": ("gelu_pytorch_tanh", False),  # tanh approximation, as in GPT-2 ("gelu_new")
    "relu": ("relu", False),
    "silu": ("silu", False),
    "swiglu": ("silu", True),  # Shazeer 2020: silu(x W_gate) * (x W_up)
    "geglu": ("gelu", True),
}
ROPE_TYPES = ("default", "linear", "dynamic")  # rope_parameters["rope_type"]
TIME_STEP_INIT_SCHEMES = ("random", "constant")  # Mamba's dt_proj initialisation
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# The shared switchboard: config attribute -> allowed values.
SWITCHES: dict[str, tuple[str, ...]] = {
    "hidden_act": tuple(ACTIVATIONS),
    "position_embedding_type": POSITION_TYPES,
    "norm_type": NORM_TYPES,
    "norm_position": NORM_POSITIONS,
}


def check_choice(owner: str, name: str, value, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``owner.name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not one of {choices}")


def check_switches(config) -> None:
    """Check every switch of the shared switchboard on ``config`` (GPT and BERT)."""
    for name, choices in SWITCHES.items():
        check_choice(type(config).__name__, name, getattr(config, name), choices)
