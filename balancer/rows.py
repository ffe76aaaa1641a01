"""The outcome log's request rows, encoded as they are recorded, and read back by the store writer.

`balancer/_rows.c` defines the format and explains why; this module holds the same format in Python,
for a balancer run without its compiled extensions (no C compiler, or BALANCER_PURE_PYTHON=1), and
`implementation()`, which picks between the two. `tests/test_rows.py` checks that both write the same
bytes and read the same values.
"""

from __future__ import annotations

import importlib
import struct
from types import ModuleType
from typing import Any, Final

from balancer import native

MAGIC: Final = b"R"
FORMAT: Final = 2
HEADER: Final = struct.Struct("=cBBI")  # magic, format, width, rows: native order, as the C side writes it
MAX_WIDTH: Final = 255
NONE, SAME, FLOAT, INT, ASCII, TEXT, ZERO = range(7)
_FLOAT: Final = struct.Struct("=Bd")
_INT: Final = struct.Struct("=Bq")
_TEXT: Final = struct.Struct("=BI")
_UINT32_MAX: Final = 2**32 - 1
_INT64: Final = range(-(2**63), 2**63)
_UNPACK_FLOAT: Final = struct.Struct("=d").unpack_from
_UNPACK_INT: Final = struct.Struct("=q").unpack_from
_UNPACK_LENGTH: Final = struct.Struct("=I").unpack_from
_ASCII_HEADS: Final = [bytes((ASCII, length)) for length in range(256)]
_NOTHING: Final = (object(),) * MAX_WIDTH  # "the row above" for a first row: no value is its very object


class Rows:
    """Rows(width, none_as_zero=()): request rows encoded as they are appended; len() is how many."""

    def __init__(self, width: int, none_as_zero: tuple[int, ...] = ()) -> None:
        if not 1 <= width <= MAX_WIDTH:
            raise ValueError(f"width must be between 1 and {MAX_WIDTH}, got {width}")
        for position in none_as_zero:
            if not 0 <= position < width:
                raise ValueError(f"none_as_zero position {position} is not a column of {width}")
        self.width = width
        self._none_tags = [ZERO if column in none_as_zero else NONE for column in range(width)]
        self._data = bytearray(HEADER.size)
        self._rows = 0
        self._previous: tuple[Any, ...] | None = None

    def __len__(self) -> int:
        return self._rows

    def append(self, row: tuple[Any, ...]) -> None:
        """Encode one row (a tuple of the width's values); ValueError, and nothing written, for a value the store
        cannot take."""
        if type(row) is not tuple or len(row) != self.width:
            size = len(row) if isinstance(row, tuple) else -1
            raise ValueError(f"a row is a tuple of {self.width} columns, got {type(row).__name__} of {size}")
        if self._rows == _UINT32_MAX:
            raise OverflowError("too many rows for one frame: take them first")
        previous = self._previous or _NOTHING
        data = self._data
        start = len(data)
        try:  # straight onto the buffer, cut back to `start` if a value is refused
            for column, value in enumerate(row):
                kind = type(value)
                if kind is str:
                    if value is previous[column]:
                        data.append(SAME)
                    elif len(value) <= 255 and value.isascii():
                        data += _ASCII_HEADS[len(value)]
                        data += value.encode()
                    else:
                        try:
                            text = value.encode()
                        except UnicodeEncodeError:
                            raise ValueError(f"column {column}: the text is not valid Unicode") from None
                        if len(text) > _UINT32_MAX:
                            raise ValueError(f"column {column}: the text is too long")
                        data += _TEXT.pack(TEXT, len(text))
                        data += text
                elif kind is float:
                    data += _FLOAT.pack(FLOAT, value)
                elif value is None:
                    data.append(self._none_tags[column])
                elif kind is int:
                    if value is previous[column]:
                        data.append(SAME)
                    elif value in _INT64:
                        data += _INT.pack(INT, value)
                    else:
                        raise ValueError(f"column {column}: the integer does not fit 64 bits")
                else:
                    raise ValueError(f"column {column}: a {kind.__name__} cannot be stored (str, int, float or None)")
        except BaseException:
            del data[start:]
            raise
        self._rows += 1
        self._previous = row

    def take(self) -> tuple[bytes, int]:
        """(frame, rows): the rows appended since the last take, as one frame for `decode`; then empty."""
        if not self._rows:
            return b"", 0
        HEADER.pack_into(self._data, 0, MAGIC, FORMAT, self.width, self._rows)
        taken = bytes(self._data), self._rows
        self._data = bytearray(HEADER.size)
        self._rows = 0
        self._previous = None
        return taken


def decode(frame: bytes) -> list[Any]:
    """The rows' columns, row after row; ValueError naming the byte where a frame is damaged."""
    if len(frame) < HEADER.size:
        raise _corrupt(0, "not a rows frame of this format")
    magic, version, width, rows = HEADER.unpack_from(frame)
    if magic != MAGIC or version != FORMAT or width == 0:
        raise _corrupt(0, "not a rows frame of this format")
    count = rows * width
    if count > len(frame) - HEADER.size:
        raise _corrupt(3, "more rows than bytes")
    columns: list[Any] = []
    append = columns.append
    at, size = HEADER.size, len(frame)
    for index in range(count):
        if at >= size:
            raise _corrupt(at, "it ends early")
        tag = frame[at]
        at += 1
        if tag == ASCII:
            if at >= size or size - at - 1 < frame[at]:
                raise _corrupt(at, "it ends inside a text")
            length = frame[at]
            at += 1
            try:
                append(frame[at:at + length].decode("ascii"))
            except UnicodeDecodeError as exc:
                raise _corrupt(at + exc.start, "a non-ASCII byte in an ASCII text") from None
            at += length
        elif tag == SAME:
            if index < width:
                raise _corrupt(at - 1, "a repeat in the first row")
            append(columns[index - width])
        elif tag == FLOAT or tag == INT:
            if size - at < 8:
                raise _corrupt(at, "it ends inside a number")
            append((_UNPACK_FLOAT if tag == FLOAT else _UNPACK_INT)(frame, at)[0])
            at += 8
        elif tag == ZERO:
            append(0)
        elif tag == NONE:
            append(None)
        elif tag == TEXT:
            if size - at < 4:
                raise _corrupt(at, "it ends inside a text's length")
            (length,) = _UNPACK_LENGTH(frame, at)
            at += 4
            if length > size - at:
                raise _corrupt(at, "it ends inside a text")
            append(frame[at:at + length].decode())  # UnicodeDecodeError is a ValueError
            at += length
        else:
            raise _corrupt(at - 1, "an unknown tag")
    if at != size:
        raise _corrupt(at, "bytes after the last row")
    return columns


def _corrupt(offset: int, what: str) -> ValueError:
    return ValueError(f"corrupt rows frame at byte {offset}: {what}")


def implementation() -> ModuleType:
    """`balancer._rows` where it is built from its current source and this process runs the compiled request path
    (see balancer/native.py), else this module: both have `Rows` and `decode`."""
    if native.MODE == "compiled":
        return importlib.import_module(f"{native.PACKAGE}._rows")
    return importlib.import_module(__name__)

