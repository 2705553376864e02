"""Codec vectors: every format, both directions, and every way a block can be wrong.

The conformance class at the bottom feeds our encoder's objects to the real cterasdk decoder (the package is a test
dependency), byte for byte, so we know we speak the protocol and not a dialect of it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
import struct

import cramjam
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from directfs.errors import (
    BlockValidationError,
    DecompressBlockError,
    DecryptBlockError,
    DecryptKeyError,
    DirectFSError,
)
from directfs.sources.ctera import codec
from directfs.sources.ctera.codec import Compression

SECRET = base64.b64encode(bytes(range(30))).decode()  # 40 chars, decodes to 30 bytes like real CTERA secrets
KEY = bytes(range(100, 132))
SIZES = [0, 1, 15, 16, 17, 32 * 1024 - 1, 32 * 1024, 32 * 1024 + 1, 200_003]
ENCODINGS = [Compression.SNAPPY, Compression.SNAPPY_RAW, Compression.GZIP, Compression.NONE]


def plaintext(size: int, seed: int = 1) -> bytes:
    """Half random, half repetitive: compressible, but not trivially."""
    rng = random.Random(seed)
    half = size // 2
    return rng.randbytes(half) + (b"directfs " * (size // 9 + 1))[: size - half]


def decoding_rule(encoding: Compression) -> Compression:
    """What the Portal metadata says for objects we encoded with ``encoding``."""
    return Compression.NONE if encoding is Compression.NONE else Compression.SNAPPY


# --- keys ------------------------------------------------------------------------------------------------------


def test_key_round_trip_and_shape() -> None:
    wrapped = codec.wrap_file_key(KEY, SECRET)
    # The Portal's wrapped keys are 64 base64 chars: AES-ECB over the 46-byte JSON string, padded to 48
    # (docs/ctera-direct-io.md §2.2).
    assert len(wrapped) == 64
    assert codec.unwrap_file_key(wrapped, SECRET) == KEY


def test_key_unwrap_follows_section_3_exactly() -> None:
    # Build the wrapped key by hand from the prose of docs/ctera-direct-io.md §3, independently of wrap_file_key.
    kwrap = base64.b64decode(SECRET) + b"\x00\x00"
    literal = json.dumps(base64.b64encode(KEY).decode()).encode()
    pad = 16 - len(literal) % 16
    enc = Cipher(algorithms.AES(kwrap), modes.ECB()).encryptor()
    wrapped = base64.b64encode(enc.update(literal + bytes([pad]) * pad) + enc.finalize()).decode()
    assert codec.unwrap_file_key(wrapped, SECRET) == KEY


def test_long_secret_is_truncated_to_32_bytes() -> None:
    long_secret = base64.b64encode(bytes(range(48))).decode()
    short_equivalent = base64.b64encode(bytes(range(32))).decode()
    wrapped = codec.wrap_file_key(KEY, long_secret)
    assert codec.unwrap_file_key(wrapped, short_equivalent) == KEY


@pytest.mark.parametrize(
    ("wrapped", "secret"),
    [
        pytest.param(None, base64.b64encode(os.urandom(30)).decode(), id="wrong-secret"),
        pytest.param("not base64 at all!", SECRET, id="wrapped-not-base64"),
        pytest.param(base64.b64encode(b"x" * 47).decode(), SECRET, id="wrapped-not-whole-blocks"),
        pytest.param("", SECRET, id="wrapped-empty"),
        pytest.param(None, "%%%%", id="secret-not-base64"),
    ],
)
def test_key_unwrap_failures_are_decrypt_key_errors(wrapped: str | None, secret: str) -> None:
    if wrapped is None:
        wrapped = codec.wrap_file_key(KEY, SECRET)
    with pytest.raises(DecryptKeyError) as info:
        codec.unwrap_file_key(wrapped, secret)
    assert SECRET not in str(info.value)


def test_key_unwrap_rejects_valid_padding_around_non_json() -> None:
    kwrap = base64.b64decode(SECRET) + b"\x00\x00"
    enc = Cipher(algorithms.AES(kwrap), modes.ECB()).encryptor()
    body = b"no quotes here!" + b"\x01"  # valid PKCS#7 (one byte of 0x01), but not a JSON string
    wrapped = base64.b64encode(enc.update(body) + enc.finalize()).decode()
    with pytest.raises(DecryptKeyError):
        codec.unwrap_file_key(wrapped, SECRET)


def test_key_unwrap_rejects_a_key_of_invalid_aes_length() -> None:
    wrapped = codec.wrap_file_key(b"k" * 20, SECRET)
    with pytest.raises(DecryptKeyError):
        codec.unwrap_file_key(wrapped, SECRET)


# --- blocks: round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda c: c.value)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "native"])
def test_round_trip(encoding: Compression, size: int, encrypted: bool) -> None:
    plain = plaintext(size)
    key = KEY if encrypted else None
    obj = codec.encode_block(plain, key=key, compression=encoding)
    assert codec.decode_block(obj, key=key, compression=decoding_rule(encoding), expected_length=size) == plain


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda c: c.value)
def test_azure_md5_prefix(encoding: Compression) -> None:
    plain = plaintext(5000)
    obj = codec.encode_block(plain, key=KEY, compression=encoding, azure_md5_prefix=True)
    assert obj[:16] == hashlib.md5(obj[16:]).digest()
    rule = decoding_rule(encoding)
    assert codec.decode_block(obj, key=KEY, compression=rule, expected_length=5000, azure_md5_prefix=True) == plain
    # Without the strip the IV is shifted by 16 bytes: decryption "succeeds" on garbage, and the checks catch it.
    with pytest.raises((DecryptBlockError, DecompressBlockError, BlockValidationError)):
        codec.decode_block(obj, key=KEY, compression=rule, expected_length=5000)


def test_layout_is_header_iv_ciphertext() -> None:
    iv = bytes(range(16))
    obj = codec.encode_block(b"hello", key=KEY, compression=Compression.NONE, iv=iv)
    assert obj[0] == codec.ENCODER_HEADER_BYTE
    assert obj[1:17] == iv
    dec = Cipher(algorithms.AES(KEY), modes.CBC(iv)).decryptor()
    assert dec.update(obj[17:]) + dec.finalize() == b"hello" + b"\x0b" * 11


def test_header_byte_is_not_validated() -> None:
    obj = bytearray(codec.encode_block(b"abc" * 100, key=KEY, compression=Compression.SNAPPY))
    obj[0] = 0xEE
    assert codec.decode_block(bytes(obj), key=KEY, compression=Compression.SNAPPY, expected_length=300) == b"abc" * 100


def test_xerial_stream_format() -> None:
    plain = plaintext(100_000)
    stream = codec.compress(plain, Compression.SNAPPY)
    assert stream[:8] == b"\x82SNAPPY\x00"
    assert struct.unpack(">ii", stream[8:16]) == (1, 1)
    pos, out = 16, b""
    while pos < len(stream):
        (n,) = struct.unpack(">I", stream[pos : pos + 4])
        out += bytes(cramjam.snappy.decompress_raw(stream[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    assert out == plain


def test_gzip_label_still_sniffs_snappy() -> None:
    # cterasdk picks the decompressor by magic, not by compression_type; so do we for non-NONE types.
    obj = codec.encode_block(b"x" * 1000, key=KEY, compression=Compression.SNAPPY)
    assert codec.decode_block(obj, key=KEY, compression=Compression.GZIP, expected_length=1000) == b"x" * 1000


def test_native_compressed_object_with_header_byte_is_sniffed_at_offset_1() -> None:
    plain = plaintext(3000)
    for encoding in (Compression.SNAPPY, Compression.GZIP, Compression.SNAPPY_RAW):
        obj = b"\x01" + codec.compress(plain, encoding)
        assert codec.decode_block(obj, key=None, compression=Compression.SNAPPY, expected_length=3000) == plain


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SNAPPY", Compression.SNAPPY),
        ("gzip", Compression.GZIP),
        ("NONE", Compression.NONE),
        (None, Compression.SNAPPY),
    ],
)
def test_compression_parse(value: object, expected: Compression) -> None:
    assert Compression.parse(value) is expected


# --- blocks: every way to be wrong ------------------------------------------------------------------------------


def encrypted(plain: bytes, encoding: Compression = Compression.SNAPPY) -> bytes:
    return codec.encode_block(plain, key=KEY, compression=encoding)


def test_wrong_key_is_refused() -> None:
    obj = encrypted(plaintext(10_000))
    with pytest.raises((DecryptBlockError, DecompressBlockError, BlockValidationError)):
        codec.decode_block(obj, key=os.urandom(32), compression=Compression.SNAPPY, expected_length=10_000)


def test_wrong_key_on_native_encoding_fails_on_padding_or_length() -> None:
    # No compression layer: padding and length are the only integrity signals. A wrong key must still never
    # produce bytes silently of the right length AND valid padding often; check the padding check fires.
    failures = 0
    for _ in range(50):
        obj = codec.encode_block(plaintext(4096), key=KEY, compression=Compression.NONE)
        try:
            codec.decode_block(obj, key=os.urandom(32), compression=Compression.NONE, expected_length=4096)
        except (DecryptBlockError, BlockValidationError):
            failures += 1
    assert failures >= 45  # ~1/16 of random keys give a 0x01 last byte (valid padding) but then a length mismatch


def test_bad_padding() -> None:
    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(KEY), modes.CBC(iv)).encryptor()
    body = codec.compress(b"payload", Compression.SNAPPY) + b"\x00" * 0
    body = body + b"\x05" * (16 - len(body) % 16 or 16)  # wrong pad byte value for the pad length
    body = body[:-1] + b"\x07"
    obj = b"\x01" + iv + enc.update(body) + enc.finalize()
    with pytest.raises(DecryptBlockError, match="padding"):
        codec.decode_block(obj, key=KEY, compression=Compression.SNAPPY, expected_length=7)


@pytest.mark.parametrize("cut", [1, 15, 16, 17, 33])
def test_truncated_object(cut: int) -> None:
    obj = encrypted(plaintext(50_000))
    with pytest.raises((DecryptBlockError, DecompressBlockError, BlockValidationError)):
        codec.decode_block(obj[:-cut], key=KEY, compression=Compression.SNAPPY, expected_length=50_000)


def test_object_shorter_than_header_and_iv() -> None:
    with pytest.raises(DecryptBlockError):
        codec.decode_block(b"\x01" + b"\x00" * 20, key=KEY, compression=Compression.SNAPPY, expected_length=1)


@pytest.mark.parametrize("encoding", [Compression.SNAPPY, Compression.GZIP, Compression.SNAPPY_RAW])
def test_trailing_garbage_inside_the_ciphertext(encoding: Compression) -> None:
    body = codec.compress(b"q" * 1000, encoding) + b"garbage!"
    obj = codec.encode_block(body, key=KEY, compression=Compression.NONE)  # encrypt the tampered stream as-is
    with pytest.raises((DecompressBlockError, BlockValidationError)):
        codec.decode_block(obj, key=KEY, compression=Compression.SNAPPY, expected_length=1000)


def test_trailing_garbage_after_the_ciphertext() -> None:
    obj = encrypted(plaintext(1000)) + b"\x00" * 16
    with pytest.raises((DecryptBlockError, DecompressBlockError, BlockValidationError)):
        codec.decode_block(obj, key=KEY, compression=Compression.SNAPPY, expected_length=1000)


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda c: c.value)
@pytest.mark.parametrize("delta", [-1, 1])
def test_length_mismatch_is_a_validation_error(encoding: Compression, delta: int) -> None:
    obj = codec.encode_block(plaintext(777), key=KEY, compression=encoding)
    with pytest.raises(BlockValidationError):
        codec.decode_block(obj, key=KEY, compression=decoding_rule(encoding), expected_length=777 + delta)


@pytest.mark.parametrize("encoding", [Compression.SNAPPY, Compression.SNAPPY_RAW, Compression.GZIP])
def test_decompression_bomb_is_bounded_by_the_expected_length(encoding: Compression) -> None:
    bomb = b"\x00" * (64 * 1024 * 1024)  # compresses to a few KiB: decoding it unbounded would allocate 64 MiB
    obj = codec.encode_block(bomb, key=KEY, compression=encoding)
    assert len(obj) < 4 * 1024 * 1024
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(BlockValidationError):
            codec.decode_block(obj, key=KEY, compression=Compression.SNAPPY, expected_length=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_corrupted_snappy_structure() -> None:
    # Damage the snappy *structure* (the chunk's length preamble): detected. Damage inside literal runs is not
    # detectable by any codec check (no MAC: docs/ctera-direct-io.md §4.3); see test_single_bit_flips below.
    stream = bytearray(codec.compress(plaintext(100_000), Compression.SNAPPY))
    stream[20:23] = b"\xff\xff\xff"
    obj = codec.encode_block(bytes(stream), key=KEY, compression=Compression.NONE)
    with pytest.raises((DecompressBlockError, BlockValidationError)):
        codec.decode_block(obj, key=KEY, compression=Compression.SNAPPY, expected_length=100_000)


def test_xerial_chunk_length_running_past_the_end() -> None:
    stream = codec.compress(b"z" * 5000, Compression.SNAPPY) + struct.pack(">I", 1000) + b"abc"
    obj = codec.encode_block(stream, key=KEY, compression=Compression.NONE)
    with pytest.raises(DecompressBlockError, match="past the end"):
        codec.decode_block(obj, key=KEY, compression=Compression.SNAPPY, expected_length=5000)


def test_truncated_gzip_member() -> None:
    member = gzip.compress(plaintext(10_000))[:-12]
    obj = codec.encode_block(member, key=KEY, compression=Compression.NONE)
    with pytest.raises((DecompressBlockError, BlockValidationError)):
        codec.decode_block(obj, key=KEY, compression=Compression.SNAPPY, expected_length=10_000)


def test_every_codec_error_is_an_oserror_with_eio() -> None:
    import errno

    for exc_type in (DecryptKeyError, DecryptBlockError, DecompressBlockError, BlockValidationError):
        exc = exc_type()
        assert isinstance(exc, OSError)
        assert isinstance(exc, DirectFSError)
        assert exc.errno == errno.EIO


def test_bit_flips_never_change_the_length_and_damage_is_caught_where_the_format_allows() -> None:
    """With no MAC (docs/ctera-direct-io.md §4.3), a flip in a snappy literal run decodes to wrong bytes of the right
    length: the codec alone cannot promise integrity, which is why the fetch layer also checks the storage
    checksum. What the codec does promise: never a wrong length, and every flip in the last cipher block (padding)
    or in structural bytes is refused. This test pins both facts so a change to either shows up."""
    plain = plaintext(20_000, seed=7)
    obj = encrypted(plain)
    rng = random.Random(3)
    refused = 0
    for _ in range(200):
        damaged = bytearray(obj)
        damaged[rng.randrange(17, len(damaged))] ^= 1 << rng.randrange(8)
        try:
            out = codec.decode_block(bytes(damaged), key=KEY, compression=Compression.SNAPPY, expected_length=20_000)
        except (DecryptBlockError, DecompressBlockError, BlockValidationError):
            refused += 1
            continue
        assert len(out) == 20_000
    assert refused > 0
    for bit in range(8):  # CBC: a flip in the penultimate cipher block flips the same bit of the padding
        damaged = bytearray(obj)
        damaged[-20] ^= 1 << bit
        with pytest.raises((DecryptBlockError, DecompressBlockError, BlockValidationError)):
            codec.decode_block(bytes(damaged), key=KEY, compression=Compression.SNAPPY, expected_length=20_000)


# --- conformance with the real client ---------------------------------------------------------------------------


class TestCterasdkDecodesOurBlocks:
    """cterasdk's own decoding pipeline (crypto.decrypt_key, crypto.decrypt_block, decompressor.decompress) accepts
    every object our encoder produces, byte for byte."""

    def test_key_unwrap(self) -> None:
        from cterasdk.direct import crypto

        for _ in range(20):
            key = codec.new_file_key()
            secret = base64.b64encode(os.urandom(30)).decode()
            assert crypto.decrypt_key(codec.wrap_file_key(key, secret), secret) == key

    @pytest.mark.parametrize("encoding", [Compression.SNAPPY, Compression.SNAPPY_RAW, Compression.GZIP])
    @pytest.mark.parametrize("size", [1, 16, 32 * 1024, 32 * 1024 + 1, 1_000_000])
    def test_encrypted_compressed_blocks(self, encoding: Compression, size: int) -> None:
        from cterasdk.direct import crypto, decompressor

        plain = plaintext(size, seed=size)
        obj = codec.encode_block(plain, key=KEY, compression=encoding)
        assert bytes(decompressor.decompress(crypto.decrypt_block(obj, KEY))) == plain

    def test_native_blocks_pass_through_the_fixed_pipeline(self) -> None:
        # PR #369 (in 2.20.50): unencrypted + NONE objects are used as-is; ours are the plaintext bytes.
        plain = plaintext(5000)
        assert codec.encode_block(plain, key=None, compression=Compression.NONE) == plain


@pytest.mark.parametrize("length", [0, 1, 127, 128, 16_383, 16_384, 32_768, 1 << 20, (1 << 32) - 1])
def test_snappy_length_header_is_read_as_cramjam_reads_it(length: int) -> None:
    header = bytearray()
    value = length
    while True:
        low, value = value & 0x7F, value >> 7
        header.append(low | (0x80 if value else 0))
        if not value:
            break
    view = memoryview(bytes(header) + b"\x00" * 4)
    assert codec._snappy_varint_length(view) == length
    real = memoryview(bytes(cramjam.snappy.compress_raw(b"x" * min(length, 70_000))))
    assert codec._snappy_varint_length(real) == int(cramjam.snappy.decompress_raw_len(real))


@pytest.mark.parametrize("header", [b"\x80", b"\xff\xff\xff\xff\xff\x01", b"\xff\xff\xff\xff\x7f"])
def test_snappy_length_header_that_is_cut_or_too_long_is_refused(header: bytes) -> None:
    with pytest.raises(DecompressBlockError):
        codec._snappy_varint_length(memoryview(header))
