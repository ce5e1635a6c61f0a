"""Measured latency of removing whole channels (a ZipLM-style table), for --target-speedup.

Classes of channels that touch the same layers form a *group* (one layer's output channels, or
the channels a residual sum ties across several layers). For each group the model is timed in
onnxruntime with a quarter, a half, three quarters and all of the group's removable classes
gone, the rest dense, on this machine with the run's threads and batch, each variant's runs
interleaved with the dense model's so that drift hits both. The table predicts a choice's
latency additively (each group's saving interpolated linearly in its count of removed classes,
made non-decreasing); `choose_for_latency` then removes, over all groups, the class with the
smallest saliency per millisecond saved until the prediction reaches the target. A choice is
finally timed as a whole (`LatencyTable.speedup_of`), since the additive prediction is only a
model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..sessions import cpu_session
from ..speed import available_cores, latency_of, paired_ratio, time_sessions
from .graph import ChannelGraph
from .remove import remove_channels
from .select import membership

FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of a group's removable classes, timed for the table
TABLE_SECONDS = 0.25  # of dense runs per timed variant, at least
MIN_TABLE_RUNS = 10  # whatever the speed section's --speed-runs (which may be 0)
MAX_TABLE_RUNS = 500
LOSS_BINS = 400  # latency steps of the knapsack in choose_by_losses


@dataclass(frozen=True)
class GroupCost:
    """One group: its classes and the milliseconds saved with `counts[i]` of them removed."""

    classes: tuple[int, ...]
    spaces: tuple[tuple[int, int], ...]  # (space index, channels per class)
    counts: tuple[int, ...]  # 0 first, increasing
    saved_ms: tuple[float, ...]  # 0 first, non-decreasing

    def saving(self, removed: int) -> float:
        return float(np.interp(removed, self.counts, self.saved_ms))


@dataclass
class LatencyTable:
    """The dense latency, each group's measured savings, and what is needed to time a choice."""

    dense_ms: float
    groups: list[GroupCost]
    threads: int
    batch_size: int
    runs: int
    model: bytes  # the original model, to time a whole choice
    feeds: dict[str, np.ndarray]
    graph: ChannelGraph
    # the dense model's session, opened once for the table and every later timing
    dense: Any = field(default=None, repr=False, compare=False)

    def predicted_ms(self, removed: set[int]) -> float:
        roots = {self.graph.find(r) for r in removed}
        return self.dense_ms - sum(g.saving(sum(c in roots for c in g.classes)) for g in self.groups)

    def speedup_of(self, removed: set[int]) -> float:
        """The measured speed-up of the model with the `removed` classes gone (dense / variant)."""
        if self.dense is None:
            self.dense = cpu_session(self.model, self.threads)
        return 1.0 / _variant_ratio(self.dense, self.model, self.graph, removed, self.feeds, self.runs, self.threads)

    def most_removed(self) -> set[int]:
        """Every class the groups may lose together (each layer keeps at least one channel)."""
        removed, _ = choose_for_latency(self.graph, {c: 0.0 for g in self.groups for c in g.classes}, self, 0.0)
        return removed

    def summary(self) -> dict:
        return {
            "dense_ms": round(self.dense_ms, 4),
            "groups": len(self.groups),
            "threads": self.threads,
            "batch_size": self.batch_size,
            "runs": self.runs,
            "most_saved_ms": round(sum(g.saved_ms[-1] for g in self.groups), 4),
        }


def latency_groups(graph: ChannelGraph) -> list[tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]:
    """The removable classes grouped by the layers (and channels per layer) they touch."""
    members = membership(graph)
    groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for root in graph.classes():
        groups.setdefault(tuple(sorted(members[root].items())), []).append(root)
    return [(tuple(sorted(roots)), key) for key, roots in sorted(groups.items())]


