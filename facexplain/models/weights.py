"""Reader for face-api (tfjs) weight manifests: names, shapes and uint8/float16 quantisation.

The manifests describe one or more groups; each group lists weights in the order their
bytes appear across the group's concatenated ``.bin`` shards. Quantised weights store
``uint8`` codes ``q`` with ``value = q * scale + min`` (tfjs' affine quantisation) or
``float16`` halves; ``int32`` tensors (SSD anchor data) are dequantised the same way
and rounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from facexplain.paths import faceapi_model_dir

_DTYPE_BYTES = {"float32": 4, "int32": 4, "uint8": 1, "uint16": 2, "float16": 2}


class WeightsNotFoundError(FileNotFoundError):
    """Raised when set-up has not installed face-api's weights where we look for them."""


def _decode(buf: bytes, spec: dict) -> tuple[np.ndarray, int]:
    shape = [int(s) for s in spec["shape"]]
    count = int(np.prod(shape)) if shape else 1
    quant = spec.get("quantization")
    if quant is None:
        dtype = spec["dtype"]
        nbytes = count * _DTYPE_BYTES[dtype]
        arr = np.frombuffer(buf[:nbytes], dtype=np.dtype(dtype).newbyteorder("<")).astype(np.float32)
    else:
        qdtype = quant["dtype"]
        nbytes = count * _DTYPE_BYTES[qdtype]
        raw = np.frombuffer(buf[:nbytes], dtype=np.dtype(qdtype).newbyteorder("<"))
        if qdtype == "float16":
            arr = raw.astype(np.float32)
        else:
            arr = raw.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
        if spec["dtype"] == "int32":
            arr = np.round(arr)
    if len(buf) < nbytes:
        raise ValueError(f"weight {spec['name']!r}: shard data ends early ({len(buf)} < {nbytes} bytes)")
    return arr.reshape(shape), nbytes


def load_faceapi_weights(model: str, model_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Load ``<model>-weights_manifest.json`` and its shards into float32 tensors keyed by tfjs name.

    Tensors keep tfjs layouts (conv filters HWIO, dense weights [in, out]); each network's
    loader transposes what it needs.
    """
    root = model_dir or faceapi_model_dir()
    manifest_path = root / f"{model}-weights_manifest.json"
    if not manifest_path.is_file():
        raise WeightsNotFoundError(
            f"{manifest_path} not found: run `make setup` (it unpacks @vladmandic/face-api) "
            "or point FACEXPLAIN_FACEAPI_DIR at a folder holding the face-api model files"
        )
    return read_weight_groups(json.loads(manifest_path.read_text()), root, str(manifest_path))


def read_weight_groups(groups: list[dict], root: Path, label: str) -> dict[str, torch.Tensor]:
    """Decode tfjs weight groups (a ``*-weights_manifest.json``, or a graph model's ``weightsManifest``)
    whose shards lie in ``root``; every shard byte must be accounted for."""
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        for p in group["paths"]:
            if Path(p).name != p:  # shards sit beside the manifest; a path elsewhere is refused
                raise ValueError(f"{label}: shard path {p!r} leaves the model folder")
        data = b"".join((root / p).read_bytes() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            arr, used = _decode(data[offset:], spec)
            offset += used
            out[spec["name"]] = torch.from_numpy(arr.copy())
        if offset != len(data):
            raise ValueError(f"{label}: {len(data) - offset} unread bytes in group {group['paths']}")
    return out
