"""The decoder training loop: learning happens, resume continues exactly, early stopping and budgets stop.

Synthetic tensors keep these tests fast; the pipeline on real faces is exercised by the integration
tests (decoding service fixture) and the quality benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from facexplain.data.faceset import FaceSet
from facexplain.losses.dfd import DFDLossWeights
from facexplain.models.decoder import DecoderConfig, DeepFaceDecoder
from training.decoder.config import PRESETS, TrainDecoderConfig
from training.decoder.data import DecoderSplit, split_faceset
from training.decoder.run import check_gates, parse_model_spec, perceptual_network
from training.decoder.trainer import fit

W = DFDLossWeights(perceptual_global=0.0, perceptual_local=0.0)


def _split(name: str, n: int, seed: int) -> DecoderSplit:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, 16, generator=g)
    # targets are a fixed function of the template, so a decoder can learn them
    basis = torch.randn(16, 3 * 4 * 4, generator=torch.Generator().manual_seed(99)) * 2
    low = torch.sigmoid(torch.nn.functional.normalize(t, dim=1) @ basis).view(n, 3, 4, 4)
    y = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    masks = torch.zeros(n, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1
    return DecoderSplit(name, t, y, masks, [f"id{i % 5}" for i in range(n)], [f"{i}.png" for i in range(n)])


def _splits() -> dict[str, DecoderSplit]:
    return {"train": _split("train", 64, 0), "val": _split("val", 16, 1), "test": _split("test", 16, 2)}


def _fit(tmp: Path, epochs: int, resume: bool = False, **kw):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    dec = DeepFaceDecoder(DecoderConfig(template_dim=16, out_size=16, base_channels=8, max_channels=16))
    args = dict(perceptual=None, weights=W, lr=1e-2, batch_size=16, epochs=epochs, patience=50, seed=3)
    args.update(kw)
    res = fit(dec, _splits(), device=torch.device("cpu"), checkpoint_dir=tmp, resume=resume, progress=False, **args)
    return dec, res


def test_loss_falls_and_best_weights_are_kept(tmp_path: Path) -> None:
    _, res = _fit(tmp_path, 8)
    first, last = res.history[0].val["total"], min(h.val["total"] for h in res.history)
    assert last < 0.7 * first
    assert res.best_epoch == 1 + min(range(8), key=lambda i: res.history[i].val["total"])
    assert (tmp_path / "last.pt").is_file() and res.train_images_per_s > 0


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight, _ = _fit(tmp_path / "a", 4)
    _fit(tmp_path / "b", 2)
    resumed, res = _fit(tmp_path / "b", 4, resume=True)
    assert len(res.history) == 4
    for (k, v1), v2 in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k


def test_early_stopping_and_time_budget(tmp_path: Path) -> None:
    _, res = _fit(tmp_path / "a", 40, lr=0.0, patience=2)  # lr 0: never improves after epoch 1
    assert len(res.history) == 3 and res.stopped.startswith("early stopping")
    _, res = _fit(tmp_path / "b", 40, max_minutes=1e-6)
    assert len(res.history) == 1 and res.stopped.startswith("time budget")


def test_identity_disjoint_split(sample_faceset: FaceSet) -> None:
    splits = split_faceset(sample_faceset, 32, test_fraction=0.3, val_fraction=0.2, seed=0)
    sides = [set(s.identities) for s in splits.values()]
    assert sum(len(s) for s in splits.values()) == len(sample_faceset)
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    tr = splits["train"]
    assert tr.targets.shape[1:] == (3, 32, 32) and float(tr.targets.min()) >= 0 and float(tr.targets.max()) <= 1
    assert tr.masks.shape[1:] == (1, 32, 32) and 0.05 < float(tr.masks.mean()) < 0.6  # the inner face region


def test_config_presets_gates_and_specs() -> None:
    for over in PRESETS.values():
        TrainDecoderConfig().replace(**over)  # every preset names real settings (raises otherwise)
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainDecoderConfig().replace(nope=1)
    assert parse_model_spec("facexplain-fr-dlib128") == ("facexplain-fr-dlib128", "champion")
    assert parse_model_spec("m@3") == ("m", "3")
    ok = {"test_psnr": 15, "test_psnr_over_mean_face": 1, "test_ssim": 0.5, "test_identity_cosine": 0.95}
    gates = check_gates({**ok, "test_accepted": 0.9, "test_rank1": 0.59})
    assert not gates["test_rank1"] and all(v for k, v in gates.items() if k != "test_rank1")
    assert not check_gates({})["test_psnr"]  # missing figures fail, never pass


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import json
    import os

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank)}
    )
    from training.distributed import Dist, shutdown

    torch.set_num_threads(1)
    _, res = _fit(Path(out), 3)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"epochs": res.epochs_done, "history": len(res.history), "stopped": res.stopped})
    )
    shutdown(Dist(rank=rank, world=world, backend="gloo", owns_group=True))  # what the pipeline's end does


def test_distributed_data_parallel_on_cpu(tmp_path: Path) -> None:
    """Two gloo ranks (what torchrun starts): both run every epoch in step, rank 0 alone checkpoints."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == {"epochs": 3, "history": 3, "stopped": "epochs"}
    assert r1 == {"epochs": 3, "history": 0, "stopped": "epochs"}  # trained in step; rank 0 keeps the record
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["epoch"] == 2 and len(ck["history"]) == 3


