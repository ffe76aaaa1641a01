"""BENCHMARKS.md from one run's samples: tables per backend kind, feature cost, targets, profile."""

from __future__ import annotations

import math
import statistics

from bench.instructions import FLUSH_EVERY, LONG_RUN, REPEATS, SHORT_RUN, WRITER
from bench.profile import SAMPLE_RATE_HZ, Profile
from bench.report_cost import SAME_CORE_HOW, same_core_paragraph
from bench.runs import median
from bench.stack import ASYNCIO_LABEL, FEATURE_BASELINE, INTERPRETED_ASYNCIO_LABEL, INTERPRETED_LABEL
from bench.report_bounds import bounds_section, direct_bound_section, perf_section, spread_comparison
from bench.report_tail import cold_start_section, episodes_section, stalls_section, tail_section
from bench.report_text import as_cpu, as_number, as_range, as_ratio, as_share, as_signed, percent
from bench.results import BenchResults, KIND_TITLES
from bench.targets import CONFIDENCE, evaluate_targets, throughput_costs


# Linux's CFS weight of each niceness from -20 to 19 (kernel/sched/core.c, sched_prio_to_weight)
NICE_WEIGHTS = dict(zip(range(-20, 20), (
    88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916, 9548, 7620, 6100, 4904, 3906, 3121, 2501,
    1991, 1586, 1277, 1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15),
    strict=True))


PROFILE_PLACEHOLDER = (
    "_Not recorded in this run._ `make bench BENCH_ARGS=--profile` samples the balancer with py-spy at "
    "saturation (no-op backends) and fills this section with its top self-time frames.\n\n"
    "The section below, \"What bounds the balancer\", splits its CPU without a profiler."
)


def _priority_section(results: BenchResults) -> str:
    """The default balancer and nginx against both at niceness `priority`, in the same fixed-rate rounds."""
    direct, full, nginx = (results.target("noop", hop) for hop in ("direct", "balancer", "nginx"))
    ahead, nginx_ahead = results.priority_target("balancer"), results.priority_target("nginx")
    if results.priority is None or direct is None or ahead is None or not results.fixed_rate_samples(ahead):
        return ""
    niceness = results.priority
    rows = []
    for label, target in (("balancer", full), (f"balancer, `server.priority: {niceness}`", ahead), ("nginx", nginx),
                          (f"nginx, `worker_priority {niceness}`", nginx_ahead)):
        runs = results.fixed_rate_samples(target)
        if target is None or not runs:
            continue
        rows.append(
            f"| {label} | {as_number(results.latency(target, 'p99'), 2)} "
            f"| {as_signed(results.latency(target, 'p99') - results.latency(direct, 'p99'))} "
            f"| {', '.join(as_number(sample.p99_ms, 1) for sample in runs)} "
            f"| {as_number(100 * results.fixed_rate_busy(target), 0)} % | {as_share(results.fixed_rate_wait(target))} "
            f"| {as_share(results.fixed_rate_queued(target))} |\n")
    return (
        f"## Ahead of the backends on shared cores (`server.priority: {niceness}`)\n\n"
        f"The fixed-rate rounds of the no-op backends ({results.rates.get('noop', math.nan):.0f} req/s, cores shared) "
        f"also ran the balancer with `server.priority: {niceness}` and nginx with `worker_priority {niceness}`: the "
        "hop at that niceness, the backends and the load generator at 0. Linux's scheduler then weighs the hop's "
        f"threads {NICE_WEIGHTS[niceness]:,} against their 1,024 (`sched_prio_to_weight`): a woken hop gets a CPU "
        "ahead of them and keeps it for its turn.\n\n"
        "| path | p99 ms | added p99 ms | each round's p99 ms | busy | waited for a CPU | queued |\n"
        "|---|---|---|---|---|---|---|\n" + "".join(rows)
        + "\n\"Waited\" (for a CPU) and \"queued\" (in the client, for a connection) are explained under \"What bounds "
        "the tail latency\". `python -m bench.compare --base HEAD --method latency --cores shared --priority "
        f"{niceness}` compares the two balancers alone, in pairs of runs.\n"
    )


