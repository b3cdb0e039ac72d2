"""Chat SFT data: conversations rendered with the tokenizer's chat template, loss on the
assistant's tokens only; generation with the same template; a chat set built from Shakespeare.

Label masking works for any chat template that renders a conversation's prefixes as prefixes of
the whole (most do), without knowing its role markers::

    text  = render(messages)                                  the whole conversation
    start = len(render(messages[:i], add_generation_prompt))  where assistant turn i's text starts
    end   = len(render(messages[:i + 1]))                     where it ends (end-of-turn marker
                                                              included; whitespace after a visible
                                                              marker, like "<|end|>\\n", is not)

The text is tokenized once with offsets; a token is labelled (its label is its id) when its
characters overlap an assistant span [start, end), and -100 otherwise: system and user turns,
role headers and the generation prompt carry no loss. A template that does not render prefixes
as prefixes (one that rewrites earlier turns, say) is refused with a clear error.

Rows are ``input_ids`` and ``labels``; with ``pack`` whole conversations are concatenated
greedily into rows of at most ``max_length`` tokens with ``position_ids`` restarting at 0 per
conversation and ``seq_idx`` numbering the conversations in the row, so attention (GPT) and the
state (Mamba) never cross conversations. ``lmforge.data.collators.CausalLMCollator`` pads
either kind.

Rows are numbered from 0 in error messages, like a ``datasets`` index.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Features, List, Value
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from lmforge.data.collators import IGNORE_INDEX
from lmforge.data.pipeline import _MainProcessFirst
from lmforge.data.sources import load_corpus, load_table
from lmforge.errors import LmforgeError

CHAT_VERSION = "1"  # bump when the encoded format changes: invalidates cached datasets
GET_A_CHAT_TOKENIZER = (
    "train one with a chat template: `lmforge tokenizer train --config chat-bpe "
    "--data CORPUS --output-dir DIR`), or set tokenizer.chat_template to a Jinja template")


# --------------------------------------------------------------------------- checks


def check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a tokenizer that cannot render conversations (no chat template) or cannot report
    token offsets (not a fast tokenizer); the message says how to get a suitable one."""
    if not getattr(tokenizer, "chat_template", None):
        raise LmforgeError(f"{where}: tokenizer {type(tokenizer).__name__} has no chat template, and chat "
                           f"SFT renders conversations with it; {GET_A_CHAT_TOKENIZER}")
    if not getattr(tokenizer, "is_fast", False):
        raise LmforgeError(f"{where}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
                           "chat SFT needs token offsets to find the assistant's tokens")


