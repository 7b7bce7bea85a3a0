"""Where tests/e2e runs: five services on loopback (the default) or a deployed staging.

With ``FACEXPLAIN_E2E_TARGETS`` (``embedding=HOST:PORT,decoding=HOST:PORT,...``, all five services; what
``facexplain staging test`` writes, on a cluster or with ``--podman``) and ``FACEXPLAIN_E2E_REGISTRY_URI``
(the registry those services follow, as this machine reaches it) the suite runs against those addresses:
plaintext and without a token, as the staging overlay serves. Unset, the session starts its own MLflow, a
decoder trained for the default FR model, and the five services with TLS and bearer tokens (issue 23).
Either way the tests get one :class:`Deployment` and do not know which it is, except where they read a
loopback process's log (the access log) or start processes of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli.launcher import RunningService, start_service
from sdk.client import ClientSecurity
from tests.certs import issue, make_ca
from tests.service_env import registry_service_env

SERVICES = ("embedding", "decoding", "directions", "attributes", "counterfactual")
TARGETS_ENV = "FACEXPLAIN_E2E_TARGETS"
REGISTRY_ENV = "FACEXPLAIN_E2E_REGISTRY_URI"
AUDITOR_TOKEN = "e2e-auditor-token-0123456789abcdef"  # a test-time credential; the file holds its SHA-256


@dataclass
class Deployment:
    """The five services and their registry, wherever they run."""

    addresses: dict[str, str]
    registry_uri: str
    deployed: bool  # True: FACEXPLAIN_E2E_TARGETS (a staging); False: this session's loopback processes
    ca_file: Path | None = None
    token: str | None = None
    processes: dict[str, RunningService] = field(default_factory=dict)

    @property
    def security(self) -> ClientSecurity | None:
        if self.ca_file is None and self.token is None:
            return None
        return ClientSecurity(ca_file=str(self.ca_file or ""), token=self.token or "")

    def target_args(self) -> list[str]:
        """``--targets`` of the CLI: ``name=host:port`` per service."""
        return [f"{n}={self.addresses[n]}" for n in SERVICES]


def parse_targets(text: str) -> dict[str, str]:
    """``embedding=h:p,decoding=h:p,...`` -> {service: address}; every service exactly once, nothing else.

    A comma inside an ``ipv4:``/``ipv6:`` address list (``embedding=ipv4:10.0.0.5:50051,10.0.0.6:50051``,
    every replica of a service: the SDK's round_robin spreads the calls) continues that list, as the
    audit's ``--targets`` reads it."""
    out: dict[str, str] = {}
    last = ""
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part and last and out[last].lower().startswith(("ipv4:", "ipv6:")):
            out[last] += f",{part}"
            continue
        name, sep, address = part.partition("=")
        last = name
        if not sep or not address or name not in SERVICES or name in out:
            raise pytest.UsageError(f"{TARGETS_ENV}: bad entry {part!r} (want service=host:port, once per service)")
        out[name] = address
    missing = [s for s in SERVICES if s not in out]
    if missing:
        raise pytest.UsageError(f"{TARGETS_ENV} lacks {', '.join(missing)}")
    return out


def deployed_from_env() -> Deployment | None:
    text = os.environ.get(TARGETS_ENV, "").strip()
    if not text:
        return None
    registry = os.environ.get(REGISTRY_ENV, "").strip()
    if not registry:
        raise pytest.UsageError(f"{TARGETS_ENV} is set but {REGISTRY_ENV} is not: the tests need the registry too")
    return Deployment(addresses=parse_targets(text), registry_uri=registry, deployed=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, the services' certificate (localhost, 127.0.0.1) and a tokens file with the auditor's read scopes."""
    d = tmp_path_factory.mktemp("e2e-pki")
    ca = make_ca(d / "ca", "e2e CA")
    server = issue(ca, d / "server", "localhost", server=True)
    scopes = ["embed", "decode", "directions", "attributes", "counterfactual"]
    entry = {"principal": "auditor", "sha256": hashlib.sha256(AUDITOR_TOKEN.encode()).hexdigest(), "scopes": scopes}
    (d / "tokens.json").write_text(json.dumps({"tokens": [entry]}))
    return {"ca": ca.cert_file, "cert": server.cert_file, "key": server.key_file, "tokens": d / "tokens.json"}


def service_env(uri: str, cache: Path, pki: dict[str, Path]) -> dict[str, str]:
    return registry_service_env(
        uri,
        cache,
        FACEXPLAIN_TLS_CERT_FILE=str(pki["cert"]),
        FACEXPLAIN_TLS_KEY_FILE=str(pki["key"]),
        FACEXPLAIN_AUTH_TOKENS_FILE=str(pki["tokens"]),
        FACEXPLAIN_MAX_DATASET_ITEMS="100",
        FACEXPLAIN_MAX_SSI_PAIRS="100",
        FACEXPLAIN_MIN_LABEL_ITEMS="2",
        FACEXPLAIN_BATCH_SIZE="6",
        # the session's MLflow answers slowly while other fixtures train: a 5-s poll timed out once in CI
        # and the audit (rightly) refused a service whose registry looked unreachable
        FACEXPLAIN_REGISTRY_TIMEOUT_S="30",
    )


def _wait_for_decoders(dep: Deployment, timeout: float = 300) -> None:
    """The decoders arrive through the alias watchers: wait for each service that needs one."""
    from sdk.client import DecodingClient, DirectionsClient

    deadline = time.monotonic() + timeout
    for cls, name in ((DecodingClient, "decoding"), (DirectionsClient, "directions")):
        with cls(dep.addresses[name], timeout=30, security=dep.security) as c:
            while not any(m.kind == "decoder" and m.serving for m in c.model_status().models):
                assert time.monotonic() < deadline, f"{name}: no decoder after {timeout:.0f} s"
                time.sleep(0.5)


@pytest.fixture(scope="session")
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The deployed staging when FACEXPLAIN_E2E_TARGETS says so; else five services on loopback."""
    dep = deployed_from_env()
    if dep is not None:
        _wait_for_decoders(dep)
        yield dep
        return
    mlflow = request.getfixturevalue("mlflow")
    request.getfixturevalue("decoder_v1")  # the session's decoder, champion, before the services look
    pki = request.getfixturevalue("pki")
    logs = tmp_path_factory.mktemp("e2e-svc")
    cache = logs / "cache"

    def start(name: str) -> RunningService:
        (logs / name).mkdir()
        return start_service(name, logs / name, env=service_env(mlflow.uri, cache / name, pki), timeout=600)

    with ThreadPoolExecutor(len(SERVICES)) as pool:
        started = dict(zip(SERVICES, pool.map(start, SERVICES), strict=True))
    dep = Deployment(
        addresses={n: s.address for n, s in started.items()},
        registry_uri=mlflow.uri,
        deployed=False,
        ca_file=pki["ca"],
        token=AUDITOR_TOKEN,
        processes=started,
    )
    try:
        _wait_for_decoders(dep)
        yield dep
    finally:
        codes = {name: svc.stop() for name, svc in started.items()}
    for name, code in codes.items():
        assert code == 0, f"{name} service exit {code}; log tail:\n{started[name].log_text()[-2000:]}"
