"""ctera:// options without a network: what storage_options, DIRECTFS_* and the config file resolve to, the errors a
user sees (at construction for a bad option, at the first call for a missing setting), repr and pickling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import fsspec
import pytest

from directfs import fsspec_ctera
from directfs.errors import ConfigError, InvalidArgumentError
from directfs.fsspec_ctera import CteraFileSystem, _parse_options, _resolve
from tests.support.isolation import isolate_directfs_env

LOGIN = {"DIRECTFS_USERNAME": "u", "DIRECTFS_PASSWORD": "pw-secret"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    return isolate_directfs_env(monkeypatch, tmp_path)


def resolve(env: dict[str, str], **given: object) -> fsspec_ctera._Target:
    return _resolve(_parse_options(given), "key", {"DIRECTFS_CONFIG": os.environ["DIRECTFS_CONFIG"], **env})


def test_nothing_configured_constructs_and_the_first_call_says_what_is_missing() -> None:
    fs = fsspec.filesystem("ctera", skip_instance_cache=True)
    assert isinstance(fs, CteraFileSystem)
    with pytest.raises(ConfigError, match=r"portal_url=.*DIRECTFS_PORTAL_URL"):
        fs.ls("")
    with pytest.raises(ConfigError, match="username and password"):
        fsspec.filesystem("ctera", portal_url="https://portal.example.com", skip_instance_cache=True).ls("")


def test_bad_options_are_refused_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'pasword' \(did you mean 'password'\?\)"):
        fsspec.filesystem("ctera", pasword="x")
    with pytest.raises(ConfigError, match="storage_options cache_size='lots'"):
        fsspec.filesystem("ctera", cache_size="lots")
    with pytest.raises(ConfigError, match="storage_options verify_tls"):
        fsspec.filesystem("ctera", verify_tls="maybe")
    with pytest.raises(ConfigError, match="not a s3:// URL"):
        resolve(LOGIN, portal_url="s3://bucket")


def test_storage_options_beat_the_environment_which_fills_the_rest() -> None:
    env = {
        **LOGIN,
        "DIRECTFS_PORTAL_URL": "https://env.example.com",
        "DIRECTFS_ACCESS_KEY_ID": "AKENV",
        "DIRECTFS_SECRET_ACCESS_KEY": "env-secret",
        "DIRECTFS_CACHE_SIZE": "32M",
        "DIRECTFS_VERIFY_TLS": "false",
    }
    target = resolve(env)
    assert target.url == "ctera+https://env.example.com" and target.is_ctera
    credentials = target.options.credentials
    assert (credentials.username, credentials.password, credentials.access_key_id) == ("u", "pw-secret", "AKENV")
    assert target.options.verify_tls is False
    assert target.read_settings.cache_size_bytes == 32 * 1024 * 1024
    assert target.read_settings.prefetch_budget_bytes == 16 * 1024 * 1024
    given = resolve(
        env, portal_url="https://given.example.com/Projects", password="given", verify_tls=True, read_ahead="4M"
    )
    assert given.url == "ctera+https://given.example.com/Projects"
    assert given.options.credentials.password == "given" and given.options.verify_tls is True
    assert given.read_settings.read_ahead_max_bytes == 4 * 1024 * 1024
    assert resolve(LOGIN, portal_url="ctera+http://127.0.0.1:8080").url == "ctera+http://127.0.0.1:8080"
    default = resolve(LOGIN, portal_url="https://p.example.com").read_settings
    assert default == fsspec_ctera.API_READ_SETTINGS  # the Python API's engine unless told otherwise


def test_portal_url_names_a_source_of_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "directfs.toml"
    config.write_text(
        '[source.projects]\nurl = "ctera+https://portal.example.com/Projects"\nusername = "cfg"\n'
        'password = "cfg-secret"\nca_file = "/nonexistent.pem"\n'
    )
    config.chmod(0o600)
    with pytest.raises(ConfigError, match=r"\[source\.projects\] ca_file '/nonexistent\.pem' is not a file"):
        resolve({"DIRECTFS_CONFIG": str(config)}, portal_url="projects")
    config.write_text(
        '[source.projects]\nurl = "ctera+https://portal.example.com/Projects"\nusername = "cfg"\n'
        'password = "cfg-secret"\n'
    )
    target = resolve({"DIRECTFS_CONFIG": str(config)}, portal_url="projects")
    assert target.url == "ctera+https://portal.example.com/Projects"
    assert target.options.credentials.password == "cfg-secret"
    with pytest.raises(ConfigError, match=r"storage_options ca_file '/nonexistent\.pem' is not a file"):
        resolve({"DIRECTFS_CONFIG": str(config)}, portal_url="projects", ca_file="/nonexistent.pem")


def test_repr_hides_secrets_and_pickles_by_options() -> None:
    fs = fsspec.filesystem(
        "ctera",
        portal_url="https://p.example.com",
        password="pw-secret",
        secret_access_key="sak-secret",
        access_key_id="AKSECRET",
        username="someone",
    )
    shown = repr(fs)
    assert "pw-secret" not in shown and "sak-secret" not in shown and "AKSECRET" not in shown
    assert "password=<hidden>" in shown and "username='someone'" in shown
    clone = pickle.loads(pickle.dumps(fs))
    assert isinstance(clone, CteraFileSystem) and clone.storage_options == fs.storage_options


def test_paths() -> None:
    assert CteraFileSystem._strip_protocol("ctera://Projects/a.csv") == "Projects/a.csv"
    assert CteraFileSystem._strip_protocol("ctera:///Projects/") == "Projects"
    assert CteraFileSystem._strip_protocol("ctera://") == ""
    fs = fsspec.filesystem("ctera", skip_instance_cache=True)
    with pytest.raises(InvalidArgumentError):
        fs.cat_file("a/../b")
    with pytest.raises(InvalidArgumentError):
        fs.info("a//b")
