"""The special-token sets of the model families, and the chat template of the ``chat`` set.

- ``gpt``: ``<|endoftext|>`` is bos and eos (as in GPT-2), plus a dedicated pad token
  ``<|pad|>``. The pad token is deliberately NOT the eos token: collators that mask padding out
  of the labels would otherwise also mask every real end-of-text.
- ``bert``: ``[PAD] [UNK] [CLS] [SEP] [MASK]``, with ``[CLS] A [SEP] B [SEP]`` post-processing.
- ``chat``: the ``gpt`` tokens plus role markers ``<|system|> <|user|> <|assistant|>`` and the
  end-of-turn marker ``<|end|>``, and a chat template that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class SpecialTokens:
    """The named special tokens of a tokenizer (None = not used) plus extra ones."""

    bos: str | None = None
    eos: str | None = None
    unk: str | None = None
    pad: str | None = None
    cls: str | None = None
    sep: str | None = None
    mask: str | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)
    chat_template: str | None = None

    def named(self) -> dict[str, str]:
        """{'bos_token': ..., ...} for the tokens that are set (transformers' keyword names)."""
        roles = ("bos", "eos", "unk", "pad", "cls", "sep", "mask")
        return {f"{r}_token": getattr(self, r) for r in roles if getattr(self, r) is not None}

    def all(self) -> list[str]:
        """Every special token once, in a stable order (their ids are 0, 1, ... after training)."""
        ordered = [self.pad, self.unk, self.cls, self.sep, self.mask, self.bos, self.eos, *self.extra]
        return list(dict.fromkeys(t for t in ordered if t is not None))

    def with_unk(self, default: str) -> SpecialTokens:
        return self if self.unk is not None else replace(self, unk=default)

    def with_extra(self, tokens: list[str] | tuple[str, ...]) -> SpecialTokens:
        return replace(self, extra=tuple(dict.fromkeys([*self.extra, *tokens])))


_GPT = SpecialTokens(bos="<|endoftext|>", eos="<|endoftext|>", pad="<|pad|>")

SPECIAL_TOKEN_SETS: dict[str, SpecialTokens] = {
    "gpt": _GPT,
    "bert": SpecialTokens(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]"),
    "chat": replace(_GPT, extra=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                    chat_template=CHAT_TEMPLATE),
}

# the set each algorithm is usually paired with, used when none is named
DEFAULT_SPECIAL_TOKENS = {"bpe": "gpt", "wordpiece": "bert", "unigram": "gpt"}
