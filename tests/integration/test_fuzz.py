"""Every RPC of every service, driven with real faces and then fuzzed, against real servers (issue 23).

The five services follow the session's registry (the default FR model and the decoder trained for it,
tests/servers.py), so every handler has its models and a request reaches as deep as it can. Two
checks share them:

- the access log: every RPC called once with a good request made of real faces (../shared/data) has
  exactly one access line, and no line of any service's log holds a byte of an image (raw or base64,
  sent or returned) or a number of a template (sent or returned) in any way a log would print it;
- the fuzz suite: for every RPC, hypothesis mutates the good request (or builds a random one) with the
  values of tests/fuzzing.py; only documented status codes come back (never UNKNOWN or INTERNAL) and
  the service still answers a good call afterwards. Bounded: ``FUZZ_EXAMPLES`` examples per RPC
  (``FACEXPLAIN_FUZZ_EXAMPLES`` overrides), derandomized, so a run is repeatable; bench/bench_fuzz.py
  runs it longer. Fuzzed requests never register anything (``register`` is forced off): the registry is
  the session's, shared with the other modules.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cli.launcher import RunningMlflow, RunningService, start_service
from registry import VersionInfo
from services.api.v1 import common_pb2, directions_pb2, embedding_pb2
from tests.fuzzing import DOCUMENTED, Fuzzer, Material, Rpc, all_rpcs, good_requests, invoke, status_of
from tests.servers import start_side_by_side
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

FUZZ_EXAMPLES = int(os.environ.get("FACEXPLAIN_FUZZ_EXAMPLES", "10"))
FUZZ_REPORT = os.environ.get("FACEXPLAIN_FUZZ_REPORT", "")  # bench/bench_fuzz.py: where to write the counts
FUZZ_RANDOM = os.environ.get("FACEXPLAIN_FUZZ_RANDOM", "") == "1"  # bench: random examples (--hypothesis-seed)
CALL_TIMEOUT_S = 60.0
RPCS = all_rpcs()
N_FACES = 4

LIMITS = {  # small limits: the fuzzer's oversized fields hit them instead of running for minutes
    "embedding": {},
    "decoding": {"FACEXPLAIN_MAX_INTERPOLATION_STEPS": "8"},
    "directions": {
        "FACEXPLAIN_MAX_ALPHAS": "8",
        "FACEXPLAIN_MAX_DATASET_ITEMS": "8",
        "FACEXPLAIN_MAX_SSI_PAIRS": "8",
        "FACEXPLAIN_MIN_LABEL_ITEMS": "2",
        "FACEXPLAIN_BATCH_SIZE": "4",
    },
    "attributes": {
        "FACEXPLAIN_MAX_DATASET_ITEMS": "8",
        "FACEXPLAIN_BATCH_SIZE": "4",
        "FACEXPLAIN_MAX_BOOTSTRAP": "10",
        "FACEXPLAIN_MAX_PERMUTATIONS": "10",
    },
    "counterfactual": {
        "FACEXPLAIN_MAX_ATTACK_STEPS": "3",
        "FACEXPLAIN_MAX_TOTAL_STEPS": "6",
        "FACEXPLAIN_CW_SEARCH_ROUNDS": "2",
        "FACEXPLAIN_MAX_ATTACK_SECONDS": "20",
        "FACEXPLAIN_MAX_DEFENCE_PAIRS": "2",
        "FACEXPLAIN_MAX_RANDOM_CONTROLS": "2",
        "FACEXPLAIN_BATCH_SIZE": "4",
    },
}


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faces(celeba_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((celeba_dir / "images").glob("*.jpg"))[:N_FACES]]


@pytest.fixture(scope="module")
def fleet(
    mlflow: RunningMlflow, decoder_v1: VersionInfo, celeba_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningService]]:
    """The five services on the session's registry, started side by side; a data root for server datasets."""
    base = tmp_path_factory.mktemp("fuzz-fleet")
    root = base / "root"
    (root / "faces").mkdir(parents=True)
    for p in sorted((celeba_dir / "images").glob("*.jpg"))[:N_FACES]:
        shutil.copy(p, root / "faces" / p.name)
    (base / "outside").mkdir()

    def start(name: str) -> RunningService:
        env = registry_service_env(
            mlflow.uri,
            base / f"cache-{name}",
            poll_s=30,
            FACEXPLAIN_MAX_BATCH_SIZE="4",
            FACEXPLAIN_DATA_ROOT=str(root),
            **LIMITS[name],
        )
        return start_service(name, base, env=env, timeout=300)

    running = start_side_by_side(LIMITS, start)
    try:
        yield running
    finally:
        codes = {name: svc.stop() for name, svc in running.items()}
    assert all(c == 0 for c in codes.values()), codes


