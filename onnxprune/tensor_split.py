"""Under torchrun, the tensors each rank computes: for an estimator whose statistics are per tensor
(WoodFisher), each rank folds, inverts, scores and updates its share of the tensors, and every rank
then receives the others' scores, masks and new weights (see distributed.py).

The split leaves the result as one process's: a tensor's statistics are folded from the same
gradients in the same order wherever it is computed, the allocation then sees every tensor's
scores on every rank, and each tensor's update is the one its owner computed. The memory plan
counts on each rank the statistics of its own tensors (memory.plan_memory's `owners`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from . import distributed
from .views import Scored

if TYPE_CHECKING:
    from .oneshot import Pruner

log = logging.getLogger("onnxprune")


class TensorSplit:
    """Which rank computes each tensor (`owners`; None: this one computes all), and the exchanges
    that give every rank all of them."""

    def __init__(self, owners: list[int] | None, device: torch.device):
        self.owners, self.device = owners, device

    def mine(self, i: int) -> bool:
        """Whether this rank computes tensor i."""
        return self.owners is None or self.owners[i] == distributed.rank()

    def own(self, count: int) -> list[int]:
        """Which of `count` tensors this rank computes."""
        return [i for i in range(count) if self.mine(i)]

    def by_name(self, index: dict[str, int]) -> dict[str, int] | None:
        """The rank that computes each named tensor (`index`: name to tensor number; None where
        this rank computes all): the gradient exchange sends each rank its own tensors' rows."""
        return None if self.owners is None else {name: self.owners[i] for name, i in index.items()}

    def agreed(self, value: bool) -> bool:
        """Whether `value` holds on every rank: the ranks then take the same branch around the
        collectives that follow (one rank's tensors can need what another's do not)."""
        return value if self.owners is None else distributed.total(float(not value)) == 0.0

    def gather_scores(self, scored: Scored) -> None:
        """Every tensor's scores (and masks chosen while scoring) from the rank that computed them."""
        if self.owners is None:
            return
        scored.scores.update(distributed.from_owners(scored.scores, self.owners, self.device))
        scored.selected.update(distributed.from_owners(scored.selected, self.owners, self.device))

    def gather_updates(self, pruner: Pruner) -> None:
        """Every tensor's keep-mask and compensated weights from the rank that computed them (and,
        where the repair asks for them, the updates, as the owner computed its own)."""
        if self.owners is None:
            return
        mine = self.own(len(pruner.views))
        keep = distributed.from_owners({i: pruner.keep[i] for i in mine}, self.owners, self.device)
        values = distributed.from_owners({i: pruner.views[i].read() for i in mine}, self.owners, self.device)
        for i, value in values.items():
            if i in mine:
                continue  # computed here, and already written
            pruner.keep[i] = keep[i]
            if pruner.keep_updates and pruner.updates_at_once:
                pruner.updates[i] = pruner.compensation(i, value)
            pruner.views[i].write(value)


def split_for(pruner: Pruner) -> TensorSplit:
    """The split of the pruner's tensors over torchrun's ranks; none where every rank computes
    all of them: one process, an estimator whose statistics are not per tensor, or masks chosen
    across tensors from more than the scores (whole channels, N:M patterns, allocations that
    read the statistics)."""
    estimator, device = pruner.estimator, pruner.keep[0].device if pruner.keep else torch.device("cpu")
    whole = distributed.world() == 1 or not estimator.splits_over_ranks or estimator.sequential
    if whole or pruner.structured or pruner.pattern is not None or pruner.allocator.reads_statistics:
        return TensorSplit(None, device)
    sizes = [view.numel for view in pruner.views]
    owners = distributed.assign(sizes, distributed.world())
    own = [size for size, owner in zip(sizes, owners) if owner == distributed.rank()]
    log.log(
        logging.DEBUG if pruner.reuse == "offer" else logging.INFO,  # said once, not for every search trial
        "%s: statistics, scores and updates of %d tensors split over %d ranks (this rank: %d of them, %s weights)",
        estimator.name,
        len(sizes),
        distributed.world(),
        len(own),
        f"{sum(own):,}",
    )
    return TensorSplit(owners, device)
