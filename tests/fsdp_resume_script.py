"""Checkpoint round trip of a model sharded by lmforge (fully_shard) through accelerate's
save_state/load_state, in one process with a 1-rank gloo group (run by test_train_distributed.py).

Trains 2 steps, saves, trains 2 more (reference); then a fresh model + optimizer load the
checkpoint and train the same 2 steps. Prints JSON: the losses of both and facts about the
checkpoint files.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import load_file

from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM
from lmforge.train.distributed import _fully_shard, is_sharded


def build(accelerator):
    torch.manual_seed(0)
    model = LmforgeGPTForCausalLM(LmforgeGPTConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model = _fully_shard(model, accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # after sharding
    return accelerator.prepare(model, optimizer)


def steps(model, optimizer, batches) -> list[float]:
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> int:
    tmp = Path(tempfile.mkdtemp())
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=0, world_size=1)
    accelerator = Accelerator()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(4)]

    model, optimizer = build(accelerator)
    steps(model, optimizer, batches[:2])
    accelerator.save_state(str(tmp / "ckpt"))
    reference = steps(model, optimizer, batches[2:])

    accelerator._models.clear()
    accelerator._optimizers.clear()
    model, optimizer = build(accelerator)
    accelerator.load_state(str(tmp / "ckpt"))
    resumed = steps(model, optimizer, batches[2:])

    saved = load_file(tmp / "ckpt" / "model.safetensors")
    optim = torch.load(tmp / "ckpt" / "optimizer.bin", weights_only=True)
    print(json.dumps({
        "reference": reference, "resumed": resumed, "sharded": is_sharded(model),
        "saved_types": sorted({type(t).__name__ for t in saved.values()}),
        "saved_keys": sorted(saved), "optimizer_state_keys": sorted(map(str, optim["state"])),
    }))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
