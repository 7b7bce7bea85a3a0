"""What every training pipeline shares: config flags, devices, checkpoints, MLflow tracking.

Each pipeline (``training/decoder``, ``training/sadfad``) keeps only its method: data, loop and
evaluation. The command-line shape (one flag per config field, presets underneath, SIGTERM ends the
run like Ctrl-C), the device rules, the atomic checkpoint write and the MLflow calls are the
same for all of them and live here once; what ranks do under torchrun is ``training.distributed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import facexplain
from facexplain.paths import var_dir

if TYPE_CHECKING:
    import torch

    from registry import Registry

# Where every pipeline caches its aligned face sets (the same faces and FR model give the same file).
FACESET_CACHE = var_dir() / "cache" / "facesets"

# -- command line ---------------------------------------------------------------------------------------


class _Config(Protocol):
    def replace(self, **changes: Any) -> Any: ...


C = TypeVar("C", bound=_Config)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def add_config_arguments(
    p: argparse.ArgumentParser,
    config_cls: type,
    helps: dict[str, str],
    choices: dict[str, Sequence[str]] | None = None,
) -> None:
    """One ``--flag`` per field of the (flat, frozen) config dataclass; unset flags stay ``None`` so the
    preset's value, not the dataclass default, applies (see ``config_from_args``)."""
    for f in dataclasses.fields(config_cls):
        default = f.default
        kind: Any = type(default) if default is not None else str
        if kind is bool:
            help_text = helps.get(f.name, f"true or false, default {default!r}")
            p.add_argument(flag(f.name), type=_parse_bool, default=None, help=help_text)
        else:
            p.add_argument(
                flag(f.name),
                type=kind,
                default=None,
                choices=(choices or {}).get(f.name),
                help=helps.get(f.name, f"default {default!r}"),
            )


def config_from_args(args: argparse.Namespace, config_cls: type[C], presets: dict[str, dict[str, Any]]) -> C:
    """Defaults, then ``--preset``'s overrides, then every flag given explicitly."""
    cfg = config_cls().replace(**presets[args.preset])
    explicit = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config_cls)  # type: ignore[arg-type]
        if getattr(args, f.name, None) is not None
    }
    return cfg.replace(**explicit)  # type: ignore[no-any-return]