def test_lr_decay_halves_after_each_epoch_without_improvement(tmp_path: Path) -> None:
    _, res = _fit(tmp_path, 6, lr=0.3, lr_decay=0.5)
    bad = sum(1 for h in res.history if not h.best)
    assert bad >= 1  # lr 0.3 overshoots: some epochs do not improve
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.3 * 0.5**bad)


def test_weight_average_is_what_is_validated_kept_and_resumed(tmp_path: Path) -> None:
    # The average lags the live weights: after training, the returned (best) weights are the average's.
    dec, res = _fit(tmp_path / "a", 3, ema=0.9)
    ck = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    assert ck["ema"]["steps"] == 3 * 4  # 64 faces / batch 16, every step averaged
    live = ck["decoder"]["fc.weight"]
    assert not torch.equal(live, ck["ema"]["state"]["fc.weight"])
    if res.best_epoch == 3:
        assert torch.equal(dec.state_dict()["fc.weight"], ck["ema"]["state"]["fc.weight"])
    # resuming restores the average too: 2 + 2 epochs == 4 straight
    straight, _ = _fit(tmp_path / "b", 4, ema=0.9)
    _fit(tmp_path / "c", 2, ema=0.9)
    resumed, _ = _fit(tmp_path / "c", 4, resume=True, ema=0.9)
    for (k, v1), v2 in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k


def test_weight_average_warms_up_then_follows_the_decay() -> None:
    from training.decoder.trainer import WeightAverage

    lin = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(lin.weight)
    avg = WeightAverage(lin, 0.99)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    avg.update(lin)  # warm-up decay min(0.99, 2/11): the average moves most of the way at once
    assert float(avg.state["weight"]) == pytest.approx(1 - 2 / 11)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(lin, 1.0)


def test_mirrored_faces_only_augment_training(sample_faceset: FaceSet, tmp_path: Path) -> None:
    from facexplain.data.faceset import mirror_faceset

    calls: list[int] = []

    dim = sample_faceset.templates.shape[1]

    def embed(chips: torch.Tensor) -> torch.Tensor:  # a stand-in FR model: a fixed function of the pixels
        calls.append(chips.shape[0])
        return torch.nn.functional.adaptive_avg_pool2d(chips, 8).flatten(1)[:, :dim]

    cache = tmp_path / "m.npz"
    mirrored = mirror_faceset(sample_faceset, embed, cache_path=cache, progress=False)
    assert torch.equal(mirrored.chips, torch.flip(sample_faceset.chips, dims=[-1]))
    size = sample_faceset.chips.shape[-1]
    assert torch.allclose(mirrored.landmarks[..., 0], size - 1 - sample_faceset.landmarks[..., 0])
    assert torch.allclose(mirrored.templates, embed(mirrored.chips.float()))  # re-embedded, not copied
    n_calls = len(calls)
    again = mirror_faceset(sample_faceset, embed, cache_path=cache, progress=False)
    assert len(calls) == n_calls and torch.equal(again.templates, mirrored.templates)  # read from the cache

    plain = split_faceset(sample_faceset, 32, test_fraction=0.3, val_fraction=0.2, seed=0)
    aug = split_faceset(sample_faceset, 32, test_fraction=0.3, val_fraction=0.2, seed=0, train_extra=[mirrored])
    assert len(aug["train"]) == 2 * len(plain["train"])
    assert all(p.endswith("#hflip") for p in aug["train"].paths[len(plain["train"]) :])
    for side in ("val", "test"):
        assert aug[side].paths == plain[side].paths
    # the region mask of a mirrored face is the mirrored mask (landmark set 17..67 maps onto itself)
    n = len(plain["train"])
    assert torch.allclose(aug["train"].masks[n:], torch.flip(plain["train"].masks, dims=[-1]), atol=0.15)


