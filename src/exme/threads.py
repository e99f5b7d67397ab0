"""How many CPU threads torch uses: ``--threads N`` on every heavy command, ``threads:`` in PIPELINE.yaml.

Why not torch's default (one thread per core): torch's OpenMP threads spin-wait for each other at
every operation, so when another process holds some of the cores every operation waits for the
slowest thread. On a shared 2-core machine, ``exme eval`` of a demo-sized model took 114–148 s with
torch's default (2 threads) and 24–30 s with one (benchmarks/RESULTS.md, "Threads").
The default here counts the CPUs this process may use (affinity and cgroup quota) and leaves out
the ones other processes keep busy (the 1-minute load average), so a busy machine gets fewer
threads and an idle one keeps all of them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from exme.errors import ExmeError

__all__ = ["apply_threads", "available_cpus", "current_threads", "default_threads", "describe_threads", "resolve_threads"]


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if any."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads(cpus: int | None = None, load: float | None = None) -> int:
    """Threads for this process when none are asked for: the CPUs not busy with other work.

    ``cpus - round(load)``, at least 1. Measured at start-up, before this process does any work, so
    the load is other processes'. On an idle machine this is every CPU (torch's own choice); with
    one other busy process on 2 CPUs it is 1.
    """
    cpus = available_cpus() if cpus is None else cpus
    load = _load() if load is None else load
    return max(1, min(cpus, cpus - int(round(load))))


def resolve_threads(value: int | str | None, *, source: str = "--threads") -> int:
    """The thread count for ``value``: ``None`` or ``"auto"`` → :func:`default_threads`; else an int ≥ 1."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return default_threads()
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ExmeError(f"{source} must be a whole number of threads or 'auto', got {value!r}") from None
    if isinstance(value, float) and value != n:
        raise ExmeError(f"{source} must be a whole number of threads or 'auto', got {value!r}")
    if n < 1:
        raise ExmeError(f"{source} must be at least 1, got {n}")
    return n


def apply_threads(value: int | str | None, *, source: str = "--threads") -> int:
    """Resolve ``value`` and set torch's intra-op thread count to it; returns the count set."""
    import torch

    n = resolve_threads(value, source=source)
    torch.set_num_threads(n)
    return n


def current_threads() -> int:
    """torch's intra-op thread count now (what ``results.json`` records)."""
    import torch

    return torch.get_num_threads()


def describe_threads(n: int, value: int | str | None = None) -> str:
    """The run header's line, e.g. ``threads: 1 (auto: 2 CPUs, load 1.3)`` or ``threads: 4``."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return f"threads: {n} (auto: {available_cpus()} CPUs, load {_load():.1f}; set --threads to choose)"
    return f"threads: {n}"
