"""DirectionsService: the gRPC adapter over facexplain.directions, the served FR model and decoder.

The RPCs are thin: validate the request against directions.proto (every rejection with the code the
proto names), snapshot the FR slot once, and hand the work to :mod:`services.directions.discovery`
(discovery jobs, streamed through :mod:`services.kit.jobs`) or to the small apply-side methods
below (Traverse, ApplyEquivariance, Aggregate, CentroidMDS). Sets live in a
:class:`~services.directions.store.DirectionStore`.

Nothing here logs or keeps templates or images beyond the request, except the *derived* vectors of a
set (a direction, a centroid, a map), which is what a set is; a set outlives the server only when the
request asks to register it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import grpc
import numpy as np
import torch
import torch.nn.functional as F

from facexplain.artifacts.decoder import LoadedDecoder
from facexplain.artifacts.direction_set import (
    DEFAULT_DIRECTIONS_NAME,
    DEFAULT_EQUIVARIANCE_NAME,
    KIND_DIRECTION_SET,
    DirectionSetData,
    EquivarianceSetData,
)
from facexplain.directions.aggregate import agglomerative_clusters, mean_template
from facexplain.directions.fit_checks import centroid_mds
from facexplain.directions.suppress import remove_direction
from facexplain.directions.traverse import traverse
from facexplain.pipeline import FacePipeline
from services.api.v1 import common_pb2, directions_pb2, directions_pb2_grpc
from services.directions import discovery
from services.directions.probes import check_same_fr, decoder_for, png01, probe_template, strip_png
from services.directions.sets import (
    StoredSet,
    check_transform,
    direction_set_proto,
    equivariance_proto,
    transform_distance,
    transform_proto,
)
from services.directions.settings import DirectionsSettings
from services.directions.store import DirectionStore, check_registered_name
from services.kit.datasets import DatasetItem, ResolvedDataset, check_items, embed_dataset, list_items
from services.kit.embedder import face_selection
from services.kit.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NoFaceFound,
    ResourceExhausted,
    ServiceError,
)
from services.kit.images import decode_image
from services.kit.jobs import JobContext, run_job
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel, combined_status
from services.kit.reload import reload_response
from services.kit.rpc import check_batch, check_deadline, streaming, unary
from services.kit.templates import template_from_proto

log = logging.getLogger("facexplain.directions")
SERVICE_NAME = directions_pb2.DESCRIPTOR.services_by_name["DirectionsService"].full_name
DEFAULT_ALPHAS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
LIST_METHODS = ("", "ssi", "centroid", "regression", "equivariance")
LINKAGES = {"": ("average", "cosine"), "average": ("average", "cosine"), "complete": ("complete", "cosine")}
LINKAGES |= {"single": ("single", "cosine"), "ward": ("ward", "euclidean")}


def _tproto(vec: torch.Tensor, fr: ServedModel[FacePipeline], normalized: bool = False) -> common_pb2.Template:
    values = vec.detach().to(torch.float32).cpu().reshape(-1).tolist()
    return common_pb2.Template(values=values, dim=len(values), model=fr.ref(), normalized=normalized)


class DirectionsServicer(directions_pb2_grpc.DirectionsServiceServicer):
    def __init__(
        self,
        fr_slot: ModelSlot[FacePipeline],
        decoder_slot: ModelSlot[LoadedDecoder] | None,
        store: DirectionStore,
        settings: DirectionsSettings,
        metrics: ServiceMetrics,
    ) -> None:
        self.fr_slot = fr_slot
        self.decoder_slot = decoder_slot  # None: no decoder configured (FACEXPLAIN_DECODER_MODEL_NAME empty)
        self.store = store
        self.settings = settings
        self.metrics = metrics

    # -- helpers -------------------------------------------------------------------------------------------
    def _slots(self) -> list[ModelSlot]:  # type: ignore[type-arg]
        return [self.fr_slot] + ([self.decoder_slot] if self.decoder_slot is not None else [])

    def _decoder(self, fr: ServedModel[FacePipeline]) -> ServedModel[LoadedDecoder]:
        if self.decoder_slot is None:
            raise FailedPrecondition(
                f"decode requested but this server has no decoder configured for {fr.name} v{fr.version} "
                "(FACEXPLAIN_DECODER_MODEL_NAME is empty); ask without decode"
            )
        return decoder_for(self.decoder_slot, fr)

    def _register_name(self, register: bool, requested: str, default: str) -> str:
        """The registered name a job will use (checked now, before any work), or "" when not registering."""
        if not register:
            return ""
        self.store.require_registry()
        name = requested or default
        check_registered_name(name)
        return name

    def _dataset(
        self,
        dataset: common_pb2.Dataset,
        items: list[DatasetItem],
        params: dict[str, str],
        fr: ServedModel[FacePipeline],
        job: JobContext,
        *,
        need_images: bool,
        batch_size: int,
        allow_normalized: bool = False,
    ) -> ResolvedDataset:
        return embed_dataset(
            dataset.name,
            items,
            params,
            fr,
            self.settings,
            need_images=need_images,
            allow_normalized=allow_normalized,
            batch_size=batch_size,
            progress=job.progress,
            stop=job.stop,
        )

    def _keep(
        self, sets: list[DirectionSetData | EquivarianceSetData], job: JobContext, register_as: str
    ) -> list[StoredSet]:
        """Register (if asked) and store finished sets; nothing happens for a job cancelled by now."""
        if job.stop():
            raise Cancelled("cancelled before the results were stored; nothing was registered")
        entries = [StoredSet(d) for d in sets]
        if register_as:
            for k, entry in enumerate(entries):
                job.progress(k, len(entries), "registering", f"registering as {register_as}", force=True)
                self.store.register(entry, register_as)
            job.progress(len(entries), len(entries), "registering", f"registered as {register_as}", force=True)
        for entry in entries:
            self.store.add(entry)
        return entries

    def _set_direction(
        self, ref: common_pb2.DirectionSetRef, fr: ServedModel[FacePipeline], which: str
    ) -> tuple[StoredSet, DirectionSetData]:
        entry = self.store.get(ref, which)
        if not isinstance(entry.data, DirectionSetData):
            raise InvalidArgument(f"{which} {entry.set_id} is an equivariance map set, not a direction set")
        check_same_fr(entry, fr)
        return entry, entry.data

    def _direction(
        self, request: directions_pb2.TraverseRequest | directions_pb2.SuppressRequest, fr: ServedModel[FacePipeline]
    ) -> tuple[torch.Tensor, directions_pb2.Direction]:
        """The request's direction (a stored set's or inline) as a vector, and its description (no vector)."""
        info = fr.model.info
        which = request.WhichOneof("direction")
        if which == "set_direction":
            sd = request.set_direction
            _entry, data = self._set_direction(sd.set, fr, "set_direction.set")
            k = len(data.names)
            if not 0 <= sd.index < k:
                raise InvalidArgument(
                    f"set_direction.index is {sd.index}; set {data.set_id} holds directions 0..{k - 1}"
                )
            vec = torch.from_numpy(np.asarray(data.vectors[sd.index], dtype=np.float32))
            direction = directions_pb2.Direction(
                name=data.names[sd.index],
                eigenvalue=data.eigenvalues[sd.index],
                explained_variance=data.explained_variance[sd.index],
                stddev=data.stddev[sd.index],
            )
        elif which == "inline":
            d = request.inline
            if len(d.vector) != info.dim:
                raise InvalidArgument(f"inline direction has dimension {len(d.vector)}; {fr.name} uses {info.dim}")
            if not all(math.isfinite(v) for v in d.vector):
                raise InvalidArgument("inline direction contains NaN or infinite values")
            vec = torch.tensor(list(d.vector), dtype=torch.float32)
            if float(vec.abs().max()) == 0.0:
                raise InvalidArgument("inline direction is the zero vector")
            if not (math.isfinite(d.stddev) and d.stddev >= 0):
                raise InvalidArgument(f"inline direction stddev must be finite and >= 0, got {d.stddev}")
            direction = directions_pb2.Direction(
                name=d.name or "inline",
                eigenvalue=d.eigenvalue,
                explained_variance=d.explained_variance,
                stddev=d.stddev,
            )
        else:
            raise InvalidArgument("no direction: set set_direction or inline")
        return vec, direction

    def _probes(self, probes: list[common_pb2.Probe], fr: ServedModel[FacePipeline], selection: int) -> torch.Tensor:
        """Templates of several probes; the images among them are detected and embedded in one batch."""
        sel = face_selection(selection)
        info = fr.model.info
        out: dict[int, torch.Tensor] = {}
        images: list[tuple[int, torch.Tensor]] = []
        for i, p in enumerate(probes):
            kind = p.WhichOneof("kind")
            try:
                if kind == "template":
                    out[i] = template_from_proto(p.template, info.dim, fr.name, model_version=fr.version)
                elif kind == "image":
                    images.append((i, decode_image(p.image, self.settings.max_image_pixels)))
                else:
                    raise InvalidArgument("empty: set an image or a template")
            except ServiceError as exc:
                raise type(exc)(f"faces[{i}]: {exc.message}") from None
        for start in range(0, len(images), self.settings.batch_size):
            chunk = images[start : start + self.settings.batch_size]
            for (i, _img), res in zip(chunk, fr.model.analyze([img for _i, img in chunk], sel), strict=True):
                if res is None:
                    raise NoFaceFound(f"faces[{i}]")
                out[i] = res.template.float().cpu()
        return torch.stack([out[i] for i in range(len(probes))])

    # -- discovery -----------------------------------------------------------------------------------------
    @streaming
    def DiscoverSSI(
        self, request: directions_pb2.DiscoverSSIRequest, context: grpc.ServicerContext
    ) -> Iterator[directions_pb2.DiscoveryEvent]:
        fr = self.fr_slot.current()
        plan = discovery.plan_ssi(request, self.settings, fr.model.info.dim)
        register_as = self._register_name(request.register, request.registered_name, DEFAULT_DIRECTIONS_NAME)
        items, params = list_items(request.dataset, self.settings)
        check_items(items, need_images=True, method="SSI")

        def work(job: JobContext) -> list[directions_pb2.DiscoveryEvent]:
            ds = self._dataset(request.dataset, items, params, fr, job, need_images=True, batch_size=plan.batch_size)
            entries = self._keep(list(discovery.run_ssi(plan, ds, fr, job)), job, register_as)
            return [directions_pb2.DiscoveryEvent(result=direction_set_proto(e)) for e in entries]

        yield from run_job(context, work, "ssi")

    @streaming
    def DiscoverCentroid(
        self, request: directions_pb2.DiscoverCentroidRequest, context: grpc.ServicerContext
    ) -> Iterator[directions_pb2.DiscoveryEvent]:
        fr = self.fr_slot.current()
        plan = discovery.plan_centroid(request)
        register_as = self._register_name(request.register, request.registered_name, DEFAULT_DIRECTIONS_NAME)
        items, params = list_items(request.dataset, self.settings)

        def work(job: JobContext) -> list[directions_pb2.DiscoveryEvent]:
            ds = self._dataset(
                request.dataset,
                items,
                params,
                fr,
                job,
                need_images=False,
                batch_size=self.settings.batch_size,
                allow_normalized=plan.normalize,
            )
            data = discovery.run_centroid(plan, ds, fr, self.settings.min_label_items)
            entries = self._keep([data], job, register_as)
            return [directions_pb2.DiscoveryEvent(result=direction_set_proto(entries[0]))]

        yield from run_job(context, work, "centroid")

    @streaming
    def DiscoverRegression(
        self, request: directions_pb2.DiscoverRegressionRequest, context: grpc.ServicerContext
    ) -> Iterator[directions_pb2.DiscoveryEvent]:
        fr = self.fr_slot.current()
        plan = discovery.plan_regression(request)
        register_as = self._register_name(request.register, request.registered_name, DEFAULT_DIRECTIONS_NAME)
        items, params = list_items(request.dataset, self.settings)
        probe = None
        probe_normalized = False
        if request.probe.WhichOneof("kind") is not None:
            probe = probe_template(request.probe, fr, self.settings.max_image_pixels)
            probe_normalized = request.probe.WhichOneof("kind") == "template" and request.probe.template.normalized

        def work(job: JobContext) -> list[directions_pb2.DiscoveryEvent]:
            ds = self._dataset(
                request.dataset,
                items,
                params,
                fr,
                job,
                need_images=False,
                batch_size=self.settings.batch_size,
                allow_normalized=plan.normalize,
            )
            outcome = discovery.run_regression(plan, ds, fr, self.settings.min_label_items, probe, probe_normalized)
            entries = self._keep([outcome.data], job, register_as)
            events = [directions_pb2.DiscoveryEvent(result=direction_set_proto(entries[0]))]
            if outcome.probe is not None:
                outcome.probe.probe.model.CopyFrom(fr.ref())
                outcome.probe.moved.model.CopyFrom(fr.ref())
                events.append(directions_pb2.DiscoveryEvent(probe=outcome.probe))
            return events

        yield from run_job(context, work, "regression")

    @streaming
    def FitEquivariance(
        self, request: directions_pb2.FitEquivarianceRequest, context: grpc.ServicerContext
    ) -> Iterator[directions_pb2.DiscoveryEvent]:
        fr = self.fr_slot.current()
        plan = discovery.plan_equivariance(request, self.settings)
        register_as = self._register_name(request.register, request.registered_name, DEFAULT_EQUIVARIANCE_NAME)
        items, params = list_items(request.dataset, self.settings)
        check_items(items, need_images=True, method="FitEquivariance")

        def work(job: JobContext) -> list[directions_pb2.DiscoveryEvent]:
            ds = self._dataset(request.dataset, items, params, fr, job, need_images=True, batch_size=plan.batch_size)
            entries = self._keep([discovery.run_equivariance(plan, ds, fr, job)], job, register_as)
            return [directions_pb2.DiscoveryEvent(maps=equivariance_proto(entries[0]))]

        yield from run_job(context, work, "equivariance")

    # -- stored sets ---------------------------------------------------------------------------------------
    @unary
    def GetDirectionSet(
        self, request: directions_pb2.GetDirectionSetRequest, context: grpc.ServicerContext
    ) -> directions_pb2.GetDirectionSetResponse:
        entry = self.store.get(request.ref, "ref")
        if isinstance(entry.data, DirectionSetData):
            return directions_pb2.GetDirectionSetResponse(direction_set=direction_set_proto(entry))
        return directions_pb2.GetDirectionSetResponse(equivariance_maps=equivariance_proto(entry))

    @unary
    def ListDirectionSets(
        self, request: directions_pb2.ListDirectionSetsRequest, context: grpc.ServicerContext
    ) -> directions_pb2.ListDirectionSetsResponse:
        if request.method not in LIST_METHODS:
            raise InvalidArgument(f"unknown method {request.method!r}; one of {', '.join(LIST_METHODS[1:])} or empty")
        entries = list(reversed(self.store.in_memory()))
        if request.include_registered:
            held = {e.set_id for e in entries}
            entries += [e for e in self.store.list_registered() if e.set_id not in held]
        entries.sort(key=lambda e: e.data.created_at, reverse=True)  # stable: newest first
        resp = directions_pb2.ListDirectionSetsResponse()
        for e in entries:
            if request.method and e.method != request.method:
                continue
            if isinstance(e.data, DirectionSetData):
                resp.direction_sets.append(direction_set_proto(e, include_vectors=request.include_vectors))
            else:
                resp.equivariance_maps.append(equivariance_proto(e, include_vectors=request.include_vectors))
        return resp

    # -- applying directions -------------------------------------------------------------------------------
    @unary
    def Traverse(
        self, request: directions_pb2.TraverseRequest, context: grpc.ServicerContext
    ) -> directions_pb2.TraverseResponse:
        fr = self.fr_slot.current()
        selection = face_selection(request.selection)
        alphas = list(request.alphas) or list(DEFAULT_ALPHAS)
        if len(alphas) > self.settings.max_alphas:
            raise ResourceExhausted(
                f"{len(alphas)} alphas exceed the limit of {self.settings.max_alphas} (FACEXPLAIN_MAX_ALPHAS)"
            )
        if not all(math.isfinite(a) for a in alphas):
            raise InvalidArgument("alphas must be finite")
        vec, direction = self._direction(request, fr)
        if request.scale in (directions_pb2.ALPHA_SCALE_UNSPECIFIED, directions_pb2.ALPHA_SCALE_ABSOLUTE):
            multipliers = [float(a) for a in alphas]
        elif request.scale == directions_pb2.ALPHA_SCALE_STDDEV:
            if not direction.stddev > 0:
                raise InvalidArgument(f"direction {direction.name!r} has no stddev (0): use ALPHA_SCALE_ABSOLUTE")
            per = float(direction.stddev) / float(vec.double().norm())
            multipliers = [float(a) * per for a in alphas]
        else:
            raise InvalidArgument(f"unknown alpha scale {request.scale}")
        decoder = self._decoder(fr) if request.decode else None
        probe = probe_template(request.probe, fr, self.settings.max_image_pixels, "probe", selection)
        check_deadline(context, "probe")
        moved = traverse(probe, vec, multipliers)  # (A, D): t + m * v
        cosines = F.cosine_similarity(moved.double(), probe.double()[None], dim=1)
        resp = directions_pb2.TraverseResponse(
            alphas=[float(a) for a in alphas],
            multipliers=multipliers,
            templates=[_tproto(t, fr) for t in moved],
            cosine_to_probe=[float(c) for c in cosines],
            direction=direction,
            probe=_tproto(probe, fr),
            fr_model=fr.ref(),
        )
        if decoder is not None:
            frames = decoder.model.decode(moved)
            resp.frames.extend(png01(f) for f in frames)
            resp.strip.CopyFrom(strip_png(frames))
            resp.decoder.CopyFrom(decoder.ref())
        return resp

    @unary
    def ApplyEquivariance(
        self, request: directions_pb2.ApplyEquivarianceRequest, context: grpc.ServicerContext
    ) -> directions_pb2.ApplyEquivarianceResponse:
        fr = self.fr_slot.current()
        selection = face_selection(request.selection)
        entry = self.store.get(request.maps, "maps")
        if not isinstance(entry.data, EquivarianceSetData):
            raise InvalidArgument(f"maps {entry.set_id} is a direction set, not an equivariance map set")
        check_same_fr(entry, fr)
        wanted = check_transform(request.transform, "transform")
        distances = [transform_distance(wanted, m) for m in entry.data.maps]
        best = int(np.argmin(distances))
        if not math.isfinite(distances[best]):
            kinds = sorted({m.kind for m in entry.data.maps})
            raise InvalidArgument(f"set {entry.set_id} has no {wanted.kind} map (it has: {', '.join(kinds)})")
        m = entry.data.maps[best]
        decoder = self._decoder(fr) if request.decode else None
        probe = probe_template(request.probe, fr, self.settings.max_image_pixels, "probe", selection)
        matrix, bias = (m.forward, m.forward_bias) if request.forward else (m.inverse, m.inverse_bias)
        out = torch.from_numpy(matrix).double() @ probe.double() + torch.from_numpy(bias).double()
        resp = directions_pb2.ApplyEquivarianceResponse(
            template=_tproto(out, fr), probe=_tproto(probe, fr), applied=transform_proto(m), fr_model=fr.ref()
        )
        if decoder is not None:
            resp.decoded.CopyFrom(png01(decoder.model.decode(out.float()[None])[0]))
            resp.decoder.CopyFrom(decoder.ref())
        return resp

    @unary
    def Aggregate(
        self, request: directions_pb2.AggregateRequest, context: grpc.ServicerContext
    ) -> directions_pb2.AggregateResponse:
        fr = self.fr_slot.current()
        n = len(request.faces)
        check_batch(n, self.settings.max_batch_size, "faces")
        if not 0 <= request.n_clusters <= n:
            raise InvalidArgument(f"n_clusters is {request.n_clusters}; it must be in 0..{n} (the number of faces)")
        if request.linkage not in LINKAGES:
            raise InvalidArgument(f"unknown linkage {request.linkage!r}; one of average, complete, single, ward")
        linkage, metric = LINKAGES[request.linkage]
        decoder = self._decoder(fr) if request.decode else None
        x = self._probes(list(request.faces), fr, request.selection)
        check_deadline(context, "embedding")
        if linkage != "ward" and request.n_clusters and bool((x.norm(dim=1) == 0).any()):
            raise InvalidArgument("cosine linkage is undefined for a zero template")
        mean = mean_template(x, normalize_inputs=request.normalize)
        resp = directions_pb2.AggregateResponse(mean=_tproto(mean, fr), fr_model=fr.ref())
        centroids: list[torch.Tensor] = []
        if request.n_clusters:
            data = F.normalize(x.double(), dim=1) if linkage == "ward" else x.double()
            clusters = agglomerative_clusters(data, n_clusters=request.n_clusters, linkage=linkage, metric=metric)  # type: ignore[arg-type]
            for k in range(len(clusters.sizes)):
                members = (clusters.assignments == k).nonzero().flatten().tolist()
                centroid = mean_template(x[members], normalize_inputs=request.normalize)
                centroids.append(centroid)
                resp.clusters.append(directions_pb2.Cluster(centroid=_tproto(centroid, fr), members=members))
        if decoder is not None:
            images = decoder.model.decode(torch.stack([mean, *centroids]).float())
            resp.decoded_mean.CopyFrom(png01(images[0]))
            for cluster, image in zip(resp.clusters, images[1:], strict=True):
                cluster.decoded.CopyFrom(png01(image))
            resp.decoder.CopyFrom(decoder.ref())
        return resp

    @unary
    def Suppress(
        self, request: directions_pb2.SuppressRequest, context: grpc.ServicerContext
    ) -> directions_pb2.SuppressResponse:
        fr = self.fr_slot.current()
        n = len(request.probes)
        if n == 0:
            raise InvalidArgument("no probes: give at least one face (image or template)")
        check_batch(n, self.settings.max_batch_size, "probes")
        vec, direction = self._direction(request, fr)
        decoder = self._decoder(fr) if request.decode else None
        x = self._probes(list(request.probes), fr, request.selection)
        check_deadline(context, "embedding")
        moved = remove_direction(x.double(), vec.double())
        cosines = F.cosine_similarity(moved, x.double(), dim=1)
        resp = directions_pb2.SuppressResponse(
            templates=[_tproto(t, fr) for t in moved],
            originals=[_tproto(t, fr) for t in x],
            cosine_to_original=[float(c) for c in cosines],
            direction=direction,
            fr_model=fr.ref(),
        )
        if decoder is not None:
            images = decoder.model.decode(torch.cat([x, moved]).float())
            resp.decoded_originals.extend(png01(im) for im in images[:n])
            resp.decoded.extend(png01(im) for im in images[n:])
            resp.decoder.CopyFrom(decoder.ref())
        return resp

    @unary
    def CentroidMDS(
        self, request: directions_pb2.CentroidMDSRequest, context: grpc.ServicerContext
    ) -> directions_pb2.CentroidMDSResponse:
        if request.metric not in ("", "cosine", "l2"):
            raise InvalidArgument(f"unknown metric {request.metric!r}; 'cosine' (default) or 'l2'")
        source = request.WhichOneof("source")
        if source == "set":
            entry = self.store.get(request.set, "set")
            data = entry.data
            if not isinstance(data, DirectionSetData) or data.centroids is None:
                raise InvalidArgument(f"set {entry.set_id} has no centroids: MDS needs a centroid-method set")
            names = list(data.centroid_names)
            c = torch.from_numpy(np.asarray(data.centroids, dtype=np.float64))
            fr_ref = entry.fr_ref()
            if c.shape[0] < 2:
                raise InvalidArgument(f"set {entry.set_id} holds {c.shape[0]} centroid: MDS needs at least 2")
        elif source == "centroids":
            fr = self.fr_slot.current()
            info = fr.model.info
            items = list(request.centroids.centroids)
            if len(items) < 3:
                raise InvalidArgument(f"centroids holds {len(items)} centroids; MDS needs at least 3")
            if len(items) > self.settings.max_batch_size:
                raise ResourceExhausted(
                    f"{len(items)} centroids exceed the limit of {self.settings.max_batch_size} "
                    "(FACEXPLAIN_MAX_BATCH_SIZE)"
                )
            rows = []
            for i, cen in enumerate(items):
                try:
                    rows.append(template_from_proto(cen.template, info.dim, fr.name, model_version=fr.version))
                except ServiceError as exc:
                    raise type(exc)(f"centroids[{i}]: {exc.message}") from None
            c = torch.stack(rows).double()
            names = [cen.name or f"#{i}" for i, cen in enumerate(items)]
            fr_ref = fr.ref()
        else:
            raise InvalidArgument("no centroids: set set or centroids")
        # Classical (Torgerson) MDS is deterministic: request.seed has nothing to seed here.
        coords, stress = centroid_mds(c, "l2" if request.metric == "l2" else "cosine")
        return directions_pb2.CentroidMDSResponse(
            points=[
                directions_pb2.MDSPoint(label=name, x=float(coords[i, 0]), y=float(coords[i, 1]))
                for i, name in enumerate(names)
            ],
            stress=stress,
            fr_model=fr_ref,
        )

    # -- model lifecycle -----------------------------------------------------------------------------------
    @unary
    def ModelStatus(
        self, request: common_pb2.ModelStatusRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelStatusResponse:
        resp = combined_status(self._slots())
        for entry in self.store.registered_loaded():
            loaded = common_pb2.LoadedModel(
                model=entry.registered_ref(),
                kind=KIND_DIRECTION_SET,
                metadata={
                    "method": entry.method,
                    "set_id": entry.set_id,
                    "fr_model_name": entry.data.fr_name,
                    "fr_model_version": entry.data.fr_version,
                    "data_manifest_sha256": entry.data.data_manifest_sha256,
                },
                serving=True,
                device="cpu",
            )
            resp.models.append(loaded)
        return resp

    @unary
    def Reload(self, request: common_pb2.ReloadRequest, context: grpc.ServicerContext) -> common_pb2.ReloadResponse:
        return reload_response(self._slots(), request, context)
