"""The request rows as the outcome log records them (balancer/_rows.c and balancer/rows.py): the C and the Python
implementation write the same bytes; what goes in comes out; what the store cannot take is refused by column with
nothing written; a damaged frame is an error, never a crash, and both decoders agree on every frame."""

from __future__ import annotations

import math
import random
import sqlite3
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from balancer import native, store, store_writer
from balancer import rows as python_rows
from balancer.events import EventLog
from bench import rows_codec
from bench.store_insert import synthetic_rows
from tests.native_build import require_native_build

WIDTH = store_writer.WIDTH
NULLABLE = store_writer.NULLABLE_POSITIONS


def c_rows() -> ModuleType:
    require_native_build()
    import balancer._rows as rows  # type: ignore[import-not-found]  # built by `make native`

    return rows


@pytest.fixture(params=["C", "Python"])
def implementation(request: pytest.FixtureRequest) -> ModuleType:
    return c_rows() if request.param == "C" else python_rows


def frame_of(implementation: ModuleType, rows: list[tuple[Any, ...]], none_as_zero: tuple[int, ...] = NULLABLE) -> bytes:
    buffer = implementation.Rows(WIDTH, none_as_zero)
    for row in rows:
        buffer.append(row)
    frame, count = buffer.take()
    assert count == len(rows)
    return frame


def expected_columns(rows: list[tuple[Any, ...]], none_as_zero: tuple[int, ...] = NULLABLE) -> list[Any]:
    return [0 if value is None and column in none_as_zero else value for row in rows for column, value in enumerate(row)]


def assert_same_columns(decoded: list[Any], columns: list[Any]) -> None:
    assert len(decoded) == len(columns)
    for got, sent in zip(decoded, columns, strict=True):
        assert type(got) is type(sent)
        assert got == sent or (isinstance(sent, float) and math.isnan(sent) and math.isnan(got))


def varied_rows(count: int, seed: int = 7, long_text: int = 70_000) -> list[tuple[Any, ...]]:
    """Rows shaped like the balancer's, with every kind of value the format carries, shared objects included."""
    generator = random.Random(seed)
    shared = ["exp", "model_a", "model_b", "127.0.0.1:9001", "sticky", "random", 200, 503, 1]
    texts = ["", "user-1", "ünïcode ✓", "x" * 255, "y" * 256, "z" * long_text, "0"]
    numbers = [0.0, -0.0, 1e-300, 1.5e308, math.inf, -math.inf, math.nan, 0, -1, 2**63 - 1, -(2**63), 2**31]
    rows = []
    for index in range(count):
        row: list[Any] = [f"{index:08x}-{generator.getrandbits(48):012x}"]
        for _ in range(WIDTH - 1):
            pick = generator.random()
            if pick < 0.4:
                row.append(generator.choice(shared))
            elif pick < 0.6:
                row.append(generator.choice(texts))
            elif pick < 0.9:
                row.append(generator.choice(numbers) if generator.random() < 0.3 else generator.uniform(-1e6, 1e6))
            else:
                row.append(None)
        rows.append(tuple(row))
    return rows


def test_every_kind_of_value_comes_back_as_it_went(implementation: ModuleType) -> None:
    rows = varied_rows(2_000)
    for none_as_zero in (NULLABLE, ()):
        assert_same_columns(implementation.decode(frame_of(implementation, rows, none_as_zero)),
                            expected_columns(rows, none_as_zero))


def test_the_c_and_the_python_implementation_write_the_same_bytes_and_read_the_same_values() -> None:
    rows = varied_rows(3_000, seed=3)
    frame = frame_of(c_rows(), rows)
    assert frame == frame_of(python_rows, rows)
    assert_same_columns(python_rows.decode(frame), c_rows().decode(frame))


