"""``directfs serve DIR``: the reference portal (WebDAV namespace + Direct IO + Notification Service) for DIR."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..options import duration_arg

if TYPE_CHECKING:
    from ..server.config import Credentials, ServeConfig

HELP = "Publish a local directory as a CTERA-compatible portal (WebDAV, Direct IO, notifications) for tests and demos."

_EPILOG = """\
credentials (flag > environment; one set):
  access key id      --access-key-id          DIRECTFS_ACCESS_KEY_ID      (Bearer value for /directio)
  secret access key  --secret-access-key-file DIRECTFS_SECRET_ACCESS_KEY  (wraps the per-file keys; never sent)
  portal user        --username               DIRECTFS_USERNAME           (HTTP Basic for WebDAV + notifications)
  portal password    --password-file          DIRECTFS_PASSWORD
  bearer token       --token-file             DIRECTFS_TOKEN              (alternative to Basic)
  Nothing configured: the public demo set is used and printed (loopback --listen only, unless --insecure-demo).
  Anything configured: only what is configured works. No token: Bearer is refused; no user and password: Basic is
  refused (one of the two is required); no key pair: /directio is off and file keys are wrapped with a random
  secret kept in the state dir (file-key-wrapping.key). Half a pair (a user without a password, a key id without
  its secret) refuses to start. Rejected logins are answered after --failed-auth-delay.
  The client reads the same variables, so `directfs serve DIR` and `directfs mount` in one shell just work.
  With --store s3://, the bucket credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.

surfaces:
  PROPFIND/GET  /ServicesPortal/webdav/PATH             Depth 0/1 (infinity: 403), ctera:fileid, Range GETs
  PUT/MKCOL/DELETE/MOVE/PROPPATCH  (same paths)         only with --writable (else 405); portal login required
  GET           /directio/FILEID                        v8.3+ JSON block list with signed URLs
  GET           /blocks/KEY?expires=...&sig=...         block objects of the local store (HMAC-signed, expiring)
  POST          /ServicesPortal/v2/api/metadata/list    change feed with cursor (also .../longpoll); a cursor
                                                        older than --feed-retention, of another state dir or of a
                                                        reset feed answers 410 (docs/serve-feed.md)

writes (--writable; docs/serve-writes.md):
  PUT      201 new, 204 replaced; 409 parent missing, 405 onto a folder, 412 If-Match/If-None-Match, 413 over
           --max-upload-size, 507 disk full. Streamed to a temp file in the folder, fsynced, renamed into place.
  MKCOL    201; 405 exists, 409 parent missing, 415 with a body
  DELETE   204 (a folder with everything in it); 404 missing
  MOVE     201 new, 204 replaced (Overwrite: T, the default); 412 Overwrite: F and the destination exists,
           409 destination parent missing, 502 destination on another server. File ids stay.
  PROPPATCH  DAV:getlastmodified (RFC 1123 date) sets the mtime: 207; any other property 403 (and 424 for the rest)
  A new or replaced file gets a new file id (the old one answers 400) and is encoded into blocks as scanned files
  are; every write appears in the change feed and wakes long-polls. No rescan is needed.

stdout gets exactly one line once the first scan is done and the socket listens:
  directfs serve: listening on http://127.0.0.1:PORT
