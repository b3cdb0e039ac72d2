"""The generation loop behind ``lmforge generate``, ``chat`` and ``serve``: a model and its
tokenizer, a decoder (``lmforge.inference.decoding``), text streamed as it is produced.

``Engine.stream(prompts, sampling)`` yields, after every step, the new text of each prompt that
produced some (``Delta``), ending each with its finish reason: ``"stop"`` (end-of-text or
end-of-turn token, or a stop string) or ``"length"`` (``max_new_tokens`` or the model's context).
Text is decoded a few tokens at a time (``_Row``), a character split across tokens appears once
it is whole, and text that may be the start of a stop string is held back until it is known not
to be one. ``Engine.complete`` collects the same into ``Completion``s.

One engine serves one batch at a time (the server queues requests); a batch of prompts is
left-padded and decoded together.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.data.chat import end_of_turn_ids, generation_prompt
from lmforge.errors import LmforgeError
from lmforge.inference.decoding import (
    WEIGHTS,
    CacheDecoder,
    Decoder,
    MambaDecoder,
    StaticGPTDecoder,
    compiler_available,
)
from lmforge.inference.sampling import Sampler, Sampling
from lmforge.models.convert import from_hf
from lmforge.runs import load_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE = ("auto", "yes", "no")


class InferenceError(LmforgeError):
    """A request that cannot be served as asked (the server answers it with HTTP 400)."""


@dataclass
class Delta:
    """New text of prompt ``index`` (empty when only the finish reason is new)."""

    index: int
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0  # set with the finish reason, as is completion_tokens
    completion_tokens: int = 0


@dataclass
class Completion:
    """A prompt's whole answer, with token counts."""

    index: int
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class _Row:
    """The decoding state of one prompt: its tokens, and its text decoded incrementally (as vLLM
    does): ``text`` holds the decoding of ``tokens[:read]``; each step decodes only the tokens from
    ``prefix`` on, and the new text is what ``tokens[prefix:]`` decodes to beyond ``tokens[prefix:read]``
    (both decoded from the same token, so a tokenizer's first-token rules apply to both alike)."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prefix: int = 0  # first token of the decoding window
    read: int = 0  # tokens whose text is in ``text``
    sent: int = 0  # characters of ``text`` already yielded
    finish_reason: str | None = None


def model_family(model: nn.Module) -> str:
    """``"gpt"``, ``"mamba"``, ``"mamba2"`` (also the hybrids), ``"bert"`` or ``"other"`` by ``config.model_type``."""
    model_type = getattr(model.config, "model_type", "")
    for kind in ("gpt", "mamba", "mamba2", "bert"):
        if model_type == f"lmforge_{kind}":
            return kind
    return "other"


def make_decoder(model: nn.Module, *, weights: str = "float", compile: bool = False) -> Decoder:
    """The fastest decoder for ``model``: the static-cache GPT decoder, Mamba's state step, or the
    model's own forward with its cache (stock models, ALiBi, Mamba-2 and its hybrids; float weights
    only)."""
    kind = model_family(model)
    if kind == "gpt" and model.config.position_embedding_type != "alibi":
        return StaticGPTDecoder(model, weights=weights, compile=compile)
    if kind == "mamba":
        return MambaDecoder(model, weights=weights, compile=compile)
    if weights != "float":
        raise InferenceError(f"weights={weights!r} needs an lmforge GPT (not ALiBi) or Mamba model; "
                             f"this is {model.config.model_type!r}: use weights='float'")
    return CacheDecoder(model)


def as_lmforge(model: nn.Module) -> nn.Module:
    """A stock Llama, GPT-2 or Mamba causal LM as the lmforge model with the same weights (exact
    conversion), so it decodes on the fast path; any other model as it is."""
    if model_family(model) != "other":
        return model
    try:
        converted = from_hf(model).eval()
    except (ValueError, KeyError, RuntimeError) as e:  # no converter, or a config lmforge cannot represent
        logger.info("decoding %s through its own forward: %s", type(model).__name__, e)
        return model
    converted.generation_config = model.generation_config
    return converted


def _context(model: nn.Module) -> int | None:
    """The longest sequence the model takes (None: no limit, as for Mamba, Mamba-2 and its hybrids,
    whose attention layers have no positions or RoPE)."""
    if model_family(model) in ("mamba", "mamba2"):
        return None
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


class Engine:
    """A causal LM and its tokenizer, ready to generate (see the module docstring).

    ``name`` is how the server lists the model. ``decoder`` defaults to ``make_decoder(model)``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str = "model", decoder: Decoder | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.decoder = decoder if decoder is not None else make_decoder(model)
        self.context = _context(model)
        self.device = next(model.parameters()).device
        generation = getattr(model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = eos
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (eos[0] if eos else 0)
        self._chat_stop: list[int] | None = None

    @classmethod
    def load(cls, source: str | Path, *, dtype: str = "float32", weights: str = "float", compile: str = "auto",
             base: str | None = None, trust_remote_code: bool = False) -> Engine:
        """Load any folder lmforge wrote (a run, a saved model, an adapter on its base: merged into
        it for speed) or a saved stock causal LM, on the GPU when there is one. ``dtype``: float32
        or bfloat16; ``weights``: float or int8 (weight-only, lmforge GPT and Mamba); ``compile``:
        auto (when a C++ compiler is there), yes or no. ``trust_remote_code``: allow a stock model
        that needs its own code."""
        for option, value, valid in (("dtype", dtype, tuple(DTYPES)), ("weights", weights, WEIGHTS),
                                     ("compile", compile, COMPILE)):
            if value not in valid:
                raise LmforgeError(f"{option}={value!r} is not one of {', '.join(valid)}")
        loaded = load_model(source, base=base, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        model = loaded.model
        if hasattr(model, "merge_and_unload"):  # a LoRA adapter: fold it into the base weights
            model = model.merge_and_unload()
        if model_family(model) == "bert" or "MaskedLM" in type(model).__name__:
            raise LmforgeError(f"{source} is a masked language model ({model.config.model_type}): it fills in "
                               "[MASK] tokens instead of continuing text; give a GPT or Mamba model")
        if loaded.auto_class != "AutoModelForCausalLM" or not hasattr(model, "generate"):
            raise LmforgeError(f"{source} holds a {type(model).__name__} (no language-model head): it cannot "
                               "generate text; give a pretrained or chat fine-tuned GPT or Mamba model")
        model = as_lmforge(model)
        if torch.cuda.is_available():  # decode where the model runs fastest; lmforge tests run on CPU
            model = model.to("cuda")
        if loaded.tokenizer is None:
            raise LmforgeError(f"{source}: no tokenizer beside the model (save one with the model)")
        use_compile = compile == "yes" or (compile == "auto" and compiler_available())
        decoder = make_decoder(model, weights=weights, compile=use_compile)
        name = Path(str(source)).resolve().name if Path(str(source)).exists() else str(source)
        return cls(model, loaded.tokenizer, name=name, decoder=decoder)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run one step for one prompt at the cache lengths requests use most (a short answer and
        the whole context), so a compiled decoder compiles now rather than in the first requests."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        for steps in dict.fromkeys((2, (self.context or 257) - 1)):
            logits = self.decoder.start(ids, torch.ones_like(ids), steps)
            self.decoder.step(logits.argmax(-1))

    # ------------------------------------------------------------------ prompts

    def encode(self, prompt: str | Sequence[int], *, special_tokens: bool = True) -> list[int]:
        """A prompt's token ids (a list of ids is taken as is)."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise InferenceError("the prompt is empty and the tokenizer has no beginning-of-text token to start from")
            ids = [bos]
        if self.context is not None and len(ids) >= self.context:
            raise InferenceError(f"the prompt has {len(ids)} tokens; this model's context is {self.context} "
                                 "tokens (prompt and answer together)")
        return ids

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation rendered with the tokenizer's chat template and the assistant's
        generation prompt, as token ids."""
        try:
            text = generation_prompt(self.tokenizer, messages, "messages")
        except LmforgeError as e:
            raise InferenceError(str(e)) from None
        return self.encode(text, special_tokens=False)

    @property
    def chat_stop_ids(self) -> list[int]:
        """End-of-text plus the chat template's end-of-turn token."""
        if self._chat_stop is None:
            self._chat_stop = list(dict.fromkeys([*self.eos_ids, *end_of_turn_ids(self.tokenizer)]))
        return self._chat_stop

    # ------------------------------------------------------------------ generation

    def complete(self, prompts: Sequence[str | Sequence[int]], sampling: Sampling, *,
                 stop_ids: Sequence[int] | None = None) -> list[Completion]:
        """Every prompt's whole answer (``stream`` collected)."""
        results = [Completion(i) for i in range(len(prompts))]
        for deltas in self.stream(prompts, sampling, stop_ids=stop_ids):
            for d in deltas:
                result = results[d.index]
                result.text += d.text
                if d.finish_reason is not None:
                    result.finish_reason = d.finish_reason
                    result.prompt_tokens, result.completion_tokens = d.prompt_tokens, d.completion_tokens
        return results

    @torch.inference_mode()
    def stream(self, prompts: Sequence[str | Sequence[int]], sampling: Sampling, *,
               stop_ids: Sequence[int] | None = None) -> Iterator[list[Delta]]:
        """Generate for every prompt together, yielding each step's new text (see the module
        docstring). ``stop_ids``: tokens that end an answer (default: the end-of-text token)."""
        if not prompts:
            return
        ids = [self.encode(p) for p in prompts]
        stop = set(self.eos_ids if stop_ids is None else stop_ids)
        longest = max(len(x) for x in ids)
        steps = sampling.max_new_tokens
        if self.context is not None:
            steps = min(steps, self.context - longest)
        input_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding: the last prompt token of every row is at -1
            input_ids[i, longest - len(x):] = torch.tensor(x)
            mask[i, longest - len(x):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        rows = [_Row(len(x)) for x in ids]
        sampler = Sampler(sampling, self.device)
        logits = self.decoder.start(input_ids, mask, steps)
        tokens = input_ids
        for n in range(steps):
            nxt = sampler(tokens, logits)  # (B,)
            if sampler.processors:  # the repetition penalty reads every token so far
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            deltas = []
            for i, (row, token) in enumerate(zip(rows, nxt.tolist(), strict=True)):
                if row.finish_reason is not None:
                    continue
                if token in stop:
                    row.finish_reason = "stop"
                else:
                    row.tokens.append(token)
                    if n == steps - 1:
                        row.finish_reason = "length"
                delta = self._new_text(row, sampling.stop)
                if row.finish_reason is not None:
                    deltas.append(Delta(i, delta, row.finish_reason, row.prompt_tokens, len(row.tokens)))
                elif delta:
                    deltas.append(Delta(i, delta))
            if deltas:
                yield deltas
            if all(row.finish_reason is not None for row in rows):
                return
            logits = self.decoder.step(nxt)

    def _new_text(self, row: _Row, stops: tuple[str, ...]) -> str:
        """The row's text not yet yielded; sets the finish reason at a stop string."""
        decode = self.tokenizer.decode
        window = decode(row.tokens[row.prefix:], skip_special_tokens=True)
        known = decode(row.tokens[row.prefix:row.read], skip_special_tokens=True)
        if len(window) > len(known) and (row.finish_reason is not None or not window.endswith("\ufffd")):
            row.text += window[len(known):]  # a character split across tokens waits for the rest
            row.prefix, row.read = row.read, len(row.tokens)
        text = row.text
        cut = len(text)
        for s in stops:
            at = text.find(s, max(0, row.sent - len(s) + 1))
            if at != -1 and at < cut:
                cut = at
        if cut < len(text):
            row.finish_reason = "stop"
        elif row.finish_reason is None:  # hold back a tail that may begin a stop string
            for s in stops:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        cut = min(cut, len(text) - k)
                        break
        new = text[row.sent:cut]
        row.sent = max(row.sent, cut)
        return new
