"""directfs.http: client construction, URL redaction, Retry-After parsing and the retry helper (trio time only)."""

from __future__ import annotations

import dataclasses
import logging
import random
import ssl
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import trio

from directfs import errors, http
from directfs.http import (
    HTTPSettings,
    RetryBudgetExceeded,
    RetryPolicy,
    build_client,
    is_loopback_host,
    parse_retry_after,
    redact_url,
    send_with_retries,
)


def test_httpcore_read_size_attribute_still_exists() -> None:
    # Private httpcore API (docs/testbed.md §5): if an upgrade renames it, this must fail loudly.
    from httpcore._async.http11 import AsyncHTTP11Connection

    assert isinstance(AsyncHTTP11Connection.READ_NUM_BYTES, int)
    build_client(HTTPSettings())
    assert AsyncHTTP11Connection.READ_NUM_BYTES == http.READ_NUM_BYTES == 1 << 20


async def test_build_client_settings() -> None:
    settings = HTTPSettings(connect_timeout_seconds=1.5, read_timeout_seconds=2.5, max_connections=3)
    async with build_client(settings) as client:
        assert client.timeout.connect == 1.5
        assert client.timeout.read == 2.5
        assert client.trust_env is False
        assert client.follow_redirects is False
        pool = client._transport._pool  # type: ignore[attr-defined]
        assert pool._max_connections == 3
        assert pool._http2 is False


def test_ssl_context_verification_switch() -> None:
    assert http.ssl_context(HTTPSettings()).verify_mode == ssl.CERT_REQUIRED
    off = http.ssl_context(HTTPSettings(verify_tls=False))
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname


