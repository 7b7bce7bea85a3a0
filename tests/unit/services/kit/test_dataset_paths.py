"""Server dataset paths the OS refuses are the caller's error (found by the fuzz suite: a 5000-character
``labels_file`` made DiscoverRegression answer INTERNAL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kit.datasets import resolve_under_root
from services.kit.errors import InvalidArgument, NotFound, PermissionDenied


def test_a_name_too_long_for_the_os_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="labels_file is not a usable path"):
        resolve_under_root(str(tmp_path), "x" * 5000, "labels_file")


def test_missing_and_escaping_paths_keep_their_codes(tmp_path: Path) -> None:
    (tmp_path / "faces").mkdir()
    assert resolve_under_root(str(tmp_path), "faces", "dataset path") == (tmp_path / "faces").resolve()
    with pytest.raises(NotFound):
        resolve_under_root(str(tmp_path), "nope", "dataset path")
    with pytest.raises(PermissionDenied):
        resolve_under_root(str(tmp_path), "../outside", "dataset path")


def test_an_infinite_label_is_invalid_argument_and_nan_means_unknown() -> None:
    """Found by the fuzz suite: an inline label of inf was accepted and reached the regression fit."""
    from services.kit.datasets import _clean_labels

    assert _clean_labels({"Smiling": 1.0, "Eyeglasses": float("nan")}, "a") == {"Smiling": 1.0}
    with pytest.raises(InvalidArgument, match=r"item 'a': label 'yaw' is -inf"):
        _clean_labels({"yaw": float("-inf")}, "a")
