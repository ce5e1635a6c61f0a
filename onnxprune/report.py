"""The report of one run: what was pruned, how close the output stays, and whether the gate passed.

`Report.to_dict()` is the JSON document (`SCHEMA_VERSION` changes when a field changes meaning or
disappears; new fields may be added within a version). `format_human()` is the short table on
stderr.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from .speed import Speed, speed_lines
from .structure.remove import channel_lines
from .validate import ErrorDistribution, OutputError

SCHEMA_VERSION = 1


class JsonDocument:
    """A report dataclass written as JSON: its fields, plus `exit_code` where it has one."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(cast(Any, self))  # every subclass is a dataclass
        if hasattr(self, "exit_code"):
            data["exit_code"] = self.exit_code
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_jsonable) + "\n"


@dataclass(frozen=True)
class ModelInfo:
    path: str
    size_bytes: int  # the .onnx file plus its external data files
    ir_version: int
    opsets: dict[str, int]
    producer: str
    external_data: bool
    compressed_bytes: int = 0  # the same files through zlib (level 1): what sparsity saves in transit


@dataclass(frozen=True)
class DataInfo:
    source: str
    samples: int
    synthetic: bool
    labels: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorSparsity:
    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int  # counted in the written tensor
    sparsity: float
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Pruning:
    method: str
    scope: str
    target_sparsity: float
    tensors: tuple[TensorSparsity, ...]
    params: int  # entries of the pruned tensors
    zeros: int
    sparsity: float  # zeros / params over the pruned tensors
    excluded: tuple[str, ...]  # prunable tensors left dense by --exclude
    allocation_search: dict | None = None  # --allocation auto: candidates, held-out losses, choice
    repair: dict | None = None  # the repair passes after each pruning step (repair.py)
    method_search: dict | None = None  # --method auto: candidates, held-out losses, seconds, choice
    allocation: str = ""  # the split across tensors (`scope` is its former name, kept beside it)
    structure: str = "unstructured"  # what was removed: single weights, or whole channels
    channels: dict | None = None  # --structure channels: layers kept/before, what stayed and why


@dataclass(frozen=True)
class StepInfo:
    step: int
    sparsity: float
    gradient_seconds: float
    estimator_seconds: float
    collections: int


@dataclass(frozen=True)
class Fisher:
    """How the second-order statistics were made (absent for data-free estimators)."""

    loss: str
    statistics: str  # "gradients" or "layer inputs" (Wanda, SparseGPT: num_grads is then samples)
    num_grads: int
    fisher_batch: int
    calibration_samples_used: int
    estimator: dict[str, Any]
    steps: tuple[StepInfo, ...]
    groups: int  # tensors are processed in this many groups to fit the memory budget
    # where statistics wait for the weight update: memory, disk (spilled next to the output and
    # removed after), recompute (gradients collected again), none
    statistics_storage: str
    memory_estimate_bytes: int
    memory_budget_bytes: int
    gradient_seconds: float
    estimator_seconds: float


@dataclass(frozen=True)
class Conversion:
    """The dense torch model against onnxruntime on the original: is the bridge faithful?"""

    samples: int
    max_abs_error: float
    relative_error: float  # max_abs_error / largest |reference output|
    outputs: tuple[OutputError, ...]


@dataclass(frozen=True)
class Quality:
    """The headline metric: accuracy with labels, else top-1 agreement, else output cosine."""

    metric: str
    output: str
    before: float
    after: float
    drop: float


@dataclass(frozen=True)
class Validation:
    samples: int
    accuracy_before: float | None
    accuracy_after: float | None
    top1_agreement: float | None
    outputs: tuple[OutputError, ...]
    quality: Quality
    error_distribution: ErrorDistribution | None = None  # of the headline output


@dataclass(frozen=True)
class Gate:
    max_drop: float
    metric: str
    drop: float
    passed: bool


@dataclass(frozen=True)
class Finetune:
    """How the pruned model was trained with its masks fixed."""

    loss: str
    steps: int
    optimizer: str
    lr: float
    batch_size: int
    trained_tensors: int
    batchnorm: str  # frozen or reestimate (with the number of layers re-estimated)
    augmentation: str  # how distillation batches were perturbed ("none": as they are)
    loss_curve: tuple[float, ...]  # mean loss per optimiser step, thinned to at most 200 points
    seconds: float


