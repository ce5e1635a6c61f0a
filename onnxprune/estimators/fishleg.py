"""FishLeg Surgeon: OBS with an inverse Fisher learned directly, and kept up to date online.

Per weight matrix (output units × inputs) a structured Q(θ) ≈ (F + γI)⁻¹ (see `onnxprune.fishleg`)
is warm-started from the diagonal Fisher and trained with Adam on the auxiliary loss, with
Fisher-vector products from the gradient rows (at labels sampled from the model: the true
Fisher, by default) and Gaussian probes; the auxiliary gradient is preconditioned by Q. Scores
are w²/(2 Q_qq) from the closed-form diagonal; survivors get the joint OBS update within Q
(conjugate gradients) or the summed single-weight updates.

The point of the method: the learner of each tensor persists between pruning steps. At the next
step it continues from where it was with a few auxiliary updates on fresh gradients, pruned
coordinates removed from the probes and from Q's output, instead of being rebuilt.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..fishleg_maths import (
    KronFactors,
    auxiliary_loss,
    block_split,
    gradient_fvp,
    init_factors,
    joint_update,
    kfac_factors,
    q_diagonal,
    q_group_saliency,
    summed_update,
)
from .base import Estimator, MemoryNeed, register
from .woodfisher import relative_damping


class KronLearner:
    """θ of one tensor, its Adam state, the mask it was last trained with, and its loss curve."""

    def __init__(self, shape: tuple[int, int], settings: FishLegSurgeon, seed: int):
        self.shape = shape
        self.settings = settings
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0
        self.R: Tensor | None = None
        self.L: Tensor | None = None
        self.scale: Tensor | None = None  # warm-start A, fixed; A = scale ⊙ a (a learned, starts at 1)
        self.a: Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.gamma = 0.0
        self.keep: Tensor | None = None
        self.curve: list[list[float]] = []  # one list of auxiliary-loss values per update
        self.checks: list[list[float]] = []  # held-out auxiliary loss before and after each update
        self.reverted = 0  # updates undone because they made the held-out loss worse

    def _learned(self) -> tuple[Tensor, Tensor, Tensor, Tensor, torch.optim.Optimizer]:
        """(R, L, scale, a, optimizer), set by the first update."""
        if self.R is None or self.L is None or self.scale is None or self.a is None or self.optimizer is None:
            raise RuntimeError("the FishLeg learner has not seen any gradients yet")
        return self.R, self.L, self.scale, self.a, self.optimizer

    def theta(self) -> KronFactors:
        R, L, scale, a, _ = self._learned()
        return KronFactors(R=R, L=L, A=scale * a)

    def _optimizer(self, R: Tensor, L: Tensor, a: Tensor) -> torch.optim.Optimizer:
        # Adam moves every entry by about lr, so a dense k×k factor moves by about lr·√k in
        # spectral norm: scaling its lr by 1/√k keeps the step on Q comparable across block
        # sizes (without it, lr 1e-2 on 128-row blocks made the auxiliary loss diverge).
        lr = self.settings.aux_lr
        return torch.optim.Adam(
            [
                {"params": [R], "lr": lr / math.sqrt(R.shape[-1]), "base": lr / math.sqrt(R.shape[-1])},
                {"params": [L], "lr": lr / math.sqrt(L.shape[-1]), "base": lr / math.sqrt(L.shape[-1])},
                {"params": [a], "lr": lr, "base": lr},
            ]
        )

    def update(self, grads: Tensor, keep: Tensor | None = None) -> None:
        m, n = self.shape
        rows = grads.detach().float().reshape(-1, m, n)
        mask = None if keep is None else keep.reshape(m, n).to(rows.device)
        first = self.R is None
        if self.R is not None and self.R.device != rows.device:  # resumed from a checkpoint (loaded on the host)
            self.load_state_dict(self.state_dict(), rows.device)
        if first:
            self.gamma = relative_damping(rows, self.settings.damp)
            if self.settings.init == "kfac":
                start = kfac_factors(rows, self.settings.damp, self.settings.kron_block)
            else:
                start = init_factors((rows * rows).mean(0), self.gamma, self.settings.kron_block)
            self.R, self.L = start.R.requires_grad_(True), start.L.requires_grad_(True)
            self.scale = start.A.detach()
            self.a = torch.ones_like(self.scale, requires_grad=True)
            self.optimizer = self._optimizer(self.R, self.L, self.a)
        R, L, _, a, optimizer = self._learned()
        steps = self.settings.initial_steps if first else self.settings.online_steps
        # a check on fresh probes and all the rows (the steps see mini-batches of them): an
        # update that makes the auxiliary loss worse there is undone (Q stays where it was)
        # drawn on the host from the seeded generator (the same probes on CPU and CUDA), then moved
        check_probes = torch.randn(self.settings.probes, m, n, generator=self.generator).to(rows.device)
        check_fvp = gradient_fvp(rows)
        before = self._check(check_probes, check_fvp, mask)
        saved = [t.detach().clone() for t in (R, L, a)]
        values = []
        for step in range(steps):
            # cosine decay within each update: Adam's normalised step would otherwise keep
            # jittering once the auxiliary gradient vanishes
            for group in optimizer.param_groups:
                group["lr"] = group["base"] * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
            batch = torch.randint(len(rows), (min(self.settings.fvp_batch, len(rows)),), generator=self.generator)
            probes = torch.randn(self.settings.probes, m, n, generator=self.generator).to(rows.device)
            batch = batch.to(rows.device)
            surrogate, value = auxiliary_loss(self.theta(), probes, gradient_fvp(rows[batch]), self.gamma, mask)
            optimizer.zero_grad()
            surrogate.backward()
            optimizer.step()
            values.append(float(value))
        after = self._check(check_probes, check_fvp, mask)
        if steps and not after <= before:
            with torch.no_grad():
                for tensor, old in zip((R, L, a), saved):
                    tensor.copy_(old)
            self.reverted += 1
        self.checks.append([before, min(before, after) if steps else before])
        self.curve.append(values)
        self.count += len(rows)
        self.keep = mask if mask is not None else torch.ones(m, n, dtype=torch.bool, device=rows.device)

    def _check(self, probes: Tensor, fvp, mask: Tensor | None) -> float:
        with torch.no_grad():
            return float(auxiliary_loss(self.theta(), probes, fvp, self.gamma, mask, precondition=False)[1])

    def state_dict(self) -> dict:
        """Tensors and numbers only (loadable with weights_only=True)."""
        R, L, scale, a, optimizer = self._learned()
        return {
            "R": R.detach(),
            "L": L.detach(),
            "scale": scale,
            "a": a.detach(),
            "optimizer": optimizer.state_dict(),
            "gamma": self.gamma,
            "keep": self.keep,
            "count": self.count,
            "curve": self.curve,
            "checks": self.checks,
            "reverted": self.reverted,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        """The learner as `state_dict` saved it, its tensors on `device` (where they were if None);
        the optimiser's moments follow the factors."""
        self.R = state["R"].to(device).clone().requires_grad_(True)
        self.L = state["L"].to(device).clone().requires_grad_(True)
        self.scale = state["scale"].to(device)
        self.a = state["a"].to(device).clone().requires_grad_(True)
        self.optimizer = self._optimizer(self.R, self.L, self.a)
        self.optimizer.load_state_dict(state["optimizer"])
        keep = state["keep"]
        self.gamma, self.count, self.curve = state["gamma"], state["count"], state["curve"]
        self.keep = keep.to(device) if keep is not None else None
        self.checks, self.reverted = state["checks"], state["reverted"]
        self.generator.set_state(state["generator"])


