"""How many torch threads to train with: all cores on a quiet machine, the free ones on a busy one.

Oversubscribed cores make torch several times slower, so a run started beside other work should
use the cores that work leaves free.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def busy_cores(seconds: float = 0.5, stat: Path = Path("/proc/stat")) -> float | None:
    """How many cores other work keeps busy right now: the machine's non-idle share over a short
    sample of ``stat`` times its cores (this process sleeps meanwhile). None where there is no
    ``/proc/stat``."""
    def times() -> tuple[int, int]:
        values = [int(v) for v in stat.read_text().splitlines()[0].split()[1:9]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    try:
        total0, idle0 = times()
        time.sleep(seconds)
        total1, idle1 = times()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads(busy: float | None = None) -> int | None:
    """torch's default (None) on a quiet machine; else the cores other work leaves free (at least
    1): oversubscribed cores make torch several times slower.

    ``busy`` (cores in use by other work) is sampled now (``busy_cores``); the load average is the
    fallback where that is not possible. A sample, not the load average, because the load average
    remembers the last minute: a quickstart started right after ``make setup``'s installs would
    train a 2-core machine's model on 1 thread, at about 60% of the speed.
    """
    cores = os.cpu_count() or 1
    if busy is None:
        busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            return None
    if busy <= 0.5:
        return None
    return max(1, round(cores - busy))