def test_region_blends_stay_within_their_group(sample_faceset: FaceSet, tmp_path: Path) -> None:
    from facexplain.data.faceset import blend_faceset
    from facexplain.data.splits import split_identities
    from facexplain.faces.blend import blend, region_mask

    dim = sample_faceset.templates.shape[1]

    def embed(chips: torch.Tensor) -> torch.Tensor:  # a stand-in FR model: a fixed function of the pixels
        return torch.nn.functional.adaptive_avg_pool2d(chips, 8).flatten(1)[:, :dim]

    side = split_identities(sample_faceset.identities, test_fraction=0.3, val_fraction=0.2, seed=0)
    groups = [side[i] for i in sample_faceset.identities]
    cache = tmp_path / "b.npz"
    blended = blend_faceset(sample_faceset, embed, groups=groups, seed=3, cache_path=cache, progress=False)
    assert blended.identities == sample_faceset.identities and len(blended) == len(sample_faceset)
    assert torch.equal(blended.landmarks, sample_faceset.landmarks)
    assert torch.allclose(blended.templates, embed(blended.chips.float()))  # re-embedded, not copied
    donors, regions = blended.meta["blend_donor"], blended.meta["blend_region"]
    names = blended.meta["blend_regions"]
    assert set(regions) <= set(range(len(names)))
    for i, j in enumerate(donors):
        assert groups[j] == groups[i], "a region comes from a face of the same split side"
        if j == i:  # only a face alone in its group stays as it was
            assert groups.count(groups[i]) == 1 and torch.equal(blended.chips[i], sample_faceset.chips[i])
            continue
        marks = sample_faceset.landmarks[[i, j]]
        m = region_mask(marks, names[regions[i]], sample_faceset.chips.shape[-1]).amax(0, keepdim=True)
        want = blend(sample_faceset.chips[i : i + 1], sample_faceset.chips[j : j + 1], m)
        assert (blended.chips[i : i + 1].float() - want).abs().max() <= 0.5  # uint8 rounding only
        assert (m < 1e-3).any() and (m > 0.99).any()  # a local change: part of the face untouched
    again = blend_faceset(sample_faceset, embed, groups=groups, seed=3, cache_path=cache, progress=False)
    assert torch.equal(again.chips, blended.chips)
    other = blend_faceset(sample_faceset, embed, groups=groups, seed=4, progress=False)
    assert not torch.equal(other.chips, blended.chips)  # the seed picks donors and regions
    assert other.paths != blended.paths
    with pytest.raises(ValueError, match="group labels"):
        blend_faceset(sample_faceset, embed, groups=groups[:-1], seed=0, progress=False)
    with pytest.raises(ValueError, match="region"):
        blend_faceset(sample_faceset, embed, groups=groups, seed=0, regions=("ears",), progress=False)

    plain = split_faceset(sample_faceset, 32, test_fraction=0.3, val_fraction=0.2, seed=0)
    aug = split_faceset(sample_faceset, 32, test_fraction=0.3, val_fraction=0.2, seed=0, train_extra=[blended])
    assert len(aug["train"]) == 2 * len(plain["train"])
    for name in ("val", "test"):
        assert aug[name].paths == plain[name].paths
    assert aug["train"].pairs is None
    # pairs: each training face's row with its own blend's row (the blends after the mirrored faces here)
    paired = split_faceset(
        sample_faceset, 32, test_fraction=0.3, val_fraction=0.2, seed=0, train_extra=[blended, blended], pair_with=[1]
    )
    tr, n = paired["train"], len(plain["train"])
    assert tr.pairs is not None and tr.pairs.shape == (n, 2)
    for f, b in tr.pairs.tolist():
        assert tr.paths[b] == tr.paths[f] + "#blend3" and b >= 2 * n
    assert paired["val"].pairs is None and paired["test"].pairs is None
    with pytest.raises(ValueError, match="pair_with"):
        split_faceset(sample_faceset, 32, test_fraction=0.3, val_fraction=0.2, seed=0, pair_with=[0])


