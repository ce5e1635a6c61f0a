"""One-shot pruning with recomputations: reach the target sparsity in R steps, each step
collecting fresh gradients at the current (pruned, compensated) weights with pruned coordinates
masked, scoring every weight, selecting the masks, and compensating the survivors.

Weights are handled flat in their canonical order (see PrunableTensor.canonical_order); the
memory plan decides which tensors are processed together.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence, cast

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .activations import ActivationSource, InputStatistics
from .allocators import ALLOCATORS, PatternConstraint
from .bridge.bindings import PrunableTensor
from .bridge.convert import TorchModel
from .errors import NonFiniteError
from .estimators.base import Estimator, SpillableStatistics, Statistics
from .gradients import GradientSource
from .memory import MemoryPlan, human, resident_bytes
from .progress import Progress
from .reuse import ScoreCache, reuse_key
from .schedule import oneshot_targets
from .structure import ChannelGraph
from .structure.constraint import ChannelConstraint, class_entries
from .structure.latency import LatencyTable
from .tensor_split import split_for
from .views import (  # noqa: F401  (re-exported: the pruner's pieces)
    OneShotResult,
    Scored,
    Source,
    StepRecord,
    TensorView,
    activation_source,
    gradient_source,
    plan_statistics,
)

log = logging.getLogger("onnxprune")


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
        cache: ScoreCache | None = None,
        reuse: str = "take",
    ):
        self.estimator, self.sources, self.progress = estimator, sources, progress
        # the first step's statistics, shared with the searches' trials (reuse.py): a trial
        # offers them ("offer": reads or fills the cache), the run takes them ("take")
        self.cache, self.reuse = cache, reuse
        # whole channels: the allocation splits classes of channels, and the estimator updates
        # the survivors of exactly the masks chosen (it picks no entries of its own)
        self.structured = channels is not None
        self.channels = channels
        self._class_entries: dict[int, dict[int, Tensor]] = {}  # per view: the graph does not change
        self.allocation = allocation
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
        self.split = split_for(self)  # under torchrun: the tensors this rank computes
        if estimator.needs_gradients and sources is not None:
            self._plan_memory(sources(0).count, budget, spill_folder)
        self.groups = self.plan.groups if self.plan else (tuple(range(len(self.views))),)

    def _plan_memory(self, count: int, budget: int, spill_folder: Path | None) -> None:
        """The statistics' memory plan (and the spill folder, when it says disk)."""
        disk_free = shutil.disk_usage(spill_folder).free if spill_folder is not None else 0
        owners = self.split.owners  # under the split each rank builds only its own tensors' statistics
        plan = self.plan = plan_statistics(self.views, self.estimator, count, budget, disk_free, owners)
        log.debug(
            "memory: statistics %s planned (%d group(s), %s), %s resident before them",
            human(plan.estimate),
            len(plan.groups),
            plan.storage,
            human(resident_bytes()),
        )
        if plan.storage == "disk":
            folder = tempfile.TemporaryDirectory(prefix=".onnxprune-statistics-", dir=spill_folder)
            self._spill = Path(self._cleanup.enter_context(folder))

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup.close()

    def masks(self) -> dict[str, Tensor]:
        """Keep-masks in ONNX layout, by tensor name."""
        return {v.target.name: v.to_onnx(k).reshape(v.param.shape) for v, k in zip(self.views, self.keep)}

    def restore_masks(self, masks: dict[str, Tensor]) -> None:
        self.keep = [v.to_canonical(masks[v.target.name].reshape(-1).to(v.param.device)) for v in self.views]

    def arrays(self) -> dict[str, np.ndarray]:
        """The pruned tensors' values in ONNX layout. On the CPU these share memory with the
        parameters (no copy of a large model), on a GPU they are copies: take them after the last
        change to the weights."""
        return {v.target.name: v.param.detach().cpu().numpy() for v in self.views}

    def step(self, sparsity: float, label: str, *, last: bool) -> StepRecord:
        """Prune to `sparsity` with fresh statistics at the current weights (one recomputation);
        `last`: the schedule's final step (where an N:M pattern is complete)."""
        return self.apply(self.score(label, select_at=sparsity), sparsity, last=last)

    def score(self, label: str, select_at: float | None = None) -> Scored:
        """Statistics and saliencies at the current weights and masks. One `Scored` serves any
        number of `apply` calls from these same weights (a sweep over sparsities); with
        `select_at`, one `apply` at that sparsity, and where the allocation chooses each
        tensor's mask from its own scores, they are chosen as the tensors are scored and the
        scores dropped."""
        number = len(self.records) + 1
        source = self.sources(number) if self.sources is not None else None
        key = self._reuse_key(number, source)
        shared = None
        if self.cache is not None:
            shared = self.cache.get(key) if self.reuse == "offer" else self.cache.take(key)
        if shared is not None:
            return replace(shared, number=number, label=label, source=source, keep=list(self.keep))
        if self.cache is not None:
            self.cache.clear()  # one set of statistics at a time: the old entry goes before the new is built
        scored = Scored(number, label, source, list(self.keep))
        if select_at is not None and self.reuse != "offer" and self.pattern is None and not self.structured:
            scored.selected_at = select_at
        scored = self._score(scored)
        if self.reuse == "offer" and self.cache is not None and key is not None:
            scored.shared = key
            self.cache.put(key, scored)
        return scored

    def _reuse_key(self, number: int, source: Source) -> str | None:
        """The cache key of this step's statistics: only at the first step, before anything is
        pruned, with statistics kept in memory (not spilled to a folder this pruner removes)."""
        if self.cache is None or number != 1 or not all(bool(k.all()) for k in self.keep):
            return None
        if self.plan is not None and self.plan.storage == "disk":
            return None
        return reuse_key(self.estimator, source, [v.target.name for v in self.views])

    def _score(self, scored: Scored) -> Scored:
        label = scored.label
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
                s = torch.where(self.keep[i], s, -1.0)
                mask = None if scored.selected_at is None else self.allocator.tensor_mask(s, scored.selected_at)
                if mask is None:
                    scored.scores[i] = s
                else:
                    scored.selected[i] = mask
                del s
                if self.channels is not None:
                    self._score_classes(scored, i, stats[i])
                if (self.plan is None or self.plan.keep_statistics) and keep_for_update:
                    scored.stats[i] = stats[i]
                    if self._spill is not None and self.estimator.spills:
                        cast(SpillableStatistics, stats[i]).spill(self._spill)
            scored.timer["estimator"] += time.perf_counter() - started
            del stats
        self.split.gather_scores(scored)
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
        outcome = self._applied_key(scored, sparsity, last)
        cache = self.cache if outcome is not None else None
        if cache is not None and outcome in cache.applied:
            record = self._reapply(scored, sparsity, *cache.applied[outcome])
        else:
            record = self._apply(scored, sparsity, last=last)
            if cache is not None and self.reuse == "offer":
                cache.applied[outcome] = ([k.clone() for k in self.keep], [v.read().clone() for v in self.views])
        if cache is not None and self.reuse == "take":
            cache.clear()  # the run has what it needed
        return record

    def _applied_key(self, scored: Scored, sparsity: float, last: bool) -> tuple | None:
        """Where a trial's outcome from shared statistics can stand for this apply: the same
        statistics, allocation and sparsity (masks chosen by entries, no pattern)."""
        if scored.shared is None or self.structured or self.pattern is not None:
            return None
        return (scored.shared, self.allocation, float(sparsity), last)

    def _reapply(self, scored: Scored, sparsity: float, keep: list[Tensor], values: list[Tensor]) -> StepRecord:
        """A trial's masks and compensated weights, written as `_apply` would have."""
        self.keep = [k.clone() for k in keep]
        self.updates = {}
        if self.keep_updates and self.updates_at_once:
            self.updates = {i: self.compensation(i, values[i]) for i in range(len(self.views))}
        for view, value in zip(self.views, values):
            view.write(value.clone())
        timer = scored.timer
        record = StepRecord(scored.number, sparsity, timer["gradients"], timer["estimator"], scored.collections)
        self.records.append(record)
        return record

    def _apply(self, scored: Scored, sparsity: float, *, last: bool) -> StepRecord:
        timer = dict(scored.timer)
        collections = scored.collections
        pattern = (self.pattern.n, self.pattern.m) if self.pattern is not None and last else None
        previous = scored.keep  # the masks the statistics were collected with
        self.keep = self._chosen(scored, sparsity, timer, last)

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
        # statistics shared from a search's trial are all kept, whatever this pruner's plan says
        mine = self.split.own(len(self.views))
        kept = self.split.agreed(bool(scored.stats or not mine) and all(i in scored.stats for i in mine))
        recollect = self.estimator.compensates and self.plan is not None and not self.plan.keep_statistics and not kept
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
                    self.updates[i] = self.compensation(i, new)
                if recollect:
                    updates[i] = new
                else:
                    self.views[i].write(new)  # at once: a large model never holds two copies of all
            timer["estimator"] += time.perf_counter() - started
        # written only now: a group whose statistics are collected again must see the weights its
        # scores were computed at
        for i, new in updates.items():
            self.views[i].write(new)
        self.split.gather_updates(self)
        record = StepRecord(scored.number, sparsity, timer["gradients"], timer["estimator"], collections)
        self.records.append(record)
        return record

    def _chosen(self, scored: Scored, sparsity: float, timer: dict[str, float], last: bool) -> list[Tensor]:
        """The step's keep-masks: the allocation's (or the pattern's, or those chosen while
        scoring) within the masks the statistics were collected with."""
        previous = scored.keep
        if scored.selected and self.pattern is None:
            if scored.selected_at != sparsity:
                raise ValueError(f"the masks were chosen for sparsity {scored.selected_at} while scoring; score again")
            # masks of this step alone: narrowed in place, not copied
            return [scored.selected[i].logical_and_(previous[i]) for i in range(len(self.views))]
        if self.pattern is not None:
            chosen = self.pattern.masks(self, scored, sparsity, timer, last)
        else:
            chosen = self.allocator.masks(self, scored, sparsity, timer)
        return [chosen[i].to(previous[i].device) & previous[i] for i in range(len(self.views))]

    def compensation(self, i: int, new: Tensor) -> Tensor:
        """Tensor i's update to `new`: new minus its current values under its (new) keep-mask."""
        return new - torch.where(self.keep[i], self.views[i].read(), 0.0)

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
        """The group's tensors this rank computes (all but under torchrun's split), counted on the progress display."""
        suffix = f", group {number}/{len(self.groups)}" if len(self.groups) > 1 else ""
        with self.progress.task(f"{label}{suffix}", len(group), "tensors") as task:
            for i in group:
                if self.split.mine(i):
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
        """Statistics for this rank's tensors of `group`, from fresh (masked) gradients or layer inputs."""
        views, estimator = self.views, self.estimator
        stats = {i: estimator.statistics(views[i].target.name, views[i].shape) for i in group if self.split.mine(i)}
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
                target = stats.get(i)  # None: no statistics, or another rank's tensor
                if target is not None:
                    target.update(views[i].to_canonical(row), keep=keep[i])
            timer["estimator"] += time.perf_counter() - begun

        started, before = time.perf_counter(), timer["estimator"]
        # counted in samples: each gradient row averages a micro-batch of them (on a torchrun
        # rank, the rank's own share)
        own = len(distributed.owned(source.count))
        with self.progress.task(label, own * source.micro_batch, "samples") as task:

            def advance(rows: int) -> None:
                task.advance(rows * source.micro_batch)

            if estimator.streams_gradients:
                consume = lambda k, grads: add({n: g[None] for n, g in grads.items()})  # noqa: E731
                source.stream(list(index), consume, masks, advance, self.split.by_name(index))
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
