"""Experiments: ablation sweeps (``lmforge ablate``) and their results tables and plots.

    rows = ablate(load_config(AblateConfig, "sweep.yaml"))
"""

from lmforge.experiments.ablate import AblateConfig, ablate

__all__ = ["AblateConfig", "ablate"]
