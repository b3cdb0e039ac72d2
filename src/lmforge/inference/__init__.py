"""Using a model: the generation engine and decoders behind ``lmforge generate``, ``chat`` and
``serve`` (the OpenAI-compatible server is ``lmforge.inference.server``, which needs the ``serve``
extra)."""


from lmforge.inference.engine import Completion, Delta, Engine, InferenceError, make_decoder
from lmforge.inference.sampling import Sampler, Sampling

__all__ = ["Completion", "Delta", "Engine", "InferenceError", "Sampler", "Sampling", "make_decoder"]