def test_a_value_repeated_from_the_row_above_is_one_byte_and_comes_back_as_that_object(implementation: ModuleType) -> None:
    variant, unit = "model_a", "user-42"
    rows = [(f"id-{index:03d}", float(index), "exp", 3, variant, None, "sticky", unit, 200, 1.5, None) for index in range(100)]
    frame = frame_of(implementation, rows)
    first_row = len(frame_of(implementation, rows[:1]))
    # Each later row: the id (tag, length, 6 letters), ts and latency (tag, 8 bytes), six repeats and two Nones.
    assert len(frame) - first_row == 99 * ((2 + 6) + 9 + 9 + 6 + 2)
    decoded = implementation.decode(frame)
    assert decoded == expected_columns(rows)
    assert decoded[4] is decoded[4 + WIDTH * 99] and decoded[7] is decoded[7 + WIDTH * 50]


def test_take_empties_the_buffer_and_the_next_frame_stands_alone(implementation: ModuleType) -> None:
    rows = synthetic_rows(6)
    buffer = implementation.Rows(WIDTH, NULLABLE)
    assert buffer.take() == (b"", 0) and len(buffer) == 0
    for row in rows[:3]:
        buffer.append(row)
    assert len(buffer) == 3
    first, count = buffer.take()
    assert count == 3 and len(buffer) == 0 and buffer.take() == (b"", 0)
    for row in rows[3:]:
        buffer.append(row)
    second, _ = buffer.take()  # its first row repeats nothing from the frame before
    assert implementation.decode(first) + implementation.decode(second) == expected_columns(rows)


class Text(str):
    pass


@pytest.mark.parametrize("value, reason", [
    (object(), "a object cannot be stored"),
    (True, "a bool cannot be stored"),
    (b"bytes", "a bytes cannot be stored"),
    (Text("subclass"), "a Text cannot be stored"),
    (2**63, "the integer does not fit 64 bits"),
    (-(2**63) - 1, "the integer does not fit 64 bits"),
    ("\ud800", "the text is not valid Unicode"),
])
def test_a_value_the_store_cannot_take_is_refused_by_column_and_nothing_is_written(implementation: ModuleType,
                                                                                      value: object, reason: str) -> None:
    rows = synthetic_rows(3)
    buffer = implementation.Rows(WIDTH, NULLABLE)
    buffer.append(rows[0])
    with pytest.raises(ValueError, match=f"column 6: {reason}"):
        buffer.append(rows[1][:6] + (value,) + rows[1][7:])
    buffer.append(rows[2])  # repeats are still from the last row written
    frame, count = buffer.take()
    assert count == 2 and implementation.decode(frame) == expected_columns([rows[0], rows[2]])


@pytest.mark.parametrize("row", [(), ("id",) * (WIDTH - 1), ("id",) * (WIDTH + 1), ["id"] * WIDTH])
def test_a_row_that_is_not_a_tuple_of_the_width_is_refused(implementation: ModuleType, row: Any) -> None:
    buffer = implementation.Rows(WIDTH, NULLABLE)
    with pytest.raises(ValueError, match="a row is a tuple of 11 columns"):
        buffer.append(row)
    assert len(buffer) == 0


