"""Shared fixtures: the real face data beside the checkout and the default face-api weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Real MLflow and gRPC servers shared by tests/integration and tests/e2e (started only when a test asks).
pytest_plugins = ["tests.servers"]


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


@pytest.fixture(scope="session")
def default_pipeline():  # type: ignore[no-untyped-def]
    """The default FR pipeline (face-api detector, dlib landmarks and descriptor, in torch), loaded once."""
    from facexplain.pipeline import FacePipeline

    return FacePipeline.default()


@pytest.fixture(scope="session")
def faceset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("facesets")


@pytest.fixture(scope="session")
def sample_faceset(default_pipeline, faceset_cache: Path):  # type: ignore[no-untyped-def]
    """The bundled sample faces (data/sample) run through the default pipeline once (FR key DEFAULT_FR_KEY)."""
    from facexplain.data.faceset import build_faceset, records_from_spec
    from facexplain.pipeline import DEFAULT_FR_KEY

    root, records, _ = records_from_spec(str(REPO / "data" / "sample"))
    return build_faceset(
        root, records, default_pipeline, fr_key=DEFAULT_FR_KEY, cache_dir=faceset_cache, progress=False
    )


# Label-stratified CelebA sample for the attribute-estimator checks (issue 6): rare labels (Eyeglasses,
# Wearing_Hat, Mustache: 4-6 % of CelebA) need enough positives for a held-out balanced accuracy, so the
# sample takes up to ATTR_PER_LABEL images of each plus ATTR_OTHERS others, picked by a hash of the file
# name (deterministic, no identity preference). Cached under var/cache/facesets so reruns skip the
# detector; a clean clone builds it once (about 2 minutes on 2 cores).
ATTR_RARE_LABELS = ("Eyeglasses", "Wearing_Hat", "Mustache")
ATTR_PER_LABEL = 120
ATTR_OTHERS = 240


@pytest.fixture(scope="session")
def celeba_attr_faceset(default_pipeline, celeba_dir: Path):  # type: ignore[no-untyped-def]
    import hashlib

    from facexplain.data.faceset import build_faceset, records_from_spec
    from facexplain.pipeline import DEFAULT_FR_KEY

    root, records, names = records_from_spec(str(celeba_dir))

    def order(rec):  # type: ignore[no-untyped-def]
        return hashlib.sha256(rec.path.name.encode()).hexdigest()

    chosen: dict[str, object] = {}
    for label in ATTR_RARE_LABELS:
        pos = sorted((r for r in records if r.labels.get(label) == 1), key=order)
        for r in pos[:ATTR_PER_LABEL]:
            chosen[r.path.name] = r
    others = sorted((r for r in records if r.path.name not in chosen), key=order)
    for r in others[:ATTR_OTHERS]:
        chosen[r.path.name] = r
    picked = sorted(chosen.values(), key=lambda r: r.path.name)  # type: ignore[attr-defined]
    return build_faceset(
        root,
        picked,  # type: ignore[arg-type]
        default_pipeline,
        fr_key=DEFAULT_FR_KEY,
        label_names=names,
        cache_dir=REPO / "var" / "cache" / "facesets",
        progress=False,
    )
