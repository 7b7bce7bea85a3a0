"""Server TLS: credentials from PEM files that are re-read when the files change, and the bind policy.

Kubernetes rotates a mounted Secret by swapping a symlink under the pod's feet; a server that read its
certificate once would serve the old one until restarted. gRPC asks :meth:`ReloadingCertificates.fetch`
before each new handshake, so a rotated certificate is presented on the next connection, while calls on
existing connections continue. A rotation caught half-way (unreadable or not PEM) keeps the previous
pair and is logged; the next handshake tries again.

Without TLS the server speaks plaintext; it then binds loopback only unless ``FACEXPLAIN_ALLOW_INSECURE=1``
says the network around it is trusted (a service mesh terminating TLS, a test rig): faces and tokens
must not cross a network in clear by accident.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.kit.config import ServiceSettings

log = logging.getLogger("facexplain.tls")

LOOPBACK_HOST = "127.0.0.1"


class TLSConfigError(ValueError):
    """The TLS settings are incomplete or name files that cannot be used."""


@dataclass(frozen=True)
class ServerTLSFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ServerTLSFiles | None:
        """The files the settings name; None when TLS is off. Half a configuration is an error, not plaintext."""
        cert, key, ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        if not cert and not key:
            if ca:
                raise TLSConfigError(
                    "FACEXPLAIN_TLS_CLIENT_CA_FILE is set but FACEXPLAIN_TLS_CERT_FILE/_KEY_FILE are not: "
                    "mutual TLS needs the server's own certificate and key"
                )
            return None
        if not cert or not key:
            missing = "FACEXPLAIN_TLS_KEY_FILE" if cert else "FACEXPLAIN_TLS_CERT_FILE"
            raise TLSConfigError(f"{missing} is not set: TLS needs both the certificate and its private key")
        return cls(Path(cert), Path(key), Path(ca) if ca else None)

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


def _read_pem(path: Path, marker: str, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data or marker.encode() not in data:
        raise TLSConfigError(f"{what} {path}: not a PEM file holding {marker.strip('-').lower()}")
    return data


class ReloadingCertificates:
    """The server's certificate configuration, re-read when any of its files changes (mtime, size, inode)."""

    def __init__(self, files: ServerTLSFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.initial = self._load()
        self.reloads = 0

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self.files.paths():
            try:
                st = os.stat(p)  # follows the Secret's symlinks: a swap changes the target's inode
            except OSError as exc:
                raise TLSConfigError(f"TLS file {p}: cannot read it ({exc.strerror or exc})") from None
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert = _read_pem(self.files.cert, "CERTIFICATE-----", "FACEXPLAIN_TLS_CERT_FILE")
        key = _read_pem(self.files.key, "PRIVATE KEY-----", "FACEXPLAIN_TLS_KEY_FILE")
        ca = (
            _read_pem(self.files.client_ca, "CERTIFICATE-----", "FACEXPLAIN_TLS_CLIENT_CA_FILE")
            if self.files.client_ca
            else None
        )
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed since the last one, else None (keep it)."""
        with self._lock:
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                config = self._load()
            except (OSError, TLSConfigError) as exc:
                log.error("TLS files changed but cannot be used; keeping the previous certificate: %s", exc)
                return None
            self._stamp = stamp
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.files.cert, extra={"fx_reloads": self.reloads})
            return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self.files.client_ca is not None
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(server: grpc.Server, settings: ServiceSettings) -> tuple[str, int, ReloadingCertificates | None]:
    """Add the server's port (TLS or plaintext per the settings); returns the host bound, the port, the certificates.

    Says at start what it did, so a plaintext server is never a surprise in the log.
    """
    files = ServerTLSFiles.from_settings(settings)
    host = settings.host
    if files is not None:
        certs = ReloadingCertificates(files)
        port = server.add_secure_port(f"{host}:{settings.port}", certs.credentials())
        log.info(
            "TLS on (%s); certificates reload when their files change",
            "mutual: clients need a certificate signed by FACEXPLAIN_TLS_CLIENT_CA_FILE"
            if files.client_ca
            else "server-authenticated",
        )
        return host, port, certs
    if not is_loopback(host) and not settings.allow_insecure:
        log.warning(
            "no TLS configured (FACEXPLAIN_TLS_CERT_FILE/_KEY_FILE): binding loopback %s only instead of %s; "
            "set FACEXPLAIN_ALLOW_INSECURE=1 to serve plaintext on %s",
            LOOPBACK_HOST,
            host,
            host,
        )
        host = LOOPBACK_HOST
    elif not is_loopback(host):
        log.warning("no TLS configured and FACEXPLAIN_ALLOW_INSECURE=1: serving PLAINTEXT on %s", host)
    else:
        log.warning("no TLS configured: serving plaintext on loopback %s only", host)
    port = server.add_insecure_port(f"{host}:{settings.port}")
    return host, port, None
