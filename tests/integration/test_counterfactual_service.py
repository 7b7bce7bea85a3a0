"""The counterfactual service over real gRPC, with the session's real MLflow registry, FR model and decoder.

The registry (conftest.py, shared with the decoding, directions and attributes tests) holds the default
FR model as ``facexplain-fr-dlib128`` v1 and the demo decoder trained for it as ``facexplain-dfd-dlib128``
v1, both champion, and the independent second FR model (HSE FaceRes, ``facexplain-fr-hsefaceres1024``)
registered by ``register-defaults``; one counterfactual server follows all three, the second FR model as
a black-box target. Pairs come from the bundled sample faces (data/sample). Attacks are kept short (PGD
early-stops after a few steps; CW runs few steps; the transfer test runs 5 full-budget PGD steps).

Rejections go over a plain channel (no retries, no wait-for-ready) so the status a test sees is the
server's own answer, and each is followed by a good request: a bad input never takes a server down.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from cli.launcher import REPO, RunningMlflow, RunningService, start_service
from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL, SECOND_FR_MODEL, second_fr_pipeline
from facexplain.metrics.verification import DLIB_L2_RULE
from facexplain.pipeline import FacePipeline
from registry import CANDIDATE, CHAMPION, Registry, VersionInfo, promote
from sdk.client import CounterfactualClient, image_from_path, image_pair, wait_ready
from services.api.v1 import common_pb2, counterfactual_pb2, counterfactual_pb2_grpc
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

SAMPLE = REPO / "data" / "sample" / "celeba"
ID1 = sorted((SAMPLE / "id7201").iterdir())
ID2 = sorted((SAMPLE / "id7205").iterdir())
ID3 = sorted((SAMPLE / "id7202").iterdir())
ID4 = sorted((SAMPLE / "id7206").iterdir())
ID5 = sorted((SAMPLE / "id7207").iterdir())
PROBE, REF = ID1[0], ID1[1]  # a genuine pair the default model accepts (L2 about 0.37)
Spec = counterfactual_pb2.AttackSpec
OUT_SIZE = 64
SEED = 5


def _env(uri: str, cache: Path, **extra: str) -> dict[str, str]:
    return registry_service_env(uri, cache, FACEXPLAIN_MAX_DEFENCE_PAIRS="12", **extra)


def _rejected(svc: RunningService, method: str, request: Any, timeout: float = 120) -> grpc.RpcError:
    """Call ``method`` once without retries (draining a stream); it must fail. Returns the error."""
    ch = grpc.insecure_channel(svc.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    stub = counterfactual_pb2_grpc.CounterfactualServiceStub(ch)
    with ch, pytest.raises(grpc.RpcError) as info:
        result = getattr(stub, method)(request, timeout=timeout)
        if hasattr(result, "__next__"):
            for _ in result:
                pass
    err = info.value
    assert isinstance(err, grpc.RpcError)
    return err


def _png(image: common_pb2.Image) -> np.ndarray:
    with Image.open(io.BytesIO(image.encoded)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _blank_png() -> common_pb2.Image:
    y, x = np.mgrid[0:160, 0:200]
    arr = np.stack([x * 255 / 200, y * 255 / 160, np.full_like(x, 90)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return common_pb2.Image(encoded=buf.getvalue())


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _img(path: Path) -> common_pb2.Image:
    return image_from_path(path)


PROBES_MODEL = "facexplain-probes-cf-test"  # its own name: test_probes_registry checks the default's first version


@pytest.fixture(scope="module")
def probes_v1(celeba_attr_faceset, mlflow: RunningMlflow, tmp_path_factory: pytest.TempPathFactory) -> str:  # type: ignore[no-untyped-def]
    """A small accessory probe set (eyeglasses, smiling) trained by the real pipeline and registered, so
    Explain's catalogue includes the probes."""
    from training.probes.config import TrainProbesConfig
    from training.probes.run import train_probes

    faces = celeba_attr_faceset.subset(range(0, len(celeba_attr_faceset), 3))
    cfg = TrainProbesConfig(labels="Eyeglasses,Smiling", device="cpu", c_grid="0.01", register_as=PROBES_MODEL)
    out = tmp_path_factory.mktemp("cf-probes")
    summary = train_probes(cfg, out_dir=out, tracking_uri=mlflow.uri, progress=False, faces=faces)
    version = str(summary.registered["version"])
    if summary.registered["alias"] == CANDIDATE:
        # A probe set fitted on a third of the sample may miss its quality gates; the promotion policy then
        # registers it as a candidate, and the fixture forces it into service with a recorded reason.
        promote(
            Registry(mlflow.uri, timeout_s=10, max_retries=2),
            PROBES_MODEL,
            version,
            CHAMPION,
            force=True,
            reason="test fixture: a small probe set for Explain's catalogue",
            by="tests/integration/test_counterfactual_service.py",
        )
    else:
        assert summary.registered["alias"] == CHAMPION
    return version


