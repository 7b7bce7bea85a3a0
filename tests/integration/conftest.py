"""Integration fixtures: one real server per service for the whole session, shared by all tests.

Also the helpers that put real model versions into a real MLflow registry: the default FR model
(``register_fr_model``) and a decoder bundle for a given FR version (``make_decoder_bundle``, cached
per session by the ``decoder_bundle`` fixture because building one may mean training it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.client.launcher import RunningService, start_service
from services.kit.registry import CHAMPION, DEFAULT_DECODER_MODEL, DEFAULT_FR_MODEL, Registry, VersionInfo


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def embedding_service(server_logs: Path) -> Iterator[RunningService]:
    svc = start_service("embedding", server_logs, env={"FACEXPLAIN_MAX_BATCH_SIZE": "32"})
    yield svc
    code = svc.stop()
    assert code == 0, f"embedding service did not shut down cleanly on SIGTERM (exit {code})"


@pytest.fixture(scope="session")
def embedding_client(embedding_service: RunningService):  # type: ignore[no-untyped-def]
    from services.client.sdk import EmbeddingClient, wait_ready

    client = EmbeddingClient(embedding_service.address, timeout=120)
    wait_ready(client.channel, 30)
    yield client
    client.close()


# -- registry content: the FR model and decoders for it ------------------------------------------------


def register_fr_model(registry: Registry, work: Path, alias: str = CHAMPION) -> VersionInfo:
    """The default FR model (face-api weights) as the next version of ``facexplain-fr-dlib128``, at ``alias``.

    What ``facexplain registry register-defaults`` does, in-process (test_registry.py runs the CLI itself).
    """
    from facexplain.models.bundle import save_embedder_bundle

    bundle = work / "fr-bundle"
    if not (bundle / "bundle.json").is_file():
        save_embedder_bundle(bundle, name=DEFAULT_FR_MODEL)
    return registry.register_bundle(bundle, DEFAULT_FR_MODEL, description="default FR model (tests)", alias=alias)


def make_decoder_bundle(out_dir: Path, fr_name: str, fr_version: str, fr_digest: str) -> Path:
    """A decoder bundle for FR model ``fr_name`` version ``fr_version`` (bundle digest ``fr_digest``) in ``out_dir``.

    The golden template is the default FR pipeline's template of ``data/golden/face.png``, which is
    what the registered default FR model computes (same weights), so services validate the bundle.
    """
    # TODO(training): replace with a decoder trained by training.decoder on data/sample
    import torch

    from facexplain.models.bundle import GOLDEN_IMAGE, load_golden_image
    from facexplain.models.decoder import DecoderConfig, DeepFaceDecoder
    from facexplain.models.decoder_bundle import save_decoder_bundle
    from facexplain.pipeline import FacePipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the servers of the session need the cores more than this one forward pass
    try:
        torch.manual_seed(0)
        decoder = DeepFaceDecoder(DecoderConfig(out_size=64, base_channels=16, max_channels=256)).eval()
        pipeline = FacePipeline.default("cpu")
        golden = pipeline.analyze([load_golden_image(GOLDEN_IMAGE)])[0]
        assert golden is not None, "no face in the golden image"
        save_decoder_bundle(
            out_dir,
            decoder,
            name=DEFAULT_DECODER_MODEL,
            fr_model={"name": fr_name, "version": fr_version, "bundle_sha256": fr_digest},
            golden_template=golden.template,
            chip_padding=pipeline.info.chip_padding,
            fr_chip_size=pipeline.info.chip_size,
            description=f"untrained, seeded decoder for {fr_name} v{fr_version} (tests)",
        )
    finally:
        torch.set_num_threads(threads)
    return out_dir


def retarget_decoder_bundle(src: Path, dst: Path, fr_version: str) -> Path:
    """A copy of decoder bundle ``src`` that claims to invert FR version ``fr_version`` (same weights).

    How tests get "a decoder trained for another FR version" without training a second one.
    """
    from facexplain.models.bundle import write_metadata

    shutil.copytree(src, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["fr_model"] = {**meta["fr_model"], "version": fr_version}
    write_metadata(dst, meta)
    return dst


@pytest.fixture(scope="session")
def decoder_bundle(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str, str], Path]:
    """``(fr_name, fr_version, fr_digest) -> bundle dir``; one :func:`make_decoder_bundle` per FR version."""
    made: dict[tuple[str, str, str], Path] = {}

    def get(fr_name: str, fr_version: str, fr_digest: str) -> Path:
        key = (fr_name, fr_version, fr_digest)
        if key not in made:
            made[key] = make_decoder_bundle(tmp_path_factory.mktemp("decoder-bundle"), *key)
        return made[key]

    return get
