"""The transformer block: attention and MLP with residuals, the norms placed per ``norm_position``.

Notation: B batch, T length, D hidden size.

Config attributes read here: norm_position, hidden_dropout, num_hidden_layers (DeepNorm),
num_experts (a mixture of experts instead of the MLP when > 0; absent means 0), and those of its
norms, attention and feed-forward. This file is copied next to saved weights: it imports only
torch, transformers and siblings.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import Attention
from .dropout import Dropout, apply_dropout
from .feed_forward import MLP, MoE
from .norms import build_norm, deepnorm_alpha, deepnorm_beta
from .switches import NORM_POSITIONS


class TransformerBlock(GradientCheckpointingLayer):
    """Attention + MLP (or MoE) with residuals; ``config.norm_position`` picks the norm placement.

    - ``pre``:      h = x + drop(attn(norm1(x)));      out = h + drop(mlp(norm2(h)))
    - ``post``:     h = norm1(x + drop(attn(x)));      out = norm2(h + drop(mlp(h)))   (BertLayer)
    - ``deepnorm``: h = norm1(alpha*x + drop(attn(x))); out = norm2(alpha*h + drop(mlp(h)))

    with alpha = (2N)^(1/4), and value/output/FFN weights initialised with gain (8N)^(-1/4)
    (DeepNet). Pre-norm models need a final norm after the last block; post/deepnorm do not.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.norm_position = config.norm_position
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position={self.norm_position!r} is not one of {NORM_POSITIONS}")
        self.attn_norm = build_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.mlp_norm = build_norm(config)
        self.mlp = MoE(config) if getattr(config, "num_experts", 0) else MLP(config)
        self.dropout = Dropout(config.hidden_dropout)
        self.alpha = 1.0
        if self.norm_position == "deepnorm":
            self.alpha = deepnorm_alpha(config.num_hidden_layers)
            beta = deepnorm_beta(config.num_hidden_layers)
            dense = self.mlp
            if isinstance(self.mlp, MoE):  # the experts (3D weights) and the shared experts' linears
                self.mlp.experts.init_gain = beta
                dense = self.mlp.shared_experts
            mlp_linears = (dense.gate_proj, dense.up_proj, dense.down_proj) if dense is not None else ()
            for linear in (self.self_attn.v_proj, self.self_attn.o_proj, *mlp_linears):
                if linear is not None:
                    linear.init_gain = beta  # read by init_weights (xavier_normal_ with this gain)
            for linear in (self.self_attn.q_proj, self.self_attn.k_proj):
                linear.init_gain = 1.0

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states (B, T, D) -> (B, T, D)."""
        x = hidden_states
        if self.norm_position == "pre":
            attn, _ = self.self_attn(self.attn_norm(x), attention_mask, position_embeddings, cache, **kwargs)
            h = x + self._dropout(attn)
            return h + self._dropout(self.mlp(self.mlp_norm(h)))
        attn, _ = self.self_attn(x, attention_mask, position_embeddings, cache, **kwargs)
        h = self.attn_norm(self._scaled(x) + self._dropout(attn))
        return self.mlp_norm(self._scaled(h) + self._dropout(self.mlp(h)))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Residual dropout without a module call (decoding pays for each one)."""
        return apply_dropout(x, self.dropout.p, self.training)

    def _scaled(self, residual: torch.Tensor) -> torch.Tensor:
        """The residual branch scaled by DeepNorm's alpha (1 for post-norm: no extra op)."""
        return residual if self.alpha == 1.0 else self.alpha * residual
