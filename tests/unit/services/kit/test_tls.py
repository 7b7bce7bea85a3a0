"""Server TLS settings, the bind policy, and certificate rotation seen by a real client over loopback."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sdk.client import ClientSecurity, open_channel
from services.kit import tls
from services.kit.access_log import AccessLogInterceptor
from services.kit.config import ServiceSettings
from tests.certs import CA, Issued, issue, make_ca


def _settings(**kw: object) -> ServiceSettings:
    return ServiceSettings(host="127.0.0.1", port=0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"tls_cert_file": "c.pem"}, "FACEXPLAIN_TLS_KEY_FILE is not set"),
        ({"tls_key_file": "k.pem"}, "FACEXPLAIN_TLS_CERT_FILE is not set"),
        ({"tls_client_ca_file": "ca.pem"}, "mutual TLS needs the server's own certificate and key"),
    ],
)
def test_half_a_tls_configuration_is_an_error(kw: dict[str, str], message: str) -> None:
    with pytest.raises(tls.TLSConfigError, match=message):
        tls.ServerTLSFiles.from_settings(_settings(**kw))


def test_no_tls_is_none() -> None:
    assert tls.ServerTLSFiles.from_settings(_settings()) is None


def test_loopback_detection() -> None:
    assert tls.is_loopback("127.0.0.1") and tls.is_loopback("localhost") and tls.is_loopback("::1")
    assert tls.is_loopback("[::1]") and tls.is_loopback("127.0.0.2")
    assert not tls.is_loopback("0.0.0.0") and not tls.is_loopback("10.1.2.3") and not tls.is_loopback("example.org")


def test_unreadable_or_non_pem_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate")
    files = tls.ServerTLSFiles(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises(tls.TLSConfigError, match=r"TLS file .*k\.pem: cannot read it"):
        tls.ReloadingCertificates(files)
    (tmp_path / "k.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(
        tls.TLSConfigError, match=r"FACEXPLAIN_TLS_CERT_FILE .*c\.pem: not a PEM file holding certificate"
    ):
        tls.ReloadingCertificates(files)


def _health_server(settings: ServiceSettings) -> tuple[grpc.Server, str, tls.ReloadingCertificates | None]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[AccessLogInterceptor()])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    host, port, certs = tls.bind(server, settings)
    server.start()
    return server, f"{host}:{port}", certs


def _check(address: str, security: ClientSecurity, timeout: float = 5) -> grpc.StatusCode:
    channel = open_channel(address, security=security, retries=1)
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    finally:
        channel.close()


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[tuple[CA, CA, Issued, Issued]]:
    ca1, ca2 = make_ca(tmp_path / "ca1", "CA one"), make_ca(tmp_path / "ca2", "CA two")
    s1 = issue(ca1, tmp_path / "s1", "server one", server=True)
    yield ca1, ca2, s1, issue(ca2, tmp_path / "s2", "server two", server=True)


def test_rotated_certificate_served_without_restart(tmp_path: Path, pki: tuple[CA, CA, Issued, Issued]) -> None:
    """The Secret is rotated in place: the next connection gets the new certificate, the server never restarts."""
    ca1, ca2, s1, s2 = pki
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(s1.cert_file, live / "tls.crt")
    shutil.copy(s1.key_file, live / "tls.key")
    settings = _settings(tls_cert_file=str(live / "tls.crt"), tls_key_file=str(live / "tls.key"))
    server, address, certs = _health_server(settings)
    try:
        assert certs is not None
        assert _check(address, ClientSecurity(ca_file=str(ca1.cert_file))) == grpc.StatusCode.OK
        assert _check(address, ClientSecurity(ca_file=str(ca2.cert_file))) == grpc.StatusCode.UNAVAILABLE
        assert _check(address, ClientSecurity()) == grpc.StatusCode.UNAVAILABLE  # plaintext client
        # rotate as Kubernetes does: new files written beside, then moved into place
        shutil.copy(s2.cert_file, live / "new.crt")
        shutil.copy(s2.key_file, live / "new.key")
        os.replace(live / "new.key", live / "tls.key")
        os.replace(live / "new.crt", live / "tls.crt")
        deadline = time.monotonic() + 10
        while _check(address, ClientSecurity(ca_file=str(ca2.cert_file))) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "rotated certificate not served within 10 s"
            time.sleep(0.2)
        assert certs.reloads == 1
        assert _check(address, ClientSecurity(ca_file=str(ca1.cert_file))) == grpc.StatusCode.UNAVAILABLE
        # a broken rotation keeps the last good pair
        (live / "tls.crt").write_text("garbage")
        assert _check(address, ClientSecurity(ca_file=str(ca2.cert_file))) == grpc.StatusCode.OK
        assert certs.reloads == 1
    finally:
        server.stop(None)


def test_mutual_tls_requires_a_client_certificate(
    tmp_path: Path, pki: tuple[CA, CA, Issued, Issued], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "facexplain.access")
    ca1, ca2, s1, _ = pki
    client = issue(ca2, tmp_path / "client", "auditor", server=False)
    stranger = issue(make_ca(tmp_path / "ca3", "CA three"), tmp_path / "stranger", "stranger", server=False)
    settings = _settings(
        tls_cert_file=str(s1.cert_file), tls_key_file=str(s1.key_file), tls_client_ca_file=str(ca2.cert_file)
    )
    server, address, _ = _health_server(settings)
    try:
        ca = str(ca1.cert_file)
        assert _check(address, ClientSecurity(ca_file=ca)) == grpc.StatusCode.UNAVAILABLE
        signed = ClientSecurity(ca_file=ca, cert_file=str(client.cert_file), key_file=str(client.key_file))
        assert _check(address, signed) == grpc.StatusCode.OK
        # without a tokens file the access log names the caller by its verified certificate
        assert [r.fx_principal for r in caplog.records if hasattr(r, "fx_principal")] == ["cn:auditor"]
        other = ClientSecurity(ca_file=ca, cert_file=str(stranger.cert_file), key_file=str(stranger.key_file))
        assert _check(address, other) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_plaintext_binds_loopback_unless_allowed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "facexplain.tls")
    server, address, certs = _health_server(ServiceSettings(host="0.0.0.0", port=0))
    server.stop(None)
    assert address.startswith("127.0.0.1:") and certs is None
    assert "binding loopback 127.0.0.1 only instead of 0.0.0.0" in caplog.text
    caplog.clear()
    server, address, _ = _health_server(ServiceSettings(host="0.0.0.0", port=0, allow_insecure=True))
    server.stop(None)
    assert address.startswith("0.0.0.0:")
    assert "PLAINTEXT on 0.0.0.0" in caplog.text
