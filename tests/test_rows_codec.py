"""The request rows' codec on the pipe to the store writer (balancer/_rows.c): what goes in comes out, what the
store cannot take is refused by name, and a damaged frame is an error, never a wrong row or a crash."""

from __future__ import annotations

import math
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from balancer import native, store, store_writer
from balancer.events import EventLog
from bench.store_insert import synthetic_rows
from tests.native_build import require_native_build

WIDTH = store_writer.WIDTH


@pytest.fixture(scope="module")
def rows_module() -> Any:
    require_native_build()
    import balancer._rows as rows  # type: ignore[import-not-found]  # built by `make native`

    return rows


def flat(rows: list[tuple[Any, ...]]) -> list[Any]:
    return [column for row in rows for column in row]


def assert_same_columns(decoded: list[Any], columns: list[Any]) -> None:
    assert len(decoded) == len(columns)
    for got, sent in zip(decoded, columns, strict=True):
        assert type(got) is type(sent)
        assert got == sent or (isinstance(sent, float) and math.isnan(sent) and math.isnan(got))


def varied_columns(count: int, seed: int = 7) -> list[Any]:
    """Rows shaped like the balancer's, with every kind of value the codec carries, shared objects included."""
    generator = random.Random(seed)
    shared = ["exp", "model_a", "model_b", "127.0.0.1:9001", "sticky", "random", 200, 503, 1]
    texts = ["", "user-1", "ünïcode ✓", "x" * 255, "y" * 256, "z" * 70_000, "0"]
    numbers = [0.0, -0.0, 1e-300, 1.5e308, math.inf, -math.inf, math.nan, 0, -1, 2**63 - 1, -(2**63), 2**31]
    columns: list[Any] = []
    for index in range(count):
        row = [f"{index:08x}-{generator.getrandbits(48):012x}"]
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
        columns.extend(row)
    return columns


def test_every_kind_of_value_comes_back_as_it_went(rows_module: Any) -> None:
    columns = varied_columns(2_000)
    frame = rows_module.encode(columns, WIDTH, 0, len(columns))
    assert_same_columns(rows_module.decode(frame), columns)


def test_a_value_repeated_from_the_row_above_is_one_byte_and_comes_back_as_that_object(rows_module: Any) -> None:
    variant, unit = "model_a", "user-42"
    rows = [(f"id-{index:03d}", float(index), "exp", 3, variant, None, "sticky", unit, 200, 1.5, None) for index in range(100)]
    columns = flat(rows)
    frame = rows_module.encode(columns, WIDTH, 0, len(columns))
    first_row = len(rows_module.encode(columns, WIDTH, 0, WIDTH))
    # Each later row: the id (tag, length, 6 letters), ts and latency (tag, 8 bytes), six repeats and two Nones.
    assert len(frame) - first_row == 99 * ((2 + 6) + 9 + 9 + 6 + 2)
    decoded = rows_module.decode(frame)
    assert decoded == columns
    assert decoded[4] is decoded[4 + WIDTH * 99] and decoded[7] is decoded[7 + WIDTH * 50]


def test_a_slice_of_whole_rows_is_encoded_and_the_end_is_clamped(rows_module: Any) -> None:
    columns = flat(synthetic_rows(10))
    assert rows_module.decode(rows_module.encode(columns, WIDTH, 3 * WIDTH, 7 * WIDTH)) == columns[3 * WIDTH:7 * WIDTH]
    assert rows_module.decode(rows_module.encode(columns, WIDTH, 8 * WIDTH, 1_000 * WIDTH)) == columns[8 * WIDTH:]
    assert rows_module.decode(rows_module.encode(columns, WIDTH, 0, 0)) == []


@pytest.mark.parametrize("start, stop", [(1, WIDTH + 1), (0, WIDTH - 1), (-WIDTH, 0), (WIDTH, 0)])
def test_a_slice_that_is_not_whole_rows_is_refused(rows_module: Any, start: int, stop: int) -> None:
    with pytest.raises(ValueError, match="as rows of 11"):
        rows_module.encode(flat(synthetic_rows(3)), WIDTH, start, stop)


class Text(str):
    pass


