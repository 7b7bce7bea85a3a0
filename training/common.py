"""What every training pipeline shares: config flags, devices and ranks, checkpoints, MLflow tracking.

Each pipeline (``training/decoder``, ``training/sadfad``) keeps only its method: data, loop and
evaluation. The command-line shape (one flag per config field, presets underneath, SIGTERM ends the
run like Ctrl-C), the device/rank rules, the atomic checkpoint write and the MLflow calls are the
same for all of them and live here once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import torch

    from registry import Registry

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


# -- devices, ranks, checkpoints ---------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available; under torchrun each rank takes GPU ``LOCAL_RANK``."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return torch.device(name)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """``torchrun`` sets WORLD_SIZE/RANK; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(td.get_rank(), td.get_world_size())


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, dist: Dist) -> list[torch.Tensor]:
    """This rank's index batches of one epoch; the ragged tail is dropped (BatchNorm dislikes tiny batches)."""
    import torch

    perm = torch.randperm(n, generator=generator)
    per_step = batch_size * dist.world
    steps = max(1, n // per_step)
    return [perm[s * per_step : (s + 1) * per_step][dist.rank :: dist.world] for s in range(steps)]


def save_atomic(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint so that a crash leaves the previous one, never a truncated file."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:500]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

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


def default_alias(registry: Registry, name: str, wanted: str) -> str:
    """``auto``: champion when the model has none yet (the first version serves), challenger otherwise."""
    from registry import CHALLENGER, CHAMPION, RegistryNotFound

    if wanted != "auto":
        return wanted
    try:
        registry.resolve(name, CHAMPION)
        return CHALLENGER
    except RegistryNotFound:
        return CHAMPION


def print_registration(registered: dict[str, Any] | None) -> None:
    """The line every training CLI prints for the version it registered (nothing when it registered none)."""
    if registered:
        alias = f" as @{registered['alias']}" if registered.get("alias") else ""
        print(f"registered {registered['name']} version {registered['version']}{alias}")


def print_summary_json(summary: Any) -> None:
    """The run summary as one JSON line when FACEXPLAIN_PRINT_SUMMARY_JSON is set (tests and scripts parse it)."""
    if os.environ.get("FACEXPLAIN_PRINT_SUMMARY_JSON"):
        print(json.dumps(dataclasses.asdict(summary)))
