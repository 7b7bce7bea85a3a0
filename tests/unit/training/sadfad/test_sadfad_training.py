"""SAD/FAD training: every variant trains on tiny synthetic faces, resume is exact, verification figures are
right on constructed scores, and the whole pipeline runs on the bundled sample faces into a local MLflow store.

The synthetic faces are 150-px chips whose colour pattern depends on the identity, with dlib's mean
face (plus a jaw arc) as landmarks, moved a little per face: learnable in a few steps, no detector.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from facexplain.data.faceset import FaceSet
from facexplain.faces.occlusion import dlib_frontal_template
from facexplain.losses.sadfad import SADFADLossWeights
from facexplain.models.sadfad import SADFADNet
from training.sadfad.cli import add_arguments, config_from_args
from training.sadfad.config import PRESETS, VARIANT_NAMES, TrainSADFADConfig
from training.sadfad.data import OcclusionSpec, batch_inputs, split_faceset, template_mesh
from training.sadfad.trainer import fit, tar_at_far, verification_metrics

SMALL = TrainSADFADConfig().replace(**PRESETS["smoke"])


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny convolutions run several times faster on one thread than on two busy ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_faceset(n_ids: int = 6, per_id: int = 4, seed: int = 0) -> FaceSet:
    g = torch.Generator().manual_seed(seed)
    tmpl, index = dlib_frontal_template(150, 0.25)
    base = torch.zeros(68, 2)
    base[list(index)] = tmpl
    t = torch.linspace(0, math.pi, 17)
    base[:17] = torch.stack([25 + 100 * (1 - torch.cos(t)) / 2, 60 + 60 * torch.sin(t)], -1)
    chips, lms, ids, paths = [], [], [], []
    for i in range(n_ids):
        pattern = torch.rand(3, 4, 4, generator=g)
        for k in range(per_id):
            low = (pattern + 0.15 * torch.rand(3, 4, 4, generator=g)).clamp(0, 1)
            img = torch.nn.functional.interpolate(low[None], size=(150, 150), mode="bilinear", align_corners=False)
            chips.append((img[0] * 255).round().to(torch.uint8))
            lms.append(base + torch.randn(68, 2, generator=g) * 1.5)
            ids.append(f"id{i}")
            paths.append(f"id{i}/{k}.png")
    n = len(ids)
    return FaceSet(
        paths=paths,
        identities=ids,
        templates=torch.zeros(n, 4),
        chips=torch.stack(chips),
        landmarks=torch.stack(lms),
        meta={"chip_size": 150, "chip_padding": 0.25, "manifest_sha256": "synthetic"},
    )


def _fit(tmp: Path, variant: str, epochs: int, resume: bool = False, faces: FaceSet | None = None, **kw):  # type: ignore[no-untyped-def]
    cfg = SMALL.replace(variant=variant, **kw)
    faces = faces or synthetic_faceset()
    model_cfg = cfg.model_config(0)
    splits, classes = split_faceset(faces, model_cfg, test_fraction=0.0, val_fraction=0.3, seed=1)
    torch.manual_seed(cfg.seed)
    model = SADFADNet(cfg.model_config(len(classes)))
    res = fit(
        model,
        splits,
        variant=variant,
        weights=cfg.loss_weights(),
        mesh=template_mesh(splits["train"], model_cfg),
        occlusion=OcclusionSpec(cfg.occluder_width, cfg.occluder_height),
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        epochs=epochs,
        seed=cfg.seed,
        checkpoint_dir=tmp,
        resume=resume,
        progress=False,
        eval_faces=cfg.eval_faces,
    )
    return model, res


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_every_variant_trains_and_its_loss_falls(tmp_path: Path, variant: str) -> None:
    _, res = _fit(tmp_path, variant, epochs=4, lr=1e-2)
    first, last = res.history[0].train, res.history[-1].train
    assert all(math.isfinite(v) for h in res.history for v in h.train.values())
    assert last["identity"] < first["identity"]  # the identity softmax learns in every variant
    if variant in ("sad", "sad+fad"):
        assert {"filter", "response"} <= set(first)
    if variant in ("fad", "sad+fad"):
        assert {"fad", "occluded_identity"} <= set(first)
    assert "clean_auc" in res.history[-1].val and "occluded_auc" in res.history[-1].val
    assert (tmp_path / "last.pt").is_file() and res.steps == 4 * 2  # 16 training faces, batch 8: 2 steps


def test_resume_continues_exactly(tmp_path: Path) -> None:
    faces = synthetic_faceset()
    straight, _ = _fit(tmp_path / "a", "sad+fad", epochs=2, faces=faces)
    _fit(tmp_path / "b", "sad+fad", epochs=1, faces=faces)
    resumed, res = _fit(tmp_path / "b", "sad+fad", epochs=2, resume=True, faces=faces)
    assert len(res.history) == 2
    for (k, v1), v2 in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k


def test_split_is_identity_disjoint_and_batches_are_in_the_input_frame() -> None:
    faces = synthetic_faceset(n_ids=10, per_id=3)
    model_cfg = SMALL.model_config(0)
    splits, classes = split_faceset(faces, model_cfg, test_fraction=0.2, val_fraction=0.2, seed=0)
    sides = [set(s.identities) for s in splits.values()]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert sum(len(s) for s in splits.values()) == len(faces)
    tr = splits["train"]
    assert classes == sorted(sides[0]) and tr.labels.min() == 0 and tr.labels.max() == len(classes) - 1
    assert (splits["val"].labels == -1).all()
    assert tr.images.dtype == torch.uint8 and tr.images.shape[-1] == model_cfg.resize
    x, lm = batch_inputs(tr, torch.arange(3), model_cfg)
    assert x.shape == (3, 3, 48, 48) and lm.shape == (3, 68, 2)
    assert float(lm.min()) > 0 and float(lm.max()) < 48  # the face lies inside the crop


def test_tar_at_far_and_verification_on_known_scores() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.95, 0.45])
    genuine = np.array([False] * 10 + [True, True])
    tar, thr = tar_at_far(scores, genuine, 0.1)  # 1 of 10 impostors may pass: threshold 0.8
    assert thr == pytest.approx(0.8) and tar == pytest.approx(0.5)
    tar0, thr0 = tar_at_far(scores, genuine, 0.0)  # none may pass: threshold 0.9
    assert thr0 == pytest.approx(0.9) and tar0 == pytest.approx(0.5)
    f = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    m = verification_metrics(f, f, ["a", "a", "b", "b"], "x_")
    assert m["x_auc"] == 1.0 and m["x_pairs_genuine"] == 2 and m["x_tar_far1"] == 1.0


def test_presets_and_cli_flags() -> None:
    for over in PRESETS.values():
        TrainSADFADConfig().replace(**over)
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainSADFADConfig().replace(nope=1)
    with pytest.raises(ValueError, match="variant"):
        TrainSADFADConfig(variant="sad-fad")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--preset", "smoke", "--variant", "fad", "--lr", "0.01", "--fad-keep", "9"]))
    assert (cfg.variant, cfg.lr, cfg.fad_keep, cfg.n_filters) == ("fad", 0.01, 9, PRESETS["smoke"]["n_filters"])
    assert isinstance(cfg.loss_weights(), SADFADLossWeights) and cfg.loss_weights().keep_for(cfg.n_filters) == 9


def test_pipeline_on_sample_faces_into_a_local_mlflow_store(
    sample_faceset: FaceSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from training.sadfad.run import EXPERIMENT, load_trained_model, train_sadfad

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a folder store: no server, no database migration
    uri = (tmp_path / "mlruns").as_uri()
    cfg = SMALL.replace(variant="sad+fad", epochs=1, max_steps=2)
    # tracking only: registering a version needs a registry server (tests/integration/test_sadfad_service.py)
    summary = train_sadfad(
        cfg, out_dir=tmp_path / "out", tracking_uri=uri, faces=sample_faceset, progress=False, register=False
    )
    out = tmp_path / "out"
    assert summary.run_id and summary.steps <= 2 and summary.seed == cfg.seed
    assert summary.faces["train"] + summary.faces["val"] + summary.faces["test"] == len(sample_faceset)
    for name in ("model.pt", "last.pt", "summary.json", "peak_locations.png", "per_filter.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["variant"] == "sad+fad"
    assert "val_clean_auc" in summary.metrics and "val_peak_pos_std_mean" in summary.metrics

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary.run_id)
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.info.status == "FINISHED" and run.data.params["variant"] == "sad+fad"
    assert "train_total" in run.data.metrics and "val_clean_auc" in run.data.metrics
    assert [a.path for a in client.list_artifacts(summary.run_id, "figures")] == ["figures/peak_locations.png"]

    net, data = load_trained_model(out / "model.pt")
    assert net.head is None and data["variant"] == "sad+fad" and data["template"].shape == (68, 2)
    with torch.no_grad():
        t = net(torch.rand(2, 3, 48, 48) * 255).features
    assert t.shape == (2, cfg.n_filters) and bool(torch.isfinite(t).all())
