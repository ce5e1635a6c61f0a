"""One-shot pruning with recomputations: reach the target sparsity in R steps, each step
collecting fresh gradients at the current (pruned, compensated) weights with pruned coordinates
masked, scoring every weight, selecting the masks, and compensating the survivors.

Weights are handled flat in their canonical order (see PrunableTensor.canonical_order); the
memory plan decides which tensors are processed together.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import numpy as np
import torch
from torch import Tensor

from .activations import ActivationSource, InputStatistics
from .allocators import ALLOCATORS, PatternConstraint
from .bridge.bindings import PrunableTensor
from .bridge.convert import TorchModel
from .errors import MemoryBudgetError, NonFiniteError
from .estimators.base import Estimator, SpillableStatistics, Statistics
from .gradients import GradientSource
from .memory import DoesNotFit, MemoryPlan, human, plan_memory
from .progress import Progress
from .schedule import oneshot_targets
from .structure import ChannelGraph
from .structure.constraint import ChannelConstraint, class_entries
from .structure.latency import LatencyTable


@dataclass(frozen=True)
class StepRecord:
    step: int
    sparsity: float
    gradient_seconds: float
    estimator_seconds: float
    collections: int  # gradient collections this step (groups, twice when statistics are re-collected)


@dataclass
class OneShotResult:
    arrays: dict[str, np.ndarray]
    steps: list[StepRecord] = field(default_factory=list)
    plan: MemoryPlan | None = None


@dataclass
class Scored:
    """One step's scores (and the statistics the update needs), taken at fixed weights and masks."""

    number: int
    label: str
    source: Source
    keep: list[Tensor]  # the masks the statistics were collected with
    scores: dict[int, Tensor] = field(default_factory=dict)
    stats: dict[int, Statistics | None] = field(default_factory=dict)
    # whole channels, where the estimator scores groups: per tensor, each class's saliency
    groups: dict[int, dict[int, float]] = field(default_factory=dict)
    timer: dict[str, float] = field(default_factory=lambda: {"gradients": 0.0, "estimator": 0.0})
    collections: int = 0


Source = GradientSource | ActivationSource | None


def activation_source(source: Source) -> ActivationSource:
    """The source of an estimator that reads layer inputs (an internal error otherwise)."""
    if not isinstance(source, ActivationSource):
        raise TypeError(f"the estimator reads layer inputs; its source is a {type(source).__name__}")
    return source


def gradient_source(source: Source) -> GradientSource:
    """The source of an estimator that reads gradients (an internal error otherwise)."""
    if not isinstance(source, GradientSource):
        raise TypeError(f"the estimator reads gradients; its source is a {type(source).__name__}")
    return source


class TensorView:
    """A model weight seen flat in canonical order."""

    def __init__(self, target: PrunableTensor, param: Tensor):
        self.target, self.param = target, param
        # canonical = the ONNX layout with its first two axes swapped (no index arrays: for a
        # 1 GiB tensor they would take 2 GiB each)
        self.swapped = target.swapped
        self.onnx_shape = tuple(param.shape)
        self.canonical_shape = (self.onnx_shape[1], self.onnx_shape[0], *self.onnx_shape[2:]) if self.swapped else None
        self.numel = param.numel()
        self.shape = target.matrix_shape()
        self.kernel = target.kernel  # N:M groups run across input channels at each kernel position

    def to_canonical(self, flat: Tensor) -> Tensor:
        """ONNX-flat → canonical (works on [..., numel] rows too)."""
        return self._swap(flat, self.onnx_shape) if self.swapped else flat

    def to_onnx(self, flat: Tensor) -> Tensor:
        return self._swap(flat, self.canonical_shape) if self.canonical_shape is not None else flat

    @staticmethod
    def _swap(flat: Tensor, shape: tuple[int, ...]) -> Tensor:
        lead = flat.shape[:-1]
        return flat.reshape(*lead, *shape).transpose(len(lead), len(lead) + 1).reshape(*lead, -1)

    def read(self) -> Tensor:
        return self.to_canonical(self.param.detach().reshape(-1).float())

    def write(self, flat: Tensor) -> None:
        with torch.no_grad():
            self.param.copy_(self.to_onnx(flat.to(self.param.device)).reshape(self.param.shape).to(self.param.dtype))


