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
from typing import Sequence

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


class TensorView:
    """A model weight seen flat in canonical order."""

    def __init__(self, target: PrunableTensor, param: Tensor):
        self.target, self.param = target, param
        order = target.canonical_order()
        self.order = None if order is None else torch.from_numpy(order).to(param.device)
        self.inverse = None if self.order is None else torch.argsort(self.order)
        self.numel = param.numel()

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


def prune_oneshot(
    model: TorchModel,
    targets: Sequence[PrunableTensor],
    estimator: Estimator,
    sparsity: float,
    steps: int,
    scope: str,
    source: GradientSource | None,
    budget: int,
    progress: Progress,
    spill_folder: Path | None = None,
) -> OneShotResult:
    """Prune `targets` of `model` in place to `sparsity` in `steps` steps; returns the new values.
    Statistics that do not fit in memory may be spilled to a temporary folder in `spill_folder`."""
    with ExitStack() as cleanup:
        return _prune(
            model, targets, estimator, sparsity, steps, scope, source, budget, progress, spill_folder, cleanup
        )


def _prune(model, targets, estimator, sparsity, steps, scope, source, budget, progress, spill_folder, cleanup):
    views = [TensorView(t, model.tensors[t.name]) for t in targets]
    keep = [torch.ones(v.numel, dtype=torch.bool, device=v.param.device) for v in views]
    plan = None
    if estimator.needs_gradients:
        if source is None:
            raise ValueError(f"{estimator.name} needs gradients")
        disk_free = shutil.disk_usage(spill_folder).free if spill_folder is not None else 0
        plan = _plan(views, estimator, source.count, budget, disk_free)
    spill = None
    if plan is not None and plan.storage == "disk":
        spill = Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix=".onnxprune-statistics-", dir=spill_folder))
        )
    groups = plan.groups if plan else (tuple(range(len(views))),)
    result = OneShotResult(arrays={}, plan=plan)

    for step, step_sparsity in enumerate(oneshot_targets(sparsity, steps), 1):
        timer = {"gradients": 0.0, "estimator": 0.0}
        collections = 0
        kept_stats: dict[int, Statistics | None] = {}
        scores: dict[int, Tensor] = {}
        for number, group in enumerate(groups, 1):
            stats = _statistics(
                views, group, keep, estimator, source, timer, progress, f"{step}/{steps}", number, len(groups)
            )
            collections += bool(estimator.needs_gradients)
            started = time.perf_counter()
            for i in _tracked(group, progress, f"scores, step {step}/{steps}", number, len(groups)):
                s = estimator.scores(views[i].read(), stats[i]).to(torch.float64)
                if not bool(torch.isfinite(s).all()):
                    raise NonFiniteError(
                        f"{estimator.name} scores of {views[i].target.name!r} contain NaN or "
                        "infinite values; nothing was written"
                    )
                # already-pruned entries sort below every saliency (all are >= 0)
                scores[i] = torch.where(keep[i], s, torch.full_like(s, -1.0))
                if plan is None or plan.keep_statistics:
                    kept_stats[i] = stats[i]
                    if spill is not None and hasattr(stats[i], "spill"):
                        stats[i].spill(spill)
            timer["estimator"] += time.perf_counter() - started
            del stats

        chosen = SCOPES[scope](scores, step_sparsity)
        previous = keep  # the masks the statistics were collected with
        keep = [chosen[i].to(keep[i].device) & keep[i] for i in range(len(views))]

        updates: dict[int, Tensor] = {}
        for number, group in enumerate(groups, 1):
            if estimator.compensates and plan is not None and not plan.keep_statistics:
                # the same rows as for the scores: the update needs how the newly pruned weights
                # correlate with the kept ones
                stats = _statistics(
                    views,
                    group,
                    previous,
                    estimator,
                    source,
                    timer,
                    progress,
                    f"{step}/{steps} (again, for the update)",
                    number,
                    len(groups),
                )
                collections += 1
            else:
                stats = {i: kept_stats.get(i) for i in group}
            started = time.perf_counter()
            for i in _tracked(group, progress, f"updates, step {step}/{steps}", number, len(groups)):
                new = estimator.compensate(views[i].read(), keep[i], stats[i])
                if not bool(torch.isfinite(new).all()):
                    raise NonFiniteError(
                        f"{estimator.name} update of {views[i].target.name!r} produced NaN or "
                        "infinite values; nothing was written"
                    )
                updates[i] = torch.where(keep[i], new.float(), torch.zeros_like(new.float()))
            timer["estimator"] += time.perf_counter() - started
        # written only now: a group whose statistics are collected again must see the weights
        # its scores were computed at
        for i, new in updates.items():
            views[i].write(new)
        result.steps.append(StepRecord(step, step_sparsity, timer["gradients"], timer["estimator"], collections))

    result.arrays = {v.target.name: v.param.detach().cpu().numpy() for v in views}
    return result


