"""How well reconstructions keep a face: image quality and identity, as the DFD paper measures them.

Image quality compares a reconstruction with the aligned chip the FR model saw (PSNR, SSIM).
Identity re-embeds the reconstruction with the FR model and compares templates: the cosine to the
original's template, whether the model's own verification rule still accepts the pair, and rank-1
identification of the reconstruction among the other faces of the evaluated identities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from facexplain.metrics.image import psnr, ssim
from facexplain.metrics.verification import VerificationRule

# (B, 3, S, S) chips in [0, 255] at the FR model's input size -> (B, d) templates.
ChipEmbedder = Callable[[torch.Tensor], torch.Tensor]


def resize01(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, 3, H, W) images to ``size``: antialiased when shrinking, bilinear when growing."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrink = images.shape[-1] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


@torch.no_grad()
def embed_images(embed_chips: ChipEmbedder, images01: torch.Tensor, chip_size: int, batch: int = 64) -> torch.Tensor:
    """Templates of images in [0, 1] rendered in the FR chip geometry (resized to the chip size first)."""
    out = []
    for i in range(0, images01.shape[0], batch):
        chips = resize01(images01[i : i + batch].float(), chip_size).clamp(0, 1) * 255.0
        out.append(embed_chips(chips).float().cpu())
    return torch.cat(out)


def rank1_excluding_self(probes: torch.Tensor, gallery: torch.Tensor, identities: Sequence[str]) -> torch.Tensor:
    """Per probe i: is the nearest gallery template (cosine), other than gallery[i] itself, of i's identity?

    Probe i is the reconstruction of gallery face i; leaving that face out makes the test "find this
    person among *other* photos", not "find the photo you were decoded from". Probes whose identity
    has no other face in the gallery are excluded (returned as NaN).
    """
    sims = F.normalize(probes.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    sims.fill_diagonal_(-float("inf"))
    ids = list(identities)
    index = {ident: k for k, ident in enumerate(sorted(set(ids)))}
    codes = torch.tensor([index[i] for i in ids])
    has_other = torch.tensor([ids.count(i) > 1 for i in ids])
    hit = (codes[sims.argmax(1)] == codes).float()
    return torch.where(has_other, hit, torch.full_like(hit, float("nan")))


@dataclass(frozen=True)
class ReconstructionReport:
    """Means over the evaluated faces (NaN-free by construction: each field says what it averages)."""

    faces: int
    identities: int
    psnr: float
    ssim: float
    identity_cosine: float
    accepted: float  # fraction verified as the same person under the FR model's rule
    rank1: float  # fraction identified correctly among the other faces
    psnr_std: float
    ssim_std: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def reconstruction_report(
    recon01: torch.Tensor,
    target01: torch.Tensor,
    templates: torch.Tensor,
    recon_templates: torch.Tensor,
    identities: Sequence[str],
    rule: VerificationRule,
) -> tuple[ReconstructionReport, dict[str, torch.Tensor]]:
    """Aggregate figures and the per-face values (psnr, ssim, cosine, accepted, rank1)."""
    p = psnr(recon01, target01)
    s = ssim(recon01, target01)
    cos = F.cosine_similarity(recon_templates.float(), templates.float(), dim=1)
    acc = rule.accepts(recon_templates.float(), templates.float()).float()
    r1 = rank1_excluding_self(recon_templates, templates, identities)
    valid = ~torch.isnan(r1)
    report = ReconstructionReport(
        faces=int(recon01.shape[0]),
        identities=len(set(identities)),
        psnr=float(p.mean()),
        ssim=float(s.mean()),
        identity_cosine=float(cos.mean()),
        accepted=float(acc.mean()),
        rank1=float(r1[valid].mean()) if bool(valid.any()) else float("nan"),
        psnr_std=float(p.std()) if p.numel() > 1 else 0.0,
        ssim_std=float(s.std()) if s.numel() > 1 else 0.0,
    )
    return report, {"psnr": p, "ssim": s, "identity_cosine": cos, "accepted": acc, "rank1": r1}
