"""``lmforge ablate``: architecture and tokenizer choices compared on the same data and budget."""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.experiments.ablate import AblateConfig
from lmforge.experiments.ablate import ablate as run_sweep


def ablate(config: AblateConfig) -> int:
    """Compare architecture and tokenizer choices: train every variant of a sweep on the same data,
    seed and budget, and rank them by validation bits per byte.

    Reads a sweep (``--config textbook``; ``lmforge presets ablate`` lists them; or a YAML file): a
    base pretraining config, a budget (steps, tokens or seconds), seeds, and variants and/or a grid
    of dotted overrides. Each run is a normal pretraining run folder inside ``--output-dir``; the
    sweep writes results.json, results.md (the table), val_curves.png and val_bpb.png there.
    Ctrl-C stops after a checkpoint; continue with ``--resume``. Example:
    ``lmforge ablate --config textbook --output-dir runs/ablate/textbook``

    Args:
        config: the sweep (see the settings below).
    """
    try:
        rows = run_sweep(config)
    except KeyboardInterrupt:
        print(f"\nlmforge ablate: interrupted; continue with: lmforge ablate --resume {config.output_dir} "
              "(with the same --config and flags)", file=sys.stderr)
        return 130
    failed = [r["name"] for r in rows if r["status"] == "crashed"]
    print(f"\nresults: {Path(config.output_dir) / 'results.md'}"
          + (f"; crashed: {', '.join(failed)} (see their log.txt; --resume retries them)" if failed else ""))
    return 0
