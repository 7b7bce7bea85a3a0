"""The gRPC API: generation (scripts/gen_protos.py), layout, services and RPCs, documentation, round trips."""

from __future__ import annotations

import hashlib
import importlib
import pickle
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

REPO = Path(__file__).resolve().parents[4]
SCRIPT = REPO / "scripts" / "gen_protos.py"
PROTO_DIR = REPO / "protos" / "facexplain" / "v1"
OUT_DIR = REPO / "services" / "api" / "v1"
PROTOS = ("common", "embedding", "decoding", "directions", "attributes", "counterfactual")

# Every test imports the generated modules: generate them first (once per module).
pytestmark = pytest.mark.usefixtures("generated")

# service -> {rpc: (request type, response type, server-streaming)}; types without a package are
# in facexplain.v1.
LIFECYCLE = {
    "ModelStatus": ("ModelStatusRequest", "ModelStatusResponse", False),
    "Reload": ("ReloadRequest", "ReloadResponse", False),
}
SERVICES: dict[str, tuple[str, dict[str, tuple[str, str, bool]]]] = {
    "EmbeddingService": (
        "embedding",
        {
            "Embed": ("EmbedRequest", "EmbedResponse", False),
            "EmbedBatch": ("EmbedBatchRequest", "EmbedBatchResponse", False),
            "Verify": ("VerifyRequest", "VerifyResponse", False),
            "Landmarks": ("LandmarksRequest", "LandmarksResponse", False),
            **LIFECYCLE,
        },
    ),
    "DecodingService": (
        "decoding",
        {
            "Decode": ("DecodeRequest", "DecodeResponse", False),
            "DecodeBatch": ("DecodeBatchRequest", "DecodeBatchResponse", False),
            "Reconstruct": ("ReconstructRequest", "ReconstructResponse", False),
            "Interpolate": ("InterpolateRequest", "InterpolateResponse", False),
            "Occlude": ("OccludeRequest", "OccludeResponse", False),
            **LIFECYCLE,
        },
    ),
    "DirectionsService": (
        "directions",
        {
            "DiscoverSSI": ("DiscoverSSIRequest", "DiscoveryEvent", True),
            "DiscoverCentroid": ("DiscoverCentroidRequest", "DiscoveryEvent", True),
            "DiscoverRegression": ("DiscoverRegressionRequest", "DiscoveryEvent", True),
            "FitEquivariance": ("FitEquivarianceRequest", "DiscoveryEvent", True),
            "GetDirectionSet": ("GetDirectionSetRequest", "GetDirectionSetResponse", False),
            "ListDirectionSets": ("ListDirectionSetsRequest", "ListDirectionSetsResponse", False),
            "Traverse": ("TraverseRequest", "TraverseResponse", False),
            "ApplyEquivariance": ("ApplyEquivarianceRequest", "ApplyEquivarianceResponse", False),
            "Aggregate": ("AggregateRequest", "AggregateResponse", False),
            "Suppress": ("SuppressRequest", "SuppressResponse", False),
            "CentroidMDS": ("CentroidMDSRequest", "CentroidMDSResponse", False),
            **LIFECYCLE,
        },
    ),
    "AttributesService": (
        "attributes",
        {
            "RecoverAttributes": ("RecoverAttributesRequest", "RecoverAttributesResponse", False),
            "DiffAttributes": ("DiffAttributesRequest", "DiffAttributesResponse", False),
            "Importance": ("ImportanceRequest", "ImportanceEvent", True),
            "ListAttributes": ("ListAttributesRequest", "ListAttributesResponse", False),
            **LIFECYCLE,
        },
    ),
    "CounterfactualService": (
        "counterfactual",
        {
            "Attack": ("AttackRequest", "AttackResponse", False),
            "Explain": ("ExplainRequest", "ExplainResponse", False),
            "DefenceReport": ("DefenceRequest", "DefenceEvent", True),
            **LIFECYCLE,
        },
    ),
}


