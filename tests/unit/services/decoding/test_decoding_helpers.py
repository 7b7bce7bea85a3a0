"""Pure helpers of the decoding service and its CLI: template paths, chip resizing, output names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cli.main import output_stems
from facexplain.directions.interpolation import PARALLEL_EPS, lerp, positions, slerp
from services.api.v1 import common_pb2
from services.decoding.service import _same_model, chip_at
from services.decoding.settings import DecodingSettings


def _angle(u: torch.Tensor, v: torch.Tensor) -> float:
    return math.acos(float(torch.nn.functional.cosine_similarity(u.double(), v.double(), dim=0).clamp(-1, 1)))


def test_positions_include_both_ends() -> None:
    assert positions(2).tolist() == [0.0, 1.0]
    assert positions(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        positions(1)


def test_lerp_is_the_chord() -> None:
    a, b = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 4.0, 0.0])
    path = lerp(a, b, positions(3))
    assert torch.allclose(path, torch.tensor([[1.0, 0.0, 2.0], [2.0, 2.0, 1.0], [3.0, 4.0, 0.0]]))
    assert path.dtype == torch.float32


def test_slerp_moves_at_constant_angle_with_linear_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, generator=g) * 1.5, torch.randn(128, generator=g) * 0.7
    s = positions(9)
    path = slerp(a, b, s)
    assert path.shape == (9, 128) and path.dtype == torch.float32
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    norms = path.double().norm(dim=1)
    expected = (1 - s) * a.double().norm() + s * b.double().norm()
    assert torch.allclose(norms, expected, rtol=1e-5)
    total = _angle(a, b)
    steps = [_angle(path[k], path[k + 1]) for k in range(8)]
    assert steps == pytest.approx([total / 8] * 8, rel=1e-3)
    # every frame lies in the plane of a and b (a great circle, not some other path)
    basis = torch.linalg.qr(torch.stack([a, b], dim=1).double())[0]
    residual = path.double() - (path.double() @ basis) @ basis.T
    assert float(residual.abs().max()) < 1e-4


def test_slerp_of_parallel_vectors_stays_on_their_direction() -> None:
    a = torch.tensor([1.0, 2.0, 2.0])
    for b in (a * 3, a + PARALLEL_EPS / 10 * torch.tensor([0.0, 1.0, -1.0]), a.clone()):
        path = slerp(a, b, positions(5))
        assert bool(torch.isfinite(path).all())
        dirs = torch.nn.functional.normalize(path, dim=1)
        assert torch.allclose(dirs, torch.nn.functional.normalize(a, dim=0).expand(5, 3), atol=1e-5)
    norms = slerp(a, a * 3, positions(3)).norm(dim=1)
    assert torch.allclose(norms, torch.tensor([3.0, 6.0, 9.0]))


def test_slerp_of_antiparallel_vectors_is_a_deterministic_half_circle() -> None:
    a = torch.tensor([0.6, 0.8, 0.0, 0.0])
    path = slerp(a, -a, positions(5))
    assert bool(torch.isfinite(path).all())
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], -a, atol=1e-6)
    assert torch.allclose(path.norm(dim=1), torch.ones(5), atol=1e-6)  # never through zero
    assert abs(float(path[2] @ a)) < 1e-6  # orthogonal mid-way
    assert torch.equal(path, slerp(a, -a, positions(5)))


def test_slerp_rejects_zero_vectors() -> None:
    with pytest.raises(ValueError):
        slerp(torch.zeros(3), torch.ones(3), positions(2))


def test_chip_at_resizes_to_the_decoder_size_in_unit_range() -> None:
    chip = torch.full((3, 150, 150), 255.0)
    chip[:, :75] = 0.0
    out = chip_at(chip, 64)
    assert out.shape == (1, 3, 64, 64)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out[0, :, 0].mean()) == pytest.approx(0.0) and float(out[0, :, -1].mean()) == pytest.approx(1.0)
    assert torch.equal(chip_at(chip, 150)[0], chip / 255.0)


def test_same_model_only_differs_when_both_sides_name_one() -> None:
    ref = common_pb2.ModelRef
    assert _same_model(ref(), ref(name="facexplain-fr-dlib128", version="1"))
    assert _same_model(ref(name="m", version="1"), ref(name="m"))
    assert not _same_model(ref(name="m", version="1"), ref(name="m", version="2"))
    assert not _same_model(ref(name="m"), ref(name="n"))


def test_output_stems_disambiguate_shared_names(tmp_path: Path) -> None:
    names = ["celeba/id1/001.jpg", "orl/s1/1.pgm", "orl/s2/1.pgm", "x/a.png", "x/a.jpg", "y/a.png", "solo.bmp"]
    paths = [tmp_path / n for n in names]
    stems = output_stems(paths, tmp_path)
    assert [stems[p] for p in paths] == [
        "001",
        "orl__s1__1",
        "orl__s2__1",
        "x__a.png",
        "x__a.jpg",
        "y__a",
        "solo",
    ]
    assert len(set(stems.values())) == len(paths)


def test_output_stems_never_collide(tmp_path: Path) -> None:
    # a file literally named like the disambiguated form of two others
    names = ["x/1.png", "y/1.png", "x__1.png", "x__1.jpg"]
    stems = output_stems([tmp_path / n for n in names], tmp_path)
    assert len(set(stems.values())) == len(names)


def test_decoding_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = DecodingSettings()
    assert (s.model_name, s.model_alias) == ("facexplain-dfd-dlib128", "champion")
    assert (s.fr_model_name, s.fr_model_alias) == ("facexplain-fr-dlib128", "champion")
    assert s.max_interpolation_steps == 64 and s.port == 50052
    monkeypatch.setenv("FACEXPLAIN_FR_MODEL_NAME", "facexplain-fr-other")
    monkeypatch.setenv("FACEXPLAIN_FR_MODEL_ALIAS", "challenger")
    monkeypatch.setenv("FACEXPLAIN_MAX_INTERPOLATION_STEPS", "9")
    s = DecodingSettings()
    assert (s.fr_model_name, s.fr_model_alias, s.max_interpolation_steps) == ("facexplain-fr-other", "challenger", 9)
    monkeypatch.setenv("FACEXPLAIN_MAX_INTERPOLATION_STEPS", "1")
    with pytest.raises(ValueError):
        DecodingSettings()


def test_occlusion_regions_default_to_all_and_refuse_unknown_or_repeated() -> None:
    from services.decoding.service import occlusion_regions
    from services.kit.errors import InvalidArgument

    assert occlusion_regions([]) == ["eyes", "nose", "mouth"]
    assert occlusion_regions(["mouth", "eyes"]) == ["mouth", "eyes"]
    with pytest.raises(InvalidArgument, match="unknown occlusion region 'ears'"):
        occlusion_regions(["ears"])
    with pytest.raises(InvalidArgument, match="named twice"):
        occlusion_regions(["eyes", "eyes"])
