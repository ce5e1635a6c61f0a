"""Memory: what is available, what a run would need, and how to split the work to fit.

The second-order statistics dominate: gradient rows (N × numel) while they are collected, block
inverses (numel × block size) after; estimators that only sum squares stream the rows and hold
none. Tensors are processed in groups that fit the budget; when the inverses of all tensors
cannot be kept until the masks are known (global selection needs every score first), each
group's gradients are collected again for the weight update.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Sequence

from .estimators.base import MemoryNeed

GIB = 2**30


def human(size: float) -> str:
    """Bytes for people: 512 B, 3.1 KiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def available_bytes() -> int:
    """Memory available to this process now (MemAvailable on Linux, else physical memory)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GIB


def resident_bytes() -> int:
    """Resident memory of this process now."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_bytes()


def peak_bytes() -> int:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class MemoryPlan:
    """Which tensors are processed together, and where their statistics wait for the weight
    update: "memory", "disk" (spilled next to the output, memory-mapped back), "recompute"
    (gradients collected again), or "none" (the estimator does not need them)."""

    groups: tuple[tuple[int, ...], ...]
    storage: str
    estimate: int  # bytes of memory the statistics need at most
    budget: int
    disk: int = 0  # bytes spilled to disk

    @property
    def keep_statistics(self) -> bool:
        return self.storage != "recompute"

    @property
    def passes(self) -> int:
        """Gradient collections per step."""
        return len(self.groups) * (2 if self.storage == "recompute" else 1)


class DoesNotFit(Exception):
    """One tensor alone needs more than the budget."""

    def __init__(self, index: int, need: int):
        super().__init__(f"tensor {index} needs {need} bytes")
        self.index, self.need = index, need


# Spill only with this much room to spare on the disk.
DISK_MARGIN = 1.2


def plan_memory(needs: Sequence[MemoryNeed], budget: int, compensates: bool, disk_free: int = 0) -> MemoryPlan:
    """Greedy groups of consecutive tensors whose statistics fit `budget` together; the kept
    statistics stay in memory if they fit beside the largest group, else go to disk if it has
    room, else are recomputed."""
    if not needs:
        return MemoryPlan((), "none", 0, budget)
    worst = max(range(len(needs)), key=lambda i: needs[i].peak)
    if needs[worst].peak > budget:
        raise DoesNotFit(worst, needs[worst].peak)
    kept_total = sum(n.kept for n in needs)
    if not compensates:
        storage = "none"
    elif kept_total + needs[worst].peak <= budget:
        storage = "memory"
    elif disk_free >= DISK_MARGIN * kept_total:
        storage = "disk"
    else:
        storage = "recompute"
    room = budget - (kept_total if storage == "memory" else 0)
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    load = 0
    for i, need in enumerate(needs):
        if current and load + need.peak > room:
            groups.append(tuple(current))
            current, load = [], 0
        current.append(i)
        load += need.peak
    groups.append(tuple(current))
    largest = max(sum(needs[i].peak for i in g) for g in groups)
    resident = kept_total if storage == "memory" else 0
    return MemoryPlan(tuple(groups), storage, largest + resident, budget, kept_total if storage == "disk" else 0)