SIGHUP rescans DIR now; SIGUSR2 resets the change feed (every cursor so far answers 410); SIGTERM/SIGINT exit 0.
"""


def _whole_seconds(text: str) -> int:
    """A duration (``90``, ``10m``, ``1d``) in whole seconds, for the portal's URL lifetimes."""
    return round(duration_arg(text))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("dir", metavar="DIR", type=Path, help="the directory to publish (read only, unless --writable)")
    parser.add_argument(
        "--writable",
        action="store_true",
        help="accept WebDAV PUT, MKCOL, DELETE, MOVE and PROPPATCH (mtime) into DIR from the portal user (default: "
        "read only, writes answer 405)",
    )
    parser.add_argument(
        "--max-upload-size",
        default="5G",
        metavar="SIZE",
        help="largest PUT body, K/M/G suffixes (default 5G, the S3 single-PUT limit); larger ones get 413",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8443",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:8443; port 0 picks a free one and prints it). Off loopback: "
        "plain HTTP is warned about (use --tls-cert), the demo credentials are refused (see --insecure-demo)",
    )
    parser.add_argument(
        "--public-url", metavar="URL", help="base URL clients use to reach this server, if not the listen address"
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate chain")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="private key for --tls-cert")
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="PATH",
        help="index + block objects (default ~/.local/state/directfs/portal-<hash of DIR>; never listed). Created "
        "0700; an existing one must be yours and not group/other-writable (it holds the wrapped file keys)",
    )

    enc = parser.add_argument_group("block encoding")
    enc.add_argument(
        "--block-size", default="4M", metavar="SIZE", help="fixed block size, K/M/G suffixes (default 4M, CTERA's)"
    )
    enc.add_argument(
        "--chunking",
        choices=("fixed", "cdc"),
        default="fixed",
        help="fixed-size blocks, or content-defined (FastCDC, ~512K average, 128K..4M) like a dedup Portal",
    )
    enc.add_argument(
        "--compression",
        choices=("snappy", "snappy-raw", "gzip", "none"),
        default="snappy",
        help="block compression (default snappy = xerial snappy-java stream, as the Portal writes)",
    )
    enc.add_argument(
        "--compression-rule",
        action="append",
        default=[],
        metavar="GLOB=COMPRESSION",
        help="per-file override, repeatable, first match wins (GLOB matches the relative path, or the name)",
    )
    enc.add_argument(
        "--native",
        action="append",
        default=[],
        metavar="GLOB",
        help="files stored unencrypted and uncompressed (Fusion Direct native format), repeatable",
    )
    enc.add_argument(
        "--non-direct",
        action="append",
        default=[],
        metavar="GLOB",
        help="files whose /directio answers 422 (storage node not in Direct mode), repeatable",
    )

    store = parser.add_argument_group("block store")
    store.add_argument(
        "--store", metavar="URL", help="'local' (default: served by this process) or s3://BUCKET[/PREFIX]"
    )
    store.add_argument("--store-endpoint", metavar="URL", help="S3 endpoint for --store s3:// (e.g. SeaweedFS)")
    store.add_argument("--store-region", metavar="REGION", help="S3 region to sign for (default us-east-1)")
    store.add_argument(
        "--url-ttl",
        type=_whole_seconds,
        default=86400,
        metavar="DURATION",
        help="lifetime of block URLs (default 1d, as real presigned URLs)",
    )

    portal = parser.add_argument_group("portal behaviour")
    portal.add_argument(
        "--rescan-interval",
        type=duration_arg,
        default=30.0,
        metavar="DURATION",
        help="rescan DIR this often (default 30s; 0 = only at start and on SIGHUP)",
    )
    portal.add_argument(
        "--max-blocks-per-reply",
        type=int,
        default=0,
        metavar="N",
        help="answer /directio with at most N blocks plus actual_blocks_range (client pages with rangeStart/"
        "rangeEnd); 0 = all blocks (default; the released cterasdk does not page)",
    )
    portal.add_argument(
        "--empty-files",
        choices=("empty-list", "zero-chunk"),
        default="empty-list",
        help="/directio for a 0-byte file: no chunks (default) or one 0-length chunk",
    )
    portal.add_argument(
        "--feed-retention",
        type=int,
        default=None,
        metavar="N",
        help="keep the last N change-feed events (default 100000); an older cursor answers 410 and the client "
        "lists afresh; 0 = keep every event",
    )
    portal.add_argument(
        "--ingest-workers", type=int, metavar="N", help="threads encoding blocks (default: number of CPUs)"
    )
    portal.add_argument(
        "--failed-auth-delay",
        type=duration_arg,
        metavar="DURATION",
        help="wait this long before answering a rejected login (default 0.5s; other clients are not slowed; "
        "0 = no delay)",
    )
    portal.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    creds = parser.add_argument_group("credentials (see below)")
    creds.add_argument("--access-key-id", metavar="ID")
    creds.add_argument("--secret-access-key-file", type=Path, metavar="PATH")
    creds.add_argument("--username", metavar="NAME")
    creds.add_argument("--password-file", type=Path, metavar="PATH")
    creds.add_argument("--token-file", type=Path, metavar="PATH")
    creds.add_argument(
        "--insecure-demo",
        action="store_true",
        help="allow the public demo credentials (used when none are configured) on a non-loopback --listen",
    )

    faults = parser.add_argument_group("TEST-ONLY fault injection (off unless given; never use in a demo or benchmark)")
    faults.add_argument(
        "--fault-latency-ms", type=float, default=0.0, metavar="MS", help="TEST ONLY: delay each request"
    )
    faults.add_argument(
        "--fault-error-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="TEST ONLY: answer this fraction with --fault-status",
    )
    faults.add_argument(
        "--fault-status", type=int, default=503, metavar="CODE", help="TEST ONLY: status for injected errors (503)"
    )
    faults.add_argument(
        "--fault-drop-mid-body-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="TEST ONLY: close this fraction of block GETs after half the body (local store)",
    )
    faults.add_argument(
        "--fault-corrupt-blocks-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="TEST ONLY: flip one byte in this fraction of block objects served (local store)",
    )
    faults.add_argument(
        "--fault-url-ttl", type=int, metavar="SECONDS", help="TEST ONLY: block URLs expire after this many seconds"
    )
    faults.add_argument(
        "--fault-target",
        action="append",
        choices=("blocks", "portal"),
        metavar="blocks|portal",
        help="TEST ONLY: where latency/error faults apply, repeatable (default: blocks)",
    )
    faults.add_argument("--fault-seed", type=int, metavar="N", help="TEST ONLY: seed for reproducible faults")
    faults.add_argument(
        "--fault-put-status",
        type=int,
        metavar="CODE",
        help="TEST ONLY (--writable): answer PUTs with CODE (400-599, e.g. 500, 507, 401) after reading the body; "
        "nothing is written",
    )
    faults.add_argument(
        "--fault-put-drop",
        action="store_true",
        help="TEST ONLY (--writable): read half of each PUT body, then drop the connection; nothing is written",
    )
    faults.add_argument(
        "--fault-put-count",
        type=int,
        default=0,
        metavar="N",
        help="TEST ONLY: the PUT faults hit only the first N PUTs, later ones succeed (default 0: every PUT)",
    )
    faults.add_argument(
        "--fault-feed-down-file",
        type=Path,
        metavar="PATH",
        help="TEST ONLY: while PATH exists, the change feed is down: /metadata/list and /metadata/longpoll (parked "
        "ones within 0.1 s) close the connection without an answer, or answer the status PATH holds (e.g. 503)",
    )
    faults.add_argument(
        "--count-requests",
        action="store_true",
        help="TEST ONLY: count requests by method and path; GET /directfs/test/requests?method=M&prefix=P answers "
        '{"count": N} (portal login)',
    )


