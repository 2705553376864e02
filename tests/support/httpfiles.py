"""A plain HTTP(S) file server for the http(s):// source tests: aiohttp in a thread of its own (own asyncio loop).

* Files are served by aiohttp's ``FileResponse`` (real Range, 206/416, ETag, If-Match, HEAD).
* A folder asked with a trailing ``/`` answers an index page shaped like Apache's ``mod_autoindex``: sort links
  with a query, a parent link, a link to another host, an anchor, every child twice (icon + text); a folder asked
  without the slash answers a 301 to it (as nginx and Apache do).
* TLS with a certificate of a locally generated CA (``trustme``); write ``ca_pem`` to a file for ``--ca-file``.
* Auth: ``tokens`` (accepted Bearer tokens) and/or ``basic`` (user, password); mutable while serving, so a test can
  retire an old token.
* Staging: ``staging[path] = n`` answers the next n GETs of that file with 503 + ``Retry-After: retry_after``.
* ``no_length_on_head``: HEAD without Content-Length (chunked-style servers), to exercise sizes from Content-Range.

Everything mutable is read by the server thread and written by the test thread; each is a single dict/set/attribute
operation (atomic under the GIL), and tests change them only between requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import trustme
from aiohttp import web


@dataclass
class HTTPFiles:
    url: str  # base URL, ends with "/"
    root: Path
    ca: trustme.CA | None = None
    tokens: set[str] = field(default_factory=set)
    basic: tuple[str, str] | None = None
    staging: dict[str, int] = field(default_factory=dict)
    retry_after: int = 1
    no_length_on_head: bool = False
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Authorization scheme)

    @property
    def ca_pem(self) -> bytes:
        assert self.ca is not None
        return self.ca.cert_pem.bytes()

    def _authorized(self, header: str) -> bool:
        if not self.tokens and self.basic is None:
            return True
        if header.startswith("Bearer ") and header[7:] in self.tokens:
            return True
        if header.startswith("Basic ") and self.basic is not None:
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                return False
            return (user, password) == self.basic
        return False

    def _index(self, folder: Path) -> str:
        rows = [
            '<a href="?C=N;O=D">Name</a> <a href="?C=M;O=A">Last modified</a>',
            '<a href="../">Parent Directory</a>',
            '<a href="http://elsewhere.invalid/x">elsewhere</a> <a href="#top">top</a>',
        ]
        for child in sorted(folder.iterdir()):
            href = quote(child.name) + ("/" if child.is_dir() else "")
            rows.append(f'<a href="{html.escape(href)}"><img src="/icons/x.gif"></a>')
            rows.append(f'<a href="{html.escape(href)}">{html.escape(child.name)}</a>')
        return "<html><body><h1>Index</h1>\n" + "<br>\n".join(rows) + "\n</body></html>\n"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        self.requests.append((request.method, request.path, header.partition(" ")[0]))
        if not self._authorized(header):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="files"'})
        target = (self.root / request.path.lstrip("/")).resolve()
        if not target.is_relative_to(self.root.resolve()) or not target.exists():
            return web.Response(status=404)
        if target.is_dir():
            if not request.path.endswith("/"):
                return web.Response(status=301, headers={"Location": quote(request.path) + "/"})
            return web.Response(text=self._index(target), content_type="text/html")
        if request.path.endswith("/"):
            return web.Response(status=404)  # "file/" is not a folder (nginx and Apache answer 404 too)
        rel = target.relative_to(self.root.resolve()).as_posix()
        if request.method == "GET" and self.staging.get(rel, 0) > 0:
            self.staging[rel] -= 1
            return web.Response(status=503, headers={"Retry-After": str(self.retry_after)}, text="staging\n")
        if request.method == "HEAD" and self.no_length_on_head:
            st = target.stat()
            return web.Response(status=200, headers={"ETag": f'"{st.st_mtime_ns:x}-{st.st_size:x}"'})
        return web.FileResponse(target)


@contextlib.contextmanager
def serve_files(root: Path, *, tls: bool = False, **settings: object) -> Iterator[HTTPFiles]:
    """Serve ``root`` on 127.0.0.1 (a free port) until the block ends."""
    ca = trustme.CA() if tls else None
    context: ssl.SSLContext | None = None
    if ca is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    state = HTTPFiles(url="", root=root, ca=ca, **settings)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None
    failure: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", state.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        state.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/"
        ready.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # reported to the test thread
            failure.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="httpfiles", daemon=True)
    thread.start()
    ready.wait(30)
    if failure:
        raise RuntimeError("the HTTP file server did not start") from failure[0]
    try:
        yield state
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