def test_pair_difference_term_trains_the_decoded_change(tmp_path: Path) -> None:
    """(face, blend) pairs whose real change is confined to a corner: without the term the decoder renders
    the template change all over the image, with it mostly in the corner; the term is logged; a weight
    without pairs is refused."""
    base = _splits()
    tr = base["train"]
    n = len(tr)
    corner = torch.zeros(1, 3, 16, 16)
    corner[..., :6, :6] = 0.4
    g = torch.Generator().manual_seed(5)
    t_blend = tr.templates + 0.5 * torch.randn(tr.templates.shape, generator=g)
    train = DecoderSplit(
        "train",
        torch.cat([tr.templates, t_blend]),
        torch.cat([tr.targets, (tr.targets + corner).clamp(0, 1)]),
        torch.cat([tr.masks, tr.masks]),
        tr.identities * 2,
        tr.paths + [p + "#b" for p in tr.paths],
        pairs=torch.stack([torch.arange(n), torch.arange(n) + n], 1),
    )
    splits = {**base, "train": train}

    def locality(weight: float) -> tuple[float, list[dict[str, float]]]:
        """Mean |decoded change| inside the corner / outside it (the SSI locality ratio, on this toy)."""
        torch.manual_seed(0)
        dec = DeepFaceDecoder(DecoderConfig(template_dim=16, out_size=16, base_channels=8, max_channels=16))
        res = fit(
            dec, splits, perceptual=None, weights=W, lr=1e-2, batch_size=16, epochs=12, patience=50, seed=3,
            device=torch.device("cpu"), checkpoint_dir=tmp_path / str(weight), progress=False, pair_weight=weight,
        )  # fmt: skip
        with torch.no_grad():
            change = (dec(t_blend) - dec(tr.templates)).abs().mean(1, keepdim=True)
        inside = torch.zeros(1, 1, 16, 16)
        inside[..., :6, :6] = 1
        ratio = (change * inside).sum() / inside.sum() / ((change * (1 - inside)).sum() / (1 - inside).sum())
        return float(ratio), [h.train for h in res.history]

    without, logs0 = locality(0.0)
    with_term, logs = locality(20.0)
    assert "pair_difference" in logs[-1] and "pair_difference" not in logs0[-1]
    assert without < 1.3 and with_term > 2.5, (without, with_term)  # measured 0.97 and 3.74
    with pytest.raises(ValueError, match="pairs"):
        fit(
            DeepFaceDecoder(DecoderConfig(template_dim=16, out_size=16, base_channels=8, max_channels=16)),
            base, perceptual=None, weights=W, lr=1e-2, batch_size=16, epochs=1, patience=5, seed=0,
            device=torch.device("cpu"), checkpoint_dir=tmp_path / "x", progress=False, pair_weight=1.0,
        )  # fmt: skip


def test_region_pairs_need_region_blends(tmp_path: Path) -> None:
    from training.decoder.run import train_decoder

    cfg = TrainDecoderConfig(region_pairs=1.0, region_blends=False)
    with pytest.raises(ValueError, match="region_blends"):
        train_decoder(cfg, registry_uri="http://127.0.0.1:9", out_dir=tmp_path)


def test_perceptual_network_for_another_fr_model() -> None:
    from facexplain.models.recognition import FaceRecognitionNet
    from facexplain.models.sadfad import SADFADConfig, SADFADEmbedder, SADFADNet

    sadfad = SADFADEmbedder(SADFADNet(SADFADConfig(input_size=48, base_width=4, n_filters=16)))
    base = TrainDecoderConfig()
    assert perceptual_network(base.replace(perceptual="none"), sadfad, "x v1") is None
    # white box means the inverted model's own layer: a SAD/FAD net has none of that name
    with pytest.raises(ValueError, match="x v1 is not the dlib ResNet: use --perceptual dlib_resnet"):
        perceptual_network(base, sadfad, "x v1")
    # dlib_resnet: the default model's layer whatever is inverted, equal to the white box of the default model
    images = torch.rand(2, 3, 64, 64)
    shared = perceptual_network(base.replace(perceptual="dlib_resnet"), sadfad, "x v1")
    own = perceptual_network(base, FaceRecognitionNet.from_faceapi(), "dlib v1")
    assert shared is not None and own is not None
    with torch.no_grad():
        torch.testing.assert_close(shared(images), own(images))


def _ddp_resume_worker(rank: int, world: int, port: int, dirs: list[str]) -> None:
    import os

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank)}
    )
    torch.set_num_threads(1)
    _fit(Path(dirs[rank]), 3, resume=True)