def _read_secret_file(path: Path, what: str) -> str:
    from ..errors import ConfigError

    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {str(path)!r}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"the {what} file {str(path)!r} is empty")
    return value


def _credentials(args: argparse.Namespace, host: str) -> Credentials:
    """One credential set: what the user configured (flag > environment), or the demo set if nothing at all is.

    A surface without its credential is refused, never defaulted: no token means no Bearer, no user and password means
    no Basic, no key pair means no Direct IO. Half a pair is a mistake, and refused at start."""
    from ..errors import ConfigError
    from ..server import config as cfg

    def from_file(path: Path | None, what: str) -> str | None:
        return _read_secret_file(path, what) if path is not None else None

    def pick(flag_value: str | None, env: str) -> str | None:
        return flag_value or os.environ.get(env) or None  # an empty variable counts as unset

    creds = cfg.Credentials(
        access_key_id=pick(args.access_key_id, "DIRECTFS_ACCESS_KEY_ID"),
        secret_access_key=pick(
            from_file(args.secret_access_key_file, "secret access key"), "DIRECTFS_SECRET_ACCESS_KEY"
        ),
        username=pick(args.username, "DIRECTFS_USERNAME"),
        password=pick(from_file(args.password_file, "password"), "DIRECTFS_PASSWORD"),
        token=pick(from_file(args.token_file, "token"), "DIRECTFS_TOKEN"),
    )
    if not (creds.access_key_id or creds.secret_access_key or creds.username or creds.password or creds.token):
        return _demo_credentials(host, insecure_demo=args.insecure_demo)
    if (creds.username is None) != (creds.password is None):
        missing = "username (--username or DIRECTFS_USERNAME)" if creds.username is None else "password"
        raise ConfigError(
            f"a portal login needs a username and a password; the {missing} is not set "
            "(password: --password-file or DIRECTFS_PASSWORD)"
        )
    if (creds.access_key_id is None) != (creds.secret_access_key is None):
        missing = (
            "access key id (--access-key-id or DIRECTFS_ACCESS_KEY_ID)"
            if creds.access_key_id is None
            else "secret access key (--secret-access-key-file or DIRECTFS_SECRET_ACCESS_KEY)"
        )
        raise ConfigError(f"the Direct IO key pair is half set: the {missing} is missing")
    if not creds.basic and creds.token is None:
        raise ConfigError(
            "no portal login is configured: set a username and password (DIRECTFS_USERNAME, DIRECTFS_PASSWORD) "
            "and/or a token (DIRECTFS_TOKEN) for WebDAV and the change feed; configure nothing at all to use the "
            "public demo credentials"
        )
    if creds.secret_access_key is not None:
        _check_wrapping_secret(creds.secret_access_key)
    return creds