def _workers_section(results: BenchResults) -> str:
    balancer, nginx = results.workers_targets()
    direct = results.target("noop", "direct")
    one = results.target("noop", "balancer")
    if balancer is None or nginx is None or direct is None or not results.workers_samples(balancer):
        return ""
    label = f"{results.workers} workers"
    rate = results.workers_rate or math.nan
    rows = []
    for name, target in ((f"balancer, {label}", balancer), (f"nginx, {label}", nginx), ("direct", direct)):
        runs = results.workers_samples(target)
        busy = median([sample.proxy_busy for sample in runs])
        rows.append(
            f"| {name} | {as_number(results.rps(target), 0)} | "
            f"{'—' if target is direct else as_ratio(results.rps(target), results.rps(direct))} "
            f"| {as_number(results.workers_latency(target, 'p50'), 2)} | {as_number(results.workers_latency(target, 'p99'), 2)} "
            f"| {'—' if target is direct else as_signed(results.workers_latency(target, 'p50') - results.workers_latency(direct, 'p50'))} "
            f"| {'—' if target is direct else as_signed(results.workers_latency(target, 'p99') - results.workers_latency(direct, 'p99'))} "
            f"| {'—' if target is direct else as_cpu(results.hop_cpu(target), results.hop_kernel_share(target))} "
            f"| {'—' if target is direct else f'{busy * 100:.0f} %'} "
            f"| {', '.join(f'{sample.p99_ms:.1f}' for sample in runs)} |\n")
    return (
        f"## Several worker processes (`server.workers: {results.workers}`)\n\n"
        f"One balancer process serves what one core gives it. With `server.workers: {results.workers}` "
        "(`balancer/supervisor.py`) that many processes listen on the public port with SO_REUSEPORT, each with "
        "its own outcome-log writer, under a supervisor that serves the admin port (metrics summed over the "
        f"workers). Compared here with nginx at `worker_processes {results.workers}` (`listen ... reuseport`), "
        "no-op backends; saturation runs in the same interleaved rounds as above, then fixed-rate rounds at half "
        f"this balancer's own median saturation rate ({rate:.0f} req/s), direct calls included, interleaved. "
        "Hop CPU counts the supervisor, every worker and their store writers.\n\n"
        "| path | req/s at saturation | vs direct | p50 ms | p99 ms | added p50 ms | added p99 ms "
        "| hop CPU µs/req (kernel share) | busy at the fixed rate | each round's p99 ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "".join(rows) +
        f"\n- balancer with {label} / with one process, saturation: **{as_ratio(results.rps(balancer), results.rps(one))}**; "
        f"/ nginx with {label}: **{as_ratio(results.rps(balancer), results.rps(nginx))}**\n")


def render_report(results: BenchResults) -> str:
    """The whole BENCHMARKS.md."""
    settings = results.settings
    mode = "`--quick` smoke run" if results.quick else "full run"
    parts = [
        "# Benchmarks\n",
        f"Generated by `make bench` (`.venv/bin/python -m bench{' --quick' if results.quick else ''}"
        f"{' --profile' if results.profile or results.profile_error else ''}`) on "
        f"{results.started:%Y-%m-%d %H:%M} UTC in {results.seconds / 60:.1f} min: {mode}, "
        f"{settings.rounds} interleaved round{'s' if settings.rounds > 1 else ''}"
        + ("" if settings.fixed_rate_rounds == settings.rounds else
           f" ({settings.fixed_rate_rounds} for the fixed-rate runs of the tables by backend kind)")
        + ", every figure the median over rounds "
        "unless marked. Numbers from a loaded machine are only comparable within the run (see the load average).\n",
        _machine_section(results),
        _method_section(results),
        *(_kind_section(results, kind) for kind in KIND_TITLES if results.target(kind, "balancer")),
        _workers_section(results),
        _priority_section(results),
        _feature_section(results),
        _targets_section(results),
        bounds_section(results),
        direct_bound_section(results),
        perf_section(results),
        tail_section(results),
        episodes_section(results),
        cold_start_section(results),
        _instructions_section(results),
        stalls_section(results),
        _profile_section(results),
        _report_section(results),
        _raw_section(results),
    ]
    return "\n".join(part for part in parts if part).rstrip() + "\n"


