"""`python -m bench [--quick] [--profile]`: run every benchmark of issue #9 and write BENCHMARKS.md (and its raw
results, BENCHMARKS.json); `python -m bench --render BENCHMARKS.json` writes the report again from saved results."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from balancer import native
from bench.cold_start import measure_starts
from bench.errors import BenchError
from bench.instructions import MAKE_BENCH_KINDS as INSTRUCTION_KINDS
from bench.instructions import measure as count_instructions
from bench.loop_stalls import WRITERS
from bench.loop_stalls import measure as measure_stalls
from bench.nginx import nginx_command
from bench.perf_profile import record as record_perf
from bench.procstat import split_cpus
from bench.profile import record_profile
from bench.report import render_report
from bench.results import BenchResults
from bench.targets import evaluate_targets
from bench.results_file import load as load_results
from bench.results_file import save as save_results
from bench.runs import (
    FULL,
    QUICK,
    FixedRateSample,
    SaturationSample,
    Settings,
    interleaved,
    measure_fixed_rate,
    measure_saturation,
    median,
    openloop_command,
)
from bench.same_core import SAME_CORE_LABELS, SameCorePair, measure_pairs
from bench.stack import (
    FEATURE_BASELINE,
    FEATURE_CONFIGURATIONS,
    FLOOR_LABEL,
    KINDS,
    PRIORITY,
    WORKERS,
    BalancerOptions,
    Stack,
    Target,
    check_split,
    priority_label,
    workers_label,
)
from bench.tail_episodes import SLOW_MS as TAIL_SLOW_MS
from bench.tail_episodes import TailRun
from bench.tail_episodes import measure as measure_tail
from bench.tools import describe_code, describe_machine, ensure_tools, load_average
from bench.wrk import wrk_command
from tests.processes import REPO, artifacts_dir, may_lower_niceness

logger = logging.getLogger("bench")


def build_parser() -> argparse.ArgumentParser:
    """The harness's command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short round of everything (~1-2 minutes)")
    parser.add_argument("--profile", action="store_true", help="also sample the balancer with py-spy at saturation")
    parser.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="report file (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs, stores)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: write the report from the raw results an earlier run saved")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit code 0 when the report was written."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    settings = QUICK if args.quick else FULL
    if args.rounds:
        settings = replace(settings, rounds=args.rounds)
    console = Console(stderr=True, soft_wrap=True)
    try:
        if args.render is not None:
            results = load_results(args.render)
        else:
            results = run(settings, quick=args.quick, profile=args.profile, keep=args.keep)
            save_results(results, args.output.with_suffix(".json"))
    except BenchError as exc:
        console.print(f"[red]bench failed:[/red] {exc}")
        return 1
    args.output.write_text(render_report(results))
    console.print(f"wrote {args.output} ({'from ' + str(args.render) if args.render else 'and its raw results'}; "
                  f"the run took {results.seconds / 60:.1f} min; load average {results.load_before} → {results.load_after})")
    for check in evaluate_targets(results):
        colour = {True: "green", False: "red", None: "white"}[check.met] if check.established else "yellow"
        verdict = f"[{colour}]{check.verdict}[/{colour}]"
        console.print(f"  {check.kind:5} {check.goal}: {check.measured:.2f} {check.unit} {verdict} {check.shortfall}")
    return 0


