"""``lmforge chat MODEL``: talk to a chat model in the terminal."""

from __future__ import annotations

import sys

from lmforge.commands.generate import Compile, Dtype, Weights, _sampling, load_engine
from lmforge.errors import LmforgeError
from lmforge.inference import InferenceError

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit"


def chat(
    model: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_p: float = 1.0,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    seed: int | None = None,
    dtype: Dtype = "float32",
    weights: Weights = "float",
    compile: Compile = "auto",
    base_model: str | None = None,
    trust_remote_code: bool = False,
) -> int:
    """Chat with a model in the terminal, on its tokenizer's chat template (the chat SFT models
    ``lmforge finetune --config chat-sft`` makes), keeping the conversation's history.

    Type a message and press Enter; the answer streams as it is generated and ends at the
    template's end-of-turn token. /reset forgets the conversation, /system TEXT sets the system
    message, /exit (or Ctrl-D) quits. Example: ``lmforge chat runs/chat-sft``

    Args:
        model: the model folder (a chat fine-tuning run, a saved model or a LoRA adapter).
        system: the system message the conversation starts with.
        max_new_tokens: at most this many tokens per answer.
        temperature: sampling temperature (0: greedy).
        top_p: sample from the smallest set of tokens whose probability reaches this (1: off).
        top_k: sample from the k most likely tokens (0: off).
        repetition_penalty: divide the scores of tokens already present by this (1: off).
        greedy: always take the most likely token.
        seed: the sampling seed.
        dtype: float32 or bfloat16 weights and activations.
        weights: float, or int8 (weight-only quantised linear layers; lmforge GPT and Mamba).
        compile: compile the decode step with torch.compile (auto: yes where a C++ compiler is).
        base_model: an adapter's base model instead of the one its adapter_config.json records.
        trust_remote_code: allow a model that needs its own code (lmforge's load without it).
    """
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, greedy, seed, None)
    engine = load_engine(model, dtype=dtype, weights=weights, compile=compile, base_model=base_model,
                         trust_remote_code=trust_remote_code, long_lived=True)
    if engine.tokenizer.chat_template is None:
        raise LmforgeError(f"{model}: its tokenizer has no chat template, so it cannot chat; use "
                           f"'lmforge generate {model} --prompt TEXT' to continue text, or fine-tune it for chat "
                           "with 'lmforge finetune --config chat-sft' (task sft) on a tokenizer with a chat template")
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print(f"chatting with {engine.name}; {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text.removeprefix("/system").strip() or None
            history.clear()
            print(f"(system message {'set' if system else 'removed'}; conversation forgotten)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        prompt = _prompt(engine, system, history)
        if prompt is None:
            continue
        if interactive:
            sys.stdout.write("model> ")
        answer = ""
        try:
            for deltas in engine.stream([prompt], sampling, stop_ids=engine.chat_stop_ids):
                for d in deltas:
                    answer += d.text
                    sys.stdout.write(d.text)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep chatting
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": answer})


def _prompt(engine, system: str | None, history: list[dict[str, str]]) -> list[int] | None:
    """The conversation's prompt; the oldest exchanges are dropped while it does not fit the
    context (None, with the reason printed, when even the last message alone does not)."""
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            return engine.chat_prompt(messages)
        except InferenceError as e:
            if len(history) > 2 and "context" in str(e):
                del history[:2]  # the oldest question and its answer
                print("(the conversation outgrew the context: its oldest exchange is forgotten)", file=sys.stderr)
                continue
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            return None
