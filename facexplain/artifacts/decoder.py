"""Decoder bundles: a trained Deep Face Decoder as a self-contained registered version.

Same directory form as embedder bundles (``facexplain.artifacts.bundle``): ``bundle.json`` with
metadata and a sha256 per file, ``weights/decoder.pt`` (a torch state dict), the architecture as a
``DecoderConfig`` dict, and a golden check. What a decoder bundle adds:

* ``fr_model``: name, version and bundle sha256 of the FR model whose templates it inverts. A
  decoder is meaningless for any other model (templates of two models are not comparable, even
  of two versions of one model), so services refuse a mismatch instead of decoding noise.
* ``alignment``: the FR model's chip geometry; the decoder renders that chip at ``out_size``.
* ``golden``: the FR template of the golden face and the image the decoder produced for it when
  the bundle was written (``golden/decoded.png``). Validation decodes the template again and
  compares: wrong shapes, NaNs, a fixed batch size and silently different weights all fail.
* ``training``: how the version was made (run id, data manifest hash, split seed, quality figures),
  informational only.

torch, numpy, PIL and the network are imported inside the functions: the registry reads :data:`KIND`
for its conventions, and ``facexplain registry list`` should not pay for torch.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import facexplain
from facexplain.artifacts.bundle import (
    BUNDLE_FORMAT,
    GOLDEN_IMAGE,
    BundleError,
    load_tensor_file,
    open_bundle,
    write_metadata,
)
from facexplain.artifacts.kind import ArtifactKind, register

if TYPE_CHECKING:
    import torch

    from facexplain.models.decoder import DeepFaceDecoder

KIND_DECODER = "decoder"
DEFAULT_DECODER_MODEL = "facexplain-dfd-dlib128"

DECODER_WEIGHTS = "weights/decoder.pt"
GOLDEN_DECODED = "golden/decoded.png"
# A re-decoded golden image may differ from the recorded PNG by rounding and float noise across
# machines (cpu vs cuda kernels), never by more than this (in [0, 1] units).
GOLDEN_MAX_ABS = 4.0 / 255.0
GOLDEN_MEAN_ABS = 1.0 / 255.0


@dataclass(frozen=True)
class LoadedDecoder:
    """A decoder ready to serve, with what a service must check before using it."""

    decoder: DeepFaceDecoder
    fr_name: str
    fr_version: str
    out_size: int
    template_dim: int
    chip_padding: float
    meta: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def decode(self, templates: torch.Tensor) -> torch.Tensor:
        """(B, d) raw or normalised templates -> (B, 3, S, S) images in [0, 1] (CPU)."""
        import torch

        with torch.no_grad():
            return self.decoder(templates.to(self.device, torch.float32)).cpu()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class DecoderGoldenReport:
    max_abs_diff: float
    mean_abs_diff: float
    batch_max_abs_diff: float
    seconds: float


def _png(image: torch.Tensor, path: Path) -> None:
    import torch
    from PIL import Image

    arr = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path, optimize=False)


def _read_png01(path: Path) -> torch.Tensor:
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def save_decoder_bundle(
    out_dir: Path | str,
    decoder: DeepFaceDecoder,
    *,
    name: str,
    fr_model: dict[str, str],
    golden_template: torch.Tensor,
    chip_padding: float,
    fr_chip_size: int = 150,
    golden_image: Path = GOLDEN_IMAGE,
    description: str = "",
    training: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a decoder bundle and return its metadata.

    ``fr_model`` is ``{"name": ..., "version": ..., "bundle_sha256": ...}`` of the FR model inverted;
    ``golden_template`` is that model's raw template of ``golden_image`` (the decoded result is
    recorded for validation). ``extra`` is merged last (tests write broken bundles with it).
    """
    import torch

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty")
    if not fr_model.get("name") or not str(fr_model.get("version", "")):
        raise BundleError("fr_model must name the FR model and version the decoder inverts")
    cfg = decoder.config
    (out / "weights").mkdir(parents=True, exist_ok=True)
    (out / "golden").mkdir(exist_ok=True)
    state = {k: v.detach().cpu() for k, v in decoder.state_dict().items()}
    torch.save(state, out / DECODER_WEIGHTS)
    shutil.copy2(golden_image, out / "golden" / "face.png")
    template = golden_template.detach().float().cpu().flatten()
    if template.numel() != cfg.template_dim:
        raise BundleError(f"golden template has {template.numel()} values, the decoder takes {cfg.template_dim}")
    meta: dict[str, Any] = {
        "format_version": BUNDLE_FORMAT,
        "kind": KIND_DECODER,
        "name": name,
        "architecture": "dfd",
        "description": description or f"Deep Face Decoder for {fr_model['name']} v{fr_model['version']}",
        "template_dim": cfg.template_dim,
        "input": {
            # What the decoder renders: the FR model's aligned chip, at out_size.
            "chip_size": cfg.out_size,
            "normalisation": "template L2-normalised, times sqrt(dim), inside the decoder; raw or unit templates",
            "output_range": [0, 1],
            "layout": "NCHW",
            "channels": "RGB",
        },
        "alignment": {"chip_size": fr_chip_size, "padding": chip_padding, "rendered_size": cfg.out_size},
        "fr_model": {k: str(v) for k, v in fr_model.items()},
        "decoder": cfg.to_dict(),
        "components": {"decoder": {"arch": "dfd", "format": "torch", "file": DECODER_WEIGHTS}},
        "golden": {
            "image": "golden/face.png",
            "template": [float(v) for v in template.tolist()],
            "decoded": GOLDEN_DECODED,
        },
        "training": training or {},
        "source": "trained by facexplain (training/decoder)",
        "created_by": f"facexplain {facexplain.__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta.update(extra or {})
    was_training = decoder.training
    decoder.eval()
    with torch.no_grad():
        decoded = decoder(template[None].to(next(decoder.parameters()).device)).cpu()
    decoder.train(was_training)
    _png(decoded[0], out / GOLDEN_DECODED)
    write_metadata(out, meta)
    return meta


def load_decoder_bundle(
    bundle_dir: Path | str, device: str | torch.device = "cpu", *, verify: bool = True
) -> LoadedDecoder:
    """Rebuild the decoder from its metadata and weights; checksums first unless ``verify=False``."""

    from facexplain.models.decoder import DecoderConfig, DeepFaceDecoder

    root, meta = open_bundle(bundle_dir, KIND_DECODER, verify=verify)
    try:
        cfg = DecoderConfig.from_dict(dict(meta["decoder"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"decoder architecture in {root.name}/bundle.json is unusable: {exc}") from None
    if cfg.template_dim != int(meta["template_dim"]):
        raise BundleError(f"template_dim is {meta['template_dim']} but the decoder config says {cfg.template_dim}")
    net = DeepFaceDecoder(cfg)
    spec = meta["components"].get("decoder") or {}
    path = root / str(spec.get("file", DECODER_WEIGHTS))
    state = load_tensor_file(path, "decoder")  # refuses any pickle that is not plain tensors, by name
    try:
        net.load_state_dict(state, strict=True)
    except Exception as exc:
        raise BundleError(f"component 'decoder': cannot load {path.name} ({type(exc).__name__}: {exc})") from None
    net.requires_grad_(False)
    net = net.to(device).eval()
    fr = meta["fr_model"]
    return LoadedDecoder(
        decoder=net,
        fr_name=str(fr["name"]),
        fr_version=str(fr["version"]),
        out_size=cfg.out_size,
        template_dim=cfg.template_dim,
        chip_padding=float((meta.get("alignment") or {}).get("padding", 0.25)),
        meta=meta,
    )


def validate_decoder(loaded: LoadedDecoder, bundle_dir: Path | str) -> DecoderGoldenReport:
    """Decode the golden template and compare with the image recorded at registration.

    Checks: output shape (1 and 2 templates), finite values in [0, 1], a batch of two equal
    templates gives two equal images, and the image matches ``golden/decoded.png``.
    """
    import torch

    root = Path(bundle_dir)
    t0 = time.perf_counter()
    golden = loaded.meta.get("golden") or {}
    values = golden.get("template")
    if not isinstance(values, list) or len(values) != loaded.template_dim:
        raise BundleError(f"validation: golden template missing or not of dimension {loaded.template_dim}")
    template = torch.tensor(values, dtype=torch.float32)
    if not bool(torch.isfinite(template).all()) or float(template.abs().max()) == 0.0:
        raise BundleError("validation: golden template is not finite or is zero")
    pair = loaded.decode(torch.stack([template, template]))
    want = (2, 3, loaded.out_size, loaded.out_size)
    if tuple(pair.shape) != want:
        raise BundleError(f"validation: decoding 2 templates gave shape {tuple(pair.shape)}, expected {want}")
    if not bool(torch.isfinite(pair).all()):
        raise BundleError("validation: the decoder produced NaN/inf on the golden template")
    if float(pair.min()) < 0.0 or float(pair.max()) > 1.0:
        raise BundleError("validation: decoder output outside [0, 1]")
    batch_diff = float((pair[0] - pair[1]).abs().max())
    if not math.isfinite(batch_diff) or batch_diff > 1e-4:
        raise BundleError(f"validation: a batch of two equal templates decoded differently ({batch_diff:.3g})")
    ref_path = root / str(golden.get("decoded", GOLDEN_DECODED))
    if not ref_path.is_file():
        raise BundleError(f"validation: recorded golden image {ref_path.name} missing from the bundle")
    ref = _read_png01(ref_path)
    if tuple(ref.shape) != want[1:]:
        raise BundleError(f"validation: recorded golden image is {tuple(ref.shape)}, the decoder renders {want[1:]}")
    diff = (pair[0] - ref).abs()
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    if max_abs > GOLDEN_MAX_ABS or mean_abs > GOLDEN_MEAN_ABS:
        raise BundleError(
            f"validation: golden decode differs from the one recorded at registration (max {max_abs * 255:.1f}/255, "
            f"mean {mean_abs * 255:.2f}/255); weights changed or the artifact is damaged"
        )
    return DecoderGoldenReport(max_abs, mean_abs, batch_diff, time.perf_counter() - t0)


# -- the kind ------------------------------------------------------------------------------------------


def _load(path: Path, device: str, *, name: str | None = None, version: str | None = None) -> LoadedDecoder:
    return load_decoder_bundle(path, device)


def _validate(model: LoadedDecoder, path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """Re-decode the golden template; the figures go to ModelStatus metadata."""
    report = validate_decoder(model, path)
    return {
        "golden_max_abs_diff": f"{report.max_abs_diff:.6f}",
        "golden_mean_abs_diff": f"{report.mean_abs_diff:.6f}",
        "out_size": str(model.out_size),
    }


# The held-out figures a decoder's training records (unseen identities; ``training.metrics``), repeated as
# registry tags and in ModelStatus under the same names the training pipeline tags its versions with.
HELDOUT_METRICS = ("test_psnr", "test_ssim", "test_identity_cosine", "test_accepted", "test_rank1")


def _describe(meta: dict[str, Any]) -> dict[str, str]:
    """The held-out metrics and the gates' outcome from the bundle's ``training`` block (when recorded)."""
    training = meta.get("training") or {}
    if not isinstance(training, dict):
        return {}
    metrics = training.get("metrics") or {}
    out = {}
    for key in HELDOUT_METRICS:
        value = metrics.get(key) if isinstance(metrics, dict) else None
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = f"{value:.4f}"
    if isinstance(training.get("gates_passed"), bool):
        out["gates_passed"] = str(training["gates_passed"]).lower()
    return out


KIND = register(
    ArtifactKind(
        name=KIND_DECODER,
        # A decoder is meaningless without the FR model it inverts.
        required_metadata=("name", "template_dim", "input", "fr_model", "components"),
        required_tags=("template_dim", "input_size", "fr_model_name", "fr_model_version"),
        default_model=DEFAULT_DECODER_MODEL,
        save=save_decoder_bundle,
        load=_load,
        validate=_validate,
        describe=_describe,
    )
)
