"""`plan()`: the dry run. What `prune()` would do, from the same loading and checks, without
running a model or writing anything."""

from __future__ import annotations

import os
import shutil

from . import __version__
from .bridge.convert import convert
from .config import PruneConfig, as_config
from .environment import environment
from .errors import MemoryBudgetError
from .estimators import METHOD_AUTO, Estimator
from .job import load_inputs, make_estimator, schedule_phases, select_targets, trace_structure
from .masks import prune_count
from .oneshot import TensorView, plan_statistics
from .report import DryRun, MemoryEstimate, PlannedTensor
from .reporting import data_info, model_info
from .runtime import memory_budget, resolve_device
from .structure.remove import describe


def plan(config: PruneConfig | str | os.PathLike, output: str | os.PathLike | None = None, **settings) -> DryRun:
    """What `prune()` would do, without running a model or writing anything: the tensors it
    would prune, the schedule, and the memory the estimator's statistics would need. The model
    and the data files are loaded and checked as a real run would."""
    config = as_config(config, output, settings)
    resolve_device(config.device)  # --device cuda without a GPU fails here too
    model, specs, calibration, evaluation = load_inputs(config)
    torch_model = convert(model.proto)
    targets = select_targets(torch_model, config.exclude)
    channels = trace_structure(config, model.proto, evaluation, specs, targets)
    phases = schedule_phases(config)
    estimator = make_estimator(config)
    memory = None
    if estimator.needs_gradients and config.method != METHOD_AUTO:
        views = [TensorView(t, torch_model.tensors[t.name]) for t in targets]
        memory = _memory_estimate(config, views, estimator, len(phases))
    params = sum(t.numel for t in targets)
    return DryRun(
        tool_version=__version__,
        config=config.as_dict(),
        input=model_info(model.proto, config.input, model.external_files),
        calibration=data_info(calibration),
        evaluation=data_info(evaluation),
        method=config.method,
        scope=config.allocation,
        allocation=config.allocation,
        target_sparsity=config.sparsity,
        tensors=tuple(
            PlannedTensor(t.name, t.shape, t.numel, tuple(c.describe() for c in t.consumers)) for t in targets
        ),
        params=params,
        params_to_prune=prune_count(params, config.sparsity),
        excluded=tuple(t.name for t in torch_model.prunable if t not in targets),
        schedule=tuple(round(p.sparsity, 6) for p in phases),
        finetune_steps=config.finetune_steps,
        memory=memory,
        environment=environment(),
        structure=config.structure,
        channels=describe(channels, {}) if channels is not None else None,
    )


def _memory_estimate(config: PruneConfig, views: list[TensorView], estimator: Estimator, phases: int) -> MemoryEstimate:
    """The statistics' memory plan of a dry run (or why they do not fit)."""
    budget = memory_budget(config)
    disk_free = shutil.disk_usage(config.output.parent if str(config.output.parent) else ".").free
    try:
        chosen = plan_statistics(views, estimator, config.num_grads, budget, disk_free)
    except MemoryBudgetError as exc:
        return MemoryEstimate(0, budget, 0, "none", 0, False, str(exc))
    return MemoryEstimate(
        chosen.estimate, budget, len(chosen.groups), chosen.storage, chosen.passes * phases, True, None
    )
