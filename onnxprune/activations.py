"""Calibration inputs of each weight's layer, captured with hooks: the raw material of the
layer-wise estimators (Wanda, SparseGPT).

For a weight W seen as a matrix [rows, cols] (canonical order), the rows its layer multiplies it
with are: the last axis of a MatMul's other operand, Gemm's op(A) rows, and a Conv's unfolded
input patches (per group of a grouped convolution). Each captured batch goes straight into the
tensor's statistics (sums, not stored rows), so memory does not grow with the calibration set.
Weights whose inputs cannot be captured that way (ConvTranspose, recurrent nodes, 3-D
convolutions, weights reached through layout nodes, batched MatMul weights) are refused up front
with the names, rather than pruned on a different scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .bridge.bindings import PrunableTensor
from .bridge.convert import TorchModel
from .data import Dataset, FeedPlan, InputSpec, feed_plan, iter_feeds
from .errors import UsageError
from .gradients import FisherLoss, per_sample_loss
from .layerwise_maths import conv_patches, gram

log = logging.getLogger("onnxprune")


class InputStatistics:
    """Sums over the calibration input rows of one weight: XᵀX per group (when `full`) and the
    squared column norms; `groups` is 1 except for grouped convolutions, `kernel` the number of
    kernel positions per input channel (1 for MatMul/Gemm)."""

    def __init__(self, cols: int, full: bool = True):
        self.cols, self.full = cols, full
        self.gram: Tensor | None = None  # [groups, cols, cols]
        self.squares: Tensor | None = None  # [groups, cols]
        self.count = 0  # input rows seen (per group)
        self.groups = 1
        self.kernel = 1
        self.name = ""  # the weight's, for estimators that weigh each weight's rows (combined)

    def update(self, rows: Tensor) -> None:
        """Add input rows [groups, n, cols]."""
        rows = rows.detach().to(torch.float64)
        if self.full:
            grams = gram(rows)  # one batched product for all groups (depthwise convs have hundreds)
            self.gram = grams if self.gram is None else self.gram + grams
            squares = grams.diagonal(dim1=1, dim2=2)
        else:
            squares = (rows * rows).sum(1)
        self.squares = squares.clone() if self.squares is None else self.squares + squares
        self.groups = rows.shape[0]
        self.count += rows.shape[1]

    def hessian(self) -> Tensor:
        """The mean XᵀX per group [groups, cols, cols] (undamped); zero for a layer that never ran
        (the damping then makes its scores magnitude-like)."""
        if self.gram is None:
            return torch.zeros(1, self.cols, self.cols, dtype=torch.float64)
        return self.gram / max(1, self.count)

    def column_norms(self) -> Tensor:
        """‖X_j‖ per group [groups, cols]; ones for a layer that never ran (magnitude scores)."""
        if self.squares is None:
            return torch.ones(1, self.cols, dtype=torch.float64)
        return self.squares.sqrt()


@dataclass(frozen=True)
class Capture:
    """Where one weight's input rows come from: a module and how to read them from its inputs."""

    name: str
    module: str  # path of the module whose forward pre-hook sees the inputs
    read: Callable[[nn.Module, tuple], Tensor | None]  # → rows [groups, n, cols], None if not this weight
    activation: str  # the ONNX value the rows are made from (weights sharing it share a pass)
    order: int  # position of the consuming node in the graph (topological)
    node: str = ""  # the module of the consuming node (its output is the layer's output)


def plan_captures(model: TorchModel, targets: Sequence[PrunableTensor]) -> dict[str, list[Capture]]:
    """How to capture every target's inputs; targets that cannot be captured raise a UsageError."""
    plans, refused = capture_plans(model, targets)
    if refused:
        raise UsageError(
            "the layer-wise estimators read each weight's inputs from MatMul, Gemm or 1-D/2-D Conv nodes that "
            f"use it directly; they cannot for {', '.join(sorted(set(refused)))}. Exclude those tensors with "
            "--exclude, or use a gradient-based --method (woodfisher, fishleg, diagonal-fisher, magnitude)"
        )
    return plans