def alone_limit(graph: ChannelGraph, spaces: tuple[tuple[int, int], ...], classes: int) -> int:
    """How many of a group's classes may go with the rest dense (each layer keeps one channel)."""
    room = [(graph.spaces[index].size - 1) // per_class for index, per_class in spaces]
    return max(0, min([classes, *room]))


def measure_table(
    proto: onnx.ModelProto,
    graph: ChannelGraph,
    feeds: dict[str, np.ndarray],
    batch_size: int,
    runs: int,
    threads: int,
    log=None,
) -> LatencyTable:
    """Time the model with parts of each group removed (FRACTIONS) against the dense model."""
    threads = threads or available_cores()
    model = proto.SerializeToString()
    dense = cpu_session(model, threads)
    # sub-millisecond models need many runs for a steady median: at least TABLE_SECONDS per pair
    first = time_sessions([dense], feeds, 5)[0]
    runs = int(min(MAX_TABLE_RUNS, max(runs, MIN_TABLE_RUNS, TABLE_SECONDS / max(float(np.median(first)), 1e-6))))
    dense_times: list[float] = []
    costs = []
    groups = latency_groups(graph)
    for number, (classes, spaces) in enumerate(groups, 1):
        limit = alone_limit(graph, spaces, len(classes))
        counts = sorted({round(f * limit) for f in FRACTIONS} - {0})
        saved = [0.0]
        for count in counts:
            # kept as ratios: milliseconds once the dense latency is known
            saved.append(_variant_ratio(dense, model, graph, set(classes[:count]), feeds, runs, threads, dense_times))
        costs.append((classes, spaces, (0, *counts), saved))
        if log is not None:
            log(f"latency table: group {number}/{len(groups)} timed ({len(counts)} widths)")
    dense_ms = latency_of(dense_times).median_ms if dense_times else 0.0
    table = [
        GroupCost(
            classes=classes,
            spaces=spaces,
            counts=counts,
            saved_ms=tuple(np.maximum.accumulate([0.0, *((1.0 - r) * dense_ms for r in ratios[1:])]).tolist()),
        )
        for classes, spaces, counts, ratios in costs
    ]
    return LatencyTable(dense_ms, table, threads, batch_size, runs, model, feeds, graph, dense)


def least_salient(classes, totals: Mapping[int, float], gone) -> list[int]:
    """The `classes` not in `gone`, least salient first (ties by class, so choices repeat)."""
    return sorted((c for c in classes if c not in gone), key=lambda c: (totals.get(c, 0.0), c))


class _Choice:
    """A choice being built: the classes taken, each layer's channels left (every layer keeps
    one), and how many of each group's classes are gone."""

    def __init__(self, graph: ChannelGraph, table: LatencyTable, already: frozenset[int]):
        self.members = membership(graph)
        self.left = [space.size for space in graph.spaces]
        self.removed: set[int] = set()
        self.table = table
        self.done = [0] * len(table.groups)
        self.group_of = {c: i for i, g in enumerate(table.groups) for c in g.classes}
        for root in sorted({graph.find(r) for r in already} & set(self.group_of)):
            self.take(root)

    def fits(self, root: int) -> bool:
        return all(self.left[i] - count >= 1 for i, count in self.members[root].items())

    def take(self, root: int) -> None:
        for index, count in self.members[root].items():
            self.left[index] -= count
        self.removed.add(root)
        self.done[self.group_of[root]] += 1

    def queues(self, totals: Mapping[int, float]) -> list[list[int]]:
        """Each group's classes not taken, least salient first."""
        return [least_salient(g.classes, totals, self.removed) for g in self.table.groups]

    def predicted(self) -> float:
        return self.table.dense_ms - sum(g.saving(n) for g, n in zip(self.table.groups, self.done))


def choose_for_latency(
    graph: ChannelGraph,
    totals: Mapping[int, float],
    table: LatencyTable,
    target_ms: float,
    already: frozenset[int] = frozenset(),
) -> tuple[set[int], float]:
    """The classes to remove for a predicted latency of at most `target_ms`: classes removed
    before stay; then, one at a time, the class whose saliency per millisecond saved is smallest
    among each group's next cheapest. Stops early when no class can go (every layer keeps one
    channel); returns the choice and its predicted latency."""
    choice = _Choice(graph, table, already)
    queues = choice.queues(totals)
    heads = [0] * len(queues)
    predicted = choice.predicted()
    while predicted > target_ms:
        best, best_score = None, np.inf
        for index, queue in enumerate(queues):
            if heads[index] >= len(queue) or not choice.fits(queue[heads[index]]):
                continue
            group = table.groups[index]
            gain = group.saving(choice.done[index] + 1) - group.saving(choice.done[index])
            # a flat stretch of the measured curve is crossed last, but still crossed if needed
            score = totals.get(queue[heads[index]], 0.0) / max(gain, 1e-9)
            if score < best_score:
                best, best_score = index, score
        if best is None:
            break
        group = table.groups[best]
        predicted -= group.saving(choice.done[best] + 1) - group.saving(choice.done[best])
        choice.take(queues[best][heads[best]])
        heads[best] += 1
    return choice.removed, predicted


def choose_by_losses(
    graph: ChannelGraph,
    totals: Mapping[int, float],
    table: LatencyTable,
    losses: Sequence[Mapping[int, float]],
    target_ms: float,
    already: frozenset[int] = frozenset(),
) -> tuple[set[int], float]:
    """The classes to remove for a predicted latency of at most `target_ms` with the smallest
    summed loss increase, each group's removal measured as a whole (`losses[g]`: count of the
    group's classes gone -> measured loss increase, its least salient classes first; ZipLM's
    and SPDY's choice, not an additive sum of single classes): a knapsack over the groups'
    widths on the latency saved, in LOSS_BINS steps. Where the target cannot be predicted met,
    the widths that save the most. Returns the choice and its predicted latency."""
    choice = _Choice(graph, table, already)
    need = table.dense_ms - target_ms
    unit = max(need, 1e-9) / LOSS_BINS
    # best[s]: (summed loss, the counts chosen so far) with s bins of latency saved, capped
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for group, done, curve in zip(table.groups, choice.done, losses):
        options = [(done, 0.0)] + [(n, loss) for n, loss in sorted(curve.items()) if n > done]
        step: dict[int, tuple[float, tuple[int, ...]]] = {}
        for bins, (total, counts) in best.items():
            for count, loss in options:
                saved = min(LOSS_BINS, bins + int(group.saving(count) / unit))
                candidate = (total + loss, (*counts, count))
                if saved not in step or candidate[0] < step[saved][0]:
                    step[saved] = candidate
        best = step
    _, counts = best[max(best)]  # LOSS_BINS when the target can be met
    queues = choice.queues(totals)
    for index, (queue, count) in enumerate(zip(queues, counts)):
        for root in queue:
            if choice.done[index] >= count:
                break
            if choice.fits(root):
                choice.take(root)
    return choice.removed, choice.predicted()


def _without(model: bytes, graph: ChannelGraph, removed: set[int]) -> bytes:
    proto = onnx.load_from_string(model)
    remove_channels(proto, graph, removed)
    return proto.SerializeToString()


def _variant_ratio(
    dense, model: bytes, graph: ChannelGraph, removed: set[int], feeds, runs: int, threads: int, dense_times=None
) -> float:
    """Median over interleaved runs of (the model without `removed`) / (the dense session); the
    dense run times are added to `dense_times` when given."""
    variant = cpu_session(_without(model, graph, removed), threads)
    times = time_sessions([dense, variant], feeds, runs)
    if dense_times is not None:
        dense_times.extend(times[0])
    return paired_ratio(times[0], times[1])
