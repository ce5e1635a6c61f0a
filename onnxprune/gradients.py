"""Gradients of a loss through the converted model: the raw material of every Fisher estimator.

The loss depends on what the headline output is:
- class scores (logits or probabilities): cross-entropy against the calibration labels when they
  are class indices (empirical Fisher), else against classes sampled from the model's own
  predictive distribution (the "true" Fisher, which works on any model without labels);
- anything else (embeddings, regressions): half the squared error to a sample from a unit
  Gaussian around the output (the true Fisher of a Gaussian likelihood, i.e. Gauss-Newton), or
  to given float targets of the output's shape.

Each gradient is the mean over a micro-batch of `fisher_batch` samples; N of them are drawn
(samples reshuffled and reused when N·m exceeds the data). Sampled labels come from a CPU
generator seeded per gradient, so results do not depend on the device or on how weights are
grouped for collection. Pruned coordinates are masked out of every gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .bridge.convert import TorchModel
from .data import Dataset, FeedPlan, InputSpec, feed_plan, iter_feeds
from .errors import UsageError
from .validate import Headline, class_labels_fit, output_kind


@dataclass(frozen=True)
class FisherLoss:
    """Which output the loss reads, how, and where its targets come from."""

    output: int
    output_name: str
    kind: str  # "logits", "probabilities" or "gaussian"
    targets: str  # "given" (calibration labels) or "sampled" (from the model)

    def describe(self) -> str:
        if self.kind in ("logits", "probabilities"):
            source = (
                "the calibration labels (empirical Fisher)"
                if self.targets == "given"
                else "classes sampled from the model's predictive distribution (true Fisher)"
            )
            return f"cross-entropy of {self.kind} {self.output_name!r} against {source}"
        source = (
            "the calibration targets (empirical Fisher)"
            if self.targets == "given"
            else "a unit-Gaussian sample around the output (true Fisher, i.e. Gauss-Newton)"
        )
        return f"half squared error of output {self.output_name!r} to {source}"


FISHER_KINDS = ("auto", "empirical", "true")


def choose_loss(
    headline: Headline,
    reference: Sequence[np.ndarray],
    names: Sequence[str],
    calibration: Dataset,
    fisher: str = "auto",
) -> FisherLoss:
    """The loss for the headline output. `fisher`: "empirical" uses the calibration labels (they
    must fit the output), "true" samples targets from the model, "auto" uses labels that fit."""
    index = headline.output
    output = reference[index]
    labels = calibration.labels
    kind = output_kind(output)
    if kind in ("logits", "probabilities"):
        fits = labels is not None and class_labels_fit(labels, output.shape[1])
    else:
        kind = "gaussian"
        fits = labels is not None and labels.dtype.kind == "f" and labels.shape[1:] == output.shape[1:]
    if fisher == "empirical" and not fits:
        raise UsageError(
            f"--fisher empirical needs calibration labels that fit output {names[index]!r} "
            "(class indices for class scores, float targets of the output's shape otherwise)"
        )
    given = fits and fisher != "true"
    return FisherLoss(index, names[index], kind, "given" if given else "sampled")


def per_sample_loss(output: Tensor, loss: FisherLoss, targets: Tensor | None, generator: torch.Generator) -> Tensor:
    """The loss of each sample (axis 0) of `output`; random targets come from `generator` (CPU)."""
    if loss.kind in ("logits", "probabilities"):
        logits = torch.log(output.clamp_min(1e-12)) if loss.kind == "probabilities" else output
        if targets is None:
            weights = torch.softmax(logits.detach().double(), dim=1).cpu()
            targets = torch.multinomial(weights, 1, generator=generator).squeeze(1).to(output.device)
        return torch.nn.functional.cross_entropy(logits, targets.long(), reduction="none")
    if targets is None:
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float32)
        targets = output.detach() + noise.to(device=output.device, dtype=output.dtype)
    return 0.5 * ((output - targets) ** 2).reshape(len(output), -1).sum(1)


class GradientSource:
    """N gradients of the loss (each averaged over a micro-batch of m samples) for any set of
    weights, reproducibly: collecting the same weights twice gives the same rows."""

    def __init__(
        self,
        model: TorchModel,
        data: Dataset,
        specs: Sequence[InputSpec],
        loss: FisherLoss,
        count: int,
        micro_batch: int,
        seed: int,
        device: torch.device,
    ):
        self.model, self.data, self.specs, self.loss = model, data, specs, loss
        self.count, self.micro_batch, self.seed, self.device = count, micro_batch, seed, device
        self.plan: FeedPlan = feed_plan(specs, data, preferred=micro_batch)
        rng = np.random.default_rng(seed)
        needed = count * micro_batch
        order = [rng.permutation(len(data)) for _ in range(-(-needed // len(data)))]
        self.indices = np.concatenate(order)[:needed].reshape(count, micro_batch)

    @property
    def samples_used(self) -> int:
        return int(len(np.unique(self.indices)))

    def collect(
        self,
        names: Sequence[str],
        masks: dict[str, Tensor] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Tensor]:
        """{name: [N, numel] float32 gradients in ONNX layout (flattened), pruned entries 0}."""
        tensors = {name: self.model.tensors[name] for name in names}
        rows = {
            name: torch.zeros(self.count, t.numel(), dtype=torch.float32, device=t.device)
            for name, t in tensors.items()
        }

        def store(k: int, grads: dict[str, Tensor]) -> None:
            for name, flat in grads.items():
                rows[name][k] = flat

        self.stream(names, store, masks, progress)
        return rows

    def stream(
        self,
        names: Sequence[str],
        consume: Callable[[int, dict[str, Tensor]], None],
        masks: dict[str, Tensor] | None = None,
        progress: Callable[[int], None] | None = None,
        owners: dict[str, int] | None = None,
    ) -> None:
        """Hand gradient k of each weight (flat float32, ONNX layout, pruned entries 0; weights
        the loss does not reach are left out) to `consume(k, grads)` in the order k = 0, 1, ...,
        so that statistics that only accumulate (squares) never hold all N rows. On torchrun's
        ranks each rank computes its own share (`distributed.owned`) and they exchange each
        round's, so every rank consumes all N in that order; `progress` counts the rank's own.
        `owners` (torchrun's tensor split: the rank that folds each weight's rows): each rank
        then receives, and consumes, the rows of its own weights only."""
        params = [self.model.tensors[name] for name in names]
        sizes = {name: p.numel() for name, p in zip(names, params)}
        previous = [p.requires_grad for p in params]
        world = distributed.world()
        try:
            for p in params:
                p.requires_grad_(True)
            for first in range(0, self.count, world):
                k = first + distributed.rank()
                mine = self._gradient(k, names, params, masks) if k < self.count else None
                if mine is not None and progress is not None:
                    progress(1)
                for offset, grads in enumerate(distributed.share(mine, sizes, owners)):
                    if grads is not None:
                        consume(first + offset, grads)
        finally:
            for p, flag in zip(params, previous):
                p.requires_grad_(flag)

    def _gradient(
        self, k: int, names: Sequence[str], params: Sequence[Tensor], masks: dict[str, Tensor] | None
    ) -> dict[str, Tensor]:
        """Gradient k of each weight the loss reaches, flat, masked."""
        grads = torch.autograd.grad(self._loss(k), params, allow_unused=True)
        flats = {}
        for name, g in zip(names, grads):
            if g is None:
                continue
            flat = g.detach().reshape(-1).float()
            if masks is not None and name in masks:
                flat = flat * masks[name].reshape(-1).to(flat.device, flat.dtype)
            flats[name] = flat
        return flats

    def _loss(self, k: int) -> Tensor:
        """Mean per-sample loss over micro-batch k (fixed-batch padding excluded)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        batch = self.data.take(self.indices[k], "micro-batch")
        total = torch.zeros((), device=self.device)
        for output, samples in batch_outputs(self.model, batch, self.specs, self.plan, self.loss.output, self.device):
            targets = None
            if self.loss.targets == "given" and batch.labels is not None:
                targets = torch.from_numpy(np.asarray(batch.labels[samples])).to(self.device)
            total = total + per_sample_loss(output.float(), self.loss, targets, generator).sum()
        return total / self.micro_batch


def batch_outputs(
    model: TorchModel, batch: Dataset, specs: Sequence[InputSpec], plan: FeedPlan, output: int, device: torch.device
) -> Iterator[tuple[Tensor, slice]]:
    """Output `output` of the model (with autograd) for each run over `batch`, one row per sample
    (fixed-batch padding cut off), with the samples of `batch` it covers."""
    for feeds, samples in iter_feeds(batch, specs, plan):
        result = model(*model.inputs(feeds, device))[output]
        if plan.per_sample:
            result = result.unsqueeze(0)
        yield result[: samples.stop - samples.start], samples