def capture_plans(model: TorchModel, targets: Sequence[PrunableTensor]) -> tuple[dict[str, list[Capture]], list[str]]:
    """How to capture the inputs of each target that allows it, and a description of each use
    that does not (a target with any such use is left out of the plans)."""
    modules = dict(model.module.named_modules())
    order = {name: index for index, name in enumerate(model.node_inputs)}
    plans: dict[str, list[Capture]] = {}
    refused = []
    for target in targets:
        if any(c.via for c in target.consumers):
            refused.append(f"{target.name!r} (reached through {', '.join(c.describe() for c in target.consumers)})")
            continue
        param = model.tensors[target.name]
        captures, ok = [], True
        for module_name, inputs in model.node_inputs.items():
            op_type = model.nodes[module_name][0]
            for index, value in enumerate(inputs):
                if value != target.name:
                    continue
                found = _capture(op_type, index, modules, module_name, inputs, param, target)
                if found is None:
                    refused.append(f"{target.name!r} ({op_type} input {index})")
                    ok = False
                else:
                    path, read, activation = found
                    captures.append(Capture(target.name, path, read, activation, order[module_name], module_name))
        if not captures:
            refused.append(f"{target.name!r} (no MatMul, Gemm or Conv uses it directly)")
        elif ok:
            plans[target.name] = captures
    return plans, refused


def network_order(captures: dict[str, list[Capture]], names: Sequence[str]) -> list[list[str]]:
    """`names` in network order, grouped by the activation they read (one pass per group)."""
    groups: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for name in sorted(names, key=lambda n: min(c.order for c in captures[n])):
        key = captures[name][0].activation
        groups.setdefault(key, []).append(name)
        first.setdefault(key, min(c.order for c in captures[name]))
    return [groups[key] for key in sorted(groups, key=lambda k: first[k])]


def samples_per_batch(plan: FeedPlan, samples: slice) -> int:
    """How many samples one batch of `plan` holds along the rows' first axis (a fixed-batch model's
    batch is padded to its size; a per-sample plan runs one at a time)."""
    return 1 if plan.per_sample else plan.batch if plan.fixed else samples.stop - samples.start


