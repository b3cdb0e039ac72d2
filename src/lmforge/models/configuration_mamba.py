"""Configuration of the lmforge Mamba family (``model_type`` "lmforge_mamba").

Field names follow transformers' ``MambaConfig`` (so conversion is a rename-free copy); the
original Mamba names are accepted as aliases: ``d_model`` (hidden_size), ``n_layer``
(num_hidden_layers), ``d_state`` (state_size), ``d_conv`` (conv_kernel), ``dt_rank``
(time_step_rank), ``dt_min`` / ``dt_max`` / ``dt_init_floor`` (time_step_min / max / floor).

This file is copied next to saved weights: it imports only transformers, the standard library and
siblings.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

from .switches import (
    TIME_STEP_INIT_SCHEMES,
    check_choice,
    check_time_steps,
    is_number,
    positive_int,
)


class LmforgeMambaConfig(PreTrainedConfig):
    """Mamba (S6) language model configuration. Invalid values raise ``ValueError``.

    Args (all keyword):
        vocab_size, hidden_size, num_hidden_layers: the usual sizes.
        state_size: N, the SSM state size per channel (d_state).
        expand: inner width = expand * hidden_size (``intermediate_size``, derived).
        conv_kernel: width of the causal depthwise convolution (d_conv).
        time_step_rank: rank of the dt projection; "auto" means ceil(hidden_size / 16).
        time_step_min, time_step_max: range of the initial time steps (0 < min <= max).
        time_step_floor: lower clamp of the initial time steps.
        time_step_init_scheme: "random" (uniform dt_proj weights) or "constant".
        time_step_scale: scale of the dt_proj weight initialisation.
        use_bias: bias on in_proj / out_proj; use_conv_bias: bias on the convolution.
        norm_eps: RMSNorm epsilon. residual_in_fp32: keep the residual stream in float32.
        rescale_prenorm_residual: scale out_proj init by 1/sqrt(num_hidden_layers).
        initializer_range: std of the embedding / linear initialisation.
        tie_word_embeddings: share the input embedding with the LM head.
        scan_chunk_size: chunk length of the fast scan (None: ``mamba_scan.default_chunk_size``,
            the whole sequence unless batch x width x state is small).
    """

    model_type = "lmforge_mamba"
    attribute_map = {
        "d_model": "hidden_size",
        "n_layer": "num_hidden_layers",
        "d_state": "state_size",
        "d_conv": "conv_kernel",
        "dt_rank": "time_step_rank",
        "dt_min": "time_step_min",
        "dt_max": "time_step_max",
        "dt_init_floor": "time_step_floor",
    }

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 24
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int | str = "auto"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_init_scheme: str = "random"
    time_step_scale: float = 1.0
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    rescale_prenorm_residual: bool = False
    initializer_range: float = 0.02
    scan_chunk_size: int | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # also resolves the aliases in ``attribute_map``
        self._validate()
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        self.intermediate_size = self.expand * self.hidden_size

    @property
    def layer_types(self) -> list[str]:
        """Every layer keeps a conv and an SSM state: transformers builds ``LinearAttentionLayer`` caches."""
        return ["linear_attention"] * self.num_hidden_layers

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel"):
            positive_int("LmforgeMambaConfig", self, name)
        rank = self.time_step_rank
        if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"LmforgeMambaConfig.time_step_rank must be 'auto' or a positive integer, got {rank!r}")
        check_time_steps("LmforgeMambaConfig", self)
        check_choice("LmforgeMambaConfig", "time_step_init_scheme", self.time_step_init_scheme, TIME_STEP_INIT_SCHEMES)
        if not (is_number(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"LmforgeMambaConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.scan_chunk_size is not None:
            positive_int("LmforgeMambaConfig", self, "scan_chunk_size", "None or ")


__all__ = ["LmforgeMambaConfig"]
