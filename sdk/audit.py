"""The audit: what an FR model encodes and why it decided a pair, from the running services.

The audit drives the five services through the SDK (nothing runs in-process but the report) and
collects, for one served FR model on one folder of faces:

(a) models       every model name + version each service serves (ModelStatus), the registry each follows
(b) reconstruct  a sample of faces decoded from their templates (decoding Reconstruct): PSNR, SSIM and
                 identity cosine as the decoding service reports them, and an image grid; with ``judge`` (an
                 embedding service serving an independent FR model, e.g. facexplain-fr-hsefaceres1024) that
                 model's identity cosine and verdict too (:mod:`facexplain.metrics.judge`), and its control:
                 the original's aligned chip at the decoder's size, judged alike
(c) ssi          spatially isolated directions for eyes / nose / lower face (directions DiscoverSSI) with a
                 decoded traversal strip per region (Traverse, decode=True)
(d) labels       label directions the data allows: centroids for Smiling / Eyeglasses when labels.csv has
                 them, a yaw regression (yaw estimated by the attributes service) when there are enough
                 faces; each one that cannot be made is skipped with the reason
(e) importance   I(a; â) per attribute with a shuffled control (attributes Importance, seeded) and a chart
(f) mirror       how alike the model finds each face and its mirror image (embedding Embed), beside two
                 photos of one person: a model that treats them alike cannot keep which way a face turns or
                 tilts (the sign of yaw and roll), nor which side an asymmetric feature is on
(g) counterfactual  pairs scored by the embedding service (Verify), then counterfactual Explain for the
                 worst-scored genuine and best-scored impostor pairs
(h) occlusion    eyes / nose / mouth hidden on a few faces (decoding Occlude, DFD §4.3.2): how much of the
                 template survives the occluder, and whether the decoder paints the occluder or fills the face in
(i) aggregation  verification (TAR at the model's rule, AUC) against the number n of templates averaged per
                 identity (DFD §4.4), on the templates of every face of DATA (embedding Embed, Verify for the
                 rule), and identity centroids decoded beside one photo's decoding (directions Aggregate)
(j) privacy      a template modification validated (DFD §4.5): the label's centroid direction (directions
                 DiscoverCentroid) removed from every template (directions Suppress); what is suppressed (a
                 held-out linear probe on the templates; the attribute estimated on the decoded face, attributes
                 RecoverAttributes) and what verification keeps (TAR / FAR / AUC at the model's rule)

Every random choice takes ``seed``; two runs with the same seed give the same ``audit.json`` except
timestamps (``*_at``, ``started``, ``finished``). Direction sets are cited by the id the directions
service derives from their content (``set_id``, the same for the same request and data) and by the
digest of their vectors (``sha256``).

From Python (``facexplain audit`` is the command line over it, :mod:`cli.audit`)::

    from pathlib import Path
    from sdk.audit import AuditConfig, run_audit

    config = AuditConfig("facexplain-fr-dlib128@champion", data=Path("data/sample"), out=Path("report"))
    result = run_audit(config)  # the content of report/audit.json; report/index.html beside it

Scale-out: the embedding of every face of DATA (aggregation, privacy) goes as ``embed_chunk`` faces per
EmbedBatch with ``embed_concurrency`` calls in flight, so an embedding target that names several replicas
(``dns:///facexplain-embedding-pods.NAMESPACE.svc:50051``, ``ipv4:A:P,B:P``) spreads them round-robin over
all of them; the templates are the same as with one replica and one call at a time.

:class:`AuditError` stops the audit; its ``code`` is the CLI's exit status: 2 bad input, 3 a service or
the registry is not reachable (or serves another FR model than ``fr_model``), 4 a service failed a step.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image
from tqdm import tqdm

from facexplain.artifacts.decoder import KIND_DECODER
from facexplain.artifacts.embedder import KIND_EMBEDDER
from facexplain.attributes.report import importance_chart, row_dict, write_csv
from facexplain.metrics.invariance import mirror_cosines, mirror_invariance
from sdk.audit_report import write_report
from sdk.client import (
    DEFAULT_PORTS,
    AttributesClient,
    CounterfactualClient,
    DecodingClient,
    DirectionsClient,
    EmbeddingClient,
    image_from_path,
    inline_dataset,
    labeled_image,
    wait_ready,
)
from services.api.v1 import common_pb2, counterfactual_pb2, directions_pb2

SERVICES = tuple(DEFAULT_PORTS)
DEFAULT_TARGETS = {name: f"127.0.0.1:{port}" for name, port in DEFAULT_PORTS.items()}
CLIENTS: dict[str, Callable[..., Any]] = {
    "embedding": EmbeddingClient,
    "decoding": DecodingClient,
    "directions": DirectionsClient,
    "attributes": AttributesClient,
    "counterfactual": CounterfactualClient,
}
SSI_REGIONS = ("eyes", "nose", "lower_face")
LABEL_CENTROIDS = ("Smiling", "Eyeglasses")
# Keys whose values legitimately differ between two runs with the same seed.
RUN_SCOPED_KEYS = ("started", "finished")
# What a service answers when the request's data cannot be used (no face, too few faces for a label):
# the audit records the reason and goes on; any other status stops it.
DATA_REFUSED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
_REFUSED_CODES = {c.value[0] for c in DATA_REFUSED}  # the same codes as ItemError.code numbers


# What a served version's registry tags say about how far to trust it (ModelStatus metadata): the figures
# on sealed identities through the decoding service (heldout_*, shipped models), the held-out figures its
# training recorded (test_*), its quality gates, where it came from, and who forced it into service.
CARD_KEYS = (
    "heldout_psnr",
    "heldout_ssim",
    "heldout_identity_cosine",
    "heldout_accepted",
    "heldout_faces",
    "heldout_identities",
    "shipped_from",
    "test_psnr",
    "test_ssim",
    "test_identity_cosine",
    "test_accepted",
    "test_rank1",
    "test_identity_cosine_second",
    "test_accepted_second",
    "second_judge",
    "gates_passed",
    "gates_failed",
    "promotion_forced_by",
    "promotion_forced_reason",
)


def model_card(metadata: dict[str, str]) -> dict[str, str]:
    """The trust-relevant part of a served model's metadata (empty for a model that records none)."""
    return {k: metadata[k] for k in CARD_KEYS if metadata.get(k, "") != ""}


class AuditError(Exception):
    """A step that cannot go on; ``code`` is the CLI's exit status."""

    def __init__(self, message: str, code: int = 4) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class AuditConfig:
    fr_model: str
    data: Path
    out: Path
    pairs: Path | None = None
    seed: int = 0
    targets: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TARGETS))
    max_faces: int = 30  # faces sent to SSI / labels / importance (seeded sample when there are more)
    max_reconstructions: int = 8
    ssi_max_pairs: int = 24
    ssi_components: int = 2
    traverse_alphas: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    min_yaw_faces: int = 10
    importance_bootstrap: int = 20
    max_pairs: int = 60  # pairs scored (seeded sample of all pairs when there are more)
    explain_pairs: int = 2  # counterfactuals per kind: worst genuine, best impostor
    attack_steps: int = 10
    max_occlusions: int = 3  # faces occluded (the first audited ones)
    aggregation_repeats: int = 5  # seeded probe / enrolment draws per identity for the aggregation curve
    max_centroids: int = 4  # identities whose centroid is decoded
    privacy_label: str = "Smiling"  # the binary label whose centroid direction the privacy step removes
    privacy_pictures: int = 4  # faces shown decoded before / after the modification
    privacy_decoded: int = 24  # faces whose decoded attribute is estimated (seeded sample; 0 = all)
    embed_chunk: int = 16  # faces per EmbedBatch when the audit embeds many (one batched forward each)
    embed_concurrency: int = 4  # EmbedBatch calls in flight at once: what spreads them over the replicas
    connect_timeout: float = 20.0
    quiet: bool = False
    # an embedding service serving an independent FR model: the second judge of every reconstruction ("" none)
    judge: str = ""

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = Path(self.data).name
        d["pairs"] = Path(self.pairs).name if self.pairs else None
        d["traverse_alphas"] = list(self.traverse_alphas)
        for k in ("out", "quiet", "connect_timeout", "targets", "embed_concurrency", "judge"):
            d.pop(k)  # where the services are is no result (the judge's model is, in reconstructions)
        return d


