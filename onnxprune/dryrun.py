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
from .memory import plan_parts, resident_bytes, weight_bytes
from .oneshot import TensorView, plan_statistics
from .report import DryRun, MemoryEstimate, PlannedTensor, size_text
from .reporting import data_info, model_info
from .runtime import memory_budget, resolve_device
from .structure.constraint import step_goal
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
    if config.method != METHOD_AUTO:
        views = [TensorView(t, torch_model.tensors[t.name]) for t in targets]
        weights = weight_bytes(torch_model.tensors.values())
        memory = _memory_estimate(config, views, estimator, len(phases), weights)
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


def _memory_estimate(
    config: PruneConfig, views: list[TensorView], estimator: Estimator, phases: int, model_bytes: int
) -> MemoryEstimate:
    """The statistics' memory plan of a dry run (or why they do not fit), its parts, and the
    process around it."""
    budget = memory_budget(config)
    disk_free = shutil.disk_usage(config.output.parent if str(config.output.parent) else ".").free
    # the rest of the process: what is resident now (model, data, torch, the converted model),
    # and an onnxruntime session of the model (the reference outputs, then the written model's
    # validation and timing, one session at a time for a large model)
    # the keep-masks and one step's chosen masks (bool, one byte per prunable weight each), held
    # while pruning, before any onnxruntime session of the written model
    masks = 2 * sum(v.numel for v in views)
    process = resident_bytes() + max(model_bytes, masks)
    if not estimator.needs_gradients:
        # layer inputs' sums (all layers' at once while scoring), or nothing for magnitude
        needs = [estimator.memory(v.shape, config.num_grads) for v in views]
        statistics, kept = sum(n.peak for n in needs), sum(n.kept for n in needs)
        return MemoryEstimate(
            statistics, budget, 1, "memory" if statistics else "none", 0, True, None,
            kept_bytes=kept, building_bytes=statistics - kept, process_bytes=process,
            total_bytes=process + statistics,
        )  # fmt: skip
    try:
        chosen = plan_statistics(views, estimator, config.num_grads, budget, disk_free)
    except MemoryBudgetError as exc:
        return MemoryEstimate(0, budget, 0, "none", 0, False, str(exc), process_bytes=process, total_bytes=process)
    parts = plan_parts([estimator.memory(v.shape, config.num_grads) for v in views], chosen)
    return MemoryEstimate(
        chosen.estimate, budget, len(chosen.groups), chosen.storage, chosen.passes * phases, True, None,
        kept_bytes=parts.kept, building_bytes=parts.building, scratch_bytes=parts.scratch,
        process_bytes=process, total_bytes=process + chosen.estimate,
    )  # fmt: skip


def format_dry_run(plan: DryRun, max_rows: int = 30) -> str:
    """The dry run for people: the tensors, the schedule and the memory estimate."""
    speedup = plan.config.get("target_speedup")
    target = f"target speed-up {speedup:g}x" if speedup else f"target sparsity {plan.target_sparsity:.2f}"
    lines = [
        f"onnxprune {plan.tool_version} (dry run, nothing written): {plan.method}, {plan.allocation} allocation, "
        f"{target} on {plan.input.path}"
    ]
    width = max([len("prunable tensor")] + [len(t.name) for t in plan.tensors[:max_rows]]) + 2
    lines.append(f"  {'prunable tensor':<{width}}{'shape':>16}{'params':>12}  consumers")
    for t in plan.tensors[:max_rows]:
        shape = "x".join(str(d) for d in t.shape)
        lines.append(f"  {t.name:<{width}}{shape:>16}{t.numel:>12,}  {', '.join(t.consumers)}")
    if len(plan.tensors) > max_rows:
        lines.append(f"  ... {len(plan.tensors) - max_rows} more (see --json)")
    pruned = "the channels are chosen at run time" if speedup else f"{plan.params_to_prune:,} would be pruned"
    lines.append(
        f"  {len(plan.tensors)} tensors, {plan.params:,} params; {pruned}"
        + (f"; left dense by --exclude: {', '.join(plan.excluded[:8])}" if plan.excluded else "")
    )
    if plan.channels:
        c = plan.channels
        lines.append(f"channels: {c['classes']} removable classes in {c['layers_traced']} layers traced")
        lines += [f"  left in place: {row['channels']} channels ({row['reason']})" for row in c["left_in_place"][:8]]
    if speedup:
        goals = " -> ".join(f"{step_goal(x, speedup):.2f}x" for x in plan.schedule)
        steps = f"speed-up {goals} (measured on a latency table timed first)"
    else:
        steps = "sparsity " + " -> ".join(f"{x:.3f}" for x in plan.schedule)
    lines.append(f"schedule: {steps}" + (f", {plan.finetune_steps} fine-tuning steps" if plan.finetune_steps else ""))
    m = plan.memory
    if m is not None and not m.gradient_collections and m.fits:
        statistics = (
            f"statistics {size_text(m.estimate_bytes)} (layer inputs' sums)" if m.estimate_bytes else "no statistics"
        )
        lines.append(
            f"memory: {statistics}, the rest of the process about "
            f"{size_text(m.process_bytes)} (the model in torch and in onnxruntime, the masks): peak about "
            f"{size_text(m.total_bytes)}"
        )
    elif m is None:
        lines.append("memory: chosen with the method (--method auto)")
    else:
        lines.append(
            f"memory for the statistics: about {size_text(m.estimate_bytes)} of {size_text(m.budget_bytes)} allowed; "
            f"{m.groups} group(s), statistics kept in {m.statistics_storage}, "
            f"{m.gradient_collections} gradient collection(s)"
        )
        if m.fits:
            lines.append(
                f"  kept until the update {size_text(m.kept_bytes)}, building the largest group "
                f"{size_text(m.building_bytes)}, finalising scratch {size_text(m.scratch_bytes)}; the rest of the "
                f"process about {size_text(m.process_bytes)}: peak about {size_text(m.total_bytes)}"
            )
        if m.problem:
            lines.append(f"would fail (exit 8): {m.problem}")
    for name, data in (("calibration", plan.calibration), ("evaluation", plan.evaluation)):
        if data is not None:
            lines.append(f"{name}: {data.samples} samples from {data.source}{' (synthetic)' if data.synthetic else ''}")
    return "\n".join(lines)
