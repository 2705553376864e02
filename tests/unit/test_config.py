"""Config file, environment and flags: precedence, every rejection message, and secrets kept out of messages."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pytest

from directfs import cli, config
from directfs.errors import ConfigError

SECRET = "s3cr3t-VALUE-never-shown"


def write(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "directfs.toml"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def mount_args(source: str, mountpoint: str | None = None, **flags: object) -> argparse.Namespace:
    """`directfs mount`'s Namespace, as its parser makes it, with ``flags`` given on the command line (``options``:
    the list of ``-o`` values)."""
    argv = ["mount", source, *([mountpoint] if mountpoint else [])]
    for name, value in flags.items():
        if name == "options":
            assert isinstance(value, list)
            argv += [item for text in value for item in ("-o", text)]
        else:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return cli.build_parser().parse_args(argv)


FULL = """
[mount]
cache_size = "512M"
read_ahead = "8M"
metadata_ttl = "10s"
umask = "022"
log_level = "warning"

[source.projects]
url = "ctera+https://portal.example.com/projects"
mountpoint = "/mnt/projects"
access_key_id = "AKIDEXAMPLE"
secret_access_key_file = "/etc/directfs/projects.key"
connect_timeout = "3s"
verify_tls = false

[source.projects.mount]
allow_other = true
cache_size = "1G"
"""


def test_full_file_parses_into_normalised_values(tmp_path: Path) -> None:
    cfg = config.load_config(write(tmp_path, FULL))
    assert cfg.mount == {
        "cache_size": 512 << 20,
        "read_ahead": 8 << 20,
        "metadata_ttl": 10.0,
        "umask": 0o22,
        "log_level": "warning",
    }
    source = cfg.source("projects")
    assert source.url == "ctera+https://portal.example.com/projects"
    assert source.mountpoint == "/mnt/projects"
    assert source.mount == {"allow_other": True, "cache_size": 1 << 30}
    assert source.values["connect_timeout"] == 3.0
    assert source.values["verify_tls"] is False


def test_precedence_file_then_source_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    env = {"DIRECTFS_CONFIG": path, "DIRECTFS_READ_AHEAD": "16M", "DIRECTFS_METADATA_TTL": "2"}
    args = mount_args("projects", read_ahead="32M")  # the flag beats the environment
    settings = config.mount_settings(args, env)
    assert settings.source == "ctera+https://portal.example.com/projects"
    assert settings.source_name == "projects"
    assert settings.mountpoint == "/mnt/projects"
    assert settings["read_ahead"] == 32 << 20  # flag
    assert settings["metadata_ttl"] == 2.0  # environment beats [mount]
    assert settings["cache_size"] == 1 << 30  # [source.projects.mount] beats [mount]
    assert settings["umask"] == 0o22  # [mount]
    assert settings["log_level"] == "warning"
    assert settings["allow_other"] is True
    assert settings["verify_tls"] is False
    assert settings["connect_timeout"] == 3.0
    assert settings["access_key_id"] == "AKIDEXAMPLE"
    assert settings["secret_access_key_file"] == "/etc/directfs/projects.key"


def test_o_options_rank_with_flags(tmp_path: Path) -> None:
    args = mount_args("projects", options=["cache_size=64M,ro"])
    settings = config.mount_settings(args, {"DIRECTFS_CONFIG": write(tmp_path, FULL), "DIRECTFS_CACHE_SIZE": "2G"})
    assert settings["cache_size"] == 64 << 20  # -o cache_size=64M, over the environment and the file


def test_mountpoint_on_the_command_line_wins(tmp_path: Path) -> None:
    args = mount_args("projects", "/srv/other")
    settings = config.mount_settings(args, {"DIRECTFS_CONFIG": write(tmp_path, FULL)})
    assert settings.mountpoint == "/srv/other"


def test_url_source_uses_only_mount_defaults(tmp_path: Path) -> None:
    args = mount_args("file:///srv/data", "/mnt/x")
    settings = config.mount_settings(args, {"DIRECTFS_CONFIG": write(tmp_path, FULL)})
    assert settings.source == "file:///srv/data"
    assert settings.source_name is None
    assert settings["cache_size"] == 512 << 20
    assert settings.get("access_key_id") is None


def test_no_config_file_and_no_name_needs_nothing(tmp_path: Path) -> None:
    args = mount_args("file:///srv/data", "/mnt/x")
    cfg = config.mount_settings(args, {}).config
    assert cfg.path in (None, config.DEFAULT_CONFIG_PATH)


def test_systemd_credential_becomes_a_secret_file_path(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ctera-secret").write_text(SECRET + "\n")
    path = write(
        tmp_path,
        '[source.p]\nurl = "ctera+https://h"\nmountpoint = "/mnt/p"\nsecret_access_key_credential = "ctera-secret"\n',
    )
    args = mount_args("p")
    settings = config.mount_settings(args, {"DIRECTFS_CONFIG": path, "CREDENTIALS_DIRECTORY": str(creds)})
    assert settings["secret_access_key_file"] == str(creds / "ctera-secret")
    assert settings.get("secret_access_key") is None  # the value is read by the credential resolver, never kept


def test_secret_from_environment_beats_the_config(tmp_path: Path) -> None:
    path = write(tmp_path, f'[source.p]\nurl = "ctera+https://h"\nmountpoint = "/m"\nsecret_access_key = "{SECRET}"\n')
    args = mount_args("p")
    settings = config.mount_settings(args, {"DIRECTFS_CONFIG": path, "DIRECTFS_SECRET_ACCESS_KEY": "from-env"})
    assert settings.get("secret_access_key") is None and settings.get("secret_access_key_file") is None


def test_inline_secret_in_a_private_file_is_kept_in_memory_only(tmp_path: Path) -> None:
    path = write(tmp_path, f'[source.p]\nurl = "ctera+https://h"\nmountpoint = "/m"\npassword = "{SECRET}"\n')
    cfg = config.load_config(path)
    assert SECRET not in repr(cfg)
    args = mount_args("p")
    settings = config.mount_settings(args, {"DIRECTFS_CONFIG": path})
    assert settings["password"] == SECRET


def test_flags_secret_file_beats_config_secret(tmp_path: Path) -> None:
    path = write(tmp_path, f'[source.p]\nurl = "ctera+https://h"\nmountpoint = "/m"\npassword = "{SECRET}"\n')
    args = mount_args("p", password_file="/run/pw")
    settings = config.mount_settings(args, {"DIRECTFS_CONFIG": path})
    assert settings.get("password") is None and settings["password_file"] == "/run/pw"


def test_explicit_config_flag_beats_environment(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[mount]\ncache_size = "1M"\n')
    args = mount_args("file:///d", "/m", config=str(other))
    settings = config.mount_settings(args, {"DIRECTFS_CONFIG": write(tmp_path, FULL)})
    assert settings["cache_size"] == 1 << 20


def test_find_config_path_order(tmp_path: Path) -> None:
    assert config.find_config_path("/a", {"DIRECTFS_CONFIG": "/b"}) == "/a"
    assert config.find_config_path(None, {"DIRECTFS_CONFIG": "/b"}) == "/b"
    expected = config.DEFAULT_CONFIG_PATH if os.path.exists(config.DEFAULT_CONFIG_PATH) else None
    assert config.find_config_path(None, {}) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[mount\n", "not valid TOML"),
        ('color = "blue"\n', "unknown top-level key 'color' (known: mount, source)"),
        ('mount = "x"\n', "mount = 'x': expected a table"),
        ('[mount]\ncache_sise = "1G"\n', "[mount] unknown key cache_sise = '1G' (did you mean 'cache_size'?"),
        ('[mount]\ncache_size = "lots"\n', "[mount] cache_size = 'lots': invalid size 'lots'"),
        ("[mount]\ncache_size = 0\n", "[mount] cache_size = 0: must be more than 0"),
        ("[mount]\ncache_size = true\n", "[mount] cache_size = True: expected a size"),
        ('[mount]\nmetadata_ttl = "soon"\n', "[mount] metadata_ttl = 'soon': invalid duration 'soon'"),
        ("[mount]\nmetadata_ttl = -1\n", "[mount] metadata_ttl = -1: must be 0 or more seconds"),
        ('[mount]\nmetadata_ttl = "400d"\n', "[mount] metadata_ttl = '400d': must be less than a year"),
        ('[mount]\nallow_other = "maybe"\n', "[mount] allow_other = 'maybe': expected true or false"),
        ("[mount]\nuid = -5\n", "[mount] uid = -5: expected a user/group id"),
        ('[mount]\ngid = "staff"\n', "[mount] gid = 'staff': expected a number"),
        ('[mount]\numask = "999"\n', "[mount] umask = '999': expected octal digits"),
        ("[mount]\numask = 1777\n", "[mount] umask = 1777: must be between 000 and 777"),
        ('[mount]\nlog_level = "loud"\n', "[mount] log_level = 'loud': expected one of debug, info, warning, error"),
        ('[mount]\nlog_file = "rel/path"\n', "[mount] log_file = 'rel/path': expected an absolute path"),
        ('[mount]\nmetrics_address = "127.0.0.1:99999"\n', "metrics_address = '127.0.0.1:99999': port must be"),
        ('[mount]\nmetrics_address = "localhost:http"\n', "metrics_address = 'localhost:http': expected HOST:PORT"),
        ('[mount]\nmetrics_address = ""\n', "metrics_address = '': expected a non-empty string"),
        ('[source.p]\nmountpoint = "/m"\n', "[source.p] has no url"),
        ('[source.p]\nurl = "portal.example.com"\n', "[source.p] url = 'portal.example.com': expected a URL"),
        ('[source.p]\nurl = "file:///d"\nmount = 3\n', "[source.p] mount = 3: expected a table [source.p.mount]"),
        ('[source.p]\nurl = "file:///d"\n[source.p.mount]\nttl = 1\n', "[source.p.mount] unknown key ttl = 1"),
        ('[source.p]\nurl = "file:///d"\nconnect_timeout = 0\n', "[source.p] connect_timeout = 0: must be more than 0"),
        ('[source.p]\nurl = "file:///d"\nca_file = 5\n', "[source.p] ca_file = 5: expected a non-empty string"),
        (
            '[source.p]\nurl = "file:///d"\ntoken_credential = "../etc/shadow"\n',
            "[source.p] token_credential = '../etc/shadow': expected a credential name",
        ),
        ('[source."a/b"]\nurl = "file:///d"\n', "[source.a/b]: a source name must not be empty or hold '/'"),
        ("[source]\np = 1\n", "source.p = <hidden>: expected a table [source.p]"),
        (
            '[source.p]\nurl = "file:///d"\npassword_file = "/a"\npassword_credential = "b"\n',
            "[source.p] password_file and password_credential: give the password only one way",
        ),
    ],
)
def test_every_rejection_names_file_key_value_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load_config(path)
    assert message in str(caught.value)
    assert path in str(caught.value)
    assert caught.value.errno == 22


def test_secret_values_are_hidden_in_rejections(tmp_path: Path) -> None:
    for text in (
        f'[source.p]\nurl = "file:///d"\npassword = "{SECRET}"\n',  # group/world readable file
        f'[source.p]\nurl = "file:///d"\nsecret_acess_key = "{SECRET}"\n',  # a typo of a secret key
        f'[source.p]\nurl = "file:///d"\ntoken = ["{SECRET}"]\n',  # a bad type
    ):
        with pytest.raises(ConfigError) as caught:
            config.load_config(write(tmp_path, text, mode=0o644))
        assert SECRET not in str(caught.value)
        assert "<hidden>" in str(caught.value)


def test_inline_secret_in_readable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"readable by others \(mode 644\); chmod 600"):
        config.load_config(write(tmp_path, f'[source.p]\nurl = "file:///d"\ntoken = "{SECRET}"\n', mode=0o644))


def test_missing_unreadable_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*No such file"):
        config.load_config(str(tmp_path / "nope.toml"))
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (config.MAX_CONFIG_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        config.load_config(str(big))
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load_config(str(binary))


def test_unknown_source_name_lists_the_known_ones(tmp_path: Path) -> None:
    args = mount_args("projcts")
    with pytest.raises(ConfigError, match=r"no \[source.projcts\] \(sources defined: projects\)"):
        config.mount_settings(args, {"DIRECTFS_CONFIG": write(tmp_path, FULL)})


def test_source_without_mountpoint_needs_one(tmp_path: Path) -> None:
    args = mount_args("p")
    with pytest.raises(ConfigError, match=r"\[source.p\] has no mountpoint: give MOUNTPOINT"):
        config.mount_settings(args, {"DIRECTFS_CONFIG": write(tmp_path, '[source.p]\nurl = "file:///d"\n')})


def test_credential_without_credentials_directory(tmp_path: Path) -> None:
    path = write(tmp_path, '[source.p]\nurl = "ctera+https://h"\nmountpoint = "/m"\ntoken_credential = "tok"\n')
    with pytest.raises(ConfigError, match=r"token_credential = 'tok': \$CREDENTIALS_DIRECTORY is not set"):
        config.mount_settings(mount_args("p"), {"DIRECTFS_CONFIG": path})
    with pytest.raises(ConfigError, match=r"token_credential = 'tok': no such credential"):
        config.mount_settings(mount_args("p"), {"DIRECTFS_CONFIG": path, "CREDENTIALS_DIRECTORY": str(tmp_path)})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DIRECTFS_CACHE_SIZE", "huge", "environment DIRECTFS_CACHE_SIZE='huge': invalid size"),
        ("DIRECTFS_ALLOW_OTHER", "perhaps", "environment DIRECTFS_ALLOW_OTHER='perhaps': expected true or false"),
        ("DIRECTFS_UMASK", "8", "environment DIRECTFS_UMASK='8': expected octal digits"),
        ("DIRECTFS_METRICS_ADDRESS", "x:0", "environment DIRECTFS_METRICS_ADDRESS='x:0': port must be"),
    ],
)
def test_bad_environment_values_are_rejected(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.env_values({name: value})
    assert message in str(caught.value)


def test_environment_values_parse(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="directfs.config"):
        values = config.env_values(
            {"DIRECTFS_ALLOW_OTHER": "yes", "DIRECTFS_UID": "1000", "DIRECTFS_CACHE_SZE": "1G", "HOME": "/root"}
        )
    assert values == {"allow_other": True, "uid": 1000}
    assert "ignoring unknown environment variable DIRECTFS_CACHE_SZE" in caplog.text


def test_metrics_address_forms() -> None:
    assert config.parse_metrics_address("9567") == config.MetricsAddress("127.0.0.1", 9567)
    assert config.parse_metrics_address("[::1]:9567") == config.MetricsAddress("::1", 9567)
    assert config.parse_metrics_address("[::1]:9567").is_loopback
    assert config.parse_metrics_address("localhost:1").is_loopback
    assert not config.parse_metrics_address("0.0.0.0:1").is_loopback
    assert not config.parse_metrics_address("metrics.example.com:1").is_loopback
    assert str(config.parse_metrics_address("[::1]:9")) == "[::1]:9"


def test_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "examples" / "directfs.toml"
    cfg = config.parse_config(example.read_text(), path=str(example))
    assert cfg.sources, "the example should show at least one named source"


# --- permissions of the config file and of secret files (issue 13 L5) -------------------------------------------

PLAIN = '[source.p]\nurl = "file:///d"\nmountpoint = "/m"\n'


def strict_args(source: str, *argv: str) -> argparse.Namespace:
    """`directfs mount SOURCE --strict-permissions ARGV...` as its parser makes it."""
    return cli.build_parser().parse_args(["mount", source, "--strict-permissions", *argv])


def secret_at(tmp_path: Path, mode: int, name: str = "key") -> str:
    path = tmp_path / name
    path.write_text(SECRET + "\n")
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_config_others_may_write_draws_a_warning(tmp_path: Path, mode: int, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, PLAIN, mode=mode)
    with caplog.at_level(logging.WARNING, logger="directfs.config"):
        assert config.load_config(path).sources["p"].url == "file:///d"  # still mounts: a warning, not a refusal
    assert f"config file {path!r} is writable by group or others (mode {mode:03o}): chmod go-w" in caplog.text


def test_strict_permissions_refuses_a_config_others_may_write(tmp_path: Path) -> None:
    path = write(tmp_path, PLAIN, mode=0o664)
    with pytest.raises(ConfigError, match=r"writable by group or others \(mode 664\).*--strict-permissions"):
        config.load_config(path, strict_permissions=True)
    # The flag, or its environment twin, is known before the file is read: the file cannot switch it off.
    with pytest.raises(ConfigError, match="refused: --strict-permissions"):
        config.mount_settings(strict_args("p"), {"DIRECTFS_CONFIG": path})
    with pytest.raises(ConfigError, match="refused: --strict-permissions"):
        config.mount_settings(mount_args("p"), {"DIRECTFS_CONFIG": path, "DIRECTFS_STRICT_PERMISSIONS": "1"})
    # 0644 and 0600, owned by root or by us, pass in strict mode too.
    for mode in (0o644, 0o600):
        assert config.load_config(write(tmp_path, PLAIN, mode=mode), strict_permissions=True).sources


def test_a_config_owned_by_another_user_draws_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    path = write(tmp_path, PLAIN, mode=0o644)
    os.chown(path, 4242, 4242)
    with caplog.at_level(logging.WARNING, logger="directfs.config"):
        config.load_config(path)
    assert "is owned by uid 4242" in caplog.text
    with pytest.raises(ConfigError, match="owned by uid 4242"):
        config.load_config(path, strict_permissions=True)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620])
def test_a_secret_file_others_may_read_draws_a_warning_or_a_refusal(
    tmp_path: Path, mode: int, caplog: pytest.LogCaptureFixture
) -> None:
    from directfs.commands import common

    path = secret_at(tmp_path, mode)
    with caplog.at_level(logging.WARNING, logger="directfs.config"):
        assert common.read_secret_file(path) == SECRET
    assert f"secret file {path!r} is open to group or others (mode {mode:03o}): chmod 600" in caplog.text
    assert SECRET not in caplog.text
    with pytest.raises(ConfigError, match="refused: --strict-permissions") as info:
        common.read_secret_file(path, strict_permissions=True)
    assert SECRET not in str(info.value)


def test_private_secret_files_and_the_flag_through_the_credential_resolver(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from directfs.commands import common

    private = secret_at(tmp_path, 0o600, "private")
    readable = secret_at(tmp_path, 0o644, "readable")
    path = write(tmp_path, f'[source.p]\nurl = "ctera+https://h"\nmountpoint = "/m"\npassword_file = "{private}"\n')
    with caplog.at_level(logging.WARNING, logger="directfs.config"):
        settings = config.mount_settings(strict_args("p"), {"DIRECTFS_CONFIG": path})
        assert common.resolve_credentials(settings, {}).password == SECRET
    assert caplog.text == ""
    settings = config.mount_settings(strict_args("p", "--secret-access-key-file", readable), {"DIRECTFS_CONFIG": path})
    with pytest.raises(ConfigError, match=f"secret file {readable!r} is open to group or others"):
        common.resolve_credentials(settings, {})
    # A token file is re-read by the store; its permissions are judged once, when the credentials are built.
    settings = config.mount_settings(strict_args("p", "--token-file", readable), {"DIRECTFS_CONFIG": path})
    with pytest.raises(ConfigError, match="is open to group or others"):
        common.resolve_credentials(settings, {})


def test_the_access_key_id_is_a_secret(tmp_path: Path) -> None:
    from directfs.commands import common
    from directfs.options import O_KEYS, OPTIONS, parse_o
    from directfs.sources.base import Credentials

    key_id = "AKID-" + SECRET
    assert key_id not in repr(Credentials(access_key_id=key_id, secret_access_key="x"))
    assert OPTIONS["access_key_id"].secret and OPTIONS["access_key_id"].shown(key_id) == "<hidden>"
    # fstab / -o and a readable config cannot carry it; a file or a systemd credential can.
    assert "access_key_id" not in O_KEYS and "access_key_id_file" in O_KEYS
    with pytest.raises(ConfigError) as refused:
        parse_o([f"access_key_id={key_id}"])
    assert key_id not in str(refused.value)
    inline = f'[source.p]\nurl = "ctera+https://h"\nmountpoint = "/m"\naccess_key_id = "{key_id}"\n'
    with pytest.raises(ConfigError, match=r"access_key_id = <hidden>: the file holds a secret") as readable:
        config.load_config(write(tmp_path, inline, mode=0o644))
    assert key_id not in str(readable.value)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ctera-key-id").write_text(key_id + "\n")
    (creds / "ctera-key-id").chmod(0o400)
    path = write(
        tmp_path, '[source.p]\nurl = "ctera+https://h"\nmountpoint = "/m"\naccess_key_id_credential = "ctera-key-id"\n'
    )
    settings = config.mount_settings(mount_args("p"), {"DIRECTFS_CONFIG": path, "CREDENTIALS_DIRECTORY": str(creds)})
    assert key_id not in repr(settings) and "access_key_id" not in settings  # only its file's path is kept
    assert common.resolve_credentials(settings, {}).access_key_id == key_id
    # From the environment it is read when the credentials are built, never copied into the settings.
    settings = config.mount_settings(mount_args("p"), {"DIRECTFS_CONFIG": path, "DIRECTFS_ACCESS_KEY_ID": key_id})
    assert key_id not in repr(settings.values)
