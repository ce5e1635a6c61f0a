"""The layers the repair works on (repair.py): which pruned weights can be repaired, how their
inputs are captured, where their output's per-unit bias lives; and the statistics corrections
applied at their outputs while the run goes on (torch forward hooks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .activations import Capture, capture_plans
from .bridge.bindings import PrunableTensor
from .bridge.convert import TorchModel
from .oneshot import TensorView

NORMALISATIONS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"})


@dataclass(frozen=True)
class Layer:
    """A pruned weight whose layer can be repaired: how its inputs are captured and where its
    output's per-unit bias lives."""

    view: int  # index of its TensorView in the Pruner
    name: str
    capture: Capture
    node: str  # module of the consuming node
    op_type: str
    axis: int  # output units' axis of the node's output
    alpha: float  # Gemm: output = alpha·(x Wᵀ) + beta·C
    beta: float
    bias: str | None  # tensor added per output unit: Conv/Gemm bias, or the constant of the Add after a MatMul
    bias_in_node: bool  # the bias is an input of the node itself (Conv, Gemm) rather than a following Add
    correctable: bool  # a shift can be written back (there is, or may be added, a bias)
    normalised: bool  # a normalisation reads the output


@dataclass
class Correction:
    scale: Tensor  # per output unit
    shift: Tensor


class Corrections:
    """Per-unit scale and shift at layer outputs, applied with forward hooks."""

    def __init__(self, model: TorchModel):
        self.model = model
        self.values: dict[str, Correction] = {}  # by node module
        self.axes: dict[str, int] = {}
        self.enabled = True
        self._handles: dict[str, RemovableHandle] = {}

    def set(self, node: str, axis: int, scale: Tensor, shift: Tensor) -> None:
        self.values[node] = Correction(scale.float(), shift.float())
        self.axes[node] = axis
        if node not in self._handles:
            module = self.model.module.get_submodule(node)
            self._handles[node] = module.register_forward_hook(self._hook(node))

    def _hook(self, node: str):
        def hook(module, args, output):
            if not self.enabled or node not in self.values:
                return output
            c = self.values[node]
            shape = [1] * output.dim()
            shape[self.axes[node]] = -1
            scale = c.scale.to(output.device, output.dtype).reshape(shape)
            return output * scale + c.shift.to(output.device, output.dtype).reshape(shape)

        return hook

    def copy(self) -> dict[str, Correction]:
        return {k: Correction(v.scale.clone(), v.shift.clone()) for k, v in self.values.items()}

    def restore(self, values: dict[str, Correction]) -> None:
        for node in list(self.values):
            if node not in values:
                del self.values[node]
        for node, c in values.items():
            self.set(node, self.axes[node], c.scale, c.shift)

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self.values.clear()

    def state_dict(self) -> dict:
        return {
            node: {"scale": c.scale.cpu(), "shift": c.shift.cpu(), "axis": self.axes[node]}
            for node, c in self.values.items()
        }

    def load_state_dict(self, state: dict) -> None:
        for node, entry in state.items():
            self.set(node, int(entry["axis"]), entry["scale"], entry["shift"])


def find_layers(model: TorchModel, views: Sequence[TensorView]) -> tuple[list[Layer], list[str]]:
    """The repairable layers among the pruned weights, and why the others are not."""
    targets = [v.target for v in views]
    plans, refused = capture_plans(model, targets)
    index = {v.target.name: i for i, v in enumerate(views)}
    users: dict[str, list[tuple[str, int]]] = {}
    for module, inputs in model.node_inputs.items():
        for position, value in enumerate(inputs):
            users.setdefault(value, []).append((module, position))
    layers = []
    for target in targets:
        captures = plans.get(target.name)
        if captures is None:
            continue
        if len(captures) != 1 or len(users.get(target.name, ())) != 1:
            refused.append(f"{target.name!r} (used by several nodes)")
            continue
        layer = _layer(model, target, captures[0], index[target.name], users)
        if layer is None:
            refused.append(f"{target.name!r} (its weight is the first operand)")
        else:
            layers.append(layer)
    return layers, sorted(set(refused))


def _layer(
    model: TorchModel, target: PrunableTensor, capture: Capture, view: int, users: dict[str, list[tuple[str, int]]]
) -> Layer | None:
    node = capture.node
    op_type = model.nodes[node][0]
    inputs = model.node_inputs[node]
    outputs = model.node_outputs.get(node, ())
    rows = target.matrix_shape()[0]
    if inputs.index(target.name) != 1:
        return None  # W @ x and Gemm's A: output units are not on the last axis
    module = model.module.get_submodule(node)
    alpha = float(getattr(module, "alpha", 1.0)) if op_type == "Gemm" else 1.0
    beta = float(getattr(module, "beta", 1.0)) if op_type == "Gemm" else 1.0
    bias, in_node, reads = None, False, list(users.get(outputs[0], ())) if outputs else []
    if op_type in ("Conv", "Gemm"):
        in_node = True
        bias = inputs[2] if len(inputs) > 2 and inputs[2] else None
        correctable = beta != 0 and (bias is None or _per_unit(model, bias, rows, users))
    else:  # MatMul: the bias is the constant of an Add reading the product
        correctable = False
        for module_name, _ in reads:
            add_inputs = model.node_inputs[module_name]
            if model.nodes[module_name][0] == "Add" and len(add_inputs) == 2:
                other = add_inputs[1] if add_inputs[0] == outputs[0] else add_inputs[0]
                if _per_unit(model, other, rows, users):
                    bias, correctable = other, True
                    reads = reads + list(users.get(model.node_outputs[module_name][0], ()))
                break
    normalised = any(model.nodes[m][0] in NORMALISATIONS for m, _ in reads)
    axis = 1 if op_type == "Conv" else -1
    return Layer(view, target.name, capture, node, op_type, axis, alpha, beta, bias, in_node, correctable, normalised)


def _per_unit(model: TorchModel, name: str, rows: int, users: dict[str, list[tuple[str, int]]]) -> bool:
    """Whether `name` is a float tensor of one value per output unit ([rows] or [1, ..., rows]),
    used only here, so shifting it changes nothing else."""
    tensor = model.tensors.get(name)
    if tensor is None or not tensor.is_floating_point() or len(users.get(name, ())) != 1:
        return False
    shape = tuple(tensor.shape)
    return bool(shape) and shape[-1] == rows and all(d == 1 for d in shape[:-1])