@pytest.fixture(scope="module")
def svc(
    mlflow: RunningMlflow,
    decoder_v1: VersionInfo,
    probes_v1: str,
    second_fr_registered: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningService]:
    logs = tmp_path_factory.mktemp("counterfactual-svc")
    env = _env(
        mlflow.uri,
        logs / "cache",
        FACEXPLAIN_PROBES_MODEL_NAME=PROBES_MODEL,
        FACEXPLAIN_TARGET_MODEL_NAME=SECOND_FR_MODEL,
    )
    service = start_service("counterfactual", logs, env=env, timeout=300)
    yield service
    code = service.stop()
    assert code == 0, f"counterfactual service exit {code}; log tail:\n{service.log_text()[-2000:]}"
    # biometric data never reaches the log: no run of numbers that could be a template or pixels
    assert not re.search(r"(-?\d+\.\d+,\s*){8,}", service.log_text())


@pytest.fixture(scope="module")
def client(svc: RunningService) -> Iterator[CounterfactualClient]:
    c = CounterfactualClient(svc.address, timeout=600)
    wait_ready(c.channel, 30)
    # the decoder and the probe set arrive through the watchers; Explain needs the decoder
    _wait(lambda: any(m.kind == "decoder" and m.serving for m in c.model_status().models), 120, "the decoder to load")
    _wait(
        lambda: any(m.kind == "attribute_probes" and m.serving for m in c.model_status().models),
        120,
        "the probe set to load",
    )
    yield c
    c.close()


def test_model_status_and_reload(client: CounterfactualClient, mlflow: RunningMlflow) -> None:
    status = client.model_status()
    kinds: dict[str, list[Any]] = {}
    for m in status.models:
        kinds.setdefault(m.kind, []).append(m)
    fr = next(m for m in kinds["embedder"] if m.model.name == DEFAULT_FR_MODEL)
    assert (fr.model.version, fr.model.alias, fr.serving) == ("1", CHAMPION, True)
    decoder = kinds["decoder"][0]
    assert (decoder.model.name, decoder.model.version) == (DEFAULT_DECODER_MODEL, "1")
    probes = kinds["attribute_probes"][0]
    assert (probes.model.name, probes.model.alias, probes.serving) == (PROBES_MODEL, CHAMPION, True)
    # the independent FR model the service follows as a black-box target, at its alias
    second = next(m for m in kinds["embedder"] if m.model.name == SECOND_FR_MODEL)
    assert (second.model.alias, second.serving) == (CHAMPION, True)
    assert second.metadata["verification_metric"] == "cosine"
    assert status.registry_reachable and status.registry_uri == mlflow.uri
    reload = client.reload()
    assert reload.error == "" and not reload.changed


def test_pgd_at_8_255_flips_a_genuine_pair(client: CounterfactualClient) -> None:
    t = time.perf_counter()
    resp = client.attack(_img(PROBE), _img(REF), Spec(seed=SEED))
    print(f"PGD 8/255: {resp.score_before:.3f} -> {resp.score_after:.3f} in {time.perf_counter() - t:.2f} s")
    assert resp.same_before and not resp.same_after and resp.flipped
    assert resp.score_before < resp.rule.threshold <= resp.score_after and resp.rule.metric == "l2"
    assert resp.surrogate_score_after >= resp.rule.threshold
    assert 0 < resp.linf <= 8 / 255 + 1e-6 and resp.l2 > 0
    used = resp.spec_used
    assert (used.method, used.goal, used.norm, used.steps) == (Spec.METHOD_PGD, Spec.GOAL_DODGE, Spec.NORM_LINF, 10)
    assert math.isclose(used.epsilon, 8 / 255, rel_tol=1e-6) and resp.seed == SEED
    assert 1 <= resp.steps_used <= 10 and math.isclose(resp.epsilon_used, 8 / 255, rel_tol=1e-6)
    assert (resp.surrogate.name, resp.surrogate.version) == (resp.target.name, resp.target.version)
    assert (resp.target.name, resp.target.version) == (DEFAULT_FR_MODEL, "1")
    # the adversarial image is the probe's size, and within the budget of it pixel by pixel
    with Image.open(PROBE) as im:
        probe = np.asarray(im.convert("RGB")).astype(int)
    adv = _png(resp.adversarial).astype(int)
    assert adv.shape == probe.shape
    assert np.abs(adv - probe).max() <= 8
    assert abs(np.abs(adv - probe).max() / 255 - resp.linf) < 1e-6
    pert = _png(resp.perturbation).astype(int)
    assert pert.shape == probe.shape and (np.abs(pert - 128).max() == 127)


