"""CPU per GET of an object body, by HTTP engine: what picked the block plane's engine (``directfs/transfer.py``).

``python -m benchmarks.http_engines``: an aiohttp server in a child process (TCP_NODELAY, as aiohttp sets it) serves
256 KiB, 512 KiB, 1 MiB and 4 MiB bodies on 127.0.0.1; this process GETs them over one kept-alive connection per
thread and reports the CPU time of *this* process per GET (all threads, ``time.process_time``) and the wall MB/s,
median of ``--runs`` runs of about ``--mib`` MiB each. Engines:

* ``httpx-trio``      ``httpx.AsyncClient`` from ``directfs.http.build_client`` under trio, ``stream`` + ``aiter_raw``
                      (what ``directfs/sources/ctera/client.py`` does);
* ``urllib3``         ``urllib3.PoolManager`` in a worker thread, ``preload_content=False`` + ``read()``;
* ``pycurl``          ``directfs.transfer.BlockingGetter`` in a worker thread (one reused libcurl handle);
* ``pycurl-x2``       the same, 2 threads in parallel (CPU is per GET, MB/s is both together); any thread engine
                      takes ``-x2``;
* ``pycurl-buf<N>k``  BlockingGetter with CURLOPT_BUFFERSIZE N KiB instead of its 64 KiB (N = 16 (curl's default), 32,
                      128, 256, 512, 1024);
* ``curl-extend``, ``curl-pyappend``, ``curl-prealloc``: bare pycurl (64 KiB buffer, no header parsing) whose write
                      callback is ``bytearray.extend`` (as BlockingGetter's), a Python ``body += data``, or a Python
                      copy into a bytearray preallocated from Content-Length;
* ``ctypes-curl``     libcurl through ctypes writing into an ``open_memstream`` FILE with its default C writer: no
                      Python code during the transfer, one GIL hand-back per GET (a sketch, not used by directfs).

``--contention`` also runs a pure-Python loop in the main thread (the trio thread's stand-in) while one worker thread
fetches 512 KiB bodies, busy all the time or half of it (1 ms of work, 1 ms asleep), and reports the fetch MB/s
meanwhile and how much of its solo work the loop kept. Every piece libcurl hands to a Python callback needs the GIL,
and a thread waiting for the GIL gets it only when the holder sleeps or after the switch interval (5 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

KiB = 1024
MiB = 1024 * KiB
SIZES = (256 * KiB, 512 * KiB, 1 * MiB, 4 * MiB)
Fetch = Callable[[str, int], None]  # (url, expected size) -> None; checks the length


# --- server (child process) ---


def serve() -> None:
    from aiohttp import web

    rng = random.Random(1)
    bodies = {size: rng.randbytes(size) for size in SIZES}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=bodies[int(request.match_info["size"])], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/blocks/{size}", handler)

    import asyncio

    async def run_server() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(run_server())


# --- engines ---


def pycurl_getter(buffer_size: int | None = None) -> tuple[Fetch, Callable[[], None]]:
    import pycurl  # type: ignore[import-untyped]

    from directfs.http import HTTPSettings
    from directfs.transfer import BlockingGetter

    getter = BlockingGetter(HTTPSettings())
    if buffer_size is not None:  # a variant for measuring: handles are made on first use, from these options
        getter._options.append((pycurl.BUFFERSIZE, buffer_size))

    def fetch(url: str, size: int) -> None:
        reply = getter.get(url, limit_bytes=size + 4096, timeout_seconds=30)
        assert reply.status_code == 200 and len(reply.body) == size, (reply.status_code, len(reply.body))

    return fetch, getter.close


def urllib3_engine() -> tuple[Fetch, Callable[[], None]]:
    import urllib3

    pool = urllib3.PoolManager(maxsize=4, retries=False)
    headers = {"Accept-Encoding": "identity"}

    def fetch(url: str, size: int) -> None:
        response = pool.request("GET", url, preload_content=False, decode_content=False, headers=headers)
        body = bytearray(response.read(decode_content=False))
        response.release_conn()
        assert response.status == 200 and len(body) == size

    return fetch, pool.clear


def _bare_curl(writer: str, buffer_size: int | None = None) -> tuple[Fetch, Callable[[], None]]:
    import pycurl

    local = threading.local()
    handles: list[Any] = []

    def handle() -> Any:
        curl = getattr(local, "curl", None)
        if curl is None:
            curl = local.curl = pycurl.Curl()
            curl.setopt(pycurl.NOSIGNAL, 1)
            curl.setopt(pycurl.HTTPHEADER, ["Accept-Encoding: identity"])
            if buffer_size:
                curl.setopt(pycurl.BUFFERSIZE, buffer_size)
            handles.append(curl)
        return curl

    def fetch(url: str, size: int) -> None:
        curl = handle()
        curl.setopt(pycurl.URL, url)
        if writer == "extend":
            body = bytearray()
            curl.setopt(pycurl.WRITEFUNCTION, body.extend)
            curl.setopt(pycurl.HEADERFUNCTION, lambda line: None)
            curl.perform()
            n = len(body)
        elif writer == "pyappend":
            state = [bytearray()]

            def append(data: bytes) -> None:
                state[0] += data

            curl.setopt(pycurl.WRITEFUNCTION, append)
            curl.setopt(pycurl.HEADERFUNCTION, lambda line: None)
            curl.perform()
            n = len(state[0])
        else:  # prealloc: size the buffer from Content-Length, copy each piece into place
            target = _Preallocated()
            curl.setopt(pycurl.HEADERFUNCTION, target.header)
            curl.setopt(pycurl.WRITEFUNCTION, target.write)
            curl.perform()
            n = target.pos
            target.view.release()
        assert curl.getinfo(pycurl.RESPONSE_CODE) == 200 and n == size, n

    def close() -> None:
        for curl in handles:
            curl.close()

    return fetch, close


def ctypes_curl() -> tuple[Fetch, Callable[[], None]]:
    """libcurl called through ctypes, the body written by libcurl's default writer (C ``fwrite``) into an
    ``open_memstream`` FILE: no Python code runs during the transfer, and the GIL is released once per GET (the
    ``perform`` call, a ``CDLL`` function; every other call is a ``PyDLL`` function that keeps the GIL). A sketch of
    what a GIL-free engine would cost, happy path only: not used by directfs."""
    import ctypes
    import glob

    import pycurl

    libs = os.path.join(os.path.dirname(os.path.dirname(pycurl.__file__)), "pycurl.libs")
    path = sorted(glob.glob(os.path.join(libs, "libcurl-*.so*")))[0]
    held = ctypes.PyDLL(path)  # keeps the GIL: for the cheap calls
    released = ctypes.CDLL(path)  # releases the GIL: for curl_easy_perform
    libc = ctypes.PyDLL(None)
    init = held["curl_easy_init"]
    init.restype = ctypes.c_void_p
    setopt_long = held["curl_easy_setopt"]
    setopt_long.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    setopt_ptr = held["curl_easy_setopt"]
    setopt_ptr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    setopt_str = held["curl_easy_setopt"]
    setopt_str.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    setopt_off = held["curl_easy_setopt"]
    setopt_off.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    getinfo_long = held["curl_easy_getinfo"]
    getinfo_long.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_long)]
    perform = released["curl_easy_perform"]
    perform.argtypes = [ctypes.c_void_p]
    cleanup = held["curl_easy_cleanup"]
    cleanup.argtypes = [ctypes.c_void_p]
    slist_append = held["curl_slist_append"]
    slist_append.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    slist_append.restype = ctypes.c_void_p
    open_memstream = libc["open_memstream"]
    open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    open_memstream.restype = ctypes.c_void_p
    fclose = libc["fclose"]
    fclose.argtypes = [ctypes.c_void_p]
    free = libc["free"]
    free.argtypes = [ctypes.c_void_p]
    headers = slist_append(None, b"Accept-Encoding: identity")
    local = threading.local()
    handles: list[int] = []

    def handle() -> int:
        curl: int | None = getattr(local, "curl", None)
        if curl is None:
            curl = local.curl = init()
            setopt_long(curl, pycurl.NOSIGNAL, 1)
            setopt_long(curl, pycurl.BUFFERSIZE, 64 * KiB)
            setopt_ptr(curl, pycurl.HTTPHEADER, headers)
            handles.append(curl)
        assert curl is not None
        return curl

    def fetch(url: str, size: int) -> None:
        curl = handle()
        body_ptr, body_len = ctypes.c_void_p(), ctypes.c_size_t()
        head_ptr, head_len = ctypes.c_void_p(), ctypes.c_size_t()
        body_file = open_memstream(ctypes.byref(body_ptr), ctypes.byref(body_len))
        head_file = open_memstream(ctypes.byref(head_ptr), ctypes.byref(head_len))
        setopt_str(curl, pycurl.URL, url.encode())
        setopt_long(curl, pycurl.TIMEOUT_MS, 30_000)
        setopt_off(curl, pycurl.MAXFILESIZE_LARGE, size + 4096)
        setopt_ptr(curl, pycurl.WRITEDATA, body_file)
        setopt_ptr(curl, pycurl.WRITEHEADER, head_file)
        code = perform(curl)
        fclose(body_file)
        fclose(head_file)
        status = ctypes.c_long()
        getinfo_long(curl, pycurl.RESPONSE_CODE, ctypes.byref(status))
        body = bytearray(body_len.value)
        ctypes.memmove((ctypes.c_char * len(body)).from_buffer(body), body_ptr, len(body))
        head = ctypes.string_at(head_ptr, head_len.value)
        free(body_ptr)
        free(head_ptr)
        assert code == 0 and status.value == 200 and len(body) == size and head.startswith(b"HTTP/1.1 200"), code

    def close() -> None:
        for curl in handles:
            cleanup(curl)

    return fetch, close


class _Preallocated:
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.view = memoryview(self.buffer)
        self.pos = 0

    def header(self, line: bytes) -> None:
        if line[:15].lower() == b"content-length:":
            self.view.release()
            self.buffer = bytearray(int(line[15:]))
            self.view = memoryview(self.buffer)

    def write(self, data: bytes) -> None:
        pos = self.pos
        end = pos + len(data)
        self.view[pos:end] = data
        self.pos = end


THREAD_ENGINES: dict[str, Callable[[], tuple[Fetch, Callable[[], None]]]] = {
    "urllib3": urllib3_engine,
    "pycurl": pycurl_getter,
    **{f"pycurl-buf{k}k": functools.partial(pycurl_getter, k * KiB) for k in (16, 32, 128, 256, 512, 1024)},
    "curl-extend": lambda: _bare_curl("extend", 64 * KiB),
    "curl-pyappend": lambda: _bare_curl("pyappend", 64 * KiB),
    "curl-prealloc": lambda: _bare_curl("prealloc", 64 * KiB),
    "ctypes-curl": ctypes_curl,
}


def run_threads(engine: str, url: str, size: int, count: int, threads: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``count`` GETs per thread, after a warm-up GET per thread."""
    fetch, close = THREAD_ENGINES[engine]()
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            fetch(url, size)  # connect + warm up
            barrier.wait()
            for _ in range(count):
                fetch(url, size)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    cpu, wall = time.process_time(), time.perf_counter()
    for thread in workers:
        thread.join()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    close()
    if errors:
        raise errors[0]
    return cpu, wall


