"""The SAD/FAD network: shapes (96 -> 24x24 maps -> N_f), Large Magnitude Filtering, gradients, the
embedder adapter and the chip -> input geometry."""

from __future__ import annotations

import math

import pytest
import torch

from facexplain.losses.sadfad import filter_orthogonality_loss, response_diversity_loss
from facexplain.models.sadfad import (
    SADFADConfig,
    SADFADEmbedder,
    SADFADNet,
    chip_landmarks_to_input,
    chip_to_input,
    large_magnitude_filter,
    lmf_keep_count,
)

TINY = SADFADConfig(base_width=2, n_filters=12, n_classes=4)


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny convolutions run several times faster on one thread than on two busy ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_paper_config_geometry() -> None:
    cfg = SADFADConfig()
    assert (cfg.input_size, cfg.map_size, cfg.n_filters, cfg.resize) == (96, 24, 320, 110)
    assert cfg.lmf_keep == 24  # the authors keep the 24 largest of 576 elements (d = 23/24)
    assert cfg.conv53_width == 320 and cfg.part_width == 192
    assert SADFADConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        SADFADConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="lmf_drop"):
        SADFADConfig(lmf_drop=1.0)


def test_output_shapes_96_to_24x24_maps_to_nf() -> None:
    torch.manual_seed(0)
    net = SADFADNet(TINY).eval()
    out = net(torch.rand(2, 3, 96, 96) * 255)
    assert out.features.shape == (2, 12)
    assert out.maps.shape == out.raw_maps.shape == (2, 12, 24, 24)
    assert net.filter_bank.shape == (12, 3 * TINY.part_width, 3, 3)
    assert net.classify(out.features).shape == (2, 4)
    # the representation is the average-pooled LMF map, and LMF kept exactly lmf_keep per map
    assert torch.allclose(out.features, out.maps.mean(dim=(-2, -1)))
    assert ((out.maps != 0).sum(dim=(-2, -1)) == TINY.lmf_keep).all()
    with pytest.raises(ValueError, match="expected"):
        net(torch.rand(2, 3, 64, 64))


@pytest.mark.parametrize("drop", [0.0, 0.5, 0.9, 23 / 24])
def test_lmf_zeroes_exactly_the_d_smallest_per_channel(drop: float) -> None:
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(3, 4, 24, 24, generator=g)  # distinct magnitudes almost surely
    out = large_magnitude_filter(maps, drop)
    n = 24 * 24
    keep = n - math.floor(drop * n + 1e-9)
    assert keep == lmf_keep_count(n, drop)
    flat, fin = maps.reshape(3, 4, n), out.reshape(3, 4, n)
    kept = fin != 0
    assert (kept.sum(-1) == keep).all()
    assert torch.equal(fin[kept], flat[kept])  # kept elements keep value and sign
    # every kept magnitude >= every dropped magnitude, per map
    mags = flat.abs()
    low_kept = torch.where(kept, mags, torch.full_like(mags, math.inf)).min(-1).values
    high_dropped = torch.where(~kept, mags, torch.full_like(mags, -math.inf)).max(-1).values
    assert (low_kept >= high_dropped).all()


def test_lmf_count_is_exact_with_ties() -> None:
    maps = torch.ones(1, 2, 4, 4)  # all equal magnitudes: still exactly keep elements
    out = large_magnitude_filter(maps, 0.75)
    assert ((out != 0).sum(dim=(-2, -1)) == 4).all()


def test_gradients_flow_to_every_part() -> None:
    torch.manual_seed(0)
    net = SADFADNet(TINY).train()
    out = net(torch.rand(2, 3, 96, 96) * 255)
    loss = torch.nn.functional.cross_entropy(net.classify(out.features), torch.tensor([0, 3]))
    loss = loss + filter_orthogonality_loss(net.filter_bank, "mean") + response_diversity_loss(out.maps, "mean")
    loss.backward()
    for name in ("trunk.conv11.0.weight", "trunk.conv53.0.weight", "branch4.0.weight", "branch5.0.weight",
                 "filters.weight", "head.1.weight"):  # fmt: skip
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_embedder_adapter_takes_pipeline_chips() -> None:
    torch.manual_seed(0)
    net = SADFADNet(TINY).eval()
    emb = SADFADEmbedder.from_state(TINY.to_dict(), net.embedder_state_dict()).eval()
    assert not any(k.startswith("head.") for k in net.embedder_state_dict())
    chips = torch.rand(3, 3, 150, 150) * 255
    with torch.no_grad():
        t = emb(chips)
        ref = net(chip_to_input(chips, TINY)).features
    assert t.shape == (3, 12) and torch.allclose(t, ref, atol=1e-6)
    assert emb.input_divisor == 127.5 and emb.mean_rgb.flatten().tolist() == [127.5] * 3
    # what a bundle loader would do: rebuild from the stored config, load the saved state strictly
    direct = SADFADEmbedder(net)  # the identity head is left behind
    assert direct.net.head is None and direct.bundle_config()["n_classes"] == 0
    rebuilt = SADFADEmbedder(SADFADNet(SADFADConfig.from_dict(direct.bundle_config())))
    rebuilt.load_state_dict(direct.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(chips), t, atol=1e-6)


def test_chip_geometry_moves_landmarks_with_the_pixels() -> None:
    """A bright blob at a chip landmark lands at the mapped landmark in the network input (±1 px)."""
    cfg = SADFADConfig(base_width=2, n_filters=4)
    ys, xs = torch.meshgrid(torch.arange(150.0), torch.arange(150.0), indexing="ij")
    pts = torch.tensor([[52.0, 61.0], [101.0, 88.0]])
    chips = torch.stack([torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 8.0).expand(3, -1, -1) * 255 for x, y in pts])
    offsets = torch.tensor([[0, 14], [9, 3]])
    for off in (None, offsets):
        inp = chip_to_input(chips, cfg, off)
        assert inp.shape == (2, 3, 96, 96)
        mapped = chip_landmarks_to_input(pts[:, None], 150, cfg, off)[:, 0]
        for i in range(2):
            r, c = divmod(int(inp[i, 0].argmax()), 96)
            assert abs(c - float(mapped[i, 0])) <= 1.0 and abs(r - float(mapped[i, 1])) <= 1.0
