"""The few MLflow client calls services, training and the CLI make (conventions: ``registry.conventions``).

MLflow is imported lazily: a service without a registry never pays for it. MLflow's HTTP client
reads its timeout and retry count from the environment on every request (there is no per-client
setting), so :class:`Registry` sets them: by default a registry call fails in seconds instead of
retrying for minutes, which is what lets a service notice an outage and keep serving.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from facexplain.artifacts.bundle import BundleError, bundle_digest, flat_metadata, read_metadata, verify_files
from registry import cache
from registry.conventions import ARTIFACT_PATH, EXPERIMENT, check_model_name, missing_tags
from registry.errors import RegistryError, RegistryNotFound, RegistryUnreachable

log = logging.getLogger("facexplain.registry")

# A RestException with one of these codes means the server answered "no such model/alias/version".
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}
# ... and with one of these, it answered but refuses: a configuration problem, not an outage.
_REFUSED_CODES = {"PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST"}


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version as services need it (no MLflow types leak out of this module)."""

    name: str
    version: str
    alias: str = ""
    run_id: str = ""
    source: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    created_ms: int = 0


def public_uri(uri: str) -> str:
    """The URI without credentials (user:password@ and query tokens), for logs and ModelStatus."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _version_info(mv: Any, alias: str = "") -> VersionInfo:
    return VersionInfo(
        name=str(mv.name),
        version=str(mv.version),
        alias=alias,
        run_id=str(mv.run_id or ""),
        source=str(mv.source or ""),
        tags=dict(mv.tags or {}),
        aliases=tuple(getattr(mv, "aliases", None) or ()),
        created_ms=int(mv.creation_timestamp or 0),
    )


class Registry:
    """The MLflow Model Registry behind one tracking URI."""

    def __init__(self, uri: str, *, timeout_s: float = 5.0, max_retries: int = 0) -> None:
        if not uri:
            raise ValueError("registry URI is empty")
        self.uri = uri
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_s)))
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(max_retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one client call, turning MLflow's exceptions into the three cases callers act on."""
        from mlflow.exceptions import MlflowException, RestException

        try:
            return fn(*args, **kwargs)
        except RestException as exc:
            code = str(exc.error_code)
            if code in _NOT_FOUND_CODES:
                raise RegistryNotFound(scrub(f"{what}: {exc.message}")) from None
            if code in _REFUSED_CODES:
                raise RegistryError(scrub(f"{what}: {code}: {exc.message}")) from None
            raise RegistryUnreachable(scrub(f"{what}: registry error {code}: {exc.message[:300]}")) from None
        except MlflowException as exc:
            where = public_uri(self.uri)
            raise RegistryUnreachable(scrub(f"{what}: {where} unreachable ({_short(exc.message)})")) from None
        except OSError as exc:  # requests' ConnectionError is an OSError
            where = public_uri(self.uri)
            raise RegistryUnreachable(scrub(f"{what}: {where} unreachable ({_short(str(exc))})")) from None

    # -- reading ---------------------------------------------------------------------------------------
    def resolve(self, name: str, alias: str) -> VersionInfo:
        """Alias -> version: the one call a watcher makes per poll."""
        mv = self._call(f"resolve {name}@{alias}", self.client.get_model_version_by_alias, name, alias)
        return _version_info(mv, alias)

    def get_version(self, name: str, version: str) -> VersionInfo:
        return _version_info(self._call(f"get {name} v{version}", self.client.get_model_version, name, version))

    def versions(self, name: str) -> list[VersionInfo]:
        found = self._call(f"list versions of {name}", self.client.search_model_versions, f"name = '{name}'")
        return sorted((_version_info(mv) for mv in found), key=lambda v: int(v.version))

    def find_by_tag(self, key: str, value: str, max_results: int = 10) -> list[VersionInfo]:
        """Versions of any registered model whose tag ``key`` equals ``value``, newest first."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or "'" in value:
            raise ValueError(f"unsafe tag filter {key}={value!r}")
        found = self._call(
            f"find versions with {key}={value}",
            self.client.search_model_versions,
            f"tags.{key} = '{value}'",
            max_results=max_results,
        )
        return sorted((_version_info(mv) for mv in found), key=lambda v: -v.created_ms)

    def list_models(self) -> list[dict[str, Any]]:
        """Every registered model with its aliases and versions (for ``facexplain registry list``)."""
        models = self._call("list registered models", self.client.search_registered_models)
        out = []
        for rm in sorted(models, key=lambda m: m.name):
            out.append(
                {
                    "name": rm.name,
                    "description": rm.description or "",
                    "tags": dict(rm.tags or {}),
                    "aliases": dict(rm.aliases or {}),
                    "versions": self.versions(rm.name),
                }
            )
        return out

    def download(
        self, info: VersionInfo, cache_dir: Path | str, *, keep: int = cache.KEEP, protect: tuple[Path, ...] = ()
    ) -> Path:
        """The version's bundle directory, from the cache or downloaded there first (:mod:`registry.cache`).

        The cache is keyed by this registry, the name, the version and its ``bundle_sha256`` tag: a
        cached bundle is reused only when it provably is the version this registry describes, so two
        registries whose v1 differ never serve each other's bundle. Downloads go to a temporary sibling
        and are renamed into place, so a crash mid-download never leaves a half bundle that looks
        cached; a downloaded bundle whose metadata digest differs from the tag is refused; file
        checksums are verified by the loader either way. Older entries of the name are then pruned: the
        ``keep`` most recently used stay (this one among them), and ``protect`` (the served version) too.
        """
        import mlflow.artifacts

        where = public_uri(self.uri)
        digest = info.tags.get("bundle_sha256", "")
        entry = cache.entry_dir(cache_dir, where, info.name, info.version, digest)
        hit = cache.reusable(entry, where, info.name, info.version, digest)
        if hit is not None:
            cache.prune(cache_dir, info.name, keep=keep - 1, protect=(entry, *protect))
            return hit
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{info.version}-", dir=entry.parent))
        try:
            uri = self._call(
                f"download URI of {info.name} v{info.version}",
                self.client.get_model_version_download_uri,
                info.name,
                info.version,
            )
            got = Path(
                self._call(
                    f"download {info.name} v{info.version}",
                    mlflow.artifacts.download_artifacts,
                    artifact_uri=uri,
                    dst_path=str(tmp),
                    tracking_uri=self.uri,
                    registry_uri=self.uri,
                )
            )
            if not (got / "bundle.json").is_file():
                raise RegistryError(f"{info.name} v{info.version}: artifact {uri} holds no bundle.json")
            actual = cache.metadata_digest(got)
            if digest and actual and actual != digest:
                raise RegistryError(
                    f"{info.name} v{info.version}: the artifact's bundle digest {actual[:16]} differs from the "
                    f"version's bundle_sha256 tag {digest[:16]}: it is not the bundle that was registered"
                )
            if got != tmp / cache.BUNDLE_DIR:
                got.rename(tmp / cache.BUNDLE_DIR)
            cache.write_marker(tmp, where, info.name, info.version, info.tags, run_id=info.run_id, source=info.source)
            if entry.exists():  # stale (not reusable above), or another process just won the race
                won = cache.reusable(entry, where, info.name, info.version, digest)
                if won is not None:
                    return won
                shutil.rmtree(entry, ignore_errors=True)
            try:
                tmp.rename(entry)
            except OSError:  # another process renamed its copy in between
                won = cache.reusable(entry, where, info.name, info.version, digest)
                if won is None:
                    raise
                return won
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        cache.prune(cache_dir, info.name, keep=keep - 1, protect=(entry, *protect))
        return entry / cache.BUNDLE_DIR

    def evict(self, name: str, version: str, cache_dir: Path | str) -> None:
        """Drop the cached copies of ``name`` v``version`` from this registry (it failed to load or validate)."""
        cache.evict(cache_dir, public_uri(self.uri), name, version)

    # -- writing ---------------------------------------------------------------------------------------
    def ensure_model(self, name: str, kind: str, description: str = "") -> None:
        """Create the registered model if missing; refuse a name that already holds another kind."""
        from mlflow.exceptions import RestException

        try:
            rm = self.client.get_registered_model(name)
        except RestException as exc:
            if str(exc.error_code) not in _NOT_FOUND_CODES:
                raise RegistryError(f"get {name}: {exc.message}") from None
            self._call(
                f"create {name}",
                self.client.create_registered_model,
                name,
                tags={"kind": kind, "convention": "facexplain-<role>-<architecture>"},
                description=description,
            )
            return
        existing = (rm.tags or {}).get("kind")
        if existing and existing != kind:
            raise RegistryError(f"registered model {name!r} holds {existing!r} versions, not {kind!r}")

    def find_by_digest(self, name: str, digest: str) -> VersionInfo | None:
        try:
            versions = self.versions(name)
        except RegistryNotFound:
            return None
        return next((v for v in versions if v.tags.get("bundle_sha256") == digest), None)

    def register_bundle(
        self,
        bundle_dir: Path | str,
        name: str,
        *,
        description: str = "",
        alias: str | None = None,
        extra_tags: dict[str, str] | None = None,
        check: bool = True,
        run_id: str | None = None,
    ) -> VersionInfo:
        """Log ``bundle_dir`` as the artifacts of a new run and register it as the next version of ``name``.

        With ``run_id`` the bundle goes into that existing run instead (a training run registers what it
        trained, so the version links to its parameters, curves and images); the run is left open.
        ``check=False`` skips the bundle's own metadata and checksum checks (tests use it to register
        deliberately broken versions; services must still reject them).
        """
        root = Path(bundle_dir)
        check_model_name(name)
        if check:  # a bundle whose bytes changed since its manifest was written is never registered
            try:
                meta = read_metadata(root)
                verify_files(root, meta)
            except BundleError as exc:
                raise BundleError(f"refusing to register {root} as {name}: {exc}") from None
        else:
            import json

            meta = json.loads((root / "bundle.json").read_text())
        kind = str(meta.get("kind", ""))
        try:
            tags = flat_metadata(meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"bundle metadata cannot be turned into tags: {exc}") from None
        tags["bundle_sha256"] = bundle_digest(meta)
        tags.update(extra_tags or {})
        if check and (missing := missing_tags(kind, tags)):
            raise RegistryError(f"bundle metadata lacks what {kind} versions must carry: {', '.join(missing)}")
        client = self.client
        own_run = run_id is None
        if run_id is None:
            exp = self._call("get experiment", client.get_experiment_by_name, EXPERIMENT)
            exp_id = exp.experiment_id if exp else self._call("create experiment", client.create_experiment, EXPERIMENT)
            run = self._call(
                "create run",
                client.create_run,
                exp_id,
                run_name=f"register-{name}",
                tags={"facexplain.model_name": name, "facexplain.kind": kind},
            )
            run_id = run.info.run_id
        try:
            self._call("log bundle", client.log_artifacts, run_id, str(root), ARTIFACT_PATH)
            if own_run:
                from mlflow.entities import Param

                params = [Param(k, v[:500]) for k, v in tags.items()]
                self._call("log params", client.log_batch, run_id, params=params)
        except Exception:
            if own_run:
                client.set_terminated(run_id, status="FAILED")
            raise
        if own_run:
            client.set_terminated(run_id)
        self.ensure_model(name, kind, description)
        mv = self._call(
            f"create version of {name}",
            client.create_model_version,
            name,
            f"runs:/{run_id}/{ARTIFACT_PATH}",
            run_id=run_id,
            tags=tags,
            description=description or str(meta.get("description", "")),
        )
        info = _version_info(mv)
        log.info("registered %s version %s (run %s)", name, info.version, run_id)
        if alias:
            self.set_alias(name, alias, info.version)
        return info

    def set_alias(self, name: str, alias: str, version: str) -> VersionInfo:
        """Point ``alias`` at ``version`` (the promotion); services following the alias pick it up."""
        info = self.get_version(name, version)
        self._call(f"set {name}@{alias}", self.client.set_registered_model_alias, name, alias, str(version))
        return info

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self._call(f"tag {name} v{version}", self.client.set_model_version_tag, name, str(version), key, value)

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(f"delete {name}@{alias}", self.client.delete_registered_model_alias, name, alias)


def _short(message: str, limit: int = 200) -> str:
    """First line of an MLflow error, trimmed: its messages embed whole urllib3 reprs."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    return first if len(first) <= limit else first[:limit] + "..."


_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s@]+@")
_SECRET_PARAMS = re.compile(r"(?i)([?&](?:token|access_token|password|passwd|secret|key|sig)=)[^&\s'\"]+")
# MLflow's own credential variables (HTTP basic auth, bearer token); their values never reach a message.
_SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME")


def scrub(text: str) -> str:
    """``text`` without registry credentials: user:password@ in URLs, secret query parameters, and the
    values of MLflow's credential variables. Every registry error passes through it before it is raised
    (and so before it reaches a log, ModelStatus or a Reload response)."""
    text = _SECRET_PARAMS.sub(r"\1***", _URL_CREDENTIALS.sub("", text))
    for var in _SECRET_ENV:
        value = os.environ.get(var, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text
