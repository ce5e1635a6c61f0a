"""Memory: what is available, what a run would need, and how to split the work to fit.

The second-order statistics dominate: block Gram matrices, then inverses, of numel × block size
(WoodFisher, which streams the gradient rows), or gradient rows (N × numel) while they are
collected (FishLeg); estimators that only sum squares stream the rows and hold none. Tensors
are processed in groups that fit the budget; when the inverses of all tensors cannot be kept
until the masks are known (global selection needs every score first), they are spilled to disk
or each group's gradients are collected again for the weight update.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from .estimators.base import MemoryNeed

if TYPE_CHECKING:
    import torch

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


# Weights from this size on make a run large enough to hand every allocation of a few MiB and
# more straight back to the system when it is freed (see return_large_allocations).
LARGE_MODEL_BYTES = 1 << 30
M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc


def weight_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes the model's tensors take (what LARGE_MODEL_BYTES and the dry run's model term
    are compared with)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once (None where there is none)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_large_allocations() -> None:
    """Serve allocations of 4 MiB and more from their own mappings, returned to the system when
    freed (glibc; nothing elsewhere). By default glibc raises that threshold to 32 MiB as large
    blocks are freed, and a large model's per-tensor masks and temporaries (16 MiB for a
    4096 x 4096 weight) then fragment the heap: on a 268M-weight model the pruning's peak was
    3.2 GiB with the default and 2.6 GiB with this."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)


def release_freed_memory() -> None:
    """Hand memory freed inside the C heap back to the system (glibc's malloc_trim; nothing
    elsewhere). Tensors of a few MiB come from the heap, which keeps what they used after they
    are freed: on a 268M-weight model 1.2 GiB was still counted after pruning without this."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@dataclass(frozen=True)
class MemoryParts:
    """Where a plan's estimate goes: statistics kept until the update, what the largest group
    needs beyond them while it is built, and the largest finalising scratch."""

    kept: int
    building: int
    scratch: int


def plan_parts(needs: Sequence[MemoryNeed], plan: MemoryPlan) -> MemoryParts:
    """The parts of `plan.estimate` for the people reading a dry run (they add up to it when
    the statistics stay in memory, and bound it otherwise)."""
    if not needs or not plan.groups:
        return MemoryParts(0, 0, 0)
    kept = sum(n.kept for n in needs) if plan.storage == "memory" else max(n.kept for n in needs)
    building = max(sum(needs[i].peak - needs[i].kept for i in g) for g in plan.groups)
    scratch = max(n.scratch for n in needs)
    return MemoryParts(kept, building, scratch)


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


def plan_memory(
    needs: Sequence[MemoryNeed],
    budget: int,
    compensates: bool,
    disk_free: int = 0,
    owners: Sequence[int] | None = None,
) -> MemoryPlan:
    """Greedy groups of consecutive tensors whose statistics are built together within `budget`
    (a tensor's `peak` includes what it keeps). The kept statistics of earlier groups stay in
    memory while later groups are built if everything fits that way; else they go to disk if it
    has room, else they are recomputed for the update. `owners`: under torchrun's tensor split,
    the rank that builds each tensor's statistics (the other ranks need nothing for it); the
    groups are then the same on every rank, each within the budget on every rank, and the
    estimate is the most any rank needs."""
    if not needs:
        return MemoryPlan((), "none", 0, budget)
    worst = max(range(len(needs)), key=lambda i: needs[i].alone)
    if needs[worst].alone > budget:
        raise DoesNotFit(worst, needs[worst].alone)
    kept_total = sum(n.kept for n in needs)  # spilled by all ranks, to what may be one disk
    per_rank = _by_rank(needs, owners)
    try:
        groups, estimate = _grouped(per_rank, budget, resident=compensates)
        storage = "memory" if compensates else "none"
    except DoesNotFit:
        storage = "disk" if disk_free >= DISK_MARGIN * kept_total else "recompute"
        groups, estimate = _grouped(per_rank, budget, resident=False)  # every tensor fits alone
    return MemoryPlan(groups, storage, estimate, budget, kept_total if storage == "disk" else 0)


def _by_rank(needs: Sequence[MemoryNeed], owners: Sequence[int] | None) -> list[list[MemoryNeed]]:
    """Each rank's needs, tensor by tensor (nothing for a tensor another rank builds); one list
    without a split."""
    if owners is None:
        return [list(needs)]
    return [[n if owner == r else MemoryNeed() for n, owner in zip(needs, owners)] for r in range(max(owners) + 1)]


def _grouped(per_rank: list[list[MemoryNeed]], budget: int, resident: bool) -> tuple[tuple[tuple[int, ...], ...], int]:
    """Consecutive groups and the largest memory any rank needs for any of them (its peaks, plus
    the kept statistics of the groups before it when they stay `resident`); a group closes when
    the next tensor would not fit on some rank. DoesNotFit when a tensor does not fit beside what
    is resident."""
    ranks = range(len(per_rank))
    load, scratch, kept_before = [0] * len(ranks), [0] * len(ranks), [0] * len(ranks)
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    estimate = 0
    for i in range(len(per_rank[0])):
        needs = [per_rank[r][i] for r in ranks]
        if current and any(
            kept_before[r] + load[r] + needs[r].peak + max(scratch[r], needs[r].scratch) > budget for r in ranks
        ):
            groups.append(tuple(current))
            for r in ranks:
                if resident:
                    kept_before[r] += sum(per_rank[r][j].kept for j in current)
                load[r] = scratch[r] = 0
            current = []
        for r in ranks:
            if kept_before[r] + needs[r].alone > budget:
                raise DoesNotFit(i, kept_before[r] + needs[r].alone)
        current.append(i)
        for r in ranks:
            load[r] += needs[r].peak
            scratch[r] = max(scratch[r], needs[r].scratch)
            estimate = max(estimate, kept_before[r] + load[r] + scratch[r])
    groups.append(tuple(current))
    return tuple(groups), estimate
