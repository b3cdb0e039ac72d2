"""A minimal accelerate training loop used by tests/test_train_distributed.py under
``accelerate launch``: check_launch, build_lm_dataset + CausalLMCollator, shard_model, then a
few AdamW steps on a tiny LlamaForCausalLM. Writes the per-step global losses (and what ran) to
the JSON file given as --out (main process only).

The loss of each step is normalised by the number of target tokens of the whole global batch
(gathered over processes) and multiplied by the process count, because DDP/FSDP average
gradients over processes: so one process with batch B and N processes with batch B/N each
compute the same gradient.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_fixtures import gpt_tokenizer, make_corpus  # noqa: E402

from lmforge.data.collators import CausalLMCollator  # noqa: E402
from lmforge.data.pipeline import build_lm_dataset  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.train.distributed import check_launch, is_sharded, shard_model, strategy_name  # noqa: E402


def tiny_llama(vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # identical initial weights in every process and every run
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    accelerator = Accelerator()
    try:
        check_launch(accelerator)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    n = accelerator.num_processes
    tokenizer = gpt_tokenizer(make_corpus(100, seed=1))
    with accelerator.main_process_first():
        dataset = build_lm_dataset(args.data, tokenizer, 32).with_format("numpy")
    loader = DataLoader(dataset, batch_size=args.global_batch // n, shuffle=False,
                        collate_fn=CausalLMCollator(tokenizer.pad_token_id))

    model = shard_model(accelerator, tiny_llama(len(tokenizer)), args.strategy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # after sharding
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses = []
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits.float()
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
        count = (labels[:, 1:] != -100).sum()
        global_count = accelerator.gather(count[None]).sum()
        accelerator.backward(token_loss * n / global_count)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append((accelerator.gather(token_loss.detach()[None]).sum() / global_count).item())

    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps({
            "losses": losses, "strategy": strategy_name(accelerator, model), "num_processes": n,
            "sharded": is_sharded(model),
            "param_types": sorted({type(p).__name__ for p in model.parameters()}),
        }))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
