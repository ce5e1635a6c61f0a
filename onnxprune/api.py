"""`prune()`: the whole pipeline, top to bottom in the order of design.md's data flow."""

from __future__ import annotations

import logging
import os
import shutil
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from onnx import ModelProto

from . import __version__
from .activations import ActivationSource, capture_plans
from .allocation import ALLOCATION_CANDIDATES, output_loss
from .bridge.bindings import PrunableTensor, read_tensor, release_payloads, select, write_back
from .bridge.convert import TorchModel, convert
from .checkpoint import fingerprint, load_checkpoint, save_checkpoint
from .config import PruneConfig
from .data import Dataset, InputSpec, input_specs, load_dataset, run_batches, split, synthesize
from .environment import environment
from .errors import MemoryBudgetError, NonFiniteError, UsageError
from .estimators import DEFAULT_METHOD, ESTIMATORS, METHOD_AUTO, Estimator
from .estimators.base import DAMP_GRID, DEFAULT_DAMP
from .estimators.layerwise import DEFAULT_MIX, MIX_GRID
from .finetune import (
    Finetuner,
    batchnorm_statistics,
    choose_finetune_loss,
    reestimate_batchnorm,
    trainable_tensors,
)
from .gradients import FisherLoss, GradientSource, choose_loss
from .masks import parse_pattern, prune_count
from .memory import GIB, available_bytes, peak_bytes
from .oneshot import OneShotResult, Pruner, StepRecord, TensorView, plan_statistics
from .onnx_io import (
    EXTERNAL_DATA_THRESHOLD,
    LoadedModel,
    atomic_write_bytes,
    external_data_name,
    load_model,
    save_model,
    tensor_bytes,
)
from .progress import Progress, progress_enabled
from .repair import Repairer, RepairSettings, add_biases
from .report import (
    Conversion,
    DataInfo,
    DryRun,
    Finetune,
    Fisher,
    Gate,
    MemoryEstimate,
    ModelInfo,
    PlannedTensor,
    Pruning,
    Quality,
    Report,
    Schedule,
    StepInfo,
    TensorSparsity,
    Validation,
)
from .schedule import SCHEDULES
from .validate import (
    Headline,
    OrtModel,
    accuracy,
    choose_headline,
    error_distribution,
    is_classifier_output,
    labels_usable,
    output_error,
    output_kind,
    top1_agreement,
)

log = logging.getLogger("onnxprune")


def prune(config: PruneConfig | str | os.PathLike, output: str | os.PathLike | None = None, **settings) -> Report:
    """Prune a model, validate it in onnxruntime, write the output and its JSON report.

    Call it with a `PruneConfig`, or as the command line reads:
    `prune("in.onnx", "out.onnx", sparsity=0.8, method="woodfisher", calibration="calib.npz")`
    (keyword names are PruneConfig's fields). Returns the `Report`. Raises an OnnxPruneError
    subclass (with its exit code) on anything the user can fix. A failed accuracy gate is not an
    exception: the output and report are written and `report.gate_failed` is True.
    """
    config = _as_config(config, output, settings)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    _check_output_free(config)
    job = prepare(config, device, timings)
    with _timed(timings, "prune"):
        pruned = run_schedule(config, job, device)
    timings["finetune"] = round(pruned.tuning_seconds, 4)
    return finish(config, job, pruned, timings, started)


def plan(config: PruneConfig | str | os.PathLike, output: str | os.PathLike | None = None, **settings) -> DryRun:
    """What `prune()` would do, without running a model or writing anything: the tensors it
    would prune, the schedule, and the memory the estimator's statistics would need. The model
    and the data files are loaded and checked as a real run would."""
    config = _as_config(config, output, settings)
    resolve_device(config.device)  # --device cuda without a GPU fails here too
    model, specs, estimator, calibration, evaluation = load_inputs(config)
    torch_model = convert(model.proto)
    targets = select_targets(torch_model, config.exclude)
    phases = schedule_phases(config)
    memory = None
    if estimator.needs_gradients and config.method != METHOD_AUTO:
        views = [TensorView(t, torch_model.tensors[t.name]) for t in targets]
        budget = memory_budget(config)
        disk_free = shutil.disk_usage(config.output.parent if str(config.output.parent) else ".").free
        try:
            chosen = plan_statistics(views, estimator, config.num_grads, budget, disk_free)
            memory = MemoryEstimate(
                chosen.estimate, budget, len(chosen.groups), chosen.storage, chosen.passes * len(phases), True, None
            )
        except MemoryBudgetError as exc:
            memory = MemoryEstimate(0, budget, 0, "none", 0, False, str(exc))
    params = sum(t.numel for t in targets)
    return DryRun(
        tool_version=__version__,
        config=config.as_dict(),
        input=model_info(model.proto, config.input, model.external_files),
        calibration=data_info(calibration),
        evaluation=data_info(evaluation),
        method=config.method,
        scope=config.scope,
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
    )


@dataclass
class Job:
    """What every pruning of one input shares: the model, its data, the onnxruntime reference
    outputs, the converted torch model and the weights that may be pruned."""

    model: LoadedModel  # the targets' values released (see release_payloads)
    input_info: ModelInfo
    specs: list[InputSpec]
    calibration: Dataset | None
    evaluation: Dataset
    reference: list[np.ndarray]
    headline: Headline
    torch_model: TorchModel
    conversion: Conversion
    candidates: list[PrunableTensor]
    targets: list[PrunableTensor]
    device: torch.device


@dataclass
class Pruned:
    """The outcome of the pruning stage: new tensor values and how they were reached."""

    arrays: dict[str, np.ndarray]
    outcome: OneShotResult
    source: GradientSource | None
    estimator: Estimator
    phases: list
    resumed_after: int
    trainer: Finetuner | None
    batchnorm: dict[str, torch.Tensor]
    tuning_seconds: float
    final_torch: list[np.ndarray] | None  # the final torch model's outputs, when weights changed beyond masks
    checked: int  # evaluation samples in final_torch
    scope: str  # the allocation used (auto resolved)
    allocation_search: dict | None  # auto's candidates, held-out losses and choice
    repair: dict | None = None  # the repair passes after each step (repair.py)
    added_biases: list = field(default_factory=list)  # (node output, weight, values) for nodes given a bias
    method: str = ""  # the estimator used (--method auto resolved)
    method_search: dict | None = None  # --method auto: candidates, held-out losses, seconds, choice


