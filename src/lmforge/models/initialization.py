"""Initialisation of the transformer families' modules (GPT and BERT), derived buffers included.

This file is copied next to saved weights: it imports only torch, transformers and siblings.
"""

from __future__ import annotations

import math

from torch import nn
from transformers import initialization as init

from .feed_forward import Experts, Router
from .norms import DyT, RMSNorm
from .positions import RotaryEmbedding


def init_weights(module: nn.Module, config) -> None:
    """Initialise one module of an lmforge model (call from ``PreTrainedModel._init_weights``).

    Normal(0, initializer_range) for linear and embedding weights (xavier_normal_ with
    ``module.init_gain`` under DeepNorm), zero biases, unit norms, DyT alpha, and the RoPE
    frequency buffers recomputed (``from_pretrained`` does not restore non-persistent buffers).
    MoE: each expert's matrices as the dense MLP's (normal, or under DeepNorm the std of
    xavier_normal_ on one (F, D) matrix), the router normal, the selection bias zero.
    Uses ``transformers.initialization`` so already-loaded weights are left alone.
    """
    std = config.initializer_range
    if isinstance(module, nn.Linear):
        gain = getattr(module, "init_gain", None)
        if gain is not None:
            init.xavier_normal_(module.weight, gain=gain)
        else:
            init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, (RMSNorm, nn.LayerNorm, DyT)):
        if module.weight is not None:
            init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            init.zeros_(module.bias)
        if isinstance(module, DyT):
            init.constant_(module.alpha, module.init_alpha)
    elif isinstance(module, RotaryEmbedding):
        module.reset_parameters()
    elif isinstance(module, Experts):
        gain = getattr(module, "init_gain", None)
        if gain is not None:
            std = gain * math.sqrt(2.0 / (module.hidden_size + module.intermediate_size))
        for weight in module.parameters(recurse=False):  # (E, out, in)
            init.normal_(weight, mean=0.0, std=std)
    elif isinstance(module, Router):
        init.normal_(module.weight, mean=0.0, std=std)
        if module.e_score_correction_bias is not None:
            init.zeros_(module.e_score_correction_bias)
