"""The report's sections on what bounds the balancer: its layers, direct calls, perf's profile."""

from __future__ import annotations

import math
import statistics

from bench import perf_profile
from bench.perf_profile import KERNEL, PerfProfile
from bench.stack import AIOHTTP_FLOOR_LABEL, FEATURE_BASELINE, FLOOR_LABEL
from bench.report_text import as_number, as_signed, percent
from bench.results import BenchResults, KIND_TITLES


def bounds_section(results: BenchResults) -> str:
    """Where the balancer's CPU per request goes, from targets measured side by side in this run."""
    floor = results.target("noop", "balancer", FLOOR_LABEL)
    aiohttp_floor = results.target("noop", "balancer", AIOHTTP_FLOOR_LABEL)
    lean = results.target("noop", "balancer", FEATURE_BASELINE)
    full = results.target("noop", "balancer")
    nginx = results.target("noop", "nginx")
    if floor is None or aiohttp_floor is None or lean is None or full is None or nginx is None:
        return "## What bounds the balancer\n\n_Not measured in this run._\n"
    floor_cpu, lean_cpu, full_cpu = results.hop_cpu(floor), results.hop_cpu(lean), results.hop_cpu(full)
    aiohttp_cpu, nginx_cpu = results.hop_cpu(aiohttp_floor), results.hop_cpu(nginx)
    floor_kernel = results.hop_kernel_cpu(floor)
    return (
        "## What bounds the balancer\n\n"
        "CPU per proxied request at saturation (no-op backends, median over the rounds above), split by running "
        "beside the balancer two floor processes (`bench/floor_proxy.py`, on uvloop like the balancer): the balancer's "
        "own HTTP server (`balancer/http_server.py`, httptools on `asyncio.Protocol`, compiled like the rest of the "
        "request path) and upstream client, answering from the "
        "upstream connection's callback as the balancer's fast path does, with no assignment, logging, metrics or "
        "header handling; and the same forwarding behind aiohttp's `web.Server`, which the public port ran on "
        "before.\n\n"
        "| layer | CPU µs/request | share of the balancer |\n|---|---|---|\n"
        f"| server + event loop + upstream client (the floor) | {as_number(floor_cpu, 0)} | "
        f"{as_number(percent(floor_cpu, full_cpu), 0)} % |\n"
        f"| &nbsp;&nbsp;of which in the kernel (loopback TCP, both sides' work on `send`) | {as_number(floor_kernel, 0)} | "
        f"{as_number(percent(floor_kernel, full_cpu), 0)} % |\n"
        f"| proxy logic: ids, assignment, header filtering, response headers | "
        f"{as_signed(lean_cpu - floor_cpu, 0)} | {as_number(percent(lean_cpu - floor_cpu, full_cpu), 0)} % |\n"
        f"| outcome log (its store writer process included) + metrics | {as_signed(full_cpu - lean_cpu, 0)} | "
        f"{as_number(percent(full_cpu - lean_cpu, full_cpu), 0)} % |\n"
        f"| **balancer** | **{as_number(full_cpu, 0)}** | 100 % |\n"
        f"| the floor behind aiohttp's server instead, for comparison | {as_number(aiohttp_cpu, 0)} | |\n"
        f"| nginx, for scale | {as_number(nginx_cpu, 0)} | |\n\n"
        f"The floor costs {as_number(floor_cpu / 120 * 100, 0)} % of the 120 µs target on its own; aiohttp's server "
        f"would cost {as_signed(aiohttp_cpu - floor_cpu, 0)} µs more per request. Each request makes two `send` and two "
        "`recv` system calls, as nginx's does; the rest is uvloop, httptools, the compiled request path and the CPython "
        "object machinery (allocation, attribute and dictionary lookups) it still goes through. Several worker processes "
        "(`server.workers`, \"Several worker processes\" above) share the load of one port, not the CPU a request "
        "costs." + negative_layer_sentence(floor_cpu, lean_cpu, full_cpu) + "\n" + model_cpu_paragraph(results)
    )


def negative_layer_sentence(floor_cpu: float, lean_cpu: float, full_cpu: float) -> str:
    """What a layer that came out below zero means ('' when none did)."""
    if not (lean_cpu < floor_cpu or full_cpu < lean_cpu):
        return ""
    return (" A layer below zero is not a saving: these are separate processes, each measured in its own saturation "
            "runs, whose CPU per request moved more between rounds than that layer costs. \"Instructions per "
            "request\" below splits the same layers with counts the machine cannot move.")


def spread_comparison(raw: list[float], adjusted: list[float]) -> str:
    """How the steal adjustment changed the pairs' interquartile range ('' with fewer than 4 pairs)."""
    if len(raw) < 4 or len(adjusted) < 4:
        return ""
    def iqr(values: list[float]) -> float:
        low, _, high = statistics.quantiles(values, n=4)
        return high - low
    before, after = iqr(raw), iqr(adjusted)
    finding = ("steal explains part of the spread between pairs" if after < 0.75 * before
               else "steal explains little of the spread between pairs")
    return f" (interquartile range {after:.1f} points, against {before:.1f} unadjusted: {finding})"


