"""Service settings from environment variables (12-factor), so one image runs locally and on Kubernetes.

Every field maps to ``FACEXPLAIN_<FIELD>`` (upper case); the defaults are what ``facexplain serve``
uses on a laptop. Limits live here too, because a limit nobody can configure is a limit nobody trusts.

A service's main model is ``FACEXPLAIN_MODEL_NAME`` / ``_ALIAS`` (:class:`ServiceSettings`). Every other
model it serves has one settings block here (:class:`FRModelSettings`, :class:`DecoderModelSettings`,
:class:`ProbesModelSettings`), composed into the service's settings class, so each model is named and
defaulted the same way in every service that serves it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from facexplain.artifacts.probes import DEFAULT_PROBES_MODEL, KIND_ATTRIBUTE_PROBES
from registry import CHAMPION


class ServiceSettings(BaseSettings):
    """Settings shared by all services; a service may subclass to add its own."""

    model_config = SettingsConfigDict(env_prefix="FACEXPLAIN_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 inside a container")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one")
    metrics_enabled: bool = True
    max_workers: int = Field(8, ge=1, description="gRPC handler threads")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request/response")
    max_image_pixels: int = Field(
        2048 * 2048,
        ge=1,
        description="largest image (width*height, read from the header before decoding) accepted; larger is "
        "RESOURCE_EXHAUSTED. Lowered from 4096*4096 (issue 23): the FR pipeline peaks at about 100-125 bytes of "
        "memory per decoded pixel",
    )
    max_request_pixels: int = Field(
        2048 * 2048,
        ge=0,
        description="budget of decoded pixels per call, over all its images (decoded one at a time, charged before "
        "decoding); an image beyond it is RESOURCE_EXHAUSTED (an item error in a batch). Bounds one call's memory "
        "(measured: 64 crafted images in one EmbedBatch stay under 1 GB of peak RSS growth); 0 = no budget",
    )
    max_batch_size: int = Field(
        64,
        ge=1,
        description="most items in one batch request, and in one dynamically batched forward pass "
        "(services/kit/batching.py)",
    )
    # Dynamic batching (services/kit/batching.py): concurrent calls share one forward pass on an inference thread.
    dynamic_batching: bool = Field(
        True,
        description="queue concurrent calls and run them as one batched forward on a dedicated inference thread; "
        "false runs each call's forward on its own gRPC handler thread (the pre-batching behaviour, for comparison)",
    )
    batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="most milliseconds the first queued item waits for others to join its batch; the wait only "
        "matters when the inference thread is idle (under load batches fill while the previous forward runs)",
    )
    max_queue: int = Field(
        256,
        ge=1,
        description="most items waiting for the inference thread; a call that would exceed it gets "
        "RESOURCE_EXHAUSTED at once instead of waiting without bound",
    )
    torch_threads: int = Field(0, ge=0, description="intra-op threads for torch; 0 keeps torch's default")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)")
    grace_period_s: float = Field(10.0, ge=0, description="SIGTERM: seconds in-flight requests may finish")
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Security (services/kit/tls.py, auth.py, access_log.py). No TLS configured = plaintext, and then the
    # server binds loopback only unless allow_insecure says the network around it is trusted.
    tls_cert_file: str = Field(default="", description="PEM certificate chain the server presents; empty = no TLS")
    tls_key_file: str = Field(default="", description="PEM private key of tls_cert_file")
    tls_client_ca_file: str = Field(
        default="", description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)"
    )
    allow_insecure: bool = Field(
        default=False, description="without TLS, bind FACEXPLAIN_HOST even when it is not loopback (plaintext!)"
    )
    auth_tokens_file: str = Field(
        default="",
        description="JSON tokens file (principal, sha256 of the token, scopes, expires); set = every call needs a "
        "bearer token (health checking excepted)",
    )
    auth_jwks_file: str = Field(
        default="",
        description="JWK set of the identity provider's public signing keys (RS256, ES256, EdDSA); set = every call "
        "needs a bearer (health checking excepted), and a bearer shaped like a JWT is verified against it. Re-read "
        "when it changes (key rotation). Needs auth_jwt_issuer and auth_jwt_audience",
    )
    auth_jwt_issuer: str = Field(default="", description="the 'iss' every accepted JWT must carry")
    auth_jwt_audience: str = Field(default="", description="the audience ('aud') every accepted JWT must name")
    auth_jwt_leeway_s: float = Field(
        default=30.0, ge=0, le=300, description="clock skew allowed when checking a JWT's exp and nbf"
    )
    access_log: bool = Field(default=True, description="one structured log line per call (never a payload)")
    health_port: int = Field(
        default=-1,
        ge=-1,
        le=65535,
        description="plaintext port answering only gRPC health checks, on its own threads (Kubernetes gRPC probes "
        "speak no TLS and must not queue behind busy workers); -1 = none, 0 = any free port",
    )
    max_concurrent_rpcs: int = Field(
        default=0, ge=0, description="calls in progress beyond this answer RESOURCE_EXHAUSTED; 0 = no cap"
    )
    # Clients balance over a headless Service's DNS records (sdk round_robin) and resolve them again only when a
    # connection closes: without an age a long-lived client (an audit, a notebook) never sees a replica the HPA
    # added. Calls in flight on the old connection finish (no grace limit): only new calls move.
    max_connection_age_s: float = Field(
        default=0,
        ge=0,
        description="ask each client to reconnect after this many seconds (HTTP/2 GOAWAY, gRPC adds +-10 % "
        "jitter; calls in flight finish), so round_robin clients re-resolve DNS and spread over replicas added "
        "since; 0 = never",
    )
    # Model registry (registry/client.py, services/kit/reload.py). Empty registry_uri = no registry:
    # the service serves the local default weights and never polls.
    registry_uri: str = Field(
        default="", description="MLflow tracking/registry URI, e.g. http://127.0.0.1:5000; empty = none"
    )
    model_name: str = Field(default="", description="registered model to serve; empty = the service's default model")
    model_alias: str = Field(default=CHAMPION, description="alias to serve and follow (champion, challenger, ...)")
    poll_interval_s: float = Field(default=10.0, gt=0, description="seconds between alias -> version polls")
    model_cache_dir: str = Field(default="var/models", description="where downloaded model versions are kept")
    registry_timeout_s: float = Field(default=5.0, gt=0, description="HTTP timeout of one registry call")
    trusted_digests_file: str = Field(
        default="",
        description="allow-list of bundle digests (one sha256 per line, optional comment; '#' lines ignored): when "
        "set, a registered version is served only if the digest of its downloaded bundle is listed (or it is "
        "signed by a key of trusted_keys_file); re-read when it changes; empty = not used",
    )
    trusted_keys_file: str = Field(
        default="",
        description="Ed25519 public keys (PEM blocks or lines 'ed25519:<base64> [comment]'): when set, a version "
        "whose 'bundle_signature' tag is a valid signature of its bundle digest by one of them is trusted "
        "(`facexplain registry sign`); re-read when it changes; empty = not used",
    )
    registry_fallback_local: bool = Field(
        default=True,
        description="registry unreachable or its version invalid at start: serve local weights until it is",
    )

    def torch_device(self) -> str:
        """Resolve ``auto`` to the device this process can actually use."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


class FRModelSettings(BaseModel):
    """The FR model (kind embedder) a service embeds with besides its main model; local weights without a registry."""

    fr_model_name: str = Field(
        default=DEFAULT_FR_MODEL,
        description="registered FR model (kind embedder) to serve; local face-api weights without a registry",
    )
    fr_model_alias: str = Field(default=CHAMPION, description="alias of the FR model to serve and follow")


class DecoderModelSettings(BaseModel):
    """The decoder (kind decoder) inverting the served FR version; registry only."""

    decoder_model_name: str = Field(
        default=DEFAULT_DECODER_MODEL,
        description="registered decoder (kind decoder) inverting the served FR version; registry only",
    )
    decoder_model_alias: str = Field(default=CHAMPION, description="alias of the decoder to serve and follow")


class ProbesModelSettings(BaseModel):
    """The optional accessory probe set (kind attribute_probes); empty name = no accessory attributes."""

    probes_model_name: str = Field(
        default="",
        description=f"registered accessory probe set (kind {KIND_ATTRIBUTE_PROBES}), e.g. {DEFAULT_PROBES_MODEL}; "
        "empty = no accessory attributes",
    )
    probes_model_alias: str = Field(default=CHAMPION, description="alias of the probe set to serve and follow")