def run(settings: Settings, *, quick: bool, profile: bool, keep: bool) -> BenchResults:
    """Start everything, measure, stop everything; the results."""
    tools = ensure_tools()
    machine = {**describe_machine(tools), "code measured": describe_code(REPO),
               "balancer request path": native.decide(native.PACKAGE_DIR, os.environ)[1] + " (`balancer/native.py`)"}
    artifacts = artifacts_dir()
    started, clock = datetime.now(UTC), time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.chmod(0o711)  # nginx workers run as nobody when started by root
    logger.info("work folder %s%s", workdir, "" if keep else " (removed after a successful run; --keep keeps it)")
    succeeded = False
    try:
        with Stack(workdir, nginx=tools["nginx"], artifacts=artifacts) as stack:
            body_file = stack.body_file
            saturation_targets, latency_targets, priority_targets = _start_everything(stack)
            load_before = load_average()
            saturate = partial(measure_saturation, settings=settings, body_file=body_file, wrk=tools["wrk"])
            for target in saturation_targets:  # fill connection pools and caches; not measured
                saturate(target, seconds=settings.warmup_s)
            saturation = interleaved(saturation_targets, settings.rounds, saturate, pause_s=settings.pause_s,
                                     what="saturation")
            by_name = {target.name: target for target in saturation_targets}
            same_core = _measure_same_core(by_name, settings, body_file, tools["wrk"])
            rates = {target.kind: median([s.requests_per_second for s in saturation[target.name]]) / 2
                     for target in latency_targets if target.name == f"{target.kind} balancer"}
            fixed_rate = interleaved(
                latency_targets, settings.fixed_rate_rounds,
                lambda target: measure_fixed_rate(target, rates[target.kind], settings, body_file),
                pause_s=settings.pause_s, what="fixed rate")
            # on a CPU of its own nothing competes with the hop: a priority changes nothing there
            fixed_rate_pinned = _measure_pinned_fixed_rate(
                [target for target in latency_targets if target not in priority_targets], settings, rates["noop"], body_file)
            workers_rate, workers_fixed_rate = _measure_workers_fixed_rate(by_name, saturation, settings, body_file)
            tail_runs = _measure_tail_episodes(by_name, settings, rates["noop"], body_file, workdir)
            cold_start = measure_starts(stack, starts=settings.cold_starts, rate=rates["noop"],
                                        windows=settings.cold_windows, window_s=settings.cold_window_s, settings=settings)
            load_after = load_average()
            results = BenchResults(
                settings=settings, quick=quick, targets=saturation_targets, saturation=saturation,
                fixed_rate=fixed_rate, rates=rates, machine=machine, load_before=load_before, load_after=load_after,
                started=started, seconds=0.0,
                commands=_commands(latency_targets, settings, rates, body_file, workdir),
                feature_labels=[options.label for options in FEATURE_CONFIGURATIONS] + [FLOOR_LABEL],
                same_core=same_core, fixed_rate_pinned=fixed_rate_pinned, cold_start=cold_start,
                cold_start_window_s=settings.cold_window_s, workers=WORKERS, workers_rate=workers_rate,
                workers_fixed_rate=workers_fixed_rate,
                priority=PRIORITY if priority_targets else None, priority_targets=priority_targets,
                tail_runs=tail_runs,
            )
            _add_perf_profiles(results, settings, body_file, tools["wrk"], workdir)
            if profile:
                _add_profile(results, settings, body_file, tools["wrk"], workdir)
        succeeded = True
    finally:
        if succeeded and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not succeeded:
            logger.info("work folder kept for its logs: %s", workdir)
    results.report_requests, results.report_seconds = _time_report(quick)
    logger.info("measuring event-loop stalls from the outcome log (bench/loop_stalls.py)")
    results.loop_stalls = [measure_stalls(writer, rate=5000, seconds=3 if quick else 6) for writer in WRITERS]
    logger.info("counting instructions per request with valgrind (bench/instructions.py)")
    try:
        results.instructions = count_instructions(list(INSTRUCTION_KINDS))
    except BenchError as exc:
        results.instructions_error = str(exc)
        logger.warning("instruction counts failed: %s", exc)
    results.seconds = time.monotonic() - clock
    return results


def _measure_same_core(by_name: dict[str, Target], settings: Settings, body_file: Path,
                       wrk: str) -> dict[str, list[SameCorePair]]:
    """The default balancer, then each feature alone, run at once with the lean one on one core (bench/same_core.py)."""
    lean = by_name[f"noop balancer ({FEATURE_BASELINE})"]
    measured = {}
    for label in SAME_CORE_LABELS:
        target = by_name["noop balancer" + ("" if label == "default" else f" ({label})")]
        logger.info("measuring %s against %s on one core, %d runs", target.name, lean.name, settings.same_core_pairs)
        measured[label] = measure_pairs(target, lean, settings.same_core_pairs, settings=settings, body_file=body_file,
                                        wrk=wrk, seconds=settings.same_core_s)
    return measured


