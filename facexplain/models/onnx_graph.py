"""Run a small ONNX graph (``.onnx``) as a differentiable PyTorch module, with no ONNX runtime.

Some FR models reach package registries only as ONNX files (e.g. the 512-d MobileFaceNet of the npm
package ``faceplugin-face-recognition-js``, :mod:`facexplain.models.faceplugin`). An ONNX file carries its
architecture as data, a topologically ordered list of nodes (op type, inputs, attributes) over named
initialisers, so, as with tfjs graph models (:mod:`facexplain.models.tfjs_graph`), :class:`OnnxGraphNet`
reads that list once and replays it with torch ops. Nothing in the file is executed: an op outside
:data:`SUPPORTED_OPS`, an attribute this replay does not honour, or a second graph input is refused by name
at load time, so a model either runs exactly or not at all.

The replay is differentiable with respect to its input (attacks, SSI and decoder training may use it);
its weights are buffers, not parameters: a ported model is never trained here.

Batch: graphs are often exported for one image (a ``Reshape`` to ``[1, -1]``). The leading entry of a
``Reshape`` target is read as the batch dimension, so the module takes any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_OPS = ("Conv", "PRelu", "Relu", "Add", "Mul", "BatchNormalization", "Reshape", "Flatten", "Gemm")
_CONV_ATTRS = {"dilations", "group", "kernel_shape", "pads", "strides"}


class OnnxGraphError(ValueError):
    """The file is not an ONNX graph this replay runs exactly (unknown op, unsupported attribute, ...)."""


@dataclass(frozen=True)
class _Node:
    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict[str, Any]


def _param_key(name: str) -> str:
    return "w_" + "".join(c if c.isalnum() else "_" for c in name)


class OnnxGraphNet(nn.Module):
    """An ONNX graph with one input and one output, replayed node by node (module docstring)."""

    def __init__(self, nodes: list[_Node], weights: dict[str, torch.Tensor], input_name: str, output_name: str):
        super().__init__()
        self.nodes = nodes
        self.input_name, self.output_name = input_name, output_name
        self._keys: dict[str, str] = {}
        # Reshape targets as Python ints, read once (constant shapes only: checked below)
        self._shapes = {
            n.inputs[1]: [int(v) for v in weights[n.inputs[1]].tolist()]
            for n in nodes
            if n.op == "Reshape" and n.inputs[1] in weights
        }
        for name, value in weights.items():
            key = _param_key(name)
            if key in self._keys.values():
                raise OnnxGraphError(f"two initialisers map to one buffer name ({name!r})")
            self._keys[name] = key
            self.register_buffer(key, value)
        known = set(weights) | {input_name}
        for node in nodes:
            missing = [i for i in node.inputs if i and i not in known]
            if node.op == "Reshape" and node.inputs[1] not in weights:
                raise OnnxGraphError("Reshape to a computed shape (only constant shapes are supported)")
            if missing:
                raise OnnxGraphError(f"{node.op} node reads {missing} before anything defines them")
            known.add(node.output)
        if output_name not in known:
            raise OnnxGraphError(f"no node produces the graph output {output_name!r}")

    @classmethod
    def from_file(cls, path: Path | str, output: str | None = None) -> OnnxGraphNet:
        """Read ``path`` with the ``onnx`` package (protobuf only; nothing runs) and check every node.

        ``output`` names an inner node output to stop at (e.g. a feature map for a perceptual loss); the
        nodes after it are dropped and never run. Default: the graph's own output."""
        import onnx
        from onnx import numpy_helper

        try:
            model = onnx.load(str(path))
        except Exception as exc:  # a truncated or foreign file: onnx raises protobuf's DecodeError and others
            raise OnnxGraphError(f"{Path(path).name} is not a readable ONNX file ({type(exc).__name__})") from None
        graph = model.graph
        weights = {t.name: torch.from_numpy(np.array(numpy_helper.to_array(t))) for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in weights]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise OnnxGraphError(
                f"the graph must have one input and one output, it has {inputs} and {len(graph.output)}"
            )
        nodes = []
        for n in graph.node:
            if n.op_type not in SUPPORTED_OPS:
                raise OnnxGraphError(f"unsupported ONNX op {n.op_type!r} (this replay runs {', '.join(SUPPORTED_OPS)})")
            if len(n.output) != 1:
                raise OnnxGraphError(f"{n.op_type} node with {len(n.output)} outputs")
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            nodes.append(_Node(n.op_type, tuple(n.input), n.output[0], attrs))
        for node in nodes:
            _check_attrs(node)
        if output is not None:
            ends = [k for k, node in enumerate(nodes) if node.output == output]
            if not ends:
                raise OnnxGraphError(f"{output!r} is not a node output of {Path(path).name}")
            nodes = nodes[: ends[0] + 1]
        weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
        return cls(nodes, weights, inputs[0], output or graph.output[0].name)

    def _get(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name in env:
            return env[name]
        return getattr(self, self._keys[name])  # type: ignore[no-any-return]

    def _run(self, node: _Node, env: dict[str, torch.Tensor]) -> torch.Tensor:
        a = node.attrs
        x = self._get(env, node.inputs[0])
        if node.op == "Conv":
            w = self._get(env, node.inputs[1])
            b = self._get(env, node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
            pads = list(a.get("pads", [0, 0, 0, 0]))
            top, left, bottom, right = pads
            if (top, left) != (bottom, right):
                x = F.pad(x, (left, right, top, bottom))
                top = left = 0
            return F.conv2d(
                x,
                w,
                b,
                stride=tuple(a.get("strides", [1, 1])),
                padding=(top, left),
                dilation=tuple(a.get("dilations", [1, 1])),
                groups=int(a.get("group", 1)),
            )
        if node.op == "PRelu":
            slope = self._get(env, node.inputs[1])
            return torch.where(x >= 0, x, x * slope)
        if node.op == "Relu":
            return torch.relu(x)
        if node.op == "Add":
            return x + self._get(env, node.inputs[1])
        if node.op == "Mul":
            return x * self._get(env, node.inputs[1])
        if node.op == "BatchNormalization":
            scale, bias, mean, var = (self._get(env, i) for i in node.inputs[1:5])
            return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(a.get("epsilon", 1e-5)))
        if node.op == "Reshape":
            shape = self._shapes[node.inputs[1]]
            return x.reshape(x.shape[0], *shape[1:])  # the leading entry is the batch (module docstring)
        if node.op == "Flatten":
            return x.flatten(1)
        # Gemm: alpha * A @ B' + beta * C, A flattened per image
        w = self._get(env, node.inputs[1])
        w = w.t() if int(a.get("transB", 0)) else w
        out = float(a.get("alpha", 1.0)) * (x @ w)
        if len(node.inputs) > 2 and node.inputs[2]:
            out = out + float(a.get("beta", 1.0)) * self._get(env, node.inputs[2])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}
        for node in self.nodes:
            env[node.output] = self._run(node, env)
        return env[self.output_name]


def _check_attrs(node: _Node) -> None:
    """Refuse what the replay would silently get wrong."""
    a = node.attrs
    if node.op == "Conv":
        extra = set(a) - _CONV_ATTRS - {"auto_pad"}
        if extra or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise OnnxGraphError(f"Conv with unsupported attributes {sorted(extra) or ['auto_pad']}")
        if len(a.get("kernel_shape", [1, 1])) != 2:
            raise OnnxGraphError("only 2-D convolutions are supported")
    elif node.op == "BatchNormalization":
        if int(a.get("training_mode", 0)):
            raise OnnxGraphError("BatchNormalization in training mode")
    elif node.op == "Flatten":
        if int(a.get("axis", 1)) != 1:
            raise OnnxGraphError("Flatten on an axis other than 1")
    elif node.op == "Gemm":
        if int(a.get("transA", 0)):
            raise OnnxGraphError("Gemm with transA")
    elif node.op == "Reshape" and int(a.get("allowzero", 0)):
        raise OnnxGraphError("Reshape with allowzero")
