"""dlib's own 128-d face descriptor as a template function over chips: a black-box reference model.

It runs dlib's C++ network (``dlib-bin`` + ``face-recognition-models``), not the PyTorch port in
:mod:`facexplain.models.recognition`, so it has no gradients: attacks use it as a transfer *target*,
scored on the same aligned chips rounded to 8 bits, under dlib's L2 < 0.6 rule.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings

import numpy as np
import torch


def dlib_available() -> bool:
    """Whether both optional packages are installed (checked without importing them)."""
    return (
        importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None
    )


class DlibDescriptor:
    """dlib's own 128-d descriptor over (N, 3, 150, 150) chips in [0, 1] (rounded to 8 bits; no gradients)."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Optional heavy dependencies (dlib-bin, face-recognition-models): only a server that names dlib pays.
            import dlib
            import face_recognition_models
        self.version = str(getattr(dlib, "__version__", "local"))
        self.net = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
        self._lock = threading.Lock()  # one dlib net, called from gRPC worker threads

    def __call__(self, chips: torch.Tensor) -> torch.Tensor:
        arr = (chips.detach() * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        imgs = [np.ascontiguousarray(c) for c in arr]
        with self._lock:
            out = self.net.compute_face_descriptor(imgs)
        return torch.tensor(np.array([np.array(d) for d in out]), dtype=torch.float32)
