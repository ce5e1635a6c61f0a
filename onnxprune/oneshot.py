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
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .bridge.bindings import PrunableTensor
from .bridge.convert import TorchModel
from .errors import MemoryBudgetError, NonFiniteError
from .estimators.base import Estimator, Statistics
from .gradients import GradientSource
from .masks import SCOPES
from .memory import DoesNotFit, MemoryPlan, human, plan_memory
from .progress import Progress
from .schedule import oneshot_targets


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
    source: GradientSource | None
    keep: list[Tensor]  # the masks the statistics were collected with
    scores: dict[int, Tensor] = field(default_factory=dict)
    stats: dict[int, Statistics | None] = field(default_factory=dict)
    timer: dict[str, float] = field(default_factory=lambda: {"gradients": 0.0, "estimator": 0.0})
    collections: int = 0


class TensorView:
    """A model weight seen flat in canonical order."""

    def __init__(self, target: PrunableTensor, param: Tensor):
        self.target, self.param = target, param
        order = target.canonical_order()
        self.order = None if order is None else torch.from_numpy(order).to(param.device)
        self.inverse = None if self.order is None else torch.argsort(self.order)
        self.numel = param.numel()
        self.shape = target.matrix_shape()

    def to_canonical(self, flat: Tensor) -> Tensor:
        """ONNX-flat → canonical (works on [..., numel] rows too)."""
        return flat if self.order is None else flat[..., self.order]

    def to_onnx(self, flat: Tensor) -> Tensor:
        return flat if self.inverse is None else flat[..., self.inverse]

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
        scope: str,
        sources: Callable[[int], GradientSource] | None,
        budget: int,
        progress: Progress,
        spill_folder: Path | None = None,
    ):
        self.estimator, self.scope, self.sources, self.progress = estimator, scope, sources, progress
        self.views = [TensorView(t, model.tensors[t.name]) for t in targets]
        self.keep = [torch.ones(v.numel, dtype=torch.bool, device=v.param.device) for v in self.views]
        self.records: list[StepRecord] = []
        self.plan: MemoryPlan | None = None
        self._cleanup = ExitStack()
        self._spill: Path | None = None
        if estimator.needs_gradients:
            if sources is None:
                raise ValueError(f"{estimator.name} needs gradients")
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

    def step(self, sparsity: float, label: str) -> StepRecord:
        """Prune to `sparsity` with fresh statistics at the current weights (one recomputation)."""
        return self.apply(self.score(label), sparsity)

    def score(self, label: str) -> Scored:
        """Statistics and saliencies at the current weights and masks. One `Scored` serves any
        number of `apply` calls from these same weights (a sweep over sparsities)."""
        number = len(self.records) + 1
        scored = Scored(number, label, self.sources(number) if self.sources is not None else None, list(self.keep))
        for g, group in enumerate(self.groups, 1):
            stats = self._statistics(group, self.keep, scored.source, scored.timer, label, g)
            scored.collections += bool(self.estimator.needs_gradients)
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
                scored.scores[i] = torch.where(self.keep[i], s, torch.full_like(s, -1.0))
                if self.plan is None or self.plan.keep_statistics:
                    scored.stats[i] = stats[i]
                    if self._spill is not None and hasattr(stats[i], "spill"):
                        stats[i].spill(self._spill)
            scored.timer["estimator"] += time.perf_counter() - started
            del stats
        return scored

    def apply(self, scored: Scored, sparsity: float) -> StepRecord:
        """Select the masks for `sparsity` from `scored` and compensate the survivors."""
        timer = dict(scored.timer)
        collections = scored.collections
        chosen = SCOPES[self.scope](scored.scores, sparsity)
        previous = scored.keep  # the masks the statistics were collected with
        self.keep = [chosen[i].to(previous[i].device) & previous[i] for i in range(len(self.views))]

        updates: dict[int, Tensor] = {}
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
                new = self.estimator.compensate(self.views[i].read(), self.keep[i], stats[i])
                if not bool(torch.isfinite(new).all()):
                    raise NonFiniteError(
                        f"{self.estimator.name} update of {self.views[i].target.name!r} produced NaN or "
                        "infinite values; nothing was written"
                    )
                new = torch.where(self.keep[i], new.float(), torch.zeros_like(new.float()))
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

    def restore(self, values: dict[str, Tensor], keep: Sequence[Tensor], records: int) -> None:
        """Put back weights, masks and the step count saved before an `apply` (to apply again)."""
        for view in self.views:
            view.param.data.copy_(values[view.target.name])
        self.keep = list(keep)
        del self.records[records:]

    def _tracked(self, group: Sequence[int], label: str, number: int):
        """The group's tensors, counted on the progress display."""
        suffix = f", group {number}/{len(self.groups)}" if len(self.groups) > 1 else ""
        with self.progress.task(f"{label}{suffix} (tensors)", len(group)) as task:
            for i in group:
                yield i
                task.advance()

    def _statistics(
        self,
        group: Sequence[int],
        keep: Sequence[Tensor],
        source: GradientSource | None,
        timer: dict[str, float],
        label: str,
        number: int,
    ) -> dict[int, Statistics | None]:
        """Statistics for the tensors of `group`, from freshly collected (masked) gradients."""
        views, estimator = self.views, self.estimator
        stats = {i: estimator.statistics(views[i].target.name, views[i].shape) for i in group}
        if not estimator.needs_gradients:
            return stats
        names = [views[i].target.name for i in group]
        masks = {views[i].target.name: views[i].to_onnx(keep[i]) for i in group}
        suffix = f", group {number}/{len(self.groups)}" if len(self.groups) > 1 else ""
        started = time.perf_counter()
        with self.progress.task(f"gradients, {label}{suffix}", source.count) as task:
            rows = source.collect(names, masks, progress=task.advance)
        timer["gradients"] += time.perf_counter() - started
        started = time.perf_counter()
        for i in group:
            name = views[i].target.name
            if not bool(torch.isfinite(rows[name]).all()):
                raise NonFiniteError(f"gradients of {name!r} contain NaN or infinite values; nothing was written")
            stats[i].update(views[i].to_canonical(rows.pop(name)), keep=keep[i])
        timer["estimator"] += time.perf_counter() - started
        return stats


def prune_oneshot(
    model: TorchModel,
    targets: Sequence[PrunableTensor],
    estimator: Estimator,
    sparsity: float,
    steps: int,
    scope: str,
    source: GradientSource | Callable[[int], GradientSource] | None,
    budget: int,
    progress: Progress,
    spill_folder: Path | None = None,
) -> OneShotResult:
    """Prune `targets` of `model` in place to `sparsity` in `steps` recomputation steps (cubic
    spacing); returns the new values. `source` is one gradient source for every step, or a
    function of the step number giving one."""
    sources = source if callable(source) or source is None else (lambda step: source)
    with Pruner(model, targets, estimator, scope, sources, budget, progress, spill_folder) as pruner:
        for step, step_sparsity in enumerate(oneshot_targets(sparsity, steps), 1):
            pruner.step(step_sparsity, f"step {step}/{steps}")
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
    size = getattr(estimator, "block_size", None)
    if size:
        original = size
        while size > 8:
            size //= 2
            estimator.block_size = size
            fits = estimator.memory(shape, count).peak <= budget
            estimator.block_size = original
            if fits:
                return f"try --block-size {size}"
    for fewer in (count // 2, count // 4, count // 8):
        if fewer >= 8 and estimator.memory(shape, fewer).peak <= budget:
            return f"try --num-grads {fewer}"
    return "raise --max-memory or exclude the largest tensors with --exclude"