@pytest.fixture(scope="module")
def channels(fleet: dict[str, RunningService]) -> Iterator[dict[str, grpc.Channel]]:
    chans = {name: grpc.insecure_channel(svc.address) for name, svc in fleet.items()}
    for ch in chans.values():
        grpc.channel_ready_future(ch).result(timeout=30)
    yield chans
    for ch in chans.values():
        ch.close()


def _rpc(key: str) -> Rpc:
    return next(r for r in RPCS if r.key == key)


@pytest.fixture(scope="module")
def material(channels: dict[str, grpc.Channel], faces: list[bytes]) -> Material:
    """The faces, their templates from the embedding service, a stored centroid set and equivariance maps."""
    embed = _rpc("embedding.Embed")
    templates = [
        invoke(
            channels["embedding"], embed, embedding_pb2.EmbedRequest(image=common_pb2.Image(encoded=f)), 120
        ).template
        for f in faces
    ]
    m = Material(faces, templates)
    seeds = good_requests(m)
    events = invoke(
        channels["directions"], _rpc("directions.DiscoverCentroid"), seeds["directions.DiscoverCentroid"], 300
    )
    m.direction_set_id = next(e.result.id for e in events if e.HasField("result"))
    events = invoke(
        channels["directions"], _rpc("directions.FitEquivariance"), seeds["directions.FitEquivariance"], 300
    )
    m.maps_id = next(e.maps.id for e in events if e.HasField("maps"))
    return m


@pytest.fixture(scope="module")
def seeds(material: Material) -> dict[str, Message]:
    return good_requests(material)


# -- the access log: every RPC, real faces, no biometrics ---------------------------------------------------


def _biometrics(msg: Message, images: list[bytes], templates: list[list[float]]) -> None:
    """Collect every image byte string and template vector inside ``msg`` (requests and responses)."""
    for fd, value in msg.ListFields():
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue
        items = list(value) if fd.is_repeated else [value]
        for v in items:
            if isinstance(v, Message):
                if v.DESCRIPTOR.full_name == "facexplain.v1.Template" and len(v.values):  # type: ignore[attr-defined]
                    templates.append(list(v.values))  # type: ignore[attr-defined]
                _biometrics(v, images, templates)
            elif isinstance(v, bytes) and len(v) >= 200:
                images.append(v)


def _number_forms(values: list[float]) -> set[str]:
    """How a template value could be printed: repr, float32 str, fixed and general formats (4+ digits)."""
    out: set[str] = set()
    for v in values:
        f = float(v)
        out |= {repr(f), str(np.float32(f)), f"{f:.6g}", f"{f:.5f}", f"{f:.4f}"}
    return {s for s in out if len(s.lstrip("-").replace(".", "").lstrip("0")) >= 4}


def _leaked(numbers: set[str], text: str) -> set[str]:
    found = set()
    for m in re.finditer(r"-?\d+\.\d+(?:e[-+]?\d+)?", text):
        if m.group(0) in numbers:
            found.add(m.group(0))
    return found