def clean_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """The messages as plain dicts without None values (datasets fills absent keys with None),
    each with a non-empty string role and a string content."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise LmforgeError(f"{where}: expected a non-empty list of {{role, content}} messages, "
                           f"got {_show(messages)}")
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise LmforgeError(f"{where}: message {k} is {_show(message)}, not a {{role, content}} object")
        m = {key: value for key, value in message.items() if value is not None}
        for key in ("role", "content"):
            if key not in m:
                raise LmforgeError(f"{where}: message {k} has no {key!r} (keys: {', '.join(m) or 'none'}); "
                                   "every message needs a role and a content")
        if not isinstance(m["role"], str) or not m["role"].strip():
            raise LmforgeError(f"{where}: message {k} has role {m['role']!r}; a role is a non-empty string "
                               "such as system, user or assistant")
        if not isinstance(m["content"], str):
            raise LmforgeError(f"{where}: message {k} ({m['role']}) has content of type "
                               f"{type(m['content']).__name__}; expected text")
        out.append(m)
    return out


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- rendering


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    if not messages:  # apply_chat_template refuses an empty conversation; the template may not
        rendered, _ = render_jinja_template(conversations=[[]], chat_template=tokenizer.get_chat_template(),
                                            add_generation_prompt=generation_prompt,
                                            **tokenizer.special_tokens_map)
        return rendered[0]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str,
                        generation_prompt: bool = False) -> str:
    """Render, turning a template error into one that names the message the template rejects."""
    try:
        return _render(tokenizer, messages, generation_prompt)
    except TemplateError as e:
        for k in range(len(messages)):  # the first prefix that fails ends with the culprit
            try:
                _render(tokenizer, messages[:k + 1])
            except TemplateError:
                role = messages[k]["role"]
                raise LmforgeError(f"{where}: the chat template rejects message {k} with role {role!r}: {e} "
                                   f"(roles in this row: {', '.join(m['role'] for m in messages)})") from None
        raise LmforgeError(f"{where}: the chat template failed on this conversation: {e}") from None


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                    where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (its text after
    the role header, up to and including the end-of-turn marker); see the module docstring."""
    text = render_conversation(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:i], generation_prompt=True)
        except Exception as e:
            if i == 0:
                raise LmforgeError(f"{where}: the conversation opens with an assistant turn and the chat "
                                   f"template cannot render an empty conversation ({e}); start the "
                                   "conversation with a system or user message") from None
            raise LmforgeError(f"{where}: the chat template cannot render the conversation up to the "
                               f"assistant turn {i} with a generation prompt: {e}") from None
        upto = _render(tokenizer, messages[:i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise LmforgeError(
                f"{where}: the chat template does not render prefixes as prefixes (message {i}: the text "
                "of the conversation up to it, or its generation prompt, is not the start of the whole "
                "conversation's text), so the assistant's tokens cannot be located; use a template that "
                "renders earlier turns the same whatever follows")
        spans.append((len(before), turn_end(upto, len(before), message["content"])))
    return text, spans


def turn_end(upto: str, start: int, content: str) -> int:
    """The end of an assistant turn: after its end-of-turn marker, without whitespace that
    follows a visible marker ("<|end|>\\n" -> "<|end|>"). A turn whose only end marker is
    whitespace keeps it (the model must still learn where the turn ends)."""
    turn = upto[start:]
    core = content.strip()
    at = turn.find(core)
    if at < 0:  # the template rewrites the content: keep the template's whole turn
        return len(upto)
    trailer = turn[at + len(core):]
    if not trailer.strip():
        return len(upto)
    return len(upto) - (len(trailer) - len(trailer.rstrip()))


# --------------------------------------------------------------------------- encoding


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *,
                        max_length: int | None, where: str) -> dict[str, list[int]]:
    """Token ids and labels of one conversation: labels are -100 except on the tokens of the
    assistant turns (content and end-of-turn marker), where they equal the ids.

    Args:
        tokenizer: a fast tokenizer with a chat template.
        messages: ``[{"role": ..., "content": ...}, ...]`` with at least one assistant turn.
        max_length: keep the first ``max_length`` tokens (None: all).
        where: names the row in error messages (file, split, row).

    Returns:
        ``{"input_ids": [...], "labels": [...]}``; the ids equal
        ``tokenizer.apply_chat_template(messages)``'s (before truncation).

    Raises:
        LmforgeError: no chat template, malformed messages, no assistant turn, a message the
            template rejects, or a template that does not render prefixes as prefixes.
    """
    check_chat_tokenizer(tokenizer, where)
    messages = clean_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages)
        raise LmforgeError(f"{where}: no assistant message (roles: {roles}); the loss covers assistant "
                           "turns only, so every conversation needs at least one")
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    k = 0  # spans and offsets are both in order: one pass
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if max(e, s + 1) > spans[k][0]:  # overlaps [start, end); an empty token counts at its start
            labels[t] = ids[t]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


# --------------------------------------------------------------------------- datasets


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, (CHAT_VERSION, *parts))).encode()).hexdigest()[:32]


def _encode_batch(batch: dict[str, list], indices: list[int], *, tokenizer: Any, column: str,
                  max_length: int, prefix: str) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for messages, i in zip(batch[column], indices, strict=True):
        row = encode_conversation(tokenizer, messages, max_length=max_length, where=f"{prefix} row {i}")
        if any(label != IGNORE_INDEX for label in row["labels"]):  # else truncation left no target
            out["input_ids"].append(row["input_ids"])
            out["labels"].append(row["labels"])
    return out