def test_minimal_epsilon_and_cw(client: CounterfactualClient) -> None:
    m = client.attack(_img(PROBE), _img(REF), Spec(minimal_epsilon=True, seed=SEED))
    assert m.flipped and 0 < m.epsilon_used <= 8 / 255 + 1e-6 and m.linf <= m.epsilon_used + 1e-6
    assert math.isclose(m.spec_used.epsilon_tolerance, 1 / 255, rel_tol=1e-5)
    cw = client.attack(_img(PROBE), _img(REF), Spec(method=Spec.METHOD_CW, steps=30, seed=SEED))
    assert cw.spec_used.norm == Spec.NORM_L2 and cw.spec_used.cw_c == 1.0
    assert cw.flipped and cw.l2 > 0


TRANSFER_PAIRS = [(ID1[0], ID1[1]), (ID2[0], ID2[1]), (ID3[0], ID3[1])]


def test_transfer_to_dlib_is_crafted_on_the_surrogate_and_measured_on_the_target(client: CounterfactualClient) -> None:
    """The transfer attack succeeds on the model it attacks at the stated epsilon, and the target's outcome is
    its own measurement of the very image crafted on the surrogate, counted into a transfer rate.

    dlib's descriptor is the network the default model ports (cosine 0.9997), so a high rate here shows
    the port's fidelity, not transfer across architectures; the bound on an independent model is
    test_transfer_to_the_independent_model_is_measured_on_its_own_pipeline.
    """
    eps = 8 / 255
    dlib = common_pb2.ModelRef(name="dlib")
    outcomes: list[tuple[bool, bool, bool]] = []  # (surrogate flipped, target eligible, target flipped)
    for probe, ref in TRANSFER_PAIRS:
        white = client.attack(_img(probe), _img(ref), Spec(seed=SEED))
        resp = client.attack(_img(probe), _img(ref), Spec(seed=SEED, target_model=dlib))
        assert resp.target.name == "dlib" and resp.surrogate.name == DEFAULT_FR_MODEL
        # one crafted image: the target only judges what the surrogate's gradients made
        assert resp.adversarial.encoded == white.adversarial.encoded
        # the attack succeeds on the attacked model, within the stated budget
        assert white.same_before and white.flipped and 0 < resp.linf <= eps + 1e-6
        assert math.isclose(resp.spec_used.epsilon, eps, rel_tol=1e-6)
        surrogate_flipped = resp.surrogate_score_after >= white.rule.threshold
        assert surrogate_flipped and math.isclose(resp.surrogate_score_after, white.score_after, rel_tol=1e-5)
        # the target's numbers are its own: dlib's rule, dlib's scores (close to the port's, not equal to them)
        assert (resp.rule.metric, resp.rule.threshold) == ("l2", pytest.approx(0.6))
        assert 0 < abs(resp.score_before - white.score_before) < 0.1
        assert resp.same_before == (resp.score_before < resp.rule.threshold)
        assert resp.same_after == (resp.score_after < resp.rule.threshold)
        assert resp.flipped == (resp.same_before != resp.same_after)
        outcomes.append((surrogate_flipped, resp.same_before, resp.flipped))
        print(
            f"dlib: {resp.score_before:.3f} -> {resp.score_after:.3f} (flipped {resp.flipped}); "
            f"surrogate {white.score_before:.3f} -> {resp.surrogate_score_after:.3f}"
        )
    counted = [o for o in outcomes if o[0] and o[1]]
    assert counted, "no pair both flipped on the surrogate and accepted by dlib when clean"
    rate = sum(o[2] for o in counted) / len(counted)
    print(f"transfer to dlib at eps 8/255: {rate:.2f} over {len(counted)} pairs")
    assert 0 <= rate <= 1
    # the port is the same network: what flips it flips dlib on (almost) every pair
    assert rate >= 2 / 3


