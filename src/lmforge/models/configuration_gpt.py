"""Configuration of the lmforge GPT family (``model_type`` "lmforge_gpt").

Defaults are Llama-like: RoPE, pre-norm RMSNorm, SwiGLU, grouped-query attention, no biases.
Every architectural choice is a switch (allowed values in ``switches.py``); GPT-2 is
``position_embedding_type="learned", norm_type="layernorm", hidden_act="gelu_tanh"`` with all
biases, MHA and tied embeddings.

Mixture of experts: ``num_experts > 0`` replaces every block's MLP by a routed MoE
(``feed_forward.MoE``): a softmax router picks ``num_experts_per_tok`` experts per token (Mixtral's
routing when ``norm_topk_prob``), plus ``num_shared_experts`` ungated shared experts every token
passes through (DeepSeek style). Training adds ``router_aux_loss_coef`` x the load-balancing loss
(Mixtral's, layers pooled; each layer's, averaged, with ``router_aux_loss_per_layer``) and
``router_z_loss_coef`` x the router z-loss (ST-MoE) to the LM loss;
``router_bias_update_rate > 0`` turns on DeepSeek-V3's aux-loss-free balancing (a per-expert
selection bias). ``num_experts = 0`` (the default) is the dense MLP, unchanged.

RoPE and ALiBi run past ``max_position_embeddings`` (RoPE quality degrades there unless scaled with
``rope_parameters={"rope_type": "linear" | "dynamic", "factor": f}``); learned and sinusoidal
positions refuse longer inputs.

This file is copied next to saved weights: it imports only transformers, the standard library and
siblings.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .switches import ROPE_TYPES, check_switches


class LmforgeGPTConfig(PreTrainedConfig):
    """Decoder-only transformer configuration. Invalid combinations raise ``ValueError``.

    Args (the switchboard; all keyword):
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads: the usual sizes.
        num_key_value_heads: KV heads (= heads: MHA, 1: MQA, in between: GQA); None means MHA.
        head_dim: per-head size; None means hidden_size // num_attention_heads.
        intermediate_size: MLP width.
        hidden_act: "gelu", "gelu_tanh", "relu", "silu", "swiglu" or "geglu".
        position_embedding_type: "rope", "alibi", "learned", "sinusoidal" or "none".
        rope_theta, rope_parameters: RoPE base and scaling (``{"rope_type": "linear"|"dynamic",
            "factor": f}``).
        max_position_embeddings: context length (hard limit for learned / sinusoidal).
        norm_type: "rmsnorm", "layernorm" or "dyt"; norm_position: "pre", "post" or "deepnorm".
        norm_eps, norm_bias, attention_bias, mlp_bias: numerics and bias switches.
        attention_dropout, hidden_dropout: dropout on attention weights / residual branches and
            embeddings.
        tie_word_embeddings: share the input embedding with the LM head.
        is_causal: causal (True) or bidirectional attention.
        num_experts: routed experts per MoE layer; 0 (default) = the dense MLP in every block.
        num_experts_per_tok: experts each token is routed to (top-k), 1..num_experts.
        moe_intermediate_size: width of one expert (and of one shared expert); None = intermediate_size.
        num_shared_experts: ungated experts every token passes through, fused into one MLP of width
            ``moe_intermediate_size * num_shared_experts`` (DeepSeek's shared experts); 0 = none.
        norm_topk_prob: renormalise the top-k routing probabilities to sum to 1 (Mixtral: True).
        router_aux_loss_coef: weight of the load-balancing loss (Switch Transformer's 0.01;
            Mixtral-8x7B's config has 0.02). Added to the LM loss whenever labels are given.
        router_aux_loss_per_layer: balance each layer: the mean of the layers' load-balancing
            losses (Switch Transformer, GShard) instead of one loss over all layers' routing pooled
            (Mixtral's, the default; pooled, an idle expert in one layer can hide behind a busy one
            in another). Both are k when balanced. Training only; Mixtral has the pooled loss.
        router_z_loss_coef: weight of the router z-loss mean(logsumexp(router logits)^2) (ST-MoE
            suggests 1e-3). Default 0.0: Mixtral has no z-loss, so the default converts to it.
        router_bias_update_rate: DeepSeek-V3's aux-loss-free balancing: a per-expert bias, added to
            the routing scores for the top-k selection only, moves by this rate x sign(mean load -
            load) after every optimizer step (saved with the model); 0.0 = off (no bias).
        output_router_logits: return every MoE layer's router logits (as Mixtral).
    """

    model_type = "lmforge_gpt"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "swiglu"
    position_embedding_type: str = "rope"
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    max_position_embeddings: int = 2048
    norm_type: str = "rmsnorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-6
    norm_bias: bool = False
    dyt_init_alpha: float = 0.5
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    is_causal: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    num_shared_experts: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.01
    router_aux_loss_per_layer: bool = False
    router_z_loss_coef: float = 0.0
    router_bias_update_rate: float = 0.0
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._validate_sizes()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._validate_switches()
        self._validate_rope()
        self._validate_experts()

    def _validate_sizes(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LmforgeGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LmforgeGPTConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads} (or set head_dim explicitly)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LmforgeGPTConfig: num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads} (MHA: equal, MQA: 1, GQA: a divisor)"
            )
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"LmforgeGPTConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")

    def _validate_switches(self) -> None:
        check_switches(self)
        if self.position_embedding_type == "alibi" and "flash" in (self._attn_implementation or ""):
            raise ValueError(
                "LmforgeGPTConfig: position_embedding_type='alibi' cannot run with "
                f"attn_implementation={self._attn_implementation!r} (no additive bias); use 'sdpa' or 'eager'"
            )

    def _validate_rope(self) -> None:
        if self.position_embedding_type != "rope":
            return
        if self.head_dim % 2:
            raise ValueError(f"LmforgeGPTConfig: RoPE needs an even head_dim, got head_dim={self.head_dim}")
        rope = self.rope_parameters or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"LmforgeGPTConfig.rope_parameters rope_type={rope_type!r} is not one of {ROPE_TYPES}")
        if rope_type != "default":
            factor = rope.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1.0:
                raise ValueError(
                    f"LmforgeGPTConfig.rope_parameters factor={factor!r} must be a number >= 1.0 for rope_type={rope_type!r}"
                )
        if not rope.get("rope_theta", 1.0) > 0:
            raise ValueError(f"LmforgeGPTConfig: rope_theta must be > 0, got {rope.get('rope_theta')!r}")

    def _validate_experts(self) -> None:
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"LmforgeGPTConfig.{name} must be {valid}, got {getattr(self, name)!r}")

        def integer(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("num_experts", "num_shared_experts"):
            if not integer(name) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise bad(name, "a number >= 0")
        for name in ("norm_topk_prob", "router_aux_loss_per_layer"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if not self.num_experts:
            return  # dense MLP: the other expert settings are unused
        if not integer("num_experts_per_tok") or not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise bad("num_experts_per_tok", f"an integer in [1, num_experts={self.num_experts}]")
        if self.moe_intermediate_size is not None and (not integer("moe_intermediate_size")
                                                       or self.moe_intermediate_size < 1):
            raise bad("moe_intermediate_size", "a positive integer or None (= intermediate_size)")
        if self.mlp_bias:
            raise ValueError("LmforgeGPTConfig: mlp_bias=True is not available with num_experts > 0 "
                             f"(num_experts={self.num_experts}): experts and shared experts have no biases")


__all__ = ["LmforgeGPTConfig"]
