"""Settings of the decoding service: the shared ones plus its second model and its own limit.

The decoding service serves two registered models: the decoder (``FACEXPLAIN_MODEL_NAME`` /
``FACEXPLAIN_MODEL_ALIAS``, as every service names its main model) and the FR model it inverts,
which Reconstruct uses to embed faces (``FACEXPLAIN_FR_MODEL_NAME`` / ``FACEXPLAIN_FR_MODEL_ALIAS``).
Both follow their alias in the same registry (``FACEXPLAIN_REGISTRY_URI``).
"""

from __future__ import annotations

from pydantic import Field

from registry.client import CHAMPION, DEFAULT_DECODER_MODEL, DEFAULT_FR_MODEL
from services.kit.config import ServiceSettings


class DecodingSettings(ServiceSettings):
    """``FACEXPLAIN_*`` settings of ``facexplain serve decoding``."""

    # Its own default port, so the embedding (50051) and decoding services run side by side unconfigured.
    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one")

    model_name: str = Field(
        default=DEFAULT_DECODER_MODEL, description="registered decoder to serve (kind decoder); registry only"
    )
    fr_model_name: str = Field(
        default=DEFAULT_FR_MODEL,
        description="registered FR model (kind embedder) Reconstruct embeds with; local face-api weights without a "
        "registry. The served decoder must invert exactly this model's served version",
    )
    fr_model_alias: str = Field(default=CHAMPION, description="alias of the FR model to serve and follow")
    max_interpolation_steps: int = Field(
        default=64, ge=2, description="most frames one Interpolate request may ask for (steps)"
    )