def _measure_pinned_fixed_rate(latency_targets: list[Target], settings: Settings, rate: float,
                               body_file: Path) -> dict[str, list[FixedRateSample]]:
    """The no-op paths at the same fixed rate again, the hop on one CPU and the client and backends on the others."""
    split = split_cpus()
    if split is None:
        logger.info("one CPU: no fixed-rate runs with the hop on a CPU of its own")
        return {}
    return interleaved([target for target in latency_targets if target.kind == "noop"], settings.rounds,
                       lambda target: measure_fixed_rate(target, rate, settings, body_file, pinned=split),
                       pause_s=settings.pause_s, what="fixed rate, hop on a CPU of its own")


def _measure_tail_episodes(by_name: dict[str, Target], settings: Settings, rate: float, body_file: Path,
                           workdir: Path) -> list[TailRun]:
    """Traced fixed-rate runs of the no-op balancer and nginx: what their slow answers are made of."""
    targets = [by_name["noop balancer"], by_name["noop nginx"]]
    logger.info("tracing fixed-rate runs at %.0f req/s (bench/tail_episodes.py), %d rounds", rate, settings.rounds)
    return measure_tail(targets, rate, settings.rounds, settings, body_file, TAIL_SLOW_MS, workdir)


def _measure_workers_fixed_rate(by_name: dict[str, Target], saturation: dict[str, list[SaturationSample]],
                                settings: Settings, body_file: Path) -> tuple[float, dict[str, list[FixedRateSample]]]:
    """Direct calls, the balancer with WORKERS processes and nginx with as many workers, at half that balancer's
    median saturation rate (its own fixed-rate target)."""
    label = workers_label(WORKERS)
    balancer = by_name[f"noop balancer ({label})"]
    rate = median([sample.requests_per_second for sample in saturation[balancer.name]]) / 2
    targets = [by_name["noop direct"], balancer, by_name[f"noop nginx ({label})"]]
    return rate, interleaved(targets, settings.rounds, lambda target: measure_fixed_rate(target, rate, settings, body_file),
                             pause_s=settings.pause_s, what=f"fixed rate, {label}")


def _time_report(quick: bool) -> tuple[int, float]:
    """Seconds `build_report` takes over a synthetic store of 1,000,000 requests (200,000 with --quick)."""
    from balancer.report_synthetic import time_report, write_synthetic_store

    requests = 200_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory(prefix="bench-report-") as folder:
        store = Path(folder) / "outcomes.db"
        logger.info("writing a synthetic store of %d requests", requests)
        write_synthetic_store(store, requests=requests)
        return requests, time_report(store, repeat=2)


def _start_everything(stack: Stack) -> tuple[list[Target], list[Target], list[Target]]:
    """All processes, started in parallel; (targets of the saturation rounds, of the fixed-rate rounds, and those
    of the latter run at PRIORITY)."""
    backends = {kind: stack.backends(kind) for kind in KINDS}
    stack.ready()
    saturation_targets: list[Target] = []
    latency_targets: list[Target] = []
    priority_targets: list[Target] = []
    for kind, (upstreams, backend_pids) in backends.items():
        configurations = FEATURE_CONFIGURATIONS if kind == "noop" else FEATURE_CONFIGURATIONS[:1]
        balancers = [stack.balancer(kind, options, upstreams, backend_pids) for options in configurations]
        main_three = [stack.direct(kind, upstreams, backend_pids), balancers[0],
                      stack.nginx_proxy(kind, upstreams, backend_pids)]
        saturation_targets += main_three + balancers[1:]
        if kind == "noop":
            saturation_targets += [stack.floor(kind, upstreams, backend_pids, server) for server in ("balancer", "aiohttp")]
            # server.workers: the balancer's processes against as many nginx workers
            saturation_targets += [
                stack.balancer(kind, BalancerOptions(workers_label(WORKERS), workers=WORKERS), upstreams, backend_pids),
                stack.nginx_proxy(kind, upstreams, backend_pids, workers=WORKERS)]
        latency_targets += main_three
        if kind == "noop":  # the same rate with the outcome log and metrics off: is the log in the tail?
            latency_targets += [target for target in balancers if target.name.endswith(f"({FEATURE_BASELINE})")]
            priority_targets = _priority_targets(stack, upstreams, backend_pids)
            latency_targets += priority_targets
    stack.ready()
    for target in [*saturation_targets, *(target for target in latency_targets if target not in saturation_targets)]:
        if target.hop != "direct":
            check_split(target, stack.body)
    return saturation_targets, latency_targets, priority_targets


