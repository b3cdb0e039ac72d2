"""Decoders: a model's next-token logits, one step at a time, for the generation loop in
``lmforge.inference.engine``.

A decoder holds one batch's state (the KV cache, or Mamba's conv/SSM state). ``start`` runs the
prompt (left-padded, with its attention mask) and returns the logits after it; ``step`` feeds one
token per row and returns the next logits. Every decoder gives the logits ``model.generate`` sees,
so greedy decoding is token-for-token the same (tests/test_inference.py checks it, padded batches
and odd prompt lengths included).

- ``StaticGPTDecoder`` (lmforge GPT): the model's own blocks over a pre-allocated KV cache
  (transformers' ``StaticCache``), a one-token step that skips the generic forward's mask building
  and output plumbing, optionally compiled with ``torch.compile`` (static shapes: the cache length
  is rounded up to a power of two, so a few lengths share one compiled step). Compiled, linear
  layers of a small batch run as fused multiply-reduce loops: at batch 1 decoding reads every
  weight once per token, and the fused loop reads them 2-3x faster than the BLAS matrix-vector
  product (benchmarks/results/bench_generate.md).
- ``MambaDecoder`` (lmforge Mamba): the O(1) state step.
- ``CacheDecoder``: any other causal LM (stock checkpoints): the model's forward with a
  ``DynamicCache``.

Notation: B batch, T prompt length, V vocabulary, S the static cache's length.
"""

from __future__ import annotations

import copy
import inspect
import logging
import shutil
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, StaticCache

from lmforge.models.mamba_scan import selective_state_step
from lmforge.models.modeling_mamba import at_least_fp32

logger = logging.getLogger(__name__)

# rows up to which a compiled step runs linear layers as multiply-reduce loops. Measured on a 2-core
# EPYC (benchmarks/results/bench_generate.md): 2.7x transformers' decoding at batch 1 for weights
# that stream from memory, 2.3x at batch 8 for weights that fit in the caches; but at batch 8 with
# weights that stream from memory each row re-reads them: 0.85x, against 0.96x for eager BLAS
REDUCE_ROWS = 8
WEIGHTS = ("float", "int8")
# graphs a compiled step may hold: one per batch size and cache length (GPT) or batch size (Mamba).
# torch's default of 8 per function (shared by every decoder in the process) would send a server
# that sees a ninth shape back to eager decoding for good
COMPILED_SHAPES = 64


class Decoder(Protocol):
    """Next-token logits for one batch at a time (see the module docstring)."""

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run the prompts: input_ids, attention_mask (B, T), left-padded -> logits (B, V) after them.
        ``max_new_tokens``: how many steps will follow at most (sizes a static cache)."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: tokens (B,) -> logits (B, V)."""
        ...


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (B, T), as ``generate`` computes them: real tokens count
    from 0, padding gets 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def compile_step(step):
    """``step`` compiled by ``torch.compile`` for static shapes, with room for ``COMPILED_SHAPES`` graphs."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILED_SHAPES)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * COMPILED_SHAPES)
    return torch.compile(step, fullgraph=True, dynamic=False)


class CompiledStep:
    """A decoder's one-token step, compiled (``compile_step``) when ``compile``; if compiling fails
    it warns once and runs the step eagerly from then on. ``compiled`` is None when it runs eagerly."""

    def __init__(self, step: Callable[..., torch.Tensor], compile: bool):
        self.eager = step
        self.compiled = compile_step(step) if compile else None

    def __call__(self, *args: Any, undo: Callable[[], None] | None = None) -> torch.Tensor:
        """The step on ``args``; ``undo`` puts back state that a failed compiled call may have
        advanced, before the eager step runs instead."""
        if self.compiled is None:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - inductor's errors are many; decoding goes on eagerly
            logger.warning("torch.compile failed (%s); decoding without it", str(e).splitlines()[0])
            self.compiled = None
            if undo is not None:
                undo()
            return self.eager(*args)


def compiler_available() -> bool:
    """Whether ``torch.compile`` can build CPU kernels here (inductor needs a C++ compiler)."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


# --------------------------------------------------------------------------- weights


