"""Direction sets and equivariance maps on the wire: the bundle dataclasses <-> directions.proto messages.

The service keeps sets as :mod:`facexplain.artifacts.direction_set` dataclasses (plain numbers, the
form a registry artifact stores) and builds messages only for responses, so a set read back from the
registry and one computed a minute ago answer through the same code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from facexplain.artifacts.direction_set import DirectionSetData, EquivarianceMapData, EquivarianceSetData
from facexplain.directions.equivariance import GeometricTransform
from services.api.v1 import common_pb2, directions_pb2
from services.kit.errors import InvalidArgument

_KIND_NAMES = {
    directions_pb2.TRANSFORM_KIND_ROTATION: "rotation",
    directions_pb2.TRANSFORM_KIND_TRANSLATION: "translation",
    directions_pb2.TRANSFORM_KIND_SCALE: "scale",
}
_KIND_ENUMS = {v: k for k, v in _KIND_NAMES.items()}


@dataclass
class StoredSet:
    """A set the service holds, and the registry version it came from or went to (if any)."""

    data: DirectionSetData | EquivarianceSetData
    registered_name: str = ""
    registered_version: str = ""
    registered_alias: str = ""

    @property
    def set_id(self) -> str:
        return self.data.set_id

    @property
    def method(self) -> str:
        return self.data.method if isinstance(self.data, DirectionSetData) else "equivariance"

    def registered_ref(self) -> common_pb2.ModelRef:
        return common_pb2.ModelRef(
            name=self.registered_name, version=self.registered_version, alias=self.registered_alias
        )

    def fr_ref(self) -> common_pb2.ModelRef:
        return common_pb2.ModelRef(name=self.data.fr_name, version=self.data.fr_version)


def _timestamp(iso: str) -> Timestamp:
    ts = Timestamp()
    if iso:
        with contextlib.suppress(ValueError):  # an unparsable stamp stays unset rather than failing a read
            ts.FromJsonString(iso)
    return ts


def template_proto(
    vec: np.ndarray | torch.Tensor, fr: common_pb2.ModelRef, normalized: bool = False
) -> common_pb2.Template:
    values = np.asarray(vec.detach().cpu() if isinstance(vec, torch.Tensor) else vec, dtype=np.float32).reshape(-1)
    return common_pb2.Template(values=values.tolist(), dim=int(values.size), model=fr, normalized=normalized)


def matrix_proto(arr: np.ndarray) -> common_pb2.Tensor:
    a = np.ascontiguousarray(arr, dtype="<f4")
    return common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())


def direction_set_proto(entry: StoredSet, include_vectors: bool = True) -> directions_pb2.DirectionSet:
    d = entry.data
    assert isinstance(d, DirectionSetData)
    fr = entry.fr_ref()
    msg = directions_pb2.DirectionSet(
        id=d.set_id,
        method=d.method,
        target=d.target,
        fr_model=fr,
        data_manifest_sha256=d.data_manifest_sha256,
        seed=int(d.seed),
        created_at=_timestamp(d.created_at),
        n_items=int(d.n_items),
        metrics=dict(d.metrics),
        params=dict(d.params),
    )
    if entry.registered_name:
        msg.registered.CopyFrom(entry.registered_ref())
    for k, name in enumerate(d.names):
        direction = directions_pb2.Direction(
            name=name,
            eigenvalue=float(d.eigenvalues[k]),
            explained_variance=float(d.explained_variance[k]),
            stddev=float(d.stddev[k]),
        )
        if include_vectors:
            direction.vector.extend(np.asarray(d.vectors[k], dtype=np.float32).tolist())
        msg.directions.append(direction)
    if d.centroids is not None:
        for k, name in enumerate(d.centroid_names):
            c = directions_pb2.Centroid(name=name, value=float(d.centroid_values[k]), count=int(d.centroid_counts[k]))
            if include_vectors:
                c.template.CopyFrom(template_proto(d.centroids[k], fr, normalized=d.centroids_normalized))
            msg.centroids.append(c)
    return msg


def transform_proto(m: EquivarianceMapData) -> directions_pb2.Transform:
    return directions_pb2.Transform(
        kind=_KIND_ENUMS[m.kind], angle_degrees=m.angle_degrees, dx=m.dx, dy=m.dy, scale=m.scale
    )


def equivariance_proto(entry: StoredSet, include_vectors: bool = True) -> directions_pb2.EquivarianceMaps:
    d = entry.data
    assert isinstance(d, EquivarianceSetData)
    msg = directions_pb2.EquivarianceMaps(
        id=d.set_id,
        fr_model=entry.fr_ref(),
        data_manifest_sha256=d.data_manifest_sha256,
        seed=int(d.seed),
        created_at=_timestamp(d.created_at),
        n_items=int(d.n_items),
    )
    if entry.registered_name:
        msg.registered.CopyFrom(entry.registered_ref())
    for m in d.maps:
        out = directions_pb2.EquivarianceMap(
            transform=transform_proto(m),
            forward_cosine=float(m.forward_cosine),
            inverse_cosine=float(m.inverse_cosine),
            baseline_cosine=float(m.baseline_cosine),
        )
        if include_vectors:
            out.forward.CopyFrom(matrix_proto(m.forward))
            out.forward_bias.extend(np.asarray(m.forward_bias, dtype=np.float32).tolist())
            out.inverse.CopyFrom(matrix_proto(m.inverse))
            out.inverse_bias.extend(np.asarray(m.inverse_bias, dtype=np.float32).tolist())
        msg.maps.append(out)
    return msg


# -- transforms ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedTransform:
    """A request transform, validated: its wire fields and the chip-pixel transform it means."""

    kind: str
    angle_degrees: float
    dx: float
    dy: float
    scale: float

    def geometric(self, chip_size: int) -> GeometricTransform:
        """As :class:`GeometricTransform` on a ``chip_size`` chip (translations are fractions of the chip)."""
        if self.kind == "rotation":
            return GeometricTransform(angle=self.angle_degrees)
        if self.kind == "translation":
            return GeometricTransform(tx=self.dx * chip_size, ty=self.dy * chip_size)
        return GeometricTransform(scale=self.scale)

    def label(self) -> str:
        if self.kind == "rotation":
            return f"rotation {self.angle_degrees:g} deg"
        if self.kind == "translation":
            return f"translation ({self.dx:g}, {self.dy:g})"
        return f"scale {self.scale:g}"


def check_transform(t: directions_pb2.Transform, which: str) -> CheckedTransform:
    """A wire Transform with only its kind's fields kept; INVALID_ARGUMENT when it cannot be applied."""
    if t.kind not in _KIND_NAMES:
        raise InvalidArgument(f"{which}: transform kind is not set (rotation, translation or scale)")
    kind = _KIND_NAMES[t.kind]
    values = (t.angle_degrees, t.dx, t.dy, t.scale)
    if not all(math.isfinite(v) for v in values):
        raise InvalidArgument(f"{which}: transform parameters must be finite")
    if kind == "rotation":
        return CheckedTransform(kind, float(t.angle_degrees), 0.0, 0.0, 0.0)
    if kind == "translation":
        if abs(t.dx) >= 1 or abs(t.dy) >= 1:
            raise InvalidArgument(f"{which}: translation dx, dy are fractions of the chip and must lie in (-1, 1)")
        return CheckedTransform(kind, 0.0, float(t.dx), float(t.dy), 0.0)
    if not t.scale > 0:
        raise InvalidArgument(f"{which}: scale must be > 0 (1 = identity), got {t.scale}")
    return CheckedTransform(kind, 0.0, 0.0, 0.0, float(t.scale))


def transform_distance(a: CheckedTransform, m: EquivarianceMapData) -> float:
    """How far a requested transform is from a fitted one of the same kind (inf for another kind)."""
    if a.kind != m.kind:
        return math.inf
    if a.kind == "rotation":
        return abs(a.angle_degrees - m.angle_degrees)
    if a.kind == "translation":
        return math.hypot(a.dx - m.dx, a.dy - m.dy)
    return abs(math.log(a.scale / m.scale)) if m.scale > 0 else math.inf
