"""directfs.values.parse_decimal: the one reader of numbers from headers, replies and arguments."""

from __future__ import annotations

import pytest

from directfs.http import parse_retry_after
from directfs.values import MAX_DECIMAL_DIGITS, parse_decimal


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("42", 42), (" 7 ", 7), (b"65536", 65536), ("9" * MAX_DECIMAL_DIGITS, int("9" * MAX_DECIMAL_DIGITS))],
)
def test_ascii_digits_are_numbers(text: str | bytes, value: int) -> None:
    assert parse_decimal(text) == value


@pytest.mark.parametrize(
    "text", ["", " ", "²", "١٢", "-1", "+1", "1_000", "0x10", "1e3", "1.0", "9" * (MAX_DECIMAL_DIGITS + 1), "9" * 5000]
)
def test_everything_else_is_none_never_an_exception(text: str) -> None:
    assert parse_decimal(text) is None


def test_a_5000_digit_retry_after_is_ignored_not_a_crash() -> None:
    # int() refuses more than 4300 digits with a ValueError; str.isdigit() had let such a header through.
    assert parse_retry_after("9" * 5000) is None
    assert parse_retry_after("²") is None
    assert parse_retry_after("3") == 3.0
