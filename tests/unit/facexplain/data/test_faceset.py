"""Face sets: data specs, manifest hashing, the cache, and what a built set holds for real faces."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from facexplain.data.faceset import FaceSet, build_faceset, manifest_hash, read_labels, records_from_spec
from facexplain.pipeline import DEFAULT_FR_KEY

REPO = Path(__file__).resolve().parents[4]


def test_spec_forms(celeba_dir: Path, tmp_path: Path) -> None:
    root, recs, names = records_from_spec(str(celeba_dir))  # images/ + labels.csv detected
    assert root == celeba_dir / "images" and len(recs) == 5319 and "Smiling" in names
    assert len({r.identity for r in recs}) == 251
    root, recs, names = records_from_spec(str(REPO / "data" / "sample"))  # labels.csv beside the folders
    assert root == REPO / "data" / "sample" and len(recs) == 36 and "Eyeglasses" in names
    assert "orl/s1" in {r.identity for r in recs}
    assert all("/" in r.identity for r in recs)  # identity = folder relative to the root
    orl = next(r for r in recs if r.identity == "orl/s1")
    assert all(v != v for v in orl.labels.values())  # empty cells: unknown (NaN), not 0
    glasses = [r.labels["Eyeglasses"] for r in recs if r.identity.startswith("celeba/")]
    assert sum(glasses) >= 5 and glasses.count(0.0) >= 5  # both values, enough for a centroid each
    root, recs, names = records_from_spec(str(REPO / "data" / "sample" / "orl"))
    assert names == [] and len(recs) == 6
    with pytest.raises(FileNotFoundError, match="does not exist"):
        records_from_spec(str(tmp_path / "nope"))
    (tmp_path / "labels.csv").write_text("name,identity\nx.jpg,1\n")
    with pytest.raises(ValueError, match="'file' column"):
        read_labels(tmp_path / "labels.csv")
    with pytest.raises(ValueError, match="expected DIR"):
        records_from_spec("a,b,c")


def test_manifest_hash_tracks_content(tmp_path: Path) -> None:
    src = REPO / "data" / "sample" / "orl"
    shutil.copytree(src, tmp_path / "d")
    root, recs, _ = records_from_spec(str(tmp_path / "d"))
    h1 = manifest_hash(root, recs)
    assert manifest_hash(root, list(reversed(recs))) == h1  # order-independent
    victim = recs[0].path
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert manifest_hash(root, recs) != h1


def test_sample_faceset_contents_and_cache(  # type: ignore[no-untyped-def]
    sample_faceset: FaceSet, default_pipeline, faceset_cache: Path, tmp_path: Path
) -> None:
    fs = sample_faceset
    n = len(fs)
    assert n + len(fs.failed) == 36 and n >= 34
    assert fs.templates.shape == (n, 128) and fs.templates.dtype == torch.float32
    assert 1.2 < float(fs.templates.norm(dim=1).mean()) < 1.8  # raw templates, norm ~1.49
    assert fs.chips.shape == (n, 3, 150, 150) and fs.chips.dtype == torch.uint8
    # landmarks in chip coordinates: dlib's template puts the eyes at fixed places in the chip
    eyes = fs.landmarks[:, 36:48].mean(1)
    assert bool(((eyes > 30) & (eyes < 120)).all())
    # round trip through the file format
    fs.save(tmp_path / "x.npz")
    back = FaceSet.load(tmp_path / "x.npz")
    assert back.paths == fs.paths and torch.equal(back.chips, fs.chips) and back.meta == fs.meta
    # the cache is hit by key (no pipeline run at all: a pipeline that would fail proves it)
    root, recs, _ = records_from_spec(str(REPO / "data" / "sample"))
    hits: list[Path] = []

    class Exploding:
        info = default_pipeline.info

        def analyze(self, images):  # type: ignore[no-untyped-def]
            raise AssertionError("cache missed")

    again = build_faceset(
        root, recs, Exploding(), fr_key=DEFAULT_FR_KEY, cache_dir=faceset_cache, progress=False, on_cached=hits.append
    )
    assert hits and len(again) == n
    with pytest.raises(AssertionError, match="cache missed"):  # another FR key is another set
        build_faceset(root, recs, Exploding(), fr_key="other", cache_dir=faceset_cache, progress=False)


def _sadfad_pipeline(default_pipeline, **info_changes):  # type: ignore[no-untyped-def]
    """The default front end with a small random SAD/FAD net as the recognition stage: another FR model."""
    from dataclasses import replace

    from facexplain.models.sadfad import SADFADConfig, SADFADEmbedder, SADFADNet

    torch.manual_seed(0)
    net = SADFADEmbedder(SADFADNet(SADFADConfig(input_size=48, base_width=4, n_filters=16))).eval()
    info = replace(default_pipeline.info, name="sadfad-test", dim=16, **info_changes)
    return default_pipeline.with_recognition(net, info)


def test_reembedding_another_model_reuses_the_front_end(  # type: ignore[no-untyped-def]
    sample_faceset: FaceSet, default_pipeline, faceset_cache: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from facexplain.data.faceset import (
        blend_faceset,
        find_front_end,
        mirror_faceset,
        reembed_faceset,
        relabel_faceset,
    )

    # augmented sets of the same images beside it (newer) are never a front end: their chips are not the faces'
    def stand_in(chips: torch.Tensor) -> torch.Tensor:
        return chips.mean(dim=(2, 3))

    mirror_faceset(sample_faceset, stand_in, cache_path=faceset_cache / "aug.hflip.npz", progress=False)
    groups = ["all"] * len(sample_faceset)
    blend_faceset(sample_faceset, stand_in, groups=groups, seed=0, cache_path=faceset_cache / "aug.blend.npz")
    # --chips-from auto finds the sample set in the cache by its images and chip geometry
    found = find_front_end(faceset_cache, sample_faceset.meta["manifest_sha256"], 150, 0.25)
    assert found is not None and FaceSet.load(found).paths == sample_faceset.paths
    assert find_front_end(faceset_cache, sample_faceset.meta["manifest_sha256"], 112, 0.25) is None
    assert find_front_end(faceset_cache, "0" * 64, 150, 0.25) is None

    root, recs, _ = records_from_spec(str(REPO / "data" / "sample"))
    other = _sadfad_pipeline(default_pipeline)
    made = build_faceset(
        root, recs, other, fr_key="sadfad-test", cache_dir=tmp_path, progress=False, front_end=sample_faceset
    )
    assert made.paths == sample_faceset.paths and torch.equal(made.chips, sample_faceset.chips)
    assert made.failed == sample_faceset.failed and made.templates.shape == (len(sample_faceset), 16)
    with torch.no_grad():  # the other model's templates of the very chips
        torch.testing.assert_close(made.templates[:4], other.embed_chips(sample_faceset.chips[:4].float()))
    assert made.meta["fr_key"] == "sadfad-test" and made.meta["front_end_from"]["fr_key"] == DEFAULT_FR_KEY
    assert (tmp_path / next(p.name for p in tmp_path.glob("*.npz"))).is_file()  # cached under its own key
    # "auto" finds the sample set in its cache; a path is read only on a cache miss
    auto = build_faceset(
        root, recs, other, fr_key="sadfad-auto", cache_dir=faceset_cache, progress=False, front_end="auto"
    )
    assert torch.equal(auto.templates, made.templates)
    again = build_faceset(
        root, recs, other, fr_key="sadfad-test", cache_dir=tmp_path, progress=False, front_end=tmp_path / "missing.npz"
    )
    assert torch.equal(again.templates, made.templates)

    manifest = sample_faceset.meta["manifest_sha256"]
    # labels come from the data, not the front end: a set built without labels.csv still gives the chips
    labelled = [replace(r, labels={"Smiling": float(i % 2)}) for i, r in enumerate(recs)]
    relabelled = build_faceset(
        root, labelled, other, fr_key="x", label_names=["Smiling"], progress=False, front_end=sample_faceset
    )
    want = {r.path.relative_to(root).as_posix(): r.labels["Smiling"] for r in labelled}
    assert relabelled.label_names == ["Smiling"] and relabelled.labels is not None
    assert relabelled.labels[:, 0].tolist() == [want[p] for p in relabelled.paths]
    assert torch.equal(relabelled.templates, made.templates)
    with pytest.raises(ValueError, match="not in the data"):
        relabel_faceset(sample_faceset, root, labelled[1:], ["Smiling"])
    with pytest.raises(ValueError, match="other images"):
        reembed_faceset(sample_faceset, other, root=root, manifest="0" * 64, fr_key="x", progress=False)
    with pytest.raises(ValueError, match="size/padding"):
        reembed_faceset(
            sample_faceset,
            _sadfad_pipeline(default_pipeline, chip_padding=0.3),
            root=root,
            manifest=manifest,
            fr_key="x",
            progress=False,
        )
    # chips made by another front end (here: shifted by 3 pixels) are caught by the re-made sample
    moved = sample_faceset.subset(range(len(sample_faceset)))
    moved.chips = torch.roll(moved.chips, shifts=3, dims=-1)
    with pytest.raises(ValueError, match="does not re-make"):
        reembed_faceset(moved, other, root=root, manifest=manifest, fr_key="x", progress=False)
