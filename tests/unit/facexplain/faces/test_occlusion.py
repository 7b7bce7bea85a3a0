"""Occlusion synthesis: one physical region (drawn in the frontal template) on differently posed faces."""

from __future__ import annotations

import math

import pytest
import torch

from facexplain.faces.occlusion import (
    FaceMesh,
    OcclusionRect,
    dlib_frontal_template,
    mean_template,
    occlude,
    occlude_batch,
    occlusion_masks,
    sample_rectangle,
    warp_points,
)

SIZE = 96
TEMPLATE, INDEX = dlib_frontal_template(SIZE, 0.25)
LEFT_EYE = list(range(36, 42))  # iBUG numbering: the subject's right eye, on the image's left
RIGHT_EYE = list(range(42, 48))
MOUTH = list(range(48, 60))


def _face(matrix: list[list[float]], shift: tuple[float, float]) -> torch.Tensor:
    """(68, 2) landmarks: the template through an affine map about the frame centre (jaw left at 0)."""
    c = torch.tensor([(SIZE - 1) / 2] * 2)
    lm = torch.zeros(68, 2)
    lm[list(INDEX)] = (
        (TEMPLATE - c) @ torch.tensor(matrix, dtype=torch.float32).T + c + torch.tensor(shift, dtype=torch.float32)
    )
    return lm


def _posed_faces() -> torch.Tensor:
    th = math.radians(15)
    return torch.stack(
        [
            _face([[1, 0], [0, 1]], (0, 0)),  # frontal
            _face([[0.9 * math.cos(th), -0.9 * math.sin(th)], [0.9 * math.sin(th), 0.9 * math.cos(th)]], (3, -2)),
            _face([[0.8, 0.12], [0.0, 1.05]], (-5, 3)),  # yaw-like squeeze + shear
            _face([[1.1, 0], [-0.1, 0.95]], (2, 4)),
        ]
    )


def _mesh() -> FaceMesh:
    return FaceMesh.from_template(TEMPLATE, SIZE, INDEX)


def _box(points: torch.Tensor, pad: float) -> OcclusionRect:
    lo, hi = points.min(0).values - pad, points.max(0).values + pad
    return OcclusionRect(float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


def _covered(mask: torch.Tensor, pts: torch.Tensor) -> list[bool]:
    return [bool(mask[0, round(float(y)), round(float(x))]) for x, y in pts]


def test_mesh_covers_the_frame_and_the_template_maps_to_itself() -> None:
    mesh = _mesh()
    assert mesh.points.shape == (51 + 8, 2) and mesh.landmark_index == tuple(range(17, 68))
    assert mesh.triangles.shape[1] == 3 and int(mesh.triangles.max()) < mesh.points.shape[0]
    grid = torch.stack(torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="xy"), -1).reshape(1, -1, 2)
    mapped, valid = warp_points(grid, mesh.points, mesh.points, mesh.triangles)
    assert bool(valid.all())  # the boundary points put every pixel in some triangle
    assert torch.allclose(mapped, grid, atol=1e-3)


def test_landmarks_warp_onto_the_template_landmarks() -> None:
    mesh = _mesh()
    faces = _posed_faces()
    face_pts = mesh.face_points(faces)
    lm = faces[:, list(INDEX)]
    mapped, valid = warp_points(lm, face_pts, mesh.points, mesh.triangles)
    assert bool(valid.all())
    assert torch.allclose(mapped, TEMPLATE.expand_as(mapped), atol=1e-3)


def test_a_rectangle_over_the_template_eye_covers_each_faces_eye() -> None:
    mesh = _mesh()
    faces = _posed_faces()
    rect = _box(TEMPLATE[[i - 17 for i in LEFT_EYE]], pad=2.0)
    masks = occlusion_masks(mesh, faces, rect, SIZE)
    assert masks.shape == (4, 1, SIZE, SIZE) and masks.dtype == torch.bool
    for b in range(4):
        assert all(_covered(masks[b], faces[b, LEFT_EYE])), b
        assert not any(_covered(masks[b], faces[b, RIGHT_EYE])), b
        assert not any(_covered(masks[b], faces[b, MOUTH])), b
    # the region moves with the face: the posed faces' masks differ from the frontal one
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    # on the frontal face the mask is the rectangle itself (up to pixel rounding at the border)
    area = (rect.x1 - rect.x0) * (rect.y1 - rect.y0)
    perimeter = 2 * ((rect.x1 - rect.x0) + (rect.y1 - rect.y0))
    assert abs(int(masks[0].sum()) - area) <= perimeter


def test_rectangles_are_deterministic_by_seed_and_inside_the_frame() -> None:
    a, b = sample_rectangle(7, SIZE), sample_rectangle(7, SIZE)
    assert a == b and a.seed == 7
    assert sample_rectangle(8, SIZE) != a
    for seed in range(50):
        r = sample_rectangle(seed, SIZE, width=(20, 40), height=(8, 16), margin=4)
        assert 4 <= r.x0 < r.x1 <= SIZE - 1 - 4 and 4 <= r.y0 < r.y1 <= SIZE - 1 - 4
        assert 20 <= r.x1 - r.x0 <= 40 and 8 <= r.y1 - r.y0 <= 16
    with pytest.raises(ValueError, match="does not fit"):
        sample_rectangle(0, 32, width=(40, 40))


def test_occlude_batch_is_one_physical_mask_deterministic_by_seed() -> None:
    mesh = _mesh()
    faces = _posed_faces()
    images = torch.full((4, 3, SIZE, SIZE), 200.0)
    out1, m1, r1 = occlude_batch(images, faces, mesh, seed=3)
    out2, m2, r2 = occlude_batch(images, faces, mesh, seed=3)
    assert r1 == r2 and r1.seed == 3 and torch.equal(m1, m2) and torch.equal(out1, out2)
    assert bool(m1.any(dim=(1, 2, 3)).all())  # every face is occluded somewhere
    assert torch.equal(out1 == 0, m1.expand_as(out1))  # painted black exactly where masked
    assert torch.equal(images, torch.full_like(images, 200.0))  # input untouched
    _, m3, r3 = occlude_batch(images, faces, mesh, seed=4)
    assert r3 != r1 and not torch.equal(m3, m1)
    assert torch.equal(occlude(images, m1, fill=-1.0) == -1.0, m1.expand_as(images))


def test_mean_template_and_a_68_point_mesh() -> None:
    faces = _posed_faces()
    faces[:, :17] = torch.stack([torch.linspace(15, 80, 17), 60 + 25 * torch.sin(torch.linspace(0, math.pi, 17))], -1)
    tmpl = mean_template(faces)
    assert tmpl.shape == (68, 2)
    mesh = FaceMesh.from_template(tmpl, SIZE)
    assert mesh.landmark_index == tuple(range(68))
    rect = _box(tmpl[MOUTH], pad=1.5)
    masks = occlusion_masks(mesh, faces, rect)
    for b in range(4):
        assert all(_covered(masks[b], faces[b, MOUTH])), b
        assert not any(_covered(masks[b], faces[b, LEFT_EYE])), b
