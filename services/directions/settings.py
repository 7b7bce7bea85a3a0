"""Settings of the directions service: its two models, its data volume and the limits of its jobs.

Like the decoding service it serves two registered models, each following its own alias: the FR model
(``FACEXPLAIN_FR_MODEL_NAME`` / ``FACEXPLAIN_FR_MODEL_ALIAS``; local face-api weights without a
registry), whose template space every direction lives in, and optionally a decoder for that FR model
(``FACEXPLAIN_DECODER_MODEL_NAME`` / ``FACEXPLAIN_DECODER_MODEL_ALIAS``; registry only, empty name = no
decoder) that turns traversals into pictures. Discovery walks datasets and N(N-1) blends, so every
dimension of a job has a limit here: a request over one is RESOURCE_EXHAUSTED, never a stuck server.
"""

from __future__ import annotations

from pydantic import Field

from services.kit.config import DecoderModelSettings, FRModelSettings, ServiceSettings


class DirectionsSettings(ServiceSettings, FRModelSettings, DecoderModelSettings):
    """``FACEXPLAIN_*`` settings of ``facexplain serve directions``."""

    # Its own default port, so embedding (50051), decoding (50052) and directions run side by side unconfigured.
    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free one")

    data_root: str = Field(
        default="",
        description="folder ServerDataset paths are relative to; empty = ServerDataset is PERMISSION_DENIED",
    )
    max_dataset_items: int = Field(default=2000, ge=1, description="most items one dataset may hold (after max_items)")
    batch_size: int = Field(
        default=16, ge=1, description="faces embedded per forward pass when a request leaves batch_size at 0"
    )
    default_ssi_pairs: int = Field(
        default=30000, ge=1, description="donor pairs blended per region when DiscoverSSI leaves max_pairs at 0"
    )
    max_ssi_pairs: int = Field(default=200000, ge=1, description="most donor pairs one DiscoverSSI region may ask for")
    max_regions: int = Field(default=8, ge=1, description="most regions in one DiscoverSSI request")
    max_transforms: int = Field(default=16, ge=1, description="most transforms in one FitEquivariance request")
    max_alphas: int = Field(default=64, ge=1, description="most steps in one Traverse request")
    min_label_items: int = Field(
        default=5,
        ge=1,
        description="fewest items a centroid group or a regression may use: a direction from fewer mostly encodes "
        "who those faces are",
    )
    max_stored_sets: int = Field(
        default=256, ge=1, description="sets kept in memory; beyond it the oldest is dropped (registered ones reload)"
    )
    max_registered_listed: int = Field(
        default=100, ge=1, description="most registered versions ListDirectionSets(include_registered) returns"
    )
