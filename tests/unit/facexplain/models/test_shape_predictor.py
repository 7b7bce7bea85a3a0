"""dlib's 68-point shape predictor run in torch, against dlib itself on real faces (issue 2).

Two figures, both as mean point error over the 68 points divided by the outer-eye-corner distance
(points 36 and 45), per data set, on the reference faces of ``faces_ref``:

* the model: the torch predictor and dlib's, both given dlib's HOG box (the 3 % target, met by a
  wide margin: most faces agree to the pixel, the rest by a point or two whose tree splits sit on
  a float rounding edge);
* the pipeline: ``FacePipeline.default()`` with its own detector against dlib's detector + predictor,
  which is what the templates are made from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from facexplain.models.dlib_format import DlibFormatError, ShapePredictorArrays, read_shape_predictor
from facexplain.models.shape_predictor import (
    ShapePredictor68,
    dlib_box_from_points,
    dlib_predictor_path,
    refine_landmarks,
    shape_landmarks,
    similarity_matrix,
)
from tests.unit.faces_ref import RefFace, dlib_chip_descriptor, faces_for, to_tensor

TARGET = 0.03
DATASETS = ("orl", "celeba")


def _error(points: np.ndarray, faces: tuple[RefFace, ...]) -> np.ndarray:
    ref = np.stack([f.landmarks for f in faces])
    iod = np.linalg.norm(ref[:, 36] - ref[:, 45], axis=1)
    return np.linalg.norm(points - ref, axis=2).mean(axis=1) / iod


@pytest.fixture(scope="module")
def predictor() -> ShapePredictor68:
    return ShapePredictor68.from_dlib()


@pytest.fixture(scope="module")
def on_dlib_boxes(predictor: ShapePredictor68, data_dir: Path) -> dict[str, np.ndarray]:
    """Torch predictor's points on dlib's own boxes, rounded to integers as dlib's are."""
    out = {}
    for dataset in DATASETS:
        faces = faces_for(dataset, data_dir)
        boxes = torch.tensor([f.box for f in faces])
        points = shape_landmarks(predictor, [to_tensor(f.image) for f in faces], torch.arange(len(faces)), boxes)
        out[dataset] = np.floor(points.numpy() + 0.5)
    return out


@pytest.mark.parametrize("dataset", DATASETS)
def test_torch_predictor_reproduces_dlib(on_dlib_boxes: dict[str, np.ndarray], data_dir: Path, dataset: str) -> None:
    faces = faces_for(dataset, data_dir)
    err = _error(on_dlib_boxes[dataset], faces)
    exact = (on_dlib_boxes[dataset] == np.stack([f.landmarks for f in faces])).all(axis=(1, 2))
    print(f"\n{dataset}: torch vs dlib predictor on dlib boxes: {err.mean():.5f} IOD, {exact.mean():.0%} faces exact")
    assert err.mean() < TARGET
    # measured: 0.0001 (ORL) / 0.0008 (CelebA) mean, 90 % / 82 % of faces identical to the pixel
    assert err.mean() < 0.002 and err.max() < 0.03
    assert exact.mean() >= 0.75


@pytest.fixture(scope="module")
def pipeline_results(default_pipeline, data_dir: Path) -> dict[str, list]:  # type: ignore[no-untyped-def]
    return {d: default_pipeline.analyze([to_tensor(f.image) for f in faces_for(d, data_dir)]) for d in DATASETS}


@pytest.mark.parametrize("dataset", DATASETS)
def test_pipeline_landmarks_agree_with_dlib(pipeline_results: dict[str, list], data_dir: Path, dataset: str) -> None:
    """Own detector, face-api's landmarks as the seed, then dlib's predictor: against dlib's whole front end."""
    faces = faces_for(dataset, data_dir)
    results = pipeline_results[dataset]
    assert all(r is not None for r in results)
    err = _error(np.stack([r.face.landmarks.double().numpy() for r in results]), faces)
    print(f"\n{dataset}: pipeline landmarks vs dlib: mean {err.mean():.4f} IOD, median {np.median(err):.4f}")
    assert err.mean() < TARGET  # measured 0.013 (ORL) / 0.024 (CelebA); face-api's net alone: 0.049 / 0.069
    assert np.median(err) < 0.02