def pack_conversations(rows: Sequence[Mapping[str, Sequence[int]]], max_length: int) -> dict[str, list]:
    """Concatenate whole conversations, in order, into rows of at most ``max_length`` tokens:
    a row is closed when the next conversation does not fit. ``position_ids`` restart at 0 at
    each conversation and ``seq_idx`` numbers the conversations of a row."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_idx": []}
    current: dict[str, list] = {key: [] for key in out}
    n = 0  # conversations in the current row

    def close() -> None:
        for key in out:
            out[key].append(current[key])
            current[key] = []

    for row in rows:
        length = len(row["input_ids"])
        if length > max_length:
            raise LmforgeError(f"a conversation of {length} tokens does not fit max_length {max_length}; "
                               "truncate it first")
        if current["input_ids"] and len(current["input_ids"]) + length > max_length:
            close()
            n = 0
        current["input_ids"].extend(row["input_ids"])
        current["labels"].extend(row["labels"])
        current["position_ids"].extend(range(length))
        current["seq_idx"].extend([n] * length)
        n += 1
    if current["input_ids"]:
        close()
    return out


def _pack_batch(batch: dict[str, list], *, max_length: int) -> dict[str, list]:
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(batch["input_ids"], batch["labels"], strict=True)]
    return pack_conversations(rows, max_length)


def build_sft_dataset(source: Any, split: str, tokenizer: PreTrainedTokenizerBase, *,
                      messages_column: str = "messages", max_length: int, pack: bool = False,
                      batch_size: int = 1000) -> Dataset:
    """Encode a source of conversations for chat SFT (see the module docstring).

    Args:
        source: a jsonl/json/parquet file or split-aware folder, a Hub id, or a ``datasets``
            dataset, whose ``messages_column`` holds lists of ``{role, content}``.
        split: which split of the source.
        tokenizer: a fast tokenizer with a chat template.
        messages_column: the column with the conversations.
        max_length: longest row in tokens; longer conversations are truncated (their end is lost).
        pack: concatenate whole conversations greedily into rows of at most ``max_length``.
        batch_size: rows per ``datasets.map`` batch (packing never crosses a batch).

    Returns:
        A dataset with int32 list columns ``input_ids``, ``labels`` and, packed,
        ``position_ids`` and ``seq_idx``. Conversations left with no assistant token after
        truncation are dropped (with a warning).

    Raises:
        LmforgeError: no chat template, missing column, or a bad row (named by source, split and
            row number): no assistant turn, a role the template rejects, a message without
            role or content.
    """
    name = type(source).__name__ if hasattr(source, "column_names") else str(source)
    prefix = f"{name} (split {split!r})"
    check_chat_tokenizer(tokenizer, prefix)
    if not isinstance(max_length, int) or max_length < 2:
        raise LmforgeError(f"max_length must be an integer >= 2, got {max_length!r}")
    ds = load_table(source, split)
    if len(ds) == 0:
        raise LmforgeError(f"{prefix}: no rows")
    if messages_column not in ds.column_names:
        raise LmforgeError(f"{prefix}: no column {messages_column!r}; columns are {', '.join(ds.column_names)} "
                           "(choose the conversations' column with messages_column / data.messages_column)")
    state = tokenizer.backend_tokenizer.to_str() + "|" + str(tokenizer.get_chat_template())
    ints = List(Value("int32"))
    with _MainProcessFirst():
        encoded = ds.select_columns([messages_column]).map(
            _encode_batch, batched=True, batch_size=batch_size, with_indices=True,
            remove_columns=[messages_column],
            fn_kwargs={"tokenizer": tokenizer, "column": messages_column, "max_length": max_length,
                       "prefix": prefix},
            features=Features({"input_ids": ints, "labels": ints}),
            new_fingerprint=_fingerprint(ds._fingerprint, state, messages_column, max_length, batch_size),
            desc="lmforge: chat template + tokenize")
        dropped = len(ds) - len(encoded)
        if len(encoded) == 0:
            raise LmforgeError(f"{prefix}: no conversation keeps an assistant token within max_length "
                               f"{max_length}; increase max_length")
        if dropped:
            warnings.warn(f"{prefix}: dropped {dropped} of {len(ds)} conversations whose assistant turns "
                          f"start after max_length {max_length} tokens", stacklevel=2)
        if not pack:
            return encoded
        names = ("input_ids", "labels", "position_ids", "seq_idx")
        return encoded.map(
            _pack_batch, batched=True, batch_size=batch_size, remove_columns=encoded.column_names,
            fn_kwargs={"max_length": max_length}, features=Features({name: ints for name in names}),
            new_fingerprint=_fingerprint(encoded._fingerprint, "pack", max_length, batch_size),
            desc="lmforge: pack conversations")


# --------------------------------------------------------------------------- generation


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: the eos token plus the template's end-of-turn
    marker (the first token after the assistant's content, when it is a special/added token)."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text, spans = assistant_spans(tokenizer, probe, "end-of-turn probe")
    start, end = spans[0]
    turn = text[start:end]
    trailer = turn[turn.find("Hello") + len("Hello"):] if "Hello" in turn else ""
    ids = tokenizer(trailer, add_special_tokens=False)["input_ids"] if trailer.strip() else []
    added = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    if ids and ids[0] in added and ids[0] not in stop:
        stop.append(ids[0])
    return stop


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str) -> str:
    """``messages`` rendered with the chat template and the assistant's generation prompt, after
    checking the tokenizer has a template and every message a known role and text content
    (``where`` names the input in the error)."""
    check_chat_tokenizer(tokenizer, where)
    return render_conversation(tokenizer, clean_messages(messages, where), where, generation_prompt=True)


def chat_generate(model: Any, tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                  **generate_kwargs: Any) -> str:
    """The assistant's answer to ``messages``: the chat template with the generation prompt,
    ``model.generate`` (greedy and at most 128 new tokens unless ``generate_kwargs`` say
    otherwise), the new text up to the end-of-turn marker or eos (not included)."""
    prompt = generation_prompt(tokenizer, messages, "chat_generate")
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    stop = end_of_turn_ids(tokenizer)
    extra = generate_kwargs.pop("eos_token_id", None)
    stop += [i for i in ([extra] if isinstance(extra, int) else extra or []) if i not in stop]
    generate_kwargs.setdefault("max_new_tokens", 128)
    generate_kwargs.setdefault("do_sample", False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"].to(device),
                                 attention_mask=enc["attention_mask"].to(device),
                                 eos_token_id=stop, pad_token_id=pad, **generate_kwargs)
    finally:
        model.train(was_training)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    cut = next((k for k, t in enumerate(new) if t in stop), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True)


# --------------------------------------------------------------------------- Shakespeare chat

# A speaker line: ALL CAPS ("HAMLET.", "FIRST LORD.", "1 NEIGHBOUR.", "HELENA") or Title Case
# ("Ham.", "Lady Capulet."), on its own line with no indentation; checked by frequency below.
_CAPS_NAME = re.compile(r"[A-Z0-9][A-Z0-9 '&\-]*[A-Z]\.?")
_TITLE_NAME = re.compile(r"[A-Z][a-z]+(?: [A-Z][a-z]+){0,2}\.")
_NOT_NAMES = {"ACT", "SCENE", "PROLOGUE", "EPILOGUE", "INDUCTION", "THE", "FINIS"}
_FIRST_ACT = re.compile(r"^act\b", re.I | re.M)


def _speaker_lines(blocks: list[str]) -> set[str]:
    """Block-opening lines that name a speaker: name-shaped and opening at least 3 blocks."""
    heads = Counter(b.split("\n", 1)[0] for b in blocks if "\n" in b)
    return {h for h, n in heads.items()
            if n >= 3 and h == h.strip() and h.split(" ")[0].rstrip(".").upper() not in _NOT_NAMES
            and (_CAPS_NAME.fullmatch(h) or _TITLE_NAME.fullmatch(h))}


def _expander(personae: str) -> Any:
    """Abbreviated speaker names ("Ham", "FAL") -> the one name in the list of persons that
    starts with them ("HAMLET", "FALSTAFF"); other names are only upper-cased."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", personae) if w[0].isupper()}

    def expand(name: str) -> str:
        key = name.lower()
        if " " not in name and key not in words:
            longer = sorted(w for w in words if w.startswith(key))
            if len(longer) == 1:
                return longer[0].upper()
        return name.upper()

    return expand


