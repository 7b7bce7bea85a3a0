"""AttributesService: the gRPC adapter over attribute recovery (Ren et al.) with the served FR model and decoder.

Recovery is two-stage: template -> face decoded by the registered decoder for the served FR version ->
the attribute catalogue (:mod:`facexplain.attributes`) measured on the decoded pixels. For an image probe
the same attributes are also measured on the original aligned chip. Every request snapshots the FR and
decoder slots once and checks that they belong together (a decoder inverts exactly one FR version;
FAILED_PRECONDITION naming both otherwise), and snapshots the catalogue (which depends on the served
accessory probe set, if any).

Importance is a server-streaming job (the directions service's job runner: a worker thread, Progress
events, cancellation when the client cancels or its deadline passes): read and embed the dataset with
the directions' dataset reader (images without a face are skipped and counted), recover attributes on
every face, estimate I(a; â) with bootstrap intervals and a shuffled control
(:func:`facexplain.attributes.importance.importance_table`), optionally log an MLflow run, then send the
table.

DiffAttributes standardises each magnitude by the standard deviation of that attribute *recovered* from
the server's reference faces (``FACEXPLAIN_REFERENCE_DIR``, default the bundled ``data/sample``: embedded,
decoded and measured once per FR/decoder/probe versions, warmed at start-up); for a vector attribute
the standard deviation is the RMS distance to the mean, sqrt(sum of component variances), so it is in
the same units as the Euclidean magnitude. Without reference faces (or with fewer than 3 usable) it is
unknown and ``standardized`` is 0.

Templates and face images are never logged nor kept beyond the request; MLflow runs hold the table,
parameters and the dataset's manifest hash only.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.attributes import importance as imp
from facexplain.attributes import report
from facexplain.attributes.catalog import AttributeCatalog, AttributeSpec, UnknownAttributeError
from facexplain.attributes.dataset_importance import dataset_importance, recover_values
from facexplain.attributes.recovery import attribute_deltas, reference_scales
from facexplain.data.faces import list_images
from facexplain.pipeline import FacePipeline
from registry import Registry, RegistryError
from services.api.v1 import attributes_pb2, attributes_pb2_grpc, common_pb2
from services.attributes.settings import AttributesSettings
from services.kit.datasets import ResolvedDataset, check_items, embed_dataset, list_items
from services.kit.embedder import face_selection
from services.kit.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NoFaceFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.kit.images import decode_encoded, decode_image, png_image
from services.kit.jobs import JobContext, run_job
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel, combined_status
from services.kit.probes import Catalogs
from services.kit.reload import reload_response
from services.kit.rpc import check_deadline, streaming, unary
from services.kit.templates import template_from_proto, template_to_proto

log = logging.getLogger("facexplain.attributes")
SERVICE_NAME = attributes_pb2.DESCRIPTOR.services_by_name["AttributesService"].full_name
ESTIMATORS = ("knn", "discrete")
DEFAULT_K = 3
DEFAULT_CI_LEVEL = 0.95
MIN_REFERENCE_FACES = 3


def _png01(image: torch.Tensor) -> common_pb2.Image:
    return png_image(image.detach().float().cpu().clamp(0.0, 1.0) * 255.0)


def _values(
    specs: Sequence[AttributeSpec], values: dict[str, np.ndarray], i: int
) -> list[attributes_pb2.AttributeValue]:
    return [
        attributes_pb2.AttributeValue(
            name=s.name, group=s.group, unit=s.unit, value=[float(x) for x in np.asarray(values[s.name][i]).reshape(-1)]
        )
        for s in specs
    ]


# -- reference faces for DiffAttributes ------------------------------------------------------------------


class ReferenceStats:
    """Per-attribute spread of attributes recovered from the reference faces (see the module docstring)."""

    def __init__(self, folder: str, settings: AttributesSettings) -> None:
        self.folder = Path(folder) if folder else None
        self.settings = settings
        self._lock = threading.Lock()
        self._templates: dict[tuple[str, str], torch.Tensor] = {}
        self._stds: dict[tuple[str, ...], dict[str, float]] = {}

    def _reference_templates(self, fr: ServedModel[FacePipeline]) -> torch.Tensor:
        key = (fr.name, fr.version)
        if key not in self._templates:
            found: list[torch.Tensor] = []
            paths = list_images(self.folder) if self.folder is not None and self.folder.is_dir() else []
            bs = self.settings.batch_size
            for s in range(0, len(paths), bs):
                images = []
                for p in paths[s : s + bs]:
                    try:
                        images.append(decode_encoded(p.read_bytes(), self.settings.max_image_pixels, charge=False))
                    except (OSError, ServiceError):
                        continue
                for res in fr.model.analyze(images) if images else []:
                    if res is not None:
                        found.append(res.template.float().cpu())
            self._templates[key] = torch.stack(found) if found else torch.zeros(0, fr.model.info.dim)
        return self._templates[key]

    def stds(
        self,
        fr: ServedModel[FacePipeline],
        decoder: ServedModel[LoadedDecoder],
        catalog: AttributeCatalog,
        catalog_key: tuple[str, str],
    ) -> dict[str, float]:
        """{attribute: spread} of the recovered reference faces; empty when unknown."""
        key = (fr.name, fr.version, decoder.name, decoder.version, *catalog_key)
        with self._lock:
            if key in self._stds:
                return self._stds[key]
            out: dict[str, float] = {}
            if self.folder is not None:
                templates = self._reference_templates(fr)
                if templates.shape[0] >= MIN_REFERENCE_FACES:
                    values = recover_values(decoder.model.decode, catalog, templates, (), self.settings.batch_size)
                    out = {n: s for n, s in reference_scales(values).items() if math.isfinite(s) and s > 0}
                log.info(
                    "reference spread computed for %d attributes from %d reference faces",
                    len(out),
                    templates.shape[0],
                )
            self._stds[key] = out
            return out


def _run_params(
    request: attributes_pb2.ImportanceRequest,
    ds: ResolvedDataset,
    fr: ServedModel[FacePipeline],
    decoder: ServedModel[LoadedDecoder],
    estimator: str,
    k: int,
    ci_level: float,
) -> dict[str, str]:
    """The MLflow run's parameters: enough to repeat the Importance job on the same data."""
    return {
        **ds.params,
        "estimator": estimator,
        "knn_neighbors": str(k),
        "n_bootstrap": str(request.n_bootstrap),
        "ci_level": str(ci_level),
        "seed": str(request.seed),
        "shuffled_control": str(bool(request.shuffled_control)).lower(),
        "n_permutations": str(int(request.n_permutations) or imp.DEFAULT_PERMUTATIONS),
        "attributes": ",".join(request.attributes) or "all",
        "fr_model": f"{fr.name}@{fr.version}",
        "decoder": f"{decoder.name}@{decoder.version}",
        "n_items": str(len(ds)),
        "data_manifest_sha256": ds.manifest_sha256,
    }


