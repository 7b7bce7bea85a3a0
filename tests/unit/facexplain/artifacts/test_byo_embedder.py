"""Bring-your-own FR model: embedder bundles around an auditor's TorchScript program or black-box endpoint.

The program is the default model's own recognition net (dlib's ResNet, face-api weights) traced to
TorchScript, so its templates through a bundle must equal the default pipeline's on real CelebA faces.
The black box is that program behind the reference endpoint (``scripts/blackbox_fr_server.py``), a real
HTTP server in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facexplain.artifacts.bundle import BUNDLE_JSON, BundleError, flat_metadata, load_golden_image, read_metadata
from facexplain.artifacts.embedder import auditor_pipeline, load_bundle, save_embedder_bundle, validate_embedder
from facexplain.metrics.verification import DLIB_L2_RULE
from facexplain.models.program import (
    ENDPOINT_ENV,
    TOKEN_ENV,
    BlackBoxEndpoint,
    EndpointError,
    InputContract,
    NotDifferentiable,
    ProgramError,
    _parse_templates,
    is_differentiable,
    require_gradients,
)
from registry import missing_tags
from tests.byo import blackbox_server, trace_dlib_resnet

NAME = "facexplain-fr-byotest"
DLIB_CHIPS = InputContract(chip_size=150)  # the traced net normalises inside: RGB [0, 255] in
N_FACES = 6
TOKEN = "test-token-3f9"


@pytest.fixture(autouse=True)
def _no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("byo")


@pytest.fixture(scope="module")
def program(work: Path) -> Path:
    return trace_dlib_resnet(work / "dlib.ts")


@pytest.fixture(scope="module")
def ts_bundle(work: Path, program: Path) -> Path:
    pipe = auditor_pipeline(name=NAME, dim=128, contract=DLIB_CHIPS, rule=DLIB_L2_RULE, program=program)
    out = work / "ts-bundle"
    save_embedder_bundle(out, pipe, name=NAME)
    return out


@pytest.fixture(scope="module")
def images(celeba_dir: Path) -> list[torch.Tensor]:
    paths = sorted((celeba_dir / "images").glob("*.jpg"))[:N_FACES]
    assert len(paths) == N_FACES
    return [load_golden_image(p) for p in paths]


@pytest.fixture(scope="module")
def server(program: Path) -> Iterator[str]:
    with blackbox_server(program, "--token", TOKEN, "--chip-size", "150") as url:
        yield url


def _edited(src: Path, dst: Path, edit: object) -> Path:
    """A copy of bundle ``src`` whose bundle.json went through ``edit(meta)`` (files untouched)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / BUNDLE_JSON).read_text())
    edit(meta)  # type: ignore[operator]
    (dst / BUNDLE_JSON).write_text(json.dumps(meta))
    return dst


# -- TorchScript (white box) --------------------------------------------------------------------------------


def test_torchscript_bundle_gives_the_default_pipelines_templates(
    ts_bundle: Path, default_pipeline, images: list[torch.Tensor]
) -> None:  # type: ignore[no-untyped-def]
    loaded = load_bundle(ts_bundle, name=NAME, version="1")
    report = validate_embedder(loaded, ts_bundle)
    assert report.template_dim == 128 and report.cosine_to_expected > 0.9999
    ours, theirs = loaded.analyze(images), default_pipeline.analyze(images)
    pairs = [(a, b) for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None]
    assert len(pairs) >= N_FACES - 1
    worst = max(float((a.template - b.template).abs().max()) for a, b in pairs)
    assert worst <= 1e-5, worst
    assert loaded.info.rule == DLIB_L2_RULE and loaded.info.chip_size == 150 and loaded.info.alignment == "dlib"


def test_torchscript_bundle_metadata_declares_the_contract(ts_bundle: Path) -> None:
    meta = read_metadata(ts_bundle)
    rec = meta["components"]["recognition"]
    assert rec == {"arch": "torchscript", "format": "torchscript", "file": "weights/recognition.ts"}
    assert (ts_bundle / "weights" / "recognition.ts").is_file()
    inp = meta["input"]
    assert inp["chip_size"] == 150 and inp["channels"] == "RGB" and inp["value_range"] == [0.0, 255.0]
    assert meta["verification"]["metric"] == "l2" and meta["verification"]["accept_below"] is True
    tags = flat_metadata(meta)
    assert not missing_tags("embedder", {**tags, "bundle_sha256": "x"})
    assert "TorchScript" in tags["source"]