def parse_model_ref(text: str) -> tuple[str, str]:
    name, sep, alias = text.partition("@")
    if not name or not sep or not alias:
        raise AuditError(f"--fr-model {text!r}: expected NAME@ALIAS, e.g. facexplain-fr-dlib128@champion", 2)
    return name, alias


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def finite(x: float) -> float | None:
    """A float for JSON; None where the service gave NaN/inf (the report says 'n/a')."""
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def model_ref(m: Any) -> dict[str, str]:
    return {"name": m.name, "version": m.version, "alias": m.alias}


# -- the data --------------------------------------------------------------------------------------------


@dataclass
class Face:
    rel: str
    path: Path
    identity: str
    labels: dict[str, float]


def load_faces(data: Path) -> tuple[list[Face], list[str], str]:
    """Every face under ``data`` (sorted), its label names, and the manifest digest of the whole folder."""
    # facexplain.data.faceset imports torch (its face sets are tensors): paid by the audit, not by the SDK
    from facexplain.data.faceset import manifest_hash, records_from_spec

    try:
        root, records, names = records_from_spec(str(data))
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read --data {data}: {exc}", 2) from None
    faces = [
        Face(
            r.path.relative_to(root).as_posix(),
            r.path,
            r.identity,
            {k: float(v) for k, v in r.labels.items() if not np.isnan(v)},
        )
        for r in records
    ]
    faces.sort(key=lambda f: f.rel)
    return faces, names, manifest_hash(root, records)


def sample(items: list[Any], n: int, rng: np.random.Generator) -> list[Any]:
    """At most ``n`` items, in their original order; a seeded choice when there are more."""
    if n <= 0 or len(items) <= n:
        return list(items)
    keep = sorted(rng.choice(len(items), size=n, replace=False).tolist())
    return [items[i] for i in keep]


def read_pairs(path: Path, data: Path, faces: list[Face]) -> list[tuple[Face, Face, bool]]:
    """``a,b,genuine`` rows (header optional); paths relative to DATA, to the pairs file, or absolute."""
    by_rel = {f.rel: f for f in faces}
    by_path = {f.path.resolve(): f for f in faces}

    def face(p: str) -> Face:
        if p in by_rel:
            return by_rel[p]
        for cand in (Path(p), data / p, path.parent / p):
            if cand.resolve() in by_path:
                return by_path[cand.resolve()]
            if cand.is_file():
                return Face(p, cand, "", {})
        raise AuditError(f"--pairs {path}: image {p!r} not found (relative to {data} or {path.parent})", 2)

    out = []
    try:
        with path.open(newline="") as fh:
            for i, row in enumerate(csv.reader(fh)):
                if not row or row[0].startswith("#"):
                    continue
                if i == 0 and row[0].strip().lower() in ("a", "probe", "path_a"):
                    continue
                if len(row) < 3:
                    raise AuditError(f"--pairs {path} line {i + 1}: expected a,b,genuine", 2)
                g = row[2].strip().lower()
                if g not in ("1", "0", "true", "false", "yes", "no"):
                    raise AuditError(f"--pairs {path} line {i + 1}: genuine must be 1/0/true/false, not {g!r}", 2)
                out.append((face(row[0].strip()), face(row[1].strip()), g in ("1", "true", "yes")))
    except OSError as exc:
        raise AuditError(f"cannot read --pairs {path}: {exc}", 2) from None
    return out


def pairs_from_identities(faces: list[Face]) -> list[tuple[Face, Face, bool]]:
    """Every pair of faces; genuine when both have the same identity."""
    return [(a, b, a.identity == b.identity) for a, b in combinations(faces, 2)]


def mirror_image(path: Path) -> common_pb2.Image:
    """The photo at ``path`` mirrored left to right, as a PNG (lossless: the mirror differs only in side)."""
    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, "PNG")
    return common_pb2.Image(encoded=buf.getvalue())


def png_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# -- the run ---------------------------------------------------------------------------------------------


@dataclass
class AuditInputs:
    """What the steps read: every face of DATA, the seeded sample of them audited, the label names."""

    everything: list[Face]
    faces: list[Face]
    label_names: list[str]