def test_every_rpc_with_real_faces_logs_one_line_and_no_biometrics(
    fleet: dict[str, RunningService], channels: dict[str, grpc.Channel], material: Material, seeds: dict[str, Message]
) -> None:
    assert {r.key for r in RPCS} == set(seeds), "a good request for every RPC of every service"
    images: list[bytes] = list(material.faces)
    templates: list[list[float]] = [list(t.values) for t in material.templates]
    codes: dict[str, str] = {}
    offsets = {name: svc.log_path.stat().st_size for name, svc in fleet.items()}
    for rpc in RPCS:
        request = seeds[rpc.key]
        rid = f"logcheck-{rpc.service}-{rpc.method}"
        _biometrics(request, images, templates)
        try:
            response = invoke(channels[rpc.service], rpc, request, 300, metadata=[("x-request-id", rid)])
            for r in response if isinstance(response, list) else [response]:
                _biometrics(r, images, templates)
            codes[rpc.key] = "OK"
        except grpc.RpcError as err:
            codes[rpc.key] = err.code().name
    # every good request is served: the calls reached the code that handles faces and templates
    assert all(c == "OK" for c in codes.values()), {k: c for k, c in codes.items() if c != "OK"}
    assert len(images) > N_FACES and len(templates) > N_FACES  # returned faces and templates are checked too

    time.sleep(0.5)  # the access line is written as the call ends: let the last ones reach the file
    logs = {name: svc.log_path.read_bytes() for name, svc in fleet.items()}
    for rpc in RPCS:
        rid = f"logcheck-{rpc.service}-{rpc.method}"
        lines = [
            json.loads(line)
            for line in logs[rpc.service][offsets[rpc.service] :].decode(errors="replace").splitlines()
            if line.startswith("{") and f'"{rid}"' in line
        ]
        assert len(lines) == 1, (rpc.key, lines)
        assert (lines[0]["method"], lines[0]["code"], lines[0]["service"]) == (rpc.method, "OK", rpc.full_service)
    raw = b"".join(logs.values())  # the whole logs: start-up, model loading and every call
    text = raw.decode(errors="replace")
    for data in images:
        step = max(1, len(data) // 40)
        for start in range(0, len(data) - 48, step):
            chunk = data[start : start + 48]
            assert chunk not in raw, "image bytes in a log"
            assert base64.b64encode(chunk)[8:56] not in raw, "base64 image bytes in a log"
    numbers = set().union(*(_number_forms(v) for v in templates))
    planted = json.dumps({"msg": "oops", "values": templates[1][:3]}) + f" {templates[2][0]:.4f} {templates[3][5]!r}"
    assert len(_leaked(numbers, planted)) >= 4, "the detector sees a template printed as a log would print it"
    assert not _leaked(numbers, text), f"template numbers in a log: {sorted(_leaked(numbers, text))[:10]}"
    assert not re.search(r"(-?\d+\.\d+,\s*){8,}", text), "a run of numbers that could be a template"


# -- the fuzz suite ---------------------------------------------------------------------------------------

GOOD_CALL = {  # a cheap call that must still work after the fuzzing of a service
    "embedding": "embedding.Embed",
    "decoding": "decoding.Decode",
    "directions": "directions.Aggregate",
    "attributes": "attributes.DiffAttributes",
    "counterfactual": "counterfactual.ModelStatus",
}
STATS: dict[str, Any] = {"cases": 0, "seconds": 0.0, "codes": Counter(), "per_rpc": {}}


def _no_registration(msg: Message) -> Message:
    """Fuzzing must not write into the session's shared registry: ``register`` off wherever it is."""
    if "register" in msg.DESCRIPTOR.fields_by_name:
        msg.register = False  # type: ignore[attr-defined]
    return msg


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if FUZZ_REPORT and STATS["cases"]:
        out = {**STATS, "codes": dict(STATS["codes"]), "examples_per_rpc": FUZZ_EXAMPLES, "rpcs": len(RPCS)}
        Path(FUZZ_REPORT).write_text(json.dumps(out, indent=1, sort_keys=True))


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.key)
def test_fuzzed_requests_get_documented_codes_and_the_server_stays_up(
    rpc: Rpc,
    fleet: dict[str, RunningService],
    channels: dict[str, grpc.Channel],
    material: Material,
    seeds: dict[str, Message],
) -> None:
    channel, fuzzer = channels[rpc.service], Fuzzer(material)
    requests = fuzzer.requests(rpc, seeds[rpc.key]).map(_no_registration)
    codes: Counter[str] = Counter()
    t0 = time.perf_counter()

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=not FUZZ_RANDOM,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        request = data.draw(requests, label="request")
        code, details = status_of(channel, rpc, request, CALL_TIMEOUT_S)
        codes[code.name] += 1
        assert code in DOCUMENTED, f"{rpc.key} answered {code.name}: {details[:300]}"
        assert fleet[rpc.service].alive()

    try:
        fuzz()
    finally:
        took = time.perf_counter() - t0
        STATS["cases"] += sum(codes.values())
        STATS["seconds"] += took
        STATS["codes"].update(codes)
        STATS["per_rpc"][rpc.key] = {"cases": sum(codes.values()), "seconds": round(took, 2), "codes": dict(codes)}
    assert fleet[rpc.service].alive(), fleet[rpc.service].log_text()[-3000:]
    good = _rpc(GOOD_CALL[rpc.service])
    code, details = status_of(channel, good, seeds[good.key], 120)
    assert code == grpc.StatusCode.OK, (good.key, code, details)
    # hypothesis ran its examples (a request without fields, e.g. ModelStatusRequest, has only one)
    assert sum(codes.values()) >= (FUZZ_EXAMPLES // 2 if rpc.request_cls.DESCRIPTOR.fields else 1)


def test_directions_dataset_paths_stay_inside_the_data_root(
    channels: dict[str, grpc.Channel], material: Material
) -> None:
    """Path-like dataset names never read outside FACEXPLAIN_DATA_ROOT (a precise refusal, not a crash)."""
    rpc = _rpc("directions.DiscoverCentroid")
    for path in ("../outside", "/etc", "faces/../../outside", "..", "~", "faces/\x00"):
        req = directions_pb2.DiscoverCentroidRequest(
            dataset=common_pb2.Dataset(name="p", server=common_pb2.ServerDataset(path=path)), label="Smiling"
        )
        code, details = status_of(channels["directions"], rpc, req, 60)
        assert code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED,
        ), (
            path,
            code,
            details,
        )
