"""Feed-forward: the MLP of a transformer block, plain or gated (SwiGLU / GeGLU), and the mixture of
experts (MoE) that replaces it when ``num_experts > 0``.

Notation: N tokens (batch x length, flattened), D hidden size, F intermediate size (of one expert
for the MoE), E experts, k experts per token (top-k), L MoE layers.

Routing (``Router``; exactly Mixtral's with ``norm_topk_prob`` and no selection bias):
    logits = x W_r^T (N, E);  p = softmax(logits) in float32 (float64 in a float64 model);
    experts = the k largest p (of p + b when DeepSeek-V3's selection bias b is on: b chooses,
              it never weights);  w = p at those experts, / their sum when ``norm_topk_prob``;
    y = sum_j w_j expert_{e_j}(x)  [+ shared(x)],  expert(x) = down(act(gate(x)) * up(x)).

Dropless: every token reaches all of its k experts; there is no capacity factor, nothing is dropped
or padded. That keeps the layer equal to Mixtral and a token's output independent of the other
tokens in its batch. Capacity limits exist to give experts static shapes on accelerators; the
dispatch here (tokens sorted by expert, one matmul per active expert) has no such need.

Losses (``router_losses``), from every layer's router logits, over real tokens only:
    aux = E * sum_e f_e P_e, with f_e = (top-k picks of e, all layers) / (L x tokens) and
          P_e = (sum of p_e, all layers and tokens) / (L x tokens): Mixtral's
          ``load_balancing_loss_func`` (layers pooled, not a mean of per-layer losses); it is k
          when the load is perfectly balanced. Pooled, one layer's idle expert can be made up by
          another layer's busy one. With ``per_layer`` (config ``router_aux_loss_per_layer``, as
          Switch Transformer and GShard), aux is the mean over layers of each layer's
          E * sum_e f_e P_e (f and P over that layer's tokens): every layer is pushed to balance;
          also k when balanced.
    z   = mean over layers and tokens of logsumexp(logits)^2 (ST-MoE's router z-loss).

Weight layout is Mixtral's (router ``gate.weight`` (E, D); ``experts.gate_up_proj`` (E, 2F, D),
gate rows then up rows; ``experts.down_proj`` (E, D, F)), so conversion is a copy; an ungated
activation stores ``experts.up_proj`` (E, F, D). Experts have no biases.

Config attributes read here: hidden_size, intermediate_size, hidden_act, mlp_bias, num_experts,
num_experts_per_tok, moe_intermediate_size, num_shared_experts, norm_topk_prob,
router_bias_update_rate. This file is copied next to saved weights: it imports only torch,
transformers and siblings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .switches import ACTIVATIONS


def _activation(config) -> tuple[str, bool]:
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={config.hidden_act!r} is not one of {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[config.hidden_act]


class MLP(nn.Module):
    """Feed-forward block: ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` for swiglu / geglu.

    ``intermediate_size`` overrides the config's (the MoE's shared experts).
    """

    def __init__(self, config, intermediate_size: int | None = None):
        super().__init__()
        act_name, self.gated = _activation(config)
        d, bias = config.hidden_size, config.mlp_bias
        f = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=bias) if self.gated else None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = ACT2FN[act_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


# ------------------------------------------------------------------------------ mixture of experts


def _routing_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32, or the logits' dtype when wider (float64 for the reference tests)."""
    return torch.promote_types(logits.dtype, torch.float32)


def select_experts(probs: torch.Tensor, top_k: int, bias: torch.Tensor | None = None):
    """(weights (N, k), experts (N, k)): the k largest ``probs`` (N, E), chosen by ``probs + bias``
    when a selection bias is given (the weights are still the probabilities)."""
    if bias is None:
        return torch.topk(probs, top_k, dim=-1)
    experts = torch.topk(probs + bias, top_k, dim=-1).indices
    return probs.gather(-1, experts), experts


class Router(nn.Module):
    """Top-k softmax router: x (N, D) -> (logits (N, E), weights (N, k) in float32, experts (N, k)).

    With ``router_bias_update_rate > 0`` it holds DeepSeek-V3's selection bias
    ``e_score_correction_bias`` (E,), a buffer saved with the model and moved by ``update_bias``.
    """

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.bias_update_rate = config.router_bias_update_rate
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        bias = torch.zeros(config.num_experts) if self.bias_update_rate > 0 else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(x, self.weight)  # (N, E)
        probs = torch.softmax(logits.to(_routing_dtype(logits)), dim=-1)
        weights, experts = select_experts(probs, self.top_k, self.e_score_correction_bias)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """DeepSeek-V3's aux-loss-free step: b += rate * sign(mean(load) - load), ``load`` (E,) the
        tokens routed to each expert since the last update (over all processes)."""
        load = load.to(self.e_score_correction_bias.device, torch.float32)
        self.e_score_correction_bias += self.bias_update_rate * torch.sign(load.mean() - load)


class Experts(nn.Module):
    """E feed-forward experts stored as 3D tensors (Mixtral's layout); ``forward`` runs each token
    through its k experts only: slots sorted by expert, one matmul per active expert."""

    def __init__(self, config):
        super().__init__()
        act_name, self.gated = _activation(config)
        e, d = config.num_experts, config.hidden_size
        f = config.moe_intermediate_size or config.intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, d, f
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))  # [gate; up] rows per expert
        else:
            self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        self.act_fn = ACT2FN[act_name]

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), experts and weights (N, k) -> (N, D): sum_j weights[:, j] * expert_{experts[:, j]}(x)."""
        n, k = experts.shape
        if n == 0:
            return torch.zeros_like(x)
        slots = experts.reshape(-1)  # (N k,): slot n*k + j holds token n's j-th expert
        order = slots.argsort(stable=True)  # slots grouped by expert
        sizes = torch.bincount(slots, minlength=self.num_experts).tolist()
        grouped = x[order // k].split(sizes)  # E chunks of (n_e, D)
        up = (self.gate_up_proj if self.gated else self.up_proj).unbind(0)
        down = self.down_proj.unbind(0)
        out = torch.cat([self._expert(h, up[e], down[e]) for e, h in enumerate(grouped) if sizes[e]])
        out = out * weights.reshape(-1)[order, None]  # (N k, D), float32 weights
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return out[back].view(n, k, -1).sum(dim=1).to(x.dtype)  # each token's k slots summed

    def _expert(self, h: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens h (n_e, D) -> (n_e, D)."""
        if self.gated:
            gate, up = nn.functional.linear(h, up).chunk(2, dim=-1)
            return nn.functional.linear(self.act_fn(gate) * up, down)
        return nn.functional.linear(self.act_fn(nn.functional.linear(h, up)), down)

    def reference_forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by the routing (0 for unchosen experts): the
        dense oracle ``forward`` is tested against. O(N E F D): for tests only."""
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        dense.scatter_add_(1, experts, weights)  # (N, E)
        up = self.gate_up_proj if self.gated else self.up_proj
        outs = torch.stack([self._expert(x, up[e], self.down_proj[e]) for e in range(self.num_experts)], 1)
        return (outs * dense[..., None]).sum(dim=1).to(x.dtype)  # (N, D)


class MoE(nn.Module):
    """Routed experts (+ shared experts every token passes through, ungated): x (B, T, D) -> (B, T, D).

    Training statistics: the model passes each forward's routed-token counts to ``count_load``
    (training mode only); ``take_load`` / ``take_step_load`` read and reset them (see
    ``lmforge.train.moe_stats``). They are plain tensors, not buffers: never saved, never cast by
    ``.to(dtype)``, and not broadcast by DDP (which would overwrite every process's counts with
    the first process's).
    """

    def __init__(self, config):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = None
        if config.num_shared_experts:
            self.shared_experts = MLP(config, self.experts.intermediate_size * config.num_shared_experts)
        self.load: torch.Tensor | None = None  # (E,) routed tokens since the last take_load
        self.step_load: torch.Tensor | None = None  # (E,) since the last bias update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)  # (N, D)
        _, weights, experts = self.gate(flat)
        out = self.experts(flat, experts, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(b, t, d)

    def count_load(self, tokens_per_expert: torch.Tensor) -> None:
        """Add one forward's routed-token counts (E,) (real tokens x k picks)."""
        counts = tokens_per_expert.detach().long()
        self.load = counts if self.load is None else self.load + counts
        if self.gate.e_score_correction_bias is not None:
            self.step_load = counts if self.step_load is None else self.step_load + counts

    def take_load(self) -> torch.Tensor:
        """Routed tokens per expert (E,) since the last call; resets the count."""
        load = self.load if self.load is not None else torch.zeros(self.experts.num_experts, dtype=torch.long)
        self.load = None
        return load

    def take_step_load(self) -> torch.Tensor | None:
        """Routed tokens per expert since the last bias update (None: no selection bias); resets it."""
        if self.gate.e_score_correction_bias is None:
            return None
        load = self.step_load
        self.step_load = None
        return load if load is not None else torch.zeros(self.experts.num_experts, dtype=torch.long)


def router_losses(router_logits: tuple[torch.Tensor, ...], top_k: int, biases: list[torch.Tensor | None],
                  token_mask: torch.Tensor | None = None,
                  per_layer: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(aux, z, tokens per expert (L, E)) from the L layers' router logits (N, E) (formulas in the
    module docstring). ``biases``: each layer's selection bias (or None), so the picks counted are
    the ones the layer made. ``token_mask`` (N,) bool: the real tokens (None: all). ``per_layer``:
    the mean of each layer's load-balancing loss instead of Mixtral's loss of the pooled layers."""
    num_experts = router_logits[0].shape[-1]
    counts, prob_sums, z_sum = [], [], 0.0
    for logits, bias in zip(router_logits, biases, strict=True):
        logits = logits.to(_routing_dtype(logits))
        if token_mask is not None:
            logits = logits[token_mask.to(logits.device)]
        probs = torch.softmax(logits, dim=-1)
        _, picked = select_experts(probs, top_k, bias)
        counts.append(torch.bincount(picked.reshape(-1), minlength=num_experts))
        prob_sums.append(probs.sum(dim=0))
        z_sum = z_sum + torch.logsumexp(logits, dim=-1).square().sum()
    counts, prob_sums = torch.stack(counts), torch.stack(prob_sums)  # (L, E) each
    tokens = max(int(logits.shape[0]), 1)
    if per_layer:
        aux = num_experts * ((counts.float() / tokens) * (prob_sums / tokens)).sum(dim=-1).mean()
    else:
        rows = len(router_logits) * tokens
        aux = num_experts * ((counts.sum(dim=0).float() / rows) * (prob_sums.sum(dim=0) / rows)).sum()
    return aux, z_sum / (len(router_logits) * tokens), counts
