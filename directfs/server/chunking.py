"""Cutting a file into blocks: fixed size, or content-defined (FastCDC) like a deduplicating Portal.

``fixed_spans`` and ``cdc_spans`` return ``(offset, length)`` spans that tile their input exactly, in order; a 0-byte
input has no spans. ``file_blocks`` reads a file's blocks with ``pread``, a bounded window at a time, and never maps
the file: a file that another process truncates while it is mapped kills the reader with SIGBUS at the first page past
the new end, and anyone who can write into DIR could do that to the server (issue 13, next to M7). Read, the same
truncation is a short read, reported as :class:`StaleFileError`.

Content-defined chunking uses the maintained ``fastcdc`` package (Cython; ~2 GB/s here) rather than a hand-written
rolling hash in Python, which would run at a few MB/s and make the 512 MiB benchmark files take minutes to ingest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final

import fastcdc  # type: ignore[import-untyped]

from ..errors import StaleFileError
from .config import CDC_AVERAGE_BYTES, CDC_MAX_BYTES, CDC_MIN_BYTES

# How much of a file content-defined chunking holds at once: four maximum-size chunks (16 MiB), so memory per ingest
# thread is bounded whatever the file size, and the tail carried to the next window (under one maximum chunk) is a
# small part of each window.
CDC_WINDOW_BYTES: Final = 4 * CDC_MAX_BYTES


def fixed_spans(size_bytes: int, block_size_bytes: int) -> list[tuple[int, int]]:
    if block_size_bytes <= 0:
        raise ValueError("block size must be positive")
    return [(off, min(block_size_bytes, size_bytes - off)) for off in range(0, size_bytes, block_size_bytes)]


def cdc_spans(data: memoryview) -> list[tuple[int, int]]:
    """FastCDC spans of ``data`` with min/avg/max ``CDC_*_BYTES``; ``data`` is usually an ``mmap`` of the file."""
    view = memoryview(data)
    if not len(view):
        return []
    spans = [
        (int(c.offset), int(c.length))
        for c in fastcdc.fastcdc(view, min_size=CDC_MIN_BYTES, avg_size=CDC_AVERAGE_BYTES, max_size=CDC_MAX_BYTES)
    ]
    # The library's contract is ours too; a violation would publish a file with holes, so check it every time.
    expected = 0
    for offset, length in spans:
        if offset != expected or length <= 0:
            raise RuntimeError("fastcdc returned spans that do not tile the input")
        expected += length
    if expected != len(view):
        raise RuntimeError("fastcdc returned spans that do not cover the input")
    return spans


def read_exactly(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes of ``fd`` from ``offset`` (``pread``); StaleFileError when the file ends first (it shrank)."""
    parts = []
    got = 0
    while got < length:
        piece = os.pread(fd, length - got, offset + got)
        if not piece:
            raise StaleFileError(f"the file ended at {offset + got} bytes while being read")
        parts.append(piece)
        got += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def file_blocks(fd: int, size_bytes: int, *, block_size_bytes: int | None) -> Iterator[tuple[int, bytes]]:
    """``(offset, bytes)`` of each block of the first ``size_bytes`` of ``fd``, in order: fixed ``block_size_bytes``
    blocks, or content-defined ones when it is None (the same spans ``cdc_spans`` gives for the whole file). A 0-byte
    file has no blocks. StaleFileError when the file turns out shorter than ``size_bytes``."""
    if block_size_bytes is not None:
        for offset, length in fixed_spans(size_bytes, block_size_bytes):
            yield offset, read_exactly(fd, offset, length)
        return
    # A chunk's end depends only on the CDC_MAX_BYTES from its start: every chunk starting at least that far before
    # the window's end is the chunk the whole file would give; the rest is carried into the next window.
    window = b""
    window_offset = 0  # file offset of window[0]
    while window_offset < size_bytes:
        end = window_offset + len(window)
        more = min(CDC_WINDOW_BYTES - len(window), size_bytes - end)
        window += read_exactly(fd, end, more) if more > 0 else b""
        at_eof = window_offset + len(window) == size_bytes
        consumed = 0
        for start, length in cdc_spans(memoryview(window)):
            if not at_eof and start + CDC_MAX_BYTES > len(window):
                break
            yield window_offset + start, window[start : start + length]
            consumed = start + length
        window = window[consumed:]
        window_offset += consumed
