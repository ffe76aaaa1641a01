"""CPU per request row to encode it as the outcome log records it, and to decode it in the store writer.

    python -m bench.rows_codec [--rows 50000] [--repeats 5]

Both implementations of the one format (`balancer/_rows.c`, and `balancer/rows.py` for a balancer
run without its compiled extensions) encode the same synthetic rows (`bench.store_insert`)
with `Rows.append`, take them as one frame, and decode it; each figure is the least process CPU
time per row over the repeats.
"""

from __future__ import annotations

import argparse
import importlib
import time
from types import ModuleType

from balancer import native, store_writer
from balancer import rows as python_rows
from bench.store_insert import synthetic_rows


def implementations() -> dict[str, ModuleType]:
    """The implementations here: Python's always, C's where it is built from its current source."""
    found = {"Python": python_rows}
    if native.decide(native.PACKAGE_DIR, {})[0]:
        found["C"] = importlib.import_module(f"{native.PACKAGE}._rows")
    return found


def measure(rows: int = 50_000, repeats: int = 5) -> dict[str, tuple[float, float]]:
    """Implementation -> (µs to append a row, µs to decode it): the least over `repeats`."""
    sample = synthetic_rows(rows)
    results = {}
    for name, module in implementations().items():
        append_s, decode_s = [], []
        for _ in range(repeats):
            buffer = module.Rows(store_writer.WIDTH, store_writer.NULLABLE_POSITIONS)
            start = time.process_time()
            for row in sample:
                buffer.append(row)
            frame, _ = buffer.take()
            middle = time.process_time()
            module.decode(frame)
            append_s.append(middle - start)
            decode_s.append(time.process_time() - middle)
        results[name] = (min(append_s) / rows * 1e6, min(decode_s) / rows * 1e6)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, (append_us, decode_us) in measure(args.rows, args.repeats).items():
        print(f"{name:7s} append {append_us:6.2f} µs/row   decode {decode_us:6.2f} µs/row")


if __name__ == "__main__":
    main()
