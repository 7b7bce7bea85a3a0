"""The torchrun helpers: no-ops in one process, shards that add up to the one-process batches, and the
collectives (reduce, broadcast, shutdown) between two real gloo ranks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from training.distributed import (
    Dist,
    broadcast_floats,
    distributed_params,
    epoch_batches,
    init_distributed,
    rank_seed,
    reduce_means,
    require_single_process,
    shard_batches,
)


def test_one_process_is_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    one = init_distributed(torch.device("cpu"))
    assert one == Dist() and one.main and one.node_main and not one.owns_group
    assert not torch.distributed.is_initialized()
    assert reduce_means({"total": 6.0, "pixel": 3.0}, 4, 1.5, one) == ({"total": 1.5, "pixel": 0.75}, 4, 1.5)
    assert broadcast_floats([1.0, 0.5], one) == [1.0, 0.5]
    assert rank_seed(7, one) == 7 and distributed_params(7, 32, one) == {}
    require_single_process("sadfad")  # no torchrun: nothing to refuse


def test_other_pipelines_refuse_several_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="runs in one process"):
        require_single_process("sadfad")


@pytest.mark.parametrize("n", [64, 67, 10])
def test_rank_shards_make_the_one_process_batches(n: int) -> None:
    """Two ranks of batch 8 train on the global batches one process of batch 16 would (same seed, epoch)."""
    seed, epoch, world, bs = 3 * 1_000_003, 5, 2, 8
    one = epoch_batches(n, bs * world, torch.Generator().manual_seed(seed + epoch), Dist())
    shards = [shard_batches(n, bs, seed, epoch, Dist(rank=r, world=world)) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == len(one)  # every rank takes part in every step
    for step, whole in enumerate(one):
        parts = [s[step] for s in shards]
        assert len(parts[0]) == len(parts[1])  # DDP averages equal shares
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        if len(whole) == bs * world:  # a full step: exactly the one-process batch
            assert sorted(torch.cat(parts).tolist()) == sorted(whole.tolist())
    # set_epoch: another epoch, another order
    assert not torch.equal(shard_batches(n, bs, seed, epoch + 1, Dist(0, world))[0], shards[0][0])
    with pytest.raises(ValueError, match="cannot be shared"):
        shard_batches(1, bs, seed, epoch, Dist(0, world))


def test_rank_seeds_differ_and_are_recorded() -> None:
    two = Dist(rank=1, world=2, backend="gloo")
    params = distributed_params(5, 16, two)
    seeds = [rank_seed(5, Dist(rank=r, world=2)) for r in range(2)]
    assert seeds[0] != seeds[1] and params["dist_rank_seeds"] == f"{seeds[0]},{seeds[1]}"
    assert params["dist_world_size"] == 2 and params["dist_global_batch_size"] == 32
    assert params["dist_backend"] == "gloo"


def _collectives(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank)}
    )
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from training.distributed import shutdown

    dist = init_distributed(torch.device("cpu"))
    again = init_distributed(torch.device("cpu"))  # idempotent: the second call joins, it does not own
    # rank r saw 10 * (r + 1) faces with loss sum 1.0 * faces * (r + 1): the means weigh each face once
    faces = 10 * (rank + 1)
    means, seen, seconds = reduce_means({"total": 1.0 * faces * (rank + 1)}, faces, 1.0 + rank, dist)
    decided = broadcast_floats([1.0 if dist.main else 0.0, 0.25 if dist.main else 9.0], dist)
    shutdown(again)
    still = torch.distributed.is_initialized()
    shutdown(dist)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "dist": [dist.rank, dist.world, dist.local_rank, dist.backend, dist.owns_group, again.owns_group],
                "means": means,
                "seen": seen,
                "seconds": seconds,
                "decided": decided,
                "group_after_joined_shutdown": still,
                "group_after_shutdown": torch.distributed.is_initialized(),
            }
        )
    )


def test_collectives_between_two_gloo_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collectives, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["dist"] == [rank, 2, rank, "gloo", True, False]
        assert got["seen"] == 30 and got["means"]["total"] == pytest.approx((10 * 1 + 20 * 2) / 30)
        assert got["seconds"] == 2.0  # the slowest rank's epoch
        assert got["decided"] == [1.0, 0.25]  # rank 0's decision everywhere
        assert got["group_after_joined_shutdown"] is True and got["group_after_shutdown"] is False