def _as_config(config: PruneConfig | str | os.PathLike, output, settings: dict) -> PruneConfig:
    """A PruneConfig as given, or built from (input, output, **settings)."""
    if not isinstance(config, PruneConfig):
        return PruneConfig(input=config, output=output, **settings)
    if output is not None or settings:
        raise UsageError("pass either a PruneConfig or (input, output, **settings), not both")
    return config


def load_inputs(config: PruneConfig) -> tuple[LoadedModel, list[InputSpec], Estimator, Dataset | None, Dataset]:
    """The checked model, its input specs, the estimator, and the calibration and evaluation data."""
    model = load_model(config.input)
    _check_no_clobber(model, config)
    specs = list(input_specs(model.proto))
    # --method auto compares methods on calibration data; the default method stands in until then
    estimator = ESTIMATORS.get(DEFAULT_METHOD if config.method == METHOD_AUTO else config.method)(config)
    needs_calibration = (
        config.method == METHOD_AUTO
        or estimator.needs_gradients
        or estimator.needs_activations
        or config.finetune_steps > 0
        or config.batchnorm == "reestimate"
        or config.scope == "sensitivity"
    )
    calibration, evaluation = load_data(config, specs, needs_calibration)
    return model, specs, estimator, calibration, evaluation


def select_targets(torch_model: TorchModel, exclude: Sequence[str]) -> list[PrunableTensor]:
    """The prunable weights left after --exclude; none is a usage error saying why."""
    candidates = torch_model.prunable
    targets = select(candidates, exclude)
    if not targets:
        why = (
            "every prunable weight matches --exclude"
            if candidates
            else "the model has no weights feeding Conv, ConvTranspose, Gemm, MatMul or a recurrent node"
        )
        raise UsageError(f"nothing to prune: {why}")
    return list(targets)


def schedule_phases(config: PruneConfig) -> list:
    """The pruning steps of the configured schedule."""
    steps = config.steps if config.schedule == "oneshot" else config.prune_steps
    return SCHEDULES.get(config.schedule)(config.sparsity, steps, config.initial_sparsity, config.finetune_steps)


def prepare(config: PruneConfig, device: torch.device, timings: dict[str, float]) -> Job:
    """Load the model and data, run the original in onnxruntime, convert it, pick the targets."""
    with _timed(timings, "load"):
        log.info("loading %s", config.input)
        model, specs, _, calibration, evaluation = load_inputs(config)

    with _timed(timings, "reference"):
        log.info("running the original model in onnxruntime on %d evaluation samples", len(evaluation))
        original = OrtModel(config.input)
        reference = original.run(evaluation, specs, config.eval_batch_size)
        output_names = original.output_names
        del original  # its copy of the weights
        headline = choose_headline(reference, evaluation.labels, config.metric)

    with _timed(timings, "convert"):
        log.info("converting to torch")
        torch_model = convert(model.proto)
        torch_model.module.to(device)
        conversion = check_conversion(torch_model, evaluation, specs, reference, config, device)

    candidates = torch_model.prunable
    targets = select_targets(torch_model, config.exclude)
    for target in targets:
        _require_finite(torch_model.tensors[target.name], f"weight {target.name!r} of the input model")
    bad = _non_finite_output(reference, output_names)
    if bad:
        raise NonFiniteError(
            f"the input model's output {bad!r} is NaN or infinite on the evaluation data from "
            f"{evaluation.source}, so nothing can be compared; nothing was written"
        )
    input_info = model_info(model.proto, config.input, model.external_files)
    # the targets' values now live in the torch model, and every write-back replaces them
    release_payloads(model.proto, [t.name for t in targets])
    return Job(
        model,
        input_info,
        specs,
        calibration,
        evaluation,
        reference,
        headline,
        torch_model,
        conversion,
        candidates,
        targets,
        device,
    )


def statistics_source(
    config: PruneConfig, job: Job, estimator: Estimator, device: torch.device
) -> GradientSource | ActivationSource | None:
    """Where the estimator's statistics come from: gradients of a loss, the layers' calibration
    inputs, or nothing (data-free estimators)."""
    if estimator.needs_activations:
        log.info("statistics: the inputs of each pruned layer on %d calibration samples", config.num_grads)
        source = ActivationSource(
            job.torch_model,
            job.calibration,
            job.specs,
            job.targets,
            config.num_grads,
            config.eval_batch_size,
            config.seed,
            device,
            config.relevant_rows,
        )
        if estimator.needs_output_gradients:
            source.loss = fisher_loss(config, job, estimator)
            log.info("output gradients: %s", source.loss.describe())
        return source
    if not estimator.needs_gradients:
        return None
    loss = fisher_loss(config, job, estimator)
    log.info("gradients: %s", loss.describe())
    return GradientSource(
        job.torch_model, job.calibration, job.specs, loss, config.num_grads, config.fisher_batch, config.seed, device
    )


def fisher_loss(config: PruneConfig, job: Job, estimator: Estimator) -> FisherLoss:
    """The loss whose gradients give the estimator's Fisher (--fisher, or the estimator's default)."""
    fisher = config.fisher if config.fisher != "auto" else getattr(estimator, "default_fisher", "auto")
    return choose_loss(job.headline, job.reference, job.torch_model.output_names, job.calibration, fisher)


AUTO_DAMP_MAX_PARAMS = 5_000_000


def _search_scope(config: PruneConfig) -> str:
    """The allocation the damping search prunes with: sensitivity and auto are searched (or
    measured) under global allocation, which is also auto's first candidate."""
    return "global" if config.scope in ("sensitivity", "auto") else config.scope


def make_pruner(
    config: PruneConfig,
    job: Job,
    estimator: Estimator,
    source: GradientSource | ActivationSource | None,
    progress: Progress,
    spill_folder: Path,
    device: torch.device,
) -> Pruner:
    """A Pruner over the job's targets for a config whose damping and allocation are resolved."""
    return Pruner(
        job.torch_model,
        job.targets,
        estimator,
        config.scope,
        (lambda step: source) if source is not None else None,
        memory_budget(config),
        progress,
        spill_folder=spill_folder,
        pattern=parse_pattern(config.pattern),
        evaluate=loss_evaluator(config, job, device) if config.scope == "sensitivity" else None,
    )


def trials_predict_the_run(config: PruneConfig) -> bool:
    """Whether one-shot trials at the target can choose for this run (method, allocation,
    damping): not for a gradual schedule, whose fine-tuning between steps recovers from what one
    shot cannot, so a trial's winner can lose the run."""
    return config.schedule != "gradual"


