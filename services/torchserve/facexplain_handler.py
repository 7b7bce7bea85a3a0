"""The TorchServe handler of every ``.mar`` that ``facexplain export torchserve`` writes.

It is a thin adapter, like the gRPC services: the model is the registered bundle loaded by its kind's own
loader (``facexplain.artifacts``: checksums verified before any weight is parsed, then the golden-input
validation a service runs before it swaps a version in), images are decoded by the services' decoder
(``services.kit.images``, same pixel limit) and templates checked by the services' template rules, and
an embedder runs ``FacePipeline.analyze`` over TorchServe's batch exactly as the embedding service's
batcher does. So a template from TorchServe is the embedding service's template, not a re-implementation's.

The archive holds ``bundle/`` (the version's files as the registry stored them) and ``facexplain-export.json``
(name, version, kind and the bundle digest the exporter verified): a bundle whose digest differs from the
exported one is refused, and with ``FACEXPLAIN_TRUSTED_DIGESTS_FILE`` / ``_KEYS_FILE`` set in TorchServe's
environment the worker applies the services' trust policy too. Settings come from the same ``FACEXPLAIN_*``
variables as the services (``FACEXPLAIN_TORCH_THREADS``, ``FACEXPLAIN_DEVICE``, ``FACEXPLAIN_MAX_IMAGE_PIXELS``).

TorchServe imports this file as a top-level module from the extracted archive and calls ``handle(data,
context)``: first with ``data=None`` to initialise, then with each batch (a list of requests whose ``data``
or ``body`` field holds the payload: an encoded image for an embedder, a JSON ``facexplain.v1.Template`` for
a decoder). Per request it answers JSON (embedder) or PNG bytes (decoder); a request that fails gets a JSON
``{"error", "code"}`` and an HTTP status (400 bad input, 422 no face) while the rest of its batch is served.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EXPORT_JSON = "facexplain-export.json"
BUNDLE_DIR = "bundle"

log = logging.getLogger("facexplain.torchserve")


@dataclass
class LoadedVersion:
    """The version this worker serves, loaded and validated once per worker."""

    kind: str
    name: str
    version: str
    model: Any
    max_image_pixels: int

    def ref(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


def load_exported(model_dir: Path) -> LoadedVersion:
    """Load and validate the archive's bundle as a service would (no registry: the archive is the source)."""
    from facexplain.artifacts import decoder as _decoder  # noqa: F401 - registers the decoder kind
    from facexplain.artifacts import embedder as _embedder  # noqa: F401 - registers the embedder kind
    from facexplain.artifacts.bundle import BundleError, bundle_digest, read_metadata
    from facexplain.artifacts.kind import KINDS
    from services.kit.config import ServiceSettings
    from services.kit.trust import TrustPolicy

    spec = json.loads((model_dir / EXPORT_JSON).read_text())
    bundle = model_dir / BUNDLE_DIR
    meta = read_metadata(bundle)
    digest = bundle_digest(meta)
    if digest != spec["bundle_sha256"]:
        raise BundleError(
            f"bundle digest {digest[:12]}... differs from the exported {str(spec['bundle_sha256'])[:12]}...: "
            "the archive was altered after export"
        )
    if meta["kind"] != spec["kind"]:
        raise BundleError(f"bundle kind {meta['kind']!r} differs from the exported {spec['kind']!r}")
    settings = ServiceSettings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    trust = TrustPolicy(settings.trusted_digests_file, settings.trusted_keys_file)
    trust.load()
    trusted_by = trust.check(digest, str(spec.get("bundle_signature", "")))
    kind = KINDS[str(spec["kind"])]
    # The kind's loader verifies every file's checksum and the layout before parsing a weight.
    model = kind.load(bundle, settings.torch_device(), name=str(spec["name"]), version=str(spec["version"]))
    kind.validate(model, bundle, meta)
    log.info(
        "serving %s v%s (%s, trust: %s) on %s",
        spec["name"],
        spec["version"],
        spec["kind"],
        trusted_by,
        settings.torch_device(),
    )
    return LoadedVersion(str(spec["kind"]), str(spec["name"]), str(spec["version"]), model, settings.max_image_pixels)


