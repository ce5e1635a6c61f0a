"""LSTM, GRU and RNN (versions 7 and 14) with W, R and B taken as inputs.

The weights stay graph tensors in their ONNX layout ([directions, gates·hidden, input]), so they
can be pruned and receive gradients like any other weight. The recurrence is an explicit loop
over time written from the ONNX equations (gate orders iofc for LSTM, zrh for GRU), with
sequence_lens handled by freezing the state and zeroing outputs past each sequence's end.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from onnx2torch.node_converters.registry import add_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

Activation = Callable[[torch.Tensor], torch.Tensor]


def _activation(name: str, alpha: float | None, beta: float | None) -> Activation:
    table: dict[str, Activation] = {
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": torch.relu,
        "softsign": nn.functional.softsign,
        "softplus": nn.functional.softplus,
        "leakyrelu": lambda x: nn.functional.leaky_relu(x, 0.01 if alpha is None else alpha),
        "hardsigmoid": lambda x: torch.clamp(
            (0.2 if alpha is None else alpha) * x + (0.5 if beta is None else beta), 0, 1
        ),
        "elu": lambda x: nn.functional.elu(x, 1.0 if alpha is None else alpha),
        "scaledtanh": lambda x: (1.0 if alpha is None else alpha) * torch.tanh((1.0 if beta is None else beta) * x),
        "affine": lambda x: (1.0 if alpha is None else alpha) * x + (0.0 if beta is None else beta),
        "thresholdedrelu": lambda x: torch.where(x > (1.0 if alpha is None else alpha), x, torch.zeros_like(x)),
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise NotImplementedError(f"recurrent activation {name!r}") from None


class Recurrent(nn.Module):
    """One ONNX recurrent node (LSTM, GRU or RNN)."""

    GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
    DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}

    def __init__(self, kind: str, attributes: dict, outputs: int):
        super().__init__()
        self.kind = kind
        self.outputs = outputs  # how many of (Y, Y_h[, Y_c]) the node declares
        self.hidden = int(attributes["hidden_size"])
        self.direction = attributes.get("direction", "forward")
        if self.direction not in ("forward", "reverse", "bidirectional"):
            raise NotImplementedError(f"{kind} direction {self.direction!r}")
        self.directions = 2 if self.direction == "bidirectional" else 1
        self.layout = int(attributes.get("layout", 0))
        self.clip = attributes.get("clip")
        self.input_forget = int(attributes.get("input_forget", 0)) != 0
        self.linear_before_reset = int(attributes.get("linear_before_reset", 0)) != 0
        per_direction = len(self.DEFAULT_ACTIVATIONS[kind])
        names = list(attributes.get("activations", [])) or self.DEFAULT_ACTIVATIONS[kind] * self.directions
        if len(names) == per_direction and self.directions == 2:
            names = names * 2
        alphas = list(attributes.get("activation_alpha", []))
        betas = list(attributes.get("activation_beta", []))
        self.activations = [
            _activation(name, alphas[i] if i < len(alphas) else None, betas[i] if i < len(betas) else None)
            for i, name in enumerate(names)
        ]
        self.per_direction = per_direction

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        r: torch.Tensor,
        b: torch.Tensor | None = None,
        sequence_lens: torch.Tensor | None = None,
        initial_h: torch.Tensor | None = None,
        initial_c: torch.Tensor | None = None,
        p: torch.Tensor | None = None,
    ):
        if self.layout == 1:  # [batch, seq, input] -> [seq, batch, input]
            x = x.transpose(0, 1)
            initial_h = None if initial_h is None else initial_h.transpose(0, 1)
            initial_c = None if initial_c is None else initial_c.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        zeros = x.new_zeros(self.directions, batch, self.hidden)
        h0 = zeros if initial_h is None else initial_h
        c0 = zeros if initial_c is None else initial_c
        lengths = (
            torch.full((batch,), steps, dtype=torch.int64, device=x.device)
            if sequence_lens is None
            else sequence_lens.to(device=x.device, dtype=torch.int64)
        )
        ys, hs, cs = [], [], []
        for d in range(self.directions):
            reverse = self.direction == "reverse" or d == 1
            bias = None if b is None else b[d]
            peep = None if p is None else p[d]
            acts = self.activations[d * self.per_direction : (d + 1) * self.per_direction]
            y, h, c = self._run(x, w[d], r[d], bias, peep, h0[d], c0[d], lengths, reverse, acts)
            ys.append(y)
            hs.append(h)
            cs.append(c)
        y = torch.stack(ys, dim=1)  # [seq, dirs, batch, hidden]
        y_h, y_c = torch.stack(hs), torch.stack(cs)
        if self.layout == 1:
            y = y.permute(2, 0, 1, 3)
            y_h, y_c = y_h.transpose(0, 1), y_c.transpose(0, 1)
        results = (y, y_h, y_c) if self.kind == "LSTM" else (y, y_h)
        return results[0] if self.outputs == 1 else results[: self.outputs]

    def _clip(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.clip is None else t.clamp(-self.clip, self.clip)

    def _run(self, x, w, r, bias, peep, h, c, lengths, reverse, acts):
        gates = self.GATES[self.kind]
        hidden = self.hidden
        wb = rb = None
        if bias is not None:
            wb, rb = bias[: gates * hidden], bias[gates * hidden :]
        x_proj = torch.matmul(x, w.t())  # all time steps at once: [seq, batch, gates*hidden]
        if wb is not None:
            x_proj = x_proj + wb
        steps = x.shape[0]
        outputs = [x.new_zeros(x.shape[1], hidden)] * steps
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for t in order:
            alive = (t < lengths).to(x.dtype).unsqueeze(1)
            if self.kind == "LSTM":
                new_h, new_c = self._lstm_step(x_proj[t], r, rb, peep, h, c, acts)
            elif self.kind == "GRU":
                new_h, new_c = self._gru_step(x_proj[t], r, rb, h, acts), c
            else:
                pre = x_proj[t] + torch.matmul(h, r.t()) + (0 if rb is None else rb)
                new_h, new_c = acts[0](self._clip(pre)), c
            h = alive * new_h + (1 - alive) * h
            c = alive * new_c + (1 - alive) * c
            outputs[t] = alive * new_h
        return torch.stack(outputs), h, c

    def _lstm_step(self, xp, r, rb, peep, h, c, acts):
        f_act, g_act, h_act = acts
        pre = xp + torch.matmul(h, r.t()) + (0 if rb is None else rb)
        i, o, f, g = pre.chunk(4, dim=-1)  # ONNX gate order: input, output, forget, cell
        if peep is not None:
            p_i, p_o, p_f = peep.chunk(3)
            i, f = i + p_i * c, f + p_f * c
        i = f_act(self._clip(i))
        f = 1 - i if self.input_forget else f_act(self._clip(f))
        g = g_act(self._clip(g))
        new_c = f * c + i * g
        if peep is not None:
            o = o + p_o * new_c
        o = f_act(self._clip(o))
        return o * h_act(new_c), new_c

    def _gru_step(self, xp, r, rb, h, acts):
        f_act, g_act = acts
        hidden = self.hidden
        x_z, x_r, x_h = xp.chunk(3, dim=-1)  # ONNX gate order: update, reset, hidden
        r_z, r_r, r_h = r[:hidden], r[hidden : 2 * hidden], r[2 * hidden :]
        rb_z = rb_r = rb_h = 0
        if rb is not None:
            rb_z, rb_r, rb_h = rb[:hidden], rb[hidden : 2 * hidden], rb[2 * hidden :]
        z = f_act(self._clip(x_z + torch.matmul(h, r_z.t()) + rb_z))
        reset = f_act(self._clip(x_r + torch.matmul(h, r_r.t()) + rb_r))
        if self.linear_before_reset:
            candidate = x_h + reset * (torch.matmul(h, r_h.t()) + rb_h)
        else:
            candidate = x_h + torch.matmul(reset * h, r_h.t()) + rb_h
        candidate = g_act(self._clip(candidate))
        return (1 - z) * candidate + z * h


def _recurrent(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(
        torch_module=Recurrent(node.operation_type, dict(node.attributes), len(node.output_values)),
        onnx_mapping=onnx_mapping_from_node(node),
    )


for _op in ("LSTM", "GRU", "RNN"):
    for _version in (7, 14):
        add_converter(operation_type=_op, version=_version)(_recurrent)