def _tracked(group: Sequence[int], progress: Progress, label: str, number: int, groups: int):
    """The group's tensors, counted on the progress display."""
    with progress.task(label + (f", group {number}/{groups}" if groups > 1 else "") + " (tensors)", len(group)) as task:
        for i in group:
            yield i
            task.advance()


def _plan(views: Sequence[TensorView], estimator: Estimator, count: int, budget: int, disk_free: int) -> MemoryPlan:
    needs = [estimator.memory(v.numel, count) for v in views]
    try:
        return plan_memory(needs, budget, estimator.compensates, disk_free)
    except DoesNotFit as failure:
        view = views[failure.index]
        raise MemoryBudgetError(
            f"{estimator.name} needs about {human(failure.need)} for tensor {view.target.name!r} "
            f"({view.numel:,} weights, {count} gradients), more than the {human(budget)} allowed "
            f"(--max-memory); {_suggestion(estimator, view.numel, count, budget)}"
        ) from None


def _suggestion(estimator: Estimator, numel: int, count: int, budget: int) -> str:
    size = getattr(estimator, "block_size", None)
    if size:
        original = size
        while size > 8:
            size //= 2
            estimator.block_size = size
            fits = estimator.memory(numel, count).peak <= budget
            estimator.block_size = original
            if fits:
                return f"try --block-size {size}"
    for fewer in (count // 2, count // 4, count // 8):
        if fewer >= 8 and estimator.memory(numel, fewer).peak <= budget:
            return f"try --num-grads {fewer}"
    return "raise --max-memory or exclude the largest tensors with --exclude"


def _statistics(
    views: Sequence[TensorView],
    group: Sequence[int],
    keep: Sequence[Tensor],
    estimator: Estimator,
    source: GradientSource | None,
    timer: dict[str, float],
    progress: Progress,
    step_label: str,
    number: int,
    groups: int,
) -> dict[int, Statistics | None]:
    """Statistics for the tensors of `group`, from freshly collected (masked) gradients."""
    stats = {i: estimator.statistics(views[i].numel) for i in group}
    if not estimator.needs_gradients:
        return stats
    names = [views[i].target.name for i in group]
    masks = {views[i].target.name: views[i].to_onnx(keep[i]) for i in group}
    label = f"gradients, step {step_label}" + (f", group {number}/{groups}" if groups > 1 else "")
    started = time.perf_counter()
    with progress.task(label, source.count) as task:
        rows = source.collect(names, masks, progress=task.advance)
    timer["gradients"] += time.perf_counter() - started
    started = time.perf_counter()
    for i in group:
        name = views[i].target.name
        if not bool(torch.isfinite(rows[name]).all()):
            raise NonFiniteError(f"gradients of {name!r} contain NaN or infinite values; nothing was written")
        stats[i].update(views[i].to_canonical(rows.pop(name)))
    timer["estimator"] += time.perf_counter() - started
    return stats