class Pruner:
    """Prunes a set of weights step by step, keeping masks (and the memory plan) between steps,
    so that a gradual schedule can fine-tune between calls. Use as a context manager: spilled
    statistics live in a temporary folder removed on exit."""

    def __init__(
        self,
        model: TorchModel,
        targets: Sequence[PrunableTensor],
        estimator: Estimator,
        allocation: str,
        sources: Callable[[int], GradientSource | ActivationSource] | None,
        budget: int,
        progress: Progress,
        spill_folder: Path | None = None,
        pattern: tuple[int, int] | None = None,
        evaluate: Callable[[], float] | None = None,
        channels: ChannelGraph | None = None,
        latency: LatencyTable | None = None,
        speedup: float | None = None,
    ):
        self.estimator, self.sources, self.progress = estimator, sources, progress
        # whole channels: the allocation splits classes of channels, and the estimator updates
        # the survivors of exactly the masks chosen (it picks no entries of its own)
        self.structured = channels is not None
        self.channels = channels
        self._class_entries: dict[int, dict[int, Tensor]] = {}  # per view: the graph does not change
        self.allocator = (
            ChannelConstraint(channels, allocation, latency, speedup) if channels else ALLOCATORS.get(allocation)()
        )
        self.pattern = PatternConstraint(self.allocator, *pattern) if pattern is not None else None
        # the loss of the current model on held-out calibration samples (sensitivity allocation)
        self.evaluate = evaluate
        if self.allocator.needs_evaluation and evaluate is None:
            raise ValueError(f"the {allocation} allocation needs an evaluation function")
        self.views = [TensorView(t, model.tensors[t.name]) for t in targets]
        self.keep = [torch.ones(v.numel, dtype=torch.bool, device=v.param.device) for v in self.views]
        self.records: list[StepRecord] = []
        # with keep_updates, the compensation of the last step by tensor (new minus the masked
        # old values), for the repair's update scaling; one copy of the weights while it is held
        self.keep_updates = False
        self.updates: dict[int, Tensor] = {}
        self.plan: MemoryPlan | None = None
        self._cleanup = ExitStack()
        self._spill: Path | None = None
        if (estimator.needs_gradients or estimator.needs_activations) and sources is None:
            raise ValueError(f"{estimator.name} needs calibration statistics")
        if estimator.needs_gradients and sources is not None:
            disk_free = shutil.disk_usage(spill_folder).free if spill_folder is not None else 0
            self.plan = plan_statistics(self.views, estimator, sources(0).count, budget, disk_free)
            if self.plan.storage == "disk":
                folder = tempfile.TemporaryDirectory(prefix=".onnxprune-statistics-", dir=spill_folder)
                self._spill = Path(self._cleanup.enter_context(folder))
        self.groups = self.plan.groups if self.plan else (tuple(range(len(self.views))),)

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup.close()

    # ---------------------------------------------------------------- masks, for fine-tuning and checkpoints

    def masks(self) -> dict[str, Tensor]:
        """Keep-masks in ONNX layout, by tensor name."""
        return {v.target.name: v.to_onnx(k).reshape(v.param.shape) for v, k in zip(self.views, self.keep)}

    def restore_masks(self, masks: dict[str, Tensor]) -> None:
        self.keep = [v.to_canonical(masks[v.target.name].reshape(-1).to(v.param.device)) for v in self.views]

    def arrays(self) -> dict[str, np.ndarray]:
        return {v.target.name: v.param.detach().cpu().numpy() for v in self.views}

    # ---------------------------------------------------------------- one step

    def step(self, sparsity: float, label: str, *, last: bool) -> StepRecord:
        """Prune to `sparsity` with fresh statistics at the current weights (one recomputation);
        `last`: the schedule's final step (where an N:M pattern is complete)."""
        return self.apply(self.score(label), sparsity, last=last)

    def score(self, label: str) -> Scored:
        """Statistics and saliencies at the current weights and masks. One `Scored` serves any
        number of `apply` calls from these same weights (a sweep over sparsities)."""
        number = len(self.records) + 1
        scored = Scored(number, label, self.sources(number) if self.sources is not None else None, list(self.keep))
        if self.estimator.needs_output_gradients:
            started = time.perf_counter()
            names = [v.target.name for v in self.views]
            source = activation_source(scored.source)
            if source.loss is None:
                raise TypeError(f"{self.estimator.name} needs output gradients; its source has no loss")
            self.estimator.set_sensitivity(source.output_sensitivity(names, source.loss))
            scored.timer["gradients"] += time.perf_counter() - started
        # sequential estimators collect their statistics again, layer by layer, for the update
        keep_for_update = not self.estimator.sequential or self.allocator.reads_statistics
        for g, group in enumerate(self.groups, 1):
            stats = self._statistics(group, self.keep, scored.source, scored.timer, label, g)
            scored.collections += bool(self.estimator.needs_gradients or self.estimator.needs_activations)
            started = time.perf_counter()
            for i in self._tracked(group, f"scores, {label}", g):
                s = self.estimator.scores(self.views[i].read(), stats[i])
                # float32 scores stay float32 (the order is the same; half the memory of a large model)
                s = s if s.dtype in (torch.float32, torch.float64) else s.to(torch.float64)
                if not bool(torch.isfinite(s).all()):
                    raise NonFiniteError(
                        f"{self.estimator.name} scores of {self.views[i].target.name!r} contain NaN or "
                        "infinite values; nothing was written"
                    )
                # already-pruned entries sort below every saliency (all are >= 0)
                scored.scores[i] = torch.where(self.keep[i], s, -1.0)
                if self.channels is not None:
                    self._score_classes(scored, i, stats[i])
                if (self.plan is None or self.plan.keep_statistics) and keep_for_update:
                    scored.stats[i] = stats[i]
                    if self._spill is not None and self.estimator.spills:
                        cast(SpillableStatistics, stats[i]).spill(self._spill)
            scored.timer["estimator"] += time.perf_counter() - started
            del stats
        return scored

    def _score_classes(self, scored: Scored, i: int, stats: Statistics | None) -> None:
        """Tensor i's saliency of each class of channels removed as a whole (entries pruned
        before are fixed at zero and left out), where the estimator scores groups."""
        if i not in self._class_entries:
            self._class_entries[i] = class_entries(cast(ChannelGraph, self.channels), self.views[i])
        entries = self._class_entries[i]
        keep = self.keep[i].cpu()
        groups = [index[keep[index]] for index in entries.values()]
        values = self.estimator.group_scores(self.views[i].read(), stats, groups)
        if values is not None:
            scored.groups[i] = dict(zip(entries, values.tolist()))

    def apply(self, scored: Scored, sparsity: float, *, last: bool) -> StepRecord:
        """Select the masks for `sparsity` from `scored` and compensate the survivors; `last`:
        the schedule's final step (where an N:M pattern is complete)."""
        timer = dict(scored.timer)
        collections = scored.collections
        pattern = (self.pattern.n, self.pattern.m) if self.pattern is not None and last else None
        if self.pattern is not None:
            chosen = self.pattern.masks(self, scored, sparsity, timer, last)
        else:
            chosen = self.allocator.masks(self, scored, sparsity, timer)
        previous = scored.keep  # the masks the statistics were collected with
        self.keep = [chosen[i].to(previous[i].device) & previous[i] for i in range(len(self.views))]

        def forced(i: int) -> Tensor:
            """Entries the estimator must prune: those pruned before, or, at a step below an N:M
            pattern's sparsity, the whole selected mask (an estimator picking its own mask could
            otherwise leave a group with more pruned entries than the pattern allows)."""
            whole = self.structured or (self.pattern is not None and pattern is None)
            return ~self.keep[i] if whole else ~previous[i]

        if self.estimator.sequential:
            collections += self._apply_in_network_order(scored, forced, pattern, timer)
            record = StepRecord(scored.number, sparsity, timer["gradients"], timer["estimator"], collections)
            self.records.append(record)
            return record

        updates: dict[int, Tensor] = {}
        self.updates = {}
        recollect = self.estimator.compensates and self.plan is not None and not self.plan.keep_statistics
        for g, group in enumerate(self.groups, 1):
            if recollect:
                # the same rows as for the scores: the update needs how the newly pruned weights
                # correlate with the kept ones
                label = f"{scored.label} (again, for the update)"
                stats = self._statistics(group, previous, scored.source, timer, label, g)
                collections += 1
            else:
                stats = {i: scored.stats.get(i) for i in group}
            started = time.perf_counter()
            for i in self._tracked(group, f"updates, {scored.label}", g):
                new = self._prune_tensor(i, stats[i], forced(i), pattern, previous[i])
                if self.keep_updates and self.updates_at_once:
                    self.updates[i] = new - torch.where(self.keep[i], self.views[i].read(), 0.0)
                if recollect:
                    updates[i] = new
                else:
                    self.views[i].write(new)  # at once: a large model never holds two copies of all
            timer["estimator"] += time.perf_counter() - started
        # written only now: a group whose statistics are collected again must see the weights its
        # scores were computed at
        for i, new in updates.items():
            self.views[i].write(new)
        record = StepRecord(scored.number, sparsity, timer["gradients"], timer["estimator"], collections)
        self.records.append(record)
        return record

    @property
    def updates_at_once(self) -> bool:
        """Whether a step updates the survivors of every tensor at once from statistics taken
        before it (an OBS update that can be scaled afterwards): not for layer-by-layer estimators,
        whose later layers are fitted to the earlier ones' updates, nor for whole channels."""
        return self.estimator.compensates and not self.estimator.sequential and not self.structured

    def _prune_tensor(
        self, i: int, stats: Statistics | None, forced: Tensor, pattern: tuple[int, int] | None, previous: Tensor
    ) -> Tensor:
        """Tensor i's new canonical values from the estimator (pruned entries exactly zero); its
        keep-mask becomes the estimator's, within `previous`."""
        new, keep = self.estimator.prune(self.views[i].read(), self.keep[i], stats, forced, pattern)
        if not bool(torch.isfinite(new).all()):
            raise NonFiniteError(
                f"{self.estimator.name} update of {self.views[i].target.name!r} produced NaN or "
                "infinite values; nothing was written"
            )
        self.keep[i] = keep.to(previous.device) & previous
        return torch.where(self.keep[i], new.float(), 0.0)

    def _apply_in_network_order(
        self,
        scored: Scored,
        forced: Callable[[int], Tensor],
        pattern: tuple[int, int] | None,
        timer: dict[str, float],
    ) -> int:
        """Prune tensor by tensor in network order, each with statistics taken after every tensor
        before it was pruned and updated (the estimator may pick its own mask at the selected
        counts); returns the number of collections."""
        index = {view.target.name: i for i, view in enumerate(self.views)}
        passes = activation_source(scored.source).sequence(list(index))
        for number, names in enumerate(passes, 1):
            group = [index[name] for name in names]
            label = f"{scored.label}, layer by layer"
            stats = self._statistics(group, self.keep, scored.source, timer, label, number, len(passes))
            started = time.perf_counter()
            for i in group:
                self.views[i].write(self._prune_tensor(i, stats[i], forced(i), pattern, scored.keep[i]))
            timer["estimator"] += time.perf_counter() - started
        return len(passes)

    def restore(self, values: dict[str, Tensor], keep: Sequence[Tensor], records: int) -> None:
        """Put back weights, masks and the step count saved before an `apply` (to apply again)."""
        for view in self.views:
            view.param.data.copy_(values[view.target.name])
        self.keep = list(keep)
        del self.records[records:]

    def _tracked(self, group: Sequence[int], label: str, number: int):
        """The group's tensors, counted on the progress display."""
        suffix = f", group {number}/{len(self.groups)}" if len(self.groups) > 1 else ""
        with self.progress.task(f"{label}{suffix}", len(group), "tensors") as task:
            for i in group:
                yield i
                task.advance()

    def _statistics(
        self,
        group: Sequence[int],
        keep: Sequence[Tensor],
        source: Source,
        timer: dict[str, float],
        label: str,
        number: int,
        total: int | None = None,
    ) -> dict[int, Statistics | None]:
        """Statistics for the tensors of `group`, from freshly collected (masked) gradients or
        the layers' calibration inputs."""
        views, estimator = self.views, self.estimator
        stats = {i: estimator.statistics(views[i].target.name, views[i].shape) for i in group}
        total = len(self.groups) if total is None else total
        suffix = f", group {number}/{total}" if total > 1 else ""
        if estimator.needs_activations:
            inputs = activation_source(source)
            started = time.perf_counter()
            with self.progress.task(f"layer inputs, {label}{suffix}", inputs.count, "samples") as task:
                chosen = cast(dict[str, InputStatistics], {views[i].target.name: stats[i] for i in group})
                inputs.collect(chosen, progress=task.advance)
            timer["gradients"] += time.perf_counter() - started
        elif estimator.needs_gradients:
            self._gradients(group, keep, stats, gradient_source(source), timer, f"gradients, {label}{suffix}")
        return stats

    def _gradients(
        self,
        group: Sequence[int],
        keep: Sequence[Tensor],
        stats: dict[int, Statistics | None],
        source: GradientSource,
        timer: dict[str, float],
        label: str,
    ) -> None:
        """Feed the group's statistics with masked gradient rows (streamed one by one, or all
        collected first); the time the statistics take is the estimator's, not the gradients'."""
        views, estimator = self.views, self.estimator
        index = {views[i].target.name: i for i in group}
        masks = {name: views[i].to_onnx(keep[i]) for name, i in index.items()}

        def add(rows: dict[str, Tensor]) -> None:
            begun = time.perf_counter()
            for name in list(rows):
                row = rows.pop(name)  # the ONNX-layout rows go as soon as they are taken in
                if not bool(torch.isfinite(row).all()):
                    raise NonFiniteError(f"gradients of {name!r} contain NaN or infinite values; nothing was written")
                i = index[name]
                target = stats[i]
                if target is not None:
                    target.update(views[i].to_canonical(row), keep=keep[i])
            timer["estimator"] += time.perf_counter() - begun

        started, before = time.perf_counter(), timer["estimator"]
        # counted in samples: each gradient row averages a micro-batch of them
        with self.progress.task(label, source.count * source.micro_batch, "samples") as task:

            def advance(rows: int) -> None:
                task.advance(rows * source.micro_batch)

            if estimator.streams_gradients:
                source.stream(list(index), lambda k, grads: add({n: g[None] for n, g in grads.items()}), masks, advance)
            else:
                rows = source.collect(list(index), masks, progress=advance)
        timer["gradients"] += time.perf_counter() - started - (timer["estimator"] - before)
        if not estimator.streams_gradients:
            add(rows)


