"""Sweeps: quality against sparsity for several methods, so a user can pick what they can afford.

The model, its data, the onnxruntime reference and the torch conversion are prepared once. For a
one-shot, single-step run without fine-tuning the scores do not depend on the target sparsity,
so each method collects its gradients and builds its statistics once and only the selection and
the weight update are redone per sparsity; other settings rerun the whole schedule per point
from the dense weights.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, distributed
from .config import PruneConfig
from .environment import environment
from .errors import UsageError
from .estimators import ESTIMATORS
from .job import Job, make_pruner, make_repairer, statistics_source
from .oneshot import Pruner
from .onnx_io import atomic_write_bytes
from .pipeline import FinalCheck, final_check, prepare, prune_weights, removed_channels, write_and_validate
from .progress import Progress, progress_enabled
from .report import SCHEMA_VERSION, InputDocument
from .reporting import data_info
from .runtime import reproducible, resolve_device
from .searches import resolve, resolve_automatic, statistics_job

log = logging.getLogger("onnxprune")


@dataclass(frozen=True)
class SweepConfig:
    """A grid of sparsities × methods over one model. `settings` holds every other PruneConfig
    field (data, allocation, estimator settings, ...); its `output` names the folder and file stem of
    what the sweep writes (`<stem>.sweep.json`, `<stem>.sweep.png`, models with `keep_models`)."""

    settings: PruneConfig
    sparsities: tuple[float, ...]
    methods: tuple[str, ...]
    keep_models: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", tuple(sorted({float(s) for s in self.sparsities})))
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        if not self.sparsities or not self.methods:
            raise UsageError("a sweep needs at least one sparsity and one method")
        for s in self.sparsities:
            if not 0.0 <= s < 1.0:
                raise UsageError(f"sparsity must be in [0, 1), got {s}")
        for method in self.methods:
            ESTIMATORS.get(method)  # raises with the valid names

    @property
    def folder(self) -> Path:
        return self.settings.output.parent

    @property
    def stem(self) -> str:
        return self.settings.output.stem

    @property
    def report_path(self) -> Path:
        return self.folder / f"{self.stem}.sweep.json"

    @property
    def plot_path(self) -> Path:
        return self.folder / f"{self.stem}.sweep.png"

    def point(self, method: str, sparsity: float) -> PruneConfig:
        """The PruneConfig of one grid point."""
        output = self.folder / f"{self.stem}.{method}.{sparsity:g}.onnx"
        return replace(
            self.settings, method=method, sparsity=sparsity, output=output, report=None, max_drop=None, resume=False
        )


@dataclass(frozen=True)
class SweepPoint:
    method: str
    target_sparsity: float
    sparsity: float  # zeros / params over the pruned tensors, as written
    metric: str
    before: float
    after: float
    drop: float
    cosine: float  # mean cosine of the headline output against the original
    seconds: float  # pruning time of this point (a reused score counted at its first point)
    model: str | None  # the written model, with keep_models
    allocation: str = "global"  # the split across tensors used (--allocation auto resolved)
    # largest |torch − onnxruntime| of the point's final model where weights changed beyond masks
    torch_vs_onnxruntime_max_abs_error: float | None = None
    speedup: float | None = None  # measured onnxruntime latency of the original / of this point's model


@dataclass(frozen=True)
class MethodRun:
    method: str
    scores_reused: bool  # gradients and statistics computed once for every sparsity
    gradient_seconds: float
    estimator_seconds: float


@dataclass(frozen=True)
class SweepReport(InputDocument):
    """Quality against sparsity for each method, and what each method's scores cost."""

    metric: str
    output: str  # the output the metric is measured on
    methods: tuple[MethodRun, ...]
    points: tuple[SweepPoint, ...]
    plot_path: str | None
    report_path: str
    timings: dict[str, float]
    environment: dict[str, Any] = field(default_factory=dict)
    kind: str = "sweep"
    schema_version: int = SCHEMA_VERSION

    def value(self, method: str, sparsity: float) -> float | None:
        return next((p.after for p in self.points if p.method == method and p.target_sparsity == sparsity), None)


def sweep(config: SweepConfig) -> SweepReport:
    """Prune the model at every sparsity with every method, validate each in onnxruntime, and
    write the sweep's JSON report and plot. Models are kept only with `keep_models`."""
    if distributed.launched():
        raise UsageError("onnxprune sweep does not run under torchrun; run it in one process (prune does)")
    device = resolve_device(config.settings.device)
    with reproducible(device):  # on CUDA: no TF32, deterministic cuDNN
        return _sweep(config, device)


