"""The traced channel graph's records: the spaces of output channels, the union of their
elements into removable classes, and the slices and shape constants a removal edits."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnx import ModelProto, TensorProto


@dataclass(frozen=True)
class Space:
    """The output channels of one weighted node."""

    node: str
    weight: str
    size: int
    start: int  # its channels are elements start .. start+size-1


@dataclass(frozen=True)
class Edit:
    """One initializer sliced along `axis`: position k goes with element `labels[k]`."""

    initializer: str
    axis: int
    labels: tuple[int, ...]
    node: int  # index in graph.node (names may be empty)


@dataclass(frozen=True)
class ShapeEdit:
    """A Reshape shape constant whose entry `index` counts the kept positions of `labels`."""

    initializer: str
    index: int
    labels: tuple[int, ...]


@dataclass
class ChannelGraph:
    """The traced graph: spaces, the union of their channels into classes, what to slice."""

    spaces: list[Space] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)  # union-find over channel elements
    edits: list[Edit] = field(default_factory=list)
    groups: dict[int, tuple[int, ...]] = field(default_factory=dict)  # depthwise Conv (node index) -> labels
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)  # root element -> why it stays
    tensors: set[str] = field(default_factory=set)  # the values whose channels were followed
    weights: set[str] = field(default_factory=set)  # the weights of the Conv/Gemm/MatMul nodes met
    heads: set[int] = field(default_factory=set)  # one element of each attention head's class

    def find(self, element: int) -> int:
        while self.parent[element] != element:
            self.parent[element] = self.parent[self.parent[element]]
            element = self.parent[element]
        return element

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.blocked:
                self.blocked.setdefault(ra, self.blocked.pop(rb))

    def new_elements(self, count: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return list(range(start, start + count))

    def block(self, labels, why: str) -> None:
        for element in labels:
            self.blocked.setdefault(self.find(element), why)

    def is_blocked(self, element: int) -> bool:
        return self.find(element) in self.blocked

    def is_head(self, element: int) -> bool:
        """Whether `element`'s class is an attention head (channels split into heads by a Reshape)."""
        root = self.find(element)
        return any(self.find(h) == root for h in self.heads)

    def keep_only(self, wanted: bool, why: str) -> None:
        """Block every class that is (wanted=False) or is not (wanted=True) an attention head."""
        head_roots = {self.find(h) for h in self.heads}
        for root in list(self.classes()):
            if (root in head_roots) != wanted:
                self.blocked[root] = why

    def classes(self) -> dict[int, list[int]]:
        """Removable classes: root element -> its elements (blocked ones left out)."""
        out: dict[int, list[int]] = {}
        for element in range(len(self.parent)):
            root = self.find(element)
            if root not in self.blocked:
                out.setdefault(root, []).append(element)
        return out

    def space_of(self, element: int) -> Space | None:
        for space in self.spaces:
            if space.start <= element < space.start + space.size:
                return space
        return None


def main_graph_constants(proto: ModelProto) -> dict[str, TensorProto]:
    """The main graph's initializers and Constant-node values (PaddlePaddle exports keep weights
    in Constant nodes), by value name."""
    found = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                found[node.output[0]] = value
    return found
