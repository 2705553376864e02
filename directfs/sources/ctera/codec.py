"""Block and key codec of the CTERA Direct IO protocol: pure, synchronous, no I/O, no logging of data.

Decoding follows ``docs/ctera-direct-io.md`` §3 and §4 exactly, with the checks the existing clients skip
(``docs/ctera-direct-io.md`` §11):

* key unwrap: base64 secret, zero-padded or truncated to 32 bytes, AES-256-ECB, *checked* PKCS#7, a JSON string
  literal holding base64, base64 -> the file key. Any failure is ``DecryptKeyError``.
* block: [16-byte MD5 prefix on Azure] [1 header byte] [16-byte IV] [AES-CBC ciphertext, *checked* PKCS#7], then the
  compression named by the metadata, with magic sniffing as cterasdk does (gzip ``1f 8b``, the xerial snappy-java
  stream ``\\x82SNAPPY\\0``, otherwise one raw snappy block), then the length check against the chunk ``len``.
* native (Fusion Direct) objects are the plaintext bytes; an unencrypted but compressed object is sniffed at offset 0
  and, since it is unknown whether the header byte is kept there, at offset 1.

Every decompressor is bounded by the expected length before it allocates, so a hostile block (a "bomb") cannot
exhaust memory: snappy declares its output length up front and is checked before decoding; gzip is inflated with
``max_length``.

These functions release the GIL in their heavy parts (OpenSSL, cramjam, zlib); callers run them in worker threads
above a size threshold (see ``directfs.workers``).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import os
import struct
import zlib
from enum import StrEnum
from typing import Final

import cramjam
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ...errors import BlockValidationError, DecompressBlockError, DecryptBlockError, DecryptKeyError

AES_BLOCK_BYTES: Final = 16
IV_BYTES: Final = 16
HEADER_BYTES: Final = 1  # meaning unknown (docs/ctera-direct-io.md §4.1); skipped, never validated
AZURE_MD5_BYTES: Final = 16
WRAPPING_KEY_BYTES: Final = 32

GZIP_MAGIC: Final = b"\x1f\x8b"
XERIAL_MAGIC: Final = b"\x82SNAPPY\x00"
XERIAL_HEADER_BYTES: Final = 16  # magic (8) + version (4, BE) + minimum compatible version (4, BE)
# snappy-java's SnappyOutputStream default block size; any size decodes, this one matches what Java writers emit.
XERIAL_CHUNK_BYTES: Final = 32 * 1024
# What our encoder writes into the unknown header byte. cterasdk and Cyberduck skip it; 1 reads as "format 1".
ENCODER_HEADER_BYTE: Final = 1


class Compression(StrEnum):
    """Block compression as the Portal's ``compression_type`` names it, plus the encoder-only raw snappy variant."""

    SNAPPY = "SNAPPY"  # decode: sniff gzip / xerial / raw snappy. encode: xerial snappy-java stream
    SNAPPY_RAW = "SNAPPY_RAW"  # encode only: one raw snappy block (decoded by the same sniffing)
    GZIP = "GZIP"  # decode: sniff as for SNAPPY. encode: one gzip member
    NONE = "NONE"  # plaintext as-is

    @classmethod
    def parse(cls, value: object) -> Compression:
        """Map a Portal ``compression_type`` to a decoding rule. Missing/unknown types are sniffed (cterasdk HEAD
        ignores the field entirely and always sniffs), except ``NONE`` which is taken at its word (PR #369)."""
        if isinstance(value, str) and value.strip().upper() == "NONE":
            return cls.NONE
        if isinstance(value, str) and value.strip().upper() == "GZIP":
            return cls.GZIP
        return cls.SNAPPY


# --- keys ------------------------------------------------------------------------------------------------------


