"""How much of this machine's memory the features may take: what decides in memory or streamed by
shard (cache/reader.py), and which shard is too large to read whole (cache/store.py)."""

from __future__ import annotations

import os

DEFAULT_MEMORY_FRACTION = 0.25  # of physical memory, for the features of all splits together


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_memory_budget() -> int:
    return int(physical_memory_bytes() * DEFAULT_MEMORY_FRACTION)