@dataclass(frozen=True)
class Schedule:
    """The pruning steps as run: sparsity reached and fine-tuning steps after each."""

    name: str
    sparsities: tuple[float, ...]
    finetune_steps: tuple[int, ...]
    resumed_after: int  # phases restored from a checkpoint (0: a fresh run)
    # the written model in onnxruntime against the final torch model: both must agree
    torch_vs_onnxruntime_max_abs_error: float | None


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    numel: int
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class MemoryEstimate:
    """What the estimator's statistics would need, and how the work would be split to fit."""

    estimate_bytes: int
    budget_bytes: int
    groups: int
    statistics_storage: str
    gradient_collections: int  # over the whole run
    fits: bool
    problem: str | None  # why it does not fit, with a suggestion (the run would exit 8)
    # the parts of estimate_bytes, and the rest of the process (memory.md in the README)
    kept_bytes: int = 0
    building_bytes: int = 0
    scratch_bytes: int = 0
    process_bytes: int = 0
    total_bytes: int = 0


@dataclass(frozen=True)
class InputDocument(JsonDocument):
    """The head of the documents about one input before it is pruned (dry run, sweep)."""

    tool_version: str
    config: dict[str, Any]
    input: ModelInfo
    calibration: DataInfo | None
    evaluation: DataInfo


@dataclass(frozen=True)
class DryRun(InputDocument):
    """`--dry-run`: what a run would prune and need, without running a model or writing a file."""

    method: str
    scope: str
    target_sparsity: float
    tensors: tuple[PlannedTensor, ...]
    params: int
    params_to_prune: int
    excluded: tuple[str, ...]
    schedule: tuple[float, ...]  # sparsity after each pruning step
    finetune_steps: int
    memory: MemoryEstimate | None  # None for data-free estimators
    environment: dict[str, Any]
    kind: str = "dry-run"
    schema_version: int = SCHEMA_VERSION
    allocation: str = ""  # as configured (`scope`, its former name, is kept beside it)
    structure: str = "unstructured"
    channels: dict | None = None  # --structure channels: the traced layers and what would stay

    @property
    def exit_code(self) -> int:
        return 8 if self.memory is not None and not self.memory.fits else 0


@dataclass(frozen=True)
class Report(JsonDocument):
    tool_version: str
    device: str
    config: dict[str, Any]
    input: ModelInfo
    output: ModelInfo
    calibration: DataInfo | None
    evaluation: DataInfo
    pruning: Pruning
    fisher: Fisher | None
    schedule: Schedule
    finetune: Finetune | None
    conversion: Conversion
    validation: Validation
    gate: Gate | None
    timings: dict[str, float]
    peak_memory_bytes: int
    warnings: tuple[str, ...] = field(default=())
    speed: Speed | None = None  # onnxruntime latency, parameters, FLOPs and sizes, original vs output
    report_path: str = ""
    html_path: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    kind: str = "prune"
    schema_version: int = SCHEMA_VERSION

    @property
    def gate_failed(self) -> bool:
        return self.gate is not None and not self.gate.passed

    @property
    def exit_code(self) -> int:
        return 6 if self.gate_failed else 0


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of every document onnxprune writes: the report, the dry
    run and the sweep (told apart by `kind`). Documented in docs/report-schema.md."""
    from importlib import resources

    return json.loads(resources.files("onnxprune").joinpath("report_schema.json").read_text(encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def size_text(n: float) -> str:
    """Bytes for people: B, KB, MB or GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def allocation_losses(search: dict, spec: str) -> str:
    """The automatic allocation's candidates with their held-out losses: "global 0.0025, layer 0.34"."""
    return ", ".join(f"{a} {loss:{spec}}" for a, loss in zip(search["candidates"], search["losses"]))


