"""Binary accessories and appearance (eyeglasses, hat, smiling, ...) from linear probes on frozen face-api features.

Attribute recovery reads the same attributes on an original chip and on the face decoded from its
template, so the reader must be independent of the FR model: a probe on templates would share whatever
the FR model encodes. Here every feature comes from face-api networks that are *not* the FR model
(:class:`~facexplain.models.feature_extractor.FaceFeatureExtractor`, the backbone of the expression net
and, with its own weights, of the 68-point landmark net), frozen; only one logistic-regression weight
vector and bias per CelebA label is learnt. A linear read-out of fixed features cannot learn texture
shortcuts of its own, trains in seconds on a CPU, and saves as a few arrays (no pickle).

Features are *blocks*, ``"<net>:<crop>"``, concatenated in order (each 256-d, ``age_gender`` 512-d):

* nets: ``expression`` (``face_expression_model``'s backbone), ``landmarks`` (``face_landmark_68_model``'s
  backbone), ``age_gender`` (the TinyXception of ``age_gender_model``, optional);
* crops: ``face`` (face-api's own crop, the 68-point box grown by 20 %) and ``eyes`` (a square around
  brows, eyes and nose bridge). The eye band matters: on the whole-face crop the pooled 256 features
  keep little of where an edge is, and eyeglasses read at 0.82 balanced accuracy on held-out CelebA
  identities; adding the eye band lifts that to 0.91 (measured over five identity splits of the
  label-stratified test sample). The landmark net's backbone on the face crop (same architecture, other
  weights) adds robustness: over seven splits the worst held-out eyeglasses figure rose from 0.81 to 0.87.

Decoded faces are 64-px and smooth, so probes are trained on clean chips *and* on copies degraded the
same way (:func:`degrade_faces`: downscaled to 64 px, Gaussian-blurred with a random sigma); a probe
fit on sharp chips alone keys on detail a decoder never renders. Classes are weighted to balance, and
the L2 strength is chosen per label on identities held out of the training identities.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facexplain.attributes.catalog import AttributeSpec, FaceBatch, UnknownAttributeError
from facexplain.attributes.crops import crop_faces, landmark_boxes, scale_points, to_255
from facexplain.attributes.probe import _blur, binary_metrics
from facexplain.data.splits import split_identities

PROBES_FORMAT = 1
PROBES_ARRAYS = "probes.npz"
PROBES_JSON = "probes.json"
PROBES_ARCH = "faceapi_linear_probes"

# CelebA label -> what a probability of 1 means. The default set: what issue 6 asks for.
LABEL_DESCRIPTIONS: dict[str, str] = {
    "Eyeglasses": "wears eyeglasses or sunglasses",
    "Wearing_Hat": "wears a hat or cap",
    "Smiling": "smiles",
    "Mouth_Slightly_Open": "mouth slightly open",
    "Mustache": "has a moustache",
    "No_Beard": "has no beard",
    "Bangs": "has bangs (a fringe)",
    "Wearing_Lipstick": "wears lipstick",
    "Heavy_Makeup": "wears heavy make-up",
}
DEFAULT_LABELS: tuple[str, ...] = tuple(LABEL_DESCRIPTIONS)

NETS = ("expression", "landmarks", "age_gender")
CROPS = ("face", "eyes")
DEFAULT_BLOCKS: tuple[str, ...] = ("expression:face", "expression:eyes", "landmarks:face")
_NET_DIM = {"expression": 256, "landmarks": 256, "age_gender": 512}
# face-api weight files each net is read from (what a bundle copies).
FACEAPI_MANIFESTS = {
    "expression": "face_expression_model",
    "landmarks": "face_landmark_68_model",
    "age_gender": "age_gender_model",
}

# Eye-band crop: the box of landmarks 17-47 (brows, nose bridge, eyes) made square around its centre,
# EYE_BOX_SCALE times its width. Eyeglass frames sit there; the rest of the face only dilutes them.
EYE_BAND_POINTS = slice(17, 48)
EYE_BOX_SCALE = 1.3

# Degradation that makes a 150-px chip look like a decoded face: the decoders render 64 px and are
# smooth (blur of about 1 px at 64 px on CelebA); sigma is drawn from multiples of 0.25 up to the max.
DEGRADE_SIZE = 64
DEGRADE_SIGMA_MAX = 1.5
EVAL_SIGMA = 1.0  # the fixed blur of the "degraded" test figures

DEFAULT_C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03)  # inverse L2 strengths tried per label
MIN_CLASS_COUNT = 5  # positives and negatives a label needs among the training images


def _describe(label: str) -> str:
    return LABEL_DESCRIPTIONS.get(label, label.replace("_", " ").lower())


def attribute_name(label: str) -> str:
    """CelebA label (``Wearing_Hat``) -> catalogue attribute name (``wearing_hat``)."""
    return label.lower()


def parse_blocks(blocks: Sequence[str]) -> tuple[str, ...]:
    """Check ``"<net>:<crop>"`` feature blocks; the message lists what exists."""
    out = tuple(blocks)
    if not out:
        raise ValueError("at least one feature block is needed")
    for b in out:
        net, _, crop = b.partition(":")
        if net not in NETS or crop not in CROPS:
            raise ValueError(f"unknown feature block {b!r}: use <net>:<crop> with net in {NETS}, crop in {CROPS}")
    if len(set(out)) != len(out):
        raise ValueError(f"feature blocks repeat: {out}")
    return out


def eye_boxes(landmarks: torch.Tensor) -> torch.Tensor:
    """(N, 68, 2) points -> (N, 4) square boxes around brows, eyes and nose bridge (see :data:`EYE_BOX_SCALE`)."""
    pts = landmarks[:, EYE_BAND_POINTS]
    lo = pts.min(dim=1).values
    hi = pts.max(dim=1).values
    centre = (lo + hi) / 2
    half = (hi[:, 0] - lo[:, 0]) * (EYE_BOX_SCALE / 2)
    return torch.stack([centre[:, 0] - half, centre[:, 1] - half, centre[:, 0] + half, centre[:, 1] + half], dim=1)


def degrade_faces(
    images: torch.Tensor, landmarks: torch.Tensor, sigma: float | torch.Tensor, size: int = DEGRADE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chips -> what a decoded face looks like: (N, 3, size, size) in [0, 1] and the landmarks in that frame.

    Downscaled (antialiased) to ``size`` and Gaussian-blurred with ``sigma`` pixels at ``size`` (one value,
    or one per image; 0 = no blur).
    """
    x = to_255(images) / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0]).clone()
    x = _blur(x.contiguous(), s).clamp(0.0, 1.0)
    return x, scale_points(landmarks.float(), int(images.shape[-1]), size)