def run_httpx(url: str, size: int, count: int) -> tuple[float, float]:
    import trio

    from directfs.http import HTTPSettings, build_client

    async def main() -> tuple[float, float]:
        async with build_client(HTTPSettings(), headers={"Accept-Encoding": "identity"}) as client:

            async def fetch() -> None:
                async with client.stream("GET", url) as response:
                    body = bytearray()
                    async for piece in response.aiter_raw():
                        body += piece
                assert response.status_code == 200 and len(body) == size

            await fetch()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(count):
                await fetch()
            return time.process_time() - cpu, time.perf_counter() - wall

    return trio.run(main)


def spin(stop: threading.Event, busy: float) -> int:
    """The trio thread's stand-in: pure-Python work, ``busy`` of the time (in 1 ms slices, sleeping in between as
    trio does in epoll); returns the work done until ``stop``."""
    n = 0
    idle = 0.001 * (1 - busy) / busy
    while not stop.is_set():
        until = time.perf_counter() + 0.001
        while time.perf_counter() < until:
            for _ in range(100):
                n += 1
        if idle:
            time.sleep(idle)
    return n


def contention(engine: str, url: str, size: int, seconds: float, busy: float) -> tuple[float, float]:
    """(share of its solo work the loop kept, fetch MB/s) with one fetching thread beside the loop."""
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    solo = spin(stop, busy)
    fetch, close = THREAD_ENGINES[engine]()
    fetch(url, size)
    stop = threading.Event()
    fetched = [0]

    def worker() -> None:
        while not stop.is_set():
            fetch(url, size)
            fetched[0] += size

    thread = threading.Thread(target=worker)
    start = time.perf_counter()
    thread.start()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    work = spin(stop, busy)
    thread.join()
    wall = time.perf_counter() - start
    close()
    return work / solo, fetched[0] / wall / 1e6


