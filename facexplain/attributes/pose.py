"""Head pose (yaw, pitch, roll) from 68 landmarks, and landmarks for aligned chips and decoded faces.

An *independent* estimator: it reads pixels through the project's own landmark net (face-api's
``face_landmark_68_model``, :mod:`facexplain.models.landmarks`), never a template, so a "yaw"
direction found in template space can be checked on the faces it decodes to.

Pose comes from a perspective-n-point fit (``cv2.solvePnP``) of six landmarks to a generic 3-D face:
nose tip (30), chin (8), outer eye corners (36, 45) and mouth corners (48, 54). The 3-D coordinates are
the approximate generic head model of S. Mallick, "Head Pose Estimation using OpenCV and Dlib"
(LearnOpenCV, 2016): nose tip (0, 0, 0), chin (0, -330, -65), eye corners (-+225, 170, -135), mouth
corners (-+150, -150, -125), in a y-up, z-towards-the-viewer frame. :data:`GENERIC_FACE_3D` holds them
in OpenCV's camera frame instead (x right, y down, z away from the camera: y and z negated), so a face
looking straight at the camera has the identity rotation and all three angles are 0 there. The model
is left-right symmetric, which makes a mirrored face's yaw and roll exactly the negatives of the
original's and its pitch the same (for exactly mirrored landmarks, :func:`mirror_landmarks`). It is a
rough average head: pitch carries an offset that depends on face shape; yaw, which is what the
benchmarks use, is the reliable angle.

The camera is a pinhole with focal length = image width and the principal point at the image centre
(no distortion): aligned chips and decoded faces carry no calibration, and for the small angles of
a portrait this choice changes yaw by little.

Angles (degrees, in (-180, 180]) decompose the rotation relative to the frontal pose as
``R = Ry(yaw) Rx(pitch) Rz(roll)`` in the camera frame, with yaw's sign flipped so that **positive yaw
means the face turns towards the image's right** (the nose tip moves right of the eyes' midpoint; the
subject's own left); positive pitch means the face tilts up (chin forward); positive roll is a
clockwise tilt of the face as displayed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from facexplain.attributes.crops import CHIP_DETECTOR_BOX, Box, crop_faces, crop_frame, fixed_boxes, to_255
from facexplain.models.landmarks import NUM_POINTS, FaceLandmark68Net

# 68-point indices of the six model points, in the order of GENERIC_FACE_3D rows.
POSE_POINTS = (30, 8, 36, 45, 48, 54)
GENERIC_FACE_3D = np.array(
    [
        [0.0, 0.0, 0.0],  # nose tip
        [0.0, 330.0, 65.0],  # chin
        [-225.0, -170.0, 135.0],  # outer corner of the eye on the image's left (the subject's right eye)
        [225.0, -170.0, 135.0],  # outer corner of the other eye
        [-150.0, 150.0, 125.0],  # mouth corner, image left
        [150.0, 150.0, 125.0],  # mouth corner, image right
    ],
    dtype=np.float64,
)
# iBUG 68-point index of each point's mirror image (left-right): a mirrored face's landmarks, re-indexed
# with this, mean the same parts again (point 36, outer corner of the eye on the image's left, stays so).
MIRROR_68 = (
    *range(16, -1, -1),  # jaw
    *range(26, 16, -1),  # brows
    27, 28, 29, 30,  # nose bridge
    35, 34, 33, 32, 31,  # nostrils
    45, 44, 43, 42, 47, 46,  # eyes
    39, 38, 37, 36, 41, 40,
    54, 53, 52, 51, 50, 49, 48,  # outer lips
    59, 58, 57, 56, 55,
    64, 63, 62, 61, 60,  # inner lips
    67, 66, 65,
)  # fmt: skip
# Largest RMS reprojection error of a fit, in eye-corner distances. Faces fit the generic model to about
# 0.03-0.07 (decoded faces); 0.8 % of the 5,303 CelebA chips' landmarks exceed 0.2,
# 1 in 500 when the net runs on the chip itself. A landmark set that was not a face (the net's output
# on a decoded face it could not read, the chin above the eyes) gave 0.40.
MAX_REPROJECTION_ERROR = 0.2
# Distance between the model's outer eye corners, for the initial guess of the head's distance.
_MODEL_EYE_SPAN = 450.0


def mirror_landmarks(landmarks: torch.Tensor, width: int) -> torch.Tensor:
    """Landmarks (..., 68, 2) of an image -> those of its left-right mirror image (``width`` pixels wide).

    x becomes ``width - 1 - x`` (pixel-index coordinates) and the points are re-indexed with
    :data:`MIRROR_68`, so the result is what a landmark detector would return on the mirrored image.
    (:func:`facexplain.data.faceset.mirror_faceset` flips x only, which suits region masks but not pose.)
    """
    out = landmarks[..., list(MIRROR_68), :].clone()
    out[..., 0] = (width - 1) - out[..., 0]
    return out


def _angles(rot: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of ``rot = Ry(a) Rx(b) Rz(c)``; yaw = -a (module docstring)."""
    a = math.atan2(rot[0, 2], rot[2, 2])
    b = math.asin(max(-1.0, min(1.0, -rot[1, 2])))
    c = math.atan2(rot[1, 0], rot[1, 1])
    return -math.degrees(a), math.degrees(b), math.degrees(c)


