"""``facexplain registry register-embedder``: what it refuses before touching a model or the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main

BASE = ["registry", "register-embedder", "--uri", "http://127.0.0.1:9", "--dim", "128", "--chip-size", "150"]
RULE = ["--metric", "l2", "--threshold", "0.6"]


def test_program_and_blackbox_are_exclusive_and_one_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*BASE, *RULE, "--name", "facexplain-fr-x", "--program", "m.ts", "--blackbox"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*BASE, *RULE, "--name", "facexplain-fr-x"])
    assert "one of the arguments --program --blackbox is required" in capsys.readouterr().err


def test_threshold_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*BASE, "--metric", "cosine", "--name", "facexplain-fr-x", "--blackbox"])
    assert "--threshold" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", "my-model", "--blackbox"], "does not follow the convention facexplain-<role>-<architecture>"),
        (["--name", "facexplain-fr-x", "--program", "m.ts", "--endpoint", "http://x/"], "--endpoint is for --blackbox"),
        (["--name", "facexplain-fr-x", "--blackbox", "--value-range", "0"], "--value-range needs 2 numbers"),
        (["--name", "facexplain-fr-x", "--blackbox", "--std", "1,0,1"], "std positive"),
        (["--name", "facexplain-fr-x", "--blackbox", "--mean", "a"], "--mean must be comma-separated numbers"),
    ],
)
def test_bad_contracts_are_refused_with_the_reason(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*BASE, *RULE, *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_program_is_refused_before_registering(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "m.ts"
    junk.write_bytes(b"junk")
    assert main([*BASE, *RULE, "--name", "facexplain-fr-x", "--program", str(junk)]) == 2
    assert "cannot build the auditor's FR bundle: m.ts is not a TorchScript archive" in capsys.readouterr().err