@pytest.mark.parametrize("value, reason", [
    (object(), "a object cannot be stored"),
    (True, "a bool cannot be stored"),
    (b"bytes", "a bytes cannot be stored"),
    (Text("subclass"), "a Text cannot be stored"),
    (2**63, "does not fit 64 bits"),
    (-(2**63) - 1, "does not fit 64 bits"),
    ("\ud800", "not valid Unicode"),
])
def test_a_value_the_store_cannot_take_is_refused_naming_its_row_and_column(rows_module: Any, value: object,
                                                                               reason: str) -> None:
    rows = synthetic_rows(3)
    columns = flat(rows[:2]) + list(rows[2][:6]) + [value] + list(rows[2][7:])
    with pytest.raises(ValueError, match=f"column 6 of row 2: .*{reason}"):
        rows_module.encode(columns, WIDTH, 0, len(columns))


def test_every_truncation_and_any_damaged_byte_is_an_error_or_a_frame_of_whole_rows(rows_module: Any) -> None:
    columns = varied_columns(40, seed=11)
    columns[WIDTH * 5 + 3] = "é" * 10  # a UTF-8 text: its length and its bytes can be damaged too
    frame = rows_module.encode(columns, WIDTH, 0, len(columns))
    for end in range(len(frame)):
        with pytest.raises(ValueError, match="corrupt rows frame"):
            rows_module.decode(frame[:end])
    with pytest.raises(ValueError, match="bytes after the last row"):
        rows_module.decode(frame + b"\x00")
    generator = random.Random(5)
    outcomes = {"error": 0, "decoded": 0}
    for _ in range(3_000):
        damaged = bytearray(frame)
        for _ in range(generator.randint(1, 3)):
            damaged[generator.randrange(len(damaged))] = generator.randrange(256)
        try:
            decoded = rows_module.decode(bytes(damaged))
        except ValueError:
            outcomes["error"] += 1
        else:  # a damaged float, or a text's letters: still whole rows of values the store takes
            outcomes["decoded"] += 1
            assert len(decoded) % damaged[2] == 0
            assert all(value is None or type(value) in (str, int, float) for value in decoded)
    assert outcomes["error"] > 0 and outcomes["decoded"] > 0


@pytest.mark.parametrize("damage, reason", [
    (lambda frame: b"M" + frame[1:], "not a rows frame"),
    (lambda frame: frame[:1] + b"\x02" + frame[2:], "not a rows frame"),
    (lambda frame: frame[:3] + b"\xff\xff\xff\x7f" + frame[7:], "more rows than bytes"),
    (lambda frame: frame[:7] + b"\x01" + frame[8:], "a repeat in the first row"),
    (lambda frame: frame[:7] + b"\x09" + frame[8:], "an unknown tag"),
])
def test_a_damaged_header_or_tag_is_named(rows_module: Any, damage: Any, reason: str) -> None:
    columns = flat(synthetic_rows(4))
    with pytest.raises(ValueError, match=reason):
        rows_module.decode(damage(rows_module.encode(columns, WIDTH, 0, len(columns))))


def test_a_non_ascii_byte_in_an_ascii_text_is_refused(rows_module: Any) -> None:
    frame = bytearray(rows_module.encode(["abc"] + [None] * (WIDTH - 1), WIDTH, 0, WIDTH))
    frame[frame.index(b"abc")] = 0xC3
    with pytest.raises(ValueError, match="a non-ASCII byte in an ASCII text"):
        rows_module.decode(bytes(frame))


def test_the_codec_is_chosen_by_the_build_and_can_be_named() -> None:
    assert store_writer.rows_codec("marshal") is store_writer.MARSHAL_ROWS
    assert store_writer.rows_codec().name == ("native" if native.MODE == "compiled" else "marshal")
    with pytest.raises(ValueError, match="rows codec must be one of"):
        store_writer.rows_codec("json")


@pytest.mark.parametrize("codec", store_writer.ROWS_CODECS)
def test_the_outcome_log_stores_the_same_rows_with_either_codec(tmp_path: Path, codec: str) -> None:
    if codec == "native":
        require_native_build()
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60, rows_codec=codec)
    rows = synthetic_rows(700)
    rows[3] = rows[3][:5] + (None, "random_no_key", None) + rows[3][8:10] + (None,)
    rows[4] = rows[4][:7] + ("ünïcode-user ✓",) + rows[4][8:]
    for row in rows:
        log.record_request(row)
    log.record_request(("unsendable",) + rows[6][1:10] + (object(),))
    log.flush()  # stopped half-sent by the unsendable row: the rest goes with the next flush
    log.flush()
    log.close()
    assert (log.written_requests, log.rejected_records) == (700, 1)
    with sqlite3.connect(tmp_path / "outcomes.db") as connection:
        stored = connection.execute(f"SELECT {', '.join(store.REQUEST_COLUMNS)} FROM requests ORDER BY request_id").fetchall()
    assert stored == sorted(rows)