def _check_wrapping_secret(secret: str) -> None:
    from ..errors import ConfigError
    from ..sources.ctera.codec import wrap_file_key

    try:  # fail at start, not on the first file: the secret must be base64 to wrap keys with it
        wrap_file_key(bytes(32), secret)
    except OSError as exc:
        raise ConfigError(f"the secret access key is unusable: {exc.strerror}") from None


def _demo_credentials(host: str, *, insecure_demo: bool) -> Credentials:
    """The whole public demo set, printed. Off loopback anyone on the network could use it: refused there unless
    ``--insecure-demo`` says the user means it."""
    from ..errors import ConfigError
    from ..http import is_loopback_host
    from ..server import config as cfg

    if not is_loopback_host(host) and not insecure_demo:
        raise ConfigError(
            f"refusing to serve the public demo credentials on {host}, which the network can reach: configure "
            "credentials (see --help), listen on 127.0.0.1, or pass --insecure-demo"
        )
    creds = cfg.Credentials(
        access_key_id=cfg.DEMO_ACCESS_KEY_ID,
        secret_access_key=cfg.DEMO_SECRET_ACCESS_KEY,
        username=cfg.DEMO_USERNAME,
        password=cfg.DEMO_PASSWORD,
        token=cfg.DEMO_TOKEN,
        demo=True,
    )
    # Printed because they are public anyway and the user needs them; a value the user gave is never echoed.
    print("directfs serve: WARNING: using public demo credentials (not for real data):", file=sys.stderr)
    for env, value in (
        ("DIRECTFS_ACCESS_KEY_ID", cfg.DEMO_ACCESS_KEY_ID),
        ("DIRECTFS_SECRET_ACCESS_KEY", cfg.DEMO_SECRET_ACCESS_KEY),
        ("DIRECTFS_USERNAME", cfg.DEMO_USERNAME),
        ("DIRECTFS_PASSWORD", cfg.DEMO_PASSWORD),
        ("DIRECTFS_TOKEN", cfg.DEMO_TOKEN),
    ):
        print(f"  {env}={value}", file=sys.stderr)
    if not is_loopback_host(host):
        print(f"directfs serve: WARNING: --insecure-demo: anyone who can reach {host} can read DIR", file=sys.stderr)
    return creds


def _parse_listen(text: str) -> tuple[str, int]:
    from ..errors import ConfigError

    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen wants HOST:PORT, got {text!r}")
    return host, int(port)


