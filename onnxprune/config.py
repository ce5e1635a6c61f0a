"""The one frozen configuration the CLI builds and the library reads.

Validation raises UsageError (a ValueError) saying what to change; nothing here uses assert.
"""

from __future__ import annotations

import os
import re
from dataclasses import InitVar, dataclass, fields
from pathlib import Path

from .allocators import ALLOCATORS
from .allocators import AUTO as ALLOCATION_AUTO
from .augment import AUGMENTATIONS
from .errors import UsageError
from .estimators import DEFAULT_METHOD, ESTIMATORS, METHOD_AUTO
from .finetune import BATCHNORM_MODES, OPTIMIZERS
from .gradients import FISHER_KINDS
from .masks import parse_pattern
from .repair import STATISTICS_MODES
from .schedule import SCHEDULES
from .structure import DEFAULT_STRUCTURE, STRUCTURES
from .validate import METRICS

DEVICES = ("auto", "cpu", "cuda")
OBS_UPDATES = ("joint", "summed", "none")
PROGRESS = ("auto", "on", "off")
SEARCH_HOLDOUTS = ("unused", "quarter")
FISHLEG_INITS = ("kfac", "diagonal")


# settings that count something (at least 1)
_AT_LEAST_ONE = (
    "eval_batch_size",
    "batch_size",
    "prune_steps",
    "synthetic_samples",
    "conversion_check_samples",
    "sensitivity_samples",
    "steps",
    "num_grads",
    "fisher_batch",
    "block_size",
    "fishleg_probes",
    "fishleg_fvp_batch",
    "fishleg_block",
    "repair_samples",
    "repair_rounds",
    "repair_cycles",
    "speed_batch",
)


