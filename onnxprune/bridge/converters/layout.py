"""Pooling, padding geometry and slicing, written from the ONNX specification.

Pure shape arithmetic (`same_pads`, `pool_output_size`) is separate from the modules so it can be
checked by hand. Pads are always applied explicitly, so asymmetric and `auto_pad=SAME_*` padding
(tf2onnx writes both) work for every spatial rank torch pools over.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def same_pads(
    spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], upper: bool
) -> list[int]:
    """ONNX pads [begin..., end...] for auto_pad SAME_UPPER (extra pad at the end) or SAME_LOWER."""
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return begins + ends


def pool_output_size(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int, ceil: bool) -> int:
    """Output length of a pooling window sweep, as onnxruntime computes it (with ceil_mode, a last
    window that would start in the end padding is dropped)."""
    span = size + begin + end - (dilation * (kernel - 1) + 1)
    out = (math.ceil(span / stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + begin:
        out -= 1
    return max(out, 0)


def _torch_pad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) for the spatial axes → F.pad's last-axis-first list."""
    flat: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        flat += [b, e]
    return flat


class Pool(nn.Module):
    """AveragePool / MaxPool (1-3 spatial axes) with explicit or SAME pads, ceil_mode,
    count_include_pad (average) and dilations (max)."""

    def __init__(
        self,
        kind: str,
        kernel: Sequence[int],
        strides: Sequence[int] | None,
        pads: Sequence[int] | None,
        auto_pad: str,
        dilations: Sequence[int] | None,
        ceil_mode: bool,
        count_include_pad: bool,
    ):
        super().__init__()
        rank = len(kernel)
        if rank not in (1, 2, 3):
            raise NotImplementedError(f"{kind} pooling over {rank} spatial axes")
        if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise NotImplementedError(f"auto_pad {auto_pad!r}")
        self.kind, self.kernel = kind, list(kernel)
        self.strides = list(strides or [1] * rank)
        self.dilations = list(dilations or [1] * rank)
        if kind == "avg" and any(d != 1 for d in self.dilations):
            raise NotImplementedError("AveragePool with dilations")
        self.pads = list(pads or [0] * 2 * rank) if auto_pad == "NOTSET" else [0] * 2 * rank
        self.auto_pad, self.ceil_mode, self.count_include_pad = auto_pad, ceil_mode, count_include_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = len(self.kernel)
        spatial = list(x.shape[2:])
        if self.auto_pad.startswith("SAME"):
            pads = same_pads(spatial, self.kernel, self.strides, self.dilations, self.auto_pad == "SAME_UPPER")
        else:
            pads = self.pads
        begins, ends = pads[:rank], pads[rank:]
        outs = [
            pool_output_size(n, k, s, d, b, e, self.ceil_mode)
            for n, k, s, d, b, e in zip(spatial, self.kernel, self.strides, self.dilations, begins, ends)
        ]
        # room so that every counted window fits; windows are cropped to `outs` afterwards
        needed = [(o - 1) * s + d * (k - 1) + 1 for o, s, d, k in zip(outs, self.strides, self.dilations, self.kernel)]
        extra = [max(0, need - (n + b + e)) for need, n, b, e in zip(needed, spatial, begins, ends)]
        functional = nn.functional
        if self.kind == "max":
            padded = functional.pad(x, _torch_pad(begins, [e + x_ for e, x_ in zip(ends, extra)]), value=-math.inf)
            pool = (functional.max_pool1d, functional.max_pool2d, functional.max_pool3d)[rank - 1]
            y = pool(padded, self.kernel, self.strides, 0, self.dilations)
        else:
            padded = functional.pad(x, _torch_pad(begins, [e + x_ for e, x_ in zip(ends, extra)]), value=0.0)
            average = (functional.avg_pool1d, functional.avg_pool2d, functional.avg_pool3d)[rank - 1]
            sums = average(padded, self.kernel, self.strides, 0) * math.prod(self.kernel)
            # the divisor counts the input, plus the declared pads with count_include_pad
            ones = x.new_ones((1, 1, *spatial))
            if self.count_include_pad:
                ones = functional.pad(ones, _torch_pad(begins, ends), value=1.0)
                ones = functional.pad(ones, _torch_pad([0] * rank, extra), value=0.0)
            else:
                ones = functional.pad(ones, _torch_pad(begins, [e + x_ for e, x_ in zip(ends, extra)]), value=0.0)
            counts = average(ones, self.kernel, self.strides, 0) * math.prod(self.kernel)
            y = sums / counts.clamp(min=1.0)
        return y[(slice(None), slice(None), *(slice(0, o) for o in outs))]


class SamePadding(nn.Module):
    """Pads the data input for auto_pad SAME_UPPER/SAME_LOWER, from the actual input size and the
    kernel size of the weight it receives, then runs the wrapped node."""

    def __init__(self, inner: nn.Module, strides: Sequence[int] | None, dilations: Sequence[int] | None, upper: bool):
        super().__init__()
        self.inner, self.strides, self.dilations, self.upper = inner, strides, dilations, upper

    def forward(self, x: torch.Tensor, weight: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        spatial = list(x.shape[2:])
        kernel = list(weight.shape[2:])
        rank = len(spatial)
        pads = same_pads(spatial, kernel, self.strides or [1] * rank, self.dilations or [1] * rank, self.upper)
        return self.inner(nn.functional.pad(x, _torch_pad(pads[:rank], pads[rank:])), weight, *rest)


class Slice(nn.Module):
    """Slice-10+: starts/ends/axes/steps as inputs, negative steps included (clamping as in ONNX,
    which is Python's slice semantics)."""

    def forward(
        self,
        x: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        axes: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        starts_, ends_ = starts.reshape(-1).tolist(), ends.reshape(-1).tolist()
        axes_ = axes.reshape(-1).tolist() if axes is not None else list(range(len(starts_)))
        steps_ = steps.reshape(-1).tolist() if steps is not None else [1] * len(starts_)
        index: list[slice] = [slice(None)] * x.dim()
        backwards = []
        for start, end, axis, step in zip(starts_, ends_, axes_, steps_):
            axis = int(axis) % x.dim()
            if step == 0:
                raise ValueError("Slice step cannot be 0")
            first, stop, stride = slice(int(start), int(end), int(step)).indices(x.shape[axis])
            if stride > 0:
                index[axis] = slice(first, max(first, stop), stride)
            else:
                backwards.append((axis, torch.arange(first, stop, stride, device=x.device)))
        x = x[tuple(index)]
        for axis, positions in backwards:
            x = x.index_select(axis, positions)
        return x