def measure(engine: str, url: str, size: int, count: int) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, GETs) of one run of ``engine``."""
    if engine == "httpx-trio":
        return (*run_httpx(url, size, count), count)
    if engine.endswith("-x2"):
        return (*run_threads(engine[:-3], url, size, count // 2, 2), count // 2 * 2)
    return (*run_threads(engine, url, size, count, 1), count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mib", type=int, default=128, help="MiB fetched per run and engine (default 128)")
    parser.add_argument("--runs", type=int, default=3)
    default_engines = "httpx-trio,urllib3,pycurl,pycurl-x2,pycurl-buf16k,pycurl-buf1024k"
    default_engines += ",curl-extend,curl-pyappend,curl-prealloc,ctypes-curl"
    parser.add_argument("--engines", default=default_engines)
    parser.add_argument("--contention", action="store_true", help="also measure GIL contention with a Python loop")
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.http_engines", "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        engines = args.engines.split(",")
        print(
            f"client CPU ms per GET / wall MB/s, median of {args.runs} runs of ~{args.mib} MiB; {os.cpu_count()} CPUs"
        )
        print(f"{'engine':<16}" + "".join(f"{size // KiB:>10} KiB   " for size in SIZES))
        # Round robin (run 1 of every engine, then run 2, ...): load from elsewhere on the box spreads over all.
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for _ in range(args.runs):
            for size in SIZES:
                url = f"http://127.0.0.1:{port}/blocks/{size}?X-Amz-Signature=not-a-secret"
                count = max(16, args.mib * MiB // size)
                for engine in engines:
                    cpu, wall, gets = measure(engine, url, size, count)
                    results.setdefault((engine, size), []).append((cpu / gets * 1e3, gets * size / wall / 1e6))
        for engine in engines:
            cells = []
            for size in SIZES:
                ms = statistics.median(r[0] for r in results[engine, size])
                mbps = statistics.median(r[1] for r in results[engine, size])
                cells.append(f"{ms:6.2f} / {mbps:5.0f}")
            print(f"{engine:<16}" + "".join(f"{cell:>16}" for cell in cells), flush=True)
        if args.contention:
            print("\nGIL contention: one thread fetching 512 KiB bodies beside a Python loop in the main thread")
            print("busy 100%: the loop never sleeps; 50%: 1 ms of work, 1 ms asleep (median of --runs runs of 2 s)")
            print(f"{'engine':<16}{'busy':>6}{'fetch MB/s':>12}{'loop kept':>11}")
            url = f"http://127.0.0.1:{port}/blocks/{512 * KiB}"
            for engine in (e for e in engines if e in THREAD_ENGINES):
                for busy in (1.0, 0.5):
                    runs = [contention(engine, url, 512 * KiB, 2.0, busy) for _ in range(args.runs)]
                    kept = statistics.median(r[0] for r in runs)
                    mbps = statistics.median(r[1] for r in runs)
                    print(f"{engine:<16}{busy:>6.0%}{mbps:>12.0f}{kept:>11.0%}", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