def stop_on_sigterm() -> None:
    """SIGTERM (kill, Kubernetes, a scheduler) ends the run like Ctrl-C: the MLflow run is marked KILLED and
    the last finished epoch's checkpoint stays for --resume."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# -- devices, checkpoints ---------------------------------------------------------------------------------


def setup_run(device: str, threads: int, out_dir: Path) -> torch.device:
    """The first step of every pipeline: the device, the CPU thread count (0 keeps torch's) and the output folder."""
    import torch  # heavy: common is imported by the light CLI modules

    resolved = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    return resolved


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available; under torchrun each rank takes GPU ``LOCAL_RANK``."""
    import torch  # heavy: common is imported by the light CLI modules

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return torch.device(name)


def save_atomic(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint so that a crash leaves the previous one, never a truncated file."""
    import torch  # heavy: common is imported by the light CLI modules

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_tail(history: Sequence[Any], run_state: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint entries every trainer writes last: history, the run state (the MLflow run id), and
    the global RNG (dropout draws: a resumed run continues the same sequence)."""
    import torch  # heavy: common is imported by the light CLI modules

    return {"history": [vars(h) for h in history], "run_state": run_state or {}, "rng": torch.get_rng_state()}


def restore_checkpoint_tail(
    ck: dict[str, Any], run_state: dict[str, Any] | None, announce: bool, path: Path
) -> list[EpochLog]:
    """Undo ``checkpoint_tail``: the history back, the run state merged into ``run_state``, the RNG restored."""
    import torch  # heavy: common is imported by the light CLI modules

    if run_state is not None:
        run_state.update(ck.get("run_state", {}))
    if "rng" in ck:
        torch.set_rng_state(ck["rng"].cpu())
    if announce:
        print(f"resumed from {path} after epoch {ck['epoch'] + 1}", flush=True)
    return [EpochLog(**h) for h in ck["history"]]


def saved_run_state(out_dir: Path, resume: bool) -> dict[str, Any]:
    """The ``run_state`` of the last checkpoint on ``--resume`` (the MLflow run to continue), else empty."""
    import torch  # heavy: common is imported by the light CLI modules

    ck = out_dir / "last.pt"
    if resume and ck.is_file():
        # weights_only: our checkpoints hold tensors and plain containers only, so a file swapped
        # into the run folder cannot run code on --resume (issue 23)
        state: dict[str, Any] = torch.load(ck, map_location="cpu", weights_only=True).get("run_state", {})
        return state
    return {}


def runtime_params(device: torch.device) -> dict[str, Any]:
    """The run parameters that say where and with what the run trained (the same keys in every pipeline)."""
    import torch  # heavy: common is imported by the light CLI modules

    return {
        "device_resolved": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "facexplain_version": facexplain.__version__,
    }


@dataclass
class EpochLog:
    """What one epoch measured; rank 0 logs it, keeps it in the checkpoint and the run summary."""

    epoch: int
    train: dict[str, float]
    val: dict[str, float]
    seconds: float
    train_images_per_s: float
    best: bool = False


def epoch_metrics(log: EpochLog) -> dict[str, float]:
    """The MLflow metrics of one epoch: ``train_*``, ``val_*``, throughput and duration."""
    values = {f"train_{k}": v for k, v in log.train.items()}
    values.update({f"val_{k}": v for k, v in log.val.items()})
    values["train_images_per_s"] = log.train_images_per_s
    values["epoch_seconds"] = log.seconds
    return values


def replace_dir(path: Path) -> Path:
    """An emptied ``path``: a bundle is always written whole, never over an older one."""
    if path.exists():
        shutil.rmtree(path)
    return path


def finite_rounded(metrics: dict[str, float]) -> dict[str, float]:
    """The figures a bundle's training metadata keeps: finite ones, to five decimals."""
    return {k: round(v, 5) for k, v in metrics.items() if math.isfinite(v)}


# -- tracking and registration -----------------------------------------------------------------------------


class NullRun:
    """The tracking calls of a run without MLflow: nothing is recorded."""

    run_id = ""

    def params(self, params: dict[str, Any]) -> None:
        pass

    def metrics(self, values: dict[str, float], step: int) -> None:
        pass

    def image(self, array: Any, path: str) -> None:
        pass

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        pass

    def dict(self, data: dict[str, Any], path: str) -> None:
        pass

    def tag(self, key: str, value: str) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class TrackedRun(NullRun):
    """The few MLflow calls a training run makes, against an explicit tracking URI (no global state).

    ``run_id`` continues that run (``--resume``); otherwise a new run starts in ``experiment``.
    """

    def __init__(self, uri: str, experiment: str, run_id: str | None, run_name: str, tags: dict[str, str]) -> None:
        from mlflow import MlflowClient  # heavy: only a tracked run pays for mlflow

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # heavy: only a tracked run pays for mlflow

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:500]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # heavy: only a tracked run pays for mlflow

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in values.items() if math.isfinite(float(v))]
        if ms:
            self.client.log_batch(self.run_id, metrics=ms)

    def image(self, array: Any, path: str) -> None:
        self.client.log_image(self.run_id, array, artifact_file=path)

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), subdir)

    def dict(self, data: dict[str, Any], path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def default_alias(registry: Registry, name: str, wanted: str, tags: dict[str, str] | None = None) -> str:
    """``auto``: champion when the model has none yet (the first version serves), challenger otherwise;
    a version whose ``tags`` record failed quality gates gets ``candidate`` instead (``registry.promotion``)."""
    from registry import registration_alias  # torch: keep the CLI light

    return registration_alias(registry, name, wanted, tags)


def open_registry(uri: str) -> Registry:
    """The registry client every pipeline uses: a short timeout and two retries, so a training run that
    finished does not hang on a registry that went away."""
    from registry import Registry  # pulls torch in (facexplain.artifacts): keep the CLI light

    return Registry(uri, timeout_s=30.0, max_retries=2)


def register_from_run(
    registry: Registry, bundle: Path, name: str, wanted_alias: str, tags: dict[str, str], run_id: str
) -> dict[str, str]:
    """Register ``bundle`` from its own training run (the version links back to the run's figures);
    returns what ``print_registration`` prints and the run summary keeps."""
    alias = default_alias(registry, name, wanted_alias, tags)
    info = registry.register_bundle(bundle, name, alias=alias or None, extra_tags=tags, run_id=run_id)
    return {"name": info.name, "version": info.version, "alias": alias}


def write_summary(mlrun: NullRun, out_dir: Path, summary: Any) -> None:
    """The last step of every pipeline: ``summary.json`` written, attached to the run, the run ended."""
    (out_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=1, allow_nan=True) + "\n")
    mlrun.artifact(out_dir / "summary.json")
    mlrun.end()


def print_registration(registered: dict[str, Any] | None) -> None:
    """The line every training CLI prints for the version it registered (nothing when it registered none)."""
    if registered:
        alias = f" as @{registered['alias']}" if registered.get("alias") else ""
        print(f"registered {registered['name']} version {registered['version']}{alias}")
        if registered.get("alias") == "candidate":
            print(
                "  its quality gates failed: not served (champion unchanged); to serve it anyway: "
                f'facexplain registry promote {registered["name"]} {registered["version"]} --force --reason "..."'
            )


def print_summary_json(summary: Any) -> None:
    """The run summary as one JSON line when FACEXPLAIN_PRINT_SUMMARY_JSON is set (tests and scripts parse it)."""
    if os.environ.get("FACEXPLAIN_PRINT_SUMMARY_JSON"):
        print(json.dumps(dataclasses.asdict(summary)))
