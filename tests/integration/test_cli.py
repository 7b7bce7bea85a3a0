"""``facexplain embed`` against the running service: the .npz it writes is complete and honest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.launcher import REPO, RunningService

pytestmark = pytest.mark.integration


def test_embed_dir_writes_npz(embedding_service: RunningService, orl_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "faces"
    (src / "person_a").mkdir(parents=True)
    for k in (1, 2):
        shutil.copy(orl_dir / "s3" / f"{k}.pgm", src / "person_a" / f"{k}.pgm")
    Image.new("RGB", (120, 90), (128, 128, 128)).save(src / "blank.png")
    (src / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "t.npz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "embed",
            str(src),
            "--target",
            embedding_service.address,
            "--out",
            str(out),
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = np.load(out)
    assert sorted(data["paths"].tolist()) == ["person_a/1.pgm", "person_a/2.pgm"]
    assert data["templates"].shape == (2, 128) and data["templates"].dtype == np.float32
    assert not bool(data["normalized"])
    assert str(data["model"]) == "dlib-resnet128" and str(data["version"]) == "local"
    assert data["failed"].shape == (1, 2) and data["failed"][0, 0] == "blank.png"
    assert "FAILED_PRECONDITION" in data["failed"][0, 1]
    assert "2 templates" in proc.stdout


def test_embed_reports_unreachable_service(tmp_path: Path, orl_dir: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "embed",
            str(orl_dir / "s1"),
            "--target",
            "127.0.0.1:1",
            "--out",
            str(tmp_path / "x.npz"),
            "--connect-timeout",
            "2",
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3 and "not reachable" in proc.stderr
