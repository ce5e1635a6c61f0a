"""What a pruning removes (registry STRUCTURES): single weights (`unstructured`, zeros in the
same shapes), or whole output channels found through the graph's dependency groups
(`channels`, the written model physically smaller: trace.py, select.py, remove.py), of which
`heads` keeps only the attention heads and `ffn` everything but them."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from onnx import ModelProto

from ..registry import Registry
from .graph import ChannelGraph
from .trace import trace_channels


class Structure:
    """One kind of structure: how the graph is traced and which allocations apply."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # the allocations it supports (None: every registered one)
    allocations: ClassVar[tuple[str, ...] | None] = None

    def trace(self, proto: ModelProto, feeds: dict[str, np.ndarray]) -> ChannelGraph | None:
        """The removable groups of `proto` (None: entries are pruned one by one)."""
        return None


STRUCTURES: Registry[type[Structure]] = Registry("structure")


def register(cls: type[Structure]) -> type[Structure]:
    """Class decorator: add a structure kind to the registry under its `name`."""
    return STRUCTURES.register(cls.name)(cls)


@register
class Unstructured(Structure):
    name = "unstructured"
    summary = "single weights set to zero; same shapes, dense speed in onnxruntime, smaller compressed"


@register
class Channels(Structure):
    name = "channels"
    summary = (
        "whole output channels of Conv/Gemm/MatMul, FFN neurons and attention heads removed with every "
        "row, column, bias and per-channel constant they touch; the written model is smaller and faster"
    )
    allocations = ("global", "layer")

    def trace(self, proto: ModelProto, feeds: dict[str, np.ndarray]) -> ChannelGraph | None:
        return trace_channels(proto, feeds)


class _Filtered(Channels):
    """The traced channels, attention heads only (`heads` True) or all but them (False)."""

    heads: ClassVar[bool]

    def trace(self, proto: ModelProto, feeds: dict[str, np.ndarray]) -> ChannelGraph | None:
        graph = trace_channels(proto, feeds)
        graph.keep_only(self.heads, f"--structure {self.name}: {'not ' if self.heads else ''}an attention head")
        return graph


@register
class Heads(_Filtered):
    name = "heads"
    summary = "whole attention heads (Q/K/V rows, output projection columns); other channels stay"
    heads = True


@register
class Ffn(_Filtered):
    name = "ffn"
    summary = "whole channels and FFN neurons as `channels`, attention heads left whole"
    heads = False


DEFAULT_STRUCTURE = "unstructured"

__all__ = ["STRUCTURES", "DEFAULT_STRUCTURE", "ChannelGraph", "Structure", "register"]
