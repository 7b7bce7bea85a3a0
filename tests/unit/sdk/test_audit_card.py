"""The audit says, beside every decoded picture, how far to trust it: the serving decoder's card."""

from __future__ import annotations

import json
from typing import Any

import pytest

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


def test_a_shipped_decoder_is_judged_by_its_sealed_identities_not_its_own_split() -> None:
    shipped = {
        "test_psnr": "14.3",
        "test_ssim": "0.44",
        "heldout_psnr": "14.21",
        "heldout_ssim": "0.451",
        "heldout_identity_cosine": "0.962",
        "heldout_accepted": "0.99",
        "heldout_faces": "494",
        "heldout_identities": "23",
        "shipped_from": "models/facexplain-dfd-dlib128/1",
        "gates_passed": "true",
    }
    card = model_card(shipped)
    assert card["heldout_psnr"] == "14.21" and card["shipped_from"] == "models/facexplain-dfd-dlib128/1"
    html = _trust(_result(card))
    assert "PSNR 14.21 dB" in html and "SSIM 0.451" in html and "14.30" not in html
    assert "494 faces of 23 identities" in html and "models/facexplain-dfd-dlib128/1" in html


def test_the_models_table_says_which_versions_are_shipped() -> None:
    from sdk.audit_report import _models

    def model(name: str, version: str, card: dict[str, str]) -> dict[str, Any]:
        return {"kind": "decoder", "name": name, "version": version, "alias": "champion", "serving": True,
                "device": "cpu", "card": card}  # fmt: skip

    r = {"models": {"fr_model": {"name": "fr", "version": "1", "alias": "champion"}, "services": {"decoding": {
        "target": "127.0.0.1:1", "registry_uri": "http://r", "models": [
            model("facexplain-dfd-dlib128", "1", {"shipped_from": "models/facexplain-dfd-dlib128/1"}),
            model("facexplain-dfd-dlib128", "2", {}), model("face-api/x", "local", {})]}}}}  # fmt: skip
    html = _models(r)
    assert "shipped: models/facexplain-dfd-dlib128/1" in html and "registry" in html and "built in" in html


def test_privacy_estimate_for_a_label() -> None:
    """The privacy step reads a label with its own probe when served, else a named estimator component."""
    from sdk.audit import estimate_for

    assert estimate_for("Smiling", {"smiling": ["p"], "expression": ["neutral", "happy"]}) == ("smiling", 0)
    assert estimate_for("Smiling", {"expression": ["neutral", "happy", "sad"]}) == ("expression", 1)
    assert estimate_for("Male", {"gender": ["p_male"]}) == ("gender", 0)
    assert estimate_for("Bald", {"expression": ["neutral", "happy"]}) == ("", 0)


def test_the_card_says_what_the_second_model_judged() -> None:
    judged = {"test_psnr": "14.5", "gates_passed": "true", "test_identity_cosine_second": "0.3151"}
    judged |= {"test_accepted_second": "0.2", "second_judge": "facexplain-fr-hsefaceres1024:1"}
    card = model_card(judged)
    assert card["second_judge"] == "facexplain-fr-hsefaceres1024:1" and card["test_accepted_second"] == "0.2"
    html = _trust(_result(card))
    assert "judged by facexplain-fr-hsefaceres1024:1: identity cosine 0.315, accepted 0.20" in html


def test_served_geometry_and_the_second_judges_summary() -> None:
    from facexplain.faces.align import ARCFACE_5PT_ALIGNMENT
    from facexplain.models.hse_faceres import reference_points
    from sdk.audit import judge_summary, served_geometry

    dlib = served_geometry({"chip_size": "150", "chip_padding": "0.25"})
    assert (dlib.chip_size, dlib.chip_padding, dlib.alignment, dlib.reference) == (150, 0.25, "dlib", None)
    ref = [list(p) for p in reference_points()]
    five = served_geometry(
        {"chip_size": "224", "chip_padding": "0.0", "alignment_scheme": ARCFACE_5PT_ALIGNMENT,
         "alignment_reference": json.dumps(ref)}
    )  # fmt: skip
    assert five.alignment == ARCFACE_5PT_ALIGNMENT and five.reference == tuple(tuple(p) for p in ref)
    with pytest.raises(ValueError, match="alignment_reference"):
        served_geometry({"chip_size": "224", "chip_padding": "0", "alignment_scheme": ARCFACE_5PT_ALIGNMENT})
    rows = [
        {"identity_cosine_second": 0.5, "same_person_second": True, "identity_cosine_second_control": 0.9,
         "same_person_second_control": True, "second_no_face": False},
        {"identity_cosine_second": 0.1, "same_person_second": False, "identity_cosine_second_control": 0.7,
         "same_person_second_control": True, "second_no_face": False},
        {"identity_cosine_second": None, "same_person_second": False, "identity_cosine_second_control": None,
         "same_person_second_control": False, "second_no_face": True},
    ]  # fmt: skip
    s = judge_summary(rows)
    assert s["identity_cosine_second"] == pytest.approx(0.3) and s["identity_cosine_second_control"] == pytest.approx(
        0.8
    )
    assert s["same_person_rate_second"] == pytest.approx(1 / 3) and s["n_second_no_face"] == 1