@pytest.mark.parametrize("width, none_as_zero, message", [
    (0, (), "width must be between 1 and 255"),
    (256, (), "width must be between 1 and 255"),
    (3, (3,), "none_as_zero position 3 is not a column of 3"),
    (3, (-1,), "none_as_zero position -1 is not a column of 3"),
])
def test_a_buffer_of_an_impossible_shape_is_refused(implementation: ModuleType, width: int,
                                                    none_as_zero: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        implementation.Rows(width, none_as_zero)


def test_every_truncation_is_an_error_and_both_decoders_agree_on_any_damage() -> None:
    rows = varied_rows(40, seed=11, long_text=300)
    rows[5] = rows[5][:3] + ("é" * 10,) + rows[5][4:]  # a UTF-8 text: its length and its bytes can be damaged too
    frame = frame_of(c_rows(), rows)
    decoders = (c_rows().decode, python_rows.decode)
    for end in range(len(frame)):
        for decode in decoders:
            with pytest.raises(ValueError, match="corrupt rows frame"):
                decode(frame[:end])
    for decode in decoders:
        with pytest.raises(ValueError, match="bytes after the last row"):
            decode(frame + b"\x00")
    generator = random.Random(5)
    outcomes = {"error": 0, "decoded": 0}
    for _ in range(2_000):
        damaged = bytearray(frame)
        for _ in range(generator.randint(1, 3)):
            damaged[generator.randrange(len(damaged))] = generator.randrange(256)
        results = []
        for decode in decoders:
            try:
                results.append(decode(bytes(damaged)))
            except ValueError as exc:
                results.append(type(exc))
        if results[0] in (ValueError, UnicodeDecodeError):
            outcomes["error"] += 1
            assert results[1] == results[0]
        else:  # a damaged float, or a text's letters: still whole rows of values the store takes
            outcomes["decoded"] += 1
            assert_same_columns(results[1], results[0])
            assert len(results[0]) % damaged[2] == 0
            assert all(value is None or type(value) in (str, int, float) for value in results[0])
    assert outcomes["error"] > 0 and outcomes["decoded"] > 0


@pytest.mark.parametrize("damage, reason", [
    (lambda frame: b"M" + frame[1:], "not a rows frame"),
    (lambda frame: frame[:1] + b"\x01" + frame[2:], "not a rows frame"),
    (lambda frame: frame[:3] + b"\xff\xff\xff\x7f" + frame[7:], "more rows than bytes"),
    (lambda frame: frame[:7] + b"\x01" + frame[8:], "a repeat in the first row"),
    (lambda frame: frame[:7] + b"\x09" + frame[8:], "an unknown tag"),
])
def test_a_damaged_header_or_tag_is_named(implementation: ModuleType, damage: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        implementation.decode(damage(frame_of(implementation, synthetic_rows(4))))


def test_a_non_ascii_byte_in_an_ascii_text_is_refused(implementation: ModuleType) -> None:
    frame = bytearray(frame_of(implementation, [("abc",) + (None,) * (WIDTH - 1)]))
    frame[frame.index(b"abc")] = 0xC3
    with pytest.raises(ValueError, match="byte 9: a non-ASCII byte in an ASCII text"):
        implementation.decode(bytes(frame))


def test_the_compiled_build_uses_the_c_implementation() -> None:
    expected = "balancer._rows" if native.MODE == "compiled" else "balancer.rows"
    assert python_rows.implementation().__name__ == expected


@pytest.mark.parametrize("mode", ["C", "Python"])
def test_the_outcome_log_stores_the_same_rows_with_either_implementation(tmp_path: Path, mode: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if mode == "C":
        c_rows()
    else:  # the balancer's rows and its writer's decoding both in Python
        monkeypatch.setattr(python_rows, "implementation", lambda: python_rows)
        monkeypatch.setenv(native.PURE_ENVIRONMENT, "1")
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60)
    rows = synthetic_rows(700)
    rows[3] = rows[3][:5] + (None, "random_no_key", None) + rows[3][8:10] + (None,)
    rows[4] = rows[4][:7] + ("ünïcode-user ✓",) + rows[4][8:]
    for row in rows[:400]:
        log.record_request(row)
    log.record_request(("refused",) + rows[6][1:10] + (object(),))
    log.flush()
    for row in rows[400:]:
        log.record_request(row)
    log.close()
    assert (log.written_requests, log.rejected_records, log.pending) == (700, 1, 0)
    with sqlite3.connect(tmp_path / "outcomes.db") as connection:
        stored = connection.execute(f"SELECT {', '.join(store.REQUEST_COLUMNS)} FROM requests ORDER BY request_id").fetchall()
    assert stored == sorted(rows)


def test_the_benchmark_times_both_implementations_where_c_is_built() -> None:
    results = rows_codec.measure(rows=300, repeats=1)
    assert set(results) == ({"C", "Python"} if native.decide(native.PACKAGE_DIR, {})[0] else {"Python"})
    assert all(append > 0 and decode > 0 for append, decode in results.values())
