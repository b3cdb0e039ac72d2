"""Configuration of the lmforge Mamba-2 family (``model_type`` "lmforge_mamba2"), pure or hybrid.

Field names follow transformers' ``Mamba2Config`` (so conversion is a copy; ``layer_norm_epsilon``
is accepted as an alias of ``norm_eps``). The SSM splits its inner width into heads:

    intermediate_size = expand * hidden_size = num_heads * head_dim

``n_groups`` groups of heads share one B and one C (as key/value heads are shared in GQA), so it
must divide ``num_heads``.

Hybrids (Jamba, Zamba, Nemotron-H): ``layer_types`` lists one kind per layer, written "mamba2"
(or "mamba"), "attention" or "mlp". The config stores them in transformers' cache vocabulary,
"linear_attention", "full_attention" and "mlp", so ``DynamicCache(config=config)`` builds a
conv + SSM state layer, a key/value layer or a dummy layer for each. Attention layers have their
own head sizes (``num_attention_heads``, ``num_key_value_heads``, ``attention_head_dim``; the
SSM's ``head_dim`` is another thing) and by default no positional encoding: the Mamba-2 layers
carry order, as in Jamba and Nemotron-H (``attention_position_embedding="rope"`` adds RoPE).
MLP layers are lmforge's ``MLP`` (``hidden_act``: "swiglu", "gelu"...).

This file is copied next to saved weights: it imports only transformers, the standard library and
siblings.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .switches import ACTIVATIONS, check_choice, check_time_steps, is_number, positive_int

# What users write in ``layer_types`` -> what the config stores (transformers' cache vocabulary).
LAYER_TYPES = {
    "mamba2": "linear_attention",
    "mamba": "linear_attention",
    "linear_attention": "linear_attention",
    "attention": "full_attention",
    "full_attention": "full_attention",
    "mlp": "mlp",
}
ATTENTION_POSITIONS = ("none", "rope")


class LmforgeMamba2Config(PreTrainedConfig):
    """Mamba-2 (SSD) language model configuration, optionally a hybrid. Invalid values raise ``ValueError``.

    Args (all keyword):
        vocab_size, hidden_size: the usual sizes.
        num_hidden_layers: number of layers; None means ``len(layer_types)`` (24 without them).
        state_size: N, the SSM state size per head channel (d_state).
        expand: inner width = expand * hidden_size (``intermediate_size``, derived).
        head_dim: P, the SSM head dim; num_heads: SSM heads, None means intermediate_size // head_dim.
        n_groups: G, groups of heads sharing B and C (divides num_heads).
        conv_kernel: width of the causal depthwise convolution over x, B and C (d_conv).
        chunk_size: chunk length of the SSD scan (None: the scan's default).
        time_step_min, time_step_max, time_step_floor: range and floor of the initial time steps.
        time_step_limit: (low, high) clamp of dt = softplus(raw + dt_bias) at every step.
        use_bias: bias on in_proj / out_proj; use_conv_bias: bias on the convolution.
        norm_eps: epsilon of every RMSNorm (the gated one too). residual_in_fp32: float32 residuals.
        rescale_prenorm_residual: divide each layer's output projection init by sqrt(num_hidden_layers).
        initializer_range: std of the embedding / linear initialisation.
        tie_word_embeddings: share the input embedding with the LM head.
        layer_types: None (all Mamba-2) or one of "mamba2" / "mamba", "attention", "mlp" per layer.
        num_attention_heads, num_key_value_heads (None: = heads), attention_head_dim (None:
            hidden_size // num_attention_heads), attention_bias, attention_dropout: attention layers.
        attention_position_embedding: "none" (default) or "rope"; rope_theta: its base.
        mlp_intermediate_size (None: 4 * hidden_size), hidden_act, mlp_bias: MLP layers.
    """

    model_type = "lmforge_mamba2"
    attribute_map = {"layer_norm_epsilon": "norm_eps"}
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int | None = None
    state_size: int = 128
    expand: int = 2
    num_heads: int | None = None
    head_dim: int = 64
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int | None = None
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | tuple[float, ...] = (0.0, float("inf"))
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    rescale_prenorm_residual: bool = False
    initializer_range: float = 0.02
    layer_types: list[str] | None = None
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    attention_head_dim: int | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    attention_position_embedding: str = "none"
    rope_theta: float = 10000.0
    mlp_intermediate_size: int | None = None
    hidden_act: str = "swiglu"
    mlp_bias: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        types = self.layer_types  # (before transformers maps "mamba" and "attention" in it, item by item)
        if types is not None and (isinstance(types, str) or not isinstance(types, (list, tuple))):
            raise ValueError(f"LmforgeMamba2Config.layer_types must be a list of layer kinds, got {types!r}")
        super().__post_init__(**kwargs)  # also resolves the alias in ``attribute_map``
        self._set_layer_types()
        self._validate_sizes()
        self.intermediate_size = self.expand * self.hidden_size
        if self.num_heads is None:
            if self.intermediate_size % self.head_dim:
                raise ValueError(
                    f"LmforgeMamba2Config: head_dim={self.head_dim} does not divide intermediate_size="
                    f"{self.intermediate_size} (expand * hidden_size = {self.expand} * {self.hidden_size}); "
                    "choose a head_dim that divides it or set num_heads"
                )
            self.num_heads = self.intermediate_size // self.head_dim
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_head_dim is None:
            if self.has_attention and self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"LmforgeMamba2Config: hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads} (or set attention_head_dim explicitly)"
                )
            self.attention_head_dim = self.hidden_size // self.num_attention_heads
        if self.mlp_intermediate_size is None:
            self.mlp_intermediate_size = 4 * self.hidden_size
        if isinstance(self.time_step_limit, (list, tuple)):
            self.time_step_limit = tuple(self.time_step_limit)
        self._validate_ssm()
        self._validate_hybrid()

    @property
    def has_attention(self) -> bool:
        """Whether any layer is an attention layer (then the model builds attention masks)."""
        return "full_attention" in self.layer_types

    def validate(self) -> None:
        """transformers' checks (``save_pretrained`` runs them), but our own check of ``layer_types``:
        transformers' refuses "mlp", although its caches map an "mlp" layer to a dummy layer."""
        for check in getattr(PreTrainedConfig, "__class_validators__", ()):
            if check.__name__ != "validate_layer_type":
                check(self)
        stored = set(LAYER_TYPES.values())
        if any(kind not in stored for kind in self.layer_types) or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"LmforgeMamba2Config.layer_types={self.layer_types!r} must hold {self.num_hidden_layers} entries "
                f"(num_hidden_layers) of {sorted(stored)}"
            )
        self._validate_sizes()
        self._validate_ssm()
        self._validate_hybrid()

    def _set_layer_types(self) -> None:
        """``layer_types`` in the cache vocabulary, and ``num_hidden_layers`` from its length."""
        if self.layer_types is None:
            if self.num_hidden_layers is None:
                self.num_hidden_layers = 24
            self.layer_types = ["linear_attention"] * positive_int("LmforgeMamba2Config", self, "num_hidden_layers")
            return
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ValueError(
                    f"LmforgeMamba2Config.layer_types[{i}]={kind!r} is not one of ('mamba2', 'mamba', 'attention', "
                    "'mlp') (or their stored names 'linear_attention', 'full_attention')"
                )
        if self.num_hidden_layers is not None and self.num_hidden_layers != len(self.layer_types):
            raise ValueError(
                f"LmforgeMamba2Config: num_hidden_layers={self.num_hidden_layers!r} does not match the "
                f"{len(self.layer_types)} entries of layer_types; leave num_hidden_layers out (the list sets it)"
            )
        if not self.layer_types:
            raise ValueError("LmforgeMamba2Config.layer_types must name at least one layer, got []")
        self.layer_types = [LAYER_TYPES[kind] for kind in self.layer_types]
        self.num_hidden_layers = len(self.layer_types)

    def _validate_sizes(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "head_dim",
                     "n_groups", "conv_kernel", "num_attention_heads"):
            positive_int("LmforgeMamba2Config", self, name)
        for name in ("num_heads", "num_key_value_heads", "attention_head_dim", "mlp_intermediate_size", "chunk_size"):
            if getattr(self, name) is not None:
                positive_int("LmforgeMamba2Config", self, name, "None or ")

    def _validate_ssm(self) -> None:
        if self.num_heads * self.head_dim != self.intermediate_size:
            raise ValueError(
                f"LmforgeMamba2Config: num_heads * head_dim ({self.num_heads} * {self.head_dim} = "
                f"{self.num_heads * self.head_dim}) must equal intermediate_size = expand * hidden_size "
                f"({self.expand} * {self.hidden_size} = {self.intermediate_size})"
            )
        if self.num_heads % self.n_groups:
            raise ValueError(
                f"LmforgeMamba2Config: n_groups={self.n_groups} must divide num_heads={self.num_heads} "
                "(each group of heads shares one B and C)"
            )
        check_time_steps("LmforgeMamba2Config", self)
        limit = self.time_step_limit
        if not (isinstance(limit, tuple) and len(limit) == 2 and all(is_number(v, finite=False) for v in limit) and 0 <= limit[0] < limit[1]):
            raise ValueError(
                f"LmforgeMamba2Config.time_step_limit must be (low, high) with 0 <= low < high, got {limit!r}"
            )
        if not (is_number(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"LmforgeMamba2Config.norm_eps must be > 0, got {self.norm_eps!r}")

    def _validate_hybrid(self) -> None:
        if "mlp" in self.layer_types:
            check_choice("LmforgeMamba2Config", "hidden_act", self.hidden_act, tuple(ACTIVATIONS))
        if not self.has_attention:
            return
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads % kv:
            raise ValueError(
                f"LmforgeMamba2Config: num_attention_heads={heads} is not divisible by num_key_value_heads={kv} "
                "(MHA: equal, MQA: 1, GQA: a divisor)"
            )
        check_choice("LmforgeMamba2Config", "attention_position_embedding", self.attention_position_embedding,
                     ATTENTION_POSITIONS)
        if self.attention_position_embedding == "rope":
            if self.attention_head_dim % 2:
                raise ValueError(
                    f"LmforgeMamba2Config: RoPE needs an even attention_head_dim, got {self.attention_head_dim}"
                )
            if not (is_number(self.rope_theta) and self.rope_theta > 0):
                raise ValueError(f"LmforgeMamba2Config.rope_theta must be > 0, got {self.rope_theta!r}")
        if not (is_number(self.attention_dropout) and 0.0 <= self.attention_dropout < 1.0):
            raise ValueError(
                f"LmforgeMamba2Config.attention_dropout must be in [0, 1), got {self.attention_dropout!r}"
            )


__all__ = ["LmforgeMamba2Config"]