@pytest.mark.parametrize("dataset", DATASETS)
def test_pipeline_templates_close_to_dlibs_own(pipeline_results: dict[str, list], data_dir: Path, dataset: str) -> None:
    """End to end: the service's template of a photo against dlib's descriptor of dlib's own chip."""
    n = 20  # dlib's ResNet costs ~0.15 s per chip; the cache is shared with test_recognition
    got = torch.stack([r.template for r in pipeline_results[dataset][:n]]).double().numpy()
    ref = np.stack([dlib_chip_descriptor(dataset, data_dir, i) for i in range(n)])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"\n{dataset}: pipeline template vs dlib: mean cosine {cos.mean():.4f}, min {cos.min():.4f}")
    assert cos.mean() > 0.995


def test_batches_match_single_faces(predictor: ShapePredictor68, data_dir: Path) -> None:
    faces = faces_for("celeba", data_dir)[:3] + faces_for("orl", data_dir)[:2]
    images = [to_tensor(f.image) for f in faces]
    boxes = torch.tensor([f.box for f in faces])
    batched = shape_landmarks(predictor, images, torch.arange(5), boxes)
    for k in range(5):
        single = shape_landmarks(predictor, [images[k]], torch.zeros(1, dtype=torch.long), boxes[k : k + 1])
        torch.testing.assert_close(batched[k], single[0])


def test_refine_keeps_missing_faces_missing(predictor: ShapePredictor68, data_dir: Path) -> None:
    face = faces_for("celeba", data_dir)[0]
    seed = torch.tensor(face.landmarks, dtype=torch.float32)[None].repeat(2, 1, 1)
    seed[1] = float("nan")
    out = refine_landmarks(predictor, [to_tensor(face.image)], torch.zeros(2, dtype=torch.long), seed)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    assert float((out[0] - torch.tensor(face.landmarks)).norm(dim=1).mean()) < 2.0  # pixels; IOD ~45 px


def test_refine_keeps_the_seed_where_the_predictor_strays(data_dir: Path) -> None:
    face = faces_for("celeba", data_dir)[1]
    image = [to_tensor(face.image)]
    seed = torch.tensor(face.landmarks, dtype=torch.float32)[None] + torch.tensor([1.5, -1.0])
    index = torch.zeros(1, dtype=torch.long)
    strict = ShapePredictor68.from_dlib(max_shift=1e-6)
    torch.testing.assert_close(refine_landmarks(strict, image, index, seed), seed.double())
    lenient = ShapePredictor68.from_dlib(max_shift=float("inf"))
    moved = refine_landmarks(lenient, image, index, seed)
    assert float((moved - seed.double()).norm(dim=2).mean()) > 0.5  # dlib's points, not the seed's
    with pytest.raises(ValueError, match="max_shift"):
        ShapePredictor68.from_dlib(max_shift=0.0)


def test_box_from_points_lands_near_dlibs_box(data_dir: Path) -> None:
    faces = faces_for("orl", data_dir) + faces_for("celeba", data_dir)
    boxes = dlib_box_from_points(torch.tensor(np.stack([f.landmarks for f in faces])))
    ref = torch.tensor([f.box for f in faces], dtype=torch.float64)
    side = ref[:, 2] - ref[:, 0]
    assert torch.equal(boxes, boxes.round())
    assert float(((boxes - ref).abs().max(1).values / side).median()) < 0.1


