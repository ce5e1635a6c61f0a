"""What every pruning of one input shares (`Job`), and the parts built from it for one pruning:
the statistics source, the Pruner, the repair, the held-out loss and the calibration splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from onnx import ModelProto

from .activations import ActivationSource
from .allocation import output_loss
from .allocators import ALLOCATORS
from .bridge.bindings import PrunableTensor, select
from .bridge.convert import TorchModel
from .config import PruneConfig
from .data import Dataset, InputSpec, feed_plan, input_specs, iter_feeds, load_data, run_batches, split
from .errors import SpeedTargetError, UsageError
from .estimators import DEFAULT_METHOD, ESTIMATORS, METHOD_AUTO, Estimator
from .gradients import FisherLoss, GradientSource, choose_loss
from .masks import parse_pattern
from .oneshot import Pruner
from .onnx_io import LoadedModel, external_data_name, load_model, load_payloads
from .progress import Progress
from .repair import Repairer, repair_passes, repair_settings
from .report import Conversion, ModelInfo
from .reuse import ScoreCache
from .runtime import memory_budget, torch_runner
from .schedule import SCHEDULES
from .structure import DEFAULT_STRUCTURE, STRUCTURES, ChannelGraph
from .structure.constraint import SPEED_SCHEDULE_END
from .structure.latency import LatencyTable, measure_table
from .validate import Headline, output_kind

log = logging.getLogger("onnxprune")

Source = GradientSource | ActivationSource | None


@dataclass(frozen=True, kw_only=True)
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
    channels: ChannelGraph | None = None  # the removable groups, for --structure channels
    latency: LatencyTable | None = None  # measured savings of removing channels, for --target-speedup
    # the first step's statistics, from the searches' trials to the run (copies of the job share it)
    scores: ScoreCache = field(default_factory=ScoreCache)

    @property
    def calibration_data(self) -> Dataset:
        """The calibration data, for stages that only run where it was loaded."""
        if self.calibration is None:
            raise UsageError("this step needs calibration data (--calib)")
        return self.calibration


def needs_calibration(config: PruneConfig, methods: Sequence[str]) -> bool:
    """Whether a run of any of `methods` (--method auto: all of them) reads calibration data."""
    if METHOD_AUTO in methods or config.finetune_steps > 0 or config.batchnorm == "reestimate":
        return True
    if config.allocation in ALLOCATORS and ALLOCATORS.get(config.allocation).needs_evaluation:
        return True
    return any(ESTIMATORS.get(m).needs_gradients or ESTIMATORS.get(m).needs_activations for m in methods)


def load_inputs(
    config: PruneConfig, methods: Sequence[str] = ()
) -> tuple[LoadedModel, list[InputSpec], Dataset | None, Dataset]:
    """The checked model, its input specs, and the calibration and evaluation data that `methods`
    (default: the config's) need."""
    model = load_model(config.input)
    check_no_clobber(model, config)
    specs = list(input_specs(model.proto))
    calibration, evaluation = load_data(config, specs, needs_calibration(config, methods or [config.method]))
    return model, specs, calibration, evaluation


def check_no_clobber(model: LoadedModel, config: PruneConfig) -> None:
    """A usage error when writing the output would replace the input's external data file."""
    data_file = config.output.with_name(external_data_name(config.output))
    for used in model.external_files:
        if data_file.resolve() == used.resolve():
            raise UsageError(
                f"writing {config.output} would replace {used.name}, the input's external data; "
                "choose another output name"
            )


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
    return SCHEDULES.get(config.schedule)(final_sparsity(config), steps, config.initial_sparsity, config.finetune_steps)


def final_sparsity(config: PruneConfig) -> float:
    """What the schedule steps to: the sparsity, or towards a speed-up only the schedule's
    progress (constraint.py turns it into each step's speed-up)."""
    return config.sparsity if config.target_speedup is None else SPEED_SCHEDULE_END


def make_estimator(config: PruneConfig) -> Estimator:
    """The configured estimator (--method auto not yet resolved: the default method)."""
    return ESTIMATORS.get(DEFAULT_METHOD if config.method == METHOD_AUTO else config.method)(config)


def statistics_source(config: PruneConfig, job: Job, estimator: Estimator) -> Source:
    """Where the estimator's statistics come from: gradients of a loss, the layers' calibration
    inputs, or nothing (data-free estimators)."""
    if estimator.needs_activations:
        log.info("statistics: the inputs of each pruned layer on %d calibration samples", config.num_grads)
        source = ActivationSource(
            job.torch_model,
            job.calibration_data,
            job.specs,
            job.targets,
            config.num_grads,
            config.eval_batch_size,
            config.seed,
            job.device,
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
        job.torch_model,
        job.calibration_data,
        job.specs,
        loss,
        config.num_grads,
        config.fisher_batch,
        config.seed,
        job.device,
    )


def fisher_loss(config: PruneConfig, job: Job, estimator: Estimator) -> FisherLoss:
    """The loss whose gradients give the estimator's Fisher (--fisher, or the estimator's default)."""
    fisher = config.fisher if config.fisher != "auto" else estimator.default_fisher
    return choose_loss(job.headline, job.reference, job.torch_model.output_names, job.calibration_data, fisher)


def make_pruner(
    config: PruneConfig, job: Job, estimator: Estimator, source: Source, progress: Progress, reuse: str = "take"
) -> Pruner:
    """A Pruner over the job's targets for a config whose damping and allocation are resolved
    (statistics spill, when they must, next to the output); `reuse`: "offer" for a search's
    trial (its first-step statistics shared with the others), "take" for the run."""
    return Pruner(
        job.torch_model,
        job.targets,
        estimator,
        config.allocation,
        (lambda step: source) if source is not None else None,
        memory_budget(config),
        progress,
        spill_folder=config.output.parent,
        pattern=parse_pattern(config.pattern),
        evaluate=loss_evaluator(config, job) if _evaluates(config) else None,
        channels=job.channels,
        latency=job.latency,
        speedup=config.target_speedup,
        cache=job.scores,
        reuse=reuse,
    )


def _evaluates(config: PruneConfig) -> bool:
    """Whether the pruner measures held-out losses: for the sensitivity allocation, for
    --target-speedup's choice of widths (each group's widths measured, not summed) and, removing
    whole channels, for the choice between group and summed saliencies."""
    return (
        ALLOCATORS.get(config.allocation).needs_evaluation
        or config.target_speedup is not None
        or config.structure != DEFAULT_STRUCTURE
    )


def loss_evaluator(config: PruneConfig, job: Job) -> Callable[[], float]:
    """A function giving how far the torch model's headline output is now from the dense model's,
    on `sensitivity_samples` calibration samples (dense outputs taken when this is called)."""
    calibration = job.calibration_data
    count = min(config.sensitivity_samples, len(calibration))
    chosen = np.sort(np.random.default_rng(config.seed + 2).permutation(len(calibration))[:count])
    samples = calibration.take(chosen, "sensitivity samples")
    run = torch_runner(job.torch_model, job.device)
    output = job.headline.output
    kind = output_kind(job.reference[output])

    def headline() -> torch.Tensor:
        rows = run_batches(run, samples, job.specs, config.eval_batch_size, count)[output]
        return torch.from_numpy(np.asarray(rows, dtype=np.float64).reshape(count, -1))

    dense = headline()
    return lambda: output_loss(dense, headline(), kind)


def search_split(config: PruneConfig, calibration: Dataset) -> tuple[Dataset, Dataset]:
    """(fit, held): every calibration sample but the held-out ones, and the held-out ones (a
    quarter, at most `sensitivity_samples`) the automatic searches measure their losses on and the
    repair judges its passes on: samples the statistics never draw where there are enough of them
    (`--search-holdout unused`, see `search_statistics`), else a random quarter."""
    n = len(calibration)
    held = _unused_holdout(config, n)
    if held is None:
        return split(calibration, _held_count(config, n) / n, config.seed + 3)
    rest = np.setdiff1d(np.arange(n), held)
    return (
        calibration.take(rest, f"{calibration.source} (all but {len(held)} held out)"),
        calibration.take(held, f"{calibration.source} ({len(held)} held out, none drawn for the statistics)"),
    )


def search_statistics(config: PruneConfig, calibration: Dataset) -> Dataset:
    """The samples the searches' trials (and the run after a search) draw their statistics from:
    all of them when the held-out ones are among those the statistics never draw (the trials then
    prune with exactly the statistics of a run without a search), else all but the held-out ones."""
    if _unused_holdout(config, len(calibration)) is not None:
        return calibration
    return search_split(config, calibration)[0]


def _held_count(config: PruneConfig, n: int) -> int:
    return min(config.sensitivity_samples, max(1, n // 4))


def _unused_holdout(config: PruneConfig, n: int) -> np.ndarray | None:
    """The held-out samples' indices chosen among those the statistics do not draw, or None when
    --search-holdout is quarter or too few samples are left. GradientSource and ActivationSource
    draw the first num_grads × fisher_batch (num_grads) entries of the same seeded permutation."""
    count, drawn = _held_count(config, n), config.num_grads * config.fisher_batch
    if config.search_holdout != "unused" or n - drawn < count:
        return None
    unused = np.random.default_rng(config.seed).permutation(n)[drawn:]
    return np.sort(np.random.default_rng(config.seed + 3).choice(unused, count, replace=False))


def repair_data(config: PruneConfig, calibration: Dataset) -> tuple[Dataset, Dataset]:
    """(samples the repair's moments are taken on, held-out samples its passes are judged on):
    the held-out part of the automatic searches, and up to `repair_samples` of the rest."""
    fit, held = search_split(config, calibration)
    count = min(config.repair_samples, len(fit))
    chosen = np.sort(np.random.default_rng(config.seed + 4).permutation(len(fit))[:count])
    return fit.take(chosen, "repair samples"), held


def make_repairer(
    config: PruneConfig,
    job: Job,
    pruner: Pruner,
    progress: Progress,
    settings: Any = None,
    min_samples: int = 4,
) -> Repairer | None:
    """The repair passes after each pruning step (`settings`, default the config's), or None
    when none is on or there is no real calibration data (fewer than `min_samples`): moments on
    up to `repair_samples` calibration samples, the held-out loss on others (the split of the
    automatic searches)."""
    settings = settings or repair_settings(config)
    if job.channels is not None:
        # whole channels: swapping single entries would break them (the least-squares refit and
        # the statistics correction, which gives the consumers of removed channels their mean back,
        # stay)
        settings = replace(settings, refine_masks=False)
    if config.schedule == "gradual":
        # fine-tuning between steps recovers from what one step's held-out loss sees: WoodFisher on
        # a digits MLP at 95% in 8 steps kept 0.897 with the update scaled at each step, 0.950 without
        settings = replace(settings, scale_update=False)
    calibration = job.calibration
    if calibration is None or calibration.synthetic or len(calibration) < min_samples:
        return None
    if not repair_passes(settings, pruner):
        return None
    samples, held = repair_data(config, calibration)
    evaluate = loss_evaluator(config, replace(job, calibration=held))
    return Repairer(
        settings,
        job.torch_model,
        pruner,
        samples,
        job.specs,
        evaluate,
        job.device,
        progress,
        config.eval_batch_size,
    )


def spill_folder(config: PruneConfig) -> Path:
    """Where statistics that do not fit in memory go: next to the output."""
    return config.output.parent


def trace_structure(
    config: PruneConfig, proto: ModelProto, data: Dataset, specs: Sequence[InputSpec], targets: Sequence[PrunableTensor]
) -> ChannelGraph | None:
    """The removable groups of channels for --structure (None: unstructured), traced on one
    sample of `data`; channels touching a weight left out of the targets (--exclude) stay. A
    model with nothing removable is a usage error naming why."""
    kind = STRUCTURES.get(config.structure)()
    if config.structure != DEFAULT_STRUCTURE:
        load_payloads(proto)  # tracing and removing channels edit and run the model's own tensors
    feeds, _ = next(iter_feeds(data, specs, feed_plan(specs, data, 1)))
    channels = kind.trace(proto, feeds)
    if channels is None:
        return None
    names = {t.name for t in targets}
    for edit in channels.edits:
        if edit.initializer in channels.weights and edit.initializer not in names:
            channels.block(edit.labels, f"{edit.initializer!r} is left dense (--exclude)")
    if not channels.classes():
        reasons = sorted(set(channels.blocked.values()))
        shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        raise UsageError(
            f"--structure {config.structure}: no channel of {config.input.name} can be removed "
            f"({shown or 'no Conv, Gemm or MatMul with a constant weight'}); use --structure unstructured"
        )
    return channels


def latency_table(
    config: PruneConfig, proto: ModelProto, data: Dataset, specs: Sequence[InputSpec], channels: ChannelGraph | None
) -> LatencyTable | None:
    """For --target-speedup, the measured latency table of the removable channels (speed batch
    and threads of the config); a target that removing every removable channel does not reach
    (measured) is an error before any pruning."""
    if config.target_speedup is None or channels is None:
        return None
    feeds, _ = next(iter_feeds(data, specs, feed_plan(specs, data, config.speed_batch)))
    log.info("latency table: timing %s with parts of each group of channels removed", config.input.name)
    table = measure_table(
        proto, channels, feeds, config.speed_batch, config.speed_runs, config.speed_threads, log=log.info
    )
    most = table.speedup_of(table.most_removed())
    log.info("latency table: dense %.3f ms; every removable channel gone: %.2fx (measured)", table.dense_ms, most)
    if most < config.target_speedup:
        raise SpeedTargetError(
            f"--target-speedup {config.target_speedup:g} cannot be reached on {config.input.name}: with every "
            f"removable channel gone (each layer keeping one) it runs {most:.2f}x faster in onnxruntime "
            f"(batch {config.speed_batch}, {table.threads} threads, measured); ask for less than {most:.2f}, or "
            "see the report's left_in_place for the channels that cannot be removed; nothing was written"
        )
    return table
