"""Running models in onnxruntime and measuring how far the pruned one strays from the original."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import Dataset, InputSpec, run_batches
from .errors import CalibrationDataError, InvalidModelError, UsageError
from .sessions import cpu_session


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class OrtModel:
    """An onnxruntime session on a model file, CPU provider (deterministic, present everywhere)."""

    def __init__(self, path: Path):
        try:
            self.session = cpu_session(path)
        except Exception as exc:
            raise InvalidModelError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from None
        self.path = Path(path)
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(
        self, dataset: Dataset, specs: Sequence[InputSpec], batch_size: int, limit: int | None = None
    ) -> list[np.ndarray]:
        """Outputs over the dataset; feeds the model rejects are a data problem (exit 5)."""
        try:
            return run_batches(lambda feeds: self.session.run(None, feeds), dataset, specs, batch_size, limit)
        except CalibrationDataError:
            raise
        except Exception as exc:
            raise CalibrationDataError(
                f"onnxruntime rejected the data from {dataset.source} on {self.path.name}: {_first_line(exc)}"
            ) from None


@dataclass(frozen=True)
class OutputError:
    """How one output of the candidate differs from the reference, over all samples."""

    name: str
    max_abs_error: float
    mean_abs_error: float
    cosine: float  # mean over samples of the cosine similarity of the flattened outputs


def output_error(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputError:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"output {name!r}: shapes differ {ref.shape} vs {cand.shape}")
    diff = np.abs(ref - cand)
    return OutputError(
        name=name,
        max_abs_error=float(diff.max()) if diff.size else 0.0,
        mean_abs_error=float(diff.mean()) if diff.size else 0.0,
        cosine=mean_cosine(ref, cand),
    )


@dataclass(frozen=True)
class ErrorDistribution:
    """How the per-sample error of one output is spread: the largest absolute difference of each
    sample's output, as quantiles and as a histogram (log-spaced bins when it spans decades)."""

    output: str
    statistic: str
    quantiles: dict[str, float]  # p50, p90, p99, max
    bin_edges: tuple[float, ...]
    counts: tuple[int, ...]


def error_distribution(name: str, reference: np.ndarray, candidate: np.ndarray, bins: int = 30) -> ErrorDistribution:
    """Per-sample max abs error of `candidate` against `reference` (samples on axis 0)."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.abs(ref - np.asarray(candidate, dtype=np.float64)).reshape(len(ref), -1) if len(ref) else np.zeros((0, 1))
    per_sample = diff.max(axis=1) if diff.size else np.zeros(len(ref))
    quantiles = {
        q: float(np.quantile(per_sample, level)) if per_sample.size else 0.0
        for q, level in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
    }
    positive = per_sample[per_sample > 0]
    if positive.size:
        low, high = float(positive.min()), float(positive.max())
        if high <= low:
            edges = np.array([low * 0.5, low * 1.5])
        elif high / low > 100:  # errors spread over decades: log-spaced bins
            edges = np.geomspace(low, high * (1 + 1e-9), bins + 1)
        else:
            edges = np.linspace(low, high * (1 + 1e-9), bins + 1)
    else:
        edges = np.array([0.0, 1.0])
    counts, _ = np.histogram(np.clip(per_sample, edges[0], edges[-1]), bins=edges)
    return ErrorDistribution(
        output=name,
        statistic="per-sample max abs error",
        quantiles=quantiles,
        bin_edges=tuple(float(e) for e in edges),
        counts=tuple(int(c) for c in counts),
    )


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over samples (axis 0) of the cosine similarity; two zero vectors count as identical."""
    a = np.asarray(reference, dtype=np.float64)
    a = a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1)
    b = np.asarray(candidate, dtype=np.float64).reshape(a.shape)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = np.where((norm_a == 0) & (norm_b == 0), 1.0, 0.0)
    cos = np.divide((a * b).sum(axis=1), norm_a * norm_b, out=both_zero, where=norm_a * norm_b > 0)
    return float(cos.mean()) if cos.size else 1.0


def output_kind(output: np.ndarray) -> str:
    """What a [samples, features] float output looks like: 'probabilities' (rows non-negative,
    summing to 1), 'embedding' (rows of unit L2 norm), 'logits' (any other scores over at least
    two classes), or 'other' (any other shape or dtype)."""
    if output.ndim != 2 or output.shape[1] < 2 or not np.issubdtype(output.dtype, np.floating) or not len(output):
        return "other"
    rows = output.astype(np.float64)
    if (rows >= 0).all() and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3):
        return "probabilities"
    if np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3):
        return "embedding"
    return "logits"


def is_classifier_output(output: np.ndarray) -> bool:
    """Scores over classes (logits or probabilities), shape [samples, classes]."""
    return output_kind(output) in ("logits", "probabilities")


METRICS = ("auto", "accuracy", "agreement", "cosine")


@dataclass(frozen=True)
class Headline:
    """The metric the report leads with and the gate uses, and the output it is measured on."""

    metric: str
    output: int


def choose_headline(reference: list[np.ndarray], labels: np.ndarray | None, requested: str = "auto") -> Headline:
    """auto: accuracy with usable labels, else top-1 agreement for a classifier output, else the
    cosine of the first output. An explicit request that the data cannot support is an error."""
    classifier = next((i for i, out in enumerate(reference) if is_classifier_output(out)), None)
    labelled = classifier is not None and labels_usable(reference[classifier], labels)
    if requested == "accuracy" and not labelled:
        raise UsageError("--metric accuracy needs a classifier output and integer class labels in the evaluation data")
    if requested == "agreement" and classifier is None:
        raise UsageError("--metric agreement needs a classifier output ([samples, classes] scores)")
    if classifier is not None and (requested == "accuracy" or (requested == "auto" and labelled)):
        return Headline("accuracy", classifier)
    if classifier is not None and requested in ("agreement", "auto"):
        return Headline("top1_agreement", classifier)
    return Headline("cosine", 0)


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of samples whose arg-max class is the same in both outputs."""
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(candidate, axis=1)))


def accuracy(output: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of class scores against integer labels."""
    return float(np.mean(np.argmax(output, axis=1) == labels.reshape(-1)))


def class_labels_fit(labels: np.ndarray, classes: int) -> bool:
    """Whether `labels` are one integer class index in [0, classes) per sample."""
    flat = labels.reshape(-1) if labels.size == len(labels) else None
    if flat is None or flat.dtype.kind not in "iu":
        return False
    return bool(flat.size == 0 or (flat.min() >= 0 and flat.max() < classes))


def labels_usable(output: np.ndarray, labels: np.ndarray | None) -> bool:
    """Whether `labels` are class indices for the classifier `output` (one per sample)."""
    if labels is None or not is_classifier_output(output) or len(labels) != len(output):
        return False
    return class_labels_fit(labels, output.shape[1])
