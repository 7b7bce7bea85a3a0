"""Face geometry: detection post-processing, landmarks, alignment to recognition chips."""
