"""Saved models into other forms: stock transformers classes (``convert_folder``) and LoRA
adapters folded into their base (``merge_to_folder``)."""

from lmforge.export.convert import convert_folder
from lmforge.export.merge import merge_to_folder

__all__ = ["convert_folder", "merge_to_folder"]
