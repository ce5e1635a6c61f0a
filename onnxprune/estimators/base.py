"""The estimator interface and its registry.

An estimator answers two questions for one weight tensor: which entries to drop (`scores`, higher
= keep, on a loss-increase scale comparable across tensors so that one global threshold is
meaningful) and how to change the survivors to make up for it (`compensate`). Weights arrive
flattened in their canonical order (output units major, so consecutive entries belong to the same
output unit), as float32; the framework handles layouts, masks, memory and schedules.

Data-driven estimators get per-tensor `Statistics`, fed with batches of gradients ([n, numel]
rows) in any split: the result must only depend on all the rows together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from ..registry import Registry
from ..settings import settings_from

if TYPE_CHECKING:
    from ..config import PruneConfig


class Statistics(Protocol):
    """Per-tensor accumulator of gradient rows ([n, numel], canonical order); `keep` is the
    tensor's current keep-mask (pruned coordinates are already zero in the rows)."""

    count: int

    def update(self, grads: Tensor, keep: Tensor | None = None) -> None: ...


class SpillableStatistics(Statistics, Protocol):
    """Statistics of an estimator that declares `spills`: they can move to a file in `folder`."""

    def spill(self, folder: Path) -> None: ...


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes an estimator needs for one tensor: while building its statistics (`peak`, which
    includes what is `kept` after), and `scratch` for a moment while it is finalised (one tensor
    at a time, so a group needs its largest scratch, not their sum)."""

    peak: int = 0
    kept: int = 0
    scratch: int = 0

    @property
    def alone(self) -> int:
        """What the tensor needs processed on its own."""
        return self.peak + self.scratch


def relative_damp(value: float | str) -> float:
    """The configured relative damping as a number ("auto" not yet resolved: DEFAULT_DAMP)."""
    return DEFAULT_DAMP if value == "auto" else float(value)


class Estimator(ABC):
    """Scores weights for pruning and compensates the survivors."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # The PruneConfig fields it reads, copied into `self.settings` in one place (settings_from).
    reads: ClassVar[tuple[str, ...]] = ()
    # Whether `statistics` needs gradients of the loss (data-free estimators skip collecting them).
    needs_gradients: ClassVar[bool] = False
    # Whether `compensate` reads the statistics (if so they are kept, or collected again).
    compensates: ClassVar[bool] = False
    # Whether statistics persist and learn across steps (one `update` per step) rather than
    # being rebuilt from each step's rows.
    online: ClassVar[bool] = False
    # Whether `statistics` are fed the calibration inputs of each weight's layer (rows
    # [groups, n, cols], see activations.py) instead of gradients.
    needs_activations: ClassVar[bool] = False
    # Whether the update of each tensor needs statistics taken after every tensor before it in
    # the network was pruned (layer by layer, each seeing the already-pruned inputs).
    sequential: ClassVar[bool] = False
    # Whether `statistics` only accumulate (sums of squares): they are then fed one gradient row
    # at a time as it is computed, and the N rows are never held together.
    streams_gradients: ClassVar[bool] = False
    # Whether each tensor's statistics, scores and update depend on that tensor's gradients alone:
    # under torchrun each rank then computes a share of the tensors (tensor_split.py).
    splits_over_ranks: ClassVar[bool] = False
    # Whether the estimator reads `damp` (then chosen automatically when it is "auto").
    uses_damping: ClassVar[bool] = False
    # Whether it also needs each pruned layer's output-gradient Fisher (`set_sensitivity`, given
    # once per step before the statistics) from the task loss.
    needs_output_gradients: ClassVar[bool] = False
    # The Fisher loss used with --fisher auto: "auto" (empirical with fitting labels, else true),
    # or "true" / "empirical" for estimators measured better with one.
    default_fisher: ClassVar[str] = "auto"
    # Whether its statistics can move to disk (`spill(folder)`) when the memory plan says so.
    spills: ClassVar[bool] = False

    def __init__(self, config: PruneConfig | None = None):
        self.settings = settings_from(type(self).reads, config)
        # set by the searches where several trials compensate from the same statistics (their
        # masks thresholds on the same scores): an estimator may then prepare them once for all
        self.shared_statistics = False

    # `stats` below is the estimator's own Statistics type (what `statistics` returns), or None.
    def statistics(self, name: str, shape: tuple[int, int]) -> Any:
        """An accumulator for tensor `name`, seen as a matrix of `shape` (output units × inputs)
        (None: no statistics). Estimators that learn online (FishLeg) return the same object for
        a name at every step."""
        return None

    def memory(self, shape: tuple[int, int], count: int) -> MemoryNeed:
        """What `statistics` and `scores` need for a tensor of `shape` and `count` gradient rows."""
        return MemoryNeed()

    @abstractmethod
    def scores(self, weight: Tensor, stats: Any) -> Tensor:
        """Saliency of each entry of the flat `weight`; higher means keep."""

    def group_scores(self, weight: Tensor, stats: Any, groups: list[Tensor]) -> Tensor | None:
        """Saliency of removing each group of entries of the flat `weight` together (index
        tensors); None where the estimator scores single entries only (their sum is used)."""
        return None

    def compensate(self, weight: Tensor, keep: Tensor, stats: Any) -> Tensor:
        """New values for the flat `weight` given the keep-mask; pruned entries exactly zero."""
        return torch.where(keep, weight, torch.zeros_like(weight))

    def prune(
        self,
        weight: Tensor,
        keep: Tensor,
        stats: Any,
        forced: Tensor,
        pattern: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """New values and keep-mask for the flat `weight`. `keep` is the selected mask (already
        N:M when `pattern` is given); an estimator that picks its own mask (SparseGPT) may return
        another with as many pruned entries (or the same pattern) that prunes every `forced`
        entry (pruned at an earlier step)."""
        return self.compensate(weight, keep, stats), keep

    def describe(self) -> dict:
        """The settings that shaped the result, for the report."""
        return {}

    def set_sensitivity(self, sensitivity: dict[str, Tensor]) -> None:
        """Per pruned tensor, the Fisher of each output unit of its layer (estimators that
        declare `needs_output_gradients`)."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of statistics that persist across steps (`online` estimators);
        tensors and plain values only."""
        return {}

    def load_state_dict(self, state: dict, shapes: dict[str, tuple[int, int]]) -> None:
        """Restore `state_dict()`'s output; `shapes` gives each tensor's matrix shape by name."""


# The damping used when `damp` is "auto" but no search ran (large models, or an estimator built
# outside a run); the search grid. It runs from trusting the curvature to nearly ignoring it: at
# λ = 10·mean(diag F) every OBS estimator is close to magnitude pruning, so the search can fall
# back to it where the calibration curvature is noise.
DEFAULT_DAMP = 1e-3
DAMP_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


ESTIMATORS: Registry[type[Estimator]] = Registry("estimator")


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: add an estimator to the registry under its `name`."""
    return ESTIMATORS.register(cls.name)(cls)