def _machine_section(results: BenchResults) -> str:
    rows = [*results.machine.items(), ("load average at start (1 / 5 / 15 min)", results.load_before),
            ("load average at end (1 / 5 / 15 min)", results.load_after)]
    cores = results.machine.get("nproc", "?").split()[0]
    return ("## Machine\n\n| | |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)
            + f"\nA load average well above the core count ({cores}) means other work shared the CPUs: absolute "
            "figures are then low and noisy, while ratios between interleaved configurations hold up better.\n")


def _method_section(results: BenchResults) -> str:
    settings = results.settings
    commands = "".join(f"- {what}:\n  `{command}`\n" for what, command in results.commands.items())
    rates = ", ".join(f"{kind} {rate:.0f} req/s" for kind, rate in results.rates.items())
    return f"""## Method

Every process runs on loopback, started by the harness (`bench/stack.py`): two backends per kind (one per
variant; `tests/noop_backend.py` on uvloop, or the real `model_a` / `model_b` servers), a balancer per
configuration and one nginx per kind. On uvloop a no-op backend costs about a quarter less CPU per request at the
fixed rate than on asyncio's loop (`python -m bench.backend_cost`), CPU the hop and the client then have. Three paths per kind:

- **direct**: the load generator talks to both backends itself, half the connections each;
- **balancer**: `python -m balancer serve`, one process, sticky 50/50 on `X-User-ID`, outcome log and metrics on;
- **nginx**: one worker (`worker_processes 1`, like the balancer's one process), `split_clients` 50/50 on
  `$http_x_user_id`, upstream keep-alive, `access_log off`, the same request/response headers added
  (`bench/nginx.conf.template`).

Every request is `POST /predict` with the first held-out row (`{{"instances": [[30 floats]]}}`) and an
`X-User-ID` cycling over {settings.users} users.

- **Saturation** (closed loop): `wrk -t {settings.threads} -c {settings.connections} -d {settings.saturation_s:g}s`
  with `bench/post.lua`; requests/s as wrk counts them.
- **Fixed rate** (open loop) at half the balancer's median saturation rate of the same kind ({rates}):
  `python -m bench.openloop`, a small C client (`bench/openloop.c`, compiled on first use: one thread,
  epoll, non-blocking keep-alive sockets, {settings.rate_connections} connections, {settings.warmup_s:g} s
  warm-up then {settings.fixed_rate_s:g} s measured). Debian has no `wrk2` and wrk cannot hold a rate, so
  this client schedules request *i* at *start + i / rate* and sleeps to the microsecond until it is due;
  latency runs from dispatch to the kernel's receive timestamp of the answer's last byte (so the client's
  own scheduling delays stay out of it), and time spent waiting for a free connection counts (no
  coordinated omission). The client's own timer lateness and CPU are reported separately (raw runs below).
- **Added latency** of a hop = its median percentile − direct's median percentile at the same rate.
- **CPU per request** = user + system seconds of the hop's processes (`/proc/<pid>/stat` utime + stime, all
  threads; nginx = master + worker) over a saturation run ÷ the requests wrk completed in it; the kernel
  share is stime's part (on loopback a `send` also runs the receiver's TCP work). "backends" is both
  backends' CPU on the same scale.
- **Interleaving**: each round runs every configuration once, starting one further along each round;
  {settings.pause_s:g} s pause between runs. Saturation rounds first, then {settings.fixed_rate_rounds} fixed-rate
  rounds.

Command lines of this run (ports and temp paths vary):

{commands}"""


