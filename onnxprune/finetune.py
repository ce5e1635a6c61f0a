"""Fine-tuning with the masks fixed: recover what pruning lost without reviving a pruned weight.

What is trained: the prunable weights and the biases of the nodes they feed (Conv, ConvTranspose,
Gemm inputs, an Add right after a MatMul). Everything else (normalisation, embeddings, constants
that only look like parameters) keeps its value, so the written graph stays the original one.

The loss follows the headline output: cross-entropy against the calibration labels when they are
class indices for a classifier output; otherwise distillation from the dense model's outputs on
the calibration data (KL divergence at a temperature for class scores, mean squared error for
anything else); distillation batches can be perturbed afresh at each step with the dense model
run on them in onnxruntime for the targets (augment.py). The model runs in inference mode
throughout (Dropout off, BatchNorm on its running statistics); BatchNorm statistics are either
kept (`frozen`) or re-estimated on the calibration data after each pruning step and written back
(`reestimate`).

Masks are enforced twice: gradients of pruned entries are zeroed before the optimiser sees them
(so its moments stay zero there) and the weights are multiplied by their masks after every step.
Mini-batches are drawn from seeded permutations indexed by the global step, so a resumed run
draws the same batches as an uninterrupted one. Under torchrun each rank runs every K-th sample of
each mini-batch through the model wrapped in DistributedDataParallel, which sums the gradients
over the ranks before the step: every rank then takes the step one process would, to float
precision.
"""

from __future__ import annotations

import gc
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .augment import Augmenter, make_augmenter
from .bridge.convert import TorchModel
from .data import Dataset, InputSpec, feed_plan, iter_feeds
from .errors import NonFiniteError
from .gradients import batch_outputs
from .registry import Registry
from .validate import Headline, OrtModel, class_labels_fit, output_kind

if TYPE_CHECKING:
    from .bridge.bindings import PrunableTensor
    from .config import PruneConfig

log = logging.getLogger("onnxprune")

Optimizer = Callable[[list[Tensor], float], torch.optim.Optimizer]
OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")
# Momentum SGD is the classic choice for fine-tuning after pruning; Adam needs less lr tuning.
OPTIMIZERS.register("adam")(lambda params, lr: torch.optim.Adam(params, lr=lr))
OPTIMIZERS.register("sgd")(lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))

BATCHNORM_MODES = ("frozen", "reestimate")
AUGMENT_STREAM = 7  # the augmentation's random stream, apart from the batches' permutations


@dataclass(frozen=True)
class Augmented:
    """Distillation on perturbed batches: how to perturb, and the dense model to run on them."""

    augmenter: Augmenter
    model: Path


# ------------------------------------------------------------------------------ losses (pure)


def distillation_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) of the softened distributions, scaled by T² so that its gradient
    keeps the magnitude of a cross-entropy's (Hinton et al.); per sample, summed over classes."""
    t = temperature
    log_p = F.log_softmax(teacher / t, dim=1)
    log_q = F.log_softmax(student / t, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1) * (t * t)


@dataclass(frozen=True)
class FinetuneLoss:
    """What fine-tuning minimises, on which output."""

    output: int
    output_name: str
    kind: str  # "cross-entropy", "kl" or "mse"
    scores: str  # "logits", "probabilities" or "values"
    temperature: float = 2.0

    def describe(self) -> str:
        name = repr(self.output_name)
        if self.kind == "cross-entropy":
            return f"cross-entropy of {self.scores} {name} against the calibration labels"
        if self.kind == "kl":
            return (
                f"distillation: KL divergence to the dense model's {self.scores} {name} "
                f"at temperature {self.temperature:g}"
            )
        return f"distillation: mean squared error to the dense model's output {name}"

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        """Loss of each sample; `target` holds class indices (cross-entropy) or teacher outputs."""
        if self.scores == "probabilities":
            output = torch.log(output.clamp_min(1e-12))
            if self.kind == "kl":
                target = torch.log(target.clamp_min(1e-12))
        if self.kind == "cross-entropy":
            return F.cross_entropy(output, target.long(), reduction="none")
        if self.kind == "kl":
            return distillation_kl(output, target, self.temperature)
        return ((output - target) ** 2).reshape(len(output), -1).mean(1)