@dataclass(frozen=True)
class PruneConfig:
    """Everything one `prune()` run needs. Paths may be str or Path; they are stored as Path."""

    input: Path
    output: Path
    sparsity: float
    method: str = DEFAULT_METHOD
    # --method auto: the estimators it may choose from (empty: every registered one that fits)
    auto_methods: tuple[str, ...] = ()
    # How the sparsity is split across tensors (--allocation; `scope`, its former name, is still
    # accepted as a keyword and reported beside it; allocators/ holds each). global: one threshold
    # over all weights on the estimator's scale, so layers that matter less lose more; layer
    # (uniform): every tensor to the same sparsity; sensitivity: per-tensor sparsities minimising
    # the measured loss increase (each tensor pruned alone at several sparsities, the model run on
    # `sensitivity_samples` held-out calibration samples); magnitude: each tensor to the sparsity
    # global magnitude pruning gives it, the entries within it chosen by the estimator (a split
    # that does not depend on the estimator's scale); auto: global, layer or magnitude, whichever
    # leaves the smallest loss on held-out calibration samples (global without calibration data,
    # with an N:M pattern, and for the gradual schedule, which one-shot trials do not predict).
    allocation: str = ALLOCATION_AUTO
    sensitivity_samples: int = 128
    # The calibration samples the automatic searches measure their held-out losses on
    # (job.search_split). quarter: a random quarter, the trials' and the run's statistics drawn
    # from the rest; unused: samples the statistics do not draw, so each trial prunes with the
    # run's own statistics and a run that keeps the global trial equals --allocation global
    # (where the calibration set holds both; else as quarter). Not the default: on a digits MLP
    # (tests/test_robustness.py) its held-out draw led SparseGPT's search to 0.945 where the
    # quarter's led to 0.972, within the searches' noise but below magnitude by more than 0.02.
    search_holdout: str = "quarter"
    # --damp auto tries the rest of its grid only when that is expected to take at most this long
    # (seconds; each value a trial as long as the first, measured); else the default damping
    damp_search_seconds: float = 180.0
    exclude: tuple[str, ...] = ()
    # N:M sparsity ("2:4"): at most N non-zeros in every M consecutive inputs of an output unit
    # (across input channels at each kernel position for convolutions); sparsity is then 1 − N/M.
    pattern: str | None = None
    # What is removed (structure/): unstructured (single weights: zeros in the same shapes) or
    # channels (whole output channels and FFN neurons with everything they touch: the written
    # graph is physically smaller and faster). With channels, `sparsity` is the fraction of the
    # removable parameters removed and the allocation is global or layer.
    structure: str = DEFAULT_STRUCTURE
    # With channels: prune until the output is measured this many times faster in onnxruntime
    # (speed batch and threads below) instead of to `sparsity` (which must then be 0): a latency
    # table of the removable channels is timed first, and a step's choice is timed as a whole.
    target_speedup: float | None = None
    calibration: Path | None = None
    evaluation: Path | None = None
    report: Path | None = None  # default: <output stem>.report.json next to the output
    html: Path | None = None  # a self-contained HTML page of the report, when given
    max_drop: float | None = None
    # The headline/gate metric: auto = accuracy with labels, else top-1 agreement for a
    # classifier output, else cosine similarity of the first output (embeddings, regressions).
    metric: str = "auto"
    seed: int = 0
    device: str = "auto"
    force: bool = False
    # Held out of the calibration data when no evaluation data is given: a quarter is enough to
    # measure accuracy to about ±2 points on a few hundred samples and leaves most to calibrate.
    eval_fraction: float = 0.25
    # Samples per onnxruntime / torch inference run when evaluating.
    eval_batch_size: int = 32
    # Samples synthesised per set when no data is given at all: enough to compare outputs.
    synthetic_samples: int = 64
    # At most this many evaluation samples go through the torch conversion check (it runs the
    # dense torch model, which is slower than onnxruntime on CPU).
    conversion_check_samples: int = 64
    # The report's speed section: onnxruntime latency of the original and the written model on
    # `speed_batch` evaluation samples, `speed_runs` timed runs each after warm-up (0: sizes,
    # parameters and FLOPs only), `speed_threads` intra-op threads (0: every core allowed).
    speed_runs: int = 20
    speed_batch: int = 1
    speed_threads: int = 0
    # --- second-order estimators ---------------------------------------------------------
    # Recomputation steps of a one-shot run: the target is reached in `steps` steps (cubic
    # spacing), each with fresh gradients at the pruned, compensated weights.
    steps: int = 1
    # N gradients, each averaged over `fisher_batch` samples. 256 keeps a 128-entry block's
    # Fisher well above rank deficiency at modest cost; per-sample gradients (1) carry the most
    # curvature information per backward pass.
    num_grads: int = 256
    fisher_batch: int = 1
    # empirical: gradients at the calibration labels; true: at targets sampled from the model.
    # auto: empirical when the calibration data has labels that fit the output (measured better
    # on the MNIST CNN at 95%: 0.937 vs 0.917 with 4 steps), true otherwise.
    fisher: str = "auto"
    # WoodFisher block: bigger blocks capture more correlations (256 > 128 > 64 measured on a
    # CNN) at block_size× the memory of the weights in float64.
    block_size: int = 128
    # Relative damping: λ = damp · mean(diag F) (WoodFisher) or damp · mean(diag H) (SparseGPT)
    # per tensor. "auto": chosen per model from DAMP_GRID on held-out calibration samples (the
    # best value differed by four orders of magnitude between two models) where the search fits
    # `damp_search_seconds`; else DEFAULT_DAMP (estimators/base.py).
    damp: float | str = "auto"
    obs_update: str = "joint"  # joint (exact, per block), summed (original WoodFisher), none
    # The allocation search's candidates prune thresholds of the same saliencies from the same
    # statistics: WoodFisher factors each block once in saliency order and every candidate's joint
    # update is a triangular solve of a prefix (equal to float rounding); False: each candidate
    # factors its own pruned set (as before 2026-12; MiniLM's search spent ~19 s a candidate there).
    shared_factors: bool = True
    # The combined estimator's weight of the task-loss Fisher against each layer's reconstruction
    # error, in [0, 1] (0: SparseGPT); "auto": chosen from MIX_GRID on held-out calibration samples.
    mix: float | str = "auto"
    # FishLeg Surgeon: auxiliary Adam steps at the first pruning step and at each later one (the
    # online updates), its learning rate, Gaussian probes per step, gradient rows per
    # Fisher-vector product, and the largest Kronecker block (bigger layers get block-diagonal
    # factors).
    # Warm start of Q: kfac (Kronecker factors of the gradients, F ≈ f̄ Â⊗B̂) or diagonal (the
    # diagonal Fisher). FishLeg's own damping is relative like `damp`. Measured on the MNIST CNN
    # at 90% one-shot: diagonal start 0.915 (damp 1.0) / 0.848 (0.1); kfac start 0.929 (1.0),
    # 0.939 (0.1), 0.944 (0.01), 0.946 (1e-3). From the diagonal start 200 auxiliary steps barely
    # move Q. 95% gradual (4 steps, 20 fine-tuning steps), seeds 0-2: kfac 0.01 0.947/0.946/0.939.
    fishleg_init: str = "kfac"
    fishleg_damp: float = 0.01
    fishleg_steps: int = 200
    fishleg_online_steps: int = 20
    fishleg_lr: float = 1e-2
    fishleg_probes: int = 8
    fishleg_fvp_batch: int = 32
    fishleg_block: int = 256
    # The layer-wise statistics (sparsegpt, wanda, combined) and the repair leave out the input
    # rows the model's outputs never read: positions inside a sample (tokens) whose gradient of the
    # outputs is exactly zero, such as padding behind an attention mask (activations.relevant_rows).
    # On all-MiniLM-L6-v2's calibration sentences two thirds of the rows are padding; leaving them
    # out took SparseGPT per layer with the repair at 80% from cosine 0.784 to 0.818.
    relevant_rows: bool = True
    # --- repair after every pruning step (repair.py), for any estimator ----------------------
    # Each runs as one pass over the layers whose inputs can be captured, in network order, on the
    # inputs of the already-repaired layers; a pass is kept only if it lowers the loss on held-out
    # calibration samples. refine_masks: swaps of pruned and kept weights within a row that lower
    # the layer's reconstruction error (DSnoT-style); solve_weights: the least-squares surviving
    # weights for the fixed mask (damped by repair_damp · mean diag XᵀX towards the estimator's);
    # correct_statistics: each layer's output mean (variance: and variance; auto: variance where
    # a normalisation reads the output) matched to the dense model's, folded into the bias.
    # scale_update: before those, the OBS update an estimator applied to the survivors at once
    # (woodfisher, fishleg) is scaled back to the fraction of UPDATE_SCALES (0 to 1) with the
    # lowest held-out loss: far from the dense weights the quadratic model it extrapolates can be
    # wrong (magika at 80%: WoodFisher's update took the held-out loss from 0.44 to 0.99). Off
    # under a gradual schedule (job.make_repairer).
    scale_update: bool = True
    refine_masks: bool = True
    solve_weights: bool = True
    correct_statistics: str = "auto"
    # 512: measured on MiniLM at 80% (SparseGPT per layer + repair), 256 samples 0.750, 384: 0.769
    repair_samples: int = 512
    repair_damp: float = 0.01
    repair_cycles: int = 100  # swap rounds of the mask refinement (each swaps at most once per row)
    # masks and weights passes alternate this many times: refining the masks of re-solved weights
    # finds more swaps (MiniLM at 80%, SparseGPT per layer: 1 round 0.768, 2 rounds 0.784)
    repair_rounds: int = 2
    # --- schedule and fine-tuning -----------------------------------------------------------
    # oneshot: `steps` recomputation steps, then all fine-tuning; gradual: `prune_steps` steps of
    # the cubic schedule from `initial_sparsity`, fine-tuning split evenly between them.
    schedule: str = "oneshot"
    prune_steps: int = 8
    initial_sparsity: float = 0.0
    # Total optimiser steps of fine-tuning with masks fixed (0: none), their learning rate,
    # mini-batch and optimiser. Adam at 1e-4 recovers the MNIST CNN without tuning.
    finetune_steps: int = 0
    lr: float = 1e-4
    batch_size: int = 32
    optimizer: str = "adam"
    temperature: float = 2.0  # distillation temperature for class scores
    # Distillation batches perturbed afresh at each step, the dense model run on them (augment.py):
    # auto replaces 30% of the tokens where the model takes token ids (MiniLM, FFN halved, 300
    # steps: held-out cosine 0.9445 on the calibration sentences as they are, 0.9505 so)
    augment: str = "auto"
    augment_rate: float = 0.3
    batchnorm: str = "frozen"  # frozen: keep the running statistics; reestimate: recompute them
    # Gradual runs save a checkpoint after each pruning step (default: <output>.ckpt, removed when
    # the run succeeds); `resume` continues from it.
    checkpoint: Path | None = None
    resume: bool = False
    max_memory: float | None = None  # GiB for the statistics; default: 80% of what is available now
    progress: str = "auto"  # auto (a terminal, not under CI), on, off
    scope: InitVar[str | None] = None  # the former name of `allocation`

    def __post_init__(self, scope: str | None) -> None:
        for name in ("input", "output", "calibration", "evaluation", "report", "html", "checkpoint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(os.fspath(value)))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "auto_methods", tuple(self.auto_methods))
        self._check_target(scope)
        self._check_structure()
        self._check_names()
        self._check_numbers()
        self._check_numbers_or_auto()
        self._check_paths()

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # frozen: only while the config is checked

    def _check_target(self, scope: str | None) -> None:
        """Sparsity, pattern, method and allocation."""
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise UsageError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.method != METHOD_AUTO:
            ESTIMATORS.get(self.method)  # raises with the valid names
        for name in self.auto_methods:
            ESTIMATORS.get(name)
        try:
            parsed = parse_pattern(self.pattern)
        except ValueError as exc:
            raise UsageError(f"--pattern: {exc}") from None
        if parsed is not None:
            n, m = parsed
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise UsageError(
                    f"--pattern {self.pattern} prunes exactly {1 - n / m:g} of the weights; "
                    f"pass --sparsity {1 - n / m:g} (got {self.sparsity:g})"
                )
        if scope is not None:
            if self.allocation not in (ALLOCATION_AUTO, scope):
                raise UsageError(f"scope={scope!r} and allocation={self.allocation!r}: scope is allocation's old name")
            self._set("allocation", scope)
        if self.allocation == "uniform":  # the name the allocation literature uses for "layer"
            self._set("allocation", "layer")
        if self.allocation != ALLOCATION_AUTO and self.allocation not in ALLOCATORS:
            valid = ", ".join((ALLOCATION_AUTO, *ALLOCATORS.names()))
            raise UsageError(f"unknown allocation {self.allocation!r}; valid: {valid} (uniform = layer)")

    def _check_structure(self) -> None:
        """The structure kind, and what it combines with."""
        kind = STRUCTURES.get(self.structure)
        self._check_speedup(kind.allocations is not None)
        if kind.allocations is None:
            return
        if self.pattern is not None:
            raise UsageError("--pattern applies to unstructured pruning; drop it or use --structure unstructured")
        if self.allocation not in (ALLOCATION_AUTO, *kind.allocations):
            valid = ", ".join((ALLOCATION_AUTO, *kind.allocations))
            raise UsageError(
                f"--structure {self.structure} splits channels with allocation {valid}, not {self.allocation!r}"
            )

    def _check_speedup(self, removes_channels: bool) -> None:
        """--target-speedup: only where whole structures go, instead of a sparsity."""
        if self.target_speedup is None:
            return
        if not removes_channels:
            raise UsageError("--target-speedup needs --structure channels: zeros alone do not make onnxruntime faster")
        if not self.target_speedup > 1.0:
            raise UsageError(f"--target-speedup must be more than 1 (times faster), got {self.target_speedup:g}")
        if self.sparsity != 0.0:
            raise UsageError("pass either --sparsity or --target-speedup, not both")
        if self.initial_sparsity != 0.0:
            raise UsageError("--initial-sparsity does not apply to --target-speedup; drop it")

    def _check_names(self) -> None:
        """Every setting chosen from a list of names."""
        for value, valid, what in (
            (self.metric, METRICS, "metric"),
            (self.device, DEVICES, "device"),
            (self.correct_statistics, STATISTICS_MODES, "statistics correction"),
            (self.fishleg_init, FISHLEG_INITS, "FishLeg warm start"),
            (self.fisher, FISHER_KINDS, "Fisher kind"),
            (self.obs_update, OBS_UPDATES, "OBS update"),
            (self.batchnorm, BATCHNORM_MODES, "BatchNorm mode"),
            (self.progress, PROGRESS, "progress mode"),
            (self.search_holdout, SEARCH_HOLDOUTS, "search hold-out"),
        ):
            if value not in valid:
                raise UsageError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        SCHEDULES.get(self.schedule)
        OPTIMIZERS.get(self.optimizer)
        AUGMENTATIONS.get(self.augment)
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"--exclude {pattern!r} is not a valid regular expression: {exc}") from None

    def _check_numbers(self) -> None:
        """Counts at least 1, fractions in range, rates and budgets positive."""
        for name in _AT_LEAST_ONE:
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_drop is not None and not 0.0 <= self.max_drop <= 1.0:
            raise UsageError(f"max_drop must be in [0, 1], got {self.max_drop}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise UsageError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.fishleg_steps < 0 or self.fishleg_online_steps < 0 or not self.fishleg_lr > 0:
            raise UsageError("fishleg steps must be >= 0 and its learning rate positive")
        if not self.fishleg_damp > 0:
            raise UsageError(f"fishleg_damp must be positive, got {self.fishleg_damp}")
        if not self.repair_damp >= 0:
            raise UsageError(f"repair_damp must be >= 0, got {self.repair_damp}")
        if not self.damp_search_seconds >= 0:
            raise UsageError(f"damp_search_seconds must be >= 0, got {self.damp_search_seconds}")
        if self.max_memory is not None and not self.max_memory > 0:
            raise UsageError(f"max_memory must be positive (GiB), got {self.max_memory}")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise UsageError(f"initial sparsity must be in [0, sparsity={self.sparsity}], got {self.initial_sparsity}")
        if self.finetune_steps < 0:
            raise UsageError(f"finetune steps must be >= 0, got {self.finetune_steps}")
        if self.speed_runs < 0 or self.speed_threads < 0:
            raise UsageError("speed_runs and speed_threads must be >= 0")
        if not self.lr > 0 or not self.temperature > 0:
            raise UsageError("the learning rate and the temperature must be positive")
        if not 0.0 < self.augment_rate <= 1.0:
            raise UsageError(f"augment_rate must be in (0, 1], got {self.augment_rate}")

    def _check_numbers_or_auto(self) -> None:
        """`damp` and `mix`: "auto" or a number in range, stored as float."""
        if self.damp != "auto":
            try:
                damp = float(self.damp)
            except (TypeError, ValueError):
                raise UsageError(f"damp must be a positive number or 'auto', got {self.damp!r}") from None
            if not damp > 0:
                raise UsageError(f"damp must be positive, got {damp}")
            self._set("damp", damp)
        if self.mix != "auto":
            try:
                mix = float(self.mix)
            except (TypeError, ValueError):
                raise UsageError(f"mix must be a number in [0, 1] or 'auto', got {self.mix!r}") from None
            if not 0.0 <= mix <= 1.0:
                raise UsageError(f"mix must be in [0, 1], got {mix}")
            self._set("mix", mix)

    def _check_paths(self) -> None:
        """No output path may be the input or another output."""
        if _same_file(self.input, self.output):
            raise UsageError(f"the output path {self.output} is the input model; choose another output path")
        report = self.report_path
        if _same_file(report, self.input) or _same_file(report, self.output):
            raise UsageError(f"the report path {report} collides with the input or output model")
        if self.html is not None and any(_same_file(self.html, other) for other in (self.input, self.output, report)):
            raise UsageError(f"the HTML path {self.html} collides with the input, output or report")
        checkpoint = self.checkpoint_path
        if any(_same_file(checkpoint, other) for other in (self.input, self.output, report)):
            raise UsageError(f"the checkpoint path {checkpoint} collides with the input, output or report")

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint if self.checkpoint is not None else self.output.with_name(self.output.name + ".ckpt")

    @property
    def report_path(self) -> Path:
        return self.report if self.report is not None else self.output.with_name(self.output.stem + ".report.json")

    def as_dict(self) -> dict:
        """JSON-friendly view for the report."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                str(value) if isinstance(value, Path) else (list(value) if isinstance(value, tuple) else value)
            )
        out["report"] = str(self.report_path)
        out["html"] = str(self.html) if self.html is not None else None
        out["checkpoint"] = str(self.checkpoint_path)
        out["scope"] = self.allocation  # its former name, for readers of earlier reports
        return out


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (same path after resolving links, or same inode)."""
    try:
        if a.resolve() == b.resolve():
            return True
    except OSError:
        pass
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def as_config(config: PruneConfig | str | os.PathLike, output, settings: dict) -> PruneConfig:
    """A PruneConfig as given, or built from (input, output, **settings) (prune() and plan())."""
    if not isinstance(config, PruneConfig):
        if output is None:
            raise UsageError("give the output path: prune(input, output, **settings)")
        return PruneConfig(input=Path(os.fspath(config)), output=Path(os.fspath(output)), **settings)
    if output is not None or settings:
        raise UsageError("pass either a PruneConfig or (input, output, **settings), not both")
    return config