def search_split(config: PruneConfig, calibration: Dataset) -> tuple[Dataset, Dataset]:
    """(fit, held): the calibration samples the automatic searches prune with, and the held-out
    ones (a quarter, at most `sensitivity_samples`) their losses are measured on."""
    held_count = min(config.sensitivity_samples, max(1, len(calibration) // 4))
    return split(calibration, held_count / len(calibration), config.seed + 3)


def searched(*searches: dict | None) -> bool:
    """Whether any automatic search (method, allocation, damping, mix) actually compared trials."""
    return any(s is not None and s.get("searched", True) for s in searches)


def statistics_job(config: PruneConfig, job: Job, after_search: bool) -> Job:
    """The job whose calibration samples the run's statistics come from: after an automatic search,
    the samples its trials pruned with, so that the run starts from exactly the trial it chose (on
    the same samples, from the full set, a damping chosen at the edge of stability gave a digits MLP
    a held-out loss of 1.99 before the repair where the trial had 0.12); else all of them."""
    if not after_search or job.calibration is None or len(job.calibration) < 2:
        return job
    return replace(job, calibration=search_split(config, job.calibration)[0])


def trial_losses(
    config: PruneConfig, job: Job, device: torch.device, trials: Sequence[tuple[str, PruneConfig]]
) -> list[float]:
    """For each (label, config): prune once at the config's sparsity with statistics from three
    quarters of the calibration samples, repaired as the run would be (mask refinement and the
    weights solve; the statistics correction, rarely kept, is left out), and measure the loss on
    the held-out rest; the weights are restored after each trial. The repair is part of the
    trial because it changes which choice is best: on a digits MLP at 90% FishLeg's held-out loss
    was 2.47 per layer and 3.42 global without it, 1.32 and 0.031 with it; with one round of it
    in the trials where the run has two, the combined estimator's choice on that MLP fell to 0.940
    accuracy on one seed (0.975 with the run's own two rounds)."""
    fit, held = search_split(config, job.calibration)
    trial_job = replace(job, calibration=fit)
    evaluate = loss_evaluator(config, replace(job, calibration=held), device)
    repair = replace(repair_settings(config), statistics="off")
    samples = repair_data(config, job.calibration)[0] if repair.passes and not job.calibration.synthetic else None
    saved = {t.name: job.torch_model.tensors[t.name].detach().clone() for t in job.targets}
    losses = []
    for label, trial in trials:
        estimator = ESTIMATORS.get(trial.method)(trial)
        source = statistics_source(trial, trial_job, estimator, device)
        with make_pruner(trial, trial_job, estimator, source, Progress(False), config.output.parent, device) as pruner:
            repairer = None
            if samples is not None:
                repairer = Repairer(
                    repair, job.torch_model, pruner, samples, job.specs, evaluate, device, Progress(False),
                    config.eval_batch_size,
                )  # fmt: skip
            before = list(pruner.keep)
            try:
                pruner.step(trial.sparsity, label)
                if repairer is not None:
                    repairer.after_step(label, before)
                losses.append(evaluate())
            finally:
                if repairer is not None:
                    repairer.close()
        with torch.no_grad():
            for name, value in saved.items():
                job.torch_model.tensors[name].copy_(value)
    return losses


def resolve_method(config: PruneConfig, job: Job, device: torch.device) -> tuple[PruneConfig, dict | None]:
    """For --method auto: among the methods that fit the model and the memory budget (and
    `auto_methods`), the one whose one-shot pruning at the target leaves the smallest loss on
    held-out calibration samples (statistics from the other samples), each at its default damping
    and, with --allocation auto, with global and per-layer allocation (the pair is chosen
    together). Returns the config with the method (and allocation) and the search: candidates,
    losses, seconds per trial, the methods left out and why, the choice."""
    if config.method != METHOD_AUTO:
        return config, None
    automatic = config.scope == "auto" and config.pattern is None and trials_predict_the_run(config)
    candidates, skipped = [], {}
    for method in config.auto_methods or ESTIMATORS.names():
        why = _does_not_fit(replace(config, method=method), job)
        if why:
            skipped[method] = why
            continue
        for allocation in allocation_candidates(method) if automatic else [None]:
            candidates.append((method, allocation))
    labels, losses, seconds = [], [], []
    for method, allocation in candidates:
        scope = allocation or (config.scope if config.scope != "auto" else "global")
        trial = replace(config, method=method, scope=scope, steps=1)
        label = f"{method} ({scope})" if allocation else method
        started = time.perf_counter()
        losses.append(trial_losses(config, job, device, [(label, trial)])[0])
        seconds.append(round(time.perf_counter() - started, 3))
        labels.append(label)
    best = int(np.argmin(losses))
    method, allocation = candidates[best]
    log.info(
        "method: chose %s (loss on held-out calibration samples: %s)",
        labels[best],
        ", ".join(f"{label}: {loss:.4g}" for label, loss in zip(labels, losses)),
    )
    search = {
        "candidates": labels,
        "losses": [round(x, 6) for x in losses],
        "seconds": seconds,
        "chosen": labels[best],
        "skipped": skipped,
    }
    return replace(config, method=method, scope=allocation or config.scope), search


def _does_not_fit(config: PruneConfig, job: Job) -> str | None:
    """Why `config.method` cannot prune the job's targets (None when it can)."""
    estimator = ESTIMATORS.get(config.method)(config)
    if estimator.needs_activations:
        _, refused = capture_plans(job.torch_model, job.targets)
        if refused:
            return f"cannot read the inputs of {len(refused)} weight(s)"
    if estimator.needs_gradients:
        views = [TensorView(t, job.torch_model.tensors[t.name]) for t in job.targets]
        try:
            plan_statistics(views, estimator, config.num_grads, memory_budget(config), 0)
        except MemoryBudgetError:
            return "its statistics do not fit --max-memory"
    return None


def resolve_damping(
    config: PruneConfig, job: Job, device: torch.device, known: dict[float, float] | None = None
) -> tuple[PruneConfig, dict | None]:
    """The config with `damp` a number: as given, or for "auto" the grid value whose one-shot
    pruning at the target sparsity leaves the smallest loss on held-out calibration samples
    (statistics from the other samples), under the config's allocation (global for sensitivity).
    `known` holds losses already measured for some grid values. Returns the search (grid,
    losses, choice) too."""
    estimator = ESTIMATORS.get(config.method)
    if config.damp != "auto" or not estimator.uses_damping:
        return config, None
    params = sum(t.numel for t in job.targets)
    why = None
    if params > AUTO_DAMP_MAX_PARAMS:
        why = f"{params:,} prunable weights, more than the {AUTO_DAMP_MAX_PARAMS:,} the automatic search runs on"
    elif not trials_predict_the_run(config):
        # the trials chose 1e-4 on a digits MLP, whose gradual run then kept 0.87 against 0.95 at 1e-3
        why = "gradual schedule, one-shot trials do not predict it"
    if why is not None:
        log.info("damping: %s; using %g (pass --damp to choose)", why, DEFAULT_DAMP)
        return replace(config, damp=DEFAULT_DAMP), {"grid": [], "losses": [], "chosen": DEFAULT_DAMP, "searched": False}
    scope = _search_scope(config)
    known = dict(known or {})
    todo = [d for d in DAMP_GRID if d not in known]
    trials = [(f"damping {d:g}", replace(config, damp=d, steps=1, scope=scope)) for d in todo]
    known.update(zip(todo, trial_losses(config, job, device, trials)))
    losses = [known[d] for d in DAMP_GRID]
    chosen = DAMP_GRID[int(np.argmin(losses))]
    log.info(
        "damping: chose %g (loss on held-out calibration samples: %s)",
        chosen,
        ", ".join(f"{d:g}: {loss:.4g}" for d, loss in zip(DAMP_GRID, losses)),
    )
    search = {
        "grid": list(DAMP_GRID),
        "losses": [round(x, 6) for x in losses],
        "chosen": chosen,
        "searched": True,
        "allocation": scope,
    }
    return replace(config, damp=chosen), search


def allocation_candidates(method: str) -> list[str]:
    """What --allocation auto compares for `method` (magnitude's own profile is its global split)."""
    return [a for a in ALLOCATION_CANDIDATES if not (a == "magnitude" and method == "magnitude")]


def resolve_allocation(
    config: PruneConfig, job: Job, device: torch.device
) -> tuple[PruneConfig, dict | None, dict[str, float]]:
    """The config with a concrete allocation: as given, or for "auto" the candidate (global, per
    layer, or the magnitude profile) whose one-shot pruning at the target sparsity leaves the
    smallest loss on held-out calibration samples (at the given damping, DEFAULT_DAMP while it is
    "auto"). None wins everywhere: on the MNIST CNN global keeps SparseGPT at 0.95 where per layer drops it to 0.57
    (90%); on MiniLM it is the other way round (0.40 vs 0.76 at 70%). Returns the search
    (candidates, losses, choice) for the report and the losses unrounded."""
    if config.scope != "auto":
        return config, None, {}
    if (
        config.pattern is not None
        or not trials_predict_the_run(config)
        or job.calibration is None
        or len(job.calibration) < 2
    ):
        # an N:M pattern fixes every tensor's sparsity; without data there is nothing to choose by;
        # a one-shot trial at the target says nothing of a gradual run, whose fine-tuning between
        # steps recovers from what one shot cannot (a digits CNN at 95%, 8 steps, 300 fine-tuning
        # steps: global 0.980 / 0.990 / 0.985 for magnitude / FishLeg / WoodFisher, per layer
        # 0.914 / 0.801 / 0.856, yet one shot per layer looked better)
        if config.pattern:
            why = "the N:M pattern fixes each tensor's sparsity"
        elif not trials_predict_the_run(config):
            why = "gradual schedule: one-shot trials do not predict it"
        else:
            why = "no calibration data to compare on"
        log.info("allocation: global (%s)", why)
        return replace(config, scope="global"), None, {}
    candidates = allocation_candidates(config.method)
    trials = [(f"allocation {a}", replace(config, steps=1, scope=a)) for a in candidates]
    losses = dict(zip(candidates, trial_losses(config, job, device, trials)))
    chosen = min(candidates, key=lambda a: losses[a])
    log.info(
        "allocation: chose %s (loss on held-out calibration samples: %s)",
        chosen,
        ", ".join(f"{a}: {losses[a]:.4g}" for a in candidates),
    )
    search = {"candidates": candidates, "losses": [round(losses[a], 6) for a in candidates], "chosen": chosen}
    return replace(config, scope=chosen), search, losses


def resolve_automatic(
    config: PruneConfig, job: Job, device: torch.device
) -> tuple[PruneConfig, dict[str, dict | None]]:
    """The config with `--allocation auto`, `--mix auto` and `--damp auto` resolved, and the
    searches for the report (by "damp", "allocation", "mix"). The allocation is chosen first (at
    the default damping and mix while they are automatic), then the mix, then the damping under
    those (each reuses the trial the previous search ran at its default): the damping that suits
    one allocation can be far from the other's best (SparseGPT at 90% on the magika file-type
    model, a TensorFlow export: 1e-4 under global allocation, 1 per layer)."""
    damp_was_auto, mix_was_auto = config.damp == "auto", config.mix == "auto"
    config, allocation_search, losses = resolve_allocation(config, job, device)
    at_defaults = losses[config.scope] if losses and damp_was_auto and mix_was_auto else None
    config, mix_search, mix_losses = resolve_mix(config, job, device, at_defaults)
    known = None
    if damp_was_auto and (mix_losses or losses):
        known = {DEFAULT_DAMP: mix_losses[config.mix] if mix_losses else losses[config.scope]}
    config, damp_search = resolve_damping(config, job, device, known)
    return config, {"damp": damp_search, "allocation": allocation_search, "mix": mix_search}


def resolve_mix(
    config: PruneConfig, job: Job, device: torch.device, at_default: float | None
) -> tuple[PruneConfig, dict | None, dict[float, float]]:
    """For the combined estimator with `mix` "auto": the weight of the task-loss term from
    MIX_GRID whose one-shot pruning leaves the smallest held-out loss (at DEFAULT_DAMP while the
    damping is automatic; `at_default` is the loss already measured at DEFAULT_MIX)."""
    if config.mix != "auto" or not ESTIMATORS.get(config.method).needs_output_gradients:
        return config, None, {}
    known = {DEFAULT_MIX: at_default} if at_default is not None else {}
    todo = [a for a in MIX_GRID if a not in known]
    trials = [(f"mix {a:g}", replace(config, mix=a, steps=1, scope=_search_scope(config))) for a in todo]
    known.update(zip(todo, trial_losses(config, job, device, trials)))
    losses = [known[a] for a in MIX_GRID]
    chosen = MIX_GRID[int(np.argmin(losses))]
    log.info(
        "mix: chose %g (loss on held-out calibration samples: %s)",
        chosen,
        ", ".join(f"{a:g}: {loss:.4g}" for a, loss in zip(MIX_GRID, losses)),
    )
    search = {"grid": list(MIX_GRID), "losses": [round(x, 6) for x in losses], "chosen": chosen}
    return replace(config, mix=chosen), search, known


def loss_evaluator(config: PruneConfig, job: Job, device: torch.device) -> Callable[[], float]:
    """A function giving how far the torch model's headline output is now from the dense model's,
    on `sensitivity_samples` calibration samples (dense outputs taken when this is called)."""
    calibration = job.calibration
    count = min(config.sensitivity_samples, len(calibration))
    chosen = np.sort(np.random.default_rng(config.seed + 2).permutation(len(calibration))[:count])
    samples = calibration.take(chosen, "sensitivity samples")
    run = torch_runner(job.torch_model, device)
    output = job.headline.output
    kind = output_kind(job.reference[output])

    def headline() -> torch.Tensor:
        rows = run_batches(run, samples, job.specs, config.eval_batch_size, count)[output]
        return torch.from_numpy(np.asarray(rows, dtype=np.float64).reshape(count, -1))

    dense = headline()
    return lambda: output_loss(dense, headline(), kind)


def run_schedule(config: PruneConfig, job: Job, device: torch.device) -> Pruned:
    """Prune step by step along the schedule, with BatchNorm re-estimation, fine-tuning and a
    checkpoint after each step; returns the new values of every changed tensor."""
    torch_model, targets, calibration, specs = job.torch_model, job.targets, job.calibration, job.specs
    config, method_search = resolve_method(config, job, device)
    config, searches = resolve_automatic(config, job, device)
    damp_search, allocation_search = searches["damp"], searches["allocation"]
    estimator = ESTIMATORS.get(config.method)(config)
    estimator.damp_search = damp_search
    if searches["mix"] is not None:
        estimator.mix_search = searches["mix"]
    after_search = searched(method_search, *searches.values())
    source = statistics_source(config, statistics_job(config, job, after_search), estimator, device)
    phases = schedule_phases(config)
    trainer = make_finetuner(config, torch_model, targets, calibration, specs, job.headline, job.reference, device)
    batchnorm = batchnorm_statistics(torch_model)
    progress = Progress(progress_enabled(config.progress))
    log.info(
        "pruning %d tensors (%s params) with %s, %s scope, %s schedule of %d step(s)%s",
        len(targets),
        f"{sum(t.numel for t in targets):,}",
        config.method,
        config.scope,
        config.schedule,
        len(phases),
        f", {config.finetune_steps} fine-tuning steps" if trainer else "",
    )
    fingerprint_ = fingerprint(config, config.input)
    tuning_seconds = 0.0
    with make_pruner(config, job, estimator, source, progress, config.output.parent, device) as pruner:
        repairer = make_repairer(config, job, pruner, progress, device)
        done = 0
        if config.resume:
            done = resume(config, fingerprint_, torch_model, pruner, estimator, trainer, batchnorm, repairer)
        for index, phase in enumerate(phases[done:], done):
            before = list(pruner.keep)
            pruner.step(phase.sparsity, phase.label)
            if repairer is not None:
                repairer.after_step(phase.label, before)
            if config.batchnorm == "reestimate":
                reestimate_batchnorm(torch_model, calibration, specs, config.eval_batch_size, device)
            if trainer is not None and phase.finetune_steps:
                started_tuning = time.perf_counter()
                with progress.task(f"fine-tuning after {phase.label}", phase.finetune_steps) as task:
                    trainer.run(phase.finetune_steps, pruner.masks(), task.advance)
                tuning_seconds += time.perf_counter() - started_tuning
            if len(phases) > 1:
                save_checkpoint(
                    config.checkpoint_path,
                    checkpoint_state(
                        fingerprint_, index + 1, torch_model, pruner, estimator, trainer, batchnorm, repairer
                    ),
                )
        outcome = OneShotResult(arrays=pruner.arrays(), steps=pruner.records, plan=pruner.plan)
        try:
            if config.batchnorm == "reestimate" and trainer is not None:
                reestimate_batchnorm(torch_model, calibration, specs, config.eval_batch_size, device)
            arrays = {
                **outcome.arrays,
                **({k: v.detach().cpu().numpy() for k, v in trainer.tensors.items()} if trainer else {}),
                **(
                    {k: v.detach().cpu().numpy() for k, v in batchnorm.items()}
                    if config.batchnorm == "reestimate"
                    else {}
                ),
            }
            # the weights changed beyond the pruned tensors (or corrections are folded into them):
            # the written model is checked against the final torch model, not only against the
            # dense reference
            corrected = repairer is not None and bool(repairer.corrections.values)
            final_torch, checked = None, min(config.conversion_check_samples, len(job.evaluation))
            if trainer is not None or config.batchnorm == "reestimate" or corrected:
                final_torch = run_batches(
                    torch_runner(torch_model, device), job.evaluation, specs, config.eval_batch_size, checked
                )
            added = repairer.fold(arrays) if repairer is not None else []
            repair = repairer.report() if repairer is not None else None
        finally:
            if repairer is not None:
                repairer.close()
    return Pruned(
        arrays,
        outcome,
        source,
        estimator,
        phases,
        done,
        trainer,
        batchnorm,
        tuning_seconds,
        final_torch,
        checked,
        config.scope,
        allocation_search,
        repair,
        added,
        config.method,
        method_search,
    )


def make_repairer(
    config: PruneConfig, job: Job, pruner: Pruner, progress: Progress, device: torch.device
) -> Repairer | None:
    """The repair passes after each pruning step, or None when none is on or there is no real
    calibration data: moments on up to `repair_samples` calibration samples, the held-out loss on
    others (the split of the automatic searches)."""
    settings = repair_settings(config)
    calibration = job.calibration
    if not settings.passes or calibration is None or calibration.synthetic or len(calibration) < 4:
        return None
    samples, held = repair_data(config, calibration)
    evaluate = loss_evaluator(config, replace(job, calibration=held), device)
    return Repairer(
        settings,
        job.torch_model,
        pruner,
        samples,
        job.specs,
        evaluate,
        device,
        progress,
        config.eval_batch_size,
    )


def repair_settings(config: PruneConfig) -> RepairSettings:
    return RepairSettings(
        refine_masks=config.refine_masks,
        solve_weights=config.solve_weights,
        statistics=config.correct_statistics,
        samples=config.repair_samples,
        damp=config.repair_damp,
        rounds=config.repair_rounds,
        cycles=config.repair_cycles,
        relevant_rows=config.relevant_rows,
    )


def repair_data(config: PruneConfig, calibration: Dataset) -> tuple[Dataset, Dataset]:
    """(samples the repair's moments are taken on, held-out samples its passes are judged on):
    the held-out part of the automatic searches, and up to `repair_samples` of the rest."""
    fit, held = search_split(config, calibration)
    count = min(config.repair_samples, len(fit))
    chosen = np.sort(np.random.default_rng(config.seed + 4).permutation(len(fit))[:count])
    return fit.take(chosen, "repair samples"), held


def validate_written(config: PruneConfig, job: Job, path: Path) -> tuple[Validation, list[np.ndarray]]:
    """Run the written model in onnxruntime on the evaluation data and compare with the original."""
    written = OrtModel(path)
    candidate = written.run(job.evaluation, job.specs, config.eval_batch_size)
    bad = _non_finite_output(candidate, written.output_names)
    if bad:
        raise NonFiniteError(
            f"the pruned model's output {bad!r} is NaN or infinite on the evaluation data; nothing was written"
        )
    labels = job.evaluation.labels
    return compare_outputs(job.reference, candidate, labels, written.output_names, job.headline), candidate


def finish(config: PruneConfig, job: Job, pruned: Pruned, timings: dict[str, float], started: float) -> Report:
    """Write the pruned model, validate it in onnxruntime, build and write the report."""
    with _timed(timings, "write"):
        log.info("writing %s", config.output)
        proto = write_back(job.model.proto, pruned.arrays)
        add_biases(proto, pruned.added_biases)
        sparsity = measure_sparsity(proto, job.targets)
        external = job.model.uses_external_data or tensor_bytes(proto) >= EXTERNAL_DATA_THRESHOLD
        save_model(proto, config.output, external_data=external)
        output = model_info(proto, config.output, written_data_files(config.output, external))
        del proto

    with _timed(timings, "validate"):
        log.info("validating %s in onnxruntime", config.output)
        try:
            validation, candidate = validate_written(config, job, config.output)
        except NonFiniteError:
            for written in [config.output, *written_data_files(config.output, external=True)]:
                written.unlink(missing_ok=True)
            raise
        agreement = None
        if pruned.final_torch is not None:
            agreement = max(
                float(np.abs(ours - got[: pruned.checked].astype(np.float64)).max()) if ours.size else 0.0
                for ours, got in zip(pruned.final_torch, candidate)
            )
        config.checkpoint_path.unlink(missing_ok=True)  # the run is complete: nothing to resume

    timings["total"] = time.perf_counter() - started
    gate = None
    if config.max_drop is not None:
        q = validation.quality
        gate = Gate(max_drop=config.max_drop, metric=q.metric, drop=q.drop, passed=q.drop <= config.max_drop + 1e-12)
    report = Report(
        tool_version=__version__,
        device=str(job.device),
        config=config.as_dict(),
        input=job.input_info,
        output=output,
        calibration=data_info(job.calibration),
        evaluation=data_info(job.evaluation),
        fisher=fisher_info(pruned.source, pruned.estimator, pruned.outcome),
        schedule=Schedule(
            name=config.schedule,
            sparsities=tuple(round(p.sparsity, 6) for p in pruned.phases),
            finetune_steps=tuple(p.finetune_steps for p in pruned.phases),
            resumed_after=pruned.resumed_after,
            torch_vs_onnxruntime_max_abs_error=agreement,
        ),
        finetune=finetune_info(pruned.trainer, config, pruned.tuning_seconds, pruned.batchnorm),
        pruning=Pruning(
            method=pruned.method or config.method,
            scope=pruned.scope,
            target_sparsity=config.sparsity,
            tensors=tuple(sparsity),
            params=sum(t.numel for t in sparsity),
            zeros=sum(t.zeros for t in sparsity),
            sparsity=sum(t.zeros for t in sparsity) / max(1, sum(t.numel for t in sparsity)),
            excluded=tuple(t.name for t in job.candidates if t not in job.targets),
            allocation_search=pruned.allocation_search,
            repair=pruned.repair,
            method_search=pruned.method_search,
        ),
        conversion=job.conversion,
        validation=validation,
        gate=gate,
        timings={k: round(v, 4) for k, v in timings.items()},
        peak_memory_bytes=peak_bytes(),
        warnings=tuple(_warnings(job.calibration, job.evaluation, job.conversion)),
        report_path=str(config.report_path),
        html_path=str(config.html) if config.html else None,
        environment=environment(),
    )
    if config.html is not None:
        from .html import render_html

        atomic_write_bytes(config.html, render_html(report).encode())
    atomic_write_bytes(config.report_path, report.to_json().encode())
    return report


# ------------------------------------------------------------------------------ stages


def resolve_device(requested: str) -> torch.device:
    """'auto' → CUDA when usable, else CPU; 'cuda' without a usable GPU is an error, not a CPU run."""
    if requested == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise UsageError("--device cuda was asked for, but torch sees no usable CUDA device; use --device cpu or auto")
    return torch.device("cuda" if available else "cpu")


def _check_output_free(config: PruneConfig) -> None:
    paths = [(config.output, "output"), (config.report_path, "report")] + (
        [(config.html, "HTML")] if config.html else []
    )
    for path, what in paths:
        if path.is_dir():
            raise UsageError(f"the {what} path {path} is a folder; give a file path")
        if path.exists() and not config.force:
            raise UsageError(f"the {what} file {path} exists; pass --force to overwrite it")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise UsageError(f"the folder of the {what} path {path} does not exist")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"cannot write to the folder {parent} of the {what} path")


def _check_no_clobber(model: LoadedModel, config: PruneConfig) -> None:
    data_file = config.output.with_name(external_data_name(config.output))
    for used in model.external_files:
        if data_file.resolve() == used.resolve():
            raise UsageError(
                f"writing {config.output} would replace {used.name}, the input's external data; "
                "choose another output name"
            )


def load_data(
    config: PruneConfig, specs: Sequence[InputSpec], needs_calibration: bool
) -> tuple[Dataset | None, Dataset]:
    """(calibration, evaluation): given files, a held-out part of --calib, or synthetic feeds."""
    calibration = load_dataset(config.calibration, specs) if config.calibration else None
    if config.evaluation:
        evaluation = load_dataset(config.evaluation, specs)
    elif calibration is not None:
        calibration, evaluation = split(calibration, config.eval_fraction, config.seed)
        log.info("no --eval: holding out %d of the calibration samples for evaluation", len(evaluation))
    else:
        evaluation = synthesize(specs, config.synthetic_samples, config.seed + 1, "synthetic (no --eval)")
        log.warning(
            "no --eval or --calib data: validating on %d synthetic samples drawn from the input shapes", len(evaluation)
        )
    if calibration is None and needs_calibration:
        calibration = synthesize(specs, config.synthetic_samples, config.seed, "synthetic (no --calib)")
        log.warning(
            "no --calib data: calibrating on %d synthetic samples drawn from the input shapes", len(calibration)
        )
    return calibration, evaluation


def torch_runner(torch_model: TorchModel, device: torch.device):
    """A feeds → outputs function running the torch model without gradients. A failure inside
    the converted model is reported as exit 4, naming the ONNX node that failed."""

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        inputs = torch_model.inputs(feeds, device)
        try:
            with torch.no_grad():
                outputs = torch_model(*inputs)
        except Exception as exc:
            located = torch_model.locate_failure(*inputs)
            raise (located or exc) from None
        return [o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outputs]

    return run


def check_conversion(
    torch_model: TorchModel,
    evaluation: Dataset,
    specs: Sequence[InputSpec],
    reference: list[np.ndarray],
    config: PruneConfig,
    device: torch.device,
) -> Conversion:
    """The dense torch model against onnxruntime's outputs on the first evaluation samples."""
    limit = min(config.conversion_check_samples, len(evaluation))
    ours = run_batches(torch_runner(torch_model, device), evaluation, specs, config.eval_batch_size, limit)
    errors = tuple(
        output_error(name, ref[:limit], got) for name, ref, got in zip(torch_model.output_names, reference, ours)
    )
    scale = max((float(np.abs(ref[:limit]).max()) for ref in reference if ref.size), default=0.0)
    worst = max((e.max_abs_error for e in errors), default=0.0)
    relative = worst / scale if scale > 0 else worst
    return Conversion(samples=limit, max_abs_error=worst, relative_error=relative, outputs=errors)


def memory_budget(config: PruneConfig) -> int:
    """Bytes the estimator's statistics may use: --max-memory, else 80% of what is available."""
    if config.max_memory is not None:
        return int(config.max_memory * GIB)
    return int(0.8 * available_bytes())


def estimator_details(estimator: Estimator) -> dict:
    """The estimator's settings for the report, with the damping search when one ran."""
    details = estimator.describe()
    if estimator.damp_search is not None:
        details["damp_search"] = estimator.damp_search
    return details


def fisher_info(
    source: GradientSource | ActivationSource | None, estimator: Estimator, outcome: OneShotResult
) -> Fisher | None:
    if source is None:
        return None
    steps = tuple(
        StepInfo(s.step, s.sparsity, round(s.gradient_seconds, 3), round(s.estimator_seconds, 3), s.collections)
        for s in outcome.steps
    )
    shared = dict(
        num_grads=source.count,
        calibration_samples_used=source.samples_used,
        estimator=estimator_details(estimator),
        steps=steps,
        gradient_seconds=round(sum(s.gradient_seconds for s in steps), 3),
        estimator_seconds=round(sum(s.estimator_seconds for s in steps), 3),
    )
    if isinstance(source, ActivationSource):
        rows = ""
        if source.rows_checked:
            rows = (
                f" ({source.rows_dropped / source.rows_checked:.0%} of the token rows left out: the outputs "
                "never read them)"
            )
        return Fisher(
            loss="none: each layer's output error on its calibration inputs, ‖ΔW·X‖² (H = 2XᵀX)",
            statistics="layer inputs" + rows,
            fisher_batch=1,
            groups=1,
            statistics_storage="memory",
            memory_estimate_bytes=0,
            memory_budget_bytes=0,
            **shared,
        )
    if outcome.plan is None:
        return None
    return Fisher(
        loss=source.loss.describe(),
        statistics="gradients",
        fisher_batch=source.micro_batch,
        groups=len(outcome.plan.groups),
        statistics_storage=outcome.plan.storage,
        memory_estimate_bytes=outcome.plan.estimate,
        memory_budget_bytes=outcome.plan.budget,
        **shared,
    )


def make_finetuner(
    config: PruneConfig,
    torch_model: TorchModel,
    targets: Sequence[PrunableTensor],
    calibration: Dataset,
    specs: Sequence[InputSpec],
    headline: Headline,
    reference: list[np.ndarray],
    device: torch.device,
) -> Finetuner | None:
    """The fine-tuner for --finetune-steps > 0: labels when they fit, else distillation from the
    dense model's outputs on the calibration data (computed here in onnxruntime)."""
    if config.finetune_steps <= 0:
        return None
    loss = choose_finetune_loss(headline, reference, torch_model.output_names, calibration, config.temperature)
    teacher = None
    if loss.kind != "cross-entropy":
        # a session of its own: keeping the reference's alive through pruning would hold a
        # second copy of the weights the whole time
        teacher = OrtModel(config.input).run(calibration, specs, config.eval_batch_size)[loss.output]
    tensors = trainable_tensors(torch_model, [t.name for t in targets])
    log.info("fine-tuning: %s", loss.describe())
    return Finetuner(
        torch_model,
        tensors,
        calibration,
        specs,
        loss,
        teacher,
        config.optimizer,
        config.lr,
        config.batch_size,
        config.seed,
        device,
    )


def checkpoint_state(
    fingerprint_: str,
    phases_done: int,
    torch_model: TorchModel,
    pruner: Pruner,
    estimator: Estimator,
    trainer: Finetuner | None,
    batchnorm: dict[str, torch.Tensor],
    repairer: Repairer | None = None,
) -> dict:
    """Everything a resumed run needs to continue exactly as this one would have: tensors,
    masks, optimiser and estimator state, the step records. Tensors and plain values only."""
    names = [v.target.name for v in pruner.views] + (list(trainer.tensors) if trainer else [])
    return {
        "fingerprint": fingerprint_,
        "phases_done": phases_done,
        "tensors": {name: torch_model.tensors[name].detach().cpu().clone() for name in names},
        "batchnorm": {name: t.detach().cpu().clone() for name, t in batchnorm.items()},
        "masks": {name: m.cpu() for name, m in pruner.masks().items()},
        "records": [list(vars(r).values()) for r in pruner.records],
        "estimator": estimator.state_dict() if hasattr(estimator, "state_dict") else {},
        "finetune": trainer.state_dict() if trainer else {},
        "repair": repairer.state_dict() if repairer else {},
    }


def resume(
    config: PruneConfig,
    fingerprint_: str,
    torch_model: TorchModel,
    pruner: Pruner,
    estimator: Estimator,
    trainer: Finetuner | None,
    batchnorm: dict[str, torch.Tensor],
    repairer: Repairer | None = None,
) -> int:
    """Restore the state saved in the checkpoint; returns the number of phases it completed."""
    state = load_checkpoint(config.checkpoint_path, fingerprint_)
    with torch.no_grad():
        for name, value in state["tensors"].items():
            torch_model.tensors[name].copy_(value)
        for name, value in state["batchnorm"].items():
            batchnorm[name].copy_(value)
    pruner.restore_masks(state["masks"])
    pruner.records = [StepRecord(*values) for values in state["records"]]
    if state["estimator"]:
        shapes = {v.target.name: v.shape for v in pruner.views}
        estimator.load_state_dict(state["estimator"], shapes)
    if trainer is not None and state["finetune"]:
        trainer.load_state_dict(state["finetune"])
    if repairer is not None and state.get("repair"):
        repairer.load_state_dict(state["repair"])
    log.info("resuming from %s after step %d", config.checkpoint_path, state["phases_done"])
    return int(state["phases_done"])


def finetune_info(
    trainer: Finetuner | None, config: PruneConfig, seconds: float, batchnorm: dict[str, torch.Tensor]
) -> Finetune | None:
    if trainer is None:
        return None
    stride = max(1, -(-len(trainer.curve) // 200))
    bn = config.batchnorm if config.batchnorm == "frozen" else f"reestimate ({len(batchnorm) // 2} layers)"
    return Finetune(
        loss=trainer.loss.describe(),
        steps=trainer.step_count,
        optimizer=config.optimizer,
        lr=config.lr,
        batch_size=config.batch_size,
        trained_tensors=len(trainer.tensors),
        batchnorm=bn,
        loss_curve=tuple(round(v, 6) for v in trainer.curve[::stride]),
        seconds=round(seconds, 3),
    )


def _non_finite_output(outputs: Sequence[np.ndarray], names: Sequence[str]) -> str | None:
    """The name of the first float output holding NaN or infinity, if any."""
    for name, out in zip(names, outputs):
        if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
            return name
    return None


def _require_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{what} contain NaN or infinite values; nothing was written")


def measure_sparsity(pruned: ModelProto, targets: Sequence[PrunableTensor]) -> list[TensorSparsity]:
    """Zeros counted in the tensors as written (after the cast to their ONNX dtype)."""
    rows = []
    for target in targets:
        values = read_tensor(pruned, target.name)
        zeros = int(values.size - np.count_nonzero(values))
        rows.append(
            TensorSparsity(
                name=target.name,
                shape=target.shape,
                numel=int(values.size),
                zeros=zeros,
                sparsity=zeros / max(1, values.size),
                consumers=tuple(c.describe() for c in target.consumers),
            )
        )
    return rows


def compare_outputs(
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    labels: np.ndarray | None,
    names: Sequence[str],
    headline: Headline,
) -> Validation:
    """Accuracy, top-1 agreement and output error of the candidate against the reference."""
    errors = tuple(output_error(name, ref, got) for name, ref, got in zip(names, reference, candidate))
    head = next((i for i, ref in enumerate(reference) if is_classifier_output(ref)), None)
    acc_before = acc_after = agreement = None
    if head is not None:
        agreement = top1_agreement(reference[head], candidate[head])
        if labels_usable(reference[head], labels):
            acc_before, acc_after = accuracy(reference[head], labels), accuracy(candidate[head], labels)
    name = names[headline.output]
    if headline.metric == "accuracy":
        quality = Quality("accuracy", name, acc_before, acc_after, acc_before - acc_after)
    elif headline.metric == "top1_agreement":
        quality = Quality("top1_agreement", name, 1.0, agreement, 1.0 - agreement)
    else:
        cosine = errors[headline.output].cosine
        quality = Quality("cosine", name, 1.0, cosine, 1.0 - cosine)
    head_output = headline.output
    return Validation(
        samples=len(reference[0]) if reference else 0,
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        top1_agreement=agreement,
        outputs=errors,
        quality=quality,
        error_distribution=error_distribution(name, reference[head_output], candidate[head_output]),
    )


def model_info(proto: ModelProto, path: Path, data_files: Sequence[Path] = ()) -> ModelInfo:
    """The model file's facts; sizes include its external data files."""
    files = [path, *sorted(data_files)]
    return ModelInfo(
        path=str(path),
        size_bytes=sum(f.stat().st_size for f in files if f.exists()),
        compressed_bytes=compressed_size(files),
        ir_version=proto.ir_version,
        opsets={(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
        producer=f"{proto.producer_name} {proto.producer_version}".strip(),
        external_data=bool(data_files),
    )


def written_data_files(path: Path, external: bool) -> list[Path]:
    """The external data file an output written by `save_model` has (none without external data)."""
    return [path.with_name(external_data_name(path))] if external else []


def compressed_size(paths: Sequence[Path], chunk: int = 1 << 24) -> int:
    """Bytes of the files through zlib at level 1 (fast; zero runs compress at any level)."""
    total = 0
    for path in paths:
        if not path.exists():
            continue
        packer = zlib.compressobj(1)
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                total += len(packer.compress(block))
        total += len(packer.flush())
    return total


def data_info(dataset: Dataset | None) -> DataInfo | None:
    if dataset is None:
        return None
    return DataInfo(
        source=dataset.source,
        samples=len(dataset),
        synthetic=dataset.synthetic,
        labels=dataset.labels is not None,
        notes=dataset.notes,
    )


def _warnings(calibration: Dataset | None, evaluation: Dataset, conversion: Conversion) -> list[str]:
    out = []
    if evaluation.synthetic:
        out.append("evaluation used synthetic inputs: output error is measured, accuracy is not")
    if calibration is not None and calibration.synthetic:
        out.append("calibration used synthetic inputs; real data gives better pruning decisions")
    # float32 kernels differ by ~1e-6 relative between torch and onnxruntime; far above that the
    # bridge computes something else and data-driven scores would describe the wrong model.
    if conversion.relative_error > 1e-3:
        out.append(
            f"the torch conversion differs from onnxruntime (max abs error {conversion.max_abs_error:.3g}, "
            f"relative {conversion.relative_error:.3g}); data-driven scores may describe the wrong model"
        )
    return out


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start
