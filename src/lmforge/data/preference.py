"""Preference pairs: a prompt, a chosen and a rejected completion, tokenized for DPO-style tuning.

The format is the one trl and the Hub's preference sets use: columns ``prompt``, ``chosen`` and
``rejected`` (names configurable), either

- plain text: the completion follows the prompt as it is (put the separating space at the start of
  the completion), and the tokenizer's eos token is appended to each completion, or
- conversations: ``prompt`` a list of ``{role, content}`` messages (or a string: one user message)
  and ``chosen``/``rejected`` the assistant's answer (a list of messages, or a string). The prompt
  is rendered with the chat template and its generation prompt; a completion is the text the
  template adds for the answer, up to and including its end-of-turn marker.

Prompt and completions are tokenized separately (the prompt tokens are the same for both sides
of a pair) and only completion tokens are scored. A pair longer than ``max_length`` (prompt plus
its longer completion) is truncated by ``truncation``:

- ``prompt_first``: tokens are removed from the start of the prompt (its end, next to the
  completion, is kept), down to one prompt token; then from the end of the completions;
- ``completion_first``: tokens are removed from the end of the completions, down to one token
  each; then from the start of the prompt.

Truncated pairs are counted; a pair whose two completions become identical is dropped (it
carries no preference) and counted too. Rows are numbered from 0 in error messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

from lmforge.data.chat import (
    _show,
    check_chat_tokenizer,
    clean_messages,
    render_conversation,
    turn_end,
)
from lmforge.data.collators import IGNORE_INDEX, CausalLMCollator
from lmforge.data.sources import load_table
from lmforge.errors import LmforgeError

Truncation = Literal["prompt_first", "completion_first"]
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PreferenceData:
    """A split of tokenized pairs (columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``) and
    what tokenizing it did."""

    pairs: Dataset
    rows: int  # rows read
    truncated: int  # pairs cut to max_length
    dropped: int  # pairs whose completions became identical when truncated
    conversational: bool


def _is_conversation(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _leading_specials(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (a bos), none of those it appends."""
    probe = "a b"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    return []