class Audit:
    """One audit run: the connected clients, the result built step by step, the images written."""

    def __init__(self, config: AuditConfig) -> None:
        self.cfg = config
        self.out = Path(config.out)
        self.images = self.out / "images"
        self.result: dict[str, Any] = {}
        self.clients: dict[str, Any] = {}
        self.templates: dict[str, Any] = {}
        self.served_metadata: dict[str, dict[str, dict[str, str]]] = {}  # service -> model name -> metadata

    # helpers -----------------------------------------------------------------------------------------------
    def rng(self, step: str) -> np.random.Generator:
        """One generator per step, so a step's choices do not depend on the steps before it."""
        return np.random.default_rng([self.cfg.seed, int(hashlib.sha256(step.encode()).hexdigest()[:8], 16)])

    def bar(self, total: int | None, desc: str) -> Any:
        return tqdm(total=total, desc=desc, unit="item", disable=self.cfg.quiet, file=sys.stderr, leave=True)

    def progress_callback(self, desc: str) -> tuple[Callable[[Any], None], Callable[[], None]]:
        """A server-progress callback that drives one tqdm bar per stage, and its closer."""
        state: dict[str, Any] = {"bar": None, "stage": ""}

        def on_progress(p: Any) -> None:
            if state["bar"] is None or p.stage != state["stage"]:
                if state["bar"] is not None:
                    state["bar"].close()
                state["stage"] = p.stage
                state["bar"] = self.bar(p.total or None, desc if p.stage in ("", desc) else f"{desc}: {p.stage}")
            bar = state["bar"]
            bar.total = p.total or bar.total
            bar.n = p.done
            bar.refresh()

        def close() -> None:
            if state["bar"] is not None:
                state["bar"].close()

        return on_progress, close

    def discover(self, stream: Any, desc: str) -> Any:
        """Drain a directions discovery stream with progress bars; returns its result."""
        on_progress, close = self.progress_callback(desc)
        try:
            return self.clients["directions"].run(stream, on_progress)
        finally:
            close()

    def discover_or_skip(self, stream: Any, desc: str, entry: dict[str, Any]) -> Any | None:
        """``discover``, or None with the reason in ``entry["skipped"]`` when the data cannot make the set."""
        try:
            return self.discover(stream, desc)
        except grpc.RpcError as err:
            if err.code() not in DATA_REFUSED:
                raise
            entry["skipped"] = f"{err.code().name}: {err.details()}"
            return None

    def save(self, name: str, data: bytes) -> str:
        path = self.images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"images/{name}"

    def log(self, msg: str) -> None:
        if not self.cfg.quiet:
            print(msg, file=sys.stderr, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """The section ``name`` of the result, timed; a failed RPC becomes an AuditError with its exit status."""
        section: dict[str, Any] = {"started": now()}
        self.log(f"[audit] {name} ...")
        t0 = time.perf_counter()
        try:
            yield section
        except grpc.RpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise AuditError(
                    f"step {name}: service not reachable or too slow: {code.name}: {err.details()}", 3
                ) from None
            raise AuditError(f"step {name} failed: {code.name}: {err.details()}", 4) from None
        section["finished"] = now()
        self.result[name] = section
        self.log(f"[audit] {name} done in {time.perf_counter() - t0:.1f} s")

    # connection ---------------------------------------------------------------------------------------------
    def connect(self, stack: ExitStack) -> None:
        for name in SERVICES:
            target = self.cfg.targets.get(name) or DEFAULT_TARGETS[name]
            client = stack.enter_context(CLIENTS[name](target, timeout=1800.0))
            try:
                wait_ready(client.channel, self.cfg.connect_timeout)
            except ConnectionError:
                raise AuditError(
                    f"the {name} service at {target} is not reachable within {self.cfg.connect_timeout:.0f} s "
                    f"(is `facexplain serve {name}` running there? set its address with --targets {name}=HOST:PORT)",
                    3,
                ) from None
            self.clients[name] = client
        if self.cfg.judge:
            judge = stack.enter_context(EmbeddingClient(self.cfg.judge, timeout=1800.0))
            try:
                wait_ready(judge.channel, self.cfg.connect_timeout)
            except ConnectionError:
                raise AuditError(
                    f"the judge (an embedding service) at {self.cfg.judge} is not reachable within "
                    f"{self.cfg.connect_timeout:.0f} s (an embedding service with FACEXPLAIN_MODEL_NAME set to the "
                    "judge model, e.g. facexplain-fr-hsefaceres1024)",
                    3,
                ) from None
            self.clients["judge"] = judge

    # (a) models ---------------------------------------------------------------------------------------------
    def service_models(self, name: str) -> dict[str, Any]:
        """What the ``name`` service reports serving (ModelStatus), models sorted by kind, name, version."""
        try:
            st = self.clients[name].model_status(timeout=30)
        except grpc.RpcError as err:
            raise AuditError(f"{name} service: ModelStatus failed: {err.code().name}: {err.details()}", 3) from None
        self.served_metadata[name] = {m.model.name: dict(m.metadata) for m in st.models}
        models = [
            {
                "kind": m.kind,
                **model_ref(m.model),
                "serving": bool(m.serving),
                "device": m.device,
                "loaded_at": m.loaded_at.ToJsonString() if m.HasField("loaded_at") else "",
                "card": model_card(dict(m.metadata)),
            }
            for m in st.models
        ]
        models.sort(key=lambda m: (m["kind"], m["name"], int(m["version"]) if m["version"].isdigit() else 0))
        return {
            "target": self.cfg.judge if name == "judge" else self.cfg.targets.get(name) or DEFAULT_TARGETS[name],
            "registry_uri": st.registry_uri,
            "registry_reachable": bool(st.registry_reachable),
            "last_reload_error": st.last_reload_error,
            "models": models,
        }

    def check_serves(self, name: str, status: dict[str, Any], fr_name: str, fr_alias: str) -> None:
        """Stop unless the ``name`` service follows a reachable registry, serves the FR model and a decoder."""
        if not status["registry_uri"]:
            raise AuditError(
                f"the {name} service follows no model registry (FACEXPLAIN_REGISTRY_URI is empty): "
                f"it cannot serve {self.cfg.fr_model}",
                3,
            )
        if not status["registry_reachable"]:
            raise AuditError(f"the {name} service cannot reach the model registry at {status['registry_uri']}", 3)
        models = status["models"]
        served = [m for m in models if m["kind"] == KIND_EMBEDDER and m["serving"]]
        if not any(m["name"] == fr_name and m["alias"] == fr_alias for m in served):
            have = ", ".join(f"{m['name']}@{m['alias'] or m['version']}" for m in served) or "none"
            raise AuditError(f"the {name} service does not serve {self.cfg.fr_model} (it serves {have})", 3)
        if name != "embedding" and not any(m["kind"] == KIND_DECODER and m["serving"] for m in models):
            raise AuditError(f"the {name} service has no decoder loaded (needed for the audit)", 3)

    def models(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        fr_name, fr_alias = parse_model_ref(self.cfg.fr_model)
        services: dict[str, Any] = {}
        for name in SERVICES:
            services[name] = self.service_models(name)
            self.check_serves(name, services[name], fr_name, fr_alias)
        fr = next(m for m in services["embedding"]["models"] if m["kind"] == KIND_EMBEDDER and m["name"] == fr_name)
        versions = {
            s: next(m["version"] for m in services[s]["models"] if m["kind"] == KIND_EMBEDDER and m["name"] == fr_name)
            for s in SERVICES
        }
        if len(set(versions.values())) != 1:
            raise AuditError(f"services serve different versions of {fr_name}: {versions} (an alias is moving?)", 3)
        sec["fr_model"] = {"name": fr_name, "alias": fr_alias, "version": fr["version"]}
        sec["services"] = services
        if "judge" in self.clients:
            sec["judge"] = self.judge_status(fr_name)

    def judge_status(self, fr_name: str) -> dict[str, Any]:
        """The judge's ModelStatus; stop unless it serves one FR model other than the audited one."""
        status = self.service_models("judge")
        served = [m for m in status["models"] if m["kind"] == KIND_EMBEDDER and m["serving"]]
        if len(served) != 1:
            raise AuditError(f"the judge at {self.cfg.judge} serves {len(served)} FR models, not one", 3)
        if served[0]["name"] == fr_name:
            raise AuditError(
                f"the judge at {self.cfg.judge} serves {fr_name}, the audited model: no independent judge", 2
            )
        return status

    # (b) reconstructions ---------------------------------------------------------------------------------
    def reconstructions(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        chosen = sample(inputs.faces, self.cfg.max_reconstructions, self.rng("reconstructions"))
        rows: list[dict[str, Any]] = []
        failed: list[dict[str, str]] = []
        chips: list[tuple[bytes, bytes]] = []  # (aligned, reconstruction) PNGs for the grid
        judge = self.second_judge() if "judge" in self.clients else None
        with self.bar(len(chosen), "reconstructions") as bar:
            for i, f in enumerate(chosen):
                try:
                    resp = self.clients["decoding"].reconstruct(image_from_path(f.path), timeout=300)
                except grpc.RpcError as err:
                    if err.code() in DATA_REFUSED:
                        failed.append({"path": f.rel, "reason": f"{err.code().name}: {err.details()}"})
                        bar.update()
                        continue
                    raise
                m = resp.metrics
                rows.append(
                    {
                        "path": f.rel,
                        "identity": f.identity,
                        "psnr": finite(m.psnr),
                        "ssim": finite(m.ssim),
                        "identity_cosine": finite(m.identity_cosine),
                        "same_person": bool(m.same_person),
                        "aligned": self.save(f"recon/{i:03d}.aligned.png", resp.aligned.encoded),
                        "reconstruction": self.save(f"recon/{i:03d}.recon.png", resp.reconstruction.encoded),
                    }
                )
                if judge is not None:
                    rows[-1].update(judge.scores(f.path, resp.reconstruction.encoded, resp.aligned.encoded))
                sec["decoder"] = model_ref(resp.decoder)
                sec["fr_model"] = model_ref(resp.fr_model)
                chips.append((resp.aligned.encoded, resp.reconstruction.encoded))
                bar.update()
        sec["faces"] = rows
        sec["failed"] = failed
        sec["summary"] = {
            k: finite(float(np.mean([r[k] for r in rows if r[k] is not None]))) if rows else None
            for k in ("psnr", "ssim", "identity_cosine")
        }
        sec["summary"]["same_person_rate"] = finite(float(np.mean([r["same_person"] for r in rows]))) if rows else None
        sec["summary"]["n"] = len(rows)
        if judge is not None:
            sec["judge"] = judge.model
            sec["summary"].update(judge_summary(rows))
        if rows:
            self.save_grid(chips, "recon/grid.png")
            sec["grid"] = "images/recon/grid.png"
        if not rows:
            raise AuditError(f"no face could be reconstructed ({len(failed)} failed)", 4)

    def second_judge(self) -> SecondJudge:
        """The judge client with both chip geometries: the audited FR model's (where decoded faces sit) and the
        judge's own, from what the two embedding services report serving."""
        fr_name, _ = parse_model_ref(self.cfg.fr_model)
        judged = self.result["models"]["judge"]["models"]
        judge_name = next(m["name"] for m in judged if m["kind"] == KIND_EMBEDDER and m["serving"])
        try:
            source = served_geometry(self.served_metadata["embedding"][fr_name])
            target = served_geometry(self.served_metadata["judge"][judge_name])
        except (KeyError, ValueError) as exc:
            raise AuditError(f"the chip geometry of a served model is not reported: {exc}", 3) from None
        return SecondJudge(self.clients["judge"], source, target)

    def save_grid(self, chips: list[tuple[bytes, bytes]], name: str) -> None:
        """Originals above their reconstructions, at most 8 a row, as one PNG."""
        # torch and facexplain.viz (torch) only for this picture: the SDK's clients run without them
        import torch

        from facexplain.viz import pairs_grid, save_png

        def tensor(png: bytes) -> torch.Tensor:
            with Image.open(io.BytesIO(png)) as im:
                arr = np.asarray(im.convert("RGB").resize((112, 112)), dtype=np.float32) / 255
            return torch.from_numpy(arr).permute(2, 0, 1)

        originals = torch.stack([tensor(a) for a, _ in chips])
        recons = torch.stack([tensor(r) for _, r in chips])
        save_png(pairs_grid(originals, recons, ncol=min(8, len(chips))), self.images / name)

    # datasets ---------------------------------------------------------------------------------------------
    def dataset(self, faces: list[Face], name: str, labels: dict[str, dict[str, float]] | None = None) -> Any:
        items = [
            labeled_image(
                f.rel,
                image=image_from_path(f.path),
                identity=f.identity,
                labels=(labels or {}).get(f.rel, f.labels),
            )
            for f in faces
        ]
        return inline_dataset(items, name)

    def template_dataset(
        self, faces: list[Face], name: str, labels: dict[str, dict[str, float]] | None = None
    ) -> tuple[Any, list[Face]]:
        """``faces`` as the templates the audit has (embedded in chunks, once per audit) and the faces sent.

        For the discoveries that need templates only (centroid, regression): the directions service then
        skips detecting and embedding every image again, which each discovery did before. A face without a
        template (no face found) is left out, as the service leaves it out of an image dataset.
        """
        self.prefetch_templates(faces)
        kept = [f for f in faces if self.template(f) is not None]
        given = labels or {}
        items = [
            labeled_image(f.rel, template=self.template(f), identity=f.identity, labels=given.get(f.rel, f.labels))
            for f in kept
        ]
        return inline_dataset(items, name), kept

    def direction_set(self, s: Any) -> dict[str, Any]:
        digest = hashlib.sha256()
        for d in s.directions:
            digest.update(np.asarray(d.vector, dtype=np.float32).tobytes())
        for c in s.centroids:
            digest.update(np.asarray(c.template.values, dtype=np.float32).tobytes())
        return {
            "set_id": s.id,
            "sha256": digest.hexdigest(),
            "method": s.method,
            "target": s.target,
            "fr_model": model_ref(s.fr_model),
            "registered": model_ref(s.registered) if s.registered.name else None,
            "data_manifest_sha256": s.data_manifest_sha256,
            "seed": int(s.seed),
            "n_items": int(s.n_items),
            "metrics": {k: finite(v) for k, v in sorted(s.metrics.items())},
            "params": dict(sorted(s.params.items())),
            "directions": [
                {
                    "name": d.name,
                    "eigenvalue": finite(d.eigenvalue),
                    "explained_variance": finite(d.explained_variance),
                    "stddev": finite(d.stddev),
                }
                for d in s.directions
            ],
            "centroids": [{"name": c.name, "value": finite(c.value), "count": int(c.count)} for c in s.centroids],
        }

    def probe(self, inputs: AuditInputs) -> Face:
        """Where traversals start: the first audited face the services found (the first reconstructed one)."""
        done = {f["path"] for f in self.result["reconstructions"]["faces"]}
        return next(f for f in inputs.faces if f.rel in done)

    def traverse(self, probe_face: Face, set_id: str, index: int, name: str) -> dict[str, Any]:
        resp = self.clients["directions"].traverse(
            common_pb2.Probe(image=image_from_path(probe_face.path)),
            set=set_id,
            index=index,
            alphas=list(self.cfg.traverse_alphas),
            scale=directions_pb2.ALPHA_SCALE_STDDEV,
            decode=True,
            timeout=300,
        )
        return {
            "probe": probe_face.rel,
            "direction": resp.direction.name,
            "index": index,
            "scale": "stddev",
            "alphas": [finite(a) for a in resp.alphas],
            "multipliers": [finite(a) for a in resp.multipliers],
            "cosine_to_probe": [finite(c) for c in resp.cosine_to_probe],
            "decoder": model_ref(resp.decoder),
            "strip": self.save(f"directions/{name}.png", resp.strip.encoded),
        }

    # (c) SSI --------------------------------------------------------------------------------------------
    def ssi(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        probe = self.probe(inputs)
        req = directions_pb2.DiscoverSSIRequest(
            dataset=self.dataset(inputs.faces, "audit-ssi"),
            regions=[directions_pb2.Region(name=r) for r in SSI_REGIONS],
            n_components=self.cfg.ssi_components,
            seed=self.cfg.seed,
            max_pairs=self.cfg.ssi_max_pairs,
        )
        result = self.discover(self.clients["directions"].discover_ssi(req), "ssi")
        sec["regions"] = list(SSI_REGIONS)
        sec["max_pairs"] = self.cfg.ssi_max_pairs
        sec["n_components"] = self.cfg.ssi_components
        sec["seed"] = self.cfg.seed
        sets = []
        with self.bar(len(result.sets), "ssi traversals") as bar:
            for s in result.sets:
                entry = self.direction_set(s)
                entry["traversal"] = self.traverse(probe, s.id, 0, f"ssi-{s.target}")
                sets.append(entry)
                bar.update()
        sec["sets"] = sets

    # (d) label directions ---------------------------------------------------------------------------------
    def labels(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        probe = self.probe(inputs)
        entries = [self.centroid_direction(label, inputs, probe) for label in LABEL_CENTROIDS]
        entries.append(self.yaw_direction(inputs.faces, probe))
        sec["directions"] = entries

    def centroid_direction(self, label: str, inputs: AuditInputs, probe: Face) -> dict[str, Any]:
        """The centroid direction of ``label`` (value 1 against the rest) with its traversal, or why not."""
        entry: dict[str, Any] = {"label": label, "method": "centroid"}
        if label not in inputs.label_names:
            entry["skipped"] = f"the data has no {label} label (no labels.csv with that column)"
            return entry
        dataset, _ = self.template_dataset(inputs.faces, f"audit-{label}")
        req = directions_pb2.DiscoverCentroidRequest(dataset=dataset, label=label, positive_values=[1.0])
        result = self.discover_or_skip(self.clients["directions"].discover_centroid(req), f"centroid {label}", entry)
        if result is None:
            return entry
        s = result.sets[0]
        entry["set"] = self.direction_set(s)
        entry["traversal"] = self.traverse(probe, s.id, 0, f"centroid-{label}")
        return entry

    def yaw_direction(self, faces: list[Face], probe: Face) -> dict[str, Any]:
        """A regression direction of yaw as the attributes service estimates it, or why it cannot be made."""
        yaw: dict[str, Any] = {"label": "yaw", "method": "regression"}
        if len(faces) < self.cfg.min_yaw_faces:
            yaw["skipped"] = f"{len(faces)} faces, fewer than the {self.cfg.min_yaw_faces} a yaw regression needs"
            return yaw
        values, no_face = self.yaw_values(faces)
        with_yaw = [f for f in faces if f.rel in values]
        yaw["yaw_source"] = "attributes service: yaw (deg) on the original aligned face"
        yaw["yaw_values"] = {k: finite(v["yaw"]) for k, v in sorted(values.items())}
        yaw["no_face"] = no_face
        if len(with_yaw) < self.cfg.min_yaw_faces:
            yaw["skipped"] = f"yaw estimated on {len(with_yaw)} faces, fewer than {self.cfg.min_yaw_faces}"
            return yaw
        dataset, sent = self.template_dataset(with_yaw, "audit-yaw", values)
        req = directions_pb2.DiscoverRegressionRequest(
            dataset=dataset,
            label="yaw",
            seed=self.cfg.seed,
            cv_folds=min(5, len(sent) // 2),
        )
        result = self.discover_or_skip(self.clients["directions"].discover_regression(req), "regression yaw", yaw)
        if result is not None:
            s = result.sets[0]
            yaw["set"] = self.direction_set(s)
            yaw["traversal"] = self.traverse(probe, s.id, 0, "regression-yaw")
        return yaw

    def yaw_values(self, faces: list[Face]) -> tuple[dict[str, dict[str, float]], list[str]]:
        """Each face's labels plus its estimated yaw (by face path), and the faces where none was found."""
        values: dict[str, dict[str, float]] = {}
        no_face = []
        with self.bar(len(faces), "yaw estimates") as bar:
            for f in faces:
                try:
                    r = self.clients["attributes"].recover_attributes(
                        common_pb2.Probe(image=image_from_path(f.path)), attributes=["yaw"], timeout=300
                    )
                except grpc.RpcError as err:
                    if err.code() not in (grpc.StatusCode.FAILED_PRECONDITION,):
                        raise
                    no_face.append(f.rel)
                else:
                    v = [a.value[0] for a in r.original if a.name == "yaw" and a.value]
                    if v and math.isfinite(v[0]):
                        values[f.rel] = {**f.labels, "yaw": float(v[0])}
                bar.update()
        return values, no_face

    # (e) importance ---------------------------------------------------------------------------------------
    def importance(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        client = self.clients["attributes"]
        events = client.importance(
            self.dataset(inputs.faces, "audit-importance"),
            n_bootstrap=self.cfg.importance_bootstrap,
            seed=self.cfg.seed,
            shuffled_control=True,
        )
        on_progress, close = self.progress_callback("importance")
        try:
            table = client.run_importance(events, on_progress)
        finally:
            close()
        rows = []
        for r in table.rows:
            d = row_dict(r)
            rows.append({k: finite(v) if isinstance(v, float) else v for k, v in d.items()})
        sec.update(
            {
                "fr_model": model_ref(table.fr_model),
                "decoder": model_ref(table.decoder),
                "estimator": table.estimator,
                "seed": int(table.seed),
                "n_items": int(table.n_items),
                "n_bootstrap": int(table.n_bootstrap),
                "ci_level": finite(table.ci_level),
                "data_manifest_sha256": table.data_manifest_sha256,
                "rows": rows,
            }
        )
        folder = self.out / "importance"
        write_csv(table.rows, folder / "importance.csv")
        label = f"{table.fr_model.name} v{table.fr_model.version}"
        importance_chart([(label, list(table.rows))], folder / "importance.png", f"I(a; â): {label}")
        sec["csv"] = "importance/importance.csv"
        sec["chart"] = "importance/importance.png"

    # (f) mirror invariance ------------------------------------------------------------------------------
    def mirror(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        """Cosine of each face's template and its mirror image's, against same-person and other-person pairs
        (:func:`facexplain.metrics.invariance.mirror_invariance` on the services' templates)."""
        self.prefetch_templates(inputs.faces)
        faces = [f for f in inputs.faces if self.template(f) is not None]
        with self.bar(len(faces), "mirror images") as bar:
            mirrored = self.embed_images([mirror_image(f.path) for f in faces], bar.update)
        kept = [(f, self.template(f), tm) for f, tm in zip(faces, mirrored, strict=True) if tm is not None]
        own = np.array([list(t.values) for _, t, _ in kept]).reshape(len(kept), -1)
        flip = np.array([list(tm.values) for _, _, tm in kept]).reshape(len(kept), -1)
        m = mirror_invariance(own, flip, [f.identity for f, _, _ in kept])
        per_face = mirror_cosines(own, flip)
        sec["faces"] = [
            {"path": f.rel, "mirror_cosine": finite(float(c))} for (f, _, _), c in zip(kept, per_face, strict=True)
        ]
        sec["summary"] = {k: (finite(v) if isinstance(v, float) else v) for k, v in asdict(m).items()}
        if not kept or math.isnan(m.same_person_cosine_mean):
            sec["reading"] = "not enough faces (or no two photos of one person) to compare"
        elif m.keeps_no_side:
            sec["reading"] = (
                "the model finds a face and its mirror image at least as alike as two photos of one person: "
                "its templates cannot keep the sign of yaw or roll, nor which side of the face a feature is on"
            )
        else:
            sec["reading"] = (
                "the model tells a face from its mirror image more than it tells two photos of one person "
                "apart: its templates can keep left/right information (the sign of yaw, asymmetries)"
            )

    # (g) counterfactuals ---------------------------------------------------------------------------------
    def embed_or_none(self, image: Any) -> Any | None:
        """The template of the face in ``image`` (a common_pb2.Image), or None when the service finds none."""
        try:
            return self.clients["embedding"].embed(image, timeout=300).template
        except grpc.RpcError as err:
            if err.code() not in DATA_REFUSED:
                raise
            return None

    def prefetch_templates(self, faces: list[Face]) -> None:
        """Embed the faces not embedded yet, ``embed_chunk`` images per EmbedBatch (one batched forward each),
        ``embed_concurrency`` calls in flight.

        Calls in flight at once are what lets the channel's round_robin put them on different replicas (one call
        after another would alternate replicas but keep all but one idle), so an audit of a large DATA folder
        scales with the embedding service's replicas. The chunks are the same whatever the concurrency and the
        server runs each EmbedBatch as a forward of its own images, so the templates are those of one chunk after
        another, in the same order.
        """
        todo = [f for f in faces if f.rel not in self.templates]
        for f, t in zip(todo, self.embed_images([image_from_path(f.path) for f in todo]), strict=True):
            self.templates[f.rel] = t

    def embed_images(self, images: list[Any], on_chunk: Callable[[int], Any] | None = None) -> list[Any | None]:
        """The template of each image (``common_pb2.Image``), None where the service finds no face: ``embed_chunk``
        images per EmbedBatch, ``embed_concurrency`` calls in flight (see :meth:`prefetch_templates`), in order.
        ``on_chunk(n)`` after each chunk of n images. An item refused for another reason is embedded again
        alone, which raises."""
        size = max(1, self.cfg.embed_chunk)
        chunks = [images[k : k + size] for k in range(0, len(images), size)]
        if not chunks:
            return []
        client = self.clients["embedding"]

        def embed(chunk: list[Any]) -> Any:
            return client.embed_batch(chunk, timeout=600)

        out: list[Any | None] = []
        pool = ThreadPoolExecutor(max(1, min(self.cfg.embed_concurrency, len(chunks))), "audit-embed")
        try:
            for chunk, resp in zip(chunks, pool.map(embed, chunks), strict=True):
                for image, r in zip(chunk, resp.results, strict=True):
                    if r.HasField("ok"):
                        out.append(r.ok.template)
                    elif r.error.code in _REFUSED_CODES:
                        out.append(None)
                    else:
                        out.append(self.embed_or_none(image))  # fails loudly with the service's own status
                if on_chunk is not None:
                    on_chunk(len(chunk))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failed chunk stops the chunks not sent yet
        return out

    def template(self, f: Face) -> Any:
        if f.rel not in self.templates:
            self.templates[f.rel] = self.embed_or_none(image_from_path(f.path))
        return self.templates[f.rel]

    def counterfactuals(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        """Score pairs (``--pairs``, or pairs of all the faces in DATA), explain the extreme ones."""
        if self.cfg.pairs is not None:
            pairs = read_pairs(Path(self.cfg.pairs), Path(self.cfg.data), inputs.everything)
            sec["pairs_source"] = f"pairs file {Path(self.cfg.pairs).name}"
        else:
            pairs = pairs_from_identities(inputs.everything)
            sec["pairs_source"] = "pairs of the faces in the data; genuine when the identities agree"
        # keep genuine and impostor pairs apart so a small max_pairs still has both kinds
        gen = sample([p for p in pairs if p[2]], self.cfg.max_pairs // 2, self.rng("pairs-genuine"))
        imp = sample([p for p in pairs if not p[2]], self.cfg.max_pairs - len(gen), self.rng("pairs-impostor"))
        scored, skipped, rule = self.score_pairs(gen + imp)
        g = sorted((s for s in scored if s.row["genuine"]), key=lambda s: (s.row["score"], s.row["a"], s.row["b"]))
        i = sorted((s for s in scored if not s.row["genuine"]), key=lambda s: (-s.row["score"], s.row["a"], s.row["b"]))
        sec["rule"] = rule
        sec["n_pairs"] = {"genuine": len(g), "impostor": len(i), "skipped": len(skipped)}
        sec["rates"] = {
            "genuine_accepted": finite(np.mean([s.row["same_person"] for s in g])) if g else None,
            "impostor_accepted": finite(np.mean([s.row["same_person"] for s in i])) if i else None,
        }
        sec["skipped_pairs"] = skipped
        picks = [("worst genuine", s) for s in g[: self.cfg.explain_pairs]]
        picks += [("best impostor", s) for s in i[: self.cfg.explain_pairs]]
        explanations = []
        with self.bar(len(picks), "counterfactuals") as bar:
            for n, (kind, s) in enumerate(picks):
                explanations.append(self.explain(s, kind, f"cf{n:02d}"))
                bar.update()
        sec["pairs"] = [s.row for s in scored]
        sec["explanations"] = explanations

    def score_pairs(
        self, chosen: list[tuple[Face, Face, bool]]
    ) -> tuple[list[ScoredPair], list[dict[str, Any]], dict[str, Any]]:
        """Verify each pair on the embedding service: the scored pairs, those skipped, the decision rule."""
        scored: list[ScoredPair] = []
        skipped: list[dict[str, Any]] = []
        rule: dict[str, Any] = {}
        with self.bar(len(chosen), "scoring pairs") as bar:
            for a, b, genuine in chosen:
                ta, tb = self.template(a), self.template(b)
                if ta is None or tb is None:
                    skipped.append({"a": a.rel, "b": b.rel, "reason": "no face found"})
                    bar.update()
                    continue
                v = self.clients["embedding"].verify(
                    common_pb2.Probe(template=ta), common_pb2.Probe(template=tb), timeout=60
                )
                rule = {
                    "metric": v.rule.metric,
                    "threshold": finite(v.rule.threshold),
                    "accept_below": bool(v.rule.accept_below),
                    "source": v.rule.source,
                }
                score = -v.l2_distance if v.rule.metric == "l2" else v.cosine
                row = {
                    "a": a.rel,
                    "b": b.rel,
                    "genuine": genuine,
                    "cosine": finite(v.cosine),
                    "l2_distance": finite(v.l2_distance),
                    "score": finite(score),
                    "same_person": bool(v.same_person),
                }
                scored.append(ScoredPair(a, b, row))
                bar.update()
        return scored, skipped, rule

    def explain(self, pair: ScoredPair, kind: str, tag: str) -> dict[str, Any]:
        """Counterfactual Explain of one pair: a PGD attack that flips its decision, the attributes it moved."""
        genuine = pair.row["genuine"]
        spec = counterfactual_pb2.AttackSpec(
            method=counterfactual_pb2.AttackSpec.METHOD_PGD,
            goal=(
                counterfactual_pb2.AttackSpec.GOAL_DODGE if genuine else counterfactual_pb2.AttackSpec.GOAL_IMPERSONATE
            ),
            steps=self.cfg.attack_steps,
            seed=self.cfg.seed,
        )
        r = self.clients["counterfactual"].explain(
            image_from_path(pair.a.path), image_from_path(pair.b.path), spec, timeout=1200
        )
        at = r.attack
        sig = sorted(r.significance, key=lambda x: (-x.s_a if math.isfinite(x.s_a) else 0.0, x.attribute))
        return {
            "kind": kind,
            "a": pair.a.rel,
            "b": pair.b.rel,
            "genuine": genuine,
            "method": "pgd",
            "goal": "dodge" if genuine else "impersonate",
            "seed": int(at.seed),
            "score_before": finite(at.score_before),
            "score_after": finite(at.score_after),
            "same_before": bool(at.same_before),
            "same_after": bool(at.same_after),
            "flipped": bool(at.flipped),
            "linf": finite(at.linf),
            "l2": finite(at.l2),
            "epsilon_used": finite(at.epsilon_used),
            "steps_used": int(at.steps_used),
            "surrogate": model_ref(at.surrogate),
            "target": model_ref(at.target),
            "decoder": model_ref(r.decoder),
            "n_significant": sum(1 for x in r.significance if x.significant),
            "n_attributes": len(r.significance),
            "top": [
                {"attribute": x.attribute, "group": x.group, "s_a": finite(x.s_a), "significant": bool(x.significant)}
                for x in sig[:10]
            ],
            "images": {
                "adversarial": self.save(f"cf/{tag}.adversarial.png", at.adversarial.encoded),
                "decoded_probe": self.save(f"cf/{tag}.decoded_probe.png", r.decoded_probe.encoded),
                "decoded_reference": self.save(f"cf/{tag}.decoded_reference.png", r.decoded_reference.encoded),
                "decoded_adversarial": self.save(f"cf/{tag}.decoded_adversarial.png", r.decoded_adversarial.encoded),
                "lbp_map": self.save(f"cf/{tag}.lbp_map.png", r.lbp_significance_map.encoded),
            },
        }

    # (h) occlusion ------------------------------------------------------------------------------------------
    def occlusion(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        """Each named region hidden on a few faces, decoded (decoding Occlude); means per region."""
        chosen = inputs.faces[: self.cfg.max_occlusions]
        faces: list[dict[str, Any]] = []
        failed: list[dict[str, str]] = []
        with self.bar(len(chosen), "occlusions") as bar:
            for i, f in enumerate(chosen):
                try:
                    resp = self.clients["decoding"].occlude(image_from_path(f.path), timeout=300)
                except grpc.RpcError as err:
                    if err.code() not in DATA_REFUSED:
                        raise
                    failed.append({"path": f.rel, "reason": f"{err.code().name}: {err.details()}"})
                    bar.update()
                    continue
                regions = [{k: _field(x, k) for k in OCCLUSION_FIELDS} for x in resp.results]
                pictures = [(resp.aligned.encoded, resp.reconstruction.encoded)]
                pictures += [(x.occluded.encoded, x.reconstruction.encoded) for x in resp.results]
                name = f"occlusion/{i:03d}.png"
                self.save_grid(pictures, name)
                faces.append({"path": f.rel, "identity": f.identity, "regions": regions, "grid": f"images/{name}"})
                sec["decoder"] = model_ref(resp.decoder)
                sec["fr_model"] = model_ref(resp.fr_model)
                sec["rule"] = {"metric": resp.rule.metric, "threshold": finite(resp.rule.threshold)}
                bar.update()
        sec["faces"] = faces
        sec["failed"] = failed
        names = [r["region"] for r in faces[0]["regions"]] if faces else []
        summary = {}
        for name in names:
            rows = [r for f in faces for r in f["regions"] if r["region"] == name]
            summary[name] = {
                k: finite(float(np.mean([float(r[k]) for r in rows if r[k] is not None])))
                for k in OCCLUSION_FIELDS
                if k != "region"
            }
            summary[name]["n"] = len(rows)
        sec["summary"] = summary

    # (i) aggregation -------------------------------------------------------------------------------------
    def served_rule(self, a: Any, b: Any) -> Any:
        """The FR model's verification rule as the embedding service applies it (one Verify of two templates)."""
        from facexplain.metrics.verification import VerificationRule

        r = (
            self.clients["embedding"]
            .verify(common_pb2.Probe(template=a), common_pb2.Probe(template=b), timeout=60)
            .rule
        )
        if r.metric not in ("l2", "cosine"):
            raise AuditError(f"the embedding service's rule has an unknown metric {r.metric!r}", 4)
        return VerificationRule(r.metric, float(r.threshold), bool(r.accept_below), r.source), bool(r.normalized)  # type: ignore[arg-type]

    def aggregation(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        """TAR / FAR / AUC against n aggregated templates, over every face of DATA; centroids decoded."""
        import torch

        from facexplain.metrics.aggregation import aggregation_curve, largest_n, powers_of_two

        kept: list[tuple[Face, Any]] = []
        self.prefetch_templates(inputs.everything)
        with self.bar(len(inputs.everything), "aggregation templates") as bar:
            for f in inputs.everything:
                t = self.template(f)
                if t is not None:
                    kept.append((f, t))
                bar.update()
        identities = [f.identity for f, _ in kept]
        max_n = largest_n(identities)
        sec["faces"] = len(kept)
        sec["seed"] = self.cfg.seed
        sec["repeats"] = self.cfg.aggregation_repeats
        sec["aggregation"] = "normalised mean (rescaled to the photos' mean norm)"
        if max_n < 1:
            sec["skipped"] = "fewer than 2 identities with 2 faces: nothing to aggregate"
            return
        rule, normalized = self.served_rule(kept[0][1], kept[1][1])
        x = torch.tensor([list(t.values) for _, t in kept], dtype=torch.float64)
        if normalized:
            x = torch.nn.functional.normalize(x, dim=1)
        sec["rule"] = {"metric": rule.metric, "threshold": finite(rule.threshold), "accept_below": rule.accept_below}
        curve = aggregation_curve(
            x, identities, powers_of_two(max_n), rule, self.cfg.seed, self.cfg.aggregation_repeats
        )
        sec["curve"] = [{k: finite(v) if isinstance(v, float) else v for k, v in p.as_dict().items()} for p in curve]
        self.decoded_centroids(kept, sec)

    def decoded_centroids(self, kept: list[tuple[Face, Any]], sec: dict[str, Any]) -> None:
        """Per identity (seeded pick): one photo's decoded template above the decoded mean of all its photos."""
        by_id: dict[str, list[Any]] = {}
        for f, t in kept:
            by_id.setdefault(f.identity, []).append(t)
        names = sample(
            sorted(n for n, ts in by_id.items() if len(ts) >= 2), self.cfg.max_centroids, self.rng("centroids")
        )
        pictures: list[tuple[bytes, bytes]] = []
        rows = []
        with self.bar(len(names), "centroids") as bar:
            for name in sorted(names):
                probes = [common_pb2.Probe(template=t) for t in by_id[name]]
                agg = self.clients["directions"].aggregate(probes, normalize=True, decode=True, timeout=300)
                one = self.clients["directions"].aggregate(probes[:1], decode=True, timeout=300)
                pictures.append((one.decoded_mean.encoded, agg.decoded_mean.encoded))
                rows.append({"identity": name, "faces": len(probes)})
                sec["decoder"] = model_ref(agg.decoder)
                bar.update()
        sec["centroids"] = rows
        if pictures:
            self.save_grid(pictures, "aggregation/centroids.png")
            sec["centroids_grid"] = "images/aggregation/centroids.png"

    # (j) privacy -----------------------------------------------------------------------------------------
    def privacy(self, inputs: AuditInputs, sec: dict[str, Any]) -> None:
        """Remove the label's centroid direction from every template; measure what is hidden and what is kept."""
        import torch

        from facexplain.metrics.privacy import privacy_validation

        label = self.cfg.privacy_label
        sec["label"] = label
        sec["method"] = "remove the label's centroid direction, rescale each template to its norm (directions Suppress)"
        sec["seed"] = self.cfg.seed
        if label not in inputs.label_names:
            sec["skipped"] = f"the data has no {label} label (no labels.csv with that column)"
            return
        self.prefetch_templates([f for f in inputs.everything if label in f.labels])
        faces = [f for f in inputs.everything if label in f.labels and self.template(f) is not None]
        values = [float(f.labels[label]) for f in faces]
        if len({f.identity for f in faces}) < 4 or len(set(values)) < 2:
            sec["skipped"] = f"{len(faces)} faces with a {label} label: need both values and 4 identities"
            return
        dataset, _ = self.template_dataset(faces, f"audit-privacy-{label}")
        req = directions_pb2.DiscoverCentroidRequest(dataset=dataset, label=label, positive_values=[1.0])
        result = self.discover_or_skip(self.clients["directions"].discover_centroid(req), f"centroid {label}", sec)
        if result is None:
            return
        s = result.sets[0]
        sec["set"] = self.direction_set(s)
        before_t = [self.template(f) for f in faces]
        after_t: list[Any] = []
        for k in range(0, len(faces), 16):
            probes = [common_pb2.Probe(template=t) for t in before_t[k : k + 16]]
            after_t.extend(self.clients["directions"].suppress(probes, set=s.id, index=0, timeout=300).templates)
        before = torch.tensor([list(t.values) for t in before_t], dtype=torch.float64)
        after = torch.tensor([list(t.values) for t in after_t], dtype=torch.float64)
        rule, normalized = self.served_rule(before_t[0], before_t[1])
        if normalized:
            before, after = torch.nn.functional.normalize(before, dim=1), torch.nn.functional.normalize(after, dim=1)
        report = privacy_validation(before, after, values, [f.identity for f in faces], rule, self.cfg.seed)
        sec["faces"] = report.faces
        sec["identities"] = report.identities
        sec["positives"] = int(sum(v > 0.5 for v in values))
        sec["rule"] = {"metric": rule.metric, "threshold": finite(rule.threshold), "accept_below": rule.accept_below}
        sec["probe"] = {
            "r2_before": finite(report.probe_r2_before),
            "r2_fixed_probe_after": finite(report.probe_r2_fixed),
            "r2_refit_after": finite(report.probe_r2_refit),
            "auc_before": finite(report.probe_auc_before),
            "auc_fixed_probe_after": finite(report.probe_auc_fixed),
            "auc_refit_after": finite(report.probe_auc_refit),
        }
        sec["verification"] = {
            side: {k: finite(v) if isinstance(v, float) else v for k, v in asdict(ver).items()}
            for side, ver in (("before", report.verification_before), ("after", report.verification_after))
        }
        sec["cosine_to_original"] = {
            "mean": finite(report.cosine_to_original_mean),
            "min": finite(report.cosine_to_original_min),
        }
        k = len(faces) if self.cfg.privacy_decoded <= 0 else min(self.cfg.privacy_decoded, len(faces))
        pick = sorted(self.rng("privacy-decoded").choice(len(faces), size=k, replace=False).tolist())
        sec["decoded"] = self.privacy_decoded(
            label, [values[i] for i in pick], [before_t[i] for i in pick], [after_t[i] for i in pick]
        )
        sec["decoded"]["faces"] = k
        self.privacy_pictures(faces[: self.cfg.privacy_pictures], s.id, sec)

    def privacy_decoded(self, label: str, values: list[float], before: list[Any], after: list[Any]) -> dict[str, Any]:
        """The attribute estimated on the decoded original and modified templates (attributes RecoverAttributes)."""
        from facexplain.metrics.privacy import attribute_auc

        served = {a.name: list(a.components) for a in self.clients["attributes"].list_attributes(timeout=60).attributes}
        name, component = estimate_for(label, served)
        if not name:
            return {"attribute": "", "skipped": f"the attributes service estimates nothing that reads {label}"}
        est: dict[str, list[float]] = {"before": [], "after": []}
        try:
            with self.bar(2 * len(before), f"{name} on decoded faces") as bar:
                for side, templates in (("before", before), ("after", after)):
                    for t in templates:
                        r = self.clients["attributes"].recover_attributes(
                            common_pb2.Probe(template=t), attributes=[name], timeout=300
                        )
                        v = [a.value[component] for a in r.recovered if a.name == name and len(a.value) > component]
                        est[side].append(float(v[0]) if v else math.nan)
                        bar.update()
        except grpc.RpcError as err:
            if err.code() not in DATA_REFUSED:
                raise
            return {"attribute": name, "skipped": f"{err.code().name}: {err.details()}"}
        b, a = np.asarray(est["before"]), np.asarray(est["after"])
        return {
            "attribute": name if len(served[name]) <= 1 else f"{name}:{served[name][component]}",
            "auc_before": finite(attribute_auc(b, values)),
            "auc_after": finite(attribute_auc(a, values)),
            "mean_before": finite(float(np.nanmean(b))),
            "mean_after": finite(float(np.nanmean(a))),
            "mean_abs_change": finite(float(np.nanmean(np.abs(a - b)))),
        }

    def privacy_pictures(self, faces: list[Face], set_id: str, sec: dict[str, Any]) -> None:
        """A few faces decoded from their original (top) and modified (bottom) templates."""
        if not faces:
            return
        probes = [common_pb2.Probe(template=self.template(f)) for f in faces]
        r = self.clients["directions"].suppress(probes, set=set_id, index=0, decode=True, timeout=300)
        pictures = [(o.encoded, m.encoded) for o, m in zip(r.decoded_originals, r.decoded, strict=True)]
        self.save_grid(pictures, "privacy/decoded.png")
        sec["grid"] = "images/privacy/decoded.png"
        sec["grid_faces"] = [f.rel for f in faces]
        sec["decoder"] = model_ref(r.decoder)

    # the whole audit ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        faces_all, label_names, manifest = load_faces(Path(cfg.data))
        inputs = AuditInputs(faces_all, sample(faces_all, cfg.max_faces, self.rng("faces")), label_names)
        self.out.mkdir(parents=True, exist_ok=True)
        self.result["audit"] = {
            "format": 1,
            "started": now(),
            "fr_model": cfg.fr_model,
            "seed": cfg.seed,
            "config": cfg.public(),
        }
        self.result["data"] = {
            "name": Path(cfg.data).name,
            "n_images": len(faces_all),
            "n_identities": len({f.identity for f in faces_all}),
            "labels": sorted(label_names),
            "manifest_sha256": manifest,
            "audited": [f.rel for f in inputs.faces],
        }
        with ExitStack() as stack:
            self.connect(stack)
            for name, run_step in STEPS:
                with self.step(name) as section:
                    run_step(self, inputs, section)
        self.result["audit"]["finished"] = now()
        return self.result


# What the audit keeps of each OcclusionResult (numbers and decisions; the pictures go to a grid).
OCCLUSION_FIELDS = (
    "region",
    "occluded_fraction",
    "template_cosine",
    "template_same_person",
    "decoded_identity_cosine",
    "decoded_same_person",
    "inside_to_occluder",
    "inside_to_original",
    "inside_to_clean_decoding",
    "outside_to_original",
    "outside_to_clean_decoding",
    "fills_in",
)


def _field(message: Any, key: str) -> Any:
    v = getattr(message, key)
    return finite(v) if isinstance(v, float) else v


# Where the attributes service has no probe of a CelebA label itself (accessory probes not registered), the
# estimator component that reads it: (attribute, component name).
LABEL_ESTIMATES = {"Smiling": ("expression", "happy"), "Male": ("gender", "p_male")}


def estimate_for(label: str, served: dict[str, list[str]]) -> tuple[str, int]:
    """The served attribute (and component index) that estimates a CelebA ``label``; ("", 0) when none does."""
    own = label.lower()  # the accessory probes' name for the label (facexplain.attributes.accessory)
    if own in served:
        return own, 0
    attr, comp = LABEL_ESTIMATES.get(label, ("", ""))
    if attr in served and comp in served[attr]:
        return attr, served[attr].index(comp)
    return "", 0


def served_geometry(metadata: dict[str, str]) -> Any:
    """A served FR model's chip geometry (:class:`facexplain.metrics.judge.ChipGeometry`) from its ModelStatus
    metadata: ``chip_size``, ``chip_padding`` and, for a five-point model, ``alignment_scheme`` and
    ``alignment_reference`` (JSON [[x, y], ...] chip pixels)."""
    import json

    from facexplain.metrics.judge import ChipGeometry

    scheme = metadata.get("alignment_scheme") or "dlib"
    reference = metadata.get("alignment_reference")
    ref = tuple((float(x), float(y)) for x, y in json.loads(reference)) if reference else None
    if scheme != "dlib" and ref is None:
        raise ValueError(f"alignment {scheme!r} without alignment_reference")
    return ChipGeometry(int(metadata["chip_size"]), float(metadata["chip_padding"]), scheme, ref)


def png_faces01(png: bytes, size: int | None = None) -> Any:
    """A PNG as a (1, 3, s, s) float tensor in [0, 1], resized to ``size`` (antialiased) when given."""
    import torch

    from facexplain.metrics.reconstruction import resize01

    with Image.open(io.BytesIO(png)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return resize01(t, size) if size else t


def chip_png(chip255: Any) -> common_pb2.Image:
    """A (3, S, S) chip in [0, 255] as a PNG image message (rounded to 8 bits)."""
    arr = chip255.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return common_pb2.Image(encoded=buf.getvalue())


class SecondJudge:
    """An independent FR model behind an embedding service, judging decoded faces as
    :mod:`facexplain.metrics.judge` does: its template of the original photo (Embed, full pipeline) against its
    template of the decoded face warped onto its own chip geometry (Embed, ``INPUT_MODE_ALIGNED``), scored by
    its Verify (its rule). The control: the original's aligned chip at the decoded face's size, judged alike."""

    def __init__(self, client: EmbeddingClient, source: Any, target: Any) -> None:
        self.client, self.source, self.target = client, source, target
        self.model: dict[str, str] = {}

    def _template(self, faces01: Any) -> common_pb2.Template:
        from facexplain.metrics.judge import judge_chips

        resp = self.client.embed(chip_png(judge_chips(faces01, self.source, self.target)[0]), aligned=True, timeout=300)
        return resp.template

    def _verify(self, ref: common_pb2.Template, t: common_pb2.Template) -> tuple[float | None, bool]:
        v = self.client.verify(common_pb2.Probe(template=ref), common_pb2.Probe(template=t), timeout=300)
        return finite(v.cosine), bool(v.same_person)

    def scores(self, photo: Path, decoded_png: bytes, aligned_png: bytes) -> dict[str, Any]:
        """``identity_cosine_second`` / ``same_person_second`` and the control's, for one reconstruction; where
        the judge finds no face in the photo the cosines are None and the verdicts no (``second_no_face``)."""
        try:
            ref = self.client.embed(image_from_path(photo), timeout=300)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            return dict(_NO_JUDGEMENT)
        self.model = model_ref(ref.model)
        decoded = png_faces01(decoded_png)
        cos, same = self._verify(ref.template, self._template(decoded))
        control = png_faces01(aligned_png, decoded.shape[-1])
        cos_c, same_c = self._verify(ref.template, self._template(control))
        return {
            "identity_cosine_second": cos,
            "same_person_second": same,
            "identity_cosine_second_control": cos_c,
            "same_person_second_control": same_c,
            "second_no_face": False,
        }


_NO_JUDGEMENT: dict[str, Any] = {
    "identity_cosine_second": None,
    "same_person_second": False,
    "identity_cosine_second_control": None,
    "same_person_second_control": False,
    "second_no_face": True,
}


def judge_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The second judge's means over the reconstructions (a face it found no face in counts as not accepted)."""

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return finite(float(np.mean(vals))) if vals else None

    return {
        "identity_cosine_second": mean("identity_cosine_second"),
        "same_person_rate_second": mean("same_person_second"),
        "identity_cosine_second_control": mean("identity_cosine_second_control"),
        "same_person_rate_second_control": mean("same_person_second_control"),
        "n_second_no_face": sum(bool(r.get("second_no_face")) for r in rows),
    }


@dataclass
class ScoredPair:
    """A pair of faces and its row in ``audit.json`` (what the embedding service said of it)."""

    a: Face
    b: Face
    row: dict[str, Any]


# The steps in the order they run (the report's, sdk.audit_report.SECTIONS), each filling the result's
# section of its name. The reconstructions come before the directions steps, which start their
# traversals from a reconstructed face.
STEPS: tuple[tuple[str, Callable[[Audit, AuditInputs, dict[str, Any]], None]], ...] = (
    ("models", Audit.models),
    ("reconstructions", Audit.reconstructions),
    ("ssi", Audit.ssi),
    ("labels", Audit.labels),
    ("importance", Audit.importance),
    ("mirror", Audit.mirror),
    ("counterfactuals", Audit.counterfactuals),
    ("occlusion", Audit.occlusion),
    ("aggregation", Audit.aggregation),
    ("privacy", Audit.privacy),
)


def run_audit(config: AuditConfig) -> dict[str, Any]:
    """Run the audit against the running services, write REPORT_DIR/index.html and audit.json; return the result."""
    result = Audit(config).run()
    write_report(result, Path(config.out))
    return result