def head_pose(
    landmarks: torch.Tensor, image_size: int | tuple[int, int], max_error: float = MAX_REPROJECTION_ERROR
) -> torch.Tensor:
    """(N, 68, 2) or (68, 2) pixel landmarks -> (N, 3) or (3,) float64 (yaw, pitch, roll) in degrees.

    Landmarks must carry iBUG semantics (point 36 is the outer corner of the eye on the image's left
    in a frontal face), as detectors return them; x-flipped landmarks that were not re-indexed give a
    pose near 180 degrees (use :func:`mirror_landmarks`).
    ``image_size`` is the side (or (height, width)) of the image the landmarks are in; it sets the
    assumed camera. Each face is fitted from the frontal pose at the distance its eye span implies,
    with OpenCV's iterative (Levenberg-Marquardt) solver. Faces with non-finite landmarks get NaN, and
    so do fits whose RMS reprojection error of the six points exceeds ``max_error`` times the
    eye-corner distance: the landmark net always returns 68 points, and on a face it cannot read
    (a very blurred decoded face) they may not be a face at all (the chin above the eyes), which
    solvePnP would still turn into some "pose".
    """
    import cv2  # heavy (OpenCV): paid only where poses are computed, not by every importer of the estimators

    single = landmarks.dim() == 2
    pts = landmarks.unsqueeze(0) if single else landmarks
    if pts.dim() != 3 or pts.shape[1:] != (NUM_POINTS, 2):
        raise ValueError(f"expected (N, 68, 2) landmarks, got {tuple(landmarks.shape)}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    focal = float(width)
    camera = np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])
    out = torch.full((pts.shape[0], 3), float("nan"), dtype=torch.float64)
    image_pts = pts.detach().to("cpu", torch.float64)[:, list(POSE_POINTS)].numpy()
    for i, p in enumerate(image_pts):
        if not np.isfinite(p).all():
            continue
        span = float(np.linalg.norm(p[3] - p[2]))
        if span <= 0:
            continue
        depth = focal * _MODEL_EYE_SPAN / span
        tvec = np.array(
            [[(p[0, 0] - camera[0, 2]) * depth / focal], [(p[0, 1] - camera[1, 2]) * depth / focal], [depth]]
        )
        rvec = np.zeros((3, 1))
        ok, rvec_fit, tvec_fit = cv2.solvePnP(
            GENERIC_FACE_3D, np.ascontiguousarray(p), camera, None, rvec, tvec, True, cv2.SOLVEPNP_ITERATIVE
        )
        if not ok:
            continue
        proj, _ = cv2.projectPoints(GENERIC_FACE_3D, rvec_fit, tvec_fit, camera, None)
        if math.sqrt(float(((proj[:, 0, :] - p) ** 2).sum(axis=1).mean())) > max_error * span:
            continue
        rot, _ = cv2.Rodrigues(rvec_fit)
        out[i] = torch.tensor(_angles(rot), dtype=torch.float64)
    return out[0] if single else out


def yaw_degrees(landmarks: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """(N, 68, 2) landmarks -> (N,) yaw in degrees (positive: face turned towards the image's right)."""
    return head_pose(landmarks, image_size)[..., 0]


@torch.no_grad()
def image_landmarks(
    net: FaceLandmark68Net, images: torch.Tensor, box: Box = CHIP_DETECTOR_BOX, batch_size: int = 64
) -> torch.Tensor:
    """68 landmarks of aligned chips or decoded faces (N, 3, S, S), [0, 1] or [0, 255] -> (N, 68, 2) pixels.

    A chip has no detector box, so the landmark net gets the fixed ``box`` (fractions of the side;
    default the whole chip, see :data:`~facexplain.attributes.crops.CHIP_DETECTOR_BOX`), cropped and
    resized exactly as face-api does for a detection, and its points are mapped back to the image's
    pixel-index coordinates. On CelebA chips this reproduces the landmarks the net found on the original
    photo to 3.8 % of the eye-corner distance. Decoded faces at any resolution work the same way.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(net.parameters()).device
    n, size = images.shape[0], images.shape[-1]
    if images.dim() != 4 or images.shape[-2] != size:
        raise ValueError(f"expected (N, 3, S, S) images, got {tuple(images.shape)}")
    x0, y0, side = crop_frame(fixed_boxes(1, size, box)[0].tolist(), size, size)
    offset = torch.tensor([x0, y0], dtype=torch.float32)
    out = []
    for s in range(0, n, batch_size):
        x = to_255(images[s : s + batch_size].to(device))
        inp = crop_faces(x, fixed_boxes(x.shape[0], size, box).to(device))
        out.append(net(inp).float().cpu() * side + offset)
    return torch.cat(out) if out else torch.zeros(0, NUM_POINTS, 2)


def image_pose(
    net: FaceLandmark68Net, images: torch.Tensor, box: Box = CHIP_DETECTOR_BOX, batch_size: int = 64
) -> torch.Tensor:
    """Aligned chips or decoded faces (N, 3, S, S) -> (N, 3) (yaw, pitch, roll) degrees via :func:`image_landmarks`."""
    return head_pose(image_landmarks(net, images, box, batch_size), images.shape[-1])