# The first five sample identities (sorted) whose first two photos HSE FaceRes accepts clean: chosen by the
# target's clean decision alone, never by how an attack fared on them.
HSE_PAIRS = [(sorted((SAMPLE / i).iterdir())[0], sorted((SAMPLE / i).iterdir())[1]) for i in
             ("id7201", "id7205", "id7206", "id7207", "id7210")]  # fmt: skip
HSE_STEPS = 5
# Bounds over the 5 pairs (measured here, 2-core CPU: PGD 4 / 5 flipped, cosine 0.519 -> 0.324 on average;
# noise 0 / 5, mean cosine drop 0.024 against the attack's 0.195, though another noise draw took the pair at
# 0.490 clean, 0.08 above the threshold, to 0.396). bench_transfer.py measured
# 20 / 31 (65 %) at 8/255 over CelebA pairs (20 steps) and 0 / 31 for noise of the same size. At least 2 of 5:
# if the attack transferred as in the bench, a random set of 5 pairs would fall below that about 1 time in 20
# (binomial, p = 0.65), and these fixed pairs sit two pairs above it, room for another device's numerics. An
# attack that does nothing, or noise, flips at most the one marginal pair, so it fails the bound and the margin.
MIN_HSE_FLIPPED = 2
MAX_NOISE_FLIPPED = 1


@pytest.fixture(scope="module")
def hse() -> FacePipeline:
    """HSE FaceRes in the test's own process: the reference the service's numbers for it are held to."""
    return second_fr_pipeline("cpu")


