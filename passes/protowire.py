"""Just enough of the protobuf wire format to stream ONNX files.

Why by hand: ``onnx.load`` parses every weight into Python-owned memory (about twice the file
size, seconds for a few hundred MB). The fusion pass only needs the graph structure and a few
weights, so :mod:`passes.modelwire` walks the file with these helpers, keeps each large tensor
payload as a reference (file, offset, length) and parses only the small remainder.

Wire format recap: a message is a sequence of fields; each field starts with a varint key
``(field_number << 3) | wire_type``. Wire types used by ONNX: 0 varint, 1 fixed64,
2 length-delimited (bytes, strings, sub-messages, packed repeated), 5 fixed32.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT = 0
FIXED64 = 1
LEN = 2
FIXED32 = 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf: memoryview | bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at ``pos``; return (value, position after it)."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative varint")
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_key(field: int, wire_type: int) -> bytes:
    return encode_varint((field << 3) | wire_type)


def iter_fields(
    buf: memoryview | bytes, start: int, end: int
) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (field, wire_type, field_start, value_start, value_end) for each field.

    For LEN fields value_start/value_end delimit the payload; for the other types they delimit
    the encoded value. field_start is where the key begins, so ``buf[field_start:value_end]``
    is the whole field, ready to copy verbatim.
    """
    pos = start
    while pos < end:
        field_start = pos
        key, pos = read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == VARINT:
            _, after = read_varint(buf, pos, end)
            yield field, wire_type, field_start, pos, after
            pos = after
        elif wire_type == LEN:
            length, pos = read_varint(buf, pos, end)
            after = pos + length
            if after > end:
                raise WireError("length-delimited field runs past the end of its message")
            yield field, wire_type, field_start, pos, after
            pos = after
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise WireError("truncated fixed64")
            yield field, wire_type, field_start, pos, pos + 8
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise WireError("truncated fixed32")
            yield field, wire_type, field_start, pos, pos + 4
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