def relevant_rows(
    model: TorchModel, inputs: Sequence[Tensor], captures: Sequence[Capture], samples: int, real: float, seed: int
) -> dict[int, Tensor] | None:
    """Which input rows of each capture can change the model's outputs, for captures whose rows
    are positions inside samples (a MatMul or Gemm operand with several rows per sample: tokens).
    A row counts when the gradient of a fixed random projection of the float outputs with respect
    to it is not exactly zero. Padding tokens behind an attention mask come out exactly zero (the
    softmax gives them weight 0, the pooling multiplies them by 0), and on real text they are most
    rows (all-MiniLM-L6-v2's calibration sentences: 19.5 of 64 tokens are words): fitting a layer
    to them spends the reconstruction on outputs nothing reads. Returns a bool mask [rows] per
    capture position (after the `real` cut) for the captures that have rows to drop, or None when
    no capture has several rows per sample (nothing to check: callers need not ask again)."""
    modules = dict(model.module.named_modules())
    inputs = [x.detach().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    several = False
    found: dict[int, tuple[nn.Module, tuple, int, Tensor]] = {}

    def hook_for(capture: Capture, key: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if key in found or isinstance(module, _ConvNd):
                return
            nonlocal several
            rows = capture.read(module, args)
            if rows is None or rows.shape[1] <= samples:
                return  # one row per sample: every row is a sample, kept
            several = True
            param = model.tensors[capture.name]
            for position, value in enumerate(args):
                if isinstance(value, Tensor) and value is not param and value.requires_grad:
                    found[key] = (module, args, position, value)
                    return

        return hook

    # every float tensor requires a gradient, so that every activation carries one
    tensors = [t for t in model.tensors.values() if t.is_floating_point() and not t.requires_grad]
    handles = [modules[c.module].register_forward_pre_hook(hook_for(c, k)) for k, c in enumerate(captures)]
    try:
        for t in tensors:
            t.requires_grad_(True)
        with torch.enable_grad():
            outputs = [o for o in model(*inputs) if isinstance(o, Tensor) and o.is_floating_point() and o.requires_grad]
            if not several:
                return None
            if not outputs or not found:
                return {}
            generator = torch.Generator().manual_seed(seed)
            projection = cast(
                Tensor,
                sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype).to(o.device)).sum() for o in outputs),
            )
            keys = list(found)
            grads = torch.autograd.grad(projection, [found[k][3] for k in keys], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for t in tensors:
            t.requires_grad_(False)
    return _nonzero_rows(captures, found, dict(zip(keys, grads)), real)


def _nonzero_rows(
    captures: Sequence[Capture],
    found: dict[int, tuple[nn.Module, tuple, int, Tensor]],
    grads: dict[int, Tensor | None],
    real: float,
) -> dict[int, Tensor]:
    """Per capture, the rows (of the first `real` part) whose gradient is not exactly zero, for
    the captures where some are."""
    masks = {}
    for key, grad in grads.items():
        if grad is None:
            continue
        module, args, position, _ = found[key]
        rows = captures[key].read(module, tuple(grad if i == position else a for i, a in enumerate(args)))
        if rows is None:
            continue
        keep = (rows[0] != 0).any(-1)
        keep = keep[: int(round(keep.shape[0] * real))]
        if not bool(keep.all()):
            masks[key] = keep
    return masks


def capture_batch(
    model: TorchModel,
    feeds: dict[str, np.ndarray],
    captures: Sequence[Capture],
    real: float,
    device: torch.device,
    relevant: dict[int, Tensor] | None = None,
) -> dict[str, list[Tensor]]:
    """Run one batch and return, per weight name, the input rows [groups, n, cols] of each of its
    `captures` (in order); the forward pass stops once all were seen. `real` is the share of the
    batch that holds samples (a fixed-batch model's last batch is padded; its rows come last).
    `relevant` (from `relevant_rows`, by capture position) drops the rows the outputs never read."""
    modules = dict(model.module.named_modules())
    rows: dict[str, list[Tensor]] = {}
    seen: set[int] = set()

    def hook_for(capture: Capture, key: int):
        def hook(module: nn.Module, args: tuple) -> None:
            found = capture.read(module, args)
            if found is None or key in seen:
                return
            found = found[:, : int(round(found.shape[1] * real))].detach()
            if relevant and key in relevant:
                found = found[:, relevant[key].to(found.device)]
            rows.setdefault(capture.name, []).append(found)
            seen.add(key)
            if len(seen) == len(captures):
                raise _Done

        return hook

    handles = [modules[c.module].register_forward_pre_hook(hook_for(c, k)) for k, c in enumerate(captures)]
    try:
        with torch.no_grad():
            model(*model.inputs(feeds, device))
    except _Done:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return rows


def _capture(op_type, index, modules, module_name, inputs, param, target):
    """(hooked module path, reader, activation value) for one use of a weight, or None."""
    if len(target.shape) != 2 and op_type in ("MatMul", "Gemm"):
        return None
    if op_type == "MatMul":
        return module_name, _matmul_reader(index, param), inputs[1 - index]
    if op_type == "Gemm":
        return module_name, _gemm_reader(index, param, modules[module_name]), inputs[1 - index]
    if op_type == "Conv" and index == 1:
        convs = [
            (path, m)
            for path, m in modules.items()
            if path.startswith(module_name + ".") and isinstance(m, _ConvNd) and not m.transposed
        ]
        if (
            len(convs) != 1
            or len(convs[0][1].kernel_size) > 2
            or convs[0][1].padding_mode != "zeros"
            or isinstance(convs[0][1].padding, str)
        ):
            return None
        return convs[0][0], _conv_reader(param), inputs[0]
    return None


def _matmul_reader(index: int, param: Tensor):
    def read(module: nn.Module, args: tuple) -> Tensor | None:
        if len(args) < 2 or args[index] is not param:
            return None
        other = args[1 - index]
        if index == 1:  # x @ W: the rows are x's last axis
            return other.reshape(1, -1, other.shape[-1])
        return other.transpose(-1, -2).reshape(1, -1, other.shape[-2])  # W @ x: x's columns

    return read


def _gemm_reader(index: int, param: Tensor, module: nn.Module):
    trans_a, trans_b = bool(getattr(module, "trans_a", False)), bool(getattr(module, "trans_b", False))

    def read(module: nn.Module, args: tuple) -> Tensor | None:
        if len(args) < 2 or args[index] is not param:
            return None
        if index == 1:  # Y = op(A) op(B): the rows are op(A)'s rows
            a = args[0]
            return (a.T if trans_a else a).reshape(1, -1, param.shape[1 if trans_b else 0])
        b = args[1]  # W = op(A): the rows are op(B)'s columns
        return (b if trans_b else b.T).reshape(1, -1, param.shape[0 if trans_a else 1])

    return read


def _conv_reader(param: Tensor):
    def read(module: nn.Module, args: tuple) -> Tensor | None:
        if module.weight is not param or not args:
            return None
        conv = cast(_ConvNd, module)  # the module holding a convolution's weight
        padding = cast(tuple[int, ...], conv.padding)  # the converter gives numbers, never "same"
        return conv_patches(args[0], conv.kernel_size, conv.stride, padding, conv.dilation, conv.groups)

    return read


class _Done(Exception):
    """Raised in a hook once every wanted input of this batch was seen: the rest is not needed."""


class ActivationSource:
    """Runs calibration samples through the model and feeds each weight's input rows to its
    statistics. The same `count` samples (a seeded choice) are used at every collection."""

    def __init__(
        self,
        model: TorchModel,
        data: Dataset,
        specs: Sequence[InputSpec],
        targets: Sequence[PrunableTensor],
        count: int,
        batch: int,
        seed: int,
        device: torch.device,
        relevant_only: bool = True,
    ):
        self.model, self.data, self.specs, self.device = model, data, specs, device
        self.captures = plan_captures(model, targets)
        self.count = min(count, len(data))
        order = np.random.default_rng(seed).permutation(len(data))[: self.count]
        self.samples = data.take(np.sort(order), "calibration samples")
        self.plan = feed_plan(specs, self.samples, preferred=batch)
        self.kernels = {t.name: t.kernel for t in targets}
        self.seed = seed
        self.loss: FisherLoss | None = None  # set for estimators that need output gradients
        # per batch, the rows each capture's outputs read (see relevant_rows); None: not needed
        self._relevant: dict[int, dict[tuple[str, str], Tensor]] | None = {} if relevant_only else None
        self.rows_checked = 0  # input rows of layers with several rows per sample, over all collections
        self.rows_dropped = 0  # of which the outputs never read

    @property
    def samples_used(self) -> int:
        return self.count

    def _relevant_rows(
        self, batch: int, feeds: dict[str, np.ndarray], samples: slice, real: float, wanted: Sequence[Capture]
    ) -> dict[int, Tensor] | None:
        """`relevant_rows` for batch number `batch`, by position in `wanted`. Which rows the outputs
        read does not depend on the weights, so it is computed once per batch for every capture of
        every target (the first collection) and reused by later ones (a sequential estimator
        collects once per layer)."""
        if self._relevant is None:
            return None
        if batch not in self._relevant:
            every = [c for name in self.captures for c in self.captures[name]]
            inputs = self.model.inputs(feeds, self.device)
            per_batch = samples_per_batch(self.plan, samples)
            masks = relevant_rows(self.model, inputs, every, per_batch, real, self.seed * 1_000_003 + batch)
            if masks is None:  # no layer has several rows per sample: nothing to drop, ever
                self._relevant = None
                return None
            self._relevant[batch] = {(every[k].name, every[k].module): mask for k, mask in masks.items()}
        known = self._relevant[batch]
        return {k: known[(c.name, c.module)] for k, c in enumerate(wanted) if (c.name, c.module) in known}

    def sequence(self, names: Sequence[str]) -> list[list[str]]:
        """`names` in network order, grouped by the activation they read (one pass per group)."""
        return network_order(self.captures, names)

    def output_sensitivity(self, names: Sequence[str], loss: FisherLoss) -> dict[str, Tensor]:
        """Per output unit of each weight's layer, s_i = (1/N) Σ_n Σ_pos (∂ℓ_n/∂y_{n,i,pos})²: the
        task loss's Fisher of that unit's output (K-FAC: the Fisher of its weights is about
        s_i · XᵀX/rows). One backward pass per batch of the summed per-sample losses (samples do
        not interact, so each sample's output gradient is its own); sampled targets come from a
        generator seeded per batch."""
        modules = dict(self.model.module.named_modules())
        sums: dict[str, Tensor] = {}
        axes = {}
        for name in names:
            capture = self.captures[name][0]
            axes[name] = 1 if self.model.nodes[capture.node][0] == "Conv" else -1

        def hook_for(name: str):
            def hook(module, args, output):
                def grad_hook(grad: Tensor) -> None:
                    g = grad.detach().double()
                    axis = axes[name] % g.dim()
                    squares = (g * g).transpose(axis, -1).reshape(-1, g.shape[axis]).sum(0)
                    sums[name] = squares if name not in sums else sums[name] + squares

                if output.requires_grad:
                    output.register_hook(grad_hook)

            return hook

        handles = [
            modules[self.captures[n][0].node].register_forward_hook(hook_for(n)) for n in names if self.captures.get(n)
        ]
        params = [self.model.tensors[n] for n in names]
        previous = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)  # so that the layers' outputs carry gradients
            for k, (feeds, samples) in enumerate(iter_feeds(self.samples, self.specs, self.plan)):
                count = samples.stop - samples.start
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
                output = self.model(*self.model.inputs(feeds, self.device))[loss.output]
                output = output.unsqueeze(0) if self.plan.per_sample else output[:count]
                targets = None
                if loss.targets == "given" and self.samples.labels is not None:
                    labels = np.asarray(self.samples.labels[samples])
                    targets = torch.from_numpy(labels).to(self.device)
                per_sample_loss(output.float(), loss, targets, generator).sum().backward()
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in zip(params, previous):
                p.requires_grad_(flag)
                p.grad = None
        return {name: sums.get(name, torch.zeros(1, dtype=torch.float64)) / max(1, self.count) for name in names}

    def collect(self, stats: dict[str, InputStatistics], progress: Callable[[int], None] | None = None) -> None:
        """Feed the input rows of every weight named in `stats` over the calibration samples."""
        wanted = [c for name in stats for c in self.captures[name]]
        for name, s in stats.items():
            s.kernel = self.kernels[name]
        for k, (feeds, samples) in enumerate(iter_feeds(self.samples, self.specs, self.plan)):
            real = (samples.stop - samples.start) / self.plan.batch if self.plan.fixed else 1.0
            relevant = self._relevant_rows(k, feeds, samples, real, wanted)
            for mask in (relevant or {}).values():
                self.rows_checked += mask.numel()
                self.rows_dropped += int((~mask).sum())
            for name, parts in capture_batch(self.model, feeds, wanted, real, self.device, relevant).items():
                for part in parts:
                    stats[name].update(part)
            if progress is not None:
                progress(samples.stop - samples.start)
        for name, s in stats.items():
            if s.count == 0:
                log.warning("%r: its layer never ran on the calibration samples; pruned by magnitude", name)