def choose_finetune_loss(
    headline: Headline, reference: Sequence[np.ndarray], names: Sequence[str], calibration: Dataset, temperature: float
) -> FinetuneLoss:
    """Cross-entropy when the calibration labels are class indices for the headline classifier
    output, else distillation from the dense model."""
    index = headline.output
    kind = output_kind(reference[index])
    if kind in ("logits", "probabilities"):
        labels = calibration.labels
        if labels is not None and class_labels_fit(labels, reference[index].shape[1]):
            return FinetuneLoss(index, names[index], "cross-entropy", kind, temperature)
        return FinetuneLoss(index, names[index], "kl", kind, temperature)
    return FinetuneLoss(index, names[index], "mse", "values", temperature)


# ------------------------------------------------------------------------------ what is trained


def trainable_tensors(model: TorchModel, weights: Sequence[str]) -> dict[str, Tensor]:
    """The pruned weights and the biases of the nodes they feed, by ONNX name."""
    chosen = list(weights)
    feeding = set(weights)
    produced_by_matmul: set[str] = set()
    for module, (op_type, _) in model.nodes.items():
        inputs = model.node_inputs.get(module, ())
        if op_type in ("Conv", "ConvTranspose", "Gemm") and len(inputs) > 2 and inputs[1] in feeding:
            chosen.append(inputs[2])
        elif op_type == "MatMul" and feeding & set(inputs):
            produced_by_matmul.update(model.node_outputs.get(module, ()))
    for module, (op_type, _) in model.nodes.items():
        inputs = model.node_inputs.get(module, ())
        if op_type == "Add" and len(inputs) == 2 and produced_by_matmul & set(inputs):
            chosen.extend(name for name in inputs if name not in produced_by_matmul)
    out: dict[str, Tensor] = {}
    for name in chosen:
        tensor = model.tensors.get(name)
        if tensor is not None and tensor.is_floating_point() and name not in out:
            out[name] = tensor
    return out


def batchnorm_statistics(model: TorchModel) -> dict[str, Tensor]:
    """Running mean and variance of every BatchNorm the converter built as a torch BatchNorm, by
    the name of the ONNX tensor they came from (for the write-back)."""
    out: dict[str, Tensor] = {}
    for module_name, (op_type, _) in model.nodes.items():
        if op_type != "BatchNormalization":
            continue
        module = model.module.get_submodule(module_name)
        inputs = model.node_inputs.get(module_name, ())
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and len(inputs) >= 5:
            mean, var = module.running_mean, module.running_var
            if mean is not None and var is not None:  # None only without track_running_stats
                out[inputs[3]], out[inputs[4]] = mean, var
    return out