def test_torchscript_model_is_white_box(ts_bundle: Path, images: list[torch.Tensor]) -> None:
    loaded = load_bundle(ts_bundle)
    assert is_differentiable(loaded.recognition_net)
    require_gradients(loaded.recognition_net, "an attack")  # no error
    face = loaded.analyze(images[:1])[0]
    assert face is not None
    image = images[0].clone().requires_grad_(True)
    loaded.template_from_image(image, face.face.landmarks).norm().backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0


def test_contract_channel_order_value_range_and_normalisation_are_applied(
    work: Path, program: Path, images: list[torch.Tensor], ts_bundle: Path
) -> None:
    """A program that wants BGR in [-1, 1], mean 0.5 / std 2 (and undoes it inside) gives the same templates."""
    dlib = torch.jit.load(str(program))

    class Wants(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = dlib

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rgb = (x * 2.0 + 0.5).flip(1)  # undo (v - 0.5) / 2, then BGR -> RGB
            return self.net((rgb + 1.0) * 127.5)  # [-1, 1] -> [0, 255]

    path = work / "bgr.ts"
    torch.jit.script(Wants()).save(str(path))
    contract = InputContract(chip_size=150, channels="BGR", value_range=(-1.0, 1.0), mean=(0.5,) * 3, std=(2.0,) * 3)
    pipe = auditor_pipeline(name=NAME, dim=128, contract=contract, rule=DLIB_L2_RULE, program=path)
    out = work / "bgr-bundle"
    save_embedder_bundle(out, pipe, name=NAME)
    chips = torch.stack([r.chip for r in load_bundle(ts_bundle).analyze(images[:3]) if r is not None])
    got = load_bundle(out).embed_aligned(list(chips))
    want = load_bundle(ts_bundle).embed_aligned(list(chips))
    assert float((got - want).abs().max()) < 1e-4


def test_bad_programs_are_refused_with_the_reason(work: Path, program: Path) -> None:
    def build(path: Path, dim: int = 128) -> None:
        auditor_pipeline(name=NAME, dim=dim, contract=DLIB_CHIPS, rule=DLIB_L2_RULE, program=path)

    junk = work / "junk.ts"
    junk.write_bytes(b"not a program at all")
    with pytest.raises(BundleError, match="not a TorchScript archive"):
        build(junk)
    state = work / "state.ts"
    torch.save({"w": torch.zeros(3)}, state)
    with pytest.raises(BundleError, match="not a TorchScript archive"):
        build(state)
    with pytest.raises(BundleError, match=r"returned shape \(2, 128\).*\(2, 512\)"):
        build(program, dim=512)

    class Pools(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    pools = work / "pools.ts"
    torch.jit.script(Pools()).save(str(pools))
    with pytest.raises(BundleError, match=r"returned shape \(2, 3\)"):
        build(pools)

    class Prints(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            print(x.sum())
            return x.flatten(1)[:, :128]

    prints = work / "prints.ts"
    torch.jit.script(Prints()).save(str(prints))
    with pytest.raises(BundleError, match=r"refused: prints\.ts calls 'print"):
        build(prints)

    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(-1, 7, 7)

    fails = work / "fails.ts"
    torch.jit.script(Fails()).save(str(fails))
    with pytest.raises(BundleError, match=r"fails.ts fails on a \(2, 3, 150, 150\) chip batch"):
        build(fails)


def test_bad_contracts_are_refused_with_the_field(ts_bundle: Path, work: Path) -> None:
    def no_std(meta: dict) -> None:
        del meta["input"]["std"]

    with pytest.raises(BundleError, match="input contract lacks std"):
        load_bundle(_edited(ts_bundle, work / "no-std", no_std))

    def other_size(meta: dict) -> None:
        meta["alignment"]["chip_size"] = 112

    with pytest.raises(BundleError, match="alignment cuts 112-pixel chips, the input contract says 150"):
        load_bundle(_edited(ts_bundle, work / "other-size", other_size))

    def grey(meta: dict) -> None:
        meta["input"]["channels"] = "GREY"

    with pytest.raises(BundleError, match="channels must be RGB or BGR"):
        load_bundle(_edited(ts_bundle, work / "grey", grey))
    with pytest.raises(ProgramError, match="std positive"):
        InputContract(chip_size=112, std=(0.0, 1.0, 1.0))
    with pytest.raises(ProgramError, match="value_range"):
        InputContract(chip_size=112, value_range=(1.0, -1.0))


def test_changed_program_bytes_are_caught_before_loading(ts_bundle: Path, work: Path) -> None:
    bad = work / "changed"
    shutil.copytree(ts_bundle, bad)
    with (bad / "weights" / "recognition.ts").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"sha256 of weights/recognition\.ts"):
        load_bundle(bad)


def test_five_point_alignment_contract(work: Path, program: Path) -> None:
    """An ArcFace-style contract: 112-pixel five-point chips (the traced dlib net resizes inside)."""

    dlib = torch.jit.load(str(program))

    class At112(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = dlib

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            big = nn.functional.interpolate(x, size=[150, 150], mode="bilinear", align_corners=False)
            return self.net(big)

    path = work / "at112.ts"
    torch.jit.script(At112()).save(str(path))
    contract = InputContract(chip_size=112)
    pipe = auditor_pipeline(
        name=NAME, dim=128, contract=contract, rule=DLIB_L2_RULE, program=path, alignment="arcface_5pt"
    )
    out = work / "five-point"
    meta = save_embedder_bundle(out, pipe, name=NAME)
    assert meta["alignment"]["scheme"] == "arcface_5pt" and len(meta["alignment"]["reference"]) == 5
    assert meta["alignment"]["reference"][0] == pytest.approx([38.2946, 51.6963])  # InsightFace's, at 112
    loaded = load_bundle(out)
    assert loaded.info.alignment == "arcface_5pt" and loaded.info.chip_size == 112
    validate_embedder(loaded, out)


# -- torch.export (white box) ------------------------------------------------------------------------------


def _rewrite_model_json(src: Path, dst: Path, edit: object, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of .pt2 archive ``src`` whose models/model.json went through ``edit(model)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("/models/model.json"):
                model = json.loads(data)
                edit(model)  # type: ignore[operator]
                data = json.dumps(model).encode()
            zout.writestr(name, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def test_torch_export_bundle_gives_the_default_pipelines_templates(
    work: Path, default_pipeline, images: list[torch.Tensor]
) -> None:  # type: ignore[no-untyped-def]
    from tests.byo import export_dlib_resnet

    program = export_dlib_resnet(work / "dlib.pt2")
    pipe = auditor_pipeline(name=NAME, dim=128, contract=DLIB_CHIPS, rule=DLIB_L2_RULE, program=program)
    out = work / "export-bundle"
    meta = save_embedder_bundle(out, pipe, name=NAME)
    assert meta["components"]["recognition"] == {
        "arch": "torch_export",
        "format": "torch_export",
        "file": "weights/recognition.pt2",
    }
    loaded = load_bundle(out)
    validate_embedder(loaded, out)
    assert is_differentiable(loaded.recognition_net)
    ours, theirs = loaded.analyze(images[:3]), default_pipeline.analyze(images[:3])
    worst = max(float((a.template - b.template).abs().max()) for a, b in zip(ours, theirs, strict=True) if a and b)
    assert worst <= 1e-5, worst
    chips = torch.stack([r.chip for r in ours if r is not None]).requires_grad_(True)
    loaded.embed_chips(chips).sum().backward()
    assert chips.grad is not None and float(chips.grad.abs().sum()) > 0

    def guard_code(model: dict) -> None:  # torch exec()s guard code when the module is built
        model["guards_code"] = ["__import__('os').system('true')"]

    with pytest.raises(BundleError, match="carries guard code"):
        build_from(_rewrite_model_json(program, work / "guards.pt2", guard_code))

    def reads_files(model: dict) -> None:
        node = model["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.from_file"

    with pytest.raises(BundleError, match=r"calls 'torch\.from_file'"):
        build_from(_rewrite_model_json(program, work / "from-file.pt2", reads_files))
    with zipfile.ZipFile(program) as zf:
        root = zf.namelist()[0].split("/")[0]
    pickled = {f"{root}/data/constants/custom_obj_0": b"\x80\x04cposix\nsystem\n."}
    with pytest.raises(BundleError, match="only tensors, JSON and sample inputs"):
        build_from(_rewrite_model_json(program, work / "custom.pt2", lambda m: None, pickled))
    with pytest.raises(BundleError, match=r"fails on a \(1, 3, 150, 150\) chip batch .* any batch size"):
        build_from(export_dlib_resnet(work / "static.pt2", dynamic_batch=False))


def build_from(path: Path) -> None:
    auditor_pipeline(name=NAME, dim=128, contract=DLIB_CHIPS, rule=DLIB_L2_RULE, program=path)


# -- black box ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bb_bundle(work: Path, server: str) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setenv(TOKEN_ENV, TOKEN)
    try:
        pipe = auditor_pipeline(name=NAME, dim=128, contract=DLIB_CHIPS, rule=DLIB_L2_RULE, endpoint=server)
        out = work / "bb-bundle"
        save_embedder_bundle(out, pipe, name=NAME)
    finally:
        mp.undo()
    return out


def test_blackbox_bundle_carries_no_weights_and_no_address(bb_bundle: Path, server: str) -> None:
    meta = read_metadata(bb_bundle)
    assert meta["components"]["recognition"] == {
        "arch": "blackbox",
        "format": "blackbox",
        "protocol": "facexplain-blackbox-1",
    }
    assert meta["input"]["layout"] == "NHWC" and meta["input"]["dtype"] == "uint8"
    assert not (bb_bundle / "weights" / "recognition.ts").exists()
    port = server.rsplit(":", 1)[1].strip("/")
    assert port not in (bb_bundle / BUNDLE_JSON).read_text()


def test_blackbox_needs_the_services_endpoint(bb_bundle: Path) -> None:
    with pytest.raises(BundleError, match=f"set {ENDPOINT_ENV}"):
        load_bundle(bb_bundle)


def test_blackbox_templates_are_the_programs_on_8bit_chips(
    bb_bundle: Path, ts_bundle: Path, server: str, images: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, server)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setenv("FACEXPLAIN_BLACKBOX_MAX_BATCH", "2")  # 5 chips: three requests
    bb = load_bundle(bb_bundle)
    validate_embedder(bb, bb_bundle)
    assert not is_differentiable(bb.recognition_net)
    results = bb.analyze(images[:5])
    chips = [r.chip for r in results if r is not None]
    assert len(chips) >= 4
    got = torch.stack([r.template for r in results if r is not None])
    want = load_bundle(ts_bundle).embed_aligned([c.round().clamp(0, 255) for c in chips])
    assert float((got - want).abs().max()) <= 1e-5
    # no gradients: the output never requires them, and gradient methods refuse the model
    x = torch.stack(chips).requires_grad_(True)
    assert not bb.embed_chips(x).requires_grad
    with pytest.raises(NotDifferentiable, match="black-box model"):
        require_gradients(bb.recognition_net, "an attack", "facexplain-fr-byotest v1")


def test_blackbox_endpoint_errors_are_clear(
    bb_bundle: Path, server: str, monkeypatch: pytest.MonkeyPatch, work: Path
) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, server)
    with pytest.raises(BundleError, match="answered HTTP 401: missing or wrong bearer token"):
        load_bundle(bb_bundle)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setenv(ENDPOINT_ENV, f"http://127.0.0.1:{free}/")
    with pytest.raises(BundleError, match="unreachable"):
        load_bundle(bb_bundle)
    monkeypatch.setenv(ENDPOINT_ENV, "file:///etc/passwd")
    with pytest.raises(BundleError, match="http:// or https://"):
        load_bundle(bb_bundle)
    monkeypatch.setenv(ENDPOINT_ENV, server)
    with pytest.raises(BundleError, match=r"returned shape \(2, 128\).*\(2, 64\)"):
        load_bundle(_edited(bb_bundle, work / "bb-dim", lambda m: m.update(template_dim=64)))

    def redirect(meta: dict) -> None:  # a registry writer trying to choose where faces go
        meta["components"]["recognition"]["endpoint"] = "http://elsewhere.example/"

    with pytest.raises(BundleError, match="endpoint comes from the service's configuration only"):
        load_bundle(_edited(bb_bundle, work / "bb-redirect", redirect))


def test_answers_are_checked() -> None:
    body = json.dumps({"templates": [[1.0, 2.0], [3.0, 4.0]]}).encode()
    assert _parse_templates(body, "application/json", 2, "x").shape == (2, 2)
    with pytest.raises(EndpointError, match=r"shape \(1, 2\) for 2 chips"):
        _parse_templates(json.dumps({"templates": [[1.0, 2.0]]}).encode(), "application/json", 2, "x")
    with pytest.raises(EndpointError, match="Content-Type 'text/html'"):
        _parse_templates(b"<html>", "text/html", 2, "x")
    with pytest.raises(EndpointError, match="unreadable body"):
        _parse_templates(b"\x93NUMPY garbage", "application/x-npy", 2, "x")
    with pytest.raises(ProgramError, match="http:// or https://"):
        BlackBoxEndpoint("ftp://x")
    assert BlackBoxEndpoint("http://user:pw@host:1/t?k=v").public_url == "http://host:1/t"
    assert np.isfinite(_parse_templates(body, "application/json", 2, "x")).all()


def test_decoder_training_refuses_a_black_box_for_the_white_box_perceptual(
    bb_bundle: Path, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.decoder.config import TrainDecoderConfig
    from training.decoder.run import perceptual_network

    monkeypatch.setenv(ENDPOINT_ENV, server)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    net = load_bundle(bb_bundle).recognition_net
    with pytest.raises(NotDifferentiable, match=r"perceptual white_box .* is a black-box model"):
        perceptual_network(TrainDecoderConfig(), net, "facexplain-fr-byotest v1")
    assert perceptual_network(TrainDecoderConfig(perceptual="none"), net, "x") is None