def play_speeches(text: str, *, min_lines: int = 4, max_lines: int = 10) -> Iterator[tuple[str, list[str]]]:
    """(speaker, lines) of each speech in a play of the ``shakespeare`` corpus with between
    ``min_lines`` and ``max_lines`` lines of verse or prose. A speech is the paragraph after a
    speaker line; stage directions on lines of their own at its start or end are dropped and
    speeches with other directions inside are skipped. Poems (no acts) have no speeches."""
    act = _FIRST_ACT.search(text)
    if act is None:
        return
    expand = _expander(text[:act.start()])
    blocks = re.split(r"\n[ \t]*\n", text[act.start():])
    speakers = _speaker_lines(blocks)
    for block in blocks:
        head, _, rest = block.partition("\n")
        if head not in speakers:
            continue
        lines = [line.strip() for line in rest.split("\n") if line.strip()]
        while lines and lines[0].startswith("[") and lines[0].endswith("]"):
            lines.pop(0)
        while lines and lines[-1].startswith("[") and lines[-1].endswith("]"):
            lines.pop()
        if any(c in line for line in lines for c in "[]") or not min_lines <= len(lines) <= max_lines:
            continue
        yield expand(head.rstrip(".")), lines


def build_shakespeare_chat(out_dir: str | Path, *, min_lines: int = 4, max_lines: int = 10) -> Path:
    """Write ``out_dir/{train,validation,test}.jsonl`` of "continue this speech" conversations
    from the built-in ``shakespeare`` corpus, each split from the corpus's split of the same
    name (so splits are disjoint by play). A row::

        {"messages": [{"role": "user", "content": "Continue this speech by HAMLET: <first line>"},
                      {"role": "assistant", "content": "<the rest of the speech>"}],
         "play": "hamlet", "character": "HAMLET"}

    Speeches of ``min_lines`` to ``max_lines`` lines are used (about 5,000 training rows with the
    defaults). Returns ``out_dir``.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        ds = load_corpus("shakespeare", split=split)
        rows = []
        for play in ds:
            for name, lines in play_speeches(play["text"], min_lines=min_lines, max_lines=max_lines):
                rows.append({"messages": [
                    {"role": "user", "content": f"Continue this speech by {name}: {lines[0]}"},
                    {"role": "assistant", "content": "\n".join(lines[1:])}],
                    "play": play.get("id"), "character": name})
        if not rows:
            raise LmforgeError(f"shakespeare (split {split!r}): no speeches of {min_lines} to {max_lines} lines")
        tmp = out / f"{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / f"{split}.jsonl")
    return out
