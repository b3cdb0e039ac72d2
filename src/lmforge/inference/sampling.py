"""How the next token is picked: greedy or sampled with temperature, top-k, top-p and a
repetition penalty, through transformers' own logits processors (the same classes and order as
``generate``), with a per-request seed so an answer does not depend on what else is running.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class Sampling:
    """Settings of one generation request.

    ``greedy`` (or ``temperature`` 0) takes the most likely token; otherwise tokens are sampled
    from the distribution after the repetition penalty, temperature, top-k (0: off) and top-p
    (1: off). ``seed`` makes sampling repeatable. Generation ends at the model's end-of-text (or
    end-of-turn) token, at a ``stop`` string (not included in the text) or after
    ``max_new_tokens``.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, "0 (greedy) or more"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, "0 (off) or more"),
            ("repetition_penalty", self.repetition_penalty > 0, "more than 0 (1: off)"),
        )
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be {valid}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)

    @property
    def sampled(self) -> bool:
        return not self.greedy and self.temperature > 0


class Sampler:
    """Picks each row's next token from the logits (B, V) given the tokens so far (B, L)."""

    def __init__(self, sampling: Sampling, device: torch.device | str = "cpu"):
        self.sampled = sampling.sampled
        self.processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if self.sampled:
            if sampling.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                self.processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(sampling.top_p))
        self.generator = None
        if self.sampled:
            self.generator = torch.Generator(device=device)
            if sampling.seed is not None:
                self.generator.manual_seed(sampling.seed)
            else:
                self.generator.seed()

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) (prompts and what was generated), logits (B, V) -> next tokens (B,)."""
        scores = self.processors(tokens, logits) if self.processors else logits
        if not self.sampled:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores.float(), dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
