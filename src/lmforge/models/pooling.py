"""Pooling: where a causal classifier reads each row (its last real token), one rule for every family.

Notation: B batch, T length of this call, S length of the attention mask (past + new).

This file is copied next to saved weights: it imports only torch.
"""

from __future__ import annotations

import torch


def last_token_index(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pad_token_id: int | None,
    *,
    batch_size: int,
    length: int,
    device: torch.device | str,
) -> torch.LongTensor:
    """Position (B,) of each row's last real token: where a causal classifier pools.

    One rule for every family. With ``attention_mask`` (B, S): the rightmost position where it is
    nonzero, so left and right padding both work (the mask wins over ``pad_token_id``, which may
    also be a real token such as eos); only its last ``length`` columns are read, those of this
    call after a cache. Without a mask, with ``input_ids`` and ``pad_token_id``: the rightmost
    token that is not ``pad_token_id``. Without either, a batch of one row pools its last
    position, and a larger batch raises ``ValueError`` (its rows may be padded). A row with no
    real token gives 0.
    """
    if attention_mask is not None:
        real = attention_mask[:, -length:].to(device) != 0  # (B, T)
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids.to(device) != pad_token_id  # (B, T)
    elif batch_size == 1:
        return torch.full((1,), length - 1, dtype=torch.long, device=device)
    else:
        raise ValueError(
            f"cannot tell where each row of a batch of {batch_size} ends without an attention_mask "
            "or config.pad_token_id: pass the tokenizer's attention_mask (or set pad_token_id in "
            "the model config)"
        )
    positions = torch.arange(length, device=device)  # (T,)
    return (positions * real).amax(-1)  # (B,) rightmost real position, 0 for an empty row
