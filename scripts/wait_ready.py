"""Wait until the balancer answers and every upstream endpoint it knows is available.

`make up` runs this after `docker-compose up -d`, so `make load` right after finds
the models warm rather than a 503 from a variant still starting::

    python scripts/wait_ready.py --token-file var/admin-token --timeout 120
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def unavailable_endpoints(admin_url: str, token: str) -> list[str]:
    """The variant/address of every endpoint the balancer cannot use yet; raises OSError if it does not answer."""
    request = urllib.request.Request(f"{admin_url}/admin/upstreams", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=3) as response:
        endpoints = json.load(response)
    if not endpoints:
        return ["(no endpoints resolved yet)"]
    return [f"{endpoint['variant']}/{endpoint['address']}" for endpoint in endpoints if not endpoint["available"]]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 once ready, 1 after the timeout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="http://127.0.0.1:8081")
    parser.add_argument("--token-file", type=Path, required=True, help="file holding the admin bearer token")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    token = args.token_file.read_text(encoding="utf-8").strip()
    started = time.monotonic()
    waiting_for: list[str] | str = "the balancer's admin port"
    while time.monotonic() - started < args.timeout:
        try:
            waiting_for = unavailable_endpoints(args.admin_url, token)
        except urllib.error.HTTPError as error:
            print(f"wait_ready: {args.admin_url}/admin/upstreams answered {error.code}", file=sys.stderr)
            return 1
        except OSError:
            waiting_for = "the balancer's admin port"
        if not waiting_for:
            print(f"stack ready in {time.monotonic() - started:.0f}s")
            return 0
        time.sleep(1.0)
    print(f"wait_ready: not ready after {args.timeout:.0f}s, still waiting for {waiting_for} (see `make logs`)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
