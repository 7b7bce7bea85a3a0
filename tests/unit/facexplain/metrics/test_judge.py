"""The second FR model as a judge of faces drawn in the default chip geometry (facexplain.metrics.judge),
on real CelebA photos: the original's own chip judged against its photo is accepted, against another
person's photo it is not, and the canonical landmarks sit where real chips have their five points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facexplain.artifacts.embedder import second_fr_pipeline
from facexplain.data.faces import celeba_records, load_image
from facexplain.faces.align import five_points
from facexplain.metrics.judge import (
    ChipGeometry,
    canonical_landmarks,
    judge_chips,
    judge_decoded,
    judge_scores,
    judge_templates,
    photo_references,
)
from facexplain.metrics.reconstruction import resize01

DECODED_PX = 64  # the shipped decoder's output size


@pytest.fixture(scope="module")
def judge():  # type: ignore[no-untyped-def]
    return second_fr_pipeline("cpu")


@pytest.fixture(scope="module")
def faces(celeba_dir: Path, default_pipeline):  # type: ignore[no-untyped-def]
    """Two photos each of three CelebA identities, with the default pipeline's chips and landmarks."""
    by_id: dict[str, list[Path]] = {}
    for r in sorted(celeba_records(celeba_dir), key=lambda r: str(r.path)):
        by_id.setdefault(r.identity, []).append(Path(r.path))
    ids = [i for i in sorted(by_id) if len(by_id[i]) >= 2][:3]
    paths = [p for i in ids for p in by_id[i][:2]]
    photos = [load_image(p) for p in paths]
    results = default_pipeline.analyze(photos)
    assert all(r is not None for r in results)
    return {
        "identities": [i for i in ids for _ in range(2)],
        "photos": photos,
        "chips": torch.stack([r.chip.float() / 255.0 for r in results]),  # (N, 3, 150, 150) in [0, 1]
        "landmarks": [r.face.landmarks for r in results],
    }


def test_canonical_landmarks_sit_on_real_chips_five_points(faces, default_pipeline) -> None:  # type: ignore[no-untyped-def]
    """dlib's chip puts every face's mean-face points at fixed chip pixels: the real five points of the
    aligned chips lie within a few pixels of the canonical ones (150-px chip; mouth corners move with
    expression: up to 15 px here)."""
    from facexplain.faces.align import chip_transforms

    source = ChipGeometry.of(default_pipeline.info)
    canonical = five_points(canonical_landmarks(150, source)[None])[0]
    errors = []
    for lm in faces["landmarks"]:
        m = chip_transforms(lm[None].double(), 150, 0.25)[0]  # chip -> image
        a, t = m[:, :2], m[:, 2]
        in_chip = (torch.linalg.inv(a) @ (lm.double() - t).T).T
        errors.append((five_points(in_chip[None].float())[0] - canonical).norm(dim=1))
    err = torch.stack(errors)
    # the eye distance is about 53 px in this chip: a wrong padding or size would put the points 20+ px off
    assert float(err.mean()) < 10.0 and float(err.max()) < 25.0, err


def test_chip_is_its_own_person_to_the_judge_and_not_another(faces, judge, default_pipeline) -> None:  # type: ignore[no-untyped-def]
    source = ChipGeometry.of(default_pipeline.info)
    chips64 = resize01(faces["chips"], DECODED_PX)
    refs = photo_references(judge, faces["photos"])
    assert all(r is not None for r in refs)
    # each face's 64-px chip against its own photo: what a perfect 64-px decoder scores
    own = judge_decoded(judge, None, chips64, source, refs=refs)
    assert bool(own.accepted.all()), own.cosine
    assert float(own.cosine.min()) > 0.6
    # the same chips against the photo of another identity (rotated by two: a different person)
    other = judge_scores(refs[2:] + refs[:2], judge_templates(judge, chips64, source), judge.info.rule)
    assert not bool(other.accepted.any()), other.cosine
    assert float(other.cosine.max()) < judge.info.rule.threshold < float(own.cosine.min())
    # a chip judged against itself at full resolution is the same template
    full = judge_templates(judge, faces["chips"], source)
    assert judge_scores(list(full), full, judge.info.rule).cosine.min() > 0.999
    s = own.summary()
    assert s["faces"] == s["found"] == 6 and s["accepted"] == 1.0 and s["mean_cosine"] > 0.6


def test_missing_reference_is_not_accepted_and_bad_shapes_refused(faces, judge, default_pipeline) -> None:  # type: ignore[no-untyped-def]
    source = ChipGeometry.of(default_pipeline.info)
    t = judge_templates(judge, faces["chips"][:2], source)
    scores = judge_scores([None, t[1]], t, judge.info.rule)
    assert torch.isnan(scores.cosine[0]) and not bool(scores.accepted[0]) and bool(scores.accepted[1])
    assert scores.summary()["found"] == 1 and scores.summary()["accepted"] == 0.5
    with pytest.raises(ValueError, match="references"):
        judge_scores([None], t, judge.info.rule)
    with pytest.raises(ValueError, match=r"\(N, 3, s, s\)"):
        judge_chips(faces["chips"][:, :, :64], source, ChipGeometry.of(judge.info))
    chips = judge_chips(faces["chips"][:1], source, ChipGeometry.of(judge.info))
    assert tuple(chips.shape) == (1, 3, 224, 224) and float(chips.min()) >= 0 and float(chips.max()) <= 255
