"""The process's peak memory, reported by clients (per reply) and the server (per stage)."""

from __future__ import annotations

import resource
import sys


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