def _wrapping_key(secret_access_key: str) -> bytes:
    try:
        decoded = base64.b64decode(secret_access_key.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecryptKeyError("the secret access key is not valid base64") from exc
    return decoded[:WRAPPING_KEY_BYTES].ljust(WRAPPING_KEY_BYTES, b"\x00")


def _pkcs7_unpad(data: bytes) -> memoryview | None:
    """Strip checked PKCS#7 padding (a view, no copy); None when the padding is not valid."""
    if not data or len(data) % AES_BLOCK_BYTES:
        return None
    pad = data[-1]
    if not 1 <= pad <= AES_BLOCK_BYTES or data[-pad:] != bytes([pad]) * pad:
        return None
    return memoryview(data)[:-pad]


def _pkcs7_pad(data: bytes) -> bytes:
    pad = AES_BLOCK_BYTES - len(data) % AES_BLOCK_BYTES
    return data + bytes([pad]) * pad


def unwrap_file_key(wrapped_key: str, secret_access_key: str) -> bytes:
    """Recover a file's AES key from the Portal's ``encrypt_info.wrapped_key`` (docs/ctera-direct-io.md §3)."""
    kwrap = _wrapping_key(secret_access_key)
    try:
        ciphertext = base64.b64decode(wrapped_key, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise DecryptKeyError("the wrapped key is not valid base64") from exc
    if not ciphertext or len(ciphertext) % AES_BLOCK_BYTES:
        raise DecryptKeyError("the wrapped key has an invalid length")
    decryptor = Cipher(algorithms.AES(kwrap), modes.ECB()).decryptor()  # noqa: S305 - ECB is the protocol's wrap
    plain = _pkcs7_unpad(decryptor.update(ciphertext) + decryptor.finalize())
    if plain is None:
        raise DecryptKeyError()
    try:
        literal = json.loads(bytes(plain).decode("utf-8"))
        if not isinstance(literal, str):
            raise DecryptKeyError()
        key = base64.b64decode(literal, validate=True)
    except (UnicodeDecodeError, json.JSONDecodeError, binascii.Error, ValueError, RecursionError) as exc:
        raise DecryptKeyError() from exc  # RecursionError: a deeply nested JSON plaintext
    if len(key) not in (16, 24, 32):
        raise DecryptKeyError("the unwrapped file key has an invalid length")
    return key


def wrap_file_key(file_key: bytes, secret_access_key: str) -> str:
    """Inverse of :func:`unwrap_file_key`: what a Portal puts in ``encrypt_info.wrapped_key``."""
    literal = json.dumps(base64.b64encode(file_key).decode("ascii")).encode("utf-8")
    encryptor = Cipher(algorithms.AES(_wrapping_key(secret_access_key)), modes.ECB()).encryptor()  # noqa: S305
    return base64.b64encode(encryptor.update(_pkcs7_pad(literal)) + encryptor.finalize()).decode("ascii")


def new_file_key() -> bytes:
    """A fresh random AES-256 file key."""
    return os.urandom(32)


# --- blocks: decode --------------------------------------------------------------------------------------------


def decode_block(
    obj: bytes | bytearray | memoryview,
    *,
    key: bytes | None,
    compression: Compression,
    expected_length: int,
    azure_md5_prefix: bool = False,
) -> bytes | bytearray:
    """Turn one stored object into exactly ``expected_length`` plaintext bytes, or raise a ``BlockError``.

    ``key`` is the unwrapped file key, or None for unencrypted (native) objects.
    """
    if expected_length < 0:
        raise BlockValidationError("negative block length")
    view = memoryview(obj)
    if azure_md5_prefix:
        if len(view) < AZURE_MD5_BYTES:
            raise DecryptBlockError("object shorter than its MD5 prefix")
        view = view[AZURE_MD5_BYTES:]
    if key is not None:
        payload: memoryview = _decrypt(view, key)
        candidates: tuple[int, ...] = (0,)
    else:
        payload = view
        # Unknown whether unencrypted+compressed objects keep the header byte (docs/ctera-direct-io.md §4.4): try both.
        candidates = (0, HEADER_BYTES)
    if compression is Compression.NONE:
        out: bytes | bytearray | memoryview = payload
    else:
        out = _decompress_sniffed(payload, expected_length, candidates)
    if len(out) != expected_length:
        raise BlockValidationError(f"decoded {len(out)} bytes, the block list says {expected_length}")
    if isinstance(out, memoryview):
        return out.tobytes()
    return out


def _decrypt(view: memoryview, key: bytes) -> memoryview:
    body = len(view) - HEADER_BYTES - IV_BYTES
    if body < AES_BLOCK_BYTES or body % AES_BLOCK_BYTES:
        raise DecryptBlockError(f"object of {len(view)} bytes is not header + IV + whole AES blocks (truncated?)")
    iv = bytes(view[HEADER_BYTES : HEADER_BYTES + IV_BYTES])
    try:
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        plain = decryptor.update(view[HEADER_BYTES + IV_BYTES :])
        decryptor.finalize()  # CBC without cryptography's padder: nothing buffered, nothing returned
    except ValueError as exc:
        raise DecryptBlockError(f"AES-CBC failed: {exc}") from exc
    unpadded = _pkcs7_unpad(plain)
    if unpadded is None:
        raise DecryptBlockError("invalid PKCS#7 padding: wrong key or corrupted block")
    return unpadded


def _decompress_sniffed(payload: memoryview, expected_length: int, candidates: tuple[int, ...]) -> bytes | bytearray:
    view = payload
    for start in candidates:
        head = bytes(view[start : start + len(XERIAL_MAGIC)])
        if head.startswith(GZIP_MAGIC):
            return _gunzip(view[start:], expected_length)
        if head == XERIAL_MAGIC:
            return _unxerial(view[start:], expected_length)
    # No magic: one raw snappy block (cterasdk PR #268). For native objects try the header-shifted form too.
    last_error: DecompressBlockError | BlockValidationError | None = None
    for start in candidates:
        try:
            return _unsnappy_raw(view[start:], expected_length)
        except (DecompressBlockError, BlockValidationError) as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


def _gunzip(data: memoryview, expected_length: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        # max_length bounds the output: one byte more than expected proves "too long" without inflating a bomb.
        out = inflater.decompress(data, expected_length + 1)
    except zlib.error as exc:
        raise DecompressBlockError(f"gzip: {exc}") from exc
    if len(out) > expected_length:
        raise BlockValidationError(f"gzip member inflates past the block length {expected_length}")
    if not inflater.eof:
        raise DecompressBlockError("gzip: truncated member")
    if inflater.unused_data:
        raise DecompressBlockError("gzip: trailing data after the member")
    return out


def _snappy_varint_length(data: memoryview) -> int:
    """The uncompressed length a raw snappy block declares: its leading little-endian varint (at most 5 bytes, 32
    bits). Read here rather than by ``cramjam.snappy.decompress_raw_len``: a xerial stream has a chunk every 32 KiB,
    and each cramjam call releases and retakes the GIL, which under load is a futex round trip; this halves them."""
    value = 0
    for position in range(min(5, len(data))):
        byte = data[position]
        value |= (byte & 0x7F) << (7 * position)
        if byte < 0x80:
            if value > 0xFFFFFFFF:
                break
            return value
    raise DecompressBlockError("snappy: invalid length header")


def _raw_snappy_length(data: memoryview) -> int:
    try:
        return int(cramjam.snappy.decompress_raw_len(data))
    except Exception as exc:  # cramjam raises its own DecompressionError (a plain Exception subclass)
        raise DecompressBlockError(f"snappy: {exc}") from exc


def _unsnappy_raw(data: memoryview, expected_length: int) -> bytearray:
    declared = _raw_snappy_length(data)
    if declared != expected_length:
        raise BlockValidationError(f"snappy block declares {declared} bytes, the block list says {expected_length}")
    out = bytearray(expected_length)
    try:
        written = int(cramjam.snappy.decompress_raw_into(data, out))
    except Exception as exc:
        raise DecompressBlockError(f"snappy: {exc}") from exc
    if written != expected_length:
        raise DecompressBlockError(f"snappy: wrote {written} of {expected_length} bytes")
    return out


def _unxerial(data: memoryview, expected_length: int) -> bytearray:
    if len(data) < XERIAL_HEADER_BYTES:
        raise DecompressBlockError("xerial snappy: truncated header")
    out = bytearray(expected_length)
    out_view = memoryview(out)
    pos, written = XERIAL_HEADER_BYTES, 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise DecompressBlockError("xerial snappy: truncated chunk length")
        (size,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if size == 0 or pos + size > len(data):
            raise DecompressBlockError("xerial snappy: chunk runs past the end of the object (truncated?)")
        chunk = data[pos : pos + size]
        pos += size
        declared = _snappy_varint_length(chunk)
        if written + declared > expected_length:
            raise BlockValidationError(f"xerial snappy stream inflates past the block length {expected_length}")
        try:
            n = int(cramjam.snappy.decompress_raw_into(chunk, out_view[written : written + declared]))
        except Exception as exc:
            raise DecompressBlockError(f"xerial snappy: {exc}") from exc
        if n != declared:
            raise DecompressBlockError("xerial snappy: chunk shorter than declared")
        written += n
    if written != expected_length:
        raise BlockValidationError(f"decoded {written} bytes, the block list says {expected_length}")
    return out


# --- blocks: encode (reference portal, tests) -----------------------------------------------------------------


def compress(plain: bytes, compression: Compression) -> bytes:
    """Compress ``plain`` as a Portal would store it (before encryption)."""
    if compression is Compression.NONE:
        return bytes(plain)
    if compression is Compression.GZIP:
        return gzip.compress(plain, compresslevel=6, mtime=0)
    if compression is Compression.SNAPPY_RAW:
        return bytes(cramjam.snappy.compress_raw(plain))
    parts = [XERIAL_MAGIC, struct.pack(">ii", 1, 1)]
    view = memoryview(plain)
    for start in range(0, len(view), XERIAL_CHUNK_BYTES):
        chunk = bytes(cramjam.snappy.compress_raw(view[start : start + XERIAL_CHUNK_BYTES]))
        parts.append(struct.pack(">I", len(chunk)))
        parts.append(chunk)
    return b"".join(parts)


def encode_block(
    plain: bytes,
    *,
    key: bytes | None,
    compression: Compression,
    iv: bytes | None = None,
    azure_md5_prefix: bool = False,
) -> bytes:
    """The stored object for ``plain``: compressed, then (with a key) header byte + IV + AES-CBC/PKCS#7."""
    body = compress(plain, compression)
    if key is not None:
        iv = iv if iv is not None else os.urandom(IV_BYTES)
        if len(iv) != IV_BYTES:
            raise ValueError("IV must be 16 bytes")
        encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        body = bytes([ENCODER_HEADER_BYTE]) + iv + encryptor.update(_pkcs7_pad(body)) + encryptor.finalize()
    if azure_md5_prefix:
        body = hashlib.md5(body).digest() + body  # noqa: S324 - format compatibility, not security
    return body