def repair_lines(repair: dict) -> list[str]:
    """One line per repair pass: what it did and the held-out loss before and after."""
    what = {"masks": "swaps", "weights": "weights moved", "statistics": "output units corrected"}
    lines = [
        f"repair of {repair['layers']} layers on {repair['samples']} calibration samples"
        + (f" ({len(repair['skipped'])} left as pruned)" if repair["skipped"] else "")
        + (
            f"; {repair['rows_left_out']:.0%} of the token rows left out (the outputs never read them)"
            if repair.get("rows_left_out")
            else ""
        )
    ]
    for s in repair["steps"]:
        verdict = "kept" if s["kept"] else "undone"
        if s["addition"] == "update":
            lines.append(
                f"  {s['step']}, update: {s['scale']:g} of the estimator's update kept; held-out loss "
                f"{s['loss_before']:.4g} -> {s['loss_after']:.4g} ({s['seconds']:.1f} s)"
            )
            continue
        lines.append(
            f"  {s['step']}, {s['addition']}: {s['changed']:,} {what[s['addition']]}; held-out loss "
            f"{s['loss_before']:.4g} -> {s['loss_after']:.4g} ({verdict}, {s['seconds']:.1f} s)"
        )
    return lines


def format_human(report: Report, max_rows: int = 30) -> str:
    """A short table for people: per-tensor sparsity, quality before/after, sizes, gate."""
    p = report.pruning
    lines = [
        f"onnxprune {report.tool_version}: {p.method}, {p.allocation} allocation, "
        f"target sparsity {p.target_sparsity:.2f} -> {report.output.path}",
        *_search_lines(p),
        *_tensor_lines(p, max_rows),
        *_statistics_lines(report.fisher),
        *_schedule_lines(report),
        *_validation_lines(report),
        *(speed_lines(report.speed) if report.speed is not None else []),
    ]
    if report.gate is not None:
        g = report.gate
        verdict = "passed" if g.passed else "FAILED"
        lines.append(
            f"gate: {g.metric} drop {g.drop:.4f} {'<=' if g.passed else '>'} max-drop {g.max_drop:.4f}: {verdict}"
        )
    lines += [f"warning: {w}" for w in report.warnings]
    if report.report_path:
        lines.append(f"report: {report.report_path}" + (f"; HTML: {report.html_path}" if report.html_path else ""))
    return "\n".join(lines)


def _search_lines(p: Pruning) -> list[str]:
    """What the automatic allocation and method chose, and the repair passes."""
    lines = []
    if p.allocation_search:
        losses = allocation_losses(p.allocation_search, ".4g")
        lines.append(
            f"  allocation auto: chose {p.allocation_search['chosen']} (loss on held-out calibration samples: {losses})"
        )
    if p.method_search:
        tried = ", ".join(
            f"{c} {loss:.4g}" for c, loss in zip(p.method_search["candidates"], p.method_search["losses"])
        )
        lines.append(
            f"  method auto: chose {p.method_search['chosen']} (loss on held-out calibration samples: {tried})"
        )
    if p.repair:
        lines.extend(f"  {line}" for line in repair_lines(p.repair))
    return lines


def _tensor_lines(p: Pruning, max_rows: int) -> list[str]:
    """The table of pruned tensors (at most `max_rows`) and its total."""
    width = max([len("pruned tensor")] + [len(t.name) for t in p.tensors[:max_rows]]) + 2
    lines = [f"  {'pruned tensor':<{width}}{'shape':>16}{'params':>12}{'sparsity':>10}"]
    for t in p.tensors[:max_rows]:
        shape = "x".join(str(d) for d in t.shape)
        lines.append(f"  {t.name:<{width}}{shape:>16}{t.numel:>12,}{t.sparsity:>10.4f}")
    if len(p.tensors) > max_rows:
        lines.append(f"  ... {len(p.tensors) - max_rows} more (see the JSON report)")
    lines.append(
        f"  {'total (' + str(len(p.tensors)) + ' tensors)':<{width}}{'':>16}{p.params:>12,}{p.sparsity:>10.4f}"
    )
    if p.excluded:
        lines.append(f"  left dense by --exclude: {', '.join(p.excluded[:8])}{' ...' if len(p.excluded) > 8 else ''}")
    return lines + (channel_lines(p.channels) if p.channels else [])