def _snapshot() -> dict[str, tuple[str, int]]:
    """Generated files in OUT_DIR -> (content hash, mtime_ns)."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(OUT_DIR.glob("*_pb2*.py*"))
    }


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def generated() -> dict[str, tuple[str, int]]:
    """Run the generator twice into the real location; the second run must change nothing."""
    first = _run_script()
    assert first.returncode == 0, first.stderr
    before = _snapshot()
    second = _run_script()
    assert second.returncode == 0, second.stderr
    after = _snapshot()
    assert after == before, "a second run rewrote or removed generated files"
    importlib.invalidate_caches()
    return after


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"services.api.v1.{name}")


def test_generation_layout(generated: dict[str, tuple[str, int]]) -> None:
    expected = {f"{p}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
    assert expected <= set(generated)
    # Nothing was generated into (or next to) the core library package.
    assert not (REPO / "facexplain" / "v1").exists()
    for name in generated:
        text = (OUT_DIR / name).read_text(encoding="utf-8")
        assert "from facexplain.v1 import" not in text, name
        assert "import facexplain" not in text, name


def test_stale_files_removed_and_errors_reported(tmp_path: Path) -> None:
    """Into a scratch dir: a stale module is deleted; a broken proto exits 1 and touches nothing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "removed_pb2.py").write_text("# stale\n")
    ok = _run_script("--out", str(out), "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert not (out / "removed_pb2.py").exists()
    assert (out / "embedding_pb2_grpc.py").is_file()

    root = tmp_path / "protos"
    shutil.copytree(REPO / "protos", root)
    broken = root / "facexplain" / "v1" / "decoding.proto"
    broken.write_text(broken.read_text() + "\nmessage Broken { strin x = 1; }\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _run_script("--out", str(out), "--proto-root", str(root))
    assert bad.returncode == 1
    assert "protoc failed" in bad.stderr and "decoding.proto" in bad.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("name", PROTOS)
def test_modules_import_with_proto_paths(generated: dict[str, tuple[str, int]], name: str) -> None:
    pb2 = _module(f"{name}_pb2")
    _module(f"{name}_pb2_grpc")
    # Descriptor names stay the proto paths (reflection), Python modules live in services.api.v1.
    assert pb2.DESCRIPTOR.name == f"facexplain/v1/{name}.proto"
    assert pb2.DESCRIPTOR.package == "facexplain.v1"
    for message in pb2.DESCRIPTOR.message_types_by_name:
        assert getattr(pb2, message).__module__ == f"services.api.v1.{name}_pb2"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_rpcs(generated: dict[str, tuple[str, int]], service: str) -> None:
    module, rpcs = SERVICES[service]
    pb2, pb2_grpc = _module(f"{module}_pb2"), _module(f"{module}_pb2_grpc")
    desc = pb2.DESCRIPTOR.services_by_name[service]
    assert desc.full_name == f"facexplain.v1.{service}"
    assert set(desc.methods_by_name) == set(rpcs)
    for rpc, (request, response, streaming) in rpcs.items():
        method = desc.methods_by_name[rpc]
        assert method.input_type.full_name == f"facexplain.v1.{request}", rpc
        assert method.output_type.full_name == f"facexplain.v1.{response}", rpc
        assert method.server_streaming is streaming, rpc
        assert method.client_streaming is False, rpc
    for attr in (f"{service}Stub", f"{service}Servicer", f"add_{service}Servicer_to_server"):
        assert hasattr(pb2_grpc, attr), attr
    # What server reflection looks up: service name -> file in the default pool, under its proto path.
    found = descriptor_pool.Default().FindFileContainingSymbol(f"facexplain.v1.{service}")
    assert found.name == f"facexplain/v1/{module}.proto"


def _compiled_with_comments(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    import grpc_tools

    out = tmp_path / "api.pb"
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    files = [f"facexplain/v1/{p}.proto" for p in PROTOS]
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}", f"-I{wkt}"]
    cmd += ["--include_source_info", f"--descriptor_set_out={out}", *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _element_paths(fdp: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Source-location path -> readable name for every message, field, oneof, enum, value, service, rpc."""
    paths: dict[tuple[int, ...], str] = {}

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        paths[path] = f"{prefix}{e.name}"
        for i, v in enumerate(e.value):
            paths[(*path, 2, i)] = f"{prefix}{e.name}.{v.name}"

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        name = f"{prefix}{m.name}"
        paths[path] = name
        for i, f in enumerate(m.field):
            paths[(*path, 2, i)] = f"{name}.{f.name}"
        for i, o in enumerate(m.oneof_decl):
            if not o.name.startswith("_"):  # synthetic oneofs of proto3 `optional` fields
                paths[(*path, 8, i)] = f"{name}.{o.name} (oneof)"
        for i, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:
                message(nested, (*path, 3, i), f"{name}.")
        for i, e in enumerate(m.enum_type):
            enum(e, (*path, 4, i), f"{name}.")

    for i, m in enumerate(fdp.message_type):
        message(m, (4, i), "")
    for i, e in enumerate(fdp.enum_type):
        enum(e, (5, i), "")
    for i, s in enumerate(fdp.service):
        paths[(6, i)] = s.name
        for j, rpc in enumerate(s.method):
            paths[(6, i, 2, j)] = f"{s.name}.{rpc.name}"
    return paths


def test_every_element_documented(tmp_path: Path) -> None:
    undocumented = []
    for fdp in _compiled_with_comments(tmp_path).file:
        if not fdp.name.startswith("facexplain/"):
            continue
        documented = {
            tuple(loc.path)
            for loc in fdp.source_code_info.location
            if loc.leading_comments.strip() or loc.trailing_comments.strip()
        }
        elements = _element_paths(fdp).items()
        undocumented += [f"{fdp.name}: {name}" for path, name in elements if path not in documented]
    assert not undocumented, "undocumented:\n" + "\n".join(undocumented)


def _roundtrip(msg):  # type: ignore[no-untyped-def]
    data = msg.SerializeToString()
    back = type(msg).FromString(data)
    assert back == msg
    assert pickle.loads(pickle.dumps(msg)) == msg
    return back


def test_roundtrip_common() -> None:
    common = _module("common_pb2")
    ref = common.ModelRef(name="facexplain-fr-dlib128", version="3", alias="champion")
    ds = common.Dataset(
        name="tiny",
        inline=common.LabeledImages(
            items=[
                common.LabeledImage(
                    id="x1", image=common.Image(encoded=b"\x89PNG"), identity="7", labels={"Male": 1.0}
                ),
                common.LabeledImage(
                    id="x2", template=common.Template(values=[0.5, -0.25], dim=2, model=ref), identity="7"
                ),
            ]
        ),
    )
    back = _roundtrip(ds)
    assert back.WhichOneof("source") == "inline"
    assert back.inline.items[0].labels["Male"] == 1.0
    assert back.inline.items[1].WhichOneof("face") == "template"
    on_server = common.Dataset(server=common.ServerDataset(path="orl_faces"))
    assert _roundtrip(on_server).WhichOneof("source") == "server"
    status = common.ModelStatusResponse(
        models=[common.LoadedModel(model=ref, kind="embedder", metadata={"dim": "128"}, serving=True)],
        registry_reachable=True,
    )
    status.models[0].loaded_at.FromSeconds(1_700_000_000)
    assert _roundtrip(status).models[0].loaded_at.seconds == 1_700_000_000


def test_roundtrip_embedding() -> None:
    common, emb = _module("common_pb2"), _module("embedding_pb2")
    pixels = bytes(range(12))
    req = emb.EmbedBatchRequest(
        images=[
            common.Image(tensor=common.Tensor(dtype=common.DTYPE_UINT8, shape=[2, 2, 3], data=pixels)),
            common.Image(encoded=b"not an image"),
        ],
        normalize=True,
        selection=emb.FACE_SELECTION_MOST_CONFIDENT,
    )
    assert _roundtrip(req).images[0].tensor.data == pixels
    resp = emb.EmbedBatchResponse(
        results=[
            emb.EmbedResult(
                index=0,
                ok=emb.EmbedResponse(
                    template=common.Template(values=[0.1] * 128, dim=128, normalized=True),
                    face=common.Box(x1=1, y1=2, x2=30, y2=40, score=0.99),
                    landmarks=common.Landmarks(points=[common.Point(x=i, y=i) for i in range(68)]),
                ),
            ),
            emb.EmbedResult(index=1, error=common.ItemError(code=3, message="undecodable image")),
        ]
    )
    back = _roundtrip(resp)
    assert [r.WhichOneof("outcome") for r in back.results] == ["ok", "error"]
    assert len(back.results[0].ok.landmarks.points) == 68
    verify = emb.VerifyResponse(
        cosine=0.93,
        l2_distance=0.55,
        same_person=True,
        rule=common.VerificationRule(
            metric="l2", threshold=0.6, accept_below=True, source="dlib: L2 < 0.6 on raw templates"
        ),
    )
    assert _roundtrip(verify).rule.accept_below


def test_roundtrip_decoding() -> None:
    common, dec = _module("common_pb2"), _module("decoding_pb2")
    req = dec.InterpolateRequest(
        a=common.Template(values=[1.0, 0.0]),
        b=common.Template(values=[0.0, 1.0]),
        steps=5,
        mode=dec.INTERPOLATION_MODE_SLERP,
    )
    assert _roundtrip(req).mode == dec.INTERPOLATION_MODE_SLERP
    resp = dec.ReconstructResponse(
        metrics=dec.ReconstructionMetrics(psnr=21.5, ssim=0.71, identity_cosine=0.95, same_person=True)
    )
    assert _roundtrip(resp).metrics.psnr == pytest.approx(21.5)


def test_roundtrip_directions() -> None:
    common, dirs = _module("common_pb2"), _module("directions_pb2")
    req = dirs.DiscoverSSIRequest(
        dataset=common.Dataset(server=common.ServerDataset(path="celeba_subset", max_items=100)),
        regions=[dirs.Region(name="eyes"), dirs.Region(name="brows", landmark_indices=list(range(17, 27)))],
        n_components=3,
        feather_sigma=0.0,
        seed=42,
        register=True,
    )
    back = _roundtrip(req)
    assert back.HasField("feather_sigma") and back.feather_sigma == 0.0  # explicit 0 = hard edge
    assert not dirs.DiscoverSSIRequest().HasField("feather_sigma")  # unset = server default
    event = dirs.DiscoveryEvent(
        result=dirs.DirectionSet(
            id="ds-1",
            method="ssi",
            target="eyes",
            directions=[dirs.Direction(name="ssi/eyes/pc1", vector=[0.6, 0.8], eigenvalue=0.2, stddev=0.45)],
            metrics={"n_pairs": 500.0},
            seed=42,
        )
    )
    assert _roundtrip(event).WhichOneof("event") == "result"
    traverse = dirs.TraverseRequest(
        probe=common.Probe(template=common.Template(values=[0.1, 0.2])),
        set_direction=dirs.SetDirection(set=common.DirectionSetRef(id="ds-1"), index=0),
        alphas=[-2, 0, 2],
        scale=dirs.ALPHA_SCALE_STDDEV,
        decode=True,
    )
    assert _roundtrip(traverse).WhichOneof("direction") == "set_direction"


def test_roundtrip_attributes() -> None:
    common, attrs = _module("common_pb2"), _module("attributes_pb2")
    req = attrs.ImportanceRequest(
        dataset=common.Dataset(server=common.ServerDataset(path="celeba_subset")),
        attributes=["yaw", "age"],
        estimator="knn",
        n_bootstrap=200,
        seed=1,
        shuffled_control=True,
    )
    assert _roundtrip(req).n_bootstrap == 200
    event = attrs.ImportanceEvent(
        table=attrs.ImportanceTable(
            rows=[attrs.ImportanceRow(attribute="yaw", group="pose", mi=0.8, ci_low=0.7, ci_high=0.9, n=100)],
            estimator="knn",
            seed=1,
        )
    )
    assert _roundtrip(event).table.rows[0].mi == pytest.approx(0.8)
    value = attrs.AttributeValue(name="pose", group="pose", value=[10.0, -2.0, 0.5], unit="deg")
    assert list(_roundtrip(value).value) == [10.0, -2.0, 0.5]


def test_roundtrip_counterfactual() -> None:
    common, cf = _module("common_pb2"), _module("counterfactual_pb2")
    spec = cf.AttackSpec(
        method=cf.AttackSpec.METHOD_PGD,
        goal=cf.AttackSpec.GOAL_DODGE,
        norm=cf.AttackSpec.NORM_LINF,
        epsilon=8 / 255,
        steps=10,
        random_start=True,
        seed=7,
        target_model=common.ModelRef(name="dlib-descriptor", version="local"),
    )
    req = cf.AttackRequest(probe=common.Image(encoded=b"a"), reference=common.Image(encoded=b"b"), spec=spec)
    assert _roundtrip(req).spec.method == cf.AttackSpec.METHOD_PGD
    event = cf.DefenceEvent(
        result=cf.DefenceResult(
            roc_without=[cf.RocPoint(fpr=0.0, tpr=0.1, threshold=0.6), cf.RocPoint(fpr=1.0, tpr=1.0)],
            auc_without=0.61,
            auc_with=0.93,
            n_pairs=2,
        )
    )
    assert _roundtrip(event).result.auc_with == pytest.approx(0.93)


class _Embedding:
    """A minimal EmbeddingService servicer (only the lifecycle RPCs)."""

    def __init__(self) -> None:
        self.common = _module("common_pb2")

    def ModelStatus(self, request, context):  # type: ignore[no-untyped-def]
        ref = self.common.ModelRef(name="fr", version="local")
        return self.common.ModelStatusResponse(models=[self.common.LoadedModel(model=ref, serving=True)])


class _Directions:
    """A minimal DirectionsService servicer streaming one discovery."""

    def DiscoverCentroid(self, request, context):  # type: ignore[no-untyped-def]
        common, dirs = _module("common_pb2"), _module("directions_pb2")
        yield dirs.DiscoveryEvent(progress=common.Progress(done=1, total=2, stage="embedding"))
        yield dirs.DiscoveryEvent(result=dirs.DirectionSet(id="c1", method="centroid", target=request.label))


def test_generated_stubs_serve_over_loopback(generated: dict[str, tuple[str, int]]) -> None:
    common = _module("common_pb2")
    emb, emb_grpc = _module("embedding_pb2"), _module("embedding_pb2_grpc")
    dirs, dirs_grpc = _module("directions_pb2"), _module("directions_pb2_grpc")
    embedding = type("EmbeddingServicer", (_Embedding, emb_grpc.EmbeddingServiceServicer), {})()
    directions = type("DirectionsServicer", (_Directions, dirs_grpc.DirectionsServiceServicer), {})()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    emb_grpc.add_EmbeddingServiceServicer_to_server(embedding, server)
    dirs_grpc.add_DirectionsServiceServicer_to_server(directions, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            embed_stub = emb_grpc.EmbeddingServiceStub(channel)
            status = embed_stub.ModelStatus(common.ModelStatusRequest(), timeout=5)
            assert status.models[0].model.version == "local"
            with pytest.raises(grpc.RpcError) as err:
                embed_stub.Embed(emb.EmbedRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            stream = dirs_grpc.DirectionsServiceStub(channel).DiscoverCentroid(
                dirs.DiscoverCentroidRequest(label="Male", positive_values=[1.0]), timeout=5
            )
            events = [e.WhichOneof("event") for e in stream]
            assert events == ["progress", "result"]
    finally:
        server.stop(grace=None)