def test_distributed_resume_refuses_ranks_that_do_not_share_the_checkpoint(tmp_path: Path) -> None:
    """Rank 1 on a node that cannot see rank 0's last.pt would start over: it stops with a clear reason
    instead of waiting forever in another epoch's all-reduce."""
    import socket

    import torch.multiprocessing as mp

    _fit(tmp_path / "shared", 1)  # one process: rank 0's folder holds epoch 1's checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dirs = [str(tmp_path / "shared"), str(tmp_path / "elsewhere")]
    with pytest.raises(Exception, match="must be on storage every node sees"):
        mp.spawn(_ddp_resume_worker, args=(2, port, dirs), nprocs=2, join=True)


def _hse_self() -> Any:
    from facexplain.models.hse_faceres import HseFaceRes

    return HseFaceRes.from_human_models()


def _faceplugin_self() -> Any:
    from facexplain.artifacts.embedder import third_fr_pipeline

    return third_fr_pipeline().recognition_net


# the black-box perceptual networks: name -> (its features module, map at the decoder's output, the model itself)
BLACK_BOXES = {
    "hse_faceres": ("HseFaceResFeatures", (256, 28, 28), _hse_self),  # the 28x28 stage at 224 px
    "faceplugin": ("FacepluginFeatures", (64, 28, 28), _faceplugin_self),  # the 28x28 stage at 112 px
}


@pytest.mark.parametrize("name", sorted(BLACK_BOXES))
def test_black_box_perceptual_trains_the_decoder(tmp_path: Path, name: str) -> None:
    """The black-box perceptual network: an inner map of an independent FR model, frozen; its terms move the
    decoder."""
    from facexplain.losses.dfd import dfd_loss
    from facexplain.models.recognition import FaceRecognitionNet

    features_class, shape, itself = BLACK_BOXES[name]
    perceptual = perceptual_network(TrainDecoderConfig(perceptual=name), FaceRecognitionNet(), "dlib v1")
    assert perceptual is not None and type(perceptual.extractor).__name__ == features_class
    assert not any(p.requires_grad for p in perceptual.parameters())

    decoder = DeepFaceDecoder(DecoderConfig(template_dim=16, out_size=16, base_channels=8, max_channels=16))
    split = _split("train", 2, 0)
    only_perceptual = DFDLossWeights(pixel_global=0.0, pixel_local=0.0, gradient_global=0.0, gradient_local=0.0)
    recon = decoder(split.templates)
    features = perceptual(recon)
    assert features.shape == (2, *shape)  # whatever the decoder's size
    loss, parts = dfd_loss(recon, split.targets, split.masks, perceptual, only_perceptual)
    assert set(parts) == {"perceptual_global", "perceptual_local", "total"} and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in decoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    # and the trainer runs a step with it (one epoch of two faces)
    result = fit(
        DeepFaceDecoder(DecoderConfig(template_dim=16, out_size=16, base_channels=8, max_channels=16)),
        {"train": split, "val": _split("val", 2, 1), "test": _split("test", 2, 2)},
        perceptual=perceptual, weights=DFDLossWeights(), lr=1e-3, batch_size=2, epochs=1, patience=1, seed=0,
        device=torch.device("cpu"), checkpoint_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert result.epochs_done == 1 and result.history[0].train["perceptual_local"] > 0
    # black box means another model: not the perceptual network of a decoder of that model itself
    with pytest.raises(ValueError, match="black box only for another FR model"):
        perceptual_network(TrainDecoderConfig(perceptual=name), itself(), "itself v1")
    with pytest.raises(ValueError, match="names a dlib ResNet layer"):
        perceptual_network(
            TrainDecoderConfig(perceptual=name, perceptual_layer="conv128_1"), FaceRecognitionNet(), "dlib v1"
        )


def test_unknown_perceptual_network_is_rejected(tmp_path: Path) -> None:
    import argparse

    from facexplain.models.recognition import FaceRecognitionNet
    from training.decoder.cli import add_arguments
    from training.decoder.run import train_decoder

    cfg = TrainDecoderConfig().replace(perceptual="vgg16")
    with pytest.raises(ValueError, match="unknown perceptual network 'vgg16': one of white_box, dlib_resnet, hse"):
        perceptual_network(cfg, FaceRecognitionNet(), "dlib v1")
    with pytest.raises(ValueError, match="unknown perceptual network 'vgg16'"):  # before any registry or data
        train_decoder(cfg, registry_uri="http://127.0.0.1:9", out_dir=tmp_path)
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--perceptual", "hse_faceres"]).perceptual == "hse_faceres"
    with pytest.raises(SystemExit):
        p.parse_args(["--perceptual", "vgg16"])
