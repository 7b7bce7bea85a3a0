"""Would decoding large JPEGs at reduced size (Pillow ``draft``: DCT scaling by 1/2, 1/4) change templates?

Issue 23 suggested "downscale on decode where the model needs less". This measures what it would cost: real
CelebA faces made into two shapes of large image, a face filling the frame (upscaled 8x, a close portrait)
and a face at its own size in a large photo (pasted on a 1600x1600 grey canvas), each encoded as a JPEG
(q95); the template from a full decode is compared with the one from a draft decode. The answer decides
services/kit/images.py (no draft: see its docstring). Writes bench/results/draft-decode-<device>.json.

    nice -n 15 .venv/bin/python bench/bench_draft_decode.py [--faces 8]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, write
from facexplain.pipeline import FacePipeline
from tests.conftest import shared_data_dir

SCALES = (2, 4)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _template(pipe: FacePipeline, data: bytes, scale: int) -> tuple[np.ndarray | None, list[int]]:
    img = Image.open(io.BytesIO(data))
    if scale > 1:
        img.draft("RGB", (img.width // scale, img.height // scale))
    rgb = np.asarray(img.convert("RGB"))
    (res,) = pipe.analyze([torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()])
    return (None if res is None else res.template.numpy()), [rgb.shape[1], rgb.shape[0]]


def _shapes(face: Image.Image) -> dict[str, Image.Image]:
    canvas = Image.new("RGB", (1600, 1600), (128, 128, 128))
    canvas.paste(face, ((1600 - face.width) // 2, (1600 - face.height) // 2))
    return {"face fills an 8x upscaled frame": face.resize((face.width * 8, face.height * 8), Image.Resampling.BICUBIC),
            "face at its own size on a 1600x1600 canvas": canvas}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", type=int, default=8, help="CelebA faces to measure")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = FacePipeline.default("cpu")
    paths = sorted((shared_data_dir() / "celeba_subset" / "images").glob("*.jpg"))[: args.faces]
    rows: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for path in paths:
        for shape, big in _shapes(Image.open(path).convert("RGB")).items():
            data = _jpeg(big)
            full, size = _template(pipe, data, 1)
            for scale in SCALES:
                reduced, rsize = _template(pipe, data, scale)
                row: dict[str, Any] = {"face": path.name, "size": size, "decoded": rsize}
                if full is not None and reduced is not None:
                    row["cosine"] = float(full @ reduced / np.linalg.norm(full) / np.linalg.norm(reduced))
                    row["l2"] = float(np.linalg.norm(full - reduced))
                else:
                    row["lost"] = "full" if full is None else "draft"
                rows.setdefault(shape, {}).setdefault(scale, []).append(row)
    summary: dict[str, dict[str, Any]] = {}
    for shape, by_scale in rows.items():
        for scale, items in by_scale.items():
            ok = [r for r in items if "l2" in r]
            summary.setdefault(shape, {})[f"1/{scale}"] = {
                "size": items[0]["size"],
                "decoded": items[0]["decoded"],
                "faces": len(ok),
                "lost": len(items) - len(ok),
                "l2_max": round(max(r["l2"] for r in ok), 3) if ok else None,
                "l2_mean": round(float(np.mean([r["l2"] for r in ok])), 3) if ok else None,
                "cosine_min": round(min(r["cosine"] for r in ok), 4) if ok else None,
            }
    path = write("draft-decode-cpu", {"bench": "draft_decode", "machine": machine(), "summary": summary,
                                      "rows": rows, "reference": {"dlib_same_person_l2": 0.6}})  # fmt: skip
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