def random_sigmas(n: int, seed: int, sigma_max: float = DEGRADE_SIGMA_MAX) -> torch.Tensor:
    """Per-image blur sigmas for training copies: multiples of 0.25 in [0, sigma_max], seeded."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=gen) * sigma_max * 4).round() / 4


# -- features ------------------------------------------------------------------------------------------


class FeatureExtractor:
    """Frozen face-api backbones -> one (N, D) float32 feature row per face, blocks concatenated in order.

    Device-agnostic: the nets live on ``device`` and each batch goes there; results come back to the CPU.
    ``model_dir`` is a folder of face-api weight files (a bundle's ``weights/``); default: the installed set.
    """

    def __init__(
        self,
        blocks: Sequence[str] = DEFAULT_BLOCKS,
        device: str | torch.device = "cpu",
        model_dir: Path | None = None,
    ) -> None:
        self.blocks = parse_blocks(blocks)
        self.device = torch.device(device)
        self.nets: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for net in dict.fromkeys(b.split(":")[0] for b in self.blocks):
            self.nets[net] = _load_net(net, model_dir, self.device)

    @property
    def dim(self) -> int:
        return sum(_NET_DIM[b.split(":")[0]] for b in self.blocks)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, landmarks: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """(N, 3, S, S) faces ([0, 1] or [0, 255]) and their (N, 68, 2) landmarks in pixels -> (N, D) float32."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"expected (N, 3, S, S) images, got {tuple(images.shape)}")
        if landmarks.shape != (images.shape[0], 68, 2):
            raise ValueError(f"expected ({images.shape[0]}, 68, 2) landmarks, got {tuple(landmarks.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rows = []
        for s in range(0, images.shape[0], batch_size):
            x = to_255(images[s : s + batch_size]).to(self.device)
            lm = landmarks[s : s + batch_size].to("cpu", torch.float32)
            crops: dict[str, torch.Tensor] = {}
            parts = []
            for block in self.blocks:
                net, crop = block.split(":")
                if crop not in crops:
                    boxes = landmark_boxes(lm) if crop == "face" else eye_boxes(lm)
                    crops[crop] = crop_faces(x, boxes.to(x.device))
                parts.append(self.nets[net](crops[crop]).float())
            rows.append(torch.cat(parts, dim=1).cpu())
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(rows).numpy()


def _load_net(net: str, model_dir: Path | None, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The frozen pooled-feature function of one face-api net (never a head's output)."""
    module: torch.nn.Module
    if net == "expression":
        from facexplain.attributes.expression import FaceExpressionNet

        module = FaceExpressionNet.from_faceapi(model_dir).features
    elif net == "landmarks":
        from facexplain.models.landmarks import FaceLandmark68Net

        module = FaceLandmark68Net.from_faceapi(model_dir).features
    else:
        from facexplain.models.age_gender import AgeGenderNet

        ag = AgeGenderNet.from_faceapi(model_dir).to(device)
        return ag.pooled
    module.requires_grad_(False)
    return module.eval().to(device)


# -- probes ---------------------------------------------------------------------------------------------


@dataclass
class LinearProbeSet:
    """One logistic-regression probe per label on standardised features: ``sigmoid(((f - mean) / scale) @ w + b)``."""

    labels: tuple[str, ...]  # CelebA label names, in order of ``weights``' rows
    blocks: tuple[str, ...]  # feature blocks the probes read (see :class:`FeatureExtractor`)
    mean: np.ndarray  # (D,) float64
    scale: np.ndarray  # (D,) float64, > 0
    weights: np.ndarray  # (L, D) float64
    bias: np.ndarray  # (L,) float64
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        self.blocks = parse_blocks(self.blocks)
        d, n = self.mean.shape[0], len(self.labels)
        if self.scale.shape != (d,) or self.weights.shape != (n, d) or self.bias.shape != (n,):
            raise ValueError(
                f"inconsistent probe arrays: mean {self.mean.shape}, scale {self.scale.shape}, "
                f"weights {self.weights.shape}, bias {self.bias.shape} for {n} labels"
            )
        if len(set(self.labels)) != n:
            raise ValueError(f"labels repeat: {self.labels}")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def index(self, label: str) -> int:
        if label not in self.labels:
            raise UnknownAttributeError(f"no probe for label {label!r}; probes: {', '.join(self.labels)}")
        return self.labels.index(label)

    def logits(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) features, got {f.shape}")
        return ((f - self.mean) / self.scale) @ self.weights.T + self.bias  # type: ignore[no-any-return]

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N, L) float64 probabilities, columns as :attr:`labels`."""
        z = self.logits(features)
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic, without overflow warnings  # type: ignore[no-any-return]

    # -- persistence: arrays in an npz, the rest in JSON; nothing is unpickled --------------------------
    def save(self, directory: Path | str) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / PROBES_ARRAYS, mean=self.mean, scale=self.scale, weights=self.weights, bias=self.bias)
        spec = {
            "format": PROBES_FORMAT,
            "labels": list(self.labels),
            "blocks": list(self.blocks),
            "report": self.report,
        }
        (out / PROBES_JSON).write_text(json.dumps(spec, indent=1, allow_nan=True) + "\n")
        return out

    @classmethod
    def load(cls, directory: Path | str) -> LinearProbeSet:
        root = Path(directory)
        try:
            spec = json.loads((root / PROBES_JSON).read_text())
            with np.load(root / PROBES_ARRAYS, allow_pickle=False) as z:
                arrays = {k: z[k].astype(np.float64) for k in ("mean", "scale", "weights", "bias")}
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{root}: cannot read a probe set ({type(exc).__name__}: {exc})") from None
        if spec.get("format") != PROBES_FORMAT:
            raise ValueError(f"{root}: probe format {spec.get('format')!r}, this code reads {PROBES_FORMAT}")
        return cls(tuple(spec["labels"]), tuple(spec["blocks"]), report=spec.get("report") or {}, **arrays)


def _fit_one(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)
    clf.fit(x, y)
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


def fit_probe_set(
    features: np.ndarray,
    labels: np.ndarray,
    identities: Sequence[str],
    label_names: Sequence[str],
    blocks: Sequence[str],
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = 0.25,
    seed: int = 0,
    min_class_count: int = MIN_CLASS_COUNT,
) -> LinearProbeSet:
    """Fit one probe per label on (M, D) ``features`` of training faces (all variants of them).

    ``labels`` is (M, L) 0/1 (NaN = unlabelled, left out for that label); ``identities`` names the person
    of each row, so the copies of one face (clean, degraded) always fall on the same side. The L2 strength
    is chosen per label from ``c_grid`` by balanced accuracy on ``val_fraction`` of the identities
    (hash split with ``seed``), then the probe is refit on all rows with it. A label with fewer than
    ``min_class_count`` positives or negatives is refused: its probe would be noise.
    """
    x = np.asarray(features, dtype=np.float64)
    y_all = np.asarray(labels, dtype=np.float64)
    names = list(label_names)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected (M, D) features with M > 0, got {x.shape}")
    if y_all.shape != (x.shape[0], len(names)):
        raise ValueError(f"expected ({x.shape[0]}, {len(names)}) labels, got {y_all.shape}")
    if len(identities) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {len(identities)} identities")
    if not c_grid or any(c <= 0 for c in c_grid):
        raise ValueError(f"c_grid must hold positive values, got {list(c_grid)}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or inf")
    known = set(np.unique(y_all[~np.isnan(y_all)]).tolist())
    if known - {0.0, 1.0}:
        raise ValueError(f"labels must be 0/1 (or NaN), got {sorted(known - {0.0, 1.0})}")
    for j, name in enumerate(names):
        col = y_all[:, j]
        pos, neg = int((col == 1).sum()), int((col == 0).sum())
        if min(pos, neg) < min_class_count:
            raise ValueError(
                f"label {name!r} has {pos} positive and {neg} negative training rows; "
                f"at least {min_class_count} of each are needed"
            )
    t0 = time.perf_counter()
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    z = (x - mean) / scale
    side = split_identities(identities, test_fraction=val_fraction, seed=seed)
    is_val = np.array([side[i] == "test" for i in identities])
    weights = np.zeros((len(names), x.shape[1]))
    bias = np.zeros(len(names))
    per_label: dict[str, Any] = {}
    for j, name in enumerate(names):
        col = y_all[:, j]
        has = ~np.isnan(col)
        fit_rows, val_rows = has & ~is_val, has & is_val
        scores: dict[str, float] = {}
        if all(len(np.unique(col[r])) == 2 for r in (fit_rows, val_rows)):
            for c in c_grid:
                w, b = _fit_one(z[fit_rows], col[fit_rows], c, seed)
                p = 1.0 / (1.0 + np.exp(-np.clip(z[val_rows] @ w + b, -50, 50)))
                scores[repr(float(c))] = binary_metrics(p, col[val_rows])["balanced_accuracy"]
            # Best validation score; on a tie the stronger regularisation (smaller C) wins.
            best = max(sorted(c_grid), key=lambda c: scores[repr(float(c))] - 1e-9 * c)
        else:  # validation identities lack a class: no basis to choose, take the grid's middle
            best = sorted(c_grid)[len(c_grid) // 2]
        weights[j], bias[j] = _fit_one(z[has], col[has], best, seed)
        per_label[name] = {
            "C": float(best),
            "val_balanced_accuracy": scores.get(repr(float(best)), float("nan")),
            "val_scores": scores,
            "positives": int((col == 1).sum()),
            "negatives": int((col == 0).sum()),
        }
    report = {
        "rows": int(x.shape[0]),
        "identities": len(set(identities)),
        "val_identities": len({i for i, v in zip(identities, is_val, strict=True) if v}),
        "val_fraction": val_fraction,
        "seed": seed,
        "c_grid": [float(c) for c in c_grid],
        "labels": per_label,
        "fit_seconds": round(time.perf_counter() - t0, 2),
    }
    return LinearProbeSet(tuple(names), tuple(blocks), mean, scale, weights, bias, report)


def evaluate_probes(probes: LinearProbeSet, features: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Per label: AUC, accuracy and balanced accuracy (at 0.5) of (N, D) features against (N, L) 0/1 labels."""
    p = probes.probabilities(features)
    y = np.asarray(labels, dtype=np.float64)
    out = {}
    for j, name in enumerate(probes.labels):
        has = ~np.isnan(y[:, j])
        out[name] = binary_metrics(p[has, j], y[has, j])
    return out


# -- the catalogue estimator ----------------------------------------------------------------------------


class AccessoryEstimator:
    """The catalogue's ``accessory`` group: one probability attribute per probe (``eyeglasses``, ...)."""

    def __init__(self, probes: LinearProbeSet, extractor: FeatureExtractor | None = None, model_key: str = "") -> None:
        self.probes = probes
        self.extractor = extractor or FeatureExtractor(probes.blocks)
        if self.extractor.blocks != probes.blocks:
            raise ValueError(f"the probes read {probes.blocks}, the extractor gives {self.extractor.blocks}")
        key = model_key or PROBES_ARCH  # a bundle passes its registered name
        self._specs = tuple(
            AttributeSpec(
                name=attribute_name(label),
                group="accessory",
                unit="probability",
                components=("p",),
                description=f"probability that the face {_describe(label)} (linear probe on CelebA {label})",
                discrete=False,
                estimator=key,
            )
            for label in probes.labels
        )
        self._label = {attribute_name(label): label for label in probes.labels}

    @property
    def specs(self) -> tuple[AttributeSpec, ...]:
        return self._specs

    def estimate(self, faces: FaceBatch, names: Sequence[str]) -> dict[str, np.ndarray]:
        unknown = [n for n in names if n not in self._label]
        if unknown:
            raise UnknownAttributeError(
                f"unknown accessory attribute(s) {', '.join(map(repr, unknown))}; known: {', '.join(self._label)}"
            )
        if not names:
            return {}
        feats = self.extractor(faces.images, faces.landmarks)
        probs = self.probes.probabilities(feats)
        return {n: probs[:, [self.probes.index(self._label[n])]] for n in names}
