"""Shared fixtures: the real face data beside the checkout and the default face-api weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """../shared/data next to the checkout (as CI lays it out) unless FACEXPLAIN_DATA says otherwise."""
    return Path(os.environ.get("FACEXPLAIN_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not (d / "orl_faces").is_dir() or not (d / "celeba_subset").is_dir():
        pytest.fail(f"face data not found at {d}: set FACEXPLAIN_DATA to the shared data folder")
    return d


@pytest.fixture(scope="session")
def orl_dir(data_dir: Path) -> Path:
    return data_dir / "orl_faces"


@pytest.fixture(scope="session")
def celeba_dir(data_dir: Path) -> Path:
    return data_dir / "celeba_subset"