def prune_oneshot(
    model: TorchModel,
    targets: Sequence[PrunableTensor],
    estimator: Estimator,
    sparsity: float,
    steps: int,
    allocation: str,
    source: GradientSource | Callable[[int], GradientSource | ActivationSource] | None,
    budget: int,
    progress: Progress,
    spill_folder: Path | None = None,
) -> OneShotResult:
    """Prune `targets` of `model` in place to `sparsity` in `steps` recomputation steps (cubic
    spacing); returns the new values. `source` is one gradient source for every step, or a
    function of the step number giving one."""
    sources = source if callable(source) or source is None else (lambda step: source)
    with Pruner(model, targets, estimator, allocation, sources, budget, progress, spill_folder) as pruner:
        for step, step_sparsity in enumerate(oneshot_targets(sparsity, steps), 1):
            pruner.step(step_sparsity, f"step {step}/{steps}", last=step == steps)
        return OneShotResult(arrays=pruner.arrays(), steps=pruner.records, plan=pruner.plan)


def plan_statistics(
    views: Sequence[TensorView], estimator: Estimator, count: int, budget: int, disk_free: int
) -> MemoryPlan:
    needs = [estimator.memory(v.shape, count) for v in views]
    try:
        return plan_memory(needs, budget, estimator.compensates, disk_free)
    except DoesNotFit as failure:
        view = views[failure.index]
        raise MemoryBudgetError(
            f"{estimator.name} needs about {human(failure.need)} for tensor {view.target.name!r} "
            f"({view.numel:,} weights, {count} gradients), more than the {human(budget)} allowed "
            f"(--max-memory); {_suggestion(estimator, view.shape, count, budget)}"
        ) from None


def _suggestion(estimator: Estimator, shape: tuple[int, int], count: int, budget: int) -> str:
    if "block_size" in estimator.reads:  # WoodFisher, SparseGPT: try smaller blocks
        blocked: Any = estimator
        size = blocked.block_size
        original = size
        while size > 8:
            size //= 2
            blocked.block_size = size
            fits = estimator.memory(shape, count).alone <= budget
            blocked.block_size = original
            if fits:
                return f"try --block-size {size}"
    for fewer in (count // 2, count // 4, count // 8):
        if fewer >= 8 and estimator.memory(shape, fewer).alone <= budget:
            return f"try --num-grads {fewer}"
    return "raise --max-memory or exclude the largest tensors with --exclude"
