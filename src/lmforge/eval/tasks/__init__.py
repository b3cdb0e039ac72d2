"""lm-evaluation-harness task definitions that ship with lmforge, on its built-in offline data.

- ``lmforge_rotten_tomatoes`` (multiple choice, accuracy): "Review: <sentence>\\nSentiment:" followed
  by " negative" or " positive", on the test split of the built-in ``rotten-tomatoes`` sentences
  (few-shot examples from its train split);
- ``lmforge_shakespeare`` (``loglikelihood_rolling``: word and byte perplexity, bits per byte): the
  built-in ``shakespeare`` test split (4 plays) cut into passages of whole paragraphs of about
  ``PASSAGE_CHARS`` characters, each scored from its start.

Both carry the tag ``lmforge``. Their data come from lmforge's cache (``lmforge data fetch
rotten-tomatoes shakespeare``) through ``builtin_data``, never from the Hub. ``TASKS_DIR`` is the
folder to give the harness's own command line: ``lm_eval ... --include_path TASKS_DIR``.
"""

from pathlib import Path

from lmforge.eval.tasks.builtin_data import PASSAGE_CHARS

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["PASSAGE_CHARS", "TASKS_DIR"]