def test_similarity_matrix_recovers_a_known_transform() -> None:
    src = torch.rand(68, 2, generator=torch.Generator().manual_seed(0)).double()
    angle, scale = 0.3, 1.7
    rot = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=torch.float64)
    dst = (src @ (scale * rot).T + torch.tensor([5.0, -2.0], dtype=torch.float64))[None]
    torch.testing.assert_close(similarity_matrix(src, dst)[0], scale * rot)
    mirrored = dst * torch.tensor([-1.0, 1.0], dtype=torch.float64)  # a reflection is not a similarity
    assert float(torch.linalg.det(similarity_matrix(src, mirrored)[0])) > 0


# -- the file format -------------------------------------------------------------------------------


def _int(v: int) -> bytes:
    mag = abs(v).to_bytes(max(1, (abs(v).bit_length() + 7) // 8), "little") if v else b""
    return bytes([len(mag) | (0x80 if v < 0 else 0)]) + mag


def _float(x: float) -> bytes:
    mantissa, exponent = float(x).as_integer_ratio()
    shift = exponent.bit_length() - 1  # the denominator is a power of two
    return _int(mantissa) + _int(-shift)


def _column(values: list[float]) -> bytes:
    return _int(-len(values)) + _int(-1) + b"".join(_float(v) for v in values)


def _tiny_predictor(points: int = 2, features: int = 3) -> bytes:
    """One cascade of one depth-1 tree, written the way dlib serialises a shape_predictor."""
    leaf = [0.25] * (2 * points)
    tree = _int(1) + _int(0) + _int(2) + _float(-1.5) + _int(2) + _column(leaf) + _column([-v for v in leaf])
    parts = [
        _int(1),  # version
        _column([0.1 * i for i in range(2 * points)]),  # mean shape
        _int(1) + _int(1) + tree,  # forests: one cascade of one tree
        _int(1) + _int(features) + b"".join(_int(i % points) for i in range(features)),  # anchors
        _int(1) + _int(features) + b"".join(_float(0.5) + _float(-0.25) for _ in range(features)),  # deltas
    ]
    return b"".join(parts)


def test_reader_parses_dlib_layout(tmp_path: Path) -> None:
    path = tmp_path / "tiny.dat"
    path.write_bytes(_tiny_predictor())
    arrays = read_shape_predictor(path)
    assert arrays.initial_shape.shape == (2, 2) and arrays.initial_shape[1, 1] == pytest.approx(0.3)
    assert arrays.split_idx.tolist() == [[[[0, 2]]]] and arrays.split_thresh.item() == -1.5
    assert arrays.leaves.shape == (1, 1, 2, 2, 2) and arrays.leaves[0, 0, 1].min() == -0.25
    assert arrays.anchor_idx.tolist() == [[0, 1, 0]] and arrays.deltas[0, 2].tolist() == [0.5, -0.25]
    arrays.save(tmp_path / "tiny.npz")
    again = ShapePredictorArrays.load(tmp_path / "tiny.npz")
    assert np.array_equal(again.leaves, arrays.leaves)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:-3], "end of data"),
        (lambda b: b + _int(7), "bytes left"),
        (lambda b: _int(2) + b[2:], "version 2"),
        (lambda b: b[:2] + b"\x0f" + b[3:], "bad integer header"),
    ],
)
def test_reader_rejects_what_it_does_not_know(tmp_path: Path, mangle, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.dat"
    path.write_bytes(mangle(_tiny_predictor()))
    with pytest.raises(DlibFormatError, match=message):
        read_shape_predictor(path)


def test_encoding_matches_the_installed_file() -> None:
    """The layout the reader expects, checked on the real file's first bytes: version 1, a 136 x 1 mean
    shape, and its first value 15808589 * 2^-29 (0.0294) as a mantissa / exponent pair."""
    head = _int(1) + _int(-136) + _int(-1) + _float(15808589 * 2.0**-29)
    assert head.hex() == "01018188810103" + "4d38f1811d"
    with dlib_predictor_path().open("rb") as fh:
        assert fh.read(len(head)) == head
