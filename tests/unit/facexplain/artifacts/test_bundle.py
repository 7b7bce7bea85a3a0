"""Model bundles: save/load round trip, and the message each kind of broken bundle fails with.

Needs the face-api weights (``make setup``), not a registry: the bundle format is core library code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from facexplain.artifacts.bundle import (
    BUNDLE_JSON,
    GOLDEN_IMAGE,
    BundleError,
    bundle_digest,
    flat_metadata,
    load_golden_image,
    metadata_errors,
    read_metadata,
    verify_files,
)
from facexplain.artifacts.embedder import load_bundle, save_embedder_bundle, validate_embedder
from facexplain.pipeline import FacePipeline
from registry import missing_tags


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "default"
    save_embedder_bundle(out, name="facexplain-fr-test")
    return out


def _copy(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    if changes:
        meta = json.loads((dst / BUNDLE_JSON).read_text())
        meta.update(changes)
        (dst / BUNDLE_JSON).write_text(json.dumps(meta))
    return dst


def test_round_trip_matches_the_default_pipeline(bundle: Path) -> None:
    meta = read_metadata(bundle)
    assert meta["kind"] == "embedder" and meta["template_dim"] == 128
    assert meta["input"]["chip_size"] == 150 and meta["alignment"]["padding"] == 0.25
    assert meta["verification"]["metric"] == "l2" and meta["verification"]["threshold"] == 0.6
    assert {c["format"] for c in meta["components"].values()} == {"faceapi"}
    verify_files(bundle, meta)
    pipe = load_bundle(bundle, name="facexplain-fr-test", version="7")
    assert (pipe.info.name, pipe.info.version, pipe.info.dim) == ("facexplain-fr-test", "7", 128)
    report = validate_embedder(pipe, bundle)
    assert report.template_dim == 128 and report.cosine_to_expected > 0.9999 and report.batch_max_abs_diff < 1e-4
    # the bundle computes what the default pipeline computes
    image = load_golden_image(GOLDEN_IMAGE)
    ref = FacePipeline.default().analyze([image])[0]
    got = pipe.analyze([image])[0]
    assert ref is not None and got is not None
    assert float(torch.nn.functional.cosine_similarity(ref.template, got.template, dim=0)) > 0.9999


def test_torch_format_round_trip_and_tags(bundle: Path, tmp_path: Path) -> None:
    pipe = load_bundle(bundle)
    meta = save_embedder_bundle(tmp_path / "torch", pipe, name="facexplain-fr-test", weights="torch")
    assert {c["format"] for c in meta["components"].values()} == {"torch"}
    again = load_bundle(tmp_path / "torch")
    report = validate_embedder(again, tmp_path / "torch")
    assert report.cosine_to_expected > 0.9999
    exp = torch.tensor(read_metadata(bundle)["golden"]["template"])
    got = torch.tensor(meta["golden"]["template"])
    assert float(torch.nn.functional.cosine_similarity(exp, got, dim=0)) > 0.9999
    tags = flat_metadata(meta) | {"bundle_sha256": bundle_digest(meta)}
    assert missing_tags("embedder", tags) == []
    assert tags["template_dim"] == "128" and tags["verification_metric"] == "l2"
    # a different weight format is a different version; the same files are the same digest
    assert bundle_digest(meta) != bundle_digest(read_metadata(bundle))
    assert bundle_digest(read_metadata(bundle)) == bundle_digest(json.loads((bundle / BUNDLE_JSON).read_text()))


def test_landmark_refiner_is_pinned_not_copied(bundle: Path, tmp_path: Path) -> None:
    from facexplain.artifacts.bundle import file_sha256
    from facexplain.models.shape_predictor import dlib_predictor_path

    spec = read_metadata(bundle)["landmark_refiner"]
    assert spec["sha256"] == file_sha256(dlib_predictor_path()) and spec["passes"] == 2 and spec["max_shift"] == 0.15
    assert not any(p.suffix == ".dat" for p in bundle.rglob("*")), "the 100 MB predictor is referenced, not copied"
    pipe = load_bundle(bundle)
    assert pipe.shape_predictor is not None and pipe.shape_predictor.passes == 2
    other = _copy(bundle, tmp_path / "one-pass", landmark_refiner={**spec, "passes": 1})
    assert load_bundle(other).shape_predictor.passes == 1  # type: ignore[union-attr]
    moved = _copy(bundle, tmp_path / "sha", landmark_refiner={**spec, "sha256": "0" * 64})
    with pytest.raises(BundleError, match=r"installed shape_predictor_68_face_landmarks\.dat is not the file"):
        load_bundle(moved)
    with pytest.raises(BundleError, match="passes must be >= 1"):
        load_bundle(_copy(bundle, tmp_path / "zero", landmark_refiner={**spec, "passes": 0}))
    # a version registered before the refiner existed keeps face-api's points, as it was made
    meta = read_metadata(bundle)
    del meta["landmark_refiner"]
    old = _copy(bundle, tmp_path / "old")
    (old / BUNDLE_JSON).write_text(json.dumps(meta))
    assert load_bundle(old).shape_predictor is None
    # and one made before the fallback to the seed points never falls back
    spec.pop("max_shift")
    before = load_bundle(_copy(bundle, tmp_path / "no-fallback", landmark_refiner=spec)).shape_predictor
    assert before is not None and before.max_shift == float("inf")


def test_wrong_template_dimension_is_rejected(bundle: Path, tmp_path: Path) -> None:
    bad = _copy(bundle, tmp_path / "dim64", template_dim=64)
    pipe = load_bundle(bad)
    with pytest.raises(
        BundleError, match=r"template dimension mismatch: metadata says 64, the model produced \(128,\)"
    ):
        validate_embedder(pipe, bad)


def test_corrupt_or_missing_weights_are_rejected_by_name(bundle: Path, tmp_path: Path) -> None:
    bad = _copy(bundle, tmp_path / "corrupt")
    shard = bad / "weights" / "face_recognition_model.bin"
    data = bytearray(shard.read_bytes())
    data[1000:1100] = bytes(100)
    shard.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"corrupt artifact: sha256 of weights/face_recognition_model.bin"):
        load_bundle(bad)
    shard.unlink()
    with pytest.raises(BundleError, match=r"weights/face_recognition_model.bin is listed in bundle.json but missing"):
        load_bundle(bad)


def test_truncated_shard_fails_to_load_even_unverified(bundle: Path, tmp_path: Path) -> None:
    bad = _copy(bundle, tmp_path / "short")
    shard = bad / "weights" / "face_recognition_model.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"component 'recognition': cannot load face-api weights"):
        load_bundle(bad, verify=False)


def test_nan_weights_are_rejected(bundle: Path, tmp_path: Path) -> None:
    pipe = load_bundle(bundle)
    with torch.no_grad():
        pipe.recognition_net.fc.weight[0, 0] = float("nan")
    save_embedder_bundle(tmp_path / "nan", pipe, name="facexplain-fr-test", weights="torch")
    with pytest.raises(BundleError, match=r"non-finite template \(NaN/inf\) on the golden input"):
        validate_embedder(load_bundle(tmp_path / "nan"), tmp_path / "nan")


def test_changed_weights_are_caught_by_the_golden_template(bundle: Path, tmp_path: Path) -> None:
    pipe = load_bundle(bundle)
    ref_meta = read_metadata(bundle)
    with torch.no_grad():
        w = pipe.recognition_net.fc.weight
        w.copy_(w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))])
    out = tmp_path / "perm"
    save_embedder_bundle(out, pipe, name="facexplain-fr-test", weights="torch")
    meta = json.loads((out / BUNDLE_JSON).read_text())
    meta["golden"]["template"] = ref_meta["golden"]["template"]  # claims the old behaviour
    (out / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"golden template differs from the one recorded at registration"):
        validate_embedder(load_bundle(out), out)


def test_metadata_errors_say_what_is_wrong(bundle: Path) -> None:
    good = read_metadata(bundle)
    assert metadata_errors(good) == []
    assert "kind is 'unknown'" in metadata_errors({**good, "kind": "unknown"})[0]
    assert "format_version is 99" in metadata_errors({**good, "format_version": 99})[0]
    assert any("template_dim must be a positive integer" in e for e in metadata_errors({**good, "template_dim": 0}))
    no_golden = {k: v for k, v in good.items() if k != "golden"}
    assert "embedder bundle lacks golden" in metadata_errors(no_golden)[0]
    decoder = {
        "format_version": 1,
        "kind": "decoder",
        "name": "d",
        "template_dim": 128,
        "input": {},
        "components": {},
    }
    assert any("fr_model must name the FR model" in e for e in metadata_errors(decoder))
    ok_decoder = {**decoder, "fr_model": {"name": "facexplain-fr-dlib128", "version": "3"}}
    assert metadata_errors(ok_decoder) == []
    weird = {**good, "components": {"recognition": {"format": "savedmodel"}}}
    assert "has format 'savedmodel'" in metadata_errors(weird)[0]


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"bundle\.json is missing"):
        read_metadata(tmp_path)
    (tmp_path / BUNDLE_JSON).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_metadata(tmp_path)


def test_a_trained_recognition_net_of_another_architecture_round_trips(bundle: Path, tmp_path: Path) -> None:
    """A SAD/FAD net beside face-api's detector and landmarks: those stay byte for byte, the net is a state
    dict with the config that rebuilds it, and the loaded bundle computes the same templates."""
    from dataclasses import replace

    from facexplain.metrics.verification import VerificationRule
    from facexplain.models.sadfad import SADFADConfig, SADFADEmbedder, SADFADNet

    torch.manual_seed(0)
    net = SADFADNet(SADFADConfig(input_size=48, base_width=4, n_filters=16))
    base = load_bundle(bundle)
    rule = VerificationRule("cosine", 0.5, accept_below=False, source="test")
    pipe = base.with_recognition(SADFADEmbedder(net).eval(), replace(base.info, dim=16, rule=rule))
    meta = save_embedder_bundle(tmp_path / "sadfad", pipe, name="facexplain-sadfad-test")
    comps = meta["components"]
    assert comps["detector"]["format"] == comps["landmarks"]["format"] == "faceapi"
    assert comps["recognition"]["format"] == "torch" and comps["recognition"]["arch"] == "sadfad_casia"
    assert comps["recognition"]["config"]["n_filters"] == 16
    loaded = load_bundle(tmp_path / "sadfad")
    assert loaded.info.dim == 16 and loaded.info.rule.metric == "cosine"
    assert validate_embedder(loaded, tmp_path / "sadfad").cosine_to_expected > 0.9999
    chips = torch.rand(2, 3, 150, 150) * 255
    with torch.no_grad():
        assert torch.allclose(loaded.embed_chips(chips), pipe.embed_chips(chips), atol=1e-5)
    # an architecture this code does not know is refused by name, not loaded as something else
    meta["components"]["recognition"]["arch"] = "mystery_net"
    (tmp_path / "sadfad" / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="unknown architecture 'mystery_net'"):
        load_bundle(tmp_path / "sadfad", verify=False)