def _pixels(path_or_png: Path | np.ndarray) -> torch.Tensor:
    arr = path_or_png if isinstance(path_or_png, np.ndarray) else np.asarray(Image.open(path_or_png).convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()


def test_transfer_to_the_independent_model_is_measured_on_its_own_pipeline(
    client: CounterfactualClient, hse: FacePipeline, second_fr_registered: str
) -> None:
    """PGD crafted on the served model at 8/255 (5 steps, the whole budget) transfers to HSE FaceRes, another
    architecture, training set and loss: the service scores the 8-bit image with HSE's own pipeline, its
    five-point 224-px alignment (the clean probe's landmarks) and its calibrated cosine rule. The scores are
    checked against HSE run here on the returned PNG; the rate over 5 pairs must clear a bound that an attack
    doing nothing, or random sign noise of the same size, does not (see MIN_HSE_FLIPPED)."""
    eps = 8 / 255
    rule = hse.info.rule
    target = common_pb2.ModelRef(name=SECOND_FR_MODEL)
    spec = Spec(seed=SEED, steps=HSE_STEPS, full_budget=True, target_model=target)
    gen = torch.Generator().manual_seed(SEED)
    eligible = flipped = noise_flipped = 0
    drops: list[tuple[float, float]] = []
    for k, (probe, ref) in enumerate(HSE_PAIRS):
        resp = client.attack(_img(probe), _img(ref), spec)
        assert (resp.target.name, resp.target.version) == (SECOND_FR_MODEL, second_fr_registered)
        assert (resp.surrogate.name, resp.surrogate.version) == (DEFAULT_FR_MODEL, "1")
        if k == 0:  # one crafted image: the target only judges what the surrogate's gradients made
            white = client.attack(_img(probe), _img(ref), Spec(seed=SEED, steps=HSE_STEPS, full_budget=True))
            assert resp.adversarial.encoded == white.adversarial.encoded
            assert math.isclose(resp.surrogate_score_after, white.score_after, rel_tol=1e-5)
        # the whole budget was spent, and the attack succeeded on the model it attacked
        assert resp.spec_used.full_budget and resp.steps_used == HSE_STEPS
        assert 7 / 255 - 1e-6 <= resp.linf <= eps + 1e-6
        assert resp.surrogate_score_after >= DLIB_L2_RULE.threshold
        # HSE's rule and HSE's numbers, recomputed here on the returned image with the clean probe's landmarks
        assert (resp.rule.metric, resp.rule.accept_below) == ("cosine", False)
        assert resp.rule.threshold == pytest.approx(rule.threshold)
        clean_face, ref_face = hse.analyze([_pixels(probe), _pixels(ref)])
        assert clean_face is not None and ref_face is not None
        t_ref, landmarks = ref_face.template[None], clean_face.face.landmarks
        with torch.no_grad():
            t_adv = hse.template_from_image(_pixels(_png(resp.adversarial)), landmarks)[None]
            clean = _pixels(probe)
            sign = torch.randint(0, 2, clean.shape, generator=gen).float() * 2 - 1
            noisy = (clean + sign * 8).clamp(0, 255)  # uniform random sign noise of the same 8/255, 8-bit
            t_noise = hse.template_from_image(noisy, landmarks)[None]
        before = float(rule.score(clean_face.template[None], t_ref)[0])
        after = float(rule.score(t_adv, t_ref)[0])
        noise = float(rule.score(t_noise, t_ref)[0])
        assert resp.score_before == pytest.approx(before, abs=1e-3)
        assert resp.score_after == pytest.approx(after, abs=1e-3)
        assert resp.same_before == (before > rule.threshold) and resp.same_after == (after > rule.threshold)
        assert resp.flipped == (resp.same_before != resp.same_after)
        assert resp.same_before, f"{probe.parent.name}: HSE no longer accepts this pair clean ({before:.3f})"
        eligible += 1
        flipped += not resp.same_after
        noise_flipped += noise <= rule.threshold
        drops.append((before - after, before - noise))
        print(
            f"HSE {probe.parent.name}: {before:.3f} -> attacked {after:.3f} (flipped {resp.flipped}), "
            f"noise {noise:.3f}; surrogate L2 {resp.surrogate_score_after:.3f}"
        )
    mean_drop = [sum(d[i] for d in drops) / len(drops) for i in (0, 1)]
    print(
        f"transfer to {SECOND_FR_MODEL} at 8/255: {flipped}/{eligible} flipped (noise {noise_flipped}/{eligible}); "
        f"mean cosine drop attack {mean_drop[0]:.3f}, noise {mean_drop[1]:.3f}"
    )
    assert flipped >= MIN_HSE_FLIPPED and noise_flipped <= MAX_NOISE_FLIPPED
    assert flipped >= noise_flipped + 2  # the attack's direction transfers, not any perturbation of its size
    assert mean_drop[0] > 2 * mean_drop[1]


def _table(resp: counterfactual_pb2.ExplainResponse) -> list[tuple[str, float, float, float]]:
    return [(s.attribute, s.s_a, s.delta, s.delta_reference) for s in resp.significance]


def test_explain_is_deterministic_under_a_seed(client: CounterfactualClient) -> None:
    spec = Spec(seed=SEED, random_start=True)
    t = time.perf_counter()
    first = client.explain(_img(PROBE), _img(REF), spec, n_random=4)
    print(f"Explain in {time.perf_counter() - t:.2f} s")
    second = client.explain(_img(PROBE), _img(REF), spec, n_random=4)
    a, b = _table(first), _table(second)
    assert len(a) >= 50 and [x[0] for x in a] == [x[0] for x in b]
    np.testing.assert_array_equal(np.array([x[1:] for x in a]), np.array([x[1:] for x in b]))
    assert first.attack.adversarial.encoded == second.attack.adversarial.encoded
    assert first.attack.flipped
    rows = list(first.significance)
    finite = [r.s_a for r in rows if math.isfinite(r.s_a)]
    assert finite == sorted(finite, reverse=True)
    ranked = [r for r in rows if not math.isnan(r.s_a)]
    assert [r.attribute for r in rows[: len(ranked)]] == [r.attribute for r in ranked]  # NaN last
    for r in rows:
        assert r.significant == (not math.isnan(r.s_a) and r.s_a > 1)
        if math.isfinite(r.s_a) and r.delta_reference > 0:
            assert math.isclose(r.s_a, r.delta / r.delta_reference, rel_tol=1e-4)
        assert r.group
    assert any(r.significant for r in rows)
    assert sum(math.isfinite(r.delta_control) for r in rows) >= len(rows) // 2
    assert sum(r.attribute.startswith("lbp_r") for r in rows) == 49
    for name in ("decoded_probe", "decoded_reference", "decoded_adversarial"):
        assert _png(getattr(first, name)).shape == (OUT_SIZE, OUT_SIZE, 3)
    assert _png(first.lbp_significance_map).shape == (150, 150, 3)
    assert (first.decoder.name, first.decoder.version) == (DEFAULT_DECODER_MODEL, "1")
    top = ", ".join(f"{r.attribute} {r.s_a:.2f}" for r in rows[:10])
    print(f"top-10 s_a (PGD, demo decoder): {top}")
    # the served probe set's attributes are explained too
    assert {"eyeglasses", "smiling"} <= {r.attribute for r in rows}
    assert all(r.group == "accessory" for r in rows if r.attribute in ("eyeglasses", "smiling"))
    # a subset of attributes, in the catalogue's terms
    names = ["yaw", "age", "lbp_r3_c3", "eyeglasses"]
    sub = client.explain(_img(PROBE), _img(REF), spec, attributes=names, n_random=1)
    assert sorted(s.attribute for s in sub.significance) == sorted(names)


def test_defence_report_streams_progress_then_the_result(client: CounterfactualClient) -> None:
    pairs = [
        image_pair(ID1[0], ID1[1], True, "g1"),
        image_pair(ID2[0], ID2[1], True, "g2"),
        image_pair(ID1[0], ID2[0], False, "i1"),
        image_pair(ID3[0], ID4[0], False, "i2"),
    ]
    pairs.append(counterfactual_pb2.ImagePair(a=_blank_png(), b=_img(ID1[0]), genuine=False, id="noface"))
    t = time.perf_counter()
    events = list(client.defence_report(pairs, Spec(seed=SEED)))
    print(f"DefenceReport on 5 pairs in {time.perf_counter() - t:.2f} s")
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}
    stages = [e.progress.stage for e in events[:-1]]
    assert stages.index("attack") < stages.index("defence") < stages.index("roc")
    r = events[-1].result
    assert r.n_pairs == 4 and len(r.skipped) == 1
    assert (r.skipped[0].index, r.skipped[0].id) == (4, "noface")
    assert r.skipped[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "no face" in r.skipped[0].error.message
    for curve in (r.roc_clean, r.roc_without, r.roc_with):
        fpr = [p.fpr for p in curve]
        assert fpr == sorted(fpr) and curve[0].fpr == curve[0].tpr == 0 and curve[-1].fpr == curve[-1].tpr == 1
    for auc in (r.auc_clean, r.auc_without, r.auc_with):
        assert 0 <= auc <= 1
    assert r.auc_clean == 1.0  # the clean sample pairs separate perfectly
    assert r.attack_success_rate >= 0.5 and r.auc_without < r.auc_clean
    assert 0 <= r.attack_success_rate_with <= 1
    assert (r.target.name, r.decoder.name) == (DEFAULT_FR_MODEL, DEFAULT_DECODER_MODEL)
    assert r.spec_used.method == Spec.METHOD_PGD
    print(
        f"AUC clean {r.auc_clean:.3f}, attacked {r.auc_without:.3f}, attacked+decoded {r.auc_with:.3f}; "
        f"success {r.attack_success_rate:.2f} -> {r.attack_success_rate_with:.2f}"
    )


DEFENCE_IDS = [ID1, ID2, ID3, ID4, ID5]
# AUC margin; measured on the session's demo decoder (see test_decoding_raises_the_attacked_auc)
DEFENCE_MARGIN = 0.1


def _defence_pairs() -> list[counterfactual_pb2.ImagePair]:
    """Five genuine pairs (two photos of one person) and five impostor pairs (third photos of two people)."""
    pairs = [image_pair(i[0], i[1], True, f"g{k}") for k, i in enumerate(DEFENCE_IDS)]
    for k, (a, b) in enumerate(zip(DEFENCE_IDS, DEFENCE_IDS[1:] + DEFENCE_IDS[:1], strict=True)):
        pairs.append(image_pair(a[2], b[2], False, f"i{k}"))
    return pairs


def test_decoding_raises_the_attacked_auc(client: CounterfactualClient) -> None:
    """DFD §4.3.3: the attack drives the verification AUC of the attacked pairs down; passing the attacked
    template through the decoder and embedding the face again must raise it by a margin, and should bring
    it above chance (xfail with the measured AUCs where it does not).

    Measured here (10 pairs, demo decoder): PGD 8/255 with a random start, seeds 5 and 11: AUC clean 1.000,
    attacked 0.000, attacked + decoded 0.240 (success 1.00 -> 0.50). CW-L2, 30 steps, does not meet even the
    first claim (attacked 0.280, attacked + decoded 0.200, 455 s) and is left out: reported, not asserted.
    """
    pairs = _defence_pairs()
    runs = {
        "pgd seed 5": Spec(seed=SEED, random_start=True),
        "pgd seed 11": Spec(seed=11, random_start=True),
    }
    results = {}
    for name, spec in runs.items():
        t = time.perf_counter()
        r = list(client.defence_report(pairs, spec))[-1].result
        results[name] = r
        print(
            f"defence [{name}] {r.n_pairs} pairs in {time.perf_counter() - t:.1f} s: AUC clean {r.auc_clean:.3f}, "
            f"attacked {r.auc_without:.3f}, attacked+decoded {r.auc_with:.3f}; "
            f"success {r.attack_success_rate:.2f} -> {r.attack_success_rate_with:.2f}"
        )
    below_chance = []
    for name, r in results.items():
        assert r.n_pairs == 10 and not r.skipped, name
        assert r.attack_success_rate >= 0.8 and r.auc_without < 0.5, name  # the attack worked
        # decoding undoes part of every attack: the attacked pairs separate better after E(D(z_adv))
        assert r.auc_with >= r.auc_without + DEFENCE_MARGIN, name
        if r.auc_with < 0.5 + DEFENCE_MARGIN:
            below_chance.append(f"{name}: {r.auc_with:.3f}")
    if below_chance:
        # DFD Fig. 13's claim, above chance by a margin, does not hold here for every attack (measured:
        # PGD 8/255 AUC 0.000 -> 0.240 on two seeds, as bench/results/counterfactual-cpu.json's 60 pairs
        # with the shipped decoder); reported, not asserted, until a decoder or attack setting meets it.
        pytest.xfail(
            f"decoding does not bring the attacked AUC above 0.5 + {DEFENCE_MARGIN}: {', '.join(below_chance)}"
        )


def test_limits_and_bad_inputs_have_their_codes(svc: RunningService, client: CounterfactualClient) -> None:
    probe, ref = _img(PROBE), _img(REF)

    def attack(spec: Any = None, p: Any = probe, r: Any = ref) -> counterfactual_pb2.AttackRequest:
        return counterfactual_pb2.AttackRequest(probe=p, reference=r, spec=spec or Spec())

    too_many = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    t = time.perf_counter()
    err = _rejected(svc, "Attack", attack(Spec(steps=10**6)))
    assert err.code() in too_many and "steps" in (err.details() or "")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "FACEXPLAIN_MAX_ATTACK_STEPS" in (err.details() or "")
    assert time.perf_counter() - t < 5  # refused before any work
    err = _rejected(svc, "Attack", attack(Spec(epsilon=1e6)))
    assert err.code() in too_many and "epsilon" in (err.details() or "")
    err = _rejected(svc, "Attack", attack(Spec(epsilon=0.5)))  # valid, but over the server's 32/255
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "epsilon" in (err.details() or "")
    err = _rejected(svc, "Attack", attack(Spec(method=Spec.METHOD_CW, norm=Spec.NORM_L2, epsilon=1e6)))
    assert err.code() in too_many
    err = _rejected(
        svc, "Explain", counterfactual_pb2.ExplainRequest(probe=probe, reference=ref, spec=Spec(steps=10**6))
    )
    assert err.code() in too_many
    cases: list[tuple[Any, grpc.StatusCode, str]] = [
        (Spec(steps=-1), grpc.StatusCode.INVALID_ARGUMENT, "steps"),
        (Spec(epsilon=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        (Spec(method=Spec.METHOD_CW, norm=Spec.NORM_LINF), grpc.StatusCode.INVALID_ARGUMENT, "L2"),
        (Spec(method=Spec.METHOD_CW, minimal_epsilon=True), grpc.StatusCode.INVALID_ARGUMENT, "minimal"),
        (Spec(surrogate_model=common_pb2.ModelRef(name="dlib")), grpc.StatusCode.FAILED_PRECONDITION, "gradients"),
        (Spec(target_model=common_pb2.ModelRef(name="no-such-model")), grpc.StatusCode.NOT_FOUND, SECOND_FR_MODEL),
        (Spec(target_model=common_pb2.ModelRef(name=SECOND_FR_MODEL, version="999")), grpc.StatusCode.NOT_FOUND, "999"),
        (
            Spec(surrogate_model=common_pb2.ModelRef(name=SECOND_FR_MODEL)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "target",
        ),
        (Spec(method=Spec.METHOD_CW, full_budget=True), grpc.StatusCode.INVALID_ARGUMENT, "full_budget"),
        (Spec(minimal_epsilon=True, full_budget=True), grpc.StatusCode.INVALID_ARGUMENT, "full_budget"),
    ]
    for spec, code, word in cases:
        err = _rejected(svc, "Attack", attack(spec))
        assert err.code() == code and word in (err.details() or ""), (spec, err.code(), err.details())
    err = _rejected(svc, "Attack", attack(p=common_pb2.Image(encoded=b"not an image")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "probe" in (err.details() or "")
    err = _rejected(svc, "Attack", attack(p=common_pb2.Image()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = _rejected(svc, "Attack", attack(r=_blank_png()))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "reference: no face found" in (err.details() or "")
    err = _rejected(
        svc, "Explain", counterfactual_pb2.ExplainRequest(probe=probe, reference=ref, attributes=["no_such_attribute"])
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no_such_attribute" in (err.details() or "")
    err = _rejected(svc, "Explain", counterfactual_pb2.ExplainRequest(probe=probe, reference=ref, n_random=10**4))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    genuine_only = [counterfactual_pb2.ImagePair(a=probe, b=ref, genuine=True)]
    err = _rejected(svc, "DefenceReport", counterfactual_pb2.DefenceRequest(pairs=genuine_only))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "impostor" in (err.details() or "")
    many = [counterfactual_pb2.ImagePair(a=probe, b=ref, genuine=k % 2 == 0) for k in range(13)]
    err = _rejected(svc, "DefenceReport", counterfactual_pb2.DefenceRequest(pairs=many))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    two = [counterfactual_pb2.ImagePair(a=probe, b=ref, genuine=k == 0) for k in range(2)]
    hse_target = Spec(target_model=common_pb2.ModelRef(name=SECOND_FR_MODEL))
    err = _rejected(svc, "DefenceReport", counterfactual_pb2.DefenceRequest(pairs=two, spec=hse_target))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "own alignment" in (err.details() or "")
    # still serving
    assert client.attack(probe, ref, Spec(seed=SEED)).flipped


def test_a_deadline_stops_a_running_attack_and_the_server_keeps_serving(
    svc: RunningService, client: CounterfactualClient
) -> None:
    # I-FGSM with a budget far too small to flip runs all its 1000 steps (about a minute) unless stopped
    spec = Spec(method=Spec.METHOD_IFGSM, epsilon=0.05 / 255, steps=1000)
    before = svc.log_text().count('"DEADLINE_EXCEEDED"')
    t = time.perf_counter()
    err = _rejected(
        svc, "Attack", counterfactual_pb2.AttackRequest(probe=_img(PROBE), reference=_img(REF), spec=spec), timeout=3
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the server itself stopped the attack soon after the deadline (it logs the RPC's status when it ends)
    _wait(lambda: svc.log_text().count('"DEADLINE_EXCEEDED"') > before, 20, "the server to stop the attack")
    assert time.perf_counter() - t < 20
    assert client.attack(_img(PROBE), _img(REF), Spec(seed=SEED), timeout=60).flipped


def test_cli_explain_and_defence_write_their_files(svc: RunningService, tmp_path: Path) -> None:
    out = tmp_path / "explain"
    cmd = [sys.executable, "-m", "cli.main", "counterfactual"]
    proc = subprocess.run(
        [*cmd, "explain", str(PROBE), str(REF), "--target", svc.address, "--out", str(out), "--seed", "3",
         "--attributes", "yaw", "age", "skin_colour", "lbp_r3_c3", "--n-random", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("adversarial", "perturbation", "decoded_probe", "decoded_reference", "decoded_adversarial", "lbp_map"):
        assert (out / f"{name}.png").stat().st_size > 0
    with (out / "significance.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["attribute"] for r in rows) == ["age", "lbp_r3_c3", "skin_colour", "yaw"]
    data = json.loads((out / "explain.json").read_text())
    assert data["attack"]["flipped"] is True and len(data["significance"]) == 4
    assert "adversarial" not in data["attack"]  # images are files, not JSON
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "a,b,genuine,id\n"
        f"{ID1[0]},{ID1[1]},1,g1\n{ID2[0]},{ID2[1]},1,g2\n{ID1[0]},{ID2[0]},0,i1\n{ID3[0]},{ID4[0]},0,i2\n"
    )
    proc = subprocess.run(
        [*cmd, "defence", "--pairs", str(pairs), "--target", svc.address, "--out", str(tmp_path / "defence"),
         "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "AUC clean" in proc.stdout
    result = json.loads((tmp_path / "defence" / "defence.json").read_text())
    assert result["n_pairs"] == 4
    assert (tmp_path / "defence" / "roc.csv").read_text().startswith("curve,fpr,tpr,threshold")
    # bad input to the CLI: exit 2; refused by the service: exit 4
    missing = ["defence", "--pairs", str(tmp_path / "missing.csv"), "--target", svc.address, "--out", str(tmp_path)]
    bad = subprocess.run([*cmd, *missing], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    huge = ["attack", str(PROBE), str(REF), "--steps", "1000000", "--target", svc.address, "--out", str(tmp_path)]
    refused = subprocess.run([*cmd, *huge], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 4 and "RESOURCE_EXHAUSTED" in refused.stderr
