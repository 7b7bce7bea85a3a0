"""An auditor's side for the bring-your-own-model tests: a real network as a TorchScript file, and the
reference black-box endpoint (``scripts/blackbox_fr_server.py``) serving it from a subprocess."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "scripts" / "blackbox_fr_server.py"


def trace_dlib_resnet(path: Path) -> Path:
    """The default model's recognition net (dlib's ResNet, face-api weights) traced to ``path``: 150x150
    dlib chips, RGB in [0, 255] (its own normalisation inside), 128-d templates."""
    import warnings

    from facexplain.models.recognition import FaceRecognitionNet

    net = FaceRecognitionNet.from_faceapi()
    example = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(0)) * 255.0
    with warnings.catch_warnings():  # shape checks become constants: the chip size is fixed
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
    traced.save(str(path))
    return path


def export_dlib_resnet(path: Path, *, dynamic_batch: bool = True) -> Path:
    """The same network as :func:`trace_dlib_resnet`, saved with ``torch.export.save`` (``.pt2``); with
    ``dynamic_batch=False`` it only takes batches of two, as a careless export would."""
    from facexplain.models.recognition import FaceRecognitionNet

    net = FaceRecognitionNet.from_faceapi()
    example = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(0)) * 255.0
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=shapes), str(path))
    return path


@contextmanager
def blackbox_server(program: Path, *args: str, timeout: float = 60.0) -> Iterator[str]:
    """The reference endpoint serving ``program`` on a free loopback port; yields its URL, stops it after."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--program", str(program), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the readiness line or exit
        if not line.startswith("listening on ") or time.monotonic() > deadline:
            err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
            raise RuntimeError(f"black-box server did not start: {line!r} {err[-2000:]}")
        yield line.split("listening on ", 1)[1].strip()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
