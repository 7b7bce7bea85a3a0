"""Templates on the wire: validated on the way in, labelled with their model on the way out."""

from __future__ import annotations

import math

import torch

from services.api.v1 import common_pb2
from services.kit.errors import FailedPrecondition, InvalidArgument
from services.kit.models import ServedModel

# Real templates have values well under 1 (the default model's norm is about 1.5) and edited ones stay
# within a few units; 3e38 is finite yet squares to inf, so Verify answered L2 = inf, cosine 0 (issue 23).
MAX_TEMPLATE_ABS = 1e4


def template_to_proto(vec: torch.Tensor, served: ServedModel, normalized: bool = False) -> common_pb2.Template:
    v = vec.detach().float().cpu()
    if normalized:
        v = torch.nn.functional.normalize(v, dim=0)
    return common_pb2.Template(values=v.tolist(), dim=int(v.numel()), model=served.ref(), normalized=normalized)


def template_from_proto(
    t: common_pb2.Template,
    expected_dim: int,
    model_name: str,
    *,
    model_version: str = "",
    allow_zero: bool = False,
) -> torch.Tensor:
    """A request template as a float32 vector, or INVALID_ARGUMENT / FAILED_PRECONDITION saying why not.

    ``model_name`` / ``model_version`` are the FR model the caller's templates must come from. A
    template naming another model is FAILED_PRECONDITION, and so is one naming another version when
    both sides name one (common.proto, Template.model): templates of two versions of one model live
    in different spaces, so comparing or decoding them across versions gives confident nonsense.
    """
    n = len(t.values)
    if n == 0:
        raise InvalidArgument("template has no values")
    if t.dim and t.dim != n:
        raise InvalidArgument(f"template.dim is {t.dim} but it carries {n} values")
    if n != expected_dim:
        raise InvalidArgument(f"template has dimension {n}; model {model_name!r} uses {expected_dim}")
    if t.model.name and t.model.name != model_name:
        raise FailedPrecondition(f"template was produced by model {t.model.name!r}, this service serves {model_name!r}")
    if t.model.version and model_version and t.model.version != model_version:
        raise FailedPrecondition(
            f"template was produced by {t.model.name or model_name!r} version {t.model.version}, this service serves "
            f"version {model_version}; templates of different versions are not comparable"
        )
    if not all(math.isfinite(x) for x in t.values):
        raise InvalidArgument("template contains NaN or infinite values")
    vec = torch.tensor(list(t.values), dtype=torch.float32)
    peak = float(vec.abs().max())
    if peak > MAX_TEMPLATE_ABS:
        raise InvalidArgument(
            f"template has a value of magnitude {peak:.3g}, beyond the sane range of +-{MAX_TEMPLATE_ABS:g} for a "
            "template (finite but huge values overflow distances to inf)"
        )
    if not allow_zero and float(vec.abs().max()) == 0.0:
        raise InvalidArgument("template is the zero vector")
    return vec
