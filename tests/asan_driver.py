"""Run balancer/_headers.c's parsers, built with AddressSanitizer, over random and damaged messages.

    python tests/asan_driver.py EXTENSION.so MESSAGES

Started by tests/test_c_memory.py with libasan preloaded and PYTHONMALLOC=malloc, so that every bytes
object is a malloc block of its own with a poisoned zone right after its closing NUL: a read past it,
which the parsers' scans rely on never making, is reported and fails the run.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balancer.hop_names import NOT_FORWARDED, NOT_RETURNED  # noqa: E402
from tests.test_parse_messages import PLAIN, PLAIN_REQUEST, mutated, random_request, random_response  # noqa: E402


def main() -> None:
    path, messages = sys.argv[1], int(sys.argv[2])
    spec = importlib.util.spec_from_file_location("balancer._headers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generator = random.Random(1)
    for _ in range(messages):
        for data in (random_response(generator), mutated(generator, PLAIN)):
            if module.parse_response(data, NOT_RETURNED) is not None:
                module.header_pairs(data)
        for data in (random_request(generator), mutated(generator, PLAIN_REQUEST)):
            if module.parse_request(data, 65536, NOT_FORWARDED) is not None:
                module.header_pairs(data)
            module.parse_request(data, generator.randrange(200), NOT_FORWARDED)
    for message in (PLAIN, PLAIN_REQUEST):  # every prefix, each a bytes object of exactly that size
        for end in range(len(message) + 1):
            module.parse_response(message[:end], NOT_RETURNED)
            module.parse_request(message[:end], 65536, NOT_FORWARDED)
    print("checked", messages)


if __name__ == "__main__":
    main()
