"""``lmforge generate MODEL --prompt TEXT``: continue prompts with a causal LM, streaming the text."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from transformers.utils import logging as transformers_logging

from lmforge.errors import LmforgeError
from lmforge.inference import Engine, Sampling
from lmforge.inference.decoding import compiler_available

Dtype = Literal["float32", "bfloat16"]
Weights = Literal["float", "int8"]
Compile = Literal["auto", "yes", "no"]


def load_engine(model: str, *, dtype: str, weights: str, compile: str, base_model: str | None,
                trust_remote_code: bool, long_lived: bool) -> Engine:
    """The engine for a verb; ``compile`` auto compiles the decode step for long-lived verbs (chat,
    serve: a few seconds once, then decoding is several times faster) and for int8 weights, not
    for one-shot generate in float."""
    if compile == "auto":  # int8 weights pay only compiled: unpacked to float at every call otherwise
        compile = "yes" if (long_lived or weights != "float") and compiler_available() else "no"
    transformers_logging.disable_progress_bar()  # the weights load in a moment; keep the terminal for the text
    if compile == "yes":
        print("the decode step is compiled on first use (a few seconds; --compile no skips it)", file=sys.stderr)
    return Engine.load(model, dtype=dtype, weights=weights, compile=compile, base=base_model,
                       trust_remote_code=trust_remote_code)


def read_prompts(prompt: list[str] | None, prompt_file: Path | None) -> list[str]:
    """--prompt texts, then each non-empty line of --prompt-file (at least one prompt)."""
    prompts = list(prompt or [])
    if prompt_file is not None:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except OSError as e:
            raise LmforgeError(f"--prompt-file {prompt_file}: {e.strerror}") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise LmforgeError(f"--prompt-file {prompt_file} holds no prompt (one prompt per non-empty line)")
        prompts += lines
    if not prompts:
        raise LmforgeError("give a prompt: --prompt TEXT (several for a batch) or --prompt-file FILE")
    return prompts


def generate(
    model: str,
    *,
    prompt: list[str] | None = None,
    prompt_file: Path | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_p: float = 1.0,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    seed: int | None = None,
    stop: list[str] | None = None,
    echo: bool = True,
    dtype: Dtype = "float32",
    weights: Weights = "float",
    compile: Compile = "auto",
    base_model: str | None = None,
    trust_remote_code: bool = False,
) -> int:
    """Continue one or more prompts with a causal LM (GPT or Mamba), streaming the text as it comes.

    Several prompts are decoded together as one batch and printed in order. Generation stops at
    the tokenizer's end-of-text token, a --stop string or --max-new-tokens. MODEL is any folder
    lmforge wrote (a run, its final/, a quickstart folder), a saved model (lmforge or a stock
    causal LM) or a LoRA adapter (loaded on its base). Example:
    ``lmforge generate runs/quickstart --prompt "ROMEO:" --max-new-tokens 100``

    Args:
        model: the model folder.
        prompt: prompt texts (several: one batch).
        prompt_file: a text file with one prompt per non-empty line.
        max_new_tokens: at most this many tokens per prompt (fewer where the context ends).
        temperature: sampling temperature (0: greedy).
        top_p: sample from the smallest set of tokens whose probability reaches this (1: off).
        top_k: sample from the k most likely tokens (0: off).
        repetition_penalty: divide the scores of tokens already present by this (1: off).
        greedy: always take the most likely token (ignores temperature, top-k and top-p).
        seed: the sampling seed (the same seed gives the same text).
        stop: strings that end the text (not printed).
        echo: print each prompt before its continuation.
        dtype: float32 or bfloat16 weights and activations.
        weights: float, or int8 (weight-only quantised linear layers; lmforge GPT and Mamba).
        compile: compile the decode step with torch.compile (auto: only with int8 weights, as
            generate runs once and compiling takes seconds).
        base_model: an adapter's base model instead of the one its adapter_config.json records.
        trust_remote_code: allow a model that needs its own code (lmforge's load without it).
    """
    prompts = read_prompts(prompt, prompt_file)
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, greedy, seed, stop)
    engine = load_engine(model, dtype=dtype, weights=weights, compile=compile, base_model=base_model,
                         trust_remote_code=trust_remote_code, long_lived=False)
    write = sys.stdout.write
    pending = [""] * len(prompts)  # text of prompts after the one being printed
    done = [False] * len(prompts)
    current = 0

    def start(i: int) -> None:
        if len(prompts) > 1:
            write(f"--- {i + 1} ---\n")
        if echo:
            write(prompts[i])
        write(pending[i])

    start(0)
    began, tokens = time.perf_counter(), 0
    for deltas in engine.stream(prompts, sampling):
        for d in deltas:
            tokens += d.completion_tokens
            if d.index == current:
                write(d.text)
            else:
                pending[d.index] += d.text
            done[d.index] = done[d.index] or d.finish_reason is not None
        while current < len(prompts) and done[current]:
            current += 1
            if current < len(prompts):
                write("\n")
                start(current)
        sys.stdout.flush()
    write("\n")
    seconds = time.perf_counter() - began
    print(f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s, reading the prompts included)",
          file=sys.stderr)
    return 0


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
              greedy: bool, seed: int | None, stop: list[str] | None) -> Sampling:
    try:
        return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        repetition_penalty=repetition_penalty, greedy=greedy, seed=seed, stop=tuple(stop or ()))
    except ValueError as e:
        name, _, rest = str(e).partition("=")
        raise LmforgeError(f"--{name.replace('_', '-')} {rest}") from None
