"""Settings of the decoding service: the shared ones plus its second model and its own limit.

The decoding service serves two registered models: the decoder (``FACEXPLAIN_MODEL_NAME`` /
``FACEXPLAIN_MODEL_ALIAS``, as every service names its main model) and the FR model it inverts,
which Reconstruct uses to embed faces (``FACEXPLAIN_FR_MODEL_NAME`` / ``FACEXPLAIN_FR_MODEL_ALIAS``).
Both follow their alias in the same registry (``FACEXPLAIN_REGISTRY_URI``).
"""

from __future__ import annotations

from pydantic import Field

from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from services.kit.config import FRModelSettings, ServiceSettings


class DecodingSettings(ServiceSettings, FRModelSettings):
    """``FACEXPLAIN_*`` settings of ``facexplain serve decoding``."""

    # Its own default port, so the embedding (50051) and decoding services run side by side unconfigured.
    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one")

    model_name: str = Field(
        default=DEFAULT_DECODER_MODEL, description="registered decoder to serve (kind decoder); registry only"
    )
    max_interpolation_steps: int = Field(
        default=64, ge=2, description="most frames one Interpolate request may ask for (steps)"
    )
