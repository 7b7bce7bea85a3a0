"""Typed Python clients over the generated gRPC stubs.

One client per service (``EmbeddingClient``, ``DecodingClient``, ``DirectionsClient``,
``AttributesClient``, ``CounterfactualClient``) and :class:`Facexplain`, the facade over all five.
Retries cover UNAVAILABLE only (a server restarting or a pod rolling), with backoff; every call
carries a deadline so an audit pipeline never hangs on a dead service; streaming RPCs return iterators.
A target may name several servers (``dns:///NAME:PORT`` for a headless Service's pods, or
``ipv4:ADDR:PORT,ADDR:PORT``): every channel balances its calls over them round-robin (:func:`service_config`).
TLS (mutual TLS with a client certificate) and the bearer token come from ``FACEXPLAIN_TLS_CA_FILE``,
``FACEXPLAIN_TLS_CLIENT_CERT_FILE``, ``FACEXPLAIN_TLS_CLIENT_KEY_FILE`` and ``FACEXPLAIN_TOKEN`` unless a
:class:`ClientSecurity` is given; ``tls=True`` (with optional ``root_certificates``) also opens secure channels.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
import numpy as np

from services.api.v1 import (
    attributes_pb2,
    attributes_pb2_grpc,
    common_pb2,
    counterfactual_pb2,
    counterfactual_pb2_grpc,
    decoding_pb2,
    decoding_pb2_grpc,
    directions_pb2,
    directions_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
)

R = TypeVar("R")
C = TypeVar("C", bound="_ServiceClient")
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


# How a target names its servers (gRPC's naming: https://grpc.github.io/grpc/core/md_doc_naming.html):
#   HOST:PORT                        one server (DNS name or address; [IPv6]:PORT)
#   dns:///NAME:PORT                 every address NAME resolves to, e.g. a headless Service's ready pods
#                                    (dns:///facexplain-embedding-pods.facexplain.svc:50051)
#   ipv4:ADDR:PORT,ADDR:PORT,...     a fixed list (ipv6:[ADDR]:PORT,... likewise)
# The channel spreads calls over every address with round_robin; with one address it behaves as pick_first did.
TARGET_SYNTAX = (
    "HOST:PORT, dns:///NAME:PORT (every address NAME resolves to, e.g. a headless Service) or "
    "ipv4:ADDR:PORT,ADDR:PORT (a list); calls are spread round-robin over the addresses"
)


def service_config(attempts: int) -> str:
    """The channel's default service config: round_robin over every address the target resolves to, and
    retries of UNAVAILABLE with backoff.

    round_robin and not gRPC's default pick_first because pick_first sends every call of a channel to the
    first address that connects: behind a headless Service (one DNS record per ready pod) one SDK client, and
    so one audit, would load one replica however many the HPA or the overlay's replica count add.
    """
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": ""}],
                    "retryPolicy": {
                        "maxAttempts": max(2, attempts),
                        "initialBackoff": "0.2s",
                        "maxBackoff": "5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


# Client security from the environment (the same names the CLI flags set): what lets the SDK, the CLI and the
# audit reach a server with TLS and tokens without each caller threading the settings through.
ENV_TLS_CA_FILE = "FACEXPLAIN_TLS_CA_FILE"
ENV_TLS_CLIENT_CERT_FILE = "FACEXPLAIN_TLS_CLIENT_CERT_FILE"
ENV_TLS_CLIENT_KEY_FILE = "FACEXPLAIN_TLS_CLIENT_KEY_FILE"
ENV_TOKEN = "FACEXPLAIN_TOKEN"
ENV_ALLOW_INSECURE = "FACEXPLAIN_ALLOW_INSECURE"


class ClientSecurityError(ValueError):
    """The client's TLS or token settings cannot be used (a file unreadable, a certificate without its key,
    a token that would travel in plaintext); the message names the setting."""


@dataclass(frozen=True)
class ClientSecurity:
    """How a client proves the server's identity and its own: CA bundle, client certificate, bearer token.

    ``tls`` alone uses the system's root certificates; a CA file or a client certificate turns TLS on.
    """

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token: str = field(default="", repr=False)
    tls: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        env = os.environ if environ is None else environ
        return cls(
            ca_file=env.get(ENV_TLS_CA_FILE, ""),
            cert_file=env.get(ENV_TLS_CLIENT_CERT_FILE, ""),
            key_file=env.get(ENV_TLS_CLIENT_KEY_FILE, ""),
            token=env.get(ENV_TOKEN, "").strip(),
        )

    @property
    def use_tls(self) -> bool:
        return bool(self.tls or self.ca_file or self.cert_file)

    def channel_credentials(self, root_certificates: bytes | None = None) -> grpc.ChannelCredentials:
        if bool(self.cert_file) != bool(self.key_file):
            raise ClientSecurityError(
                f"a client certificate needs both {ENV_TLS_CLIENT_CERT_FILE} and {ENV_TLS_CLIENT_KEY_FILE} "
                "(--tls-client-cert-file, --tls-client-key-file)"
            )

        def read(path: str, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ClientSecurityError(f"{what} {path}: cannot read it ({exc.strerror})") from None

        ca = read(self.ca_file, ENV_TLS_CA_FILE) if self.ca_file else root_certificates
        cert = read(self.cert_file, ENV_TLS_CLIENT_CERT_FILE) if self.cert_file else None
        key = read(self.key_file, ENV_TLS_CLIENT_KEY_FILE) if self.key_file else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class _CallDetails(
    namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization: Bearer <token>`` to every call (plaintext allowed only where open_channel allows it)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(d.metadata or ()), self._header]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


def target_hosts(target: str) -> list[str]:
    """The host part of every address in a gRPC target (names as written: a DNS name is not resolved).

    ``ipv4:``/``ipv6:`` lists give one host per address; ``dns:[//AUTHORITY]/NAME:PORT`` gives NAME;
    ``unix:`` sockets give ``localhost`` (they never leave the machine); anything else is one ``HOST[:PORT]``.
    """
    scheme, sep, rest = target.partition(":")
    scheme = scheme.lower()
    if sep and scheme in ("ipv4", "ipv6"):
        addresses = [a for a in rest.split(",") if a.strip()]
    elif sep and scheme == "dns":
        addresses = [rest[2:].split("/", 1)[-1] if rest.startswith("//") else rest]
    elif sep and scheme in ("unix", "unix-abstract"):
        return ["localhost"]
    else:
        addresses = [target]
    return [_host_of(a.strip()) for a in addresses]


def _host_of(address: str) -> str:
    if address.startswith("["):  # [IPv6]:PORT
        return address[1 : address.find("]")] if "]" in address else address[1:]
    if address.count(":") == 1:  # HOST:PORT
        return address.rsplit(":", 1)[0]
    return address  # HOST without a port, or a bare IPv6 address


def _loopback_target(target: str) -> bool:
    """Whether every address of ``target`` is this machine's loopback: only then may a token travel in plaintext
    (a list or a DNS name with one address elsewhere would carry it off the machine on some of the calls)."""
    hosts = target_hosts(target)

    def loopback(host: str) -> bool:
        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    return bool(hosts) and all(loopback(h) for h in hosts)


def open_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    security: ClientSecurity | None = None,
    token: str | None = None,
    server_name: str = "",
    retries: int = 4,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE,
) -> grpc.Channel:
    """A channel with retry-on-UNAVAILABLE, round_robin over the target's addresses and generous message limits
    (images travel in requests). ``target`` is ``HOST:PORT``, ``dns:///NAME:PORT`` (every address NAME resolves
    to: a headless Service's pods) or ``ipv4:ADDR:PORT,ADDR:PORT``; calls spread over all of them.

    Security comes from ``security`` or, by default, the ``FACEXPLAIN_TLS_*`` / ``FACEXPLAIN_TOKEN``
    environment; ``tls``/``root_certificates``/``token`` add to it. ``server_name`` overrides the name the
    server's certificate is checked against (a port-forward to a pod). A token is never sent in plaintext
    to a host other than loopback unless ``FACEXPLAIN_ALLOW_INSECURE=1``.
    """
    sec = security if security is not None else ClientSecurity.from_env()
    if tls:
        sec = replace(sec, tls=True)
    if token is not None:
        sec = replace(sec, token=token)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(retries)),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    secure = sec.use_tls or root_certificates is not None
    if secure:
        channel = grpc.secure_channel(target, sec.channel_credentials(root_certificates), options=options)
    else:
        insecure_ok = os.environ.get(ENV_ALLOW_INSECURE, "").lower() in ("1", "true", "yes", "on")
        if sec.token and not _loopback_target(target) and not insecure_ok:
            raise ClientSecurityError(
                f"refusing to send a token in plaintext to {target}: configure TLS ({ENV_TLS_CA_FILE}, "
                f"--tls-ca-file) or set {ENV_ALLOW_INSECURE}=1 on a trusted network"
            )
        channel = grpc.insecure_channel(target, options=options)
    if sec.token:
        return grpc.intercept_channel(channel, _BearerToken(sec.token))
    return channel


def wait_ready(channel: grpc.Channel, timeout: float) -> None:
    """Block until the channel connects; raise a readable error naming the target otherwise."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise ConnectionError(f"service not reachable within {timeout:.0f} s") from None


def image_from_path(path: Path) -> common_pb2.Image:
    return common_pb2.Image(encoded=Path(path).read_bytes())


def template_array(t: common_pb2.Template) -> np.ndarray:
    return np.asarray(t.values, dtype=np.float32)


class _ServiceClient:
    """What every facexplain client shares: the channel, per-call deadlines, and the model lifecycle RPCs
    (``ModelStatus`` / ``Reload``) that every service has (common.proto)."""

    stub_class: Any
    default_timeout = 60.0

    def __init__(self, target: str | grpc.Channel, *, timeout: float | None = None, **channel_kwargs: Any) -> None:
        self.channel = open_channel(target, **channel_kwargs) if isinstance(target, str) else target
        self.stub = self.stub_class(self.channel)
        self.timeout = self.default_timeout if timeout is None else timeout

    def _call(self, fn: Callable[..., R], request: Any, timeout: float | None) -> R:
        return fn(request, timeout=self.timeout if timeout is None else timeout, wait_for_ready=True)

    def model_status(self, *, timeout: float | None = None) -> common_pb2.ModelStatusResponse:
        return self._call(self.stub.ModelStatus, common_pb2.ModelStatusRequest(), timeout)

    def reload(self, model_name: str = "", *, timeout: float | None = None) -> common_pb2.ReloadResponse:
        """Re-resolve the aliases now (every model the service follows, or only ``model_name``) and hot-swap."""
        return self._call(self.stub.Reload, common_pb2.ReloadRequest(model_name=model_name), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _input_mode(aligned: bool) -> embedding_pb2.InputMode.ValueType:
    return embedding_pb2.INPUT_MODE_ALIGNED if aligned else embedding_pb2.INPUT_MODE_UNSPECIFIED


class EmbeddingClient(_ServiceClient):
    """Client for ``facexplain.v1.EmbeddingService``."""

    stub_class = embedding_pb2_grpc.EmbeddingServiceStub

    def embed(
        self,
        image: common_pb2.Image,
        *,
        normalize: bool = False,
        return_aligned: bool = False,
        aligned: bool = False,
        timeout: float | None = None,
    ) -> embedding_pb2.EmbedResponse:
        """``aligned=True``: ``image`` is already a chip of the served model's geometry (INPUT_MODE_ALIGNED),
        embedded without detection; a chip of another size is INVALID_ARGUMENT."""
        req = embedding_pb2.EmbedRequest(
            image=image, normalize=normalize, return_aligned=return_aligned, input_mode=_input_mode(aligned)
        )
        return self._call(self.stub.Embed, req, timeout)

    def embed_batch(
        self,
        images: list[common_pb2.Image],
        *,
        normalize: bool = False,
        return_aligned: bool = False,
        aligned: bool = False,
        timeout: float | None = None,
    ) -> embedding_pb2.EmbedBatchResponse:
        req = embedding_pb2.EmbedBatchRequest(
            images=images, normalize=normalize, return_aligned=return_aligned, input_mode=_input_mode(aligned)
        )
        return self._call(self.stub.EmbedBatch, req, timeout)

    def verify(
        self, a: common_pb2.Probe, b: common_pb2.Probe, *, timeout: float | None = None
    ) -> embedding_pb2.VerifyResponse:
        return self._call(self.stub.Verify, embedding_pb2.VerifyRequest(a=a, b=b), timeout)

    def landmarks(
        self, image: common_pb2.Image, *, all_faces: bool = False, timeout: float | None = None
    ) -> embedding_pb2.LandmarksResponse:
        return self._call(
            self.stub.Landmarks, embedding_pb2.LandmarksRequest(image=image, all_faces=all_faces), timeout
        )


class DecodingClient(_ServiceClient):
    """Client for ``facexplain.v1.DecodingService`` (template -> face image with the served decoder).

    Templates go in as ``common_pb2.Template`` (e.g. ``EmbedResponse.template`` from the embedding
    service, or :meth:`template` for a plain vector); images come back PNG-encoded.
    """

    stub_class = decoding_pb2_grpc.DecodingServiceStub

    @staticmethod
    def template(
        values: Any, *, model: common_pb2.ModelRef | None = None, normalized: bool = False
    ) -> common_pb2.Template:
        """A ``Template`` from any 1-D float sequence (numpy array, list, tensor.tolist())."""
        vec = np.asarray(values, dtype=np.float32).reshape(-1)
        return common_pb2.Template(values=vec.tolist(), dim=int(vec.size), model=model, normalized=normalized)

    def decode(self, template: common_pb2.Template, *, timeout: float | None = None) -> decoding_pb2.DecodeResponse:
        return self._call(self.stub.Decode, decoding_pb2.DecodeRequest(template=template), timeout)

    def decode_batch(
        self, templates: list[common_pb2.Template], *, timeout: float | None = None
    ) -> decoding_pb2.DecodeBatchResponse:
        return self._call(self.stub.DecodeBatch, decoding_pb2.DecodeBatchRequest(templates=templates), timeout)

    def reconstruct(
        self,
        image: common_pb2.Image,
        *,
        selection: embedding_pb2.FaceSelection.ValueType = embedding_pb2.FACE_SELECTION_UNSPECIFIED,
        timeout: float | None = None,
    ) -> decoding_pb2.ReconstructResponse:
        req = decoding_pb2.ReconstructRequest(image=image, selection=selection)
        return self._call(self.stub.Reconstruct, req, timeout)

    def occlude(
        self,
        image: common_pb2.Image,
        regions: list[str] | None = None,
        *,
        selection: embedding_pb2.FaceSelection.ValueType = embedding_pb2.FACE_SELECTION_UNSPECIFIED,
        timeout: float | None = None,
    ) -> decoding_pb2.OccludeResponse:
        req = decoding_pb2.OccludeRequest(image=image, regions=regions or [], selection=selection)
        return self._call(self.stub.Occlude, req, timeout)

    def interpolate(
        self,
        a: common_pb2.Template,
        b: common_pb2.Template,
        *,
        steps: int = 0,
        mode: decoding_pb2.InterpolationMode.ValueType = decoding_pb2.INTERPOLATION_MODE_UNSPECIFIED,
        strip: bool = False,
        timeout: float | None = None,
    ) -> decoding_pb2.InterpolateResponse:
        req = decoding_pb2.InterpolateRequest(a=a, b=b, steps=steps, mode=mode, strip=strip)
        return self._call(self.stub.Interpolate, req, timeout)


def labeled_image(
    item_id: str,
    *,
    image: common_pb2.Image | None = None,
    template: common_pb2.Template | None = None,
    identity: str = "",
    labels: dict[str, float] | None = None,
) -> common_pb2.LabeledImage:
    """One dataset item: a face as an image or as a template, its identity and numeric labels."""
    if (image is None) == (template is None):
        raise ValueError("give exactly one of image and template")
    item = common_pb2.LabeledImage(id=item_id, identity=identity, labels=labels or {})
    if image is not None:
        item.image.CopyFrom(image)
    else:
        assert template is not None
        item.template.CopyFrom(template)
    return item


def inline_dataset(items: list[common_pb2.LabeledImage], name: str = "") -> common_pb2.Dataset:
    """A dataset sent with the request (bounded by the server's message size)."""
    return common_pb2.Dataset(name=name, inline=common_pb2.LabeledImages(items=items))


def server_dataset(
    path: str, *, labels_file: str = "", max_items: int = 0, sample_seed: int = 0, name: str = ""
) -> common_pb2.Dataset:
    """A dataset in a folder under the server's data root (FACEXPLAIN_DATA_ROOT)."""
    return common_pb2.Dataset(
        name=name or path,
        server=common_pb2.ServerDataset(
            path=path, labels_file=labels_file, max_items=max_items, sample_seed=sample_seed
        ),
    )


def folder_dataset(spec: str, name: str = "") -> tuple[common_pb2.Dataset, list[str]]:
    """``DIR`` or ``DIR,LABELS.csv`` on this machine as an inline dataset, read as training reads folders
    (:func:`facexplain.data.faceset.records_from_spec`); returns the dataset and its label names.
    Item ids are the image paths relative to the image root."""
    # facexplain.data.faceset imports torch: only a caller reading a local folder pays for it
    from facexplain.data.faceset import records_from_spec

    root, records, names = records_from_spec(spec)
    items = [
        labeled_image(
            rec.path.relative_to(root).as_posix(),
            image=image_from_path(rec.path),
            identity=rec.identity,
            labels={k: v for k, v in rec.labels.items() if not np.isnan(v)},
        )
        for rec in records
    ]
    return inline_dataset(items, name or Path(spec.split(",")[0]).name), names


def set_ref(text: str) -> common_pb2.DirectionSetRef:
    """``ID`` (a set held by the server), ``NAME@VERSION`` or ``NAME@ALIAS`` (a registered set)."""
    if "@" in text:
        name, _, which = text.partition("@")
        model = (
            common_pb2.ModelRef(name=name, version=which)
            if which.isdigit()
            else common_pb2.ModelRef(name=name, alias=which)
        )
        return common_pb2.DirectionSetRef(registered=model)
    return common_pb2.DirectionSetRef(id=text)


ProgressCallback = Callable[[common_pb2.Progress], None]


def drain_stream(events: Any, final: str, rpc: str, on_progress: ProgressCallback | None = None) -> Any:
    """Read a job stream of Progress events and one final message (oneof field ``final``); return that message.

    The streaming jobs (Importance, DefenceReport) all end this way; a stream that ends without the final
    message (the server was stopped mid-job) raises instead of returning None.
    """
    last = None
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "progress":
            if on_progress is not None:
                on_progress(event.progress)
        elif kind == final:
            last = getattr(event, final)
    if last is None:
        raise RuntimeError(f"the {rpc} stream ended without a {final}")
    return last


class DirectionsClient(_ServiceClient):
    """Client for ``facexplain.v1.DirectionsService`` (discover, store and apply template-space directions).

    Discovery RPCs stream events: :meth:`discover_ssi` and friends return the raw event iterator
    (cancel it with ``.cancel()``), :meth:`run` drains one into its results while passing Progress
    events to a callback (a progress bar).
    """

    stub_class = directions_pb2_grpc.DirectionsServiceStub
    default_timeout = 600.0

    # -- discovery (server-streaming) -----------------------------------------------------------------------
    def discover_ssi(
        self, request: directions_pb2.DiscoverSSIRequest, *, timeout: float | None = None
    ) -> Any:  # grpc call: an iterator of DiscoveryEvent with .cancel()
        return self._call(self.stub.DiscoverSSI, request, timeout)

    def discover_centroid(
        self, request: directions_pb2.DiscoverCentroidRequest, *, timeout: float | None = None
    ) -> Any:
        return self._call(self.stub.DiscoverCentroid, request, timeout)

    def discover_regression(
        self, request: directions_pb2.DiscoverRegressionRequest, *, timeout: float | None = None
    ) -> Any:
        return self._call(self.stub.DiscoverRegression, request, timeout)

    def fit_equivariance(self, request: directions_pb2.FitEquivarianceRequest, *, timeout: float | None = None) -> Any:
        return self._call(self.stub.FitEquivariance, request, timeout)

    @staticmethod
    def run(events: Any, on_progress: ProgressCallback | None = None) -> DiscoveryResult:
        """Drain a discovery stream: Progress events go to ``on_progress``, the rest are collected."""
        out = DiscoveryResult()
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "progress":
                if on_progress is not None:
                    on_progress(event.progress)
            elif kind == "result":
                out.sets.append(event.result)
            elif kind == "maps":
                out.maps.append(event.maps)
            elif kind == "probe":
                out.probe = event.probe
        return out

    # -- stored sets --------------------------------------------------------------------------------------------
    def get_direction_set(
        self, ref: common_pb2.DirectionSetRef | str, *, timeout: float | None = None
    ) -> directions_pb2.GetDirectionSetResponse:
        ref = set_ref(ref) if isinstance(ref, str) else ref
        return self._call(self.stub.GetDirectionSet, directions_pb2.GetDirectionSetRequest(ref=ref), timeout)

    def list_direction_sets(
        self,
        method: str = "",
        *,
        include_vectors: bool = False,
        include_registered: bool = False,
        timeout: float | None = None,
    ) -> directions_pb2.ListDirectionSetsResponse:
        req = directions_pb2.ListDirectionSetsRequest(
            method=method, include_vectors=include_vectors, include_registered=include_registered
        )
        return self._call(self.stub.ListDirectionSets, req, timeout)

    # -- applying -----------------------------------------------------------------------------------------------
    def traverse(
        self,
        probe: common_pb2.Probe,
        *,
        set: common_pb2.DirectionSetRef | str | None = None,
        index: int = 0,
        inline: directions_pb2.Direction | None = None,
        alphas: list[float] | None = None,
        scale: directions_pb2.AlphaScale.ValueType = directions_pb2.ALPHA_SCALE_UNSPECIFIED,
        decode: bool = False,
        timeout: float | None = None,
    ) -> directions_pb2.TraverseResponse:
        """Move ``probe`` along direction ``index`` of a stored ``set`` (id, NAME@VERSION) or an ``inline`` one."""
        req = directions_pb2.TraverseRequest(probe=probe, alphas=alphas or [], scale=scale, decode=decode)
        if set is not None:
            ref = set_ref(set) if isinstance(set, str) else set
            req.set_direction.CopyFrom(directions_pb2.SetDirection(set=ref, index=index))
        elif inline is not None:
            req.inline.CopyFrom(inline)
        return self._call(self.stub.Traverse, req, timeout)

    def suppress(
        self,
        probes: list[common_pb2.Probe],
        *,
        set: common_pb2.DirectionSetRef | str | None = None,
        index: int = 0,
        inline: directions_pb2.Direction | None = None,
        decode: bool = False,
        timeout: float | None = None,
    ) -> directions_pb2.SuppressResponse:
        """Remove direction ``index`` of a stored ``set`` (or an ``inline`` one) from the probes' templates."""
        req = directions_pb2.SuppressRequest(probes=probes, decode=decode)
        if set is not None:
            ref = set_ref(set) if isinstance(set, str) else set
            req.set_direction.CopyFrom(directions_pb2.SetDirection(set=ref, index=index))
        elif inline is not None:
            req.inline.CopyFrom(inline)
        return self._call(self.stub.Suppress, req, timeout)

    def apply_equivariance(
        self,
        probe: common_pb2.Probe,
        maps: common_pb2.DirectionSetRef | str,
        transform: directions_pb2.Transform,
        *,
        forward: bool = False,
        decode: bool = False,
        timeout: float | None = None,
    ) -> directions_pb2.ApplyEquivarianceResponse:
        ref = set_ref(maps) if isinstance(maps, str) else maps
        req = directions_pb2.ApplyEquivarianceRequest(
            probe=probe, maps=ref, transform=transform, forward=forward, decode=decode
        )
        return self._call(self.stub.ApplyEquivariance, req, timeout)

    def aggregate(
        self,
        faces: list[common_pb2.Probe],
        *,
        n_clusters: int = 0,
        linkage: str = "",
        normalize: bool = False,
        decode: bool = False,
        timeout: float | None = None,
    ) -> directions_pb2.AggregateResponse:
        req = directions_pb2.AggregateRequest(
            faces=faces, n_clusters=n_clusters, linkage=linkage, normalize=normalize, decode=decode
        )
        return self._call(self.stub.Aggregate, req, timeout)

    def centroid_mds(
        self,
        source: common_pb2.DirectionSetRef | str | list[directions_pb2.Centroid],
        *,
        metric: str = "",
        seed: int = 0,
        timeout: float | None = None,
    ) -> directions_pb2.CentroidMDSResponse:
        req = directions_pb2.CentroidMDSRequest(metric=metric, seed=seed)
        if isinstance(source, list):
            req.centroids.CopyFrom(directions_pb2.CentroidList(centroids=source))
        else:
            req.set.CopyFrom(set_ref(source) if isinstance(source, str) else source)
        return self._call(self.stub.CentroidMDS, req, timeout)


@dataclass
class DiscoveryResult:
    """What a discovery stream returned, Progress events aside."""

    sets: list[directions_pb2.DirectionSet] = field(default_factory=list)
    maps: list[directions_pb2.EquivarianceMaps] = field(default_factory=list)
    probe: directions_pb2.RegressionProbe | None = None


class AttributesClient(_ServiceClient):
    """Client for ``facexplain.v1.AttributesService`` (attributes recovered from templates, MI importance).

    :meth:`importance` returns the raw event stream (Progress events, then one ImportanceTable; cancel
    it with ``.cancel()``); :meth:`run_importance` drains one into its table, passing Progress events
    to a callback (a progress bar).
    """

    stub_class = attributes_pb2_grpc.AttributesServiceStub
    default_timeout = 600.0

    def list_attributes(self, *, timeout: float | None = None) -> attributes_pb2.ListAttributesResponse:
        return self._call(self.stub.ListAttributes, attributes_pb2.ListAttributesRequest(), timeout)

    def recover_attributes(
        self,
        probe: common_pb2.Probe,
        *,
        attributes: list[str] | None = None,
        return_decoded: bool = False,
        selection: embedding_pb2.FaceSelection.ValueType = embedding_pb2.FACE_SELECTION_UNSPECIFIED,
        timeout: float | None = None,
    ) -> attributes_pb2.RecoverAttributesResponse:
        req = attributes_pb2.RecoverAttributesRequest(
            probe=probe, attributes=attributes or [], return_decoded=return_decoded, selection=selection
        )
        return self._call(self.stub.RecoverAttributes, req, timeout)

    def diff_attributes(
        self,
        a: common_pb2.Probe,
        b: common_pb2.Probe,
        *,
        attributes: list[str] | None = None,
        return_decoded: bool = False,
        selection: embedding_pb2.FaceSelection.ValueType = embedding_pb2.FACE_SELECTION_UNSPECIFIED,
        timeout: float | None = None,
    ) -> attributes_pb2.DiffAttributesResponse:
        req = attributes_pb2.DiffAttributesRequest(
            a=a, b=b, attributes=attributes or [], return_decoded=return_decoded, selection=selection
        )
        return self._call(self.stub.DiffAttributes, req, timeout)

    def importance(
        self,
        dataset: common_pb2.Dataset | attributes_pb2.ImportanceRequest,
        *,
        attributes: list[str] | None = None,
        estimator: str = "",
        n_bootstrap: int = 0,
        seed: int = 0,
        shuffled_control: bool = False,
        log_run: bool = False,
        knn_neighbors: int = 0,
        ci_level: float = 0.0,
        experiment: str = "",
        n_permutations: int = 0,
        timeout: float | None = None,
    ) -> Any:  # grpc call: an iterator of ImportanceEvent with .cancel()
        """Start an Importance job over ``dataset`` (or send a ready ``ImportanceRequest``); iterate the events."""
        if isinstance(dataset, attributes_pb2.ImportanceRequest):
            req = dataset
        else:
            req = attributes_pb2.ImportanceRequest(
                dataset=dataset,
                attributes=attributes or [],
                estimator=estimator,
                n_bootstrap=n_bootstrap,
                seed=seed,
                shuffled_control=shuffled_control,
                log_run=log_run,
                knn_neighbors=knn_neighbors,
                ci_level=ci_level,
                experiment=experiment,
                n_permutations=n_permutations,
            )
        return self._call(self.stub.Importance, req, timeout)

    @staticmethod
    def run_importance(events: Any, on_progress: ProgressCallback | None = None) -> attributes_pb2.ImportanceTable:
        """Drain an Importance stream: Progress events go to ``on_progress``; returns the table."""
        table: attributes_pb2.ImportanceTable = drain_stream(events, "table", "Importance", on_progress)
        return table


class CounterfactualClient(_ServiceClient):
    """Client for ``facexplain.v1.CounterfactualService`` (adversarial counterfactuals, s_a, decoder as defence).

    :meth:`defence_report` returns the raw event stream (Progress events, then one DefenceResult; cancel
    it with ``.cancel()``); :meth:`run_defence` drains one into its result. A call's deadline (``timeout``)
    also bounds the attack: the server stops it between steps when the deadline passes.
    """

    stub_class = counterfactual_pb2_grpc.CounterfactualServiceStub
    default_timeout = 600.0

    def attack(
        self,
        probe: common_pb2.Image,
        reference: common_pb2.Image,
        spec: counterfactual_pb2.AttackSpec | None = None,
        *,
        selection: embedding_pb2.FaceSelection.ValueType = embedding_pb2.FACE_SELECTION_UNSPECIFIED,
        timeout: float | None = None,
    ) -> counterfactual_pb2.AttackResponse:
        req = counterfactual_pb2.AttackRequest(
            probe=probe, reference=reference, spec=spec or counterfactual_pb2.AttackSpec(), selection=selection
        )
        return self._call(self.stub.Attack, req, timeout)

    def explain(
        self,
        probe: common_pb2.Image,
        reference: common_pb2.Image,
        spec: counterfactual_pb2.AttackSpec | None = None,
        *,
        attributes: list[str] | None = None,
        n_random: int = 0,
        selection: embedding_pb2.FaceSelection.ValueType = embedding_pb2.FACE_SELECTION_UNSPECIFIED,
        timeout: float | None = None,
    ) -> counterfactual_pb2.ExplainResponse:
        req = counterfactual_pb2.ExplainRequest(
            probe=probe,
            reference=reference,
            spec=spec or counterfactual_pb2.AttackSpec(),
            attributes=attributes or [],
            n_random=n_random,
            selection=selection,
        )
        return self._call(self.stub.Explain, req, timeout)

    def defence_report(
        self,
        pairs: list[counterfactual_pb2.ImagePair],
        spec: counterfactual_pb2.AttackSpec | None = None,
        *,
        selection: embedding_pb2.FaceSelection.ValueType = embedding_pb2.FACE_SELECTION_UNSPECIFIED,
        timeout: float | None = None,
    ) -> Any:  # grpc call: an iterator of DefenceEvent with .cancel()
        req = counterfactual_pb2.DefenceRequest(
            pairs=pairs, spec=spec or counterfactual_pb2.AttackSpec(), selection=selection
        )
        return self._call(self.stub.DefenceReport, req, timeout)

    @staticmethod
    def run_defence(events: Any, on_progress: ProgressCallback | None = None) -> counterfactual_pb2.DefenceResult:
        """Drain a DefenceReport stream: Progress events go to ``on_progress``; returns the result."""
        result: counterfactual_pb2.DefenceResult = drain_stream(events, "result", "DefenceReport", on_progress)
        return result


def image_pair(a: Path | str, b: Path | str, genuine: bool, pair_id: str = "") -> counterfactual_pb2.ImagePair:
    """An ImagePair from two image files (a is the one attacked)."""
    return counterfactual_pb2.ImagePair(
        a=image_from_path(Path(a)), b=image_from_path(Path(b)), genuine=genuine, id=pair_id
    )


# Default loopback ports of the five services (DESIGN.md; each service's FACEXPLAIN_PORT default).
DEFAULT_PORTS = {
    "embedding": 50051,
    "decoding": 50052,
    "directions": 50053,
    "attributes": 50054,
    "counterfactual": 50055,
}


class Facexplain:
    """One object for all five services: ``fx.embedding``, ``fx.decoding``, ``fx.directions``,
    ``fx.attributes``, ``fx.counterfactual``, each the service's client, opened on first use.

    ``host`` with the default ports, or ``targets`` per service (``{"attributes": "10.0.0.7:50054"}``,
    ``{"embedding": "dns:///facexplain-embedding-pods.facexplain.svc:50051"}`` for every replica of one)
    for a deployment that spreads them; channel options (``tls``, ``root_certificates``, ``retries``)
    and the per-call ``timeout`` apply to every client. A pipeline that only explains templates never
    opens a channel to the embedding service.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        targets: dict[str, str] | None = None,
        timeout: float | None = None,
        **channel_kwargs: Any,
    ) -> None:
        unknown = sorted(set(targets or {}) - set(DEFAULT_PORTS))
        if unknown:
            raise ValueError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_PORTS)}")
        self.targets = {name: f"{host}:{port}" for name, port in DEFAULT_PORTS.items()} | dict(targets or {})
        self._timeout = timeout
        self._channel_kwargs = channel_kwargs
        self._clients: dict[str, _ServiceClient] = {}

    def _client(self, name: str, cls: type[C]) -> C:
        client = self._clients.get(name)
        if client is None:
            client = cls(self.targets[name], timeout=self._timeout, **self._channel_kwargs)
            self._clients[name] = client
        assert isinstance(client, cls)
        return client

    @property
    def embedding(self) -> EmbeddingClient:
        return self._client("embedding", EmbeddingClient)

    @property
    def decoding(self) -> DecodingClient:
        return self._client("decoding", DecodingClient)

    @property
    def directions(self) -> DirectionsClient:
        return self._client("directions", DirectionsClient)

    @property
    def attributes(self) -> AttributesClient:
        return self._client("attributes", AttributesClient)

    @property
    def counterfactual(self) -> CounterfactualClient:
        return self._client("counterfactual", CounterfactualClient)

    def model_status(self, *, timeout: float | None = None) -> dict[str, common_pb2.ModelStatusResponse]:
        """Every service's ModelStatus, by service name (opens all five channels)."""
        return {name: getattr(self, name).model_status(timeout=timeout) for name in DEFAULT_PORTS}

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
