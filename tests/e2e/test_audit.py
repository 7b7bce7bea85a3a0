"""`facexplain audit` end to end against the five services of conftest.py: on loopback (TLS, bearer tokens,
the session's registry) or a deployed staging (FACEXPLAIN_E2E_TARGETS), two runs, Chromium.

On loopback the registry holds the default FR model as ``facexplain-fr-dlib128`` v1 and the demo decoder
trained for it as ``facexplain-dfd-dlib128`` v1, both champion, and conftest.py starts five services
following both aliases (the shared embedding fixture serves local weights, which the audit rightly
refuses); in staging, what `facexplain staging up` registered. The CLI runs twice with the same seed on
the bundled CelebA sample faces in the CelebA layout (images/ + labels.csv with their labels from the
shared CelebA subset, so the Smiling / Eyeglasses centroids are attempted); the report must name the
versions behind ``champion`` in the registry the services follow; index.html is rendered in headless
Chromium (Debian's ``chromium``; missing is a failure, not a skip) with console capture and a screenshot.

On loopback the services run as a deployment should: TLS with a certificate of a CA made at test time,
and a tokens file; the audit reaches them with ``--tls-ca-file`` and the auditor's token in
``FACEXPLAIN_TOKEN`` (issue 23: "the whole audit runs end to end with TLS and tokens on"). A staging
serves plaintext without tokens, so the two tests that need the loopback processes skip there.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from cli.launcher import REPO, RunningService, free_port, start_service
from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL, THIRD_FR_MODEL
from sdk.audit_report import SECTIONS, strip_timestamps
from sdk.client import ClientSecurity
from tests.conftest import shared_data_dir
from tests.e2e.conftest import SERVICES, Deployment, service_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

FR = f"{DEFAULT_FR_MODEL}@champion"
SEED = 3
CHROMIUM = Path("/usr/bin/chromium")
AUDIT_ARGS = [
    "--max-faces", "12", "--max-reconstructions", "4", "--ssi-max-pairs", "8", "--ssi-components", "2",
    "--bootstrap", "5", "--max-pairs", "20", "--explain-pairs", "1", "--attack-steps", "5",
]  # fmt: skip


@pytest.fixture(scope="module")
def targets(deployment: Deployment) -> list[str]:
    return deployment.target_args()


@pytest.fixture(scope="module")
def served(deployment: Deployment) -> dict[str, str]:
    """The versions behind ``champion`` in the registry the services follow: what the audit must name."""
    from registry import CHAMPION, Registry

    reg = Registry(deployment.registry_uri, timeout_s=30, max_retries=2)
    return {m: reg.resolve(m, CHAMPION).version for m in (DEFAULT_FR_MODEL, DEFAULT_DECODER_MODEL)}


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/sample's CelebA faces in the CelebA layout, with their labels from the shared subset."""
    root = tmp_path_factory.mktemp("audit-data")
    (root / "images").mkdir()
    files = sorted((REPO / "data" / "sample" / "celeba").glob("id*/*.jpg"))
    assert len(files) == 30
    with open(shared_data_dir() / "celeba_subset" / "labels.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        labels = {row["file"]: row for row in reader}
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for f in files:
            shutil.copy(f, root / "images" / f.name)
            w.writerow(labels[f.name])
    return root


def _audit(
    out: Path, data: Path, targets: list[str], *extra: str, dep: Deployment | None = None, timeout: float = 1500
) -> subprocess.CompletedProcess:
    """The audit CLI; against ``dep`` with its TLS CA (``--tls-ca-file``) and token (``FACEXPLAIN_TOKEN``)
    when it has them (the loopback services do, a staging serves plaintext)."""
    cmd = [sys.executable, "-m", "cli.main", "audit", "--fr-model", FR, "--data", str(data)]
    cmd += ["--out", str(out), "--seed", str(SEED), "--targets", *targets, *AUDIT_ARGS, *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEXPLAIN_")}
    if dep is not None and dep.ca_file is not None:
        cmd += ["--tls-ca-file", str(dep.ca_file)]
    if dep is not None and dep.token is not None:
        env["FACEXPLAIN_TOKEN"] = dep.token
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(
    targets: list[str], sample_data: Path, deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    out = []
    for i in range(2):
        folder = tmp_path_factory.mktemp(f"audit-run{i}")
        t0 = time.perf_counter()
        proc = _audit(folder, sample_data, targets, dep=deployment)
        seconds = time.perf_counter() - t0
        assert proc.returncode == 0, f"audit failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        print(f"audit run {i}: {seconds:.0f} s")
        out.append({"dir": folder, "json": json.loads((folder / "audit.json").read_text()), "proc": proc})
    return out


def _numbers(d: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(d, int | float) and not isinstance(d, bool):
        yield path, d


def test_report_content(runs: list[dict[str, Any]], sample_data: Path, served: dict[str, str]) -> None:
    r = runs[0]["json"]
    folder: Path = runs[0]["dir"]
    for key in SECTIONS:
        assert key in r, f"section {key} missing"
        assert r[key]["started"] <= r[key]["finished"]
    for path, v in _numbers(r):
        assert math.isfinite(v), f"{path} is not finite: {v}"
    # progress bars went to stderr, one per step
    for desc in ("reconstructions", "ssi traversals", "scoring pairs", "counterfactuals"):
        assert desc in runs[0]["proc"].stderr

    # (a) every model with name and version: the ones behind champion in the registry the services follow
    # (v1 of each on loopback; in staging, what `registry register-defaults` registered there)
    fr_v, dec_v = served[DEFAULT_FR_MODEL], served[DEFAULT_DECODER_MODEL]
    models = r["models"]
    assert models["fr_model"] == {"name": DEFAULT_FR_MODEL, "alias": "champion", "version": fr_v}
    for name in SERVICES:
        st = models["services"][name]
        assert st["registry_reachable"] and st["models"], name
        assert all(m["name"] and m["version"] for m in st["models"]), name
        kinds = {(m["kind"], m["name"], m["version"]) for m in st["models"] if m["serving"]}
        assert ("embedder", DEFAULT_FR_MODEL, fr_v) in kinds, name
        if name != "embedding":
            assert ("decoder", DEFAULT_DECODER_MODEL, dec_v) in kinds, name
    # data manifest
    assert re.fullmatch(r"[0-9a-f]{64}", r["data"]["manifest_sha256"])
    assert r["data"]["n_images"] == 30 and len(r["data"]["audited"]) == 12
    assert {"Smiling", "Eyeglasses"} <= set(r["data"]["labels"])

    # (b) reconstructions with the service's metrics and a grid
    rec = r["reconstructions"]
    assert rec["summary"]["n"] >= 3 and rec["decoder"]["version"] == dec_v
    assert all(f["psnr"] > 5 and -1 <= f["ssim"] <= 1 and -1 <= f["identity_cosine"] <= 1 for f in rec["faces"])
    assert (folder / rec["grid"]).stat().st_size > 1000

    # (c) one SSI set per region, each with a decoded traversal strip
    ssi = r["ssi"]
    assert sorted(s["target"] for s in ssi["sets"]) == ["eyes", "lower_face", "nose"]
    for s in ssi["sets"]:
        assert s["method"] == "ssi" and s["seed"] == SEED and len(s["directions"]) == 2
        assert s["fr_model"]["version"] == fr_v and s["set_id"] and re.fullmatch(r"[0-9a-f]{64}", s["sha256"])
        t = s["traversal"]
        assert len(t["alphas"]) == 5 and (folder / t["strip"]).stat().st_size > 1000

    # (d) label directions: each made (with a strip) or skipped with a reason
    labels = {d["label"]: d for d in r["labels"]["directions"]}
    assert set(labels) == {"Smiling", "Eyeglasses", "yaw"}
    for d in labels.values():
        assert bool(d.get("skipped")) != ("set" in d), d
        if "set" in d:
            assert (folder / d["traversal"]["strip"]).is_file()
    assert "set" in labels["yaw"], labels["yaw"].get("skipped")

    # (e) importance: seeded, with the shuffled control, chart and CSV
    imp = r["importance"]
    assert imp["seed"] == SEED and imp["n_items"] >= 10 and len(imp["rows"]) > 20
    assert any(row["control_mi"] > 0 for row in imp["rows"])
    assert (folder / imp["chart"]).stat().st_size > 5000 and (folder / imp["csv"]).is_file()

    # (f) mirror invariance: dlib's model finds a face and its mirror more alike than two photos of one person
    mi = r["mirror"]["summary"]
    assert mi["n_faces"] >= 10 and mi["same_person_pairs"] > 0 and mi["other_person_pairs"] > 0
    assert mi["mirror_cosine_mean"] > mi["same_person_cosine_mean"] > mi["other_person_cosine_mean"]
    assert "cannot keep the sign of yaw" in r["mirror"]["reading"]

    # (g) pairs scored; the worst genuine and best impostor pair explained
    cf = r["counterfactuals"]
    assert cf["n_pairs"]["genuine"] > 0 and cf["n_pairs"]["impostor"] > 0
    kinds = [x["kind"] for x in cf["explanations"]]
    assert kinds == ["worst genuine", "best impostor"]
    genuine = [p for p in cf["pairs"] if p["genuine"]]
    assert cf["explanations"][0]["score_before"] is not None
    worst = min(p["score"] for p in genuine)
    assert cf["explanations"][0]["a"] == next(p["a"] for p in genuine if p["score"] == worst)
    for x in cf["explanations"]:
        assert x["seed"] == SEED and x["n_attributes"] > 0 and x["top"]
        assert all((folder / p).stat().st_size > 100 for p in x["images"].values())

    # the HTML names every section and references only files that exist, no external URLs, no scripts
    page = (folder / "index.html").read_text()
    for key in SECTIONS:
        assert f'id="{key}"' in page
    assert "<script" not in page.lower() and "url(" not in page
    for src in re.findall(r'(?:src|href)="([^"#]+)"', page):
        assert not re.match(r"[a-z]+:", src), f"index.html references an external URL {src}"
        assert (folder / src).is_file(), f"index.html references a missing file {src}"


def test_same_seed_same_json(runs: list[dict[str, Any]]) -> None:
    a, b = (strip_timestamps(r["json"]) for r in runs)
    if a != b:
        diffs = [p for (p, x), (_, y) in zip(_numbers(a), _numbers(b), strict=False) if x != y][:20]
        pytest.fail(f"audit.json differs between two runs with seed {SEED}; first differing numbers: {diffs}")
    # and the timestamps were there to strip
    assert runs[0]["json"]["audit"]["started"] and "loaded_at" in json.dumps(runs[0]["json"])


def test_every_audit_call_was_authenticated(runs: list[dict[str, Any]], deployment: Deployment) -> None:
    """The access logs show the audit's calls as the auditor's, each answered (TLS and tokens were on)."""
    if deployment.deployed:
        pytest.skip("reads the loopback processes' access logs; a staging serves without tokens")
    for name, svc in deployment.processes.items():
        calls = [json.loads(line) for line in svc.log_text().splitlines() if '"logger": "facexplain.access"' in line]
        audit_calls = [c for c in calls if c.get("principal") == "auditor"]
        assert len(audit_calls) >= 2, f"{name}: no call of the auditor in the access log"
        refused = [c for c in calls if c.get("code") in ("UNAUTHENTICATED", "PERMISSION_DENIED")]
        assert not refused, f"{name}: calls refused: {refused[:3]}"


def test_html_renders_in_chromium(runs: list[dict[str, Any]], tmp_path: Path) -> None:
    from scripts.report_screenshot import render

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (scripts/setup_system.sh does, as root)")
    shot = tmp_path / "report.png"
    console = render(runs[0]["dir"] / "index.html", shot)
    assert not console, "console messages while rendering the report:\n" + "\n".join(console)
    assert shot.is_file() and shot.stat().st_size > 20_000, "the screenshot is missing or blank"
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        colours = im.convert("RGB").resize((64, 100)).getcolors(64 * 100)
        assert colours is not None and len(colours) > 50, "the screenshot is nearly uniform"


def test_unreachable_service_is_a_clear_error(sample_data: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = _audit(tmp_path / "r", sample_data, [f"embedding=127.0.0.1:{port}"], "--connect-timeout", "2", timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert f"the embedding service at 127.0.0.1:{port} is not reachable" in proc.stderr


def test_registry_not_reachable_is_a_clear_error(
    targets: list[str], deployment: Deployment, sample_data: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A service that follows no registry, or one that cannot reach it, stops the audit with exit 3."""
    if deployment.deployed:
        pytest.skip("starts misconfigured embedding services of its own beside the loopback ones")
    pki = request.getfixturevalue("pki")
    others = [t for t in targets if not t.startswith("embedding=")]
    down = f"http://127.0.0.1:{free_port()}"
    envs = {
        "none": {**service_env("", tmp_path / "cache-none", pki), "FACEXPLAIN_REGISTRY_URI": ""},
        "down": {**service_env(down, tmp_path / "cache-down", pki), "FACEXPLAIN_REGISTRY_TIMEOUT_S": "1"},
    }

    def start(case: str) -> RunningService:  # both fall back to the local weights
        (tmp_path / case).mkdir()
        return start_service("embedding", tmp_path / case, env=envs[case], timeout=300)

    with ThreadPoolExecutor(2) as pool:
        svc = dict(zip(envs, pool.map(start, envs), strict=True))
    try:
        none, unreachable = (
            _audit(
                tmp_path / f"r-{case}",
                sample_data,
                [*others, f"embedding={svc[case].address}"],
                dep=deployment,
                timeout=120,
            )
            for case in ("none", "down")
        )
    finally:
        for s in svc.values():
            assert s.stop() == 0
    assert none.returncode == 3, none.stderr
    assert "the embedding service follows no model registry" in none.stderr
    assert unreachable.returncode == 3, unreachable.stderr
    assert f"the embedding service cannot reach the model registry at {down}" in unreachable.stderr


def test_pairs_file_and_targets(sample_data: Path, tmp_path: Path) -> None:
    from cli.audit import parse_targets
    from sdk.audit import AuditError, load_faces, read_pairs

    faces, names, manifest = load_faces(sample_data)
    assert len(faces) == 30 and "Smiling" in names and len(manifest) == 64
    a, b, c = faces[0].rel, faces[1].rel, faces[5].rel
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"a,b,genuine\n{a},{b},1\nimages/{a},{c},false\n")
    got = read_pairs(pairs, sample_data, faces)
    assert [(x.rel, y.rel, g) for x, y, g in got] == [(a, b, True), (a, c, False)]
    pairs.write_text(f"{a},missing.jpg,1\n")
    with pytest.raises(AuditError, match=r"missing\.jpg"):
        read_pairs(pairs, sample_data, faces)
    t = parse_targets(["10.0.0.5"])
    assert t["embedding"] == "10.0.0.5:50051" and t["counterfactual"] == "10.0.0.5:50055"
    t = parse_targets(["decoding=h:1", "attributes=h:2"])
    assert t["decoding"] == "h:1" and t["attributes"] == "h:2" and t["embedding"] == "127.0.0.1:50051"


def test_sdk_facade_reaches_all_five_services(deployment: Deployment, served: dict[str, str]) -> None:
    import grpc

    from sdk.client import AttributesClient, EmbeddingClient, Facexplain

    addresses = deployment.addresses
    if deployment.token is not None:  # with tokens on, a caller without one is refused
        ca = str(deployment.ca_file or "")
        with Facexplain(targets=addresses, timeout=30, security=ClientSecurity(ca_file=ca)) as anonymous:
            with pytest.raises(grpc.RpcError) as refused:
                anonymous.embedding.model_status()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Facexplain(targets=addresses, timeout=30, security=deployment.security) as fx:
        assert isinstance(fx.embedding, EmbeddingClient) and fx.embedding is fx.embedding  # opened once
        assert isinstance(fx.attributes, AttributesClient)
        status = fx.model_status()
        assert set(status) == {"embedding", "decoding", "directions", "attributes", "counterfactual"}
        for name, resp in status.items():
            fr = [m for m in resp.models if m.kind == "embedder" and m.model.name == "facexplain-fr-dlib128"]
            want = served[DEFAULT_FR_MODEL]
            assert fr and fr[0].model.version == want, f"{name} does not serve the FR model v{want}: {resp}"
    with pytest.raises(ValueError, match="unknown service"):
        Facexplain(targets={"embeding": "127.0.0.1:1"})
    assert Facexplain("10.0.0.9").targets["counterfactual"] == "10.0.0.9:50055"


# -- the second judge: an independent FR model scores every reconstruction ---------------------------------


@pytest.fixture(scope="module")
def judge_service(
    deployment: Deployment, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    """An embedding service serving the judging FR model, faceplugin's MobileFaceNet, as the demo does
    (``register-defaults`` put it in the session's registry), with the loopback deployment's TLS and tokens."""
    if deployment.deployed:
        pytest.skip("the staging serves no second FR model")
    request.getfixturevalue("third_fr_registered")
    work = tmp_path_factory.mktemp("judge")
    env = service_env(deployment.registry_uri, work / "cache", request.getfixturevalue("pki"))
    svc = start_service("embedding", work, env={**env, "FACEXPLAIN_MODEL_NAME": THIRD_FR_MODEL}, timeout=600)
    yield svc
    assert svc.stop() == 0, svc.log_text()[-2000:]


def _judged_reconstructions(
    deployment: Deployment, judge: str, data: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """The audit's models and reconstructions steps alone (in-process, through the SDK) with ``judge``."""
    from sdk.audit import Audit, AuditConfig, AuditInputs, load_faces, sample
    from sdk.client import ENV_TLS_CA_FILE, ENV_TOKEN

    monkeypatch.setenv(ENV_TLS_CA_FILE, str(deployment.ca_file or ""))
    monkeypatch.setenv(ENV_TOKEN, deployment.token or "")
    targets = {n: deployment.addresses[n] for n in SERVICES}
    cfg = AuditConfig(
        FR, data=data, out=out, seed=SEED, targets=targets, max_reconstructions=4, quiet=True, judge=judge
    )
    audit = Audit(cfg)
    faces, names, _ = load_faces(data)
    inputs = AuditInputs(faces, sample(faces, 12, audit.rng("faces")), names)
    with ExitStack() as stack:
        audit.connect(stack)
        for name, step in (("models", Audit.models), ("reconstructions", Audit.reconstructions)):
            with audit.step(name) as sec:
                step(audit, inputs, sec)
    return audit.result


def test_second_judge_scores_every_reconstruction(
    deployment: Deployment,
    judge_service: RunningService,
    third_fr_registered: str,
    sample_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sdk.audit import AuditError
    from sdk.audit_report import RENDER

    r = _judged_reconstructions(deployment, judge_service.address, sample_data, tmp_path, monkeypatch)
    rec = r["reconstructions"]
    assert rec["judge"]["name"] == THIRD_FR_MODEL and rec["judge"]["version"] == third_fr_registered
    judge_models = r["models"]["judge"]["models"]
    assert [(m["name"], m["version"]) for m in judge_models if m["serving"]] == [(THIRD_FR_MODEL, third_fr_registered)]
    s = rec["summary"]
    # the audited model's keys as before, the second judge's beside them
    assert {"psnr", "ssim", "identity_cosine", "same_person_rate", "n"} <= set(s) and s["n"] == len(rec["faces"]) >= 3
    for f in rec["faces"]:
        assert f["second_no_face"] is False, f["path"]
        assert -1 <= f["identity_cosine_second"] <= 1 and isinstance(f["same_person_second"], bool)
        assert -1 <= f["identity_cosine_second_control"] <= 1
    # the control (each original's own chip at the decoder's size) is the same person to the second model; the
    # session's decoder (a minute of training on ten people) draws faces it mostly does not recognise
    assert s["same_person_rate_second_control"] >= 0.75, rec["faces"]
    assert s["identity_cosine_second"] < s["identity_cosine_second_control"]
    page = RENDER["reconstructions"](r) + RENDER["models"](r)
    assert "Second judge" in page and THIRD_FR_MODEL in page and page.count('class="thumb"') == s["n"]
    # the audited model is no judge of itself
    with pytest.raises(AuditError, match="no independent judge") as refused:
        _judged_reconstructions(deployment, deployment.addresses["embedding"], sample_data, tmp_path, monkeypatch)
    assert refused.value.code == 2
