"""The option table (directfs/options.py, issue #12 item 4): one row per setting generates the flags, ``-o`` (for
``directfs mount`` and ``mount.directfs`` alike), the TOML keys, the environment twins and the README's tables, and
every default is read from the settings dataclass the value goes into."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
from pathlib import Path

import pytest

from directfs import cli, config, options
from directfs.commands import common, mount_helper
from directfs.commands.mount import mount_config
from directfs.engine.reader import ReadSettings
from directfs.errors import ConfigError
from directfs.http import HTTPSettings
from directfs.mount import MountConfig
from directfs.sources.base import SourceOptions
from directfs.units import format_duration, format_size
from directfs.vfs import VfsSettings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECRET = "opt-s3cret-never-shown"


def mount_argv(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["mount", "file:///srv/data", "/mnt/x", *argv])


def settings(*argv: str, env: dict[str, str] | None = None) -> config.Settings:
    return config.mount_settings(mount_argv(*argv), env or {})


# --- the README -------------------------------------------------------------------------------------------------


def test_readme_option_tables_are_generated_from_the_table() -> None:
    text = README.read_text(encoding="utf-8")
    for name in options.readme_blocks():
        assert f"<!-- options:{name} -->" in text and f"<!-- /options:{name} -->" in text, name
    assert options.update_readme(text) == text, (
        "README.md's option tables are stale: run `.venv/bin/python -m directfs.options README.md`"
    )


def test_a_stale_readme_table_is_caught(tmp_path: Path) -> None:
    stale = README.read_text(encoding="utf-8").replace("(default 256M)", "(default 128M)", 1)
    assert options.update_readme(stale) != stale
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    assert options.main(["--check", str(path)]) == 1
    assert options.main([str(path)]) == 0  # rewrites it
    assert options.main(["--check", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == README.read_text(encoding="utf-8")


# --- defaults have one home ---------------------------------------------------------------------------------------


def test_every_home_names_a_real_field() -> None:
    for option in options.TABLE:
        if option.home is not None:
            option.default()  # LookupError / KeyError / AttributeError for a renamed field or class


def test_shown_defaults_are_the_dataclass_defaults() -> None:
    cases = {
        "cache_size": format_size(ReadSettings().cache_size_bytes),
        "read_ahead": format_size(ReadSettings().read_ahead_max_bytes),
        "metadata_ttl": format_duration(VfsSettings().metadata_ttl_seconds),
        "umask": f"{VfsSettings().umask:03o}",
        "connect_timeout": format_duration(SourceOptions().connect_timeout_seconds),
        "read_timeout": format_duration(SourceOptions().read_timeout_seconds),
        "block_size": format_size(SourceOptions().block_size_bytes),
        "staging_deadline": format_duration(SourceOptions().staging_deadline_seconds),
        "log_level": "info",
    }
    for name, shown in cases.items():
        option = options.OPTIONS[name]
        assert option.default_shown() == shown, name
        assert f"(default {shown}" in option.flag_help(), name
    assert options.OPTIONS["allow_other"].default() is MountConfig.__dataclass_fields__["allow_other"].default


def test_nothing_given_builds_the_dataclass_defaults() -> None:
    built = mount_config(settings())
    assert built.cache_size_bytes is None and built.read_ahead_max_bytes is None  # the read engine's own defaults
    assert built.vfs_settings == VfsSettings()
    assert dataclasses.replace(built.source_options, credentials=SourceOptions().credentials) == SourceOptions()
    assert (built.allow_other, built.metrics_address, built.metrics_allow_remote) == (False, None, False)


def test_timeouts_agree_in_both_homes() -> None:
    # SourceOptions is where the command layer sets them; HTTPSettings restates them until http.py takes them from
    # there (issue #12 item 4: "timeouts have two homes"). Until then they must not drift apart.
    assert SourceOptions().connect_timeout_seconds == HTTPSettings().connect_timeout_seconds
    assert SourceOptions().read_timeout_seconds == HTTPSettings().read_timeout_seconds


# --- every value reaches its field ----------------------------------------------------------------------------------


def test_every_mount_option_lands_in_its_field(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    argv = shlex.split(
        "--cache-size 64M --read-ahead 0 --metadata-ttl 500ms --uid 7 --gid 8 --umask 027 --allow-other "
        "--metrics-address 9999 --metrics-allow-remote --no-verify-tls --no-verify-storage-tls --connect-timeout 2s "
        "--read-timeout 1m --endpoint-url http://127.0.0.1:9000/ --block-size 64K --staging-deadline 1h "
        "--access-key-id AKID --username u --client-cert c.pem --client-key k.pem --log-level debug"
    )
    built = mount_config(settings(*argv, "--ca-file", str(ca)))
    assert (built.cache_size_bytes, built.read_ahead_max_bytes) == (64 << 20, 0)
    vfs = built.vfs_settings
    assert (vfs.metadata_ttl_seconds, vfs.uid, vfs.gid, vfs.umask) == (0.5, 7, 8, 0o27)
    assert (built.allow_other, built.metrics_address, built.metrics_allow_remote) == (True, ("127.0.0.1", 9999), True)
    source = built.source_options
    assert (source.verify_tls, source.storage_verify_tls, source.ca_file) == (False, False, str(ca))
    assert (source.connect_timeout_seconds, source.read_timeout_seconds) == (2.0, 60.0)
    assert (source.endpoint_url, source.block_size_bytes, source.staging_deadline_seconds) == (
        "http://127.0.0.1:9000",
        64 * 1024,
        3600.0,
    )
    creds = source.credentials
    assert (creds.access_key_id, creds.username, creds.client_cert, creds.client_key) == ("AKID", "u", "c.pem", "k.pem")


DURATIONS = [
    ("--metadata-ttl", "5s", 5.0),
    ("--metadata-ttl", "500ms", 0.5),
    ("--metadata-ttl", "5", 5.0),
    ("--metadata-ttl", "2m", 120.0),
    ("--connect-timeout", "1.5", 1.5),
    ("--read-timeout", "250ms", 0.25),
    ("--staging-deadline", "2h", 7200.0),
]


@pytest.mark.parametrize(("flag", "text", "seconds"), DURATIONS)
def test_every_duration_takes_the_same_syntax(flag: str, text: str, seconds: float) -> None:
    option = next(option for option in options.TABLE if option.flag == flag)
    assert option.kind == "duration"
    assert settings(flag, text)[option.name] == seconds
    assert settings("-o", f"{option.name}={text}")[option.name] == seconds
    assert settings(env={option.env or "": text})[option.name] == seconds
    section = "mount" if option.toml == "mount" else "source.x"
    url = 'url = "file:///d"\n' if section != "mount" else ""
    parsed = config.parse_config(f'[{section}]\n{option.name} = "{text}"\n{url}')
    values = parsed.mount if section == "mount" else parsed.source("x").values
    assert values[option.name] == seconds


def test_metadata_ttl_5s_reaches_the_filesystem() -> None:
    assert mount_config(settings("--metadata-ttl", "5s")).vfs_settings.metadata_ttl_seconds == 5.0
    assert mount_config(settings("--metadata-ttl", "0.2")).vfs_settings.metadata_ttl_seconds == 0.2


def test_layers_rank_flags_over_o_over_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "directfs.toml"
    path.write_text('[mount]\ncache_size = "1M"\nread_ahead = "1M"\numask = "077"\nuid = 1\n')
    path.chmod(0o600)
    env = {"DIRECTFS_CONFIG": str(path), "DIRECTFS_READ_AHEAD": "2M", "DIRECTFS_UMASK": "007", "DIRECTFS_UID": "2"}
    got = settings("-o", "umask=003,uid=3", "--uid", "4", env=env)
    assert (got["cache_size"], got["read_ahead"], got["umask"], got["uid"]) == (1 << 20, 2 << 20, 0o3, 4)
    assert got.origin("cache_size") == f"{path}: [mount] cache_size"
    assert got.origin("read_ahead") == "$DIRECTFS_READ_AHEAD"
    assert got.origin("umask") == "-o umask"
    assert got.origin("uid") == "--uid"


def test_errors_name_where_the_value_came_from() -> None:
    with pytest.raises(ConfigError, match=r"--metadata-ttl 'soon': invalid duration 'soon'"):
        settings("--metadata-ttl", "soon")
    with pytest.raises(ConfigError, match=r"-o metadata_ttl 'soon': invalid duration"):
        settings("-o", "metadata_ttl=soon")
    with pytest.raises(ConfigError, match=r"environment DIRECTFS_METADATA_TTL='soon': invalid duration"):
        settings(env={"DIRECTFS_METADATA_TTL": "soon"})
    with pytest.raises(ConfigError, match=r"--uid 'me': expected a number"):
        settings("--uid", "me")
    with pytest.raises(ConfigError, match=r"--umask '999': expected octal digits"):
        settings("--umask", "999")
    with pytest.raises(ConfigError, match=r"--metrics-address 'x:0': port must be"):
        settings("--metrics-address", "x:0")
    with pytest.raises(ConfigError, match=r"-o ca_file '/nope.pem' is not a file"):
        mount_config(settings("-o", "ca_file=/nope.pem"))
    with pytest.raises(ConfigError) as caught:
        settings("--endpoint-url", f"http://key:{SECRET}@127.0.0.1:9000")
    assert SECRET not in str(caught.value)


def test_settings_never_show_secrets(tmp_path: Path) -> None:
    path = tmp_path / "directfs.toml"
    path.write_text(f'[source.p]\nurl = "file:///d"\nmountpoint = "/m"\npassword = "{SECRET}"\n')
    path.chmod(0o600)
    got = config.mount_settings(cli.build_parser().parse_args(["mount", "p"]), {"DIRECTFS_CONFIG": str(path)})
    assert got["password"] == SECRET
    assert SECRET not in repr(got)
    assert common.resolve_credentials(got, {}).password == SECRET


def test_the_command_line_log_file_is_made_absolute_and_the_file_one_must_be() -> None:
    assert settings("--log-file", "rel.log")["log_file"] == os.path.abspath("rel.log")
    with pytest.raises(ConfigError, match="expected an absolute path"):
        settings(env={"DIRECTFS_LOG_FILE": "rel.log"})


# --- generated flags ------------------------------------------------------------------------------------------------


def flags_of(*argv: str) -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices[argv[0]]
    return {flag for action in command._actions for flag in action.option_strings}


def test_each_command_gets_its_groups_flags() -> None:
    def table_flags(groups: tuple[options.Group, ...]) -> set[str]:
        return {flag for option in options.TABLE if option.group in groups for flag in option.flags}

    assert table_flags(options.MOUNT_GROUPS) <= flags_of("mount")
    for command in ("ls", "cp", "stage"):
        assert table_flags(options.STORE_GROUPS) <= flags_of(command)
        assert not table_flags(("mount",)) & flags_of(command)
    assert table_flags(options.GET_GROUPS) <= flags_of("get")
    assert "--config" in flags_of("stats")


def test_help_shows_the_defaults_from_the_dataclasses() -> None:
    parser = argparse.ArgumentParser(prog="directfs mount")
    from directfs.commands import mount as mount_command

    mount_command.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert f"(default {format_size(ReadSettings().cache_size_bytes)}:" in text
    assert f"(default {format_duration(VfsSettings().metadata_ttl_seconds)}:" in text
    assert "--metadata-ttl DURATION" in text
    assert "$DIRECTFS_CACHE_SIZE" in text


def test_unset_flags_are_none_and_switches_store_their_value() -> None:
    args = mount_argv("--no-verify-tls", "--allow-other")
    assert (args.verify_tls, args.allow_other, args.cache_size, args.foreground) == (False, True, None, None)
    assert mount_argv().verify_tls is None  # not given: the file and the environment may still say


# --- -o: one parser for directfs mount and mount.directfs -------------------------------------------------------


def test_one_place_parses_o() -> None:
    here = ROOT / "directfs"
    parsers = [
        path.relative_to(ROOT).as_posix()
        for path in here.rglob("*.py")
        if re.search(r"def parse_o\b|\.split\(\",\"\)", path.read_text(encoding="utf-8"))
        and "sources" not in path.parts  # x-goog-hash header lists
    ]
    assert parsers == ["directfs/options.py"]


def test_o_items() -> None:
    items = options.parse_o(["ro,cache-size=64M", "allow_other,no_verify_tls"])
    assert [(item.option.name, item.value, item.parsed()) for item in items] == [
        ("cache_size", "64M", 64 << 20),
        ("allow_other", None, True),
        ("verify_tls", None, False),
    ]
    assert options.parse_o(["_netdev,x-systemd.automount,comment=a,bogus"], fstab=True, sloppy=True) == []


def test_o_rw_asks_for_writes_and_fstab_says_directfs_rw() -> None:
    # Issue 14: `directfs mount -o rw` is --rw; mount(8) hands `rw` to every helper, so fstab spells it directfs_rw.
    assert [(i.option.name, i.parsed()) for i in options.parse_o(["ro,rw"])] == [("rw", True)]
    assert options.parse_o(["rw"], fstab=True) == []
    assert [(i.option.name, i.parsed()) for i in options.parse_o(["rw,directfs_rw"], fstab=True)] == [("rw", True)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rw=yes", "option rw takes no value"),
        ("cache_sise=1M", "unknown option 'cache_sise' (did you mean 'cache_size'?"),
        ("_netdev", "unknown option '_netdev'"),  # only mount.directfs knows mount(8)'s words
        (f"password={SECRET}", "option password= would put a secret in fstab and in ps"),
        ("cache_size", "option cache_size needs a value (cache_size=...)"),
        ("allow_other=no", "option allow_other takes no value"),
    ],
)
def test_o_rejections(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings("-o", text)
    assert message in str(caught.value)
    assert SECRET not in str(caught.value)


def test_the_helper_and_the_mount_command_read_o_alike(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    given = (
        f"cache_size=64M,metadata_ttl=1s,allow_other,uid=7,umask=027,block_size=1M,staging_deadline=1h,"
        f"endpoint_url=http://127.0.0.1:9000,log_level=debug,no_verify_tls,connect_timeout=3s,ca_file={ca},"
        f"username=u,metrics_allow_remote"
    )
    direct = config.mount_settings(mount_argv("-o", given), {})
    inv = mount_helper.parse_argv(["file:///srv/data", "/mnt/x", "-o", f"_netdev,nofail,{given}"])
    helped = config.mount_settings(cli.build_parser().parse_args(mount_helper.mount_command(inv)), {})
    assert helped.values == direct.values
    assert mount_config(helped) == mount_config(direct)


def test_every_o_key_works_in_directfs_mount() -> None:
    for option in options.TABLE:
        if option.o and option.name != "config":
            special = {"metrics_address": "127.0.0.1:9", "endpoint_url": "http://127.0.0.1:9", "log_level": "debug"}
            by_kind = {"size": "1M", "duration": "2s", "id": "5", "octal": "022"}
            value = special.get(option.name, by_kind.get(option.kind, "/abs/path"))
            if option.choices:  # --change-feed, --xattrs: one of their words
                value = option.choices[0]
            text = option.o if option.switch is not None else f"{option.o}={value}"
            assert option.name in settings("-o", text), text


# --- environment twins and TOML keys ------------------------------------------------------------------------------


def test_twins_follow_the_names() -> None:
    for option in options.TABLE:
        if option.env:
            assert option.env == f"DIRECTFS_{option.name.upper()}", option.name
        if option.flags:
            names = (option.name.replace("_", "-"), option.name.replace("_", "-").removeprefix("verify-"))
            # --no-range-max-size is a name of its own (no_range_max_size), not the negation of a switch
            assert option.flag.removeprefix("--no-").removeprefix("--") in names or option.flag[2:] in names
    assert set(config.MOUNT_KEYS) == {o.name for o in options.TABLE if o.toml == "mount"}
    assert set(config.SOURCE_KEYS) == {o.name for o in options.TABLE if o.toml == "source"}
    assert {"url", "mountpoint", "token_credential"} <= set(config.SOURCE_KEYS)


def test_environment_twins_reach_the_store_commands_too(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["ls", "file:///srv/data"])
    got = config.source_settings(args, {"DIRECTFS_CONNECT_TIMEOUT": "750ms", "DIRECTFS_CACHE_SIZE": "bogus"})
    assert got["connect_timeout"] == 0.75  # a mount-only variable is not even parsed for ls
    assert "cache_size" not in got


def test_other_durations_take_the_syntax_too() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["umount", "/m", "--wait", "500ms"]).wait == 0.5
    assert parser.parse_args(["umount", "/m", "--wait", "3"]).wait == 3.0
    serve = parser.parse_args(["serve", "/d", "--rescan-interval", "2m", "--url-ttl", "1h"])
    assert (serve.rescan_interval, serve.url_ttl) == (120.0, 3600)
