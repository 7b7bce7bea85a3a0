"""The embedding service: image -> detected, aligned face -> template; verification and landmarks."""
