"""Encoders mirroring dlib's writers (serialize.h pack_int, float_details.h), to build test bytes."""

from __future__ import annotations

import math


def pack_int(value: int) -> bytes:
    """dlib's pack_int: control byte (count | 0x80 if negative), then |value| little-endian, at least one byte."""
    magnitude = abs(value)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def pack_string(text: bytes) -> bytes:
    return pack_int(len(text)) + text


def pack_float(value: float, digits: int = 24) -> bytes:
    """dlib's float_details for a float (24 mantissa digits): mantissa then exponent, low zero bytes shifted off."""
    if math.isinf(value):
        return pack_int(0) + pack_int(32000 if value > 0 else 32001)
    if math.isnan(value):
        return pack_int(0) + pack_int(32002)
    fraction, exp = math.frexp(value)
    mantissa, exponent = int(fraction * (1 << digits)), exp - digits
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return pack_int(mantissa) + pack_int(exponent)
