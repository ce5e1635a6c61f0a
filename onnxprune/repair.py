"""Repair after each pruning step, for any estimator: the estimator's own update of the survivors
scaled back where that helps, mask refinement, optimal weights for the fixed mask, and statistics
correction (maths in reconstruct.py).

The update scaling (woodfisher, fishleg: estimators that update every tensor's survivors at once
from statistics taken before the step) tries fractions of that update and keeps the one with the
lowest held-out loss; the other additions follow.

Each addition is one pass over the layers whose inputs can be captured (MatMul, Gemm, 1-D/2-D
Conv weights used directly), in network order, so every layer is repaired on the inputs of the
already-repaired layers before it: for each layer the same calibration samples run through the
dense model (the weights saved before pruning) and the current one, and the paired input rows give
the layer's moments. A pass is kept only when it lowers the loss on held-out calibration samples
(the dense model's outputs against the current ones, as for the automatic searches); otherwise the
weights, masks and corrections are put back. Every pass is reported with both losses.

Statistics correction is a per-output-unit scale and shift applied at the layer's output (torch
forward hooks while the run goes on; folded into the written graph: the weight's rows scaled, the
bias shifted — Conv and Gemm get a bias input where they had none, a MatMul's following Add its
constant).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .activations import relevant_rows, samples_per_batch
from .bridge.convert import TorchModel
from .data import Dataset, InputSpec, feed_plan, iter_feeds
from .errors import NonFiniteError
from .finetune import batchnorm_statistics
from .oneshot import Pruner, TensorView
from .progress import Progress
from .reconstruct import Moments, affine_correction, output_moments, refine_masks, scaled_update, solve_masked
from .repair_layers import Corrections, Layer, find_layers
from .settings import settings_from

if TYPE_CHECKING:
    from .config import PruneConfig

log = logging.getLogger("onnxprune")

# off: nothing; mean: each layer's output mean matched to the dense model's; variance: mean and
# variance; auto: variance where a normalisation reads the layer's output (BatchNorm and friends
# would otherwise see a shifted and shrunk input), the mean elsewhere.
STATISTICS_MODES = ("auto", "off", "mean", "variance")


# The PruneConfig fields the repair reads (their defaults and meaning are documented there).
REPAIR_READS = (
    "scale_update",
    "refine_masks",
    "solve_weights",
    "correct_statistics",
    "repair_samples",
    "repair_damp",
    "repair_cycles",
    "repair_rounds",
    "relevant_rows",
)


def repair_settings(config: PruneConfig, **changes: object) -> Any:
    """The repair's settings: the config's REPAIR_READS fields, with `changes`."""
    return replace(settings_from(REPAIR_READS, config), **changes)


# the fractions of an estimator's update the update pass tries besides the whole (1)
UPDATE_SCALES = (0.0, 0.25, 0.5, 0.75)


def repair_passes(settings: Any, pruner: Pruner | None = None) -> tuple[str, ...]:
    """The passes in the order they run: the update scaling (where `pruner`'s estimator updates
    the survivors at once), masks and weights alternating `repair_rounds` times, then the
    statistics correction."""
    scaled = settings.scale_update and (pruner is None or pruner.updates_at_once)
    alternating = [name for name, on in (("masks", settings.refine_masks), ("weights", settings.solve_weights)) if on]
    statistics = ("statistics",) if settings.correct_statistics != "off" else ()
    return ("update",) * scaled + tuple(alternating * settings.repair_rounds) + statistics


@dataclass
class PassRecord:
    step: str
    addition: str
    loss_before: float
    loss_after: float
    kept: bool
    layers: int  # layers repaired (update: tensors)
    changed: int  # swaps (masks), weights moved (weights, update), units corrected (statistics)
    seconds: float
    scale: float | None = None  # update: the fraction of the estimator's update kept


@dataclass
class Repairer:
    """Runs the configured passes after each pruning step of a Pruner (see the module doc)."""

    settings: Any  # repair_settings()
    model: TorchModel
    pruner: Pruner
    samples: Dataset  # calibration samples the moments are taken on
    specs: Sequence[InputSpec]
    evaluate: Callable[[], float]  # loss on held-out calibration samples against the dense model
    device: torch.device
    progress: Progress
    batch: int = 32
    layers: list[Layer] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers, self.skipped = find_layers(self.model, self.pruner.views)
        self.corrections = Corrections(self.model)
        self.plan = feed_plan(self.specs, self.samples, self.batch)
        # the dense values of everything a repair or fine-tuning may change, swapped in (by
        # pointer, no copy) while the dense model's inputs are captured
        tracked = {v.target.name: v.param for v in self.pruner.views}
        tracked.update({layer.bias: self.model.tensors[layer.bias] for layer in self.layers if layer.bias})
        tracked.update(batchnorm_statistics(self.model))
        self._tracked = tracked
        self._dense = {name: t.detach().clone() for name, t in tracked.items()}
        self._ids = {id(t): name for name, t in tracked.items()}
        self._dense_grams: dict[str, Tensor] = {}
        self._relevant: list[dict[str, Tensor]] | None = None  # per batch, per layer: the rows the outputs read
        self.pruner.keep_updates = "update" in self.passes

    @property
    def passes(self) -> tuple[str, ...]:
        """The passes that run: those over layers only where some layer's inputs can be captured."""
        return tuple(p for p in repair_passes(self.settings, self.pruner) if p == "update" or self.layers)

    @property
    def active(self) -> bool:
        return bool(self.passes)

    def dense_weight(self, layer: Layer) -> Tensor:
        view = self.pruner.views[layer.view]
        return view.to_canonical(self._dense[layer.name].reshape(-1).float())

    def after_step(self, label: str, before: Sequence[Tensor]) -> None:
        """Run the passes after a pruning step; `before` are the keep-masks from before it (the
        refinement revives only what this step pruned)."""
        if not self.active:
            return
        loss = self.evaluate()
        for addition in self.passes:
            if addition == "update":
                loss = self._scale_update(label, loss)
            else:
                loss = self._pass(label, addition, before, loss)

    def _scale_update(self, label: str, loss: float) -> float:
        """Keep the fraction of the step's update (UPDATE_SCALES or all of it) with the lowest
        held-out loss (`loss`: with all of it); ties keep the larger fraction."""
        started = time.perf_counter()
        views, updates = self.pruner.views, self.pruner.updates
        self.pruner.updates = {}
        whole = {i: views[i].read().clone() for i in updates}  # read() can share the parameter's memory
        losses = {1.0: loss}
        for scale in UPDATE_SCALES if updates else ():
            for i, update in updates.items():
                views[i].write(scaled_update(whole[i], update, scale))
            losses[scale] = self.evaluate()
        chosen = min(losses, key=lambda s: (losses[s], -s))
        for i, update in updates.items():
            views[i].write(scaled_update(whole[i], update, chosen))
        moved = sum(int(torch.count_nonzero(u)) for u in updates.values()) if chosen != 1.0 else 0
        seconds = time.perf_counter() - started
        record = PassRecord(label, "update", loss, losses[chosen], chosen != 1.0, len(updates), moved, seconds, chosen)
        self.records.append(record)
        listed = ", ".join(f"{s:g}: {v:.4g}" for s, v in sorted(losses.items()))
        log.info("%s: update scaled by %g (held-out loss by scale: %s)", label, chosen, listed)
        return losses[chosen]

    # ---------------------------------------------------------------- one pass

    def _pass(self, label: str, addition: str, before: Sequence[Tensor], loss_before: float) -> float:
        started = time.perf_counter()
        views, pruner = self.pruner.views, self.pruner
        saved_values = {layer.name: views[layer.view].param.detach().clone() for layer in self.layers}
        saved_keep = list(pruner.keep)
        saved_corrections = self.corrections.copy()
        by_node = {layer.node: layer for layer in self.layers}
        changed = 0
        with self.progress.task(f"{addition} repair, {label}", len(self.layers), "layers") as task:

            def repair(node: str, moments: Moments | None) -> None:
                nonlocal changed
                layer = by_node[node]
                changed += self._repair(addition, layer, moments, before[layer.view])
                task.advance()

            self._lockstep(by_node, repair)
        loss_after = self.evaluate()
        kept = loss_after <= loss_before
        if not kept:
            for layer in self.layers:
                views[layer.view].param.data.copy_(saved_values[layer.name])
            pruner.keep = saved_keep
            self.corrections.restore(saved_corrections)
        record = PassRecord(
            label, addition, loss_before, loss_after, kept, len(self.layers), changed, time.perf_counter() - started
        )
        self.records.append(record)
        log.info(
            "%s: %s repair of %d layers: held-out loss %.4g -> %.4g (%s)",
            label,
            addition,
            len(self.layers),
            loss_before,
            loss_after,
            "kept" if kept else "undone",
        )
        return loss_after if kept else loss_before

    def _lockstep(self, layers: dict[str, Layer], repair: Callable[[str, Moments | None], None]) -> None:
        """Run the dense and the current model node by node over all repair samples at once; at
        each repairable layer, take the moments of its paired inputs, let `repair` change it, and
        only then compute its output in the current model. Each pass so costs about two forward
        runs, however many layers there are (values are dropped after their last use)."""
        graph = self.model.module.graph
        nodes = list(graph.nodes)
        last_use = {}
        for position, node in enumerate(nodes):
            for used in node.all_input_nodes:
                last_use[used] = position
        batches = list(iter_feeds(self.samples, self.specs, self.plan))
        reals = [(s.stop - s.start) / self.plan.batch if self.plan.fixed else 1.0 for _, s in batches]
        inputs = [self.model.inputs(feeds, self.device) for feeds, _ in batches]
        relevant = self._relevant_rows(batches, reals, inputs)
        dense_env: list[dict] = [{} for _ in batches]
        current_env: list[dict] = [{} for _ in batches]
        root = self.model.module
        with torch.no_grad():
            for position, node in enumerate(nodes):
                if node.op == "output":
                    break
                layer = layers.get(node.target) if node.op == "call_module" else None
                with self._dense_values():
                    for b in range(len(batches)):
                        dense_env[b][node] = self._run(node, dense_env[b], inputs[b], root)
                    if layer is not None:
                        dense_rows = [
                            _only(self._rows(layer, node, dense_env[b], inputs[b], root, reals[b]), relevant[b], layer)
                            for b in range(len(batches))
                        ]
                if layer is not None:
                    moments = None
                    cached = self._dense_grams.get(layer.name)
                    for b in range(len(batches)):
                        rows = _only(
                            self._rows(layer, node, current_env[b], inputs[b], root, reals[b]), relevant[b], layer
                        )
                        dense = dense_rows[b]
                        if rows is None or dense is None:
                            continue
                        if moments is None:
                            moments = Moments.empty(rows.shape[0], rows.shape[2], rows.device)
                        moments.add(rows, dense, dense_gram=cached is None)
                    if moments is not None:
                        # the dense model's inputs are the same at every pass: their Gram once
                        if cached is None:
                            self._dense_grams[layer.name] = cached = moments.dd
                        moments.dd = cached
                    repair(node.target, moments)
                for b in range(len(batches)):
                    current_env[b][node] = self._run(node, current_env[b], inputs[b], root)
                for used in node.all_input_nodes:
                    if last_use.get(used) == position:
                        for env in (*dense_env, *current_env):
                            env.pop(used, None)

    def _relevant_rows(self, batches: list, reals: list[float], inputs: list[list[Tensor]]) -> list[dict[str, Tensor]]:
        """Per batch, per layer, the input rows the dense model's outputs read (see
        activations.relevant_rows); computed at the first pass and kept (it does not depend on
        the weights)."""
        if self._relevant is None and not self.settings.relevant_rows:
            self._relevant = [{} for _ in batches]
        if self._relevant is None:
            captures = [layer.capture for layer in self.layers]
            self._relevant = []
            with self._dense_values():
                for b, (_, samples) in enumerate(batches):
                    per_batch = samples_per_batch(self.plan, samples)
                    masks = relevant_rows(self.model, inputs[b], captures, per_batch, reals[b], 7_919 + b)
                    if masks is None:  # no layer has several rows per sample
                        self._relevant = [{} for _ in batches]
                        break
                    self._relevant.append({self.layers[k].name: mask for k, mask in masks.items()})
        return self._relevant

    def _run(self, node, env: dict, inputs: list[Tensor], root):
        """One fx node's value (under `_dense_values` that of the dense model)."""
        if node.op == "placeholder":
            return inputs[_placeholder(node)]
        if node.op == "get_attr":
            value = root
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return value
        args = fx_map(node.args, env)
        kwargs = fx_map(node.kwargs, env)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return root.get_submodule(node.target)(*args, **kwargs)

    def _rows(self, layer: Layer, node, env: dict, inputs, root, real: float) -> Tensor | None:
        """The layer's input rows [groups, n, cols] from its node's arguments in `env`, read by a
        pre-hook of its capture module while the node runs up to that point."""
        found: list[Tensor] = []
        module = root.get_submodule(layer.capture.module)

        def hook(mod, args):
            rows = layer.capture.read(mod, args)
            if rows is not None:
                found.append(rows[:, : int(round(rows.shape[1] * real))])
            raise _Stop

        handle = module.register_forward_pre_hook(hook)
        try:
            self._run(node, env, inputs, root)
        except _Stop:
            pass
        finally:
            handle.remove()
        return found[0] if found else None

    @contextmanager
    def _dense_values(self):
        """The tracked tensors hold their dense values (the same tensor objects, so captures still
        recognise them) and the corrections are off."""
        self._swap()
        self.corrections.enabled = False
        try:
            yield
        finally:
            self._swap()
            self.corrections.enabled = True

    def _swap(self) -> None:
        """Exchange the tracked tensors' current and dense values (by pointer, no copy)."""
        for name, tensor in self._tracked.items():
            tensor.data, self._dense[name] = self._dense[name], tensor.data

    def _repair(self, addition: str, layer: Layer, moments: Moments | None, before: Tensor) -> int:
        """Apply one addition to one layer; returns how much it changed."""
        if moments is None or moments.count == 0:
            return 0
        view = self.pruner.views[layer.view]
        groups = moments.pp.shape[0]
        shape = (groups, -1, moments.pp.shape[1])
        w = view.read().to(moments.pp.device).reshape(shape)
        w0 = self.dense_weight(layer).to(moments.pp.device).reshape(shape)
        keep = self.pruner.keep[layer.view].to(moments.pp.device).reshape(shape)
        if addition == "masks":
            if self.pruner.pattern is not None:
                return 0  # swaps inside a row would break the N:M groups
            revivable = before.to(keep.device).reshape(shape) & ~keep
            new, new_keep, swaps = refine_masks(w, w0, keep, revivable, moments, self.settings.repair_cycles)
            self._write(layer, view, new, new_keep)
            return swaps
        if addition == "weights":
            new = solve_masked(w, w0, keep, moments, self.settings.repair_damp)
            self._write(layer, view, new, keep)
            return int(((new - w.double()).abs() > 0).sum())
        return self._correct(layer, view, moments, w, w0)

    def _write(self, layer: Layer, view: TensorView, new: Tensor, keep: Tensor) -> None:
        if not bool(torch.isfinite(new).all()):
            raise NonFiniteError(f"the repair of {layer.name!r} produced NaN or infinite values; nothing was written")
        flat_keep = keep.reshape(-1).to(self.pruner.keep[layer.view].device)
        self.pruner.keep[layer.view] = flat_keep
        view.write(torch.where(flat_keep.to(new.device), new.reshape(-1), 0.0).float())

    def _correct(self, layer: Layer, view: TensorView, moments: Moments, w: Tensor, w0: Tensor) -> int:
        if not layer.correctable:
            return 0
        mode = self.settings.correct_statistics
        variance = mode == "variance" or (mode == "auto" and layer.normalised)
        mean_p, var_p = output_moments(w, moments.sum_p, moments.pp, moments.count)
        mean_d, var_d = output_moments(w0, moments.sum_d, moments.dd, moments.count)
        mean_p, var_p, mean_d, var_d = (x.reshape(-1) for x in (mean_p, var_p, mean_d, var_d))
        alpha2 = layer.alpha * layer.alpha
        mean_p, mean_d, var_p, var_d = layer.alpha * mean_p, layer.alpha * mean_d, alpha2 * var_p, alpha2 * var_d
        if layer.bias is not None and layer.bias_in_node:
            # the node's output includes its bias: the current one (fine-tuning may move it) and the dense one
            mean_p = mean_p + layer.beta * self.model.tensors[layer.bias].detach().double().reshape(-1).to(
                mean_p.device
            )
            mean_d = mean_d + layer.beta * self._dense[layer.bias].double().reshape(-1).to(mean_d.device)
        scale, shift = affine_correction(mean_d, var_d, mean_p, var_p, variance)
        self.corrections.set(layer.node, layer.axis, scale, shift)
        return int(scale.numel())

    # ---------------------------------------------------------------- writing

    def fold(self, arrays: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
        """Fold the corrections into `arrays` (ONNX values by name: the weights' rows scaled, the
        biases shifted); returns the biases to add, as (node output, weight name, values)."""
        added = []
        by_node = {layer.node: layer for layer in self.layers}
        for node, c in self.corrections.values.items():
            layer = by_node[node]
            view = self.pruner.views[layer.view]
            scale, shift = c.scale.double().cpu().numpy(), c.shift.double().cpu().numpy()
            weight = arrays.get(layer.name)
            weight = view.param.detach().cpu().numpy() if weight is None else weight
            axis = 1 if view.swapped else 0
            shape = [1] * weight.ndim
            shape[axis] = -1
            arrays[layer.name] = (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)
            if layer.bias is None:
                added.append((self.model.node_outputs[node][0], layer.name, (shift / layer.beta).astype(np.float32)))
                continue
            bias = arrays.get(layer.bias)
            bias = self.model.tensors[layer.bias].detach().cpu().numpy() if bias is None else bias
            flat = bias.astype(np.float64).reshape(-1)
            new = flat * scale + shift / layer.beta if layer.bias_in_node else flat + shift
            arrays[layer.bias] = new.reshape(bias.shape).astype(bias.dtype)
        return added

    def report(self) -> dict:
        return {
            "passes": list(self.passes),
            "statistics": self.settings.correct_statistics,
            "samples": len(self.samples),
            "layers": len(self.layers),
            "skipped": self.skipped,
            "corrected_layers": len(self.corrections.values),
            # share of the layers' input rows left out because the outputs never read them (padding)
            "rows_left_out": self.rows_left_out(),
            "steps": [
                {
                    "step": r.step,
                    "addition": r.addition,
                    "loss_before": round(r.loss_before, 6),
                    "loss_after": round(r.loss_after, 6),
                    "kept": r.kept,
                    "changed": r.changed,
                    "seconds": round(r.seconds, 3),
                    **({"scale": r.scale} if r.scale is not None else {}),
                }
                for r in self.records
            ],
        }

    def rows_left_out(self) -> float:
        checked = sum(mask.numel() for batch in self._relevant or [] for mask in batch.values())
        dropped = sum(int((~mask).sum()) for batch in self._relevant or [] for mask in batch.values())
        return round(dropped / checked, 4) if checked else 0.0

    def reset(self) -> None:
        """Forget the corrections and records (the weights were put back to before the step)."""
        self.corrections.restore({})
        self.records = []

    def state_dict(self) -> dict:
        """Corrections and pass records, for a checkpoint (tensors and plain values only)."""
        return {"corrections": self.corrections.state_dict(), "records": [list(vars(r).values()) for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        self.corrections.load_state_dict(state["corrections"])
        self.records = [PassRecord(*values) for values in state["records"]]

    def close(self) -> None:
        self.corrections.remove()


def _only(rows: Tensor | None, relevant: dict[str, Tensor], layer: Layer) -> Tensor | None:
    """The rows of `layer` its model's outputs read (all when nothing was found to drop)."""
    keep = relevant.get(layer.name)
    return rows if rows is None or keep is None else rows[:, keep.to(rows.device)]


class _Stop(Exception):
    """Raised in a capture pre-hook once the rows were read: the node's output is not needed."""


def _placeholder(node) -> int:
    """The position of a placeholder among the graph's inputs (they are named x0, x1, ...)."""
    return int(str(node.target)[1:])


def fx_map(value, env: dict):
    """fx arguments with their nodes replaced by the values in `env`."""
    from torch import fx

    return fx.node.map_arg(value, lambda n: env[n])
