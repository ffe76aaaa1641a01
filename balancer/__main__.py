"""Command line: `balancer serve | load | report | demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _workers(text: str) -> int:
    """--workers: a whole number, or auto."""
    from balancer.config import AUTO_WORKERS, parse_workers

    value = parse_workers(text)
    if isinstance(value, int):
        return value
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number, or {AUTO_WORKERS}") from None


def _serve(args: argparse.Namespace) -> int:
    from balancer.app import ServeOptions, serve

    return serve(ServeOptions(
        config=Path(args.config), host=args.host, port=args.port, admin_host=args.admin_host,
        admin_port=args.admin_port, store=args.store,
        admin_token=args.admin_token or os.environ.get("BALANCER_ADMIN_TOKEN") or None,
        drain_timeout_s=args.drain_timeout, event_loop=args.event_loop, workers=args.workers, priority=args.priority,
        worker_socket=args.worker_socket, log_level=args.log_level,
    ))


def _load(args: argparse.Namespace) -> int:
    from balancer.loadgen import load_command

    return load_command(args)


def _report(args: argparse.Namespace) -> int:
    from balancer.report import report_command

    return report_command(args)


def _demo(args: argparse.Namespace) -> int:
    from balancer.demo import demo_command

    return demo_command(args)


COMMANDS = ("serve", "load", "report", "demo")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's argument parser; `command`, when known, skips importing the others' heavy modules."""
    parser = argparse.ArgumentParser(prog="balancer", description="A/B-testing load balancer for ML model containers.")
    parser.add_argument("--log-level", default=os.environ.get("BALANCER_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the balancer")
    serve.add_argument("--config", default="experiments/default.yaml", help="experiment YAML")
    serve.add_argument("--host", help="public host (default: the file's server.host)")
    serve.add_argument("--port", type=int, help="public port (default: the file's server.port, 8080)")
    serve.add_argument("--admin-host", help="admin host (default 127.0.0.1)")
    serve.add_argument("--admin-port", type=int, help="admin port (default 8081)")
    serve.add_argument("--store", help="SQLite outcome store (default var/outcomes.db)")
    serve.add_argument("--admin-token", help="bearer token for admin endpoints (or env BALANCER_ADMIN_TOKEN)")
    serve.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to finish in-flight requests on stop")
    serve.add_argument("--workers", type=_workers, help="processes serving the public port, or auto: one per CPU "
                       "(default: the file's server.workers, 1); more than one: a supervisor process runs them")
    serve.add_argument("--priority", type=int, metavar="NICENESS", help="the balancer's niceness, -20 to 19 "
                       "(default: the file's server.priority; none: as started); below 0 needs CAP_SYS_NICE")
    serve.add_argument("--worker-socket", help=argparse.SUPPRESS)  # set by the supervisor for its workers
    serve.add_argument("--event-loop", choices=("uvloop", "asyncio"), default=os.environ.get("BALANCER_EVENT_LOOP", "uvloop"),
                       help="uvloop (default; C transports) or asyncio (the standard library's)")
    serve.set_defaults(handler=_serve)

    from balancer.loadgen import add_load_arguments

    load = commands.add_parser("load", help="replay held-out rows as traffic, optionally with feedback")
    add_load_arguments(load)
    load.set_defaults(handler=_load)

    report = commands.add_parser("report", help="compare the variants from the outcome store")
    if command in (None, "report"):
        # numpy, scipy and statsmodels take seconds to import: only the report needs them
        from balancer.report import add_report_arguments

        add_report_arguments(report)
    report.set_defaults(handler=_report)

    demo = commands.add_parser("demo", help="train, start everything, drive traffic, print the report")
    demo.add_argument("--requests", type=int, default=3000)
    demo.add_argument("--concurrency", type=int, default=16)
    demo.add_argument("--users", type=int, default=500)
    demo.add_argument("--workdir", default="var/demo")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `balancer` console script."""
    words = sys.argv[1:] if argv is None else argv
    command = next((word for word in words if word in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
