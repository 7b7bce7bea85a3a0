"""Client security from the environment and the CLI flags, and the plaintext-token guard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from cli.main import build_parser, export_client_security, main
from sdk.client import ClientSecurity, open_channel


def test_from_env() -> None:
    env = {
        "FACEXPLAIN_TLS_CA_FILE": "ca.pem",
        "FACEXPLAIN_TLS_CLIENT_CERT_FILE": "c.pem",
        "FACEXPLAIN_TLS_CLIENT_KEY_FILE": "k.pem",
        "FACEXPLAIN_TOKEN": " tok \n",
    }
    sec = ClientSecurity.from_env(env)
    assert sec == ClientSecurity("ca.pem", "c.pem", "k.pem", "tok") and sec.use_tls
    assert "tok" not in repr(sec)  # the token never reaches a log through repr
    assert not ClientSecurity.from_env({}).use_tls


def test_token_never_sent_in_plaintext_off_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACEXPLAIN_ALLOW_INSECURE", raising=False)
    with pytest.raises(ValueError, match=r"refusing to send a token in plaintext to 10\.0\.0\.7:50051"):
        open_channel("10.0.0.7:50051", security=ClientSecurity(token="t"))
    open_channel("127.0.0.1:50051", security=ClientSecurity(token="t")).close()
    open_channel("localhost:50051", security=ClientSecurity(token="t")).close()
    monkeypatch.setenv("FACEXPLAIN_ALLOW_INSECURE", "1")
    open_channel("10.0.0.7:50051", security=ClientSecurity(token="t")).close()


def test_client_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="needs both FACEXPLAIN_TLS_CLIENT_CERT_FILE and FACEXPLAIN_TLS_CLIENT_KEY"):
        open_channel("127.0.0.1:1", security=ClientSecurity(cert_file="c.pem"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--token", "T", "--tls-ca-file", "ca.pem", "embed", "d", "--out", "o.npz"],
        ["embed", "d", "--out", "o.npz", "--token", "T", "--tls-ca-file", "ca.pem"],
        ["directions", "ssi", "d", "--out", "o.json", "--token", "T", "--tls-ca-file", "ca.pem"],
        ["audit", "--token", "T", "--tls-ca-file", "ca.pem", "--out", "o", "--fr-model", "m@1", "--data", "d"],
    ],
)
def test_cli_flags_export_the_environment(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEXPLAIN_TOKEN", "")  # recorded, so the values the CLI exports are undone after the test
    monkeypatch.setenv("FACEXPLAIN_TLS_CA_FILE", "")
    args = build_parser(with_training=False).parse_args(argv)
    export_client_security(args)
    assert os.environ["FACEXPLAIN_TOKEN"] == "T" and os.environ["FACEXPLAIN_TLS_CA_FILE"] == "ca.pem"


def test_cli_names_a_bad_client_setting_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACEXPLAIN_TLS_CA_FILE", "")
    (tmp_path / "faces").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "faces" / "a.png")
    argv = ["embed", str(tmp_path / "faces"), "--out", str(tmp_path / "o.npz")]
    code = main([*argv, "--tls-ca-file", str(tmp_path / "missing-ca.pem")])
    err = capsys.readouterr().err
    assert code == 2 and "FACEXPLAIN_TLS_CA_FILE" in err and "missing-ca.pem: cannot read it" in err
    assert "Traceback" not in err
