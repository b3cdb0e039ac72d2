"""The allowed values of every architecture switch, stated once; configs validate against them.

GPT and BERT share one switchboard (positions, norm type and placement, activation, RoPE scaling);
Mamba has its own time-step initialisation switch. ``check_switches`` is the one check of the
shared switchboard, so every config words a bad value the same way; ``positive_int``,
``is_number`` and ``check_time_steps`` are the value checks the Mamba and Mamba-2 configs share.

This file is copied next to saved weights: it imports only the standard library.
"""

from __future__ import annotations

import math

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


def positive_int(owner: str, config, name: str, also: str = "") -> int:
    """``config.name``, refused with ``ValueError`` unless a positive integer (``also``: what else is
    allowed, for the message, e.g. "None or ")."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be {also}a positive integer, got {value!r}")
    return value


def is_number(value, finite: bool = True) -> bool:
    """A real number (not a bool, not NaN); infinite only when ``finite`` is False."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return math.isfinite(value) or not finite


def check_time_steps(owner: str, config) -> None:
    """The initial time-step range of a Mamba config: 0 < time_step_min <= time_step_max, floor >= 0."""
    lo, hi = config.time_step_min, config.time_step_max
    if not (is_number(lo) and is_number(hi) and 0 < lo <= hi):
        aliases = " (dt_min, dt_max)" if "dt_min" in getattr(config, "attribute_map", {}) else ""
        raise ValueError(f"{owner}: need 0 < time_step_min <= time_step_max{aliases}, got {lo!r}, {hi!r}")
    if not (is_number(config.time_step_floor) and config.time_step_floor >= 0):
        raise ValueError(f"{owner}.time_step_floor must be >= 0, got {config.time_step_floor!r}")
