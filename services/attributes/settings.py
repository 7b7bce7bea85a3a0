"""Settings of the attributes service: its three models, its reference faces, data volume and job limits.

It serves up to three registered models, each following its own alias in the same registry
(``FACEXPLAIN_REGISTRY_URI``):

* the FR model (``FACEXPLAIN_FR_MODEL_NAME`` / ``FACEXPLAIN_FR_MODEL_ALIAS``; local face-api weights
  without a registry) that embeds image probes and dataset faces;
* the decoder for exactly that FR version (``FACEXPLAIN_DECODER_MODEL_NAME`` /
  ``FACEXPLAIN_DECODER_MODEL_ALIAS``; registry only): recovery decodes templates with it, so until one
  is loaded the recovery RPCs answer UNAVAILABLE;
* optionally the accessory probe set (``FACEXPLAIN_PROBES_MODEL_NAME`` / ``FACEXPLAIN_PROBES_MODEL_ALIAS``,
  kind ``attribute_probes``, e.g. ``facexplain-probes-faceapi``; empty = none): without it the service
  lists no accessory attributes, everything else works.

The other estimators (geometry, pose, colour, age, gender, expression, texture) are computed from pixels
and landmarks or by face-api's nets loaded from local weights.
"""

from __future__ import annotations

from pydantic import Field

from facexplain.paths import REPO_ROOT
from services.kit.config import DecoderModelSettings, FRModelSettings, ProbesModelSettings, ServiceSettings


class AttributesSettings(ServiceSettings, FRModelSettings, DecoderModelSettings, ProbesModelSettings):
    """``FACEXPLAIN_*`` settings of ``facexplain serve attributes``."""

    # Its own default port: embedding 50051, decoding 50052, directions 50053, attributes 50054.
    port: int = Field(50054, ge=0, le=65535, description="gRPC port; 0 picks a free one")

    reference_dir: str = Field(
        default=str(REPO_ROOT / "data" / "sample"),
        description="folder of reference faces whose recovered attributes' standard deviations standardise "
        "DiffAttributes magnitudes; empty = none (standardized is 0)",
    )
    data_root: str = Field(
        default="",
        description="folder ServerDataset paths are relative to; empty = ServerDataset is PERMISSION_DENIED",
    )
    max_dataset_items: int = Field(default=2000, ge=1, description="most items one Importance dataset may hold")
    batch_size: int = Field(default=16, ge=1, description="faces embedded / decoded / estimated per forward pass")
    max_bootstrap: int = Field(default=1000, ge=0, description="most bootstrap resamples one Importance may ask for")
    max_permutations: int = Field(
        default=1000, ge=1, description="most control shuffles (n_permutations) one Importance may ask for"
    )
    default_experiment: str = Field(
        default="facexplain-importance", description="MLflow experiment of log_run when the request names none"
    )
