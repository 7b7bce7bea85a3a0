from __future__ import annotations

import math

import pytest

from facexplain.attributes.gate import AttributeGate, GateRow, attribute_gate


def _rows(**mi: float) -> list[GateRow]:
    return [GateRow(name, v, 0.014) for name, v in mi.items()]


def test_an_attribute_the_template_does_not_carry_is_listed_not_gated() -> None:
    # yaw at MI 0 would fail the old gate; its probes find nothing, so it is "not carried"
    gate = attribute_gate(
        _rows(gender=0.66, hair=0.7, yaw=0.0),
        {"gender": {"linear": 0.9, "knn": 0.8}, "hair": {"linear": 0.3}, "yaw": {"linear": -0.04, "knn": -0.09}},
    )
    assert gate.passed
    assert gate.carried == ["gender", "hair"] and gate.smallest_carried == "gender"
    assert gate.not_carried == {"yaw": -0.04}


def test_a_carried_attribute_at_the_control_fails_the_gate() -> None:
    # the knn probe alone shows it is carried; its MI does not rise above the control
    gate = attribute_gate(
        _rows(gender=0.66, lbp=0.01), {"gender": {"linear": 0.9}, "lbp": {"linear": 0.0, "knn": 0.07}}
    )
    assert not gate.passed
    assert gate.below_or_at_control == ["lbp"] and gate.smallest_carried_mi == pytest.approx(0.01)


def test_the_threshold_is_strict_and_unprobed_attributes_are_set_apart() -> None:
    gate = attribute_gate(_rows(a=0.5, b=0.0, c=0.0), {"a": {"linear": 0.2}, "b": {"linear": 0.05}, "c": {"knn": None}})
    assert gate.passed and gate.not_carried == {"b": 0.05} and gate.not_probed == ["c"]


def test_nothing_carried_does_not_pass_and_nothing_finite_is_an_error() -> None:
    gate = attribute_gate(_rows(a=0.5), {"a": {"linear": 0.0}})
    assert isinstance(gate, AttributeGate) and not gate.passed and math.isnan(gate.smallest_carried_mi)
    with pytest.raises(ValueError, match="nothing to gate"):
        attribute_gate([GateRow("a", math.nan, 0.0)], {})
