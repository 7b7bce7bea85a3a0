"""Request fuzzing for every RPC of every service (issue 23): the RPC table read from the generated
descriptors, one good request per RPC built from real faces, and hypothesis strategies that mutate a good
request (or build a random one) with the values an attacker would try.

A mutation of a good request reaches deep into a handler (every other field stays valid); a random
message tests the outer validation. Values favour the edges: random bytes and lying headers as images,
extreme tensor shapes, NaN / inf / 3e38 floats, int32 extremes, enum numbers no version defines, empty
and oversized repeated fields, bogus model names and aliases, path-like strings. Shared by
tests/integration/test_fuzz.py (bounded) and bench/bench_fuzz.py (long runs).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor as _d
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from services.api.v1 import (
    attributes_pb2,
    common_pb2,
    counterfactual_pb2,
    decoding_pb2,
    directions_pb2,
    embedding_pb2,
)

SERVICE_MODULES = {
    "embedding": (embedding_pb2, "EmbeddingService"),
    "decoding": (decoding_pb2, "DecodingService"),
    "directions": (directions_pb2, "DirectionsService"),
    "attributes": (attributes_pb2, "AttributesService"),
    "counterfactual": (counterfactual_pb2, "CounterfactualService"),
}

# What the API documents (DESIGN.md "gRPC conventions", services/kit/errors.py). UNAVAILABLE means "no
# model loaded" and is never expected from these servers (their models are loaded), so it is not here:
# a crashed or wedged server answers it. UNKNOWN and INTERNAL mean an unhandled exception.
DOCUMENTED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


@dataclass(frozen=True)
class Rpc:
    service: str  # short name: embedding, decoding, ...
    full_service: str  # facexplain.v1.EmbeddingService
    method: str
    request_cls: type[Message]
    response_cls: type[Message]
    streaming: bool

    @property
    def key(self) -> str:
        return f"{self.service}.{self.method}"


def all_rpcs() -> list[Rpc]:
    """Every RPC the five services define, in proto order (read from the descriptors, so none is missed)."""
    out = []
    for short, (module, name) in SERVICE_MODULES.items():
        sd = module.DESCRIPTOR.services_by_name[name]
        for m in sd.methods:
            out.append(
                Rpc(
                    short,
                    sd.full_name,
                    m.name,
                    message_factory.GetMessageClass(m.input_type),
                    message_factory.GetMessageClass(m.output_type),
                    m.server_streaming,
                )
            )
    return out


def invoke(channel: grpc.Channel, rpc: Rpc, request: Message, timeout: float, metadata: Any = None) -> Any:
    """One call; a stream is read to its end. Returns the response (list for a stream) or raises RpcError."""
    ser, de = type(request).SerializeToString, rpc.response_cls.FromString
    path = f"/{rpc.full_service}/{rpc.method}"
    if rpc.streaming:
        stream = channel.unary_stream(path, request_serializer=ser, response_deserializer=de)
        return list(stream(request, timeout=timeout, metadata=metadata))
    return channel.unary_unary(path, request_serializer=ser, response_deserializer=de)(
        request, timeout=timeout, metadata=metadata
    )


def status_of(channel: grpc.Channel, rpc: Rpc, request: Message, timeout: float) -> tuple[grpc.StatusCode, str]:
    try:
        invoke(channel, rpc, request, timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""  # type: ignore[no-any-return]


# -- good requests from real faces ------------------------------------------------------------------------


@dataclass
class Material:
    """Real faces (encoded bytes) and the templates the embedding service made of them."""

    faces: list[bytes]
    templates: list[common_pb2.Template]
    direction_set_id: str = ""  # a stored centroid set (for Traverse / GetDirectionSet / CentroidMDS)
    maps_id: str = ""  # stored equivariance maps (ApplyEquivariance)


def _img(data: bytes) -> common_pb2.Image:
    return common_pb2.Image(encoded=data)


def _inline(m: Material, *, images: bool, labels: Callable[[int], dict[str, float]]) -> common_pb2.Dataset:
    items = []
    for i, (face, tpl) in enumerate(zip(m.faces, m.templates, strict=True)):
        item = common_pb2.LabeledImage(id=f"f{i}", identity=f"p{i}", labels=labels(i))
        if images:
            item.image.CopyFrom(_img(face))
        else:
            item.template.CopyFrom(tpl)
        items.append(item)
    return common_pb2.Dataset(name="fuzz-inline", inline=common_pb2.LabeledImages(items=items))


def good_requests(m: Material) -> dict[str, Message]:
    """One request per RPC that a served model answers (small sizes: the suite runs on 2 busy cores)."""
    f, t = m.faces, m.templates
    pair = embedding_pb2.VerifyRequest(a=common_pb2.Probe(image=_img(f[0])), b=common_pb2.Probe(template=t[1]))
    spec = counterfactual_pb2.AttackSpec(
        method=counterfactual_pb2.AttackSpec.METHOD_PGD,
        goal=counterfactual_pb2.AttackSpec.GOAL_DODGE,
        norm=counterfactual_pb2.AttackSpec.NORM_LINF,
        epsilon=8 / 255,
        steps=2,
        seed=1,
    )
    fgsm = counterfactual_pb2.AttackSpec(method=counterfactual_pb2.AttackSpec.METHOD_FGSM, epsilon=4 / 255)
    rot = directions_pb2.Transform(kind=directions_pb2.TRANSFORM_KIND_ROTATION, angle_degrees=10)
    set_ref = common_pb2.DirectionSetRef(id=m.direction_set_id)
    centroids = directions_pb2.CentroidList(
        centroids=[directions_pb2.Centroid(name=f"c{i}", value=i, template=tpl, count=1) for i, tpl in enumerate(t)]
    )
    return {
        "embedding.Embed": embedding_pb2.EmbedRequest(image=_img(f[0]), return_aligned=True),
        "embedding.EmbedBatch": embedding_pb2.EmbedBatchRequest(images=[_img(x) for x in f[:2]]),
        "embedding.Verify": pair,
        "embedding.Landmarks": embedding_pb2.LandmarksRequest(image=_img(f[1]), all_faces=True),
        "embedding.ModelStatus": common_pb2.ModelStatusRequest(),
        "embedding.Reload": common_pb2.ReloadRequest(),
        "decoding.Decode": decoding_pb2.DecodeRequest(template=t[0]),
        "decoding.DecodeBatch": decoding_pb2.DecodeBatchRequest(templates=t[:2]),
        "decoding.Reconstruct": decoding_pb2.ReconstructRequest(image=_img(f[2])),
        "decoding.Interpolate": decoding_pb2.InterpolateRequest(a=t[0], b=t[1], steps=3, strip=True),
        "decoding.Occlude": decoding_pb2.OccludeRequest(image=_img(f[0]), regions=["eyes"]),
        "decoding.ModelStatus": common_pb2.ModelStatusRequest(),
        "decoding.Reload": common_pb2.ReloadRequest(),
        "directions.DiscoverSSI": directions_pb2.DiscoverSSIRequest(
            dataset=_inline(m, images=True, labels=lambda i: {}),
            regions=[directions_pb2.Region(name="eyes", landmark_indices=list(range(36, 48)))],
            n_components=2,
            batch_size=4,
            seed=1,
            max_pairs=6,
        ),
        "directions.DiscoverCentroid": directions_pb2.DiscoverCentroidRequest(
            dataset=_inline(m, images=False, labels=lambda i: {"Smiling": float(i % 2)}),
            label="Smiling",
            positive_values=[1.0],
        ),
        "directions.DiscoverRegression": directions_pb2.DiscoverRegressionRequest(
            dataset=_inline(m, images=False, labels=lambda i: {"Age": 20.0 + 7 * i}),
            label="Age",
            probe=common_pb2.Probe(template=t[0]),
            target_value=45.0,
            cv_folds=2,
            seed=1,
        ),
        "directions.FitEquivariance": directions_pb2.FitEquivarianceRequest(
            dataset=_inline(m, images=True, labels=lambda i: {}),
            transforms=[rot],
            holdout_fraction=0.25,
            seed=1,
            batch_size=4,
        ),
        "directions.GetDirectionSet": directions_pb2.GetDirectionSetRequest(ref=set_ref),
        "directions.ListDirectionSets": directions_pb2.ListDirectionSetsRequest(include_vectors=True),
        "directions.Traverse": directions_pb2.TraverseRequest(
            probe=common_pb2.Probe(template=t[0]),
            set_direction=directions_pb2.SetDirection(set=set_ref, index=0),
            alphas=[-1.0, 0.0, 1.0],
            scale=directions_pb2.ALPHA_SCALE_STDDEV,
            decode=True,
        ),
        "directions.ApplyEquivariance": directions_pb2.ApplyEquivarianceRequest(
            probe=common_pb2.Probe(image=_img(f[0])),
            maps=common_pb2.DirectionSetRef(id=m.maps_id),
            transform=rot,
            forward=True,
            decode=True,
        ),
        "directions.Aggregate": directions_pb2.AggregateRequest(
            faces=[common_pb2.Probe(template=x) for x in t], n_clusters=2, linkage="average", decode=True
        ),
        "directions.CentroidMDS": directions_pb2.CentroidMDSRequest(centroids=centroids, metric="cosine", seed=1),
        "directions.Suppress": directions_pb2.SuppressRequest(
            probes=[common_pb2.Probe(template=x) for x in t[:2]],
            set_direction=directions_pb2.SetDirection(set=set_ref, index=0),
            decode=True,
        ),
        "directions.ModelStatus": common_pb2.ModelStatusRequest(),
        "directions.Reload": common_pb2.ReloadRequest(),
        "attributes.RecoverAttributes": attributes_pb2.RecoverAttributesRequest(
            probe=common_pb2.Probe(image=_img(f[0])), return_decoded=True
        ),
        "attributes.DiffAttributes": attributes_pb2.DiffAttributesRequest(
            a=common_pb2.Probe(template=t[0]), b=common_pb2.Probe(template=t[1])
        ),
        "attributes.Importance": attributes_pb2.ImportanceRequest(
            dataset=_inline(m, images=True, labels=lambda i: {}),  # Importance decodes: it needs the images
            attributes=["age", "yaw"],
            estimator="knn",
            n_bootstrap=5,
            n_permutations=5,
            seed=1,
            knn_neighbors=1,
        ),
        "attributes.ListAttributes": attributes_pb2.ListAttributesRequest(),
        "attributes.ModelStatus": common_pb2.ModelStatusRequest(),
        "attributes.Reload": common_pb2.ReloadRequest(),
        "counterfactual.Attack": counterfactual_pb2.AttackRequest(probe=_img(f[0]), reference=_img(f[1]), spec=spec),
        "counterfactual.Explain": counterfactual_pb2.ExplainRequest(
            probe=_img(f[0]), reference=_img(f[1]), spec=spec, attributes=["age", "yaw"], n_random=1
        ),
        "counterfactual.DefenceReport": counterfactual_pb2.DefenceRequest(
            pairs=[
                counterfactual_pb2.ImagePair(a=_img(f[0]), b=_img(f[1]), genuine=False, id="impostor"),
                counterfactual_pb2.ImagePair(a=_img(f[2]), b=_img(f[2]), genuine=True, id="genuine"),
            ],
            spec=fgsm,
        ),
        "counterfactual.ModelStatus": common_pb2.ModelStatusRequest(),
        "counterfactual.Reload": common_pb2.ReloadRequest(),
    }


# -- values an attacker tries -----------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring ``width`` x ``height`` with no pixel data: a lying header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def byte_values(faces: list[bytes]) -> st.SearchStrategy[bytes]:
    face = st.sampled_from(faces)
    return st.one_of(
        st.binary(max_size=256),
        face,
        face.flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),  # truncated
        face.flatmap(lambda b: st.integers(0, len(b) - 1).map(lambda n: b[:n] + bytes([b[n] ^ 0xFF]) + b[n + 1 :])),
        st.sampled_from(
            [
                b"",
                _png_header(65535, 65535),
                _png_header(4096, 4096),
                _png_header(1, 1),
                _png_header(0, 0),
                b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
                b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n",
                b"P6\n1 1\n255\n\x00\x00\x00",
                b"BM" + b"\x00" * 60,
                b"\xff\xd8\xff\xe0" + b"\x00" * 32,
            ]
        ),
    )


FLOATS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38, 0.0, -0.0, 1e-45, 1.0, -1.0, 1e6, 0.5]),
    st.floats(width=32),
)
STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            DEFAULT_FR_MODEL,
            DEFAULT_DECODER_MODEL,
            f"{DEFAULT_FR_MODEL}@champion",
            "champion",
            "challenger",
            "no-such-model",
            "../../../../etc/passwd",
            "/etc/passwd",
            "..",
            "faces/../../outside",
            "~root/.ssh",
            "file:///etc/passwd",
            "a\x00b",
            "x" * 5000,
            "Smiling",
            "age",
            "eyes",
            "knn",
            "ward",
            "cosine",
            "l2",
            "ñ😀‮",
            "%s%n%x",
            "${jndi:ldap://x}",
        ]
    ),
    st.text(max_size=24),
)
_INT_EDGES = {
    _d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    _d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    _d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    _d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _poke(values: list[float], index: int, value: float) -> list[float]:
    return [*values[:index], value, *values[index + 1 :]]


def _ints(fd: Any) -> st.SearchStrategy[int]:
    lo, hi = _INT_EDGES[fd.type]
    edges = [v for v in (0, 1, -1, 2, 3, 8, 64, 1000, 10**6, lo, hi) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _enum(fd: Any) -> st.SearchStrategy[int]:
    known = [v.number for v in fd.enum_type.values]
    return st.sampled_from([*known, max(known) + 1, 99, -1, 2**31 - 1])


MAX_REPEATED = 70  # beyond every batch limit the fuzzed servers run with (FACEXPLAIN_MAX_BATCH_SIZE etc.)


class Fuzzer:
    """Strategies over messages, with real faces and templates among the leaves."""

    def __init__(self, material: Material) -> None:
        self.m = material
        self.bytes = byte_values(material.faces)

    # one scalar value for a field of scalar type
    def scalar(self, fd: Any) -> st.SearchStrategy[Any]:
        t = fd.type
        if t == fd.TYPE_BYTES:
            return self.bytes
        if t == fd.TYPE_STRING:
            return STRINGS
        if t == fd.TYPE_BOOL:
            return st.booleans()
        if t in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
            return FLOATS
        if t == fd.TYPE_ENUM:
            return _enum(fd)
        return _ints(fd)

    def template_values(self) -> st.SearchStrategy[list[float]]:
        real = st.sampled_from(self.m.templates).map(lambda t: list(t.values))
        return st.one_of(
            real,
            real.flatmap(lambda v: st.tuples(st.integers(0, len(v) - 1), FLOATS).map(lambda p: _poke(v, *p))),
            real.map(lambda v: v[:-1]),
            real.map(lambda v: [*v, 0.0]),
            real.map(lambda v: [x * 1e30 for x in v]),
            st.sampled_from([[], [0.0] * 128, [math.nan] * 128, [3e38] * 128, [1.0] * 100_000]),
            st.lists(FLOATS, max_size=140),
        )

    def special(self, desc: Any, depth: int) -> st.SearchStrategy[Message] | None:
        """Hand-made strategies for the messages that carry biometric data."""
        if desc.full_name == "facexplain.v1.Template":
            return st.builds(
                lambda v, dim, model: common_pb2.Template(values=v, dim=dim, model=model),
                self.template_values(),
                st.sampled_from([0, 128, 127, 129, -1, 2**31 - 1]),
                st.one_of(
                    st.just(self.m.templates[0].model),
                    self.random(common_pb2.ModelRef.DESCRIPTOR, depth + 1),
                ),
            )
        if desc.full_name == "facexplain.v1.Tensor":
            dims = st.sampled_from([0, 1, 3, 150, 4096, 65535, 2**31 - 1, -1, -(2**40), 2**62])
            return st.builds(
                lambda dtype, shape, data: common_pb2.Tensor(dtype=dtype, shape=shape, data=data),
                st.sampled_from([0, 1, 2, 7, -3]),
                st.lists(dims, max_size=6),
                st.one_of(st.binary(max_size=512), st.sampled_from([b"\x00" * (150 * 150 * 3), b"\x7f" * 4096])),
            )
        return None

    def message(self, desc: Any, depth: int = 0) -> st.SearchStrategy[Message]:
        special = self.special(desc, depth)
        return special if special is not None else self.random(desc, depth)

    def random(self, desc: Any, depth: int = 0) -> st.SearchStrategy[Message]:
        """A message of type ``desc`` with a random subset of its fields set (nesting stops at depth 4)."""
        cls = message_factory.GetMessageClass(desc)
        fields = list(desc.fields)

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            msg = cls()
            for fd in fields:
                if depth >= 4 and fd.type == fd.TYPE_MESSAGE:
                    continue
                if draw(st.booleans()):
                    self.assign(draw, msg, fd, depth + 1)
            return msg

        return build()

    def assign(self, draw: st.DrawFn, parent: Message, fd: Any, depth: int) -> None:
        """Give ``parent.<fd>`` an adversarial value (cleared, emptied, oversized or replaced)."""
        name = fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            target = getattr(parent, name)
            target.clear()
            key_fd, val_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            if val_fd.type == val_fd.TYPE_MESSAGE:
                return
            for k, v in draw(st.dictionaries(self.scalar(key_fd), self.scalar(val_fd), max_size=4)).items():
                target[k] = v
            return
        if fd.is_repeated:
            target = getattr(parent, name)
            existing = [_copy(x) for x in target] if fd.type == fd.TYPE_MESSAGE else list(target)
            if fd.type == fd.TYPE_MESSAGE:
                choice = draw(st.sampled_from(["empty", "oversized", "random", "duplicate"]))
                if choice == "oversized" and existing:
                    new = [existing[0]] * MAX_REPEATED
                elif choice == "duplicate" and existing:
                    new = existing + existing
                elif choice in ("random", "oversized", "duplicate"):
                    new = draw(st.lists(self.message(fd.message_type, depth), min_size=1, max_size=3))
                else:
                    new = []
                del target[:]
                target.extend(new)
            else:
                if name in ("values", "vector", "value") and fd.type == fd.TYPE_FLOAT:
                    vals = draw(self.template_values())
                else:
                    vals = draw(
                        st.one_of(
                            st.lists(self.scalar(fd), max_size=5),
                            self.scalar(fd).map(lambda v: [v] * (200 if isinstance(v, str | bytes) else 2000)),
                        )
                    )
                del target[:]
                target.extend(vals)
            return
        if fd.type == fd.TYPE_MESSAGE:
            if draw(st.integers(0, 4)) == 0:
                parent.ClearField(name)
            else:
                getattr(parent, name).CopyFrom(draw(self.message(fd.message_type, depth)))
            return
        value = draw(self.scalar(fd))
        if fd.type == fd.TYPE_FLOAT and math.isfinite(value) and abs(value) > 3.4e38:
            value = math.copysign(math.inf, value)
        setattr(parent, name, value)

    def mutated(self, seed: Message) -> st.SearchStrategy[Message]:
        """``seed`` with one to three of its fields (at any depth) given adversarial values."""

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            msg = _copy(seed)
            for _ in range(draw(st.integers(1, 3))):
                slots = list(field_slots(msg))
                if not slots:
                    break
                parent, fd, depth = draw(st.sampled_from(slots))
                self.assign(draw, parent, fd, depth)
            return msg

        return build()

    def requests(self, rpc: Rpc, seed: Message | None) -> st.SearchStrategy[Message]:
        """Mostly mutations of the good request (they get past the first check), some random messages."""
        rand = self.random(rpc.request_cls.DESCRIPTOR)
        if seed is None or not seed.DESCRIPTOR.fields:
            return rand
        return st.one_of(self.mutated(seed), self.mutated(seed), self.mutated(seed), rand)


def _copy(msg: Message) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def field_slots(msg: Message, depth: int = 0) -> Iterator[tuple[Message, Any, int]]:
    """Every (message, field) a mutation may touch: the fields of ``msg`` and of the messages set in it."""
    fields: list[Any] = list(msg.DESCRIPTOR.fields)
    for fd in fields:
        yield msg, fd, depth
        if fd.type != fd.TYPE_MESSAGE or depth >= 4:
            continue
        if fd.message_type.GetOptions().map_entry:
            continue
        if fd.is_repeated:
            for child in list(getattr(msg, fd.name))[:3]:
                yield from field_slots(child, depth + 1)
        elif msg.HasField(fd.name):
            yield from field_slots(getattr(msg, fd.name), depth + 1)