def build_config(args: argparse.Namespace) -> ServeConfig:
    from ..errors import ConfigError
    from ..server import config as cfg
    from ..server.store import parse_store_url
    from ..units import parse_size

    root = Path(args.dir)
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a directory")
    host, port = _parse_listen(args.listen)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    block_size = parse_size(args.block_size)
    if block_size < 1:
        raise ConfigError("--block-size must be at least 1 byte")
    for name in ("fault_error_rate", "fault_drop_mid_body_rate", "fault_corrupt_blocks_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 1")
    put_faults = args.fault_put_status is not None or args.fault_put_drop
    if put_faults and not args.writable:
        raise ConfigError("--fault-put-status and --fault-put-drop need --writable")
    if args.fault_put_status is not None and args.fault_put_drop:
        raise ConfigError("--fault-put-status and --fault-put-drop exclude each other")
    if args.fault_put_status is not None and not 400 <= args.fault_put_status <= 599:
        raise ConfigError("--fault-put-status must be an error status, 400 to 599")
    if args.fault_put_count < 0:
        raise ConfigError("--fault-put-count must be 0 (every PUT) or more")
    if args.feed_retention is not None and args.feed_retention < 0:
        raise ConfigError("--feed-retention must be 0 (keep every event) or more")
    max_upload = parse_size(args.max_upload_size)
    if max_upload < 1:
        raise ConfigError("--max-upload-size must be at least 1 byte")
    state_dir = (args.state_dir or cfg.default_state_dir(root)).resolve()
    return cfg.ServeConfig(
        root=root.resolve(),
        state_dir=state_dir,
        host=host,
        port=port,
        credentials=_credentials(args, host),
        encoding=cfg.EncodingRules(
            chunking=args.chunking,
            block_size_bytes=block_size,
            compression=cfg.parse_compression(args.compression),
            compression_rules=tuple(cfg.parse_compression_rule(r) for r in args.compression_rule),
            native_globs=tuple(args.native),
            non_direct_globs=tuple(args.non_direct),
        ),
        store=parse_store_url(args.store, args.store_endpoint, args.store_region),
        url_ttl_seconds=args.url_ttl,
        rescan_interval_seconds=max(0.0, args.rescan_interval),
        max_blocks_per_reply=max(0, args.max_blocks_per_reply),
        empty_files=args.empty_files,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        public_url=args.public_url,
        faults=cfg.FaultConfig(
            latency_ms=args.fault_latency_ms,
            error_rate=args.fault_error_rate,
            status=args.fault_status,
            drop_mid_body_rate=args.fault_drop_mid_body_rate,
            corrupt_blocks_rate=args.fault_corrupt_blocks_rate,
            url_ttl_seconds=args.fault_url_ttl,
            targets=frozenset(args.fault_target or ["blocks"]),
            seed=args.fault_seed,
            put_status=args.fault_put_status,
            put_drop=args.fault_put_drop,
            put_count=args.fault_put_count,
            feed_down_file=args.fault_feed_down_file.absolute() if args.fault_feed_down_file else None,
            count_requests=args.count_requests,
        ),
        ingest_workers=args.ingest_workers or max(1, os.cpu_count() or 1),
        failed_auth_delay_seconds=(
            cfg.DEFAULT_FAILED_AUTH_DELAY_SECONDS
            if args.failed_auth_delay is None
            else max(0.0, args.failed_auth_delay)
        ),
        writable=args.writable,
        max_upload_size_bytes=max_upload,
        feed_retention_events=(
            cfg.DEFAULT_FEED_RETENTION_EVENTS if args.feed_retention is None else args.feed_retention
        ),
    )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..server.main import serve

    logging.basicConfig(
        level=getattr(logging, args.log_level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = build_config(args)
    return asyncio.run(serve(config))


if __name__ == "__main__":  # `python -m directfs.commands.serve DIR ...` works without the other commands
    _parser = argparse.ArgumentParser(prog="directfs serve", description=HELP)
    add_arguments(_parser)
    _args = _parser.parse_args()
    try:
        sys.exit(run(_args))
    except OSError as _exc:  # DirectFSError (ConfigError...) and bind errors: one line, no traceback
        print(f"directfs serve: {_exc}", file=sys.stderr)
        sys.exit(1)
