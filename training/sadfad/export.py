"""A trained SAD/FAD net as a servable embedder bundle, and its registration.

The bundle keeps face-api's detector and 68-point landmarks (byte for byte, as the default
embedder has them: the net was trained on chips aligned by exactly those) and stores the SAD/FAD
recognition net as a state dict with the config that rebuilds it
(``facexplain.artifacts.bundle._build_recognition``). Services then load it by alias like any other
FR model, so decoders, directions, attributes and counterfactuals work on it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from facexplain.artifacts.embedder import save_embedder_bundle
from facexplain.metrics.verification import VerificationRule
from facexplain.models.sadfad import SADFADEmbedder
from facexplain.pipeline import FacePipeline
from training.sadfad.model_file import load_trained_model


def sadfad_pipeline(model_file: Path) -> tuple[FacePipeline, dict[str, Any]]:
    """The default detector + landmarks with the trained net as the recognition stage."""
    net, data = load_trained_model(model_file)
    ver = data["verification"]
    threshold = float(ver["threshold"])
    if not math.isfinite(threshold):
        raise ValueError(
            f"{model_file}: no calibrated verification threshold (the run had no validation identities); "
            "train with --val-fraction > 0 to serve it"
        )
    rule = VerificationRule(
        metric=ver["metric"], threshold=threshold, accept_below=bool(ver["accept_below"]), source=str(ver["source"])
    )
    base = FacePipeline.default()
    recognition = SADFADEmbedder(net).eval().requires_grad_(False)
    info = replace(base.info, name=f"sadfad-{data['variant']}", dim=net.config.n_filters, rule=rule)
    return base.with_recognition(recognition, info), data


def export_bundle(model_file: Path, out_dir: Path, *, name: str) -> dict[str, Any]:
    """Write the bundle for ``model_file`` (``OUT/model.pt`` of a run) to ``out_dir``; returns its metadata."""
    pipeline, data = sadfad_pipeline(model_file)
    return save_embedder_bundle(
        out_dir,
        pipeline,
        name=name,
        weights="faceapi",
        description=(
            f"face-api SSD detector + 68 landmarks + SAD/FAD interpretable net ({data['variant']}, "
            f"{pipeline.info.dim}-d, Yin et al.)"
        ),
        extra={
            "training": {
                "variant": data["variant"],
                "seed": data["seed"],
                "mlflow_run_id": data.get("mlflow_run_id", ""),
                "metrics": {k: round(float(v), 5) for k, v in data.get("metrics", {}).items()},
            }
        },
    )
