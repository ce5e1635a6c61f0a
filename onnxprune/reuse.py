"""Statistics shared between the automatic searches and the run.

The allocation candidates differ only in how the masks are chosen from the same saliencies: each
trial would otherwise collect the same gradients and build the same inverses again, and so would
the run after them (it starts from the samples the trials pruned with, see
`searches.statistics_job`). A trial offers the first step's `Scored` (scores and kept statistics,
taken at the dense weights) to the job's cache; a later trial with the same estimator settings,
gradient samples and tensors reads it, and the run takes it (the cache then lets it go, so that a
run never holds two sets of statistics). One entry at a time: the damping candidates differ in
their statistics, and each would otherwise keep its own inverses alive.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .gradients import GradientSource


@dataclass
class ScoreCache:
    """At most one first-step `Scored`, by the key of what it was computed from."""

    key: str | None = None
    scored: Any = None
    # what a trial's apply made from the shared statistics, by (key, allocation, sparsity, last):
    # the keep-masks and compensated weights, so that the run choosing that trial repeats nothing
    applied: dict = field(default_factory=dict)

    def get(self, key: str | None) -> Any:
        """The entry for `key` (None when absent), left in the cache."""
        if key is None or key != self.key:
            return None
        return self.scored

    def take(self, key: str | None) -> Any:
        """The entry for `key`, removed from the cache, which lets every other entry go (the
        caller is the run: nothing after it reads the trials' statistics); the trials' outcomes
        from it stay until the run has applied it."""
        found = self.get(key)
        applied = {k: v for k, v in self.applied.items() if found is not None and k[0] == key}
        self.clear()
        self.applied = applied
        return found

    def put(self, key: str | None, scored: Any) -> None:
        if key is not None:
            self.clear()
            self.key, self.scored = key, scored

    def clear(self) -> None:
        self.key, self.scored, self.applied = None, None, {}


def reuse_key(estimator: Any, source: Any, targets: Sequence[str]) -> str | None:
    """What a first step's statistics depend on, as text: the estimator and its settings, the
    gradient samples (data, indices, loss, seed) and the tensors. None where they are not shared:
    layer-wise statistics (collected again for each layer's update anyway) and estimators that
    learn online (their statistics change as they are used)."""
    if not isinstance(source, GradientSource) or estimator.online or estimator.sequential:
        return None
    digest = hashlib.sha256()
    digest.update(source.loss.describe().encode())
    digest.update(np.asarray([source.count, source.micro_batch, source.seed]).tobytes())
    digest.update(np.ascontiguousarray(source.indices).tobytes())
    for name in sorted(source.data.arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(source.data.arrays[name]).tobytes())
    if source.data.labels is not None:
        digest.update(np.ascontiguousarray(source.data.labels).tobytes())
    fields = {"estimator": estimator.name, "settings": estimator.describe(), "targets": list(targets)}
    return json.dumps({**fields, "samples": digest.hexdigest()}, sort_keys=True, default=str)