def _payload(row: Any) -> Any:
    """A request's payload: gRPC puts it under ``input["data"]``, REST under ``body`` (or ``data``)."""
    if isinstance(row, dict):
        for key in ("data", "body"):
            if row.get(key) is not None:
                return row[key]
    return row


def _error(context: Any, idx: int, status: int, code: str, message: str) -> dict[str, str]:
    context.set_response_status(status, message, idx)
    return {"error": message, "code": code}


def embed_batch(served: LoadedVersion, data: list[Any], context: Any) -> list[Any]:
    """Encoded images -> templates with one ``analyze`` over the decodable ones (the service's batched path)."""
    from facexplain.pipeline import FaceSelection
    from services.kit.errors import ServiceError
    from services.kit.images import decode_encoded

    out: list[Any] = [None] * len(data)
    images: list[torch.Tensor] = []
    order: list[int] = []
    for i, row in enumerate(data):
        raw = _payload(row)
        if not isinstance(raw, bytes | bytearray):
            out[i] = _error(context, i, 400, "INVALID_ARGUMENT", "send the encoded image bytes as the request body")
            continue
        try:
            images.append(decode_encoded(bytes(raw), served.max_image_pixels))
            order.append(i)
        except ServiceError as exc:
            out[i] = _error(context, i, 400, exc.code.name, exc.message)
    results = served.model.analyze(images, FaceSelection.LARGEST) if images else []
    for i, res in zip(order, results, strict=True):
        if res is None:
            out[i] = _error(context, i, 422, "FAILED_PRECONDITION", "no face found")
            continue
        x1, y1, x2, y2 = (float(v) for v in res.face.box)
        out[i] = {
            "template": [float(v) for v in res.template.float().tolist()],
            "dim": int(res.template.numel()),
            "normalized": False,
            "box": [x1, y1, x2, y2],
            "score": float(res.face.score),
            "model": served.ref(),
        }
    return out


def decode_batch(served: LoadedVersion, data: list[Any], context: Any) -> list[Any]:
    """JSON ``facexplain.v1.Template`` payloads -> PNG faces, one batched decoder forward (the service's path)."""
    from google.protobuf import json_format

    from services.api.v1 import common_pb2
    from services.kit.errors import ServiceError
    from services.kit.images import encode_png
    from services.kit.templates import template_from_proto

    dec = served.model
    out: list[Any] = [None] * len(data)
    vecs: list[torch.Tensor] = []
    order: list[int] = []
    for i, row in enumerate(data):
        raw = _payload(row)
        try:
            text = raw if isinstance(raw, str) else json.dumps(raw) if isinstance(raw, dict) else bytes(raw).decode()
            msg = json_format.Parse(text, common_pb2.Template())
        except (TypeError, ValueError, json_format.ParseError) as exc:
            out[i] = _error(context, i, 400, "INVALID_ARGUMENT", f"body is not a JSON facexplain.v1.Template ({exc})")
            continue
        try:
            vecs.append(template_from_proto(msg, dec.template_dim, dec.fr_name, model_version=dec.fr_version))
            order.append(i)
        except ServiceError as exc:
            out[i] = _error(context, i, 400, exc.code.name, exc.message)
    if vecs:
        images = dec.decode(torch.stack(vecs))
        for k, i in enumerate(order):
            out[i] = encode_png(images[k].clamp(0.0, 1.0) * 255.0)
            context.set_response_content_type(i, "image/png")
    return out


_served: LoadedVersion | None = None


def handle(data: list[Any] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point: initialise on the first call (``data is None``), then serve batches."""
    global _served
    if _served is None:
        _served = load_exported(Path(context.system_properties["model_dir"]))
    if data is None:
        return None
    from facexplain.artifacts.embedder import KIND_EMBEDDER

    if _served.kind == KIND_EMBEDDER:
        return embed_batch(_served, data, context)
    return decode_batch(_served, data, context)