class DecodeLinear(nn.Module):
    """A linear layer for decoding: float weights (the model's own tensor, not a copy) or int8
    weight-only (per-output-channel absmax scales; activations stay in the model's dtype).

    Inside a compiled step with at most ``REDUCE_ROWS`` rows it computes ``(x * W).sum(-1)``, which
    inductor fuses into one loop per row that reads the weights 2-3x faster than BLAS's
    matrix-vector product; elsewhere ``F.linear``.
    """

    def __init__(self, linear: nn.Linear, weights: str = "float"):
        super().__init__()
        weight = linear.weight.detach()
        self.bias = linear.bias
        self.scale: torch.Tensor | None = None
        if weights == "int8":
            scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
            self.weight = (weight.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.scale = scale.to(weight.dtype)
        else:
            self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        if torch.compiler.is_compiling() and x.shape[:-1].numel() <= REDUCE_ROWS:
            y = (x.unsqueeze(-2) * weight).sum(-1)
        else:
            y = F.linear(x, weight)
        if self.scale is not None:
            y = y * self.scale
        return y if self.bias is None else y + self.bias


def decode_copy(model: nn.Module, weights: str = "float") -> nn.Module:
    """A copy of ``model``'s module tree that shares its parameters and buffers (no weight is
    copied), with every ``nn.Linear`` replaced by a ``DecodeLinear``; ``model`` is untouched."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {WEIGHTS}")
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo=shared)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, DecodeLinear(child, weights))
    return twin.eval()


# --------------------------------------------------------------------------- GPT


def _bucket(length: int, limit: int) -> int:
    """The static cache's length for ``length`` positions: the next power of two (at least 64),
    at most ``limit`` (and never below ``length``)."""
    size = 64
    while size < length:
        size *= 2
    return max(length, min(size, limit))


class StaticGPTDecoder:
    """lmforge GPT decoding over a static KV cache (see the module docstring).

    ``weights``: "float" (the model's weights, in its dtype) or "int8" (weight-only).
    ``compile``: compile the one-token step with ``torch.compile`` (a warm-up compiles it per batch
    size and cache length bucket; a failure to compile falls back to eager with a warning).
    """

    def __init__(self, model: nn.Module, *, weights: str = "float", compile: bool = False):
        config = model.config
        if config.position_embedding_type == "alibi":
            raise ValueError("StaticGPTDecoder: ALiBi's bias depends on the step; use CacheDecoder")
        self.model = decode_copy(model, weights)
        self.config = config
        self.context = config.max_position_embeddings
        self.compile = compile
        self._run = CompiledStep(self._step, compile)
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self._cache: StaticCache | None = None
        self._valid: torch.Tensor | None = None  # (B, 1, 1, S) bool: keys a step may attend to
        self._positions: torch.Tensor | None = None  # (B, 1) position of the next token
        self._index = 0  # cache slot of the next token

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        b, t = input_ids.shape
        size = _bucket(t + max_new_tokens, max(self.context, t + max_new_tokens))
        cache = self._caches.get((b, size))
        if cache is None:
            cache = self._caches[(b, size)] = StaticCache(config=self.config, max_cache_len=size)
        else:
            cache.reset()
        self._cache = cache
        positions = prompt_positions(attention_mask)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         cache=cache, use_cache=True, logits_to_keep=1)
        self._valid = torch.zeros(b, 1, 1, size, dtype=torch.bool, device=input_ids.device)
        self._valid[:, 0, 0, :t] = attention_mask.bool()
        self._positions = positions[:, -1:] + 1
        self._index = t
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._index >= self._valid.shape[-1]:
            raise RuntimeError(f"the static cache holds {self._valid.shape[-1]} positions; start() with a "
                               "larger max_new_tokens")
        self._valid[..., self._index] = True
        logits = self._run(tokens[:, None], self._positions, self._valid, self._cache, undo=self._rewind)
        self._positions = self._positions + 1
        self._index += 1
        return logits.float()

    def _rewind(self) -> None:
        """Set the cache's count of positions back to this step's slot (a failed call may have advanced it)."""
        for layer in self._cache.layers:
            layer.cumulative_length.fill_(self._index)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              cache: StaticCache) -> torch.Tensor:
        """tokens, positions (B, 1), valid (B, 1, 1, S) -> logits (B, V); LmforgeGPTModel.forward
        without the mask building (``valid`` is the mask) and output plumbing."""
        inner = self.model.model
        hidden = inner.embed_tokens(tokens)  # (B, 1, D)
        if inner.embed_positions is not None:
            hidden = hidden + inner.embed_positions(positions).to(hidden.dtype)
        rotary = inner.rotary_emb(hidden, positions) if inner.rotary_emb is not None else None
        for layer in inner.layers:
            hidden = layer(hidden, attention_mask=valid, position_embeddings=rotary, cache=cache)
        if inner.norm is not None:
            hidden = inner.norm(hidden)
        return self.model.lm_head(hidden)[:, -1]


# --------------------------------------------------------------------------- Mamba


class MambaDecoder:
    """lmforge Mamba decoding with the O(1) state step (see the module docstring).

    ``start`` runs the prompt through the backbone's own forward, with a ``DynamicCache`` and the
    attention mask as ``generate``'s first step passes them (padded positions are zeroed before the
    convolution), and takes each layer's conv state (B, Di, K) and SSM state (B, Di, N) out of the
    cache into two tensors of its own, (layers, B, Di, K) and (layers, B, Di, N). ``step`` is the
    mixer's cached one-token path for every block, without the cache object, the mask or the
    output plumbing; it updates those tensors in place.

    ``weights``: "float" (the model's weights, in its dtype) or "int8" (weight-only; ``dt_proj``
    stays float: the mixer reads its weight directly, and it is small, R x Di).
    ``compile``: compile the one-token step with ``torch.compile`` (once per batch size; a failure
    to compile falls back to eager with a warning).

    Notation (besides the module's): H hidden size, Di inner width, K conv kernel, N state size,
    R dt rank.
    """

    def __init__(self, model: nn.Module, *, weights: str = "float", compile: bool = False):
        self.model = decode_copy(model, weights)
        for ours, theirs in zip(self.model.backbone.layers, model.backbone.layers, strict=True):
            ours.mixer.dt_proj = theirs.mixer.dt_proj  # the mixer reads dt_proj.weight itself
        # what the model's forward feeds lm_head (it casts to lm_head.weight's dtype: int8 here)
        self.dtype = model.lm_head.weight.dtype
        self.compile = compile
        self._run = CompiledStep(self._step, compile)  # the states are written only by a call that runs
        self._conv_states: torch.Tensor | None = None  # (layers, B, Di, K)
        self._ssm_states: torch.Tensor | None = None  # (layers, B, Di, N), float32 (float64 models)

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """See ``Decoder.start``; ``max_new_tokens`` is not needed (the states do not grow)."""
        layers = range(len(self.model.backbone.layers))
        cache = DynamicCache(config=self.model.config)
        out = self.model.backbone(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        self._conv_states = torch.stack([cache.get_conv_state(i) for i in layers])
        self._ssm_states = torch.stack([cache.get_recurrent_state(i) for i in layers])
        return self.model.lm_head(out.last_hidden_state[:, -1].to(self.dtype)).float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(tokens, self._conv_states, self._ssm_states).float()

    def _step(self, tokens: torch.Tensor, conv_states: torch.Tensor, ssm_states: torch.Tensor) -> torch.Tensor:
        """tokens (B,), conv_states (layers, B, Di, K), ssm_states (layers, B, Di, N) -> logits
        (B, V); the states are updated in place. LmforgeMambaForCausalLM's forward of one token
        with a cache (LmforgeMambaBlock.forward, then the final norm and lm_head)."""
        backbone = self.model.backbone
        hidden = backbone.embeddings(tokens)  # (B, H)
        for i, block in enumerate(backbone.layers):
            residual = hidden.to(at_least_fp32(hidden.dtype)) if block.residual_in_fp32 else hidden
            mixed = _mamba_mix(block.mixer, block.norm(hidden.to(block.norm.weight.dtype)), conv_states[i],
                               ssm_states[i])
            hidden = residual + mixed
        hidden = backbone.norm_f(hidden)
        return self.model.lm_head(hidden.to(self.dtype))


def _mamba_mix(mixer: nn.Module, hidden: torch.Tensor, conv_state: torch.Tensor,
               ssm_state: torch.Tensor) -> torch.Tensor:
    """LmforgeMambaMixer.forward of one token with a cache: hidden (B, H) -> (B, H); conv_state
    (B, Di, K) (the last K inputs of the conv) and ssm_state (B, Di, N) are updated in place."""
    dtype = hidden.dtype
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)  # (B, Di) each
    conv_state.copy_(torch.cat([conv_state[..., 1:], x[..., None]], dim=-1))  # shift in the new input
    x = (conv_state * mixer.conv1d.weight[:, 0]).sum(-1)  # the conv's last column, (B, Di)
    if mixer.conv1d.bias is not None:
        x = x + mixer.conv1d.bias
    x = F.silu(x)
    f = at_least_fp32(dtype)  # the SSM runs in float32 (float64 for float64 models)
    dt, b, c = mixer._ssm_inputs(x, f)  # (B, Di), (B, N), (B, N)
    y, h = selective_state_step(ssm_state, x.to(f), dt, -torch.exp(mixer.A_log.to(f)), b, c)
    ssm_state.copy_(h)
    y = (y + x.to(f) * mixer.D.to(f)) * F.silu(z.to(f))  # (B, Di)
    return mixer.out_proj(y.to(dtype))


# --------------------------------------------------------------------------- any causal LM


class CacheDecoder:
    """Any causal LM through its own forward with a ``DynamicCache`` (stock checkpoints, ALiBi)."""

    def __init__(self, model: nn.Module):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._takes_positions = "position_ids" in parameters
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        self._cache = DynamicCache(config=self.model.config)
        self._mask = attention_mask
        positions = prompt_positions(attention_mask)
        self._positions = positions[:, -1:] + 1
        return self._forward(input_ids, positions)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        logits = self._forward(tokens[:, None], self._positions)
        self._positions = self._positions + 1
        return logits

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {self._cache_arg: self._cache, "use_cache": True}
        if self._takes_positions:
            kwargs["position_ids"] = positions
        out = self.model(input_ids=input_ids, attention_mask=self._mask, **kwargs)
        return out.logits[:, -1].float()
