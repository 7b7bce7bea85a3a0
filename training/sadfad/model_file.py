"""``OUT/model.pt`` of a SAD/FAD run: what the training writes and the bundle export reads.

Its own module so that the run (which writes it and then exports) and the export (which reads it)
both depend on it rather than on each other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

import facexplain
from facexplain.faces.occlusion import FaceMesh
from facexplain.models.sadfad import ARCHITECTURE, SADFADConfig, SADFADNet

MODEL_FILE = "model.pt"
MODEL_FORMAT = 1


def save_trained_model(
    path: Path,
    model: SADFADNet,
    mesh: FaceMesh,
    *,
    variant: str,
    seed: int,
    run_id: str,
    threshold: float,
    metrics: dict[str, float],
) -> None:
    """Write what a bundle needs to serve the net: config, embedder weights, template, threshold."""
    torch.save(
        {
            "format": MODEL_FORMAT,
            "architecture": ARCHITECTURE,
            "config": model.config.replace(n_classes=0).to_dict(),
            "state": model.embedder_state_dict(),
            "template": mesh.points[: len(mesh.landmark_index)].clone(),
            "verification": {
                "metric": "cosine",
                "threshold": threshold,
                "accept_below": False,
                "source": "validation identities: cosine threshold at FAR 1%",
            },
            "variant": variant,
            "seed": seed,
            "mlflow_run_id": run_id,
            "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
            "facexplain_version": facexplain.__version__,
        },
        path,
    )


def load_trained_model(path: Path, device: str | torch.device = "cpu") -> tuple[SADFADNet, dict[str, Any]]:
    """The net saved by ``save_trained_model`` (eval mode, no head) and the file's other entries."""
    # weights_only: our checkpoints hold tensors and plain containers only, so a file swapped
    # into the run folder cannot run code on --resume (issue 23)
    data = torch.load(path, map_location=device, weights_only=True)
    if data.get("format") != MODEL_FORMAT or data.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{path}: not a SAD/FAD model file of format {MODEL_FORMAT}")
    net = SADFADNet(SADFADConfig.from_dict(data["config"]))
    net.load_state_dict(data["state"], strict=True)
    return net.to(device).eval(), data
