"""The ONNX replay (facexplain.models.onnx_graph) on small graphs built here with ``onnx.helper``: every op it
supports against the same computation in torch, and what it refuses, by name, instead of running wrongly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from facexplain.models.onnx_graph import OnnxGraphError, OnnxGraphNet
from facexplain.models.program import InputContract, ProgramError, ProgramRecognition

RNG = np.random.default_rng(0)


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


def _save(tmp_path: Path, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], out_shape: list[int]) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _every_op(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    inits = [
        _init("w1", (4, 3, 3, 3)),
        _init("b1", (4,)),
        _init("slope", (4, 1, 1)),
        _init("w2", (4, 1, 3, 3)),  # depthwise
        _init("scale", (4,)),
        _init("shift", (4,)),
        _init("mean", (4,)),
        numpy_helper.from_array(np.abs(RNG.normal(size=4)).astype(np.float32) + 0.5, "var"),
        _init("gain", (1, 4, 1, 1)),
        _init("fc", (5, 4 * 8 * 8)),
        _init("fcb", (5,)),
        numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("PRelu", ["c1", "slope"], ["p1"]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[0, 0, 2, 2], group=4),
        helper.make_node("BatchNormalization", ["c2", "scale", "shift", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Add", ["bn", "p1"], ["a"]),
        helper.make_node("Mul", ["a", "gain"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Reshape", ["g", "shape"], ["output"]),
    ]
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in inits}
    return _save(tmp_path, nodes, inits, [1, 5]), weights


def _reference(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    c1 = F.conv2d(x, w["w1"], w["b1"], stride=2, padding=1)
    p1 = torch.where(c1 >= 0, c1, c1 * w["slope"])
    c2 = F.conv2d(F.pad(p1, (0, 2, 0, 2)), w["w2"], groups=4)
    bn = (c2 - w["mean"].view(1, -1, 1, 1)) / torch.sqrt(w["var"].view(1, -1, 1, 1) + 1e-3)
    bn = bn * w["scale"].view(1, -1, 1, 1) + w["shift"].view(1, -1, 1, 1)
    r = torch.relu((bn + p1) * w["gain"])
    return 0.5 * r.flatten(1) @ w["fc"].t() + 2.0 * w["fcb"]


def test_every_supported_op_matches_torch_on_any_batch(tmp_path: Path) -> None:
    path, weights = _every_op(tmp_path)
    net = OnnxGraphNet.from_file(path)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # exported for 1, run on 3
    with torch.no_grad():
        torch.testing.assert_close(net(x), _reference(x, weights), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_input(tmp_path: Path) -> None:
    net = OnnxGraphNet.from_file(_every_op(tmp_path)[0])
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    net(x).square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert not list(net.parameters())  # weights are buffers: a ported model is never trained


def test_an_onnx_program_is_an_auditors_white_box_model(tmp_path: Path) -> None:
    contract = InputContract(chip_size=16, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
    path, weights = _every_op(tmp_path)
    net = ProgramRecognition.from_file(path, contract, dim=5)
    chips = torch.rand(2, 3, 16, 16) * 255
    with torch.no_grad():
        torch.testing.assert_close(net(chips), _reference((chips - 127) / 128, weights), rtol=1e-5, atol=1e-5)
    assert net.arch == "onnx" and net.source == path
    with pytest.raises(ProgramError, match="5"):
        ProgramRecognition.from_file(path, contract, dim=7)  # the probe checks the declared dimension


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (helper.make_node("Softmax", ["input"], ["output"]), "unsupported ONNX op 'Softmax'"),
        (
            helper.make_node("Conv", ["input", "w"], ["output"], kernel_shape=[1, 1], auto_pad="SAME_UPPER"),
            "auto_pad",
        ),
        (helper.make_node("Flatten", ["input"], ["output"], axis=2), "axis other than 1"),
        (helper.make_node("Reshape", ["input", "computed"], ["output"]), "computed shape"),
    ],
)
def test_what_the_replay_cannot_run_exactly_is_refused(tmp_path: Path, node: onnx.NodeProto, message: str) -> None:
    path = _save(tmp_path, [node], [_init("w", (3, 3, 1, 1))], [1, 3, 16, 16])
    with pytest.raises(OnnxGraphError, match=message):
        OnnxGraphNet.from_file(path)
    with pytest.raises(ProgramError, match=message):  # and as an auditor's program, with the file named
        ProgramRecognition.from_file(path, InputContract(chip_size=16), dim=3)


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00not a protobuf at all" * 10)
    with pytest.raises(OnnxGraphError, match="not a readable ONNX file"):
        OnnxGraphNet.from_file(path)


def test_an_inner_output_stops_the_replay_there(tmp_path: Path) -> None:
    """What a perceptual loss reads: the graph up to one node, the rest never run."""
    path, w = _every_op(tmp_path)
    inner = OnnxGraphNet.from_file(path, output="p1")
    x = torch.randn(2, 3, 16, 16)
    c1 = F.conv2d(x, w["w1"], w["b1"], stride=2, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(inner(x), torch.where(c1 >= 0, c1, c1 * w["slope"]))
    assert [n.op for n in inner.nodes] == ["Conv", "PRelu"]
    with pytest.raises(OnnxGraphError, match="'nope' is not a node output"):
        OnnxGraphNet.from_file(path, output="nope")