def _sweep(config: SweepConfig, device: torch.device) -> SweepReport:
    base = config.settings
    started = time.perf_counter()
    _check_free(config)
    timings: dict[str, float] = {}
    job = prepare(base, device, timings, methods=config.methods)
    module = job.torch_model.module
    dense = {k: v.detach().clone() for k, v in module.state_dict().items()}
    progress = Progress(progress_enabled(base.progress))
    points: list[SweepPoint] = []
    runs: list[MethodRun] = []
    for method in config.methods:
        log.info("sweep: %s at %s", method, ", ".join(f"{s:g}" for s in config.sparsities))
        torch.manual_seed(base.seed)
        first = config.point(method, config.sparsities[0])
        reusable = first.schedule == "oneshot" and first.steps == 1 and first.finetune_steps == 0
        reusable = reusable and first.batchnorm == "frozen"
        measure = _shared_scores if reusable else _point_by_point
        method_points, run = measure(config, job, method, progress)
        points += method_points
        runs.append(run)
        module.load_state_dict(dense)
    quality = job.headline
    plot = _plot(config, points, quality.metric)
    timings.update(total=round(time.perf_counter() - started, 3))
    report = SweepReport(
        tool_version=__version__,
        config={**base.as_dict(), "sparsities": list(config.sparsities), "methods": list(config.methods)},
        input=job.input_info,
        calibration=data_info(job.calibration),
        evaluation=data_info(job.evaluation),
        metric=quality.metric,
        output=job.torch_model.output_names[quality.output],
        methods=tuple(runs),
        points=tuple(points),
        plot_path=str(plot) if plot else None,
        report_path=str(config.report_path),
        timings={k: round(v, 4) for k, v in timings.items()},
        environment=environment(),
    )
    atomic_write_bytes(config.report_path, report.to_json().encode())
    return report


def _shared_scores(
    config: SweepConfig, job: Job, method: str, progress: Progress
) -> tuple[list[SweepPoint], MethodRun]:
    """One shot, one step, no fine-tuning: the scores do not depend on the sparsity, so the
    statistics are collected and scored once and only the selection, the update and the repair
    are redone at each sparsity, from the same weights."""
    first = config.point(method, config.sparsities[0])
    # one damping for every sparsity (the scores are shared): chosen at the highest, where it
    # matters most, so that point equals a separate run at that sparsity
    resolved = resolve_automatic(replace(first, sparsity=max(config.sparsities)), job)
    chosen = resolved.config
    first = replace(first, damp=chosen.damp, allocation=chosen.allocation, mix=chosen.mix)
    estimator = ESTIMATORS.get(method)(first)
    source = statistics_source(first, statistics_job(first, job, resolved.searched), estimator)
    points = []
    with make_pruner(first, job, estimator, source, progress) as pruner:
        repairer = make_repairer(first, job, pruner, progress)
        tick = time.perf_counter()
        scored = pruner.score(f"{method}, all sparsities")
        shared = time.perf_counter() - tick
        keep = list(pruner.keep)
        values = {v.target.name: v.param.detach().clone() for v in pruner.views}
        try:
            for index, sparsity in enumerate(config.sparsities):
                pruner.restore(values, keep, 0)
                tick = time.perf_counter()
                pruner.apply(scored, sparsity, last=True)  # one step to each sparsity
                added, final = [], None
                if repairer is not None:
                    repairer.reset()
                    repairer.after_step("step 1/1", keep)
                    if repairer.corrections.values:
                        final = final_check(first, job)
                arrays = pruner.arrays()  # after the repair, which changes the weights
                if repairer is not None:
                    added = repairer.fold(arrays)
                if job.channels is not None:  # the smaller graph is checked against the torch model
                    final = final_check(first, job)
                seconds = time.perf_counter() - tick + (shared if index == 0 else 0.0)
                removed = removed_channels(job, pruner)
                points.append(
                    _evaluate(config, job, method, sparsity, arrays, seconds, first.allocation, added, final, removed)
                )
        finally:
            if repairer is not None:
                repairer.close()
        run = MethodRun(method, True, round(scored.timer["gradients"], 3), _estimator_seconds(pruner))
    return points, run


