"""Outputs compared: the torch conversion against onnxruntime, the written model against the
original and against the final torch model, and the zeros counted in what was written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from onnx import ModelProto

from .bridge.bindings import PrunableTensor, read_tensor
from .bridge.convert import TorchModel
from .data import Dataset, InputSpec, run_batches
from .errors import BrokenOutputError, CalibrationDataError, InvalidModelError, NonFiniteError, StructureError
from .report import Conversion, Quality, TensorSparsity, Validation
from .runtime import non_finite_output, torch_runner
from .validate import (
    Headline,
    OrtModel,
    accuracy,
    error_distribution,
    is_classifier_output,
    labels_usable,
    output_error,
    top1_agreement,
)


def check_conversion(
    torch_model: TorchModel,
    evaluation: Dataset,
    specs: Sequence[InputSpec],
    reference: list[np.ndarray],
    samples: int,
    batch_size: int,
    device: torch.device,
) -> Conversion:
    """The dense torch model against onnxruntime's outputs on the first `samples` evaluation samples."""
    limit = min(samples, len(evaluation))
    ours = run_batches(torch_runner(torch_model, device), evaluation, specs, batch_size, limit)
    errors = tuple(
        output_error(name, ref[:limit], got) for name, ref, got in zip(torch_model.output_names, reference, ours)
    )
    scale = max((float(np.abs(ref[:limit]).max()) for ref in reference if ref.size), default=0.0)
    worst = max((e.max_abs_error for e in errors), default=0.0)
    relative = worst / scale if scale > 0 else worst
    return Conversion(samples=limit, max_abs_error=worst, relative_error=relative, outputs=errors)


def validate_file(
    path: Path,
    evaluation: Dataset,
    specs: Sequence[InputSpec],
    reference: list[np.ndarray],
    headline: Headline,
    batch_size: int,
    structured: bool = False,
) -> tuple[Validation, list[np.ndarray]]:
    """Run the written model in onnxruntime on the evaluation data and compare with the original;
    NaN or infinity in its outputs is a NonFiniteError. The original ran this data, so a written
    model onnxruntime cannot load or run is ours to explain: with channels removed (`structured`)
    a StructureError (a dependency the trace missed), otherwise a BrokenOutputError (a bug)."""
    try:
        written = OrtModel(path)
        candidate = written.run(evaluation, specs, batch_size)
    except (InvalidModelError, CalibrationDataError) as exc:
        message = f"the pruned model fails in onnxruntime where the original ran ({exc}); nothing was written. "
        if structured:
            raise StructureError(
                message + "A dependency the channel trace missed: please report it with the model; "
                "--structure unstructured works meanwhile"
            ) from None
        raise BrokenOutputError(message + "This is a bug in onnxprune: please report it with the model") from None
    bad = non_finite_output(candidate, written.output_names)
    if bad:
        raise NonFiniteError(
            f"the pruned model's output {bad!r} is NaN or infinite on the evaluation data; nothing was written"
        )
    return compare_outputs(reference, candidate, evaluation.labels, written.output_names, headline), candidate


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
        if labels is not None and labels_usable(reference[head], labels):
            acc_before, acc_after = accuracy(reference[head], labels), accuracy(candidate[head], labels)
    name = names[headline.output]
    quality = _quality(headline, name, acc_before, acc_after, agreement, errors[headline.output].cosine)
    return Validation(
        samples=len(reference[0]) if reference else 0,
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        top1_agreement=agreement,
        outputs=errors,
        quality=quality,
        error_distribution=error_distribution(name, reference[headline.output], candidate[headline.output]),
    )


def _quality(
    headline: Headline,
    name: str,
    acc_before: float | None,
    acc_after: float | None,
    agreement: float | None,
    cosine: float,
) -> Quality:
    """The headline metric before and after (accuracy, top-1 agreement or cosine)."""
    if headline.metric == "accuracy" and acc_before is not None and acc_after is not None:
        return Quality("accuracy", name, acc_before, acc_after, acc_before - acc_after)
    if headline.metric == "top1_agreement" and agreement is not None:
        return Quality("top1_agreement", name, 1.0, agreement, 1.0 - agreement)
    return Quality("cosine", name, 1.0, cosine, 1.0 - cosine)


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


@dataclass(frozen=True, kw_only=True)
class FinalCheck:
    """The final torch model's outputs on the first `samples` evaluation samples, taken when the
    weights changed beyond the masks (fine-tuning, BatchNorm, folded corrections): the written
    model is checked against them, not only against the dense reference."""

    outputs: list[np.ndarray]
    samples: int


def written_agreement(final: FinalCheck | None, candidate: list[np.ndarray], structured: bool) -> float | None:
    """The largest |final torch output − written model's output| (None without a FinalCheck);
    with channels removed, a StructureError when they disagree beyond float rounding."""
    if final is None:
        return None
    agreement = max(
        float(np.abs(ours - got[: final.samples].astype(np.float64)).max()) if ours.size else 0.0
        for ours, got in zip(final.outputs, candidate)
    )
    scale = max((float(np.abs(ours).max()) for ours in final.outputs if ours.size), default=1.0)
    if structured and agreement > 1e-3 * max(1.0, scale):
        raise StructureError(
            f"the model with channels removed differs from the pruned torch model by {agreement:.3g} "
            "(a dependency the channel trace missed); nothing was written. Please report it with the model; "
            "--structure unstructured works meanwhile"
        )
    return agreement
