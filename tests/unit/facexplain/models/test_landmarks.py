"""face-api's 68-point landmark net, ported to torch, against dlib's shape predictor on real faces.

Both get dlib's HOG detector box for the same face. The figure is mean point error over the 68
points divided by the outer-eye-corner distance (points 36 and 45), per data set.

The port itself is exact: run against face-api 1.7.15 in node (tfjs cpu backend) on 24 of these
faces, its 112x112 inputs were identical and raw outputs agreed to 2e-7. Against dlib it is a
different model, 3.9 % (ORL) / 5.4 % (CelebA) apart, the jaw line disagreeing most; even boxes
cut from dlib's own landmarks (an oracle) give 3.8 % / 4.7 % at best. So the pipeline does not
take its points: it uses them only to place the box for dlib's own predictor, run in torch
(``test_shape_predictor.py`` holds that one to issue 2's 3 % target). These tests keep the
net's figures from regressing, since the box, and the chip-based pose and geometry estimators,
depend on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from facexplain.models.landmarks import (
    DLIB_BOX_SCALE,
    DLIB_BOX_SHIFT_Y,
    FaceLandmark68Net,
    landmarks_for_boxes,
    landmarks_for_image_boxes,
    tf_resize_bilinear,
)
from tests.unit.faces_ref import RefFace, faces_for, to_tensor

# Regression bounds a little above the measured figures (ORL 3.94%, CelebA 5.44% with the
# dlib-box adjustment; 4.88% / 7.30% with face-api's plain crop of the dlib box).
BOUND = {"orl": 0.042, "celeba": 0.058}


@pytest.fixture(scope="module")
def net() -> FaceLandmark68Net:
    return FaceLandmark68Net.from_faceapi()


def _normalised_error(net: FaceLandmark68Net, faces: tuple[RefFace, ...], scale: float, shift: float) -> float:
    images = [to_tensor(f.image) for f in faces]
    boxes = torch.tensor([f.box for f in faces])
    with torch.no_grad():
        points = landmarks_for_image_boxes(net, images, torch.arange(len(faces)), boxes, box_scale=scale, shift_y=shift)
    ref = np.stack([f.landmarks for f in faces])
    iod = np.linalg.norm(ref[:, 36] - ref[:, 45], axis=1)
    return float((np.linalg.norm(points.double().numpy() - ref, axis=2).mean(axis=1) / iod).mean())


@pytest.fixture(scope="module")
def errors(net: FaceLandmark68Net, data_dir: Path) -> dict[str, tuple[float, float]]:
    """(plain face-api crop, dlib-box adjusted) error per data set, computed once per module."""
    out = {}
    for dataset in ("orl", "celeba"):
        faces = faces_for(dataset, data_dir)
        plain = _normalised_error(net, faces, 1.0, 0.0)
        adjusted = _normalised_error(net, faces, DLIB_BOX_SCALE, DLIB_BOX_SHIFT_Y)
        print(f"\n{dataset}: landmark error / IOD over {len(faces)} faces: plain {plain:.4f}, adjusted {adjusted:.4f}")
        out[dataset] = (plain, adjusted)
    return out


@pytest.mark.parametrize("dataset", ["orl", "celeba"])
def test_landmarks_close_to_dlib(errors: dict[str, tuple[float, float]], dataset: str) -> None:
    plain, adjusted = errors[dataset]
    assert adjusted < plain, "the dlib-box adjustment should help on dlib boxes"
    assert adjusted < BOUND[dataset]


def test_batched_boxes_match_single(net: FaceLandmark68Net, data_dir: Path) -> None:
    faces = faces_for("celeba", data_dir)[:2]
    images = [to_tensor(f.image) for f in faces]
    x1, y1, x2, y2 = faces[0].box
    boxes = torch.tensor([faces[0].box, [x1 - 5, y1 + 3, x2 + 2, y2 + 9], [-10.0, -10.0, -5.0, -5.0], faces[1].box])
    index = torch.tensor([0, 0, 0, 1])
    with torch.no_grad():
        batched = landmarks_for_image_boxes(net, images, index, boxes)
        single = torch.cat(
            [landmarks_for_boxes(net, images[i], b[None]) for i, b in zip([0, 0, 1], boxes[[0, 1, 3]], strict=True)]
        )
    torch.testing.assert_close(batched[[0, 1, 3]], single, rtol=1e-4, atol=1e-3)
    assert torch.isnan(batched[2]).all(), "a box outside the image has no landmarks"


def test_tf_resize_bilinear_is_tf_legacy() -> None:
    row = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    up = tf_resize_bilinear(row, 8)[0, 0, 0]
    down = tf_resize_bilinear(row, 2)[0, 0, 0]
    # Output u samples input u * in/out, the upper neighbour clamped: no half-pixel offset.
    torch.testing.assert_close(up, torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 30.0]))
    torch.testing.assert_close(down, torch.tensor([0.0, 20.0]))