class PairEncoder:
    """Tokenizes one row of a preference set (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, max_length: int, truncation: Truncation = "prompt_first"):
        if max_length < 2:
            raise LmforgeError(f"data.max_length must be at least 2 tokens for a prompt and a completion, got {max_length}")
        if truncation not in ("prompt_first", "completion_first"):
            raise LmforgeError(f"data.truncation: {truncation!r} is not prompt_first or completion_first")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.bos = _leading_specials(tokenizer)
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _text_pair(self, prompt: str, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
        return self.bos + self._ids(prompt), self._ids(chosen) + self.eos, self._ids(rejected) + self.eos

    def _chat_completion(self, prompt: list[dict], answer: Any, rendered_prompt: str, where: str, side: str) -> str:
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        answer = clean_messages(answer, f"{where}, {side}")
        if answer[-1]["role"] != "assistant":
            raise LmforgeError(f"{where}: the {side} conversation ends with a {answer[-1]['role']!r} message; "
                               "a completion is the assistant's answer")
        whole = render_conversation(self.tokenizer, prompt + answer, f"{where}, {side}")
        if not whole.startswith(rendered_prompt):
            raise LmforgeError(f"{where}: the chat template does not render the prompt (with its generation prompt) "
                               f"as the start of the prompt + {side} conversation, so the completion cannot be "
                               "located; use a template that renders earlier turns the same whatever follows")
        return whole[len(rendered_prompt):turn_end(whole, len(rendered_prompt), answer[-1]["content"])]

    def _chat_pair(self, prompt: Any, chosen: Any, rejected: Any, where: str) -> tuple[list[int], list[int], list[int]]:
        check_chat_tokenizer(self.tokenizer, where)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = clean_messages(prompt, f"{where}, prompt")
        rendered = render_conversation(self.tokenizer, prompt, f"{where}, prompt", generation_prompt=True)
        completions = [self._chat_completion(prompt, answer, rendered, where, side)
                       for side, answer in (("chosen", chosen), ("rejected", rejected))]
        return self._ids(rendered), self._ids(completions[0]), self._ids(completions[1])

    def encode(self, prompt: Any, chosen: Any, rejected: Any, where: str) -> tuple[dict[str, list[int]], bool]:
        """(``{prompt_ids, chosen_ids, rejected_ids}``, whether it was truncated)."""
        for side, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if value is None:
                raise LmforgeError(f"{where}: the {side} is missing (null)")
            if isinstance(value, str):
                if side != "prompt" and not value.strip():
                    raise LmforgeError(f"{where}: the {side} completion is empty; every pair needs two non-empty "
                                       "completions")
            elif not _is_conversation(value):
                raise LmforgeError(f"{where}: the {side} is {_show(value)}; expected text or a list of "
                                   "{role, content} messages")
        if chosen == rejected:
            raise LmforgeError(f"{where}: the chosen and the rejected completion are the same ({_show(chosen)}); "
                               "such a pair carries no preference: fix or remove the row")
        if any(_is_conversation(v) for v in (prompt, chosen, rejected)):
            p, c, r = self._chat_pair(prompt, chosen, rejected, where)
        else:
            p, c, r = self._text_pair(prompt, chosen, rejected)
        if not p:
            raise LmforgeError(f"{where}: the prompt is empty and the tokenizer adds no bos token, so the first "
                               "completion token would have nothing to be predicted from; give every pair a prompt")
        for side, ids in (("chosen", c), ("rejected", r)):
            if not ids:
                raise LmforgeError(f"{where}: the {side} completion is empty once rendered and tokenized")
        if c == r:
            raise LmforgeError(f"{where}: the chosen and the rejected completion tokenize to the same tokens; "
                               "such a pair carries no preference")
        return self._truncate(p, c, r)

    def _truncate(self, p: list[int], c: list[int], r: list[int]) -> tuple[dict[str, list[int]], bool]:
        limit = self.max_length
        over = len(p) + max(len(c), len(r)) - limit
        if over > 0:
            if self.truncation == "prompt_first":
                p = p[min(over, len(p) - 1):]
                room = limit - len(p)
            else:
                room = max(1, limit - len(p))
                p = p[max(0, len(p) + room - limit):]
            c, r = c[:room], r[:room]
        return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}, over > 0


def _check_columns(ds: Dataset, columns: Mapping[str, str], where: str) -> None:
    missing = [f"{key} column {name!r}" for key, name in columns.items() if name not in ds.column_names]
    if missing:
        raise LmforgeError(f"{where}: no {' and no '.join(missing)}; the columns are {', '.join(ds.column_names)} "
                           "(name yours with data.prompt_column / data.chosen_column / data.rejected_column)")


def load_preference_pairs(source: Any, split: str, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                          truncation: Truncation = "prompt_first", prompt_column: str = "prompt",
                          chosen_column: str = "chosen", rejected_column: str = "rejected") -> PreferenceData:
    """Read and tokenize a split of preference pairs (see the module docstring).

    Raises:
        LmforgeError: a missing column (listing those present), an empty split, or a bad row named
            by source, split and row: a missing or empty completion, chosen equal to rejected, a
            conversation the chat template cannot render, a conversational pair without a chat
            template.
    """
    name = type(source).__name__ if hasattr(source, "column_names") else str(source)
    where = f"{name} (split {split!r})"
    ds = source if isinstance(source, Dataset) else load_table(source, split)
    if len(ds) == 0:
        raise LmforgeError(f"{where}: no rows")
    _check_columns(ds, {"prompt": prompt_column, "chosen": chosen_column, "rejected": rejected_column}, where)
    encoder = PairEncoder(tokenizer, max_length=max_length, truncation=truncation)
    rows: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    truncated = dropped = 0
    conversational = False
    table = ds.select_columns([prompt_column, chosen_column, rejected_column])
    for i, row in enumerate(table):
        prompt, chosen, rejected = row[prompt_column], row[chosen_column], row[rejected_column]
        conversational = conversational or any(_is_conversation(v) for v in (prompt, chosen, rejected))
        encoded, cut = encoder.encode(prompt, chosen, rejected, f"{where} row {i}")
        truncated += cut
        if encoded["chosen_ids"] == encoded["rejected_ids"]:
            dropped += 1
            continue
        for key, ids in encoded.items():
            rows[key].append(ids)
    if not rows["prompt_ids"]:
        raise LmforgeError(f"{where}: every pair's completions became identical when truncated to data.max_length "
                           f"{max_length}; raise data.max_length")
    ints = List(Value("int32"))
    pairs = Dataset.from_dict(rows, features=Features({key: ints for key in rows}))
    return PreferenceData(pairs, len(ds), truncated, dropped, conversational)


class PreferenceCollator:
    """Rows of pairs -> one batch of 2B sequences: the B chosen ones, then the B rejected ones.

    The sequences are collated by ``CausalLMCollator`` (right padding, ``attention_mask``);
    ``labels`` hold the completion tokens and -100 on the prompt and the padding. Stored reference
    log-probabilities (the columns ``ref_chosen_logps``/``ref_rejected_logps``) come along as
    float64 (B,) tensors.
    """

    def __init__(self, pad_token_id: int):
        self.sequences = CausalLMCollator(pad_token_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise LmforgeError("cannot collate an empty list of pairs")
        batch = self.sequences([{"input_ids": [*row["prompt_ids"], *row[side]],
                                 "labels": [IGNORE_INDEX] * len(row["prompt_ids"]) + list(row[side])}
                                for side in ("chosen_ids", "rejected_ids") for row in rows])
        for column in REFERENCE_COLUMNS:
            if column in rows[0]:
                batch[column] = torch.tensor([float(row[column]) for row in rows], dtype=torch.float64)
        return batch
