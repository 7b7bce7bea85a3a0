"""Multi-process training under ``torchrun``: the few collective steps a pipeline needs, as plain functions.

``torchrun`` (or Kubeflow's ``PyTorchJob``, which runs it) starts one process per GPU (or per CPU
slot) and tells each who it is through ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. Without those variables every function here is a no-op, so the single-process path
stays exactly what it was: the same batches, the same random draws, the same files.

The rules every pipeline follows under ``torchrun``:

- one process group: gloo on CPU, NCCL on GPUs (each rank on GPU ``LOCAL_RANK``);
- the per-node caches (downloaded model versions, face sets) are built by the node's first process
  while the others wait (:func:`node_first`), then read by all;
- every rank trains on its shard of each epoch (:func:`shard_batches`, a seeded
  ``DistributedSampler`` advanced with ``set_epoch``), and the logged training figures are reduced
  over all ranks (:func:`reduce_means`);
- rank 0 alone validates, tracks (MLflow), checkpoints, writes the bundle and registers it; it
  broadcasts what every rank must agree on (stop or go, the learning rate);
- the process group is destroyed at the end (:func:`shutdown`).

This module imports torch lazily: the light CLI modules import ``training.common``, which re-exports
the single-process names from here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Set by torchrun (and by the Kubeflow training operator) in every worker process.
ENV_RANK = "RANK"
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_LOCAL_RANK = "LOCAL_RANK"


@dataclass(frozen=True)
class Dist:
    """Who this process is in the job; the defaults are the single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""  # "" when no process group is in use
    owns_group: bool = False  # init_distributed created the group, so shutdown destroys it

    @property
    def main(self) -> bool:
        """Rank 0: the one process that tracks, checkpoints and registers."""
        return self.rank == 0

    @property
    def node_main(self) -> bool:
        """The first process of its node: the one that fills the node's caches."""
        return self.local_rank == 0


def env_world_size() -> int:
    return int(os.environ.get(ENV_WORLD_SIZE, "1"))


def env_rank() -> int:
    """This process's rank as torchrun announced it (0 when not under torchrun): the CLI asks it before
    any process group exists, to keep its printing to rank 0."""
    return int(os.environ.get(ENV_RANK, "0"))


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> Dist:
    """Join the job's process group when ``WORLD_SIZE`` > 1 (idempotent: every pipeline step may ask)."""
    if env_world_size() <= 1:
        return Dist()
    import torch
    import torch.distributed as td

    owns = False
    if not td.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicator binds to the current device
        td.init_process_group(backend_for(device))
        owns = True
    local = int(os.environ.get(ENV_LOCAL_RANK, td.get_rank()))
    return Dist(td.get_rank(), td.get_world_size(), local, td.get_backend(), owns)


def shutdown(dist: Dist, wait_for_peers: bool = True) -> None:
    """Destroy the process group this module created (a group created by the caller is the caller's).

    On a normal end every rank first drops what still holds the group (a DDP wrapper in a reference
    cycle) and waits for the others: rank 0 hosts the rendezvous store, and a rank whose peers tear
    the group down under it while it is still leaving can abort in gloo's C++ threads. After a
    failure (``wait_for_peers=False``) nobody waits: the peers may be inside another collective, and
    torchrun ends them when this rank exits with its error.
    """
    if dist.owns_group:
        import gc

        import torch.distributed as td

        if td.is_initialized():
            if wait_for_peers:
                gc.collect()
                td.barrier()
            td.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


@contextmanager
def node_first(dist: Dist) -> Iterator[None]:
    """Run the body on each node's first process, then on the others: what the first one writes to a
    cache (a model download, a face set) the others then read instead of racing to write it too.

    If the first process fails inside, the others stay at the barrier until torchrun ends the job
    (it stops every worker when one exits with an error).
    """
    if not dist.node_main:
        barrier(dist)
    yield
    if dist.node_main:
        barrier(dist)