def reestimate_batchnorm(
    model: TorchModel, data: Dataset, specs: Sequence[InputSpec], batch_size: int, device: torch.device
) -> int:
    """Recompute every torch BatchNorm's running statistics as the plain average over the
    calibration data at the current weights; returns how many layers were re-estimated."""
    layers = [m for m in model.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        plan = feed_plan(specs, data, batch_size)
        with torch.no_grad():
            for feeds, _ in iter_feeds(data, specs, plan):
                model(*model.inputs(feeds, device))
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum
            m.eval()
    return len(layers)


# ------------------------------------------------------------------------------ the loop


def batch_indices(samples: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Indices of global step `step`'s mini-batch: consecutive slices of seeded permutations, one
    per epoch, so the batch depends only on (seed, step)."""
    batch = min(batch, samples)
    start = step * batch
    out: list[int] = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), samples)
        order = np.random.default_rng([seed, epoch]).permutation(samples)
        out.extend(order[offset : offset + batch - len(out)].tolist())
    return np.asarray(out)


class Finetuner:
    """Trains `tensors` of the model under fixed masks; its state is saved in checkpoints."""

    def __init__(
        self,
        model: TorchModel,
        tensors: dict[str, Tensor],
        data: Dataset,
        specs: Sequence[InputSpec],
        loss: FinetuneLoss,
        teacher: np.ndarray | Augmented | None,
        optimizer: str,
        lr: float,
        batch_size: int,
        seed: int,
        device: torch.device,
    ):
        """`teacher`: the dense model's outputs on the calibration data, or how to perturb each
        batch and where the dense model is to run on it (None for cross-entropy)."""
        self.model, self.tensors, self.data, self.specs, self.loss = model, tensors, data, specs, loss
        self.teacher, self.batch_size, self.seed, self.device = teacher, batch_size, seed, device
        self._dense: OrtModel | None = None  # open only while `run` trains on augmented batches
        self.optimizer = OPTIMIZERS.get(optimizer)(list(tensors.values()), lr)
        self.step_count = 0
        self.curve: list[float] = []  # mean loss per optimiser step
        self.plan = feed_plan(specs, data, batch_size)

    def run(self, steps: int, masks: dict[str, Tensor], progress: Callable[[int], None] | None = None) -> None:
        """`steps` optimiser steps; entries where a mask is False are zero before and after."""
        if steps <= 0:
            return
        masks = {name: m.to(self.tensors[name].device) for name, m in masks.items() if name in self.tensors}
        self._apply(masks)
        params = list(self.tensors.values())
        for p in params:
            p.requires_grad_(True)
        if isinstance(self.teacher, Augmented):
            self._dense = OrtModel(self.teacher.model)
        parallel = None
        try:
            parallel = self._parallel()
            for _ in range(steps):
                indices = batch_indices(len(self.data), self.batch_size, self.step_count, self.seed)
                self.optimizer.zero_grad(set_to_none=True)
                value = self._backward(indices, parallel)
                if not math.isfinite(value):
                    raise NonFiniteError(
                        f"the fine-tuning loss became {value} at step {self.step_count + 1}; "
                        "lower --lr; nothing was written"
                    )
                for name, mask in masks.items():
                    grad = self.tensors[name].grad
                    if grad is not None:
                        grad.mul_(mask.to(grad.dtype))
                self.optimizer.step()
                self._apply(masks)
                self.curve.append(value)
                self.step_count += 1
                if progress is not None:
                    progress(1)
        finally:
            self._dense = None
            # DDP's gradient hooks stay on the tensors until its reducer is freed; the gradients
            # collected at the next pruning step must not be reduced
            del parallel
            gc.collect()
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    def _parallel(self) -> nn.parallel.DistributedDataParallel | None:
        """The model's module under DistributedDataParallel when torchrun started several ranks and
        every rank has a sample of each mini-batch (None: this process trains on whole batches).
        Only the trained tensors require gradients, so only theirs are reduced."""
        ranks = distributed.world()
        if ranks == 1 or min(self.batch_size, len(self.data)) < ranks:
            return None
        devices = [self.device.index or 0] if self.device.type == "cuda" else None
        log.info("fine-tuning: each mini-batch split over %d ranks (DistributedDataParallel)", ranks)
        return nn.parallel.DistributedDataParallel(
            self.model.module, device_ids=devices, broadcast_buffers=False, find_unused_parameters=True
        )

    def _apply(self, masks: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, mask in masks.items():
                self.tensors[name].mul_(mask.to(self.tensors[name].dtype))

    def _batch(self, indices: np.ndarray, share: np.ndarray) -> tuple[Dataset, np.ndarray]:
        """The step's batch and its targets: labels, the dense outputs on the calibration samples,
        or those on the batch perturbed with the step's own seed (a resumed run draws the same),
        cut to `share` (positions in the batch) after any perturbation, which sees the whole batch."""
        batch = self.data.take(indices, "fine-tuning batch")
        targets = self.data.labels if self.loss.kind == "cross-entropy" else self.teacher
        if isinstance(targets, Augmented):
            rng = np.random.default_rng([self.seed, self.step_count, AUGMENT_STREAM])
            arrays = targets.augmenter.perturb(batch.arrays, rng)
            batch = replace(batch, arrays=arrays, source="augmented fine-tuning batch").take(share, "fine-tuning share")
            if self._dense is None:
                raise RuntimeError("the dense model for augmented batches is open only during run()")
            return batch, self._dense.run(batch, self.specs, len(share))[self.loss.output]
        if targets is None:
            raise ValueError(f"the {self.loss.kind} fine-tuning loss has no targets")
        return batch.take(share, "fine-tuning share"), np.asarray(targets[indices[share]])

    def _backward(self, indices: np.ndarray, parallel: nn.parallel.DistributedDataParallel | None) -> float:
        """The mean loss over the step's batch, its gradients accumulated run by run (each run's
        activations freed before the next). Under DistributedDataParallel this rank takes every
        K-th sample; each rank's loss is scaled by K because DDP averages the ranks' gradients,
        which are reduced once, at the last run's backward."""
        ranks = distributed.world() if parallel is not None else 1
        share = np.arange(len(indices))[distributed.rank() :: ranks] if ranks > 1 else np.arange(len(indices))
        batch, targets = self._batch(indices, share)
        model = replace(self.model, module=parallel) if parallel is not None else self.model  # type: ignore[arg-type]
        runs = -(-len(batch) // self.plan.batch)
        outputs = batch_outputs(model, batch, self.specs, self.plan, self.loss.output, self.device)
        total = 0.0
        for run in range(runs):
            # every run's forward and backward but the last's inside no_sync: reduced once per step
            with parallel.no_sync() if parallel is not None and run < runs - 1 else nullcontext():
                output, samples = next(outputs)
                target = torch.from_numpy(np.asarray(targets[samples]))
                if self.loss.kind == "cross-entropy":
                    target = target.reshape(-1)
                loss = self.loss.per_sample(output.float(), target.to(self.device).float()).sum() / len(indices)
                (loss * ranks).backward()
            total += loss.item()
        return distributed.total(total) if ranks > 1 else total

    @property
    def augmentation(self) -> str:
        """How the batches are perturbed, for the report ("none": as they are)."""
        return self.teacher.augmenter.description if isinstance(self.teacher, Augmented) else "none"

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step_count, "curve": list(self.curve)}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count, self.curve = int(state["step"]), list(state["curve"])


def make_finetuner(
    config: PruneConfig,
    torch_model: TorchModel,
    targets: Sequence[PrunableTensor],
    calibration: Dataset | None,
    specs: Sequence[InputSpec],
    headline: Headline,
    reference: list[np.ndarray],
    device: torch.device,
) -> Finetuner | None:
    """The fine-tuner for --finetune-steps > 0: labels when they fit, else distillation from the
    dense model's outputs on the calibration data (computed here in onnxruntime)."""
    if config.finetune_steps <= 0 or calibration is None:
        return None
    loss = choose_finetune_loss(headline, reference, torch_model.output_names, calibration, config.temperature)
    teacher: np.ndarray | Augmented | None = None
    if loss.kind != "cross-entropy":
        augmenter = make_augmenter(config.augment, calibration, config.augment_rate)
        if augmenter is not None:
            teacher = Augmented(augmenter, config.input)
        else:
            # a session of its own: keeping the reference's alive through pruning would hold a
            # second copy of the weights the whole time
            teacher = OrtModel(config.input).run(calibration, specs, config.eval_batch_size)[loss.output]
    tensors = trainable_tensors(torch_model, [t.name for t in targets])
    log.info("fine-tuning: %s", loss.describe())
    if isinstance(teacher, Augmented):
        log.info("fine-tuning batches augmented: %s", teacher.augmenter.description)
    return Finetuner(
        torch_model,
        tensors,
        calibration,
        specs,
        loss,
        teacher,
        config.optimizer,
        config.lr,
        config.batch_size,
        config.seed,
        device,
    )