def _statistics_lines(f: Fisher | None) -> list[str]:
    """The estimator's statistics, settings and timings."""
    if f is None:
        return []
    if f.statistics == "layer inputs":
        lines = [f"layer inputs: {f.num_grads} calibration samples; loss {f.loss}"]
    else:
        lines = [f"fisher: {f.num_grads} gradients x {f.fisher_batch} samples; {f.loss}"]
    settings = ", ".join(
        f"{k} {v}" for k, v in f.estimator.items() if not (isinstance(v, (list, tuple)) and len(v) > 4)
    )
    steps = len(f.steps)
    lines.append(
        f"  {settings}{'; ' if settings else ''}{steps} step{'s' if steps > 1 else ''}; gradients "
        f"{f.gradient_seconds:.1f} s, estimator {f.estimator_seconds:.1f} s"
        + (f"; {f.groups} memory groups" if f.groups > 1 else "")
    )
    curve = f.estimator.get("auxiliary_loss")
    if curve:
        lines.append(
            f"  FishLeg auxiliary loss (summed over tensors): {curve[0]:.4g} at the start, "
            f"{curve[len(curve) // 2]:.4g} midway, {curve[-1]:.4g} at the end"
        )
    return lines


def _schedule_lines(report: Report) -> list[str]:
    """The schedule, the fine-tuning and the final torch-vs-onnxruntime check."""
    lines = []
    s = report.schedule
    if len(s.sparsities) > 1 or report.finetune is not None:
        path = " -> ".join(f"{x:.3f}" for x in s.sparsities)
        lines.append(
            f"schedule: {s.name}, sparsity {path}"
            + (f" (resumed after step {s.resumed_after})" if s.resumed_after else "")
        )
    tuned = report.finetune
    if tuned is not None:
        curve = tuned.loss_curve
        first, last = (curve[0], curve[-1]) if curve else (float("nan"), float("nan"))
        lines.append(
            f"fine-tuning: {tuned.steps} steps of {tuned.optimizer} (lr {tuned.lr:g}, batch {tuned.batch_size}) on "
            f"{tuned.trained_tensors} tensors, {tuned.seconds:.1f} s; loss {first:.4g} -> {last:.4g}; "
            f"BatchNorm {tuned.batchnorm}"
        )
        lines.append(f"  {tuned.loss}")
        if tuned.augmentation != "none":
            lines.append(f"  batches augmented: {tuned.augmentation}")
    if s.torch_vs_onnxruntime_max_abs_error is not None:
        error = s.torch_vs_onnxruntime_max_abs_error
        lines.append(f"written model vs the final torch model in onnxruntime: max abs error {error:.2e}")
    return lines


def _validation_lines(report: Report) -> list[str]:
    """The conversion check, the evaluation data, the quality of every output, the sizes."""
    c, e, v = report.conversion, report.evaluation, report.validation
    lines = [
        f"conversion check (torch vs onnxruntime, {c.samples} samples): max abs error {c.max_abs_error:.2e}",
        f"evaluation: {e.samples} samples from {e.source}{' (synthetic)' if e.synthetic else ''}",
    ]
    if v.accuracy_before is not None and v.accuracy_after is not None:
        lines.append(
            f"  accuracy         {v.accuracy_before:.4f} -> {v.accuracy_after:.4f}"
            f"  (drop {v.accuracy_before - v.accuracy_after:+.4f})"
        )
    if v.top1_agreement is not None:
        lines.append(f"  top-1 agreement  {v.top1_agreement:.4f}")
    for o in v.outputs:
        lines.append(
            f"  output {o.name!r}: max abs {o.max_abs_error:.3e}  mean abs {o.mean_abs_error:.3e}"
            f"  cosine {o.cosine:.5f}"
        )
    lines.append(
        f"size: {size_text(report.input.size_bytes)} -> {size_text(report.output.size_bytes)}; "
        f"time {report.timings.get('total', 0):.1f} s; peak memory {size_text(report.peak_memory_bytes)}"
    )
    return lines