def wrap_ddp(model: torch.nn.Module, device: torch.device, dist: Dist) -> torch.nn.Module:
    """``model`` itself in one process; under torchrun its ``DistributedDataParallel`` wrapper, which
    averages the gradients over ranks (parameters and buffers start as rank 0's)."""
    if dist.world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_seed(seed: int, dist: Dist) -> int:
    """The seed of a rank's own random draws (dropout, augmentation) once the shared ones (the model's
    initialisation) are done: distinct per rank, and ``seed`` itself in one process."""
    return seed if dist.world <= 1 else seed * 1_000_003 + 7919 * (dist.rank + 1)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, dist: Dist) -> list[torch.Tensor]:
    """One process's index batches of one epoch; the ragged tail is dropped (BatchNorm dislikes tiny batches).

    Under torchrun the pipelines use :func:`shard_batches`; with ranks here, each takes every
    ``world``-th index of each global batch of ``batch_size * world`` (the same global batches).
    """
    import torch

    perm = torch.randperm(n, generator=generator)
    per_step = batch_size * dist.world
    steps = max(1, n // per_step)
    return [perm[s * per_step : (s + 1) * per_step][dist.rank :: dist.world] for s in range(steps)]


def shard_batches(n: int, batch_size: int, seed: int, epoch: int, dist: Dist) -> list[torch.Tensor]:
    """This rank's index batches of one epoch, from a ``DistributedSampler`` seeded by ``seed`` and
    advanced with ``set_epoch(epoch)``; ragged tails dropped, the same number of steps on every rank
    (DDP needs every rank in every all-reduce).

    Seeded as ``epoch_batches``' generator is (``seed + epoch``), the global batch of step ``s`` (the
    union over ranks) is the one process's batch ``s`` of ``batch_size * world`` faces: N ranks of
    batch b train like one process of batch N*b, not on another sample of the data.
    """
    import torch
    from torch.utils.data.distributed import DistributedSampler

    if n < dist.world:
        raise ValueError(f"{n} training faces cannot be shared by {dist.world} ranks")
    indices: Any = range(n)  # the sampler needs only the length of what it samples
    sampler: DistributedSampler[int] = DistributedSampler(
        indices, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    shard = torch.tensor(list(sampler), dtype=torch.long)
    steps = max(1, len(shard) // batch_size)
    return [shard[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def reduce_means(sums: dict[str, float], seen: int, seconds: float, dist: Dist) -> tuple[dict[str, float], int, float]:
    """Per-face means of ``sums`` over every rank's ``seen`` faces, the faces seen by all ranks and the
    slowest rank's seconds (what the epoch took): the figures rank 0 logs describe the whole epoch,
    not its own shard. In one process: ``sums / seen``, ``seen``, ``seconds``."""
    if dist.world <= 1:
        return {k: v / max(1, seen) for k, v in sums.items()}, seen, seconds
    import torch
    import torch.distributed as td

    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [float(seen)], dtype=torch.float64, device=_collective_device(dist))
    td.all_reduce(totals, op=td.ReduceOp.SUM)
    slowest = torch.tensor([seconds], dtype=torch.float64, device=totals.device)
    td.all_reduce(slowest, op=td.ReduceOp.MAX)
    n = int(totals[-1])
    return {k: float(totals[i]) / max(1, n) for i, k in enumerate(keys)}, n, float(slowest[0])


def broadcast_floats(values: list[float], dist: Dist) -> list[float]:
    """Rank 0's ``values`` on every rank (decisions all ranks must take alike: stop, learning rate)."""
    if dist.world <= 1:
        return values
    import torch
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(dist))
    td.broadcast(t, 0)
    return [float(v) for v in t.tolist()]


def _collective_device(dist: Dist) -> str:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if dist.backend == "nccl":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def distributed_params(seed: int, batch_size: int, dist: Dist) -> dict[str, Any]:
    """The MLflow parameters of a multi-process run (none in one process, whose parameters stay as they were):
    how many ranks, over what, the global batch and each rank's seed, so the run can be repeated."""
    if dist.world <= 1:
        return {}
    seeds = [rank_seed(seed, Dist(rank=r, world=dist.world)) for r in range(dist.world)]
    return {
        "dist_world_size": dist.world,
        "dist_local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", dist.world)),
        "dist_backend": dist.backend,
        "dist_global_batch_size": batch_size * dist.world,
        "dist_rank_seeds": ",".join(str(s) for s in seeds),
    }


def require_single_process(pipeline: str) -> None:
    """Refuse to start ``pipeline`` under torchrun with several processes: each would train and register
    its own copy."""
    if env_world_size() > 1:
        raise SystemExit(
            f"error: `facexplain train {pipeline}` runs in one process; under torchrun (WORLD_SIZE="
            f"{env_world_size()}) every rank would train and register its own copy. Use --nproc_per_node 1."
        )
