"""lmforge: train tokenizers and BERT, GPT and Mamba language models from scratch."""

from lmforge.errors import LmforgeError

__version__ = "0.1.0"

__all__ = ["LmforgeError", "__version__"]