def _kind_section(results: BenchResults, kind: str) -> str:
    direct, balancer, nginx = (results.target(kind, hop) for hop in ("direct", "balancer", "nginx"))
    rate = results.rates.get(kind, float("nan"))
    header = ("| path | req/s at saturation (min–max) | vs direct | p50 ms | p99 ms | added p50 ms | added p99 ms "
              "| hop CPU µs/req (kernel share) | backends CPU µs/req | errors |\n"
              "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for target in (direct, balancer, nginx):
        if target is None:
            continue
        samples = results.saturation.get(target.name, [])
        spread = [sample.requests_per_second for sample in samples]
        errors = sum(sample.errors for sample in samples) + sum(
            sample.errors for sample in results.fixed_rate.get(target.name, []))
        is_direct = target is direct
        rows.append(
            f"| {target.hop} | {as_number(results.rps(target), 0)} ({as_range(spread)}) "
            f"| {'—' if is_direct else as_ratio(results.rps(target), results.rps(direct))} "
            f"| {as_number(results.latency(target, 'p50'), 2)} | {as_number(results.latency(target, 'p99'), 2)} "
            f"| {'—' if is_direct else as_signed(results.latency(target, 'p50') - results.latency(direct, 'p50'))} "
            f"| {'—' if is_direct else as_signed(results.latency(target, 'p99') - results.latency(direct, 'p99'))} "
            f"| {'—' if is_direct else as_cpu(results.hop_cpu(target), results.hop_kernel_share(target))} "
            f"| {as_number(results.backend_cpu(target), 0)} | {errors} |\n")
    summary = (
        f"\n- balancer / direct throughput: **{as_ratio(results.rps(balancer), results.rps(direct))}**; "
        f"balancer / nginx: **{as_ratio(results.rps(balancer), results.rps(nginx))}**\n"
        f"- CPU per proxied request: balancer **{as_number(results.hop_cpu(balancer), 0)} µs**, nginx "
        f"**{as_number(results.hop_cpu(nginx), 0)} µs** ({as_ratio(results.hop_cpu(balancer), results.hop_cpu(nginx))}); "
        f"in user space {as_number(results.hop_cpu(balancer) - results.hop_kernel_cpu(balancer), 0)} µs vs "
        f"{as_number(results.hop_cpu(nginx) - results.hop_kernel_cpu(nginx), 0)} µs, in the kernel "
        f"{as_number(results.hop_kernel_cpu(balancer), 0)} µs vs {as_number(results.hop_kernel_cpu(nginx), 0)} µs\n"
        f"- hop latency added at {rate:.0f} req/s: balancer p50 {as_signed(results.latency(balancer, 'p50') - results.latency(direct, 'p50'))} ms, "
        f"p99 {as_signed(results.latency(balancer, 'p99') - results.latency(direct, 'p99'))} ms; nginx p50 "
        f"{as_signed(results.latency(nginx, 'p50') - results.latency(direct, 'p50'))} ms, "
        f"p99 {as_signed(results.latency(nginx, 'p99') - results.latency(direct, 'p99'))} ms\n")
    return (f"## {KIND_TITLES[kind]}\n\nLatency columns: fixed rate {rate:.0f} req/s (half the balancer's saturation "
            f"rate). Throughput and CPU: saturation.\n\n" + header + "".join(rows) + summary)


def _feature_section(results: BenchResults) -> str:
    lean = results.target("noop", "balancer", FEATURE_BASELINE)
    full = results.target("noop", "balancer")
    if lean is None or full is None:
        return "## Feature cost on the hot path\n\n_Not measured in this run._\n"
    rows = []
    for label in results.feature_labels:
        target = results.target("noop", "balancer", label)
        if target is None:
            continue
        rows.append(
            f"| {label} | {as_number(results.rps(target), 0)} | {as_signed(percent(results.rps(target), results.rps(lean)) - 100, 1)} % "
            f"| {as_number(results.hop_cpu(target), 0)} | {as_number(results.writer_cpu(target), 1)} "
            f"| {as_signed(results.hop_cpu(target) - results.hop_cpu(lean), 0)} "
            f"| {as_number(results.machine_cpu(target), 0)} |\n")
    random = results.target("noop", "balancer", "random")
    lines = [f"\nIn the rounds above (medians), outcome logging + metrics cost "
             f"{as_number(results.round_logging_cost() or 0.0, 1)} % of throughput and "
             f"{as_signed(results.hop_cpu(full) - results.hop_cpu(lean), 0)} µs of balancer CPU per request "
             f"(the balancer's process and its store writer's; the writer alone ran {as_number(results.writer_cpu(full), 1)} "
             f"µs per request); the whole machine's CPU per request, load generator and backends included, differed by "
             f"{as_signed(results.machine_cpu(full) - results.machine_cpu(lean), 0)} µs "
             f"({as_signed(percent(results.machine_cpu(full), results.machine_cpu(lean)) - 100, 1)} %).\n"]
    if results.same_core.get("default"):
        check = next(check for check in evaluate_targets(results) if SAME_CORE_HOW in check.goal)
        lines.insert(0, same_core_paragraph(results.same_core, results.settings, check.interval))
    elif results.cost_ratios:
        costs = sorted(throughput_costs(results.cost_ratios))
        settings = results.settings
        lines.insert(0, f"\n**Outcome logging + metrics cost {as_number(results.logging_cost() or 0.0, 1)} % of throughput** "
                        f"(target < 10 %): the median over {len(costs)} back-to-back pairs of {settings.cost_pair_s:g}-second "
                        f"saturation runs, default and {FEATURE_BASELINE}, alternating which goes first (the pairs ranged "
                        f"from {as_number(costs[0], 1)} % to {as_number(costs[-1], 1)} %). A pair runs seconds apart, so "
                        "it shares the machine's conditions, while rounds are a minute apart.\n")
        adjusted = sorted(throughput_costs(results.adjusted_cost_ratios()))
        if adjusted:
            steal = sorted(100 * share for pair in results.cost_steal for share in pair)
            lines.insert(1, f"\nThe hypervisor took {as_number(steal[0], 1)} % to {as_number(steal[-1], 1)} % of the machine's "
                            "CPU time during these runs (steal, `/proc/stat`), and not evenly between the two runs of a pair. "
                            "Divided by the share it left (requests/s ÷ (1 − steal): at saturation every core has work, "
                            "so stolen time is time no process of the run could use), the same pairs give "
                            f"**{as_number(statistics.median(adjusted), 1)} %**, ranging from {as_number(adjusted[0], 1)} % to "
                            f"{as_number(adjusted[-1], 1)} %{spread_comparison(costs, adjusted)}.\n")
    if random is not None:
        lines.append(f"Sticky vs random assignment (both with logging + metrics): sticky "
                     f"{as_signed(results.hop_cpu(full) - results.hop_cpu(random), 0)} µs/request, "
                     f"{as_signed(percent(results.rps(full), results.rps(random)) - 100, 1)} % throughput.\n")
    for label, what in ((INTERPRETED_LABEL, "Compiled request path (mypyc) vs interpreted"),
                        (ASYNCIO_LABEL, "uvloop vs asyncio's event loop"),
                        (INTERPRETED_ASYNCIO_LABEL, "Both (the balancer as it ran before them)")):
        other = results.target("noop", "balancer", label)
        if other is not None:
            lines.append(f"{what}: default {as_signed(results.hop_cpu(full) - results.hop_cpu(other), 0)} µs/request, "
                         f"{as_signed(percent(results.rps(full), results.rps(other)) - 100, 1)} % throughput.\n")
    return ("## Feature cost on the hot path\n\nNo-op backends, saturation; each configuration is its own balancer "
            "process started from a generated YAML (`server: {record_outcomes, export_metrics}`, `strategy:`), "
            "with `serve --event-loop` and `BALANCER_PURE_PYTHON=1` for the last three. "
            "\"default\" is the sticky balancer of the table above: compiled, on uvloop.\n\n"
            "\"of which store writer\" is the part of the CPU spent in the balancer's store writer process "
            "(`balancer/store_writer.py`, its child), which commits the outcome log; \"machine\" is all cores' busy "
            "time per request, load generator and backends included (see \"What bounds throughput against direct "
            "calls\").\n\n"
            f"| balancer configuration | req/s | vs {FEATURE_BASELINE} | CPU µs/req | of which store writer "
            "| Δ CPU µs/req | machine CPU µs/req |\n"
            "|---|---|---|---|---|---|---|\n" + "".join(rows) + "".join(lines))


def _targets_section(results: BenchResults) -> str:
    rows = []
    for check in evaluate_targets(results):
        decimals = 0 if check.unit in ("µs", "%") else 2
        verdict = check.verdict.replace("missed", "**missed**") if check.established else check.verdict
        comparison = "≤" if check.at_most else "≥"
        interval = ("" if check.interval is None else
                    f"{as_number(check.interval[0], decimals)} to {as_number(check.interval[1], decimals)} {check.unit} "
                    f"({len(check.samples)})")
        rows.append(f"| {check.goal} | {check.kind} | {as_number(check.measured, decimals)} {check.unit} | {interval} "
                    f"| {comparison} {check.limit:g} {check.unit} | {verdict} | {check.shortfall} |\n")
    return ("## Targets\n\n"
            f"\"Interval\": the {100 * CONFIDENCE:.0f} % confidence interval of the median of the measure taken once per round "
            "(per back-to-back pair for the logging cost; their number in brackets), from order statistics only "
            "(`scipy.stats.quantile_test`). On this shared machine one run's median can fall on either side of a "
            "goal, so a verdict stands only when the whole interval is on one side of it (one-sided "
            f"{50 * (1 + CONFIDENCE):.0f} %); otherwise it reads \"not established\".\n\n"
            "| target | backends | measured | interval | goal | verdict | missed by |\n|---|---|---|---|---|---|---|\n"
            + "".join(rows))


def _instructions_section(results: BenchResults) -> str:
    """Instructions per request from valgrind: the same split as above, immune to the machine's noise."""
    title = "## Instructions per request\n\n"
    if results.instructions is None:
        return title + f"_Not measured in this run:_ {results.instructions_error or 'skipped'}\n"
    counts = results.instructions
    rows = []
    previous: str | None = None
    for kind, label in (("floor", "the floor (server + upstream client, forwarding only)"),
                        ("lean", "+ the balancer's logic (outcome log and metrics off)"),
                        ("default", "+ outcome log and metrics: the balancer as it ships")):
        if kind not in counts:
            continue
        delta = "" if previous is None else as_signed(counts[kind] - counts[previous], 0)
        rows.append(f"| {label} | {as_number(counts[kind], 0)} | {delta} |\n")
        previous = kind
    writer = counts.get(WRITER)
    if writer is not None and "default" in counts:
        rows.append(f"| &nbsp;&nbsp;of which in the balancer's process | {as_number(counts['default'] - writer, 0)} | "
                    f"{as_signed(counts['default'] - writer - counts['lean'], 0) if 'lean' in counts else ''} |\n"
                    f"| &nbsp;&nbsp;of which in its store writer process (SQLite) | {as_number(writer, 0)} | |\n")
    return (
        title + "`python -m bench.instructions`: the public port's code in one process with fake transports (no "
        "sockets, so no kernel work and no load generator), counted by `valgrind --tool=callgrind --trace-children=yes` "
        f"over all threads and the store writer process; the difference between runs of {LONG_RUN:,} and "
        f"{SHORT_RUN:,} requests, per request, with the outcome log flushed every {FLUSH_EVERY} requests; each count "
        f"is the least of {REPEATS} runs (whether a WAL checkpoint lands inside a run depends on timing, and one "
        "moved the writer's figure by thousands). Unlike CPU seconds on a shared machine, these counts move by a "
        "few per cent at most between runs, so they are the figure to compare when a change is small.\n\n"
        "| what runs | instructions per request | added |\n|---|---|---|\n" + "".join(rows)
    )


def _report_section(results: BenchResults) -> str:
    if results.report_seconds is None:
        return "## Report over a large store\n\n_Not measured in this run._\n"
    return (
        "## Report over a large store\n\n"
        f"`build_report` over a synthetic store of {as_number(results.report_requests, 0)} logged requests "
        "(`balancer/report_synthetic.py`: two variants, feedback on half, sticky units), best of 2: "
        f"**{results.report_seconds:.2f} s**. Aggregation runs in SQL; percentiles, bootstrap and the timeline are "
        "vectorised with numpy.\n"
    )


def _profile_section(results: BenchResults) -> str:
    if results.profile_error:
        return f"## Profile\n\n_py-spy could not profile this run:_ {results.profile_error}\n"
    profile = results.profile
    if profile is None or profile.samples == 0:
        return "## Profile\n\n" + PROFILE_PLACEHOLDER + "\n"
    threads = _thread_summary(profile)
    own = [(frame, count) for frame, count in profile.total_counts.most_common()
           if "(balancer/" in frame and "(balancer/__main__.py)" not in frame][:12]
    return ("## Profile\n\n"
            f"py-spy at {SAMPLE_RATE_HZ} Hz (`py-spy record --threads --format raw`, idle samples excluded) of the "
            f"no-op balancer under `wrk` saturation, after the measurements; {profile.pinning}. Samples per "
            f"thread: {threads} (py-spy counts some waits in C, e.g. `Condition.wait`, as busy). "
            f"The tables are the event loop thread ({profile.thread}), which does every "
            "request's Python work. Self time is the Python function on top of the stack; C calls are charged "
            "to the Python function that made them, so `_SelectorSocketTransport.write` is the `send` syscall "
            "(on loopback it also runs the receiver's TCP work) plus any time the balancer sat preempted inside "
            "it, which py-spy cannot tell from running; the kernel share in the CPU columns above is the "
            "better measure of the syscall cost.\n\n"
            "| self % | function |\n|---|---|\n"
            + "".join(f"| {count / profile.samples * 100:.1f} | `{frame}` |\n"
                      for frame, count in profile.self_counts.most_common(20))
            + "\nInclusive time of the balancer's own functions:\n\n| total % | function |\n|---|---|\n"
            + "".join(f"| {count / profile.samples * 100:.1f} | `{frame}` |\n" for frame, count in own)
            )


def _thread_summary(profile: Profile) -> str:
    """'MainThread 2227; event-log-writer 607 (mostly `Condition.wait (threading.py)`, 80 %)'."""
    parts = []
    for name, count in profile.thread_samples.most_common():
        part = f"{name} {count}"
        top = profile.thread_top_frame.get(name)
        if name != profile.thread and top is not None:
            part += f" (mostly `{top[0]}`, {top[1] / count * 100:.0f} %)"
        parts.append(part)
    return "; ".join(parts)


def _raw_section(results: BenchResults) -> str:
    rows = []
    for target in results.targets:
        for index, sample in enumerate(results.saturation.get(target.name, []), 1):
            hop, share = sample.proxy_us_per_request, sample.proxy_system_share
            rows.append(f"| saturation | {target.name} | {index} | {sample.requests_per_second:.0f} req/s, "
                        f"p50 {sample.p50_ms:.1f} ms, p99 {sample.p99_ms:.1f} ms"
                        + ("" if hop is None or share is None else f", hop {as_cpu(hop, share)} µs/req")
                        + f", backends {sample.backend_us_per_request:.0f} µs/req | {sample.errors} |\n")
    phases = (("fixed rate", results.fixed_rate),
              (f"fixed rate, {results.workers} workers' rate", results.workers_fixed_rate))
    for (phase, runs), target in ((phase, target) for phase in phases for target in results.targets):
        for index, fixed in enumerate(runs.get(target.name, []), 1):
            rows.append(f"| {phase} | {target.name} | {index} | {fixed.achieved_rps:.0f} of {fixed.rate:.0f} req/s, "
                        f"p50 {fixed.p50_ms:.2f} ms, p99 {fixed.p99_ms:.2f} ms, p99.9 {fixed.p999_ms:.2f} ms; "
                        f"queued {fixed.queued}, client late p99 {fixed.late_ms_p99:.1f} ms, client CPU "
                        f"{fixed.client_us_per_request:.0f} µs/req"
                        + ("" if fixed.proxy_us_per_request is None or fixed.proxy_busy is None else
                           f", hop {fixed.proxy_us_per_request:.0f} µs/req (busy {100 * fixed.proxy_busy:.0f} %)")
                        + ("" if math.isnan(fixed.backend_us_per_request) else
                           f", backends {fixed.backend_us_per_request:.0f} µs/req")
                        + f", steal {100 * fixed.steal:.1f} % | {fixed.errors} |\n")
    return ("## Every run\n\n<details><summary>Raw samples, in round order per configuration</summary>\n\n"
            "| phase | configuration | round | result | errors |\n|---|---|---|---|---|\n" + "".join(rows)
            + "\n</details>\n")
