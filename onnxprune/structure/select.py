"""Which classes of channels a step removes: each class's saliency (over every row, column and
depthwise row its removal deletes; see constraint.py), then split across layers like an
unstructured allocation: `global` one threshold on saliency per removed parameter,
`layer` the same fraction of every layer's removable channels. `--sparsity` is the fraction of
the removable parameters removed (entries of pruned tensors that some removable class covers);
every layer keeps at least one channel."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .graph import ChannelGraph


def choose_classes(
    graph: ChannelGraph,
    totals: Mapping[int, float],
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    allocation: str,
    already: frozenset[int] = frozenset(),
) -> set[int]:
    """The classes to remove so that `sparsity` of the removable entries of the tensors in
    `shapes` go, counted exactly (an entry in a removed row and a removed column counts once);
    classes removed before stay removed and count."""
    counter = EntryCounter(graph, shapes)
    candidates = [root for root in totals if counter.footprint.get(root)]
    members = membership(graph)
    left = [space.size for space in graph.spaces]
    removed: set[int] = set()

    def take(root: int) -> None:
        for index, count in members[root].items():
            left[index] -= count
        counter.remove(root)
        removed.add(root)

    for root in {graph.find(r) for r in already} & set(candidates):
        take(root)
    sizes = {root: counter.size(root) for root in candidates}
    if allocation == "layer":
        order = _per_layer_order(totals, sizes, candidates, members)
    else:
        order = sorted(candidates, key=lambda root: (totals[root] / sizes[root], root))
    target = sparsity * counter.removable(candidates)
    for root in order:
        if root in removed:
            continue
        gain = counter.gain(root)
        if counter.removed >= target - 0.5 * gain:  # the nearest count to the target
            break
        # every layer keeps at least one channel
        if all(left[i] - count >= 1 for i, count in members[root].items()):
            take(root)
    return removed


class EntryCounter:
    """Exact count of the entries removed from the tensors in `shapes` as classes go: each
    tensor's kept entries are the product of its kept positions along every sliced axis."""

    def __init__(self, graph: ChannelGraph, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = dict(shapes)
        self.kept = {name: list(shape) for name, shape in shapes.items()}
        self.footprint: dict[int, dict[tuple[str, int], int]] = {}  # class -> (tensor, axis) -> positions
        for edit in graph.edits:
            if edit.initializer not in shapes:
                continue
            for element in edit.labels:
                counts = self.footprint.setdefault(graph.find(element), {})
                key = (edit.initializer, edit.axis)
                counts[key] = counts.get(key, 0) + 1
        self.removed = 0

    def _lost(self, kept: dict[str, list[int]], root: int) -> int:
        """Entries that removing `root` would take from the tensors, given `kept`."""
        lost = 0
        for name in {name for name, _ in self.footprint.get(root, {})}:
            after = list(kept[name])
            for (tensor, axis), count in self.footprint[root].items():
                if tensor == name:
                    after[axis] -= count
            lost += int(np.prod(kept[name])) - int(np.prod(after))
        return lost

    def gain(self, root: int) -> int:
        return self._lost(self.kept, root)

    def size(self, root: int) -> int:
        """Entries the class holds on its own (all tensors whole)."""
        return self._lost({name: list(shape) for name, shape in self.shapes.items()}, root)

    def remove(self, root: int) -> None:
        self.removed += self.gain(root)
        for (name, axis), count in self.footprint.get(root, {}).items():
            self.kept[name][axis] -= count

    def removable(self, roots) -> int:
        """Entries gone if every class in `roots` went."""
        kept = {name: list(shape) for name, shape in self.shapes.items()}
        for root in roots:
            for (name, axis), count in self.footprint[root].items():
                kept[name][axis] -= count
        return sum(int(np.prod(shape)) - int(np.prod(kept[name])) for name, shape in self.shapes.items())


def membership(graph: ChannelGraph) -> dict[int, dict[int, int]]:
    """Per class, how many channels it holds in each space (by index in graph.spaces)."""
    members: dict[int, dict[int, int]] = {}
    for index, space in enumerate(graph.spaces):
        for element in range(space.start, space.start + space.size):
            counts = members.setdefault(graph.find(element), {})
            counts[index] = counts.get(index, 0) + 1
    return members


def _per_layer_order(totals, sizes, candidates, members) -> list[int]:
    """Classes ordered so that every layer reaches a given fraction of its channels before any
    goes further: by the rank of the class within its first layer relative to the layer's
    size, then by saliency per parameter."""
    by_space: dict[int, list[int]] = {}
    for root in candidates:
        by_space.setdefault(min(members[root]), []).append(root)
    keyed = []
    for roots in by_space.values():
        roots.sort(key=lambda root: (totals[root], root))
        for rank, root in enumerate(roots):
            keyed.append(((rank + 1) / len(roots), totals[root] / sizes[root], root))
    return [root for *_, root in sorted(keyed)]


def removed_classes(graph: ChannelGraph, masks: Mapping[str, np.ndarray]) -> set[int]:
    """The classes whose every entry in `masks` (keep-masks, ONNX layout) is pruned: what the
    masks of a structured run remove (read back from a checkpoint or the final masks)."""
    gone: dict[int, bool] = {}
    for edit in graph.edits:
        if edit.initializer not in masks:
            continue
        mask = np.asarray(masks[edit.initializer], dtype=bool)
        other = tuple(a for a in range(mask.ndim) if a != edit.axis)
        kept_any = np.asarray(mask.any(axis=other)) if other else mask
        for position, element in enumerate(edit.labels):
            root = graph.find(element)
            gone[root] = gone.get(root, True) and not bool(kept_any[position])
    blocked = set(graph.blocked)
    return {root for root, all_gone in gone.items() if all_gone and root not in blocked}
