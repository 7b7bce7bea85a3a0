"""The audit says, beside every decoded picture, how far to trust it: the serving decoder's card."""

from __future__ import annotations

from typing import Any

from sdk.audit import model_card
from sdk.audit_report import _trust

FORCED = {
    "test_psnr": "15.72",
    "test_ssim": "0.285",
    "test_identity_cosine": "0.880",
    "test_accepted": "0.0",
    "gates_passed": "false",
    "gates_failed": "test_ssim,test_identity_cosine",
    "promotion_forced_by": "scripts/demo.py",
    "promotion_forced_reason": "demo <decoder>",
    "promotion_forced_at": "2026-12-07T02:00:00Z",
    "bundle_sha256": "ab" * 32,
}


def _result(card: dict[str, str] | None, serving: bool = True) -> dict[str, Any]:
    models = [{"kind": "embedder", "serving": True, "card": {}}]
    if card is not None:
        models.append({"kind": "decoder", "serving": serving, "card": card})
    return {"models": {"services": {"decoding": {"models": models}}}}


def test_the_card_keeps_figures_gates_and_who_forced_it_but_no_timestamps() -> None:
    card = model_card(FORCED)
    assert card["test_psnr"] == "15.72" and card["gates_passed"] == "false"
    assert card["promotion_forced_reason"] == "demo <decoder>"
    assert "promotion_forced_at" not in card  # two audits with one seed write the same audit.json
    assert "bundle_sha256" not in card
    assert model_card({"template_dim": "128"}) == {}


def test_a_decoder_that_failed_its_gates_is_flagged_with_the_reason_escaped() -> None:
    html = _trust(_result(model_card(FORCED)))
    assert 'class="warn"' in html and "<b>not</b> pass its quality gates" in html
    assert "PSNR 15.72 dB" in html and "SSIM 0.285" in html
    assert "demo &lt;decoder&gt;" in html and "<decoder>" not in html


def test_a_gated_decoder_gets_a_plain_note_and_no_decoder_no_note() -> None:
    passed = {"test_psnr": "14.5", "test_ssim": "0.44", "test_identity_cosine": "0.95", "gates_passed": "true"}
    html = _trust(_result(passed))
    assert 'class="muted"' in html and "warn" not in html and "PSNR 14.50 dB" in html
    assert "no held-out figures" in _trust(_result({}))
    assert _trust(_result(None)) == "" and _trust(_result(passed, serving=False)) == ""