@register
class FishLegSurgeon(Estimator):
    name = "fishleg"
    summary = "FishLeg Surgeon: OBS with a learned Kronecker-structured inverse Fisher, updated online"
    needs_gradients = True
    compensates = True
    online = True
    # the method learns from Fisher-vector products at labels sampled from the model
    default_fisher = "true"

    reads = (
        "fishleg_damp",
        "obs_update",
        "fishleg_steps",
        "fishleg_online_steps",
        "fishleg_lr",
        "fishleg_probes",
        "fishleg_fvp_batch",
        "fishleg_block",
        "fishleg_init",
        "seed",
    )

    def __init__(self, config=None):
        super().__init__(config)
        s = self.settings
        self.damp, self.update, self.compensates = s.fishleg_damp, s.obs_update, s.obs_update != "none"
        self.initial_steps, self.online_steps, self.aux_lr = s.fishleg_steps, s.fishleg_online_steps, s.fishleg_lr
        self.probes, self.fvp_batch, self.kron_block = s.fishleg_probes, s.fishleg_fvp_batch, s.fishleg_block
        self.init, self.seed = s.fishleg_init, s.seed
        self.learners: dict[str, KronLearner] = {}

    def statistics(self, name: str, shape: tuple[int, int]) -> KronLearner:
        if name not in self.learners:
            self.learners[name] = KronLearner(shape, self, self.seed * 7919 + len(self.learners))
        return self.learners[name]

    def memory(self, shape: tuple[int, int], count: int) -> MemoryNeed:
        m, n = shape
        rows, row_block = block_split(m, self.kron_block)
        cols, col_block = block_split(n, self.kron_block)
        factors = 4 * (rows * row_block**2 + cols * col_block**2 + 2 * m * n)
        work = 4 * m * n * (count + 4 * self.probes)  # gradient rows, probes and their images
        return MemoryNeed(peak=work + 3 * factors, kept=3 * factors)  # parameters + Adam moments

    def describe(self) -> dict:
        return {
            "damp": self.damp,
            "update": self.update,
            "kron_block": self.kron_block,
            "init": self.init,
            "auxiliary_steps": [self.initial_steps, self.online_steps],
            "auxiliary_lr": self.aux_lr,
            "probes": self.probes,
            "fvp_batch": self.fvp_batch,
            "auxiliary_loss": self.curve(),
            # held-out auxiliary loss summed over tensors, before the first update and after the last
            "auxiliary_check": self.check_summary(),
            "reverted_updates": sum(learner.reverted for learner in self.learners.values()),
        }

    def check_summary(self) -> list[float]:
        if not self.learners or not all(learner.checks for learner in self.learners.values()):
            return []
        first = sum(learner.checks[0][0] for learner in self.learners.values())
        last = sum(learner.checks[-1][1] for learner in self.learners.values())
        return [round(first, 8), round(last, 8)]

    def curve(self, points: int = 200) -> list[float]:
        """The auxiliary loss summed over tensors, per auxiliary step, all updates in order
        (thinned to at most `points` values)."""
        if not self.learners:
            return []
        per_tensor = [[v for update in learner.curve for v in update] for learner in self.learners.values()]
        runs = [sum(step) for step in zip(*per_tensor)]
        stride = max(1, -(-len(runs) // points))
        return [round(v, 8) for v in runs[::stride]]

    def scores(self, weight: Tensor, stats: KronLearner) -> Tensor:
        diagonal = q_diagonal(stats.theta()).detach().double()
        w = weight.double().reshape(stats.shape)
        return (w * w / (2.0 * diagonal)).reshape(-1)

    def group_scores(self, weight: Tensor, stats: KronLearner, groups: list[Tensor]) -> Tensor:
        return q_group_saliency(stats.theta(), weight.reshape(stats.shape), groups)

    def compensate(self, weight: Tensor, keep: Tensor, stats: KronLearner) -> Tensor:
        if self.update == "none":
            return super().compensate(weight, keep, stats)
        m, n = stats.shape
        theta = stats.theta()
        theta = KronFactors(R=theta.R.detach(), L=theta.L.detach(), A=theta.A.detach())
        device = theta.A.device
        support = stats.keep.to(device) if stats.keep is not None else torch.ones(m, n, dtype=torch.bool, device=device)
        keep = keep.to(device)
        pruned = support & ~keep.reshape(m, n)
        update = joint_update if self.update == "joint" else summed_update
        new = update(theta, weight.to(device=device, dtype=torch.float32).reshape(m, n), pruned, support)
        return torch.where(keep.reshape(m, n), new, torch.zeros_like(new)).reshape(-1)

    def state_dict(self) -> dict:
        return {name: learner.state_dict() for name, learner in self.learners.items()}

    def load_state_dict(self, state: dict, shapes: dict[str, tuple[int, int]]) -> None:
        for name, learner_state in state.items():
            self.statistics(name, shapes[name]).load_state_dict(learner_state)
