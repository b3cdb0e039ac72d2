"""Measure architecture ideas lmforge's GPT does not have on the quickstart, before building them.

    python benchmarks/probe_quickstart_arch.py --patches zeroinit --threads 2 --candidates FILE.yaml
    python benchmarks/probe_quickstart_arch.py --patches zeroinit,qknorm,ve,softcap30 --threads 2

Patches lmforge's GPT **in this process only** (nothing is saved that other code would load as
an lmforge model), then runs ``tune_quickstart.py`` with the remaining arguments, so the
validation-only scoring, time budget and records are the same as for any candidate. Each entry
appended to the results file carries ``"patches"``: the list below. The ideas are
modded-nanogpt's:

- ``zeroinit``: the attention output and MLP down projections start at zero (each block starts as
  the identity).
- ``qknorm``: queries and keys are RMS-normalised per head (no weight) before RoPE.
- ``ve``: value embeddings, a token embedding per block added to the attention values.
- ``softcapN``: logits soft-capped at N (``N * tanh(logits / N)``).

The patched attention is plain causal SDPA without a padding mask or a KV cache: fine for
training and scoring the quickstart's packed rows, not for general use (or generation).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import torch
import torch.nn.functional as F
import tune_quickstart
from torch import nn


def parse_patches(text: str) -> list[str]:
    patches = [p for p in text.split(",") if p]
    for patch in patches:
        if patch not in ("zeroinit", "qknorm", "ve") and not re.fullmatch(r"softcap\d+(\.\d+)?", patch):
            raise SystemExit(f"--patches: unknown patch {patch!r}; valid: zeroinit, qknorm, ve, softcapN (e.g. softcap30)")
    return patches


def install(patches: list[str]) -> None:
    """Patch lmforge's model building (in this process) with ``patches``."""
    import lmforge.train.pretrain as pretrain
    from lmforge.models import attention, positions

    current_ids: dict[str, torch.Tensor] = {}
    build_model = pretrain.build_model

    def patched_build_model(*args: Any, **kwargs: Any) -> nn.Module:
        model = build_model(*args, **kwargs)
        config, base = model.config, model.model
        if "ve" in patches:  # the value embeddings read the batch's token ids
            base.register_forward_pre_hook(lambda m, a, kw: current_ids.__setitem__("ids", kw.get("input_ids")),
                                           with_kwargs=True)
        for block in base.layers:
            if "zeroinit" in patches:
                with torch.no_grad():
                    block.self_attn.o_proj.weight.zero_()
                    block.mlp.down_proj.weight.zero_()
            if "ve" in patches:
                block.self_attn.ve = nn.Embedding(config.vocab_size, config.num_key_value_heads * config.head_dim)
                nn.init.normal_(block.self_attn.ve.weight, std=config.initializer_range)
        for patch in patches:
            if patch.startswith("softcap"):
                cap = float(patch.removeprefix("softcap"))
                model.lm_head.register_forward_hook(lambda m, i, out, cap=cap: cap * torch.tanh(out / cap))
        print(f"patched: {', '.join(patches)}", flush=True)
        return model

    def attention_forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim)
        v = self.v_proj(hidden_states)
        if hasattr(self, "ve"):
            v = v + self.ve(current_ids["ids"])
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if "qknorm" in patches:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        q, k = positions.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                             enable_gqa=self.num_key_value_groups > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None

    pretrain.build_model = patched_build_model
    if {"qknorm", "ve"} & set(patches):
        attention.Attention.forward = attention_forward
    append = tune_quickstart.append
    tune_quickstart.append = lambda path, entry: append(path, {**entry, "patches": patches})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", required=True, help="comma-separated: zeroinit, qknorm, ve, softcapN")
    args, rest = parser.parse_known_args()
    install(parse_patches(args.patches))
    sys.argv = ["tune_quickstart.py", *rest]
    return tune_quickstart.main()


if __name__ == "__main__":
    raise SystemExit(main())
