"""Training losses: the Deep Face Decoder's pixel, gradient-domain and perceptual terms, and the region-pair term."""

from facexplain.faces.regions import face_region_mask, landmarks_to_chip
from facexplain.losses.dfd import (
    DFDLossWeights,
    PerceptualFeatures,
    dfd_loss,
    gradient_loss,
    pair_difference_loss,
    pixel_loss,
)

__all__ = [
    "DFDLossWeights",
    "PerceptualFeatures",
    "dfd_loss",
    "face_region_mask",
    "gradient_loss",
    "landmarks_to_chip",
    "pair_difference_loss",
    "pixel_loss",
]
