"""The report's parts, assembled from what the stages produced: file facts, data, statistics,
fine-tuning and warnings (the report's types are in report.py)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Collection, Sequence, overload

import torch
from onnx import ModelProto

from .activations import ActivationSource
from .config import PruneConfig
from .data import Dataset
from .estimators import Estimator
from .finetune import Finetuner
from .gradients import GradientSource
from .oneshot import OneShotResult
from .onnx_io import external_data_name
from .report import Conversion, DataInfo, Finetune, Fisher, ModelInfo, StepInfo


def model_info(proto: ModelProto, path: Path, data_files: Collection[Path] = ()) -> ModelInfo:
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


@overload
def data_info(dataset: Dataset) -> DataInfo: ...
@overload
def data_info(dataset: None) -> None: ...
@overload
def data_info(dataset: Dataset | None) -> DataInfo | None: ...
def data_info(dataset: Dataset | None) -> DataInfo | None:
    """What the report says of a data set (None: no data set)."""
    if dataset is None:
        return None
    return DataInfo(
        source=dataset.source,
        samples=len(dataset),
        synthetic=dataset.synthetic,
        labels=dataset.labels is not None,
        notes=dataset.notes,
    )


def fisher_info(
    source: GradientSource | ActivationSource | None,
    estimator: Estimator,
    outcome: OneShotResult,
    searches: dict[str, dict | None],
) -> Fisher | None:
    """The statistics the estimator used (None for data-free estimators); `searches` holds the
    automatic damping and mix searches that chose its settings, reported with them."""
    if source is None:
        return None
    steps = tuple(
        StepInfo(s.step, s.sparsity, round(s.gradient_seconds, 3), round(s.estimator_seconds, 3), s.collections)
        for s in outcome.steps
    )
    shared: dict[str, Any] = dict(
        num_grads=source.count,
        calibration_samples_used=source.samples_used,
        estimator=estimator_details(estimator, searches),
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
        loss = "none: each layer's output error on its calibration inputs, ‖ΔW·X‖² (H = 2XᵀX)"
        if source.loss is not None:  # combined: each output unit's rows weighted by its task-loss Fisher
            loss = (
                f"each layer's output error on its calibration inputs, each output unit's row weighted by "
                f"its Fisher (K-FAC) under {source.loss.describe()}"
            )
        return Fisher(
            loss=loss,
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


def estimator_details(estimator: Estimator, searches: dict[str, dict | None]) -> dict:
    """The estimator's settings for the report, with the damping and mix searches that ran."""
    details = estimator.describe()
    for name in ("mix", "damp"):  # the order the report has always had
        if searches.get(name) is not None:
            details[f"{name}_search"] = searches[name]
    return details


def finetune_info(
    trainer: Finetuner | None, config: PruneConfig, seconds: float, batchnorm: dict[str, torch.Tensor]
) -> Finetune | None:
    """The fine-tuning's settings and loss curve (at most 200 points); None without fine-tuning."""
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
        augmentation=trainer.augmentation,
        loss_curve=tuple(round(v, 6) for v in trainer.curve[::stride]),
        seconds=round(seconds, 3),
    )


def warnings(calibration: Dataset | None, evaluation: Dataset, conversion: Conversion) -> list[str]:
    """What the reader of the report should know about the data and the conversion."""
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
