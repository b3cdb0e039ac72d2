"""Expert-load statistics and the aux-loss-free bias updates of mixture-of-experts models, for the loop.

The model counts (``lmforge.models.feed_forward.MoE.count_load`` per layer and
``take_router_losses`` on the heads, in training mode only, real tokens only); ``ExpertLoad``
reads and resets the counts, sums them over processes and turns them into logged figures:

    moe_aux_loss, moe_z_loss    the window's mean over forwards (micro-batches of every process) of
                                the load-balancing loss and the z-loss, before their coefficients;
    moe_load_max, moe_load_min  max and min over layers l and experts e of E * n_le / sum_e n_le,
                                n_le the tokens layer l routed to expert e in the window (every
                                process): 1.0 is a perfect balance, 0 an idle expert, E every token
                                on one expert (top-1; E/k for top-k).

With ``router_bias_update_rate > 0`` (DeepSeek-V3's aux-loss-free balancing) ``after_step`` moves
each layer's selection bias by rate * sign(mean load - load), the load of the optimizer step's
tokens on every process, so all processes make the same update.

Modules are found by their methods, not their class, so a model loaded from its saved code
(``trust_remote_code``) or wrapped (peft, DDP) works too. A model without MoE layers costs nothing:
no figures, no collectives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

GlobalSum = Callable[[list[float]], list[float]]  # sums a list of numbers over processes


class ExpertLoad:
    """The MoE layers and heads of ``model``, read by the training loop."""

    def __init__(self, model: nn.Module):
        modules = list(model.modules())
        self.layers = [m for m in modules if callable(getattr(m, "take_load", None))]
        self.heads = [m for m in modules if callable(getattr(m, "take_router_losses", None))]

    def after_step(self, global_sum: GlobalSum) -> None:
        """Update the selection biases from the step's load (no-op, and no collective, without them)."""
        loads = [(layer, layer.take_step_load()) for layer in self.layers]
        loads = [(layer, load) for layer, load in loads if load is not None]
        if not loads:
            return
        summed = torch.tensor(global_sum([float(v) for _, load in loads for v in load.tolist()]))
        for (layer, _), load in zip(loads, summed.view(len(loads), -1), strict=True):
            layer.gate.update_bias(load)

    def figures(self, global_sum: GlobalSum) -> dict[str, float]:
        """The window's figures (module docstring); resets the counts. {} for a dense model."""
        if not self.layers:
            return {}
        loads = [layer.take_load().cpu() for layer in self.layers]
        sums = [head.take_router_losses() for head in self.heads]  # (aux, z, forwards) each
        aux, z, forwards = (sum(s[i] for s in sums) for i in range(3))
        aux, z, forwards, *counts = global_sum([aux, z, forwards, *torch.cat(loads).tolist()])
        figures = {}
        if forwards:
            figures.update(moe_aux_loss=aux / forwards, moe_z_loss=z / forwards)
        counts = torch.tensor(counts, dtype=torch.float64).view(len(loads), -1)  # (L, E)
        routed = counts.sum(dim=1)
        load = counts[routed > 0] * counts.shape[1] / routed[routed > 0, None]
        if load.numel():
            figures.update(moe_load_max=float(load.max()), moe_load_min=float(load.min()))
        return figures