def test_ssl_context_ca_file() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    with ca.cert_pem.tempfile() as path:
        context = http.ssl_context(HTTPSettings(ca_file=path))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert any(c.get("subject") for c in context.get_ca_certs())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://u:p@h.example:8443/a/b?X-Amz-Signature=s#frag", "https://h.example:8443/a/b"),
        ("http://127.0.0.1/blocks/1?sig=abc", "http://127.0.0.1/blocks/1"),
        ("https://bucket.s3.amazonaws.com/blocks/x", "https://bucket.s3.amazonaws.com/blocks/x"),
        ("https://h.example/a#frag?not-a-query", "https://h.example/a"),
        ("https://u:p@h.example/a", "https://h.example/a"),  # userinfo: the full parse
        ("https://h.example/a?sig=x@y", "https://h.example/a"),
        ("https://[::1]:9000/b?X-Amz-Credential=k", "https://[::1]:9000/b"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert redact_url(httpx.URL(url)) == expected


def test_redact_url_unparseable() -> None:
    assert redact_url("http://[::1") == "<unparseable URL>"


def test_is_loopback_host() -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("[::1]")
    assert is_loopback_host("localhost")
    assert not is_loopback_host("portal.example.com") and not is_loopback_host("10.0.0.1")


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0


def test_backoff_full_jitter_bounds() -> None:
    policy = RetryPolicy(base_delay_seconds=1.0, max_delay_seconds=5.0)
    rng = random.Random(1)
    for retry in range(1, 8):
        ceiling = min(5.0, 2 ** (retry - 1))
        samples = [policy.backoff_seconds(retry, rng) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # full jitter: spread up to the ceiling, not a constant


def test_default_budget_keeps_a_block_read_under_25_seconds() -> None:
    # docs/design-notes.md §5: the kernel retries a failed READ once, so this bounds a user's wait at ~50 s.
    assert RetryPolicy().total_budget_seconds <= 25


class Script:
    """A MockTransport handler answering from a list: an int status, (status, headers) or an exception."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.times: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(trio.current_time())
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if answer == "hang":
            await trio.sleep_forever()
        if isinstance(answer, tuple):
            return httpx.Response(answer[0], headers=answer[1], request=request)
        assert isinstance(answer, int)
        return httpx.Response(answer, request=request)


async def call(script: Script, policy: RetryPolicy) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as client:
        return await send_with_retries(
            lambda: client.get("http://store.test/x?sig=secret"), policy=policy, what="GET http://store.test/x"
        )


async def test_retries_5xx_then_succeeds(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(503, 502, 200)
    response = await call(script, RetryPolicy(max_attempts=4))
    assert response.status_code == 200
    assert len(script.times) == 3


async def test_gives_up_after_max_attempts_and_returns_last_reply(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(500)
    response = await call(script, RetryPolicy(max_attempts=3))
    assert response.status_code == 500
    assert len(script.times) == 3


async def test_statistics_count_attempts_retries_and_give_ups(autojump_clock: trio.testing.MockClock) -> None:
    before = dataclasses.replace(http.STATISTICS)
    await call(Script(503, 502, 200), RetryPolicy(max_attempts=4))  # 3 attempts, 2 retries, success
    await call(Script(500), RetryPolicy(max_attempts=2))  # 2 attempts, 1 retry, gave up
    assert http.STATISTICS.attempts - before.attempts == 5
    assert http.STATISTICS.retries - before.retries == 3
    assert http.STATISTICS.gave_up - before.gave_up == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_errors_are_not_retried(autojump_clock: trio.testing.MockClock, status: int) -> None:
    script = Script(status)
    assert (await call(script, RetryPolicy(max_attempts=5))).status_code == status
    assert len(script.times) == 1


async def test_retry_after_seconds_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    script = Script((429, {"Retry-After": "3"}), (503, {"Retry-After": "2"}), 200)
    policy = RetryPolicy(max_attempts=5, base_delay_seconds=0.01, max_delay_seconds=0.01, total_budget_seconds=20)
    assert (await call(script, policy)).status_code == 200
    assert script.times[1] - script.times[0] == pytest.approx(3.0)
    assert script.times[2] - script.times[1] == pytest.approx(2.0)


async def test_retry_after_http_date_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    # trio's virtual clock and the wall clock differ; a date ~4 s ahead must give a ~4 s wait.
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
    script = Script((503, {"Retry-After": when}), 200)
    policy = RetryPolicy(max_attempts=3, base_delay_seconds=0.0, total_budget_seconds=20)
    assert (await call(script, policy)).status_code == 200
    assert 3.0 <= script.times[1] - script.times[0] <= 5.0


async def test_retry_after_past_the_budget_gives_up_at_once(autojump_clock: trio.testing.MockClock) -> None:
    script = Script((503, {"Retry-After": "3600"}), 200)
    start = trio.current_time()
    response = await call(script, RetryPolicy(max_attempts=5, total_budget_seconds=20))
    assert response.status_code == 503
    assert len(script.times) == 1
    assert trio.current_time() - start < 1


async def test_connection_errors_are_retried_then_raised(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(httpx.ConnectError("refused"))
    with pytest.raises(httpx.ConnectError):
        await call(script, RetryPolicy(max_attempts=3))
    assert len(script.times) == 3


async def test_connection_error_then_success(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("eof"), 200)
    assert (await call(script, RetryPolicy(max_attempts=3))).status_code == 200


async def test_non_transient_transport_error_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(httpx.UnsupportedProtocol("ftp"))
    with pytest.raises(httpx.UnsupportedProtocol):
        await call(script, RetryPolicy(max_attempts=3))
    assert len(script.times) == 1


async def test_total_budget_is_a_hard_deadline(autojump_clock: trio.testing.MockClock) -> None:
    script = Script("hang")
    start = trio.current_time()
    with pytest.raises(RetryBudgetExceeded) as info:
        await call(script, RetryPolicy(max_attempts=5, total_budget_seconds=7))
    assert trio.current_time() - start == pytest.approx(7.0)
    assert isinstance(info.value, httpx.TimeoutException)
    assert "secret" not in str(info.value)


async def test_backoff_grows_between_attempts(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(503)
    policy = RetryPolicy(max_attempts=4, base_delay_seconds=1.0, max_delay_seconds=100, total_budget_seconds=100)
    async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as client:
        await send_with_retries(lambda: client.get("http://s.test/"), policy=policy, what="t", rng=random.Random(3))
    gaps = [b - a for a, b in zip(script.times, script.times[1:], strict=False)]
    rng = random.Random(3)
    assert gaps == pytest.approx([policy.backoff_seconds(n, rng) for n in (1, 2, 3)])


async def test_httpx_request_logs_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with build_client(HTTPSettings(), transport=httpx.MockTransport(lambda r: httpx.Response(200))) as client:
        await client.get("http://store.test/blocks/1?X-Amz-Signature=TOPSECRET")
    assert "store.test/blocks/1" in caplog.text
    assert "TOPSECRET" not in caplog.text


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("namespace", ("NamespaceTimeout", "NamespaceConnectionError", "NamespaceError")),
        ("block list", ("BlockListTimeout", "BlockListConnectionError", "InvalidRequest")),
        ("block", ("DownloadTimeout", "DownloadConnectionError", "DownloadError")),
    ],
)
def test_one_table_maps_transport_failures(subject: http.Subject, expected: tuple[str, str, str]) -> None:
    info = errors.BlockInfo("7", 1, 0, 10)
    failures: list[httpx.HTTPError] = [
        http.RetryBudgetExceeded("budget"),
        httpx.ConnectError("refused"),
        httpx.DecodingError("bad gzip"),
    ]
    for failure, name in zip(failures, expected, strict=True):
        error = http.transport_error(failure, subject=subject, what="GET https://h/x", filename="f", block=info)
        assert type(error).__name__ == name
        assert str(error).startswith("[Errno") and "GET https://h/x" in str(error)
    assert isinstance(http.transport_error(failures[0], subject=subject, what="w"), TimeoutError)
    assert isinstance(http.transport_error(failures[1], subject=subject, what="w"), ConnectionError)


def test_untrusted_certificate_message_names_the_fix() -> None:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "unable to get local issuer certificate"
    failure = httpx.ConnectError("tls")
    failure.__cause__ = cause
    error = http.transport_error(failure, subject="namespace", what="PROPFIND https://h/")
    assert "not trusted" in str(error) and "certificate verification failed" in str(error) and "--ca-file" in str(error)


class _FailsMidBody(httpx.AsyncBaseTransport):
    """Takes the first piece of the request body, then fails as a dropped connection does mid-send."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        async for _ in request.stream:  # type: ignore[union-attr]
            raise httpx.WriteError("connection lost while sending the body")
        raise AssertionError("the body had no piece")


async def test_a_request_body_cut_off_mid_send_leaves_no_async_generator() -> None:
    """The flake of test_portal_down_during_listing: httpx's ``ByteStream.__aiter__`` is an async generator; a
    send that fails after its first piece left it suspended, and trio's GC hook warned (ResourceWarning, an error
    under our filters) whenever the collector got to it. ``open_stream`` sends bodies without one."""
    import gc
    import warnings

    async with build_client(HTTPSettings(), transport=_FailsMidBody()) as client:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                with pytest.raises(httpx.WriteError):
                    async with http.open_stream(client, "PROPFIND", "http://portal.test/x", content=b"<propfind/>"):
                        pass
            gc.collect()
            await trio.lowlevel.checkpoint()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


async def test_open_stream_sends_the_body_with_its_length() -> None:
    seen: list[httpx.Request] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        await request.aread()
        seen.append(request)
        return httpx.Response(207, content=b"ok")

    async with (
        build_client(HTTPSettings(), transport=httpx.MockTransport(answer)) as client,
        http.open_stream(client, "PROPFIND", "http://portal.test/x", content=b"<propfind/>") as reply,
    ):
        assert reply.status_code == 207
    assert seen[0].content == b"<propfind/>" and seen[0].headers["content-length"] == "11"
    assert seen[0].headers["accept-encoding"] == "identity"


def test_only_the_network_edge_opens_streams() -> None:
    """Every request of the package goes through http.open_stream (one body sender, one reader)."""
    import pathlib
    import re

    package = pathlib.Path(http.__file__).parent
    pattern = re.compile(r"\.stream\(\s*\"(GET|PUT|POST|HEAD|PROPFIND|DELETE)\"|\.(aiter_bytes|aiter_raw)\(")
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "http.py" and "server" not in path.parts and pattern.search(path.read_text())
    ]
    assert offenders == []