def direct_bound_section(results: BenchResults) -> str:
    """Throughput against direct calls, as CPU per request of the whole machine times how busy its cores were."""
    title = "## What bounds throughput against direct calls\n\n"
    rows, sentences = [], []
    for kind, kind_title in KIND_TITLES.items():
        direct, balancer, nginx = (results.target(kind, hop) for hop in ("direct", "balancer", "nginx"))
        if direct is None or balancer is None or nginx is None or math.isnan(results.machine_cpu(direct)):
            continue
        direct_cpu, direct_busy, direct_rps = results.machine_cpu(direct), results.machine_busy(direct), results.rps(direct)
        for target in (direct, balancer, nginx):
            cpu, busy = results.machine_cpu(target), results.machine_busy(target)
            rows.append(f"| {kind_title} | {target.hop} | {as_number(results.rps(target), 0)} | {as_number(cpu, 0)} "
                        f"| {as_number(busy, 2)} | {as_number(direct_cpu / cpu, 2)}× | {as_number(busy / direct_busy, 2)}× "
                        f"| {as_number(results.rps(target) / direct_rps, 2)}× |\n")
        if kind == "noop":
            balancer_cpu = results.machine_cpu(balancer)
            sentences.append(
                f"With the no-op backends a direct call cost the machine {as_number(direct_cpu, 0)} µs of CPU and a call "
                f"through the balancer {as_number(balancer_cpu, 0)} µs ({as_number(balancer_cpu / direct_cpu, 1)}×), "
                f"through nginx {as_number(results.machine_cpu(nginx), 0)} µs. Half of direct calls' throughput, with "
                f"the cores as busy as direct calls kept them, needs a path of at most {as_number(2 * direct_cpu, 0)} µs "
                "per request, load generator and backends included: less than nginx's path costs here. The goal is "
                "out of reach of any proxy that needs a process of its own on these two shared cores; what the "
                "balancer can still win is its own CPU per request (see above).\n")
    if not rows:
        return title + "_Not measured in this run._\n"
    return (
        title + "At saturation all cores' busy time (`/proc/stat`: every process, the load generator's and the "
        "kernel's work included; idle and stolen time left out) divided by the requests served gives the CPU a "
        "request costs the whole machine on each path. A path's throughput is the cores it keeps busy divided by "
        "that cost, so its share of direct calls' throughput is the product of two factors: direct calls' CPU "
        "per request over the path's, and the cores the path kept busy over those direct calls kept busy (exactly "
        "so in each run; the columns are medians over rounds).\n\n"
        "| backends | path | req/s | machine CPU µs/req | cores busy | CPU factor | busy factor | share of direct "
        "|\n|---|---|---|---|---|---|---|---|\n" + "".join(rows)
        + ("\n" + "".join(sentences) if sentences else "")
    )


def perf_section(results: BenchResults) -> str:
    """perf's samples of the balancer and nginx at saturation: share per binary, then the heaviest functions."""
    title = "## Where the CPU goes, kernel included (perf)\n\n"
    if not results.perf_profiles:
        return title + (f"_Not recorded in this run: {results.perf_error}._\n" if results.perf_error
                        else "_Not recorded in this run._\n")
    def binaries(profile: PerfProfile) -> str:
        return "; ".join(f"{_binary(binary)} {share:.1f} %" for binary, share in profile.by_binary)

    rows = "".join(f"| {profile.hop} | {profile.kernel_share:.1f} % | {binaries(profile)} |\n"
                   for profile in results.perf_profiles)
    functions = []
    for profile in results.perf_profiles:
        functions.append(f"\n{profile.hop} ({profile.cpu_seconds:.2f} CPU seconds sampled), heaviest functions:\n\n"
                         "| share | binary | function |\n|---|---|---|\n"
                         + "".join(f"| {share:.1f} % | {_binary(binary)} | `{name}` |\n"
                                   for binary, name, share in profile.top_functions))
    return (
        title + f"`perf record -e cpu-clock -F {perf_profile.SAMPLE_RATE_HZ}` on the hop's processes (the balancer and its store "
        "writer; nginx's master and worker) during one more saturation run each with the no-op backends, then "
        "`perf report --sort dso` and `--sort dso,sym` (`bench/perf_profile.py`; binaries and functions under "
        "0.5 % left out). Unlike py-spy it sees the kernel's share of the work, where loopback TCP runs.\n\n"
        "| hop | kernel | by binary |\n|---|---|---|\n" + rows + "".join(functions)
    )


def _binary(name: str) -> str:
    """A perf binary as the report names it: the kernel in words, a file in code."""
    return "kernel" if name == KERNEL else f"`{name}`"


def model_cpu_paragraph(results: BenchResults) -> str:
    """Why a request costs the hops more CPU with the real models: how busy each hop was at saturation."""
    hops = {(kind, hop): results.target(kind, hop) for kind in KIND_TITLES for hop in ("balancer", "nginx")}
    if any(target is None for target in hops.values()):
        return ""
    cpu = {key: results.hop_cpu(target) for key, target in hops.items()}
    busy = {key: 100 * results.saturation_busy(target) for key, target in hops.items()}
    return (
        f"\nWith the real model servers a request costs the balancer {as_number(cpu['model', 'balancer'], 0)} µs of CPU, "
        f"against {as_number(cpu['noop', 'balancer'], 0)} µs with the no-op backends, and nginx "
        f"{as_number(cpu['model', 'nginx'], 0)} against {as_number(cpu['noop', 'nginx'], 0)} µs. Saturation there is the "
        f"models': the balancer was busy {as_number(busy['model', 'balancer'], 0)} % of one core "
        f"(against {as_number(busy['noop', 'balancer'], 0)} % with the no-op backends) and nginx "
        f"{as_number(busy['model', 'nginx'], 0)} % (against {as_number(busy['noop', 'nginx'], 0)} %). A hop that waits "
        "for its backends between requests pays a wake-up from `epoll_wait` per request instead of serving a batch "
        "per wake-up, as at the fixed rate (see \"What bounds the tail latency\").\n"
    )
