"""Argument parsing of ``directfs get`` (portal URL, ``--range``) and the shared flag parsing of commands/common.py
(credentials and their files, TLS and timeout flags, sizes, durations). ``directfs get`` end to end against the
real block server: tests/component/test_cli_get.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from directfs import cli
from directfs.commands import common
from directfs.commands.get import parse_portal, parse_range
from directfs.config import Settings, flag_settings
from directfs.errors import ConfigError
from directfs.units import parse_duration_seconds, parse_size
from tests.support.commands import private_umask


@pytest.fixture(autouse=True)
def private_files() -> Iterator[None]:
    with private_umask():
        yield


def test_get_needs_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(common.ENV_ACCESS_KEY_ID, raising=False)
    monkeypatch.delenv(common.ENV_SECRET_ACCESS_KEY, raising=False)
    assert cli.main(["get", "ctera+https://portal.example.com", "1", str(tmp_path / "x")]) == 1
    assert "--access-key-id" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ctera+https://portal.example.com", "https://portal.example.com"),
        ("ctera+https://portal.example.com:8443/", "https://portal.example.com:8443"),
        ("CTERA+HTTP://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("ctera+http://[::1]:8080", "http://[::1]:8080"),
        ("ctera+http://localhost", "http://localhost"),
    ],
)
def test_parse_portal(text: str, expected: str) -> None:
    assert parse_portal(text) == expected


@pytest.mark.parametrize(
    "text", ["https://portal.example.com", "ctera+http://portal.example.com", "ctera+https://", "portal", "s3://b"]
)
def test_parse_portal_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_portal(text)


def test_parse_range() -> None:
    assert parse_range(None) == (0, None)
    assert parse_range("0-99") == (0, 99)
    assert parse_range("5-") == (5, None)
    for bad in ("-5", "a-b", "9-1", "5", "1-2-3", ""):
        with pytest.raises(ConfigError):
            parse_range(bad)


# --- commands/common.py -----------------------------------------------------------------------------------------


def parse(*argv: str, env: Mapping[str, str] | None = None) -> Settings:
    """The settings of these credential and TLS flags (``env``: the DIRECTFS_* twins; none by default)."""
    parser = argparse.ArgumentParser()
    common.add_credential_arguments(parser)
    common.add_tls_arguments(parser)
    return flag_settings(parser.parse_args(argv), env or {})


def test_credentials_precedence_flag_file_env(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\r\n\n")
    env = {common.ENV_SECRET_ACCESS_KEY: "from-env", common.ENV_ACCESS_KEY_ID: "id-env", common.ENV_TOKEN: "tok"}
    assert common.resolve_credentials(parse(env=env), env).secret_access_key == "from-env"
    assert common.resolve_credentials(parse(env=env), env).access_key_id == "id-env"
    with_file = parse("--secret-access-key-file", str(key_file), env=env)
    assert common.resolve_credentials(with_file, env).secret_access_key == "from-file"  # newlines stripped
    with_flag = parse("--secret-access-key-file", str(key_file), "--secret-access-key", "from-flag", env=env)
    assert common.resolve_credentials(with_flag, env).secret_access_key == "from-flag"
    assert common.resolve_credentials(parse(), {}).secret_access_key is None


def test_password_and_token_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("hunter2\n")
    (tmp_path / "tok").write_text("eyJtoken\n")
    args = parse("--username", "alice", "--password-file", str(tmp_path / "pw"), "--token-file", str(tmp_path / "tok"))
    creds = common.resolve_credentials(args, {})
    assert (creds.username, creds.password, creds.token) == ("alice", "hunter2", "eyJtoken")
    assert creds.token_file == str(tmp_path / "tok")
    shown = repr(creds)
    assert "hunter2" not in shown and "eyJtoken" not in shown


def test_secret_file_errors_name_the_path_not_the_content(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        common.read_secret_file(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        common.read_secret_file(str(tmp_path / "empty"))
    (tmp_path / "big").write_bytes(b"x" * (common.MAX_SECRET_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="larger"):
        common.read_secret_file(str(tmp_path / "big"))
    (tmp_path / "bin").write_bytes(b"\xff\xfesecret")
    with pytest.raises(ConfigError, match="UTF-8") as info:
        common.read_secret_file(str(tmp_path / "bin"))
    assert "secret" not in str(info.value).replace(str(tmp_path), "").replace("secret file", "")


def test_build_source_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    args = parse("--no-verify-storage-tls", "--ca-file", str(ca), "--connect-timeout", "2s", "--read-timeout", "1m")
    options = common.build_source_options(args, common.resolve_credentials(args, {}))
    assert options.verify_tls is True and options.storage_verify_tls is False
    assert options.ca_file == str(ca)
    assert (options.connect_timeout_seconds, options.read_timeout_seconds) == (2.0, 60.0)
    defaults = common.build_source_options(parse("--no-verify-tls"), common.resolve_credentials(parse(), {}))
    assert defaults.verify_tls is False and defaults.storage_verify_tls is None
    assert defaults.connect_timeout_seconds == 5.0 and defaults.read_timeout_seconds == 10.0
    with pytest.raises(ConfigError):
        common.build_source_options(parse("--ca-file", str(tmp_path / "nope")), common.Credentials())
    with pytest.raises(ConfigError):
        common.build_source_options(parse("--read-timeout", "0"), common.Credentials())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("64K", 64 * 1024),
        ("64k", 64 * 1024),
        ("64M", 64 << 20),
        ("64MiB", 64 << 20),
        ("512KB", 512 * 1024),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("10B", 10),
        (" 8 MiB ", 8 << 20),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1", "1.2.3", "64X", "0.1K", "1e3", "iB", "5iB", "nan", "99999999P"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10", 10.0), ("2.5s", 2.5), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0), ("0", 0.0)],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration_seconds(text) == expected


@pytest.mark.parametrize("text", ["", "s", "-1s", "5 minutes", "1w", "inf", "1e3"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration_seconds(text)
