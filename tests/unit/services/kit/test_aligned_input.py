"""Aligned input (issue 24, item 6): a chip the pipeline aligned, embedded again without detection,
gets the template the photo got, so audits may re-embed chips and keep their figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facexplain.data.faces import load_image
from facexplain.pipeline import FacePipeline, FaceResult, FaceSelection
from services.api.v1 import embedding_pb2
from services.kit.embedder import ALIGNED, analyze_batch, check_aligned, input_mode, served_pipeline
from services.kit.errors import InvalidArgument


@pytest.fixture(scope="module")
def photo_results(default_pipeline: FacePipeline, celeba_dir: Path) -> list[FaceResult]:
    paths = sorted((celeba_dir / "images").glob("*.jpg"))[:3]
    results = default_pipeline.analyze([load_image(p) for p in paths])
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_aligned_batch_equals_the_photo_batch_exactly(
    default_pipeline: FacePipeline, photo_results: list[FaceResult]
) -> None:
    chips = [r.chip for r in photo_results]
    templates = default_pipeline.embed_aligned(chips)
    photo = torch.stack([r.template for r in photo_results])
    assert templates.shape == photo.shape == (3, 128)
    assert torch.equal(templates, photo), float((templates - photo).abs().max())


def test_aligned_single_chip_equals_its_photo_template(
    default_pipeline: FacePipeline, photo_results: list[FaceResult]
) -> None:
    # another batch size than the photo batch: equal up to the FR net's float summation order
    for r in photo_results:
        one = default_pipeline.embed_aligned([r.chip])[0]
        assert float((one - r.template).abs().max()) < 1e-6


def test_aligned_through_the_batch_function(default_pipeline: FacePipeline, photo_results: list[FaceResult]) -> None:
    served = served_pipeline(default_pipeline)
    out = analyze_batch((served, ALIGNED), [r.chip for r in photo_results])
    for got, want in zip(out, photo_results, strict=True):
        assert got is not None
        assert torch.equal(got.template, want.template)
        assert got.face.landmarks.numel() == 0  # no detector ran
    photos = analyze_batch((served, FaceSelection.LARGEST), [r.chip for r in photo_results[:1]])
    assert photos[0] is None or not torch.equal(photos[0].template, photo_results[0].template)


def test_wrong_chip_size_is_rejected(default_pipeline: FacePipeline) -> None:
    with pytest.raises(ValueError, match=r"not \(3, 150, 150\)"):
        default_pipeline.embed_aligned([torch.zeros(3, 64, 64)])
    with pytest.raises(InvalidArgument, match="150x150 chip") as err:
        check_aligned(torch.zeros(3, 64, 80), default_pipeline)
    assert "got a 80x64 image" in err.value.message
    chip = torch.zeros(3, 150, 150)
    assert check_aligned(chip, default_pipeline) is chip


def test_input_mode_values() -> None:
    assert input_mode(embedding_pb2.INPUT_MODE_ALIGNED)
    assert not input_mode(embedding_pb2.INPUT_MODE_PHOTO)
    assert not input_mode(embedding_pb2.INPUT_MODE_UNSPECIFIED)
    with pytest.raises(InvalidArgument, match="unknown input mode 7"):
        input_mode(7)
