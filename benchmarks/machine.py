"""What a benchmark ran on, recorded by the benchmark itself: every results file carries this.

``machine_info()`` is called when a benchmark starts and ``finish(info)`` when it ends, so the
file says what load the machine had during the measurement (1-minute load average at both ends,
and the highest seen by ``sample_load``), the thread counts, and the library versions.
``write_results`` writes a benchmark's <name>.json and <name>.md side by side.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU's model name and whether it has bfloat16 matrix instructions (Linux only)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{fields.get('model name', '?')} ({'bf16: ' + ', '.join(bf16) if bf16 else 'no bf16 instructions'})"


def machine_info() -> dict:
    """Machine, threads, versions and the load average at the start of a benchmark."""
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "versions": {name: _version(name) for name in
                     ("torch", "transformers", "tokenizers", "accelerate", "datasets", "mambapy")},
        "load_average_start": list(os.getloadavg()),
        "load_average_max_1min": os.getloadavg()[0],
    }


def sample_load(info: dict) -> None:
    """Record the current 1-minute load average into ``info`` (keeps the highest seen)."""
    info["load_average_max_1min"] = max(info["load_average_max_1min"], os.getloadavg()[0])


def finish(info: dict) -> dict:
    """Add the load average at the end (and the highest seen); returns ``info``."""
    sample_load(info)
    info["load_average_end"] = list(os.getloadavg())
    return info


def write_results(folder: Path, name: str, results: dict, markdown: str) -> None:
    """``folder``/<name>.json (``results``) and <name>.md (``markdown``), and say so."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (folder / f"{name}.md").write_text(markdown + "\n")
    print(f"wrote {folder / f'{name}.json'} and {name}.md", flush=True)