# -- the servicer -------------------------------------------------------------------------------------------


class AttributesServicer(attributes_pb2_grpc.AttributesServiceServicer):
    def __init__(
        self,
        fr_slot: ModelSlot[FacePipeline],
        decoder_slot: ModelSlot[LoadedDecoder],
        probes_slot: ModelSlot[Any] | None,
        catalogs: Catalogs,
        reference: ReferenceStats,
        settings: AttributesSettings,
        metrics: ServiceMetrics,
    ) -> None:
        self.fr_slot = fr_slot
        self.decoder_slot = decoder_slot
        self.probes_slot = probes_slot  # None: no probe set configured (FACEXPLAIN_PROBES_MODEL_NAME empty)
        self.catalogs = catalogs
        self.reference = reference
        self.settings = settings
        self.metrics = metrics

    # -- helpers -------------------------------------------------------------------------------------------
    def _slots(self) -> list[ModelSlot[Any]]:
        slots: list[ModelSlot[Any]] = [self.fr_slot, self.decoder_slot]
        return slots + ([self.probes_slot] if self.probes_slot is not None else [])

    def _models(self) -> tuple[ServedModel[FacePipeline], ServedModel[LoadedDecoder]]:
        """One snapshot of the FR model and its decoder for the whole request, checked to belong together."""
        fr = self.fr_slot.current()
        decoder = self.decoder_slot.current()  # UNAVAILABLE while no decoder is loaded
        dec = decoder.model
        if (dec.fr_name, dec.fr_version) != (fr.name, fr.version):
            raise FailedPrecondition(
                f"no decoder for the served FR model: decoder {decoder.name} v{decoder.version} inverts "
                f"{dec.fr_name} v{dec.fr_version}, but this service serves {fr.name} v{fr.version}; register and "
                f"promote a decoder for {fr.name} v{fr.version}"
            )
        return fr, decoder

    @staticmethod
    def _specs(catalog: AttributeCatalog, names: Sequence[str]) -> list[AttributeSpec]:
        try:
            return catalog.resolve(list(names))
        except UnknownAttributeError as exc:
            raise InvalidArgument(str(exc)) from None

    def _estimator_ref(self, spec: AttributeSpec, probes: ServedModel[Any] | None) -> common_pb2.ModelRef:
        if not spec.estimator:
            return common_pb2.ModelRef()
        if probes is not None and spec.estimator == probes.name:
            return probes.ref()
        return common_pb2.ModelRef(name=spec.estimator, version="local")

    def _probe(
        self, probe: common_pb2.Probe, fr: ServedModel[FacePipeline], selection: int, which: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The probe's raw template, and for an image its aligned chip (3, S, S) in [0, 1]."""
        kind = probe.WhichOneof("kind")
        info = fr.model.info
        try:
            if kind == "template":
                return template_from_proto(probe.template, info.dim, fr.name, model_version=fr.version), None
            if kind == "image":
                sel = face_selection(selection)
                image = decode_image(probe.image, self.settings.max_image_pixels)
                result = fr.model.analyze([image], sel)[0]
                if result is None:
                    raise NoFaceFound(f"the detector found no face in the {image.shape[2]}x{image.shape[1]} image")
                return result.template.float().cpu(), (result.chip.float().cpu() / 255.0).clamp(0.0, 1.0)
        except ServiceError as exc:
            if not which:
                raise
            prefixed = type(exc).__new__(type(exc))  # same class and code, message prefixed once
            ServiceError.__init__(prefixed, f"{which}: {exc.message}")
            raise prefixed from None
        raise InvalidArgument(f"{which or 'probe'} is empty: set an image or a template")

    # -- sample-specific -------------------------------------------------------------------------------------
    @unary
    def RecoverAttributes(
        self, request: attributes_pb2.RecoverAttributesRequest, context: grpc.ServicerContext
    ) -> attributes_pb2.RecoverAttributesResponse:
        fr, decoder = self._models()
        catalog, _probes, _key = self.catalogs.current()
        specs = self._specs(catalog, request.attributes)
        names = [s.name for s in specs]
        template, chip = self._probe(request.probe, fr, request.selection, "")
        check_deadline(context, "embedding")
        decoded = decoder.model.decode(template[None])
        recovered = catalog.estimate(decoded, names)
        resp = attributes_pb2.RecoverAttributesResponse(
            recovered=_values(specs, recovered, 0),
            template=template_to_proto(template, fr),
            fr_model=fr.ref(),
            decoder=decoder.ref(),
        )
        if chip is not None:
            check_deadline(context, "recovery")
            original = catalog.estimate(chip[None], names)
            resp.original.extend(_values(specs, original, 0))
        if request.return_decoded:
            resp.decoded.CopyFrom(_png01(decoded[0]))
        return resp

    @unary
    def DiffAttributes(
        self, request: attributes_pb2.DiffAttributesRequest, context: grpc.ServicerContext
    ) -> attributes_pb2.DiffAttributesResponse:
        fr, decoder = self._models()
        catalog, _probes, key = self.catalogs.current()
        specs = self._specs(catalog, request.attributes)
        names = [s.name for s in specs]
        a, _ = self._probe(request.a, fr, request.selection, "a")
        b, _ = self._probe(request.b, fr, request.selection, "b")
        check_deadline(context, "embedding")
        # Each face decoded and measured on its own, as RecoverAttributes measures one: batched CPU kernels
        # may round differently by position in a batch, and a face compared with itself must differ by 0.
        decoded = [decoder.model.decode(t[None]) for t in (a, b)]
        va, vb = (catalog.estimate(d, names) for d in decoded)
        stds = self.reference.stds(fr, decoder, catalog, key)
        deltas = attribute_deltas({n: v[0] for n, v in va.items()}, {n: v[0] for n, v in vb.items()}, specs, stds)
        diffs = [
            attributes_pb2.AttributeDiff(
                name=d.attribute,
                group=d.group,
                unit=d.unit,
                a=d.a,
                b=d.b,
                delta=d.delta,
                magnitude=d.magnitude,
                standardized=d.standardized,
            )
            for d in deltas
        ]
        resp = attributes_pb2.DiffAttributesResponse(
            diffs=diffs,
            a=template_to_proto(a, fr),
            b=template_to_proto(b, fr),
            fr_model=fr.ref(),
            decoder=decoder.ref(),
        )
        if request.return_decoded:
            resp.decoded_a.CopyFrom(_png01(decoded[0][0]))
            resp.decoded_b.CopyFrom(_png01(decoded[1][0]))
        return resp

    # -- model-specific importance ---------------------------------------------------------------------------
    @streaming
    def Importance(
        self, request: attributes_pb2.ImportanceRequest, context: grpc.ServicerContext
    ) -> Iterator[attributes_pb2.ImportanceEvent]:
        fr, decoder = self._models()
        catalog, _probes, _key = self.catalogs.current()
        specs = self._specs(catalog, request.attributes)
        estimator = request.estimator or "knn"
        if estimator not in ESTIMATORS:
            raise InvalidArgument(f"unknown estimator {request.estimator!r}; one of {', '.join(ESTIMATORS)}")
        if request.n_bootstrap < 0:
            raise InvalidArgument(f"n_bootstrap is {request.n_bootstrap}; use 0 for no confidence interval")
        if request.n_bootstrap == 1:
            raise InvalidArgument("n_bootstrap is 1, which gives no interval; use 0 (none) or at least 2")
        if request.n_bootstrap > self.settings.max_bootstrap:
            raise ResourceExhausted(
                f"{request.n_bootstrap} bootstrap resamples exceed the limit of {self.settings.max_bootstrap} "
                "(FACEXPLAIN_MAX_BOOTSTRAP)"
            )
        if request.n_permutations < 0:
            raise InvalidArgument(
                f"n_permutations is {request.n_permutations}; use 0 for {imp.DEFAULT_PERMUTATIONS} control shuffles"
            )
        if request.n_permutations > self.settings.max_permutations:
            raise ResourceExhausted(
                f"{request.n_permutations} control shuffles exceed the limit of {self.settings.max_permutations} "
                "(FACEXPLAIN_MAX_PERMUTATIONS)"
            )
        if request.knn_neighbors < 0:
            raise InvalidArgument(f"knn_neighbors is {request.knn_neighbors}; use 0 for {DEFAULT_K}")
        ci_level = float(request.ci_level) or DEFAULT_CI_LEVEL
        if not 0.0 < ci_level < 1.0:
            raise InvalidArgument(f"ci_level is {request.ci_level}; it must lie in (0, 1), or 0 for {DEFAULT_CI_LEVEL}")
        k = request.knn_neighbors or DEFAULT_K
        experiment = request.experiment or self.settings.default_experiment
        if request.log_run and not self.settings.registry_uri:
            raise FailedPrecondition(
                "log_run needs an MLflow server, and this service has none (FACEXPLAIN_REGISTRY_URI)"
            )
        items, params = list_items(request.dataset, self.settings)
        check_items(items, need_images=True, method="Importance")
        result: list[attributes_pb2.ImportanceTable] = []

        def work(job: JobContext) -> list[Any]:
            result.append(
                self._importance(
                    request, job, fr, decoder, catalog, specs, items, params, estimator, k, ci_level, experiment
                )
            )
            return []

        for event in run_job(context, work, "importance"):
            yield attributes_pb2.ImportanceEvent(progress=event.progress)
        yield attributes_pb2.ImportanceEvent(table=result[0])

    def _importance_dataset(
        self,
        request: attributes_pb2.ImportanceRequest,
        job: JobContext,
        fr: ServedModel[FacePipeline],
        items: list[Any],
        params: dict[str, str],
        k: int,
    ) -> ResolvedDataset:
        """The dataset embedded, its skipped items reported, and enough faces left for the MI estimator."""
        ds = embed_dataset(
            request.dataset.name,
            items,
            params,
            fr,
            self.settings,
            need_images=True,
            batch_size=self.settings.batch_size,
            progress=job.progress,
            stop=job.stop,
        )
        if ds.skipped:
            reasons: dict[str, int] = {}
            for _id, why in ds.skipped:
                reasons[why] = reasons.get(why, 0) + 1
            summary = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
            job.progress(
                len(ds.skipped),
                ds.n_given,
                "skipped",
                f"{len(ds.skipped)} of {ds.n_given} items skipped: {summary}",
                force=True,
            )
        if len(ds) < 2 * k + 2:
            raise FailedPrecondition(
                f"only {len(ds)} of {ds.n_given} dataset items have a usable face; mutual information needs at "
                f"least {2 * k + 2}"
            )
        return ds

    def _importance(
        self,
        request: attributes_pb2.ImportanceRequest,
        job: JobContext,
        fr: ServedModel[FacePipeline],
        decoder: ServedModel[LoadedDecoder],
        catalog: AttributeCatalog,
        specs: list[AttributeSpec],
        items: list[Any],
        params: dict[str, str],
        estimator: str,
        k: int,
        ci_level: float,
        experiment: str,
    ) -> attributes_pb2.ImportanceTable:
        bs = self.settings.batch_size
        ds = self._importance_dataset(request, job, fr, items, params, k)
        assert ds.chips is not None
        messages = {"recovery": "faces", "importance": "attributes"}
        try:
            rows = dataset_importance(
                ds.chips,
                ds.templates,
                ds.labels,
                decoder.model.decode,
                catalog,
                specs,
                estimator=estimator,
                k=k,
                n_bootstrap=int(request.n_bootstrap),
                ci_level=ci_level,
                seed=int(request.seed),
                shuffled_control=bool(request.shuffled_control),
                n_permutations=int(request.n_permutations) or imp.DEFAULT_PERMUTATIONS,
                batch_size=bs,
                progress=lambda stage, done, total: job.progress(
                    done, total, stage, f"{done} of {total} {messages[stage]}"
                ),
                should_stop=job.stop,
            )
        except imp.Cancelled as exc:
            raise Cancelled(f"cancelled during importance estimation ({exc})") from None
        table = attributes_pb2.ImportanceTable(
            rows=[
                attributes_pb2.ImportanceRow(
                    attribute=r.attribute,
                    group=r.group,
                    mi=float(r.mi),
                    ci_low=float(r.ci_low),
                    ci_high=float(r.ci_high),
                    control_mi=float(r.control_mi),
                    n=int(r.n),
                    p_value=float(r.p_value),
                )
                for r in rows
            ],
            fr_model=fr.ref(),
            decoder=decoder.ref(),
            estimator=estimator,
            seed=int(request.seed),
            n_items=len(ds),
            n_bootstrap=int(request.n_bootstrap),
            ci_level=ci_level,
            data_manifest_sha256=ds.manifest_sha256,
        )
        if request.log_run:
            if job.stop():
                raise Cancelled("cancelled before the MLflow run was logged")
            job.progress(0, 1, "logging", f"logging the run to MLflow experiment {experiment!r}", force=True)
            params = _run_params(request, ds, fr, decoder, estimator, k, ci_level)
            table.mlflow_run_id = self._log_run(experiment, table, params)
            job.progress(1, 1, "logging", f"logged MLflow run {table.mlflow_run_id}", force=True)
        return table

    def _log_run(self, experiment: str, table: attributes_pb2.ImportanceTable, params: dict[str, str]) -> str:
        """An MLflow run with the parameters, one metric per attribute, and the table as CSV, JSON and PNG."""
        from mlflow.entities import Metric, Param  # mlflow is heavy: only a log_run request pays for it

        registry = Registry(self.settings.registry_uri, timeout_s=self.settings.registry_timeout_s)
        client = registry.client
        try:
            exp = registry._call("get experiment", client.get_experiment_by_name, experiment)
            exp_id = (
                exp.experiment_id if exp else registry._call("create experiment", client.create_experiment, experiment)
            )
            run = registry._call(
                "create run",
                client.create_run,
                exp_id,
                run_name=f"importance-{table.fr_model.name}-v{table.fr_model.version}",
                tags={"facexplain.kind": "attribute_importance", "facexplain.fr_model": table.fr_model.name},
            )
            run_id = str(run.info.run_id)
            metrics = []
            for r in table.rows:
                for key, value in (("mi", r.mi), ("control_mi", r.control_mi), ("p_value", r.p_value)):
                    if math.isfinite(value):
                        metrics.append(Metric(f"{key}/{r.attribute}", float(value), 0, 0))
            registry._call(
                "log params and metrics",
                client.log_batch,
                run_id,
                metrics=metrics,
                params=[Param(key, value[:500]) for key, value in sorted(params.items())],
            )
            with tempfile.TemporaryDirectory(prefix="fx-importance-") as tmp:
                report.write_table_files(
                    table, tmp, title=f"I(a; â) for {table.fr_model.name} v{table.fr_model.version}"
                )
                registry._call("log artifacts", client.log_artifacts, run_id, tmp, "importance")
            client.set_terminated(run_id)
        except RegistryError as exc:
            raise Unavailable(f"MLflow run not logged: {exc}") from None
        return run_id

    # -- catalogue and lifecycle ------------------------------------------------------------------------------
    @unary
    def ListAttributes(
        self, request: attributes_pb2.ListAttributesRequest, context: grpc.ServicerContext
    ) -> attributes_pb2.ListAttributesResponse:
        catalog, probes, _key = self.catalogs.current()
        resp = attributes_pb2.ListAttributesResponse(
            attributes=[
                attributes_pb2.AttributeInfo(
                    name=s.name,
                    group=s.group,
                    unit=s.unit,
                    components=list(s.components),
                    description=s.description,
                    discrete=s.discrete,
                    estimator=self._estimator_ref(s, probes),
                )
                for s in catalog
            ]
        )
        fr, decoder = self.fr_slot.peek(), self.decoder_slot.peek()
        if fr is not None:
            resp.fr_model.CopyFrom(fr.ref())
        if decoder is not None:
            resp.decoder.CopyFrom(decoder.ref())
        return resp

    @unary
    def ModelStatus(
        self, request: common_pb2.ModelStatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelStatusResponse:
        resp = combined_status(self._slots())
        catalog, probes, _key = self.catalogs.current()
        local = sorted({s.estimator for s in catalog if s.estimator and (probes is None or s.estimator != probes.name)})
        for name in local:
            resp.models.append(
                common_pb2.LoadedModel(
                    model=common_pb2.ModelRef(name=name, version="local"),
                    kind="attribute_estimator",
                    metadata={"source": "face-api 1.7.15 weights (npm), PyTorch port"},
                    serving=True,
                    device=self.settings.torch_device(),
                )
            )
        return resp

    @unary
    def Reload(self, request: common_pb2.ReloadRequest, context: grpc.ServicerContext) -> common_pb2.ReloadResponse:
        return reload_response(self._slots(), request, context)