def _priority_targets(stack: Stack, upstreams: dict[str, str], backend_pids: tuple[int, ...]) -> list[Target]:
    """The balancer with server.priority and nginx with worker_priority at PRIORITY, ahead of the backends and the
    client on the CPUs they share (fixed-rate rounds only); none where the OS refuses a lower niceness."""
    if not may_lower_niceness():
        logger.info("no runs at priority %d: lowering the niceness needs root or CAP_SYS_NICE", PRIORITY)
        return []
    label = priority_label(PRIORITY)
    return [stack.balancer("noop", BalancerOptions(label, priority=PRIORITY), upstreams, backend_pids),
            stack.nginx_proxy("noop", upstreams, backend_pids, priority=PRIORITY)]


def _add_perf_profiles(results: BenchResults, settings: Settings, body_file: Path, wrk: str, workdir: Path) -> None:
    """perf's profile of the balancer and of nginx at saturation (no-op backends), one after the other."""
    for hop in ("balancer", "nginx"):
        target = results.target("noop", hop)
        assert target is not None
        logger.info("profiling %s with perf", target.name)
        try:
            results.perf_profiles.append(record_perf(target, settings, body_file, wrk=wrk, workdir=workdir,
                                                     seconds=settings.saturation_s))
        except BenchError as exc:
            results.perf_error = str(exc)
            logger.warning("perf profile failed: %s", exc)
            return


def _add_profile(results: BenchResults, settings: Settings, body_file: Path, wrk: str, workdir: Path) -> None:
    target = results.target("noop", "balancer")
    assert target is not None
    logger.info("profiling %s with py-spy", target.name)
    try:
        results.profile = record_profile(target, settings, body_file, wrk=wrk, workdir=workdir,
                                         seconds=4 if results.quick else 10)
    except BenchError as exc:
        results.profile_error = str(exc)
        logger.warning("profile failed: %s", exc)


def _commands(targets: list[Target], settings: Settings, rates: dict[str, float], body_file: Path,
              workdir: Path) -> dict[str, str]:
    """Representative command lines of this run, for the report."""
    balancer = next(target for target in targets if target.hop == "balancer" and target.kind == "noop")
    direct = next(target for target in targets if target.hop == "direct" and target.kind == "noop")

    def wrk_line(target: Target) -> str:
        variables = f"BENCH_BODY_FILE={body_file.name} BENCH_USERS={settings.users}"
        if target.spread:
            variables += f" BENCH_TARGETS={','.join(target.spread)}"
        command = wrk_command(target.url, threads=settings.threads, connections=settings.connections,
                              seconds=settings.saturation_s)
        return f"{variables} {shlex.join(_relative(command))}"

    return {
        "harness": "make bench  # = .venv/bin/python -m bench [--quick] [--profile]",
        "saturation, balancer": wrk_line(balancer),
        "saturation, direct": wrk_line(direct),
        "fixed rate": shlex.join(_relative(openloop_command(balancer, rates["noop"], settings, body_file))),
        "nginx": shlex.join(_relative(nginx_command("nginx", workdir / "nginx-noop"))),
        "balancer": shlex.join(_relative(list(balancer.command))),
    }


def _relative(command: Sequence[str]) -> list[str]:
    """Paths inside the repository and the interpreter's own path shortened for the report."""
    shortened = []
    for part in command:
        if part == sys.executable:
            part = ".venv/bin/python"
        elif part.startswith(str(REPO) + "/"):
            part = part[len(str(REPO)) + 1:]
        shortened.append(part)
    return shortened


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    raise SystemExit(main())
