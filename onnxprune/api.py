"""`prune()`: the whole pipeline, top to bottom in the order of design.md's data flow."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from onnx import ModelProto

from . import __version__
from .bridge.bindings import PrunableTensor, read_tensor, select, write_back
from .bridge.convert import TorchModel, convert
from .config import PruneConfig
from .data import Dataset, InputSpec, input_specs, load_dataset, run_batches, split, synthesize
from .errors import NonFiniteError, UsageError
from .estimators import ESTIMATORS, Estimator
from .gradients import GradientSource, choose_loss
from .memory import GIB, available_bytes, peak_bytes
from .oneshot import OneShotResult, prune_oneshot
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
from .report import (
    Conversion,
    DataInfo,
    Fisher,
    Gate,
    ModelInfo,
    Pruning,
    Quality,
    Report,
    StepInfo,
    TensorSparsity,
    Validation,
)
from .validate import (
    Headline,
    OrtModel,
    accuracy,
    choose_headline,
    is_classifier_output,
    labels_usable,
    output_error,
    top1_agreement,
)

log = logging.getLogger("onnxprune")


def prune(config: PruneConfig) -> Report:
    """Prune `config.input` into `config.output`, validate it in onnxruntime, write the report.

    Raises an OnnxPruneError subclass (with its exit code) on anything the user can fix. A failed
    accuracy gate is not an exception: the output and report are written and
    `report.gate_failed` is True.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    _check_output_free(config)

    with _timed(timings, "load"):
        log.info("loading %s", config.input)
        model = load_model(config.input)
        _check_no_clobber(model, config)
        specs = input_specs(model.proto)
        estimator = ESTIMATORS.get(config.method)(config)
        calibration, evaluation = load_data(config, specs, estimator.needs_gradients)

    with _timed(timings, "reference"):
        log.info("running the original model in onnxruntime on %d evaluation samples", len(evaluation))
        reference = OrtModel(config.input).run(evaluation, specs, config.batch_size)
        headline = choose_headline(reference, evaluation.labels, config.metric)

    with _timed(timings, "convert"):
        log.info("converting to torch")
        torch_model = convert(model.proto)
        torch_model.module.to(device)
        conversion = check_conversion(torch_model, evaluation, specs, reference, config, device)

    candidates = torch_model.prunable
    targets = select(candidates, config.exclude)
    if not targets:
        why = (
            "every prunable weight matches --exclude"
            if candidates
            else "the model has no weights feeding Conv, ConvTranspose, Gemm, MatMul or a recurrent node"
        )
        raise UsageError(f"nothing to prune: {why}")
    for target in targets:
        _require_finite(torch_model.tensors[target.name], f"weight {target.name!r} of the input model")

    with _timed(timings, "prune"):
        source = None
        if estimator.needs_gradients:
            fisher = config.fisher if config.fisher != "auto" else getattr(estimator, "default_fisher", "auto")
            loss = choose_loss(headline, reference, torch_model.output_names, calibration, fisher)
            source = GradientSource(
                torch_model, calibration, specs, loss, config.num_grads, config.fisher_batch, config.seed, device
            )
            log.info("gradients: %s", loss.describe())
        log.info(
            "pruning %d tensors (%s params) with %s, %s scope, %d step(s)",
            len(targets),
            f"{sum(t.numel for t in targets):,}",
            config.method,
            config.scope,
            config.steps,
        )
        outcome = prune_oneshot(
            torch_model,
            targets,
            estimator,
            config.sparsity,
            config.steps,
            config.scope,
            source,
            memory_budget(config),
            Progress(progress_enabled(config.progress)),
            spill_folder=config.output.parent,
        )
        pruned_arrays = outcome.arrays

    with _timed(timings, "write"):
        log.info("writing %s", config.output)
        pruned = write_back(model.proto, pruned_arrays)
        sparsity = measure_sparsity(pruned, targets)
        external = model.uses_external_data or tensor_bytes(pruned) >= EXTERNAL_DATA_THRESHOLD
        save_model(pruned, config.output, external_data=external)
        output = model_info(pruned, config.output, external)
        del pruned

    with _timed(timings, "validate"):
        log.info("validating %s in onnxruntime", config.output)
        written = OrtModel(config.output)
        candidate = written.run(evaluation, specs, config.batch_size)
        validation = compare_outputs(reference, candidate, evaluation.labels, written.output_names, headline)

    timings["total"] = time.perf_counter() - started
    gate = None
    if config.max_drop is not None:
        q = validation.quality
        gate = Gate(max_drop=config.max_drop, metric=q.metric, drop=q.drop, passed=q.drop <= config.max_drop + 1e-12)
    report = Report(
        tool_version=__version__,
        device=str(device),
        config=config.as_dict(),
        input=model_info(model.proto, config.input, model.uses_external_data),
        output=output,
        calibration=data_info(calibration),
        evaluation=data_info(evaluation),
        fisher=fisher_info(source, estimator, outcome),
        pruning=Pruning(
            method=config.method,
            scope=config.scope,
            target_sparsity=config.sparsity,
            tensors=tuple(sparsity),
            params=sum(t.numel for t in sparsity),
            zeros=sum(t.zeros for t in sparsity),
            sparsity=sum(t.zeros for t in sparsity) / max(1, sum(t.numel for t in sparsity)),
            excluded=tuple(t.name for t in candidates if t not in targets),
        ),
        conversion=conversion,
        validation=validation,
        gate=gate,
        timings={k: round(v, 4) for k, v in timings.items()},
        peak_memory_bytes=peak_bytes(),
        warnings=tuple(_warnings(calibration, evaluation, conversion)),
        report_path=str(config.report_path),
    )
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
    for path, what in ((config.output, "output"), (config.report_path, "report")):
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
        inputs = [torch.from_numpy(np.asarray(feeds[name], order="C")).to(device) for name in torch_model.input_names]
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
    ours = run_batches(torch_runner(torch_model, device), evaluation, specs, config.batch_size, limit)
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


def fisher_info(source: GradientSource | None, estimator: Estimator, outcome: OneShotResult) -> Fisher | None:
    if source is None or outcome.plan is None:
        return None
    steps = tuple(
        StepInfo(s.step, s.sparsity, round(s.gradient_seconds, 3), round(s.estimator_seconds, 3), s.collections)
        for s in outcome.steps
    )
    return Fisher(
        loss=source.loss.describe(),
        num_grads=source.count,
        fisher_batch=source.micro_batch,
        calibration_samples_used=source.samples_used,
        estimator=estimator.describe(),
        steps=steps,
        groups=len(outcome.plan.groups),
        statistics_storage=outcome.plan.storage,
        memory_estimate_bytes=outcome.plan.estimate,
        memory_budget_bytes=outcome.plan.budget,
        gradient_seconds=round(sum(s.gradient_seconds for s in steps), 3),
        estimator_seconds=round(sum(s.estimator_seconds for s in steps), 3),
    )


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
    return Validation(
        samples=len(reference[0]) if reference else 0,
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        top1_agreement=agreement,
        outputs=errors,
        quality=quality,
    )


def model_info(proto: ModelProto, path: Path, external: bool) -> ModelInfo:
    size = path.stat().st_size
    if external:
        data = path.with_name(external_data_name(path))
        size += data.stat().st_size if data.exists() else 0
    return ModelInfo(
        path=str(path),
        size_bytes=size,
        ir_version=proto.ir_version,
        opsets={(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
        producer=f"{proto.producer_name} {proto.producer_version}".strip(),
        external_data=external,
    )


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
