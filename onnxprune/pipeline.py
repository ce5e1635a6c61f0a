"""`prune()` and `plan()`: the pipeline as a short sequence of named stages, in the order of the
data flow (docs/architecture.md):

    prepare → resolve → prune_weights → write_and_validate → build_report

Each stage returns a frozen record (Job, Resolved, Pruned, Written, Report) that the next ones
read; the sweep (sweeps.py) runs the same stages.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__, distributed
from .bridge.bindings import release_payloads, write_back
from .bridge.convert import convert
from .checkpoint import RunState, checkpoint_state, fingerprint, resume, save_checkpoint
from .compare import FinalCheck, check_conversion, measure_sparsity, validate_file, written_agreement
from .config import PruneConfig, as_config
from .data import feed_plan, iter_feeds, run_batches
from .environment import environment
from .errors import BrokenOutputError, NonFiniteError, StructureError, UsageError
from .estimators import ESTIMATORS, Estimator
from .finetune import Finetuner, batchnorm_statistics, make_finetuner, reestimate_batchnorm
from .graph_edit import add_biases
from .job import (
    Job,
    Source,
    latency_table,
    load_inputs,
    make_pruner,
    make_repairer,
    schedule_phases,
    select_targets,
    statistics_source,
    trace_structure,
)
from .memory import LARGE_MODEL_BYTES, peak_bytes, release_freed_memory, return_large_allocations, weight_bytes
from .oneshot import OneShotResult
from .onnx_io import EXTERNAL_DATA_THRESHOLD, atomic_write_bytes, save_model, tensor_bytes
from .progress import Progress, progress_enabled
from .report import (
    Gate,
    ModelInfo,
    Pruning,
    Report,
    Schedule,
    TensorSparsity,
    Validation,
)
from .reporting import data_info, finetune_info, fisher_info, model_info, warnings, written_data_files
from .runtime import non_finite_output, reproducible, require_finite, resolve_device, timed, torch_runner
from .searches import Resolved, resolve, statistics_job
from .speed import Speed, measure_speed
from .structure.constraint import ChannelConstraint
from .structure.remove import describe, kept_biases, remove_channels
from .structure.select import removed_classes
from .validate import OrtModel, choose_headline

log = logging.getLogger("onnxprune")


def prune(config: PruneConfig | str | os.PathLike, output: str | os.PathLike | None = None, **settings) -> Report:
    """Prune a model, validate it in onnxruntime, write the output and its JSON report.

    Call it with a `PruneConfig`, or as the command line reads:
    `prune("in.onnx", "out.onnx", sparsity=0.8, method="woodfisher", calibration="calib.npz")`
    (keyword names are PruneConfig's fields). Returns the `Report`. Raises an OnnxPruneError
    subclass (with its exit code) on anything the user can fix. A failed accuracy gate is not an
    exception: the output and report are written and `report.gate_failed` is True.

    Started by `torchrun --nproc-per-node K`, the K processes share the gradients out
    (distributed.py); rank 0 alone writes, and every rank returns its report.
    """
    config = as_config(config, output, settings)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    device = resolve_device(config.device)
    joined = distributed.join(device)  # under torchrun: statistics shared out over the ranks
    try:
        with reproducible(device):  # on CUDA: no TF32, deterministic cuDNN
            torch.manual_seed(config.seed)
            check_output_free(config)
            job = prepare(config, device, timings)
            with timed(timings, "prune"):
                resolved = resolve(config, job)
                pruned = prune_weights(resolved, job)
            release_freed_memory()  # the scores and masks: the model is written and run next
            timings["finetune"] = round(pruned.tuning_seconds, 4)
            report = None
            if distributed.is_writer():
                written = write_and_validate(
                    config, job, pruned.arrays, pruned.added_biases, pruned.final, timings, removed=pruned.removed
                )
                config.checkpoint_path.unlink(missing_ok=True)  # the run is complete: nothing to resume
                timings["total"] = time.perf_counter() - started
                report = build_report(config, job, resolved, pruned, written, timings)
                publish(config, report)
            return distributed.from_writer(report)
    finally:
        if joined:
            distributed.leave()


# ------------------------------------------------------------------------------ the records


@dataclass(frozen=True, kw_only=True)
class Pruned:
    """The outcome of the pruning stage: new tensor values and how they were reached."""

    arrays: dict[str, np.ndarray]
    outcome: OneShotResult
    source: Source
    estimator: Estimator
    phases: list
    resumed_after: int
    trainer: Finetuner | None
    batchnorm: dict[str, torch.Tensor]
    tuning_seconds: float
    final: FinalCheck | None
    repair: dict | None = None  # the repair passes after each step (repair.py)
    added_biases: list = field(default_factory=list)  # (node output, weight, values) for nodes given a bias
    removed: frozenset[int] = frozenset()  # the classes of channels removed (--structure channels)
    # whole channels: the allocator, with the speed target's timed choices and each step's ranking
    channels: ChannelConstraint | None = None


@dataclass(frozen=True, kw_only=True)
class Written:
    """The written model: its file facts, the zeros in it, its validation in onnxruntime."""

    path: Path
    output: ModelInfo
    sparsity: list[TensorSparsity]
    validation: Validation
    agreement: float | None  # largest |final torch output − onnxruntime output|, with a FinalCheck
    gate: Gate | None
    speed: Speed
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # node: (channels kept, before)


# ------------------------------------------------------------------------------ the stages


def prepare(config: PruneConfig, device: torch.device, timings: dict[str, float], methods: tuple[str, ...] = ()) -> Job:
    """Load the model and the data `methods` need (default: the config's method), run the original
    in onnxruntime, convert it, pick the targets."""
    with timed(timings, "load"):
        log.info("loading %s", config.input)
        model, specs, calibration, evaluation = load_inputs(config, methods)

    with timed(timings, "reference"):
        log.info("running the original model in onnxruntime on %d evaluation samples", len(evaluation))
        original = OrtModel(config.input)
        reference = original.run(evaluation, specs, config.eval_batch_size)
        output_names = original.output_names
        del original  # its copy of the weights
        headline = choose_headline(reference, evaluation.labels, config.metric)

    with timed(timings, "convert"):
        log.info("converting to torch")
        torch_model = convert(model.proto)
        if weight_bytes(torch_model.tensors.values()) >= LARGE_MODEL_BYTES:
            return_large_allocations()
        torch_model.module.to(device)
        conversion = check_conversion(
            torch_model, evaluation, specs, reference, config.conversion_check_samples, config.eval_batch_size, device
        )

    targets = select_targets(torch_model, config.exclude)
    for target in targets:
        require_finite(torch_model.tensors[target.name], f"weight {target.name!r} of the input model")
    bad = non_finite_output(reference, output_names)
    if bad:
        raise NonFiniteError(
            f"the input model's output {bad!r} is NaN or infinite on the evaluation data from "
            f"{evaluation.source}, so nothing can be compared; nothing was written"
        )
    input_info = model_info(model.proto, config.input, model.external_files)
    channels = trace_structure(config, model.proto, evaluation, specs, targets)
    latency = latency_table(config, model.proto, evaluation, specs, channels)
    # the targets' values now live in the torch model, and every write-back replaces them
    release_payloads(model.proto, [t.name for t in targets])
    release_freed_memory()
    return Job(
        model=model,
        input_info=input_info,
        specs=specs,
        calibration=calibration,
        evaluation=evaluation,
        reference=reference,
        headline=headline,
        torch_model=torch_model,
        conversion=conversion,
        candidates=torch_model.prunable,
        targets=targets,
        device=device,
        channels=channels,
        latency=latency,
    )


def prune_weights(resolved: Resolved, job: Job) -> Pruned:
    """Prune step by step along the schedule of the resolved config, with the repair, BatchNorm
    re-estimation, fine-tuning and a checkpoint after each step; returns the new values of every
    changed tensor."""
    config = resolved.config
    estimator = ESTIMATORS.get(config.method)(config)
    source = statistics_source(config, statistics_job(config, job, resolved.searched), estimator)
    phases = schedule_phases(config)
    trainer = make_finetuner(
        config, job.torch_model, job.targets, job.calibration, job.specs, job.headline, job.reference, job.device
    )
    batchnorm = batchnorm_statistics(job.torch_model)
    progress = Progress(progress_enabled(config.progress) and distributed.is_writer())
    log.info(
        "pruning %d tensors (%s params) with %s, %s allocation, %s schedule of %d step(s)%s",
        len(job.targets),
        f"{sum(t.numel for t in job.targets):,}",
        config.method,
        config.allocation,
        config.schedule,
        len(phases),
        f", {config.finetune_steps} fine-tuning steps" if trainer else "",
    )
    with make_pruner(config, job, estimator, source, progress) as pruner:
        repairer = make_repairer(config, job, pruner, progress)
        run = RunState(
            torch_model=job.torch_model,
            pruner=pruner,
            estimator=estimator,
            trainer=trainer,
            batchnorm=batchnorm,
            repairer=repairer,
        )
        try:
            done, tuning_seconds = _run_phases(config, job, phases, run, progress)
            outcome = OneShotResult(arrays=pruner.arrays(), steps=pruner.records, plan=pruner.plan)
            removed = removed_channels(job, pruner)
            channels = pruner.allocator if isinstance(pruner.allocator, ChannelConstraint) else None
            arrays, final = _final_values(config, job, run, outcome)
            added = repairer.fold(arrays) if repairer is not None else []
            repair = repairer.report() if repairer is not None else None
        finally:
            if repairer is not None:
                repairer.close()
    return Pruned(
        arrays=arrays,
        outcome=outcome,
        source=source,
        estimator=estimator,
        phases=phases,
        resumed_after=done,
        trainer=trainer,
        batchnorm=batchnorm,
        tuning_seconds=tuning_seconds,
        final=final,
        repair=repair,
        added_biases=added,
        removed=removed,
        channels=channels,
    )


def _run_phases(config: PruneConfig, job: Job, phases: list, run: RunState, progress: Progress) -> tuple[int, float]:
    """The schedule's steps (after those a checkpoint holds, with --resume); returns the steps
    resumed after and the seconds spent fine-tuning."""
    fingerprint_ = fingerprint(config, config.input)
    done = resume(config.checkpoint_path, fingerprint_, run) if config.resume else 0
    tuning_seconds = 0.0
    for index, phase in enumerate(phases[done:], done):
        before = list(run.pruner.keep)
        run.pruner.step(phase.sparsity, phase.label, last=phase.last)
        if run.repairer is not None:
            run.repairer.after_step(phase.label, before)
        if config.batchnorm == "reestimate":
            reestimate_batchnorm(job.torch_model, job.calibration_data, job.specs, config.eval_batch_size, job.device)
        if run.trainer is not None and phase.finetune_steps:
            started = time.perf_counter()
            with progress.task(f"fine-tuning after {phase.label}", phase.finetune_steps, "steps") as task:
                run.trainer.run(phase.finetune_steps, run.pruner.masks(), task.advance)
            tuning_seconds += time.perf_counter() - started
        if len(phases) > 1 and distributed.is_writer():
            save_checkpoint(config.checkpoint_path, checkpoint_state(fingerprint_, index + 1, run))
    return done, tuning_seconds


def _final_values(
    config: PruneConfig, job: Job, run: RunState, outcome: OneShotResult
) -> tuple[dict[str, np.ndarray], FinalCheck | None]:
    """The values to write (pruned tensors, fine-tuned ones, re-estimated BatchNorm statistics)
    and, when weights changed beyond the masks, the final torch model's outputs to check against."""
    reestimated = config.batchnorm == "reestimate"
    if reestimated and run.trainer is not None:
        reestimate_batchnorm(job.torch_model, job.calibration_data, job.specs, config.eval_batch_size, job.device)
    arrays = {
        **outcome.arrays,
        **({k: v.detach().cpu().numpy() for k, v in run.trainer.tensors.items()} if run.trainer else {}),
        **({k: v.detach().cpu().numpy() for k, v in run.batchnorm.items()} if reestimated else {}),
    }
    corrected = run.repairer is not None and bool(run.repairer.corrections.values)
    # removed channels: the smaller graph must compute what the masked torch model computes
    if run.trainer is None and not reestimated and not corrected and job.channels is None:
        return arrays, None
    return arrays, final_check(config, job)


def final_check(config: PruneConfig, job: Job) -> FinalCheck:
    """The torch model's outputs now, on the evaluation samples the conversion was checked on."""
    samples = min(config.conversion_check_samples, len(job.evaluation))
    runner = torch_runner(job.torch_model, job.device)
    outputs = run_batches(runner, job.evaluation, job.specs, config.eval_batch_size, samples)
    return FinalCheck(outputs=outputs, samples=samples)


def write_and_validate(
    config: PruneConfig,
    job: Job,
    arrays: dict[str, np.ndarray],
    added_biases: list,
    final: FinalCheck | None,
    timings: dict[str, float],
    path: Path | None = None,
    removed: frozenset[int] = frozenset(),
) -> Written:
    """Write the model with the new values (to `path`, default the config's output; the
    `removed` classes of channels physically gone), run it in onnxruntime on the evaluation data,
    compare it with the original (and with the final torch model) and time both; NaN or infinity
    in its outputs, or a smaller graph that computes something else, removes what was written and
    raises."""
    path = config.output if path is None else path
    with timed(timings, "write"):
        log.info("writing %s", path)
        proto = write_back(job.model.proto, arrays)
        sparsity = measure_sparsity(proto, job.targets)  # zeros, or entries of removed channels
        layers = remove_channels(proto, job.channels, removed) if job.channels is not None else {}
        # biases the statistics correction adds are sliced like their node's outputs
        add_biases(proto, kept_biases(job.channels, removed, added_biases) if job.channels else added_biases)
        external = job.model.uses_external_data or tensor_bytes(proto) >= EXTERNAL_DATA_THRESHOLD
        save_model(proto, path, external_data=external)
        output = model_info(proto, path, written_data_files(path, external))
        del proto

    with timed(timings, "validate"):
        log.info("validating %s in onnxruntime", path)
        try:
            structured = job.channels is not None
            validation, candidate = validate_file(
                path, job.evaluation, job.specs, job.reference, job.headline, config.eval_batch_size, structured
            )
            agreement = written_agreement(final, candidate, structured)
        except (NonFiniteError, StructureError, BrokenOutputError):
            for written in [path, *written_data_files(path, external=True)]:
                written.unlink(missing_ok=True)
            raise
    with timed(timings, "speed"):
        log.info("timing the original and %s in onnxruntime", path)
        feeds, _ = next(iter_feeds(job.evaluation, job.specs, feed_plan(job.specs, job.evaluation, config.speed_batch)))
        speed = measure_speed(config.input, path, feeds, config.speed_batch, config.speed_runs, config.speed_threads)
    return Written(
        path=path,
        output=output,
        sparsity=sparsity,
        validation=validation,
        agreement=agreement,
        gate=_gate(config, validation),
        speed=speed,
        layers=layers,
    )


def _channels(config: PruneConfig, job: Job, written: Written, pruned: Pruned) -> dict | None:
    """The report's account of removed channels, with the speed target's table and rounds."""
    if job.channels is None:
        return None
    described = describe(job.channels, written.layers)
    if pruned.channels is not None and pruned.channels.rankings:
        described["rankings"] = list(pruned.channels.rankings)
    if config.target_speedup is not None and job.latency is not None:
        target = {
            "target": config.target_speedup,
            "table": job.latency.summary(),
            "rounds": list(pruned.channels.rounds) if pruned.channels else [],
        }
        described["target_speedup"] = target
    return described


def removed_channels(job: Job, pruner) -> frozenset[int]:
    """The classes of channels the pruner's final masks remove (none when unstructured)."""
    if job.channels is None:
        return frozenset()
    masks = {name: mask.cpu().numpy() for name, mask in pruner.masks().items()}
    return frozenset(removed_classes(job.channels, masks))


def _gate(config: PruneConfig, validation: Validation) -> Gate | None:
    """The accuracy gate of --max-drop (None without it)."""
    if config.max_drop is None:
        return None
    q = validation.quality
    return Gate(max_drop=config.max_drop, metric=q.metric, drop=q.drop, passed=q.drop <= config.max_drop + 1e-12)


def build_report(
    config: PruneConfig, job: Job, resolved: Resolved, pruned: Pruned, written: Written, timings: dict[str, float]
) -> Report:
    """The run's report: the config as given, what the searches chose, the data, statistics,
    schedule, fine-tuning, the tensors as written and their validation."""
    chosen, sparsity = resolved.config, written.sparsity
    params, zeros = sum(t.numel for t in sparsity), sum(t.zeros for t in sparsity)
    return Report(
        tool_version=__version__,
        device=str(job.device),
        config=config.as_dict(),
        input=job.input_info,
        output=written.output,
        calibration=data_info(job.calibration),
        evaluation=data_info(job.evaluation),
        fisher=fisher_info(pruned.source, pruned.estimator, pruned.outcome, resolved.estimator_searches),
        schedule=Schedule(
            name=config.schedule,
            sparsities=tuple(round(p.sparsity, 6) for p in pruned.phases),
            finetune_steps=tuple(p.finetune_steps for p in pruned.phases),
            resumed_after=pruned.resumed_after,
            torch_vs_onnxruntime_max_abs_error=written.agreement,
        ),
        finetune=finetune_info(pruned.trainer, config, pruned.tuning_seconds, pruned.batchnorm),
        pruning=Pruning(
            method=chosen.method,
            scope=chosen.allocation,
            allocation=chosen.allocation,
            target_sparsity=config.sparsity,
            tensors=tuple(sparsity),
            params=params,
            zeros=zeros,
            sparsity=zeros / max(1, params),
            excluded=tuple(t.name for t in job.candidates if t not in job.targets),
            allocation_search=resolved.allocation,
            repair=pruned.repair,
            method_search=resolved.method,
            structure=config.structure,
            channels=_channels(config, job, written, pruned),
        ),
        speed=written.speed,
        conversion=job.conversion,
        validation=written.validation,
        gate=written.gate,
        timings={k: round(v, 4) for k, v in timings.items()},
        peak_memory_bytes=peak_bytes(),
        warnings=tuple(warnings(job.calibration, job.evaluation, job.conversion)),
        report_path=str(config.report_path),
        html_path=str(config.html) if config.html else None,
        environment=environment(),
    )


def publish(config: PruneConfig, report: Report) -> None:
    """Write the report as JSON (and as an HTML page with --html), atomically."""
    if config.html is not None:
        from .html import render_html

        atomic_write_bytes(config.html, render_html(report).encode())
    atomic_write_bytes(config.report_path, report.to_json().encode())


# ------------------------------------------------------------------------------ checks


def check_output_free(config: PruneConfig) -> None:
    """A usage error, before any work, when an output path cannot be written."""
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
