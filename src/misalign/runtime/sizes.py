"""Memory estimates before allocating: a run that cannot fit is refused at once, with one line
naming the setting that drives it, instead of a traceback or a machine that swaps."""

from __future__ import annotations

import os
from collections.abc import Mapping

from misalign.runtime.errors import ConfigError

GiB = 2**30
USABLE = 0.8
"""The share of the available memory a run may plan to use."""


def available_memory() -> int:
    """Bytes this process may still allocate: ``MemAvailable`` of ``/proc/meminfo`` where there
    is one (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cores() -> int:
    """The CPU cores this process may run on (its affinity where the system says, Linux; else
    every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def require(parts: Mapping[str, float], what: str, available: int | None = None) -> None:
    """Refuse a run whose estimated memory does not fit.

    Args:
        parts: estimated bytes, keyed by the setting that drives each part (``rounds``,
            ``d``, ``agents.A.n``, ``seeds``); parts under one key add up.
        what: what needs the memory, for the message (``the play``).
        available: bytes available (default ``available_memory()``).

    Raises:
        ConfigError: ``<largest part's key>: <what> needs X GiB of memory (...), Y GiB
            available``.
    """
    available = available_memory() if available is None else available
    total = sum(parts.values())
    if total <= USABLE * available:
        return
    largest = max(parts, key=parts.get)
    alone = f" ({largest} alone {parts[largest] / GiB:.3g} GiB)" if len(parts) > 1 else ""
    raise ConfigError(
        f"{largest}: {what} needs {total / GiB:.3g} GiB of memory{alone}, "
        f"{available / GiB:.3g} GiB available"
    )