def _point_by_point(
    config: SweepConfig, job: Job, method: str, progress: Progress
) -> tuple[list[SweepPoint], MethodRun]:
    """Settings whose scores depend on the sparsity (several steps, fine-tuning, BatchNorm
    re-estimation): the whole schedule per point, each from the dense weights."""
    module = job.torch_model.module
    dense = {k: v.detach().clone() for k, v in module.state_dict().items()}
    points, gradient_seconds, estimator_seconds = [], 0.0, 0.0
    for sparsity in config.sparsities:
        module.load_state_dict(dense)
        tick = time.perf_counter()
        point = config.point(method, sparsity)
        resolved = resolve(point, job)
        pruned = prune_weights(resolved, job)
        point.checkpoint_path.unlink(missing_ok=True)  # the point is complete
        seconds = time.perf_counter() - tick
        gradient_seconds += sum(r.gradient_seconds for r in pruned.outcome.steps)
        estimator_seconds += sum(r.estimator_seconds for r in pruned.outcome.steps)
        allocation = resolved.config.allocation
        points.append(
            _evaluate(
                config,
                job,
                method,
                sparsity,
                pruned.arrays,
                seconds,
                allocation,
                pruned.added_biases,
                pruned.final,
                pruned.removed,
            )
        )
    return points, MethodRun(method, False, round(gradient_seconds, 3), round(estimator_seconds, 3))


def _estimator_seconds(pruner: Pruner) -> float:
    return round(sum(r.estimator_seconds for r in pruner.records), 3)


def _check_free(config: SweepConfig) -> None:
    folder = config.folder
    if not folder.is_dir():
        raise UsageError(f"the folder {folder} of the sweep's output does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write to the folder {folder}")
    written = [config.report_path, config.plot_path]
    if config.keep_models:
        written += [config.point(m, s).output for m in config.methods for s in config.sparsities]
    existing = [p for p in written if p.exists()]
    if existing and not config.settings.force:
        raise UsageError(f"{existing[0]} exists; pass --force to overwrite the sweep's files")


def _evaluate(
    config: SweepConfig,
    job: Job,
    method: str,
    sparsity: float,
    arrays: dict[str, np.ndarray],
    seconds: float,
    allocation: str,
    added_biases: list,
    final: FinalCheck | None,
    removed: frozenset[int] = frozenset(),
) -> SweepPoint:
    """Write the point's model (kept, or in a temporary folder), run it in onnxruntime, measure."""
    point = config.point(method, sparsity)
    with tempfile.TemporaryDirectory(prefix=".onnxprune-sweep-", dir=config.folder) as scratch:
        path = point.output if config.keep_models else Path(scratch) / point.output.name
        written = write_and_validate(point, job, arrays, added_biases, final, {}, path, removed)
    q = written.validation.quality
    params = sum(r.numel for r in written.sparsity)
    log.info("sweep: %s %.2f -> %s %.4f", method, sparsity, q.metric, q.after)
    return SweepPoint(
        method=method,
        target_sparsity=sparsity,
        sparsity=sum(r.zeros for r in written.sparsity) / max(1, params),
        metric=q.metric,
        before=q.before,
        after=q.after,
        drop=q.drop,
        cosine=written.validation.outputs[job.headline.output].cosine,
        seconds=round(seconds, 3),
        model=str(point.output) if config.keep_models else None,
        allocation=allocation,
        torch_vs_onnxruntime_max_abs_error=written.agreement,
        speedup=written.speed.speedup,
    )


def _plot(config: SweepConfig, points: list[SweepPoint], metric: str) -> Path | None:
    """Quality against sparsity, one line per method, written atomically as PNG."""
    from .plots import figure_png, sweep_figure

    figure = sweep_figure(points, metric)
    atomic_write_bytes(config.plot_path, figure_png(figure))
    return config.plot_path


def format_sweep(report: SweepReport) -> str:
    """The sweep as a table for people: one row per sparsity, one column per method."""
    methods = [r.method for r in report.methods]
    sparsities = sorted({p.target_sparsity for p in report.points})
    before = report.points[0].before if report.points else float("nan")
    lines = [
        f"onnxprune {report.tool_version} sweep of {report.input.path}: {report.metric} of {report.output!r} "
        f"(original {before:.4f}) on {report.evaluation.samples} samples",
        f"  {'sparsity':>8}" + "".join(f"{m:>18}" for m in methods),
    ]
    for s in sparsities:
        cells = "".join(f"{report.value(m, s):>18.4f}" for m in methods)
        lines.append(f"  {s:>8.2f}{cells}")
    for r in report.methods:
        reuse = "scores reused across sparsities" if r.scores_reused else "a full run per sparsity"
        allocations = ", ".join(dict.fromkeys(p.allocation for p in report.points if p.method == r.method))
        lines.append(
            f"  {r.method}: {reuse}; {allocations} allocation; gradients {r.gradient_seconds:.1f} s, "
            f"estimator {r.estimator_seconds:.1f} s"
        )
    if report.plot_path:
        lines.append(f"plot: {report.plot_path}")
    lines.append(f"report: {report.report_path}")
    return "\n".join(lines)
