"""The report's sections on the tail: what bounds it, the slow answers' episodes, cold starts, stalls."""

from __future__ import annotations

import math

from scipy.stats import spearmanr

from bench.cold_start import summarize as summarize_cold_start
from bench.loop_stalls import STALL_S, WRITERS
from bench.runs import FixedRateSample, median
from bench import tail_episodes
from bench.tail_episodes import episode_shares
from bench.stack import FEATURE_BASELINE, Target
from bench.report_text import as_number, as_share, as_signed
from bench.results import BenchResults, PINNED_HOW


def tail_section(results: BenchResults) -> str:
    """What the fixed-rate runs say about the p99: how busy each hop was, with and without the outcome log."""
    direct, full, nginx = (results.target("noop", hop) for hop in ("direct", "balancer", "nginx"))
    lean = results.target("noop", "balancer", FEATURE_BASELINE)
    if direct is None or full is None or nginx is None or not results.fixed_rate_samples(full):
        return "## What bounds the tail latency\n\n_Not measured in this run._\n"
    rate = results.rates.get("noop", float("nan"))
    rows = []
    for label, target in (("balancer", full), (f"balancer, {FEATURE_BASELINE}", lean), ("nginx", nginx)):
        if target is None or not results.fixed_rate_samples(target):
            continue
        at_rate, saturated = results.fixed_rate_hop_cpu(target), results.hop_cpu(target)
        rows.append(
            f"| {label} | {as_number(results.latency(target, 'p99'), 2)} "
            f"| {as_signed(results.latency(target, 'p99') - results.latency(direct, 'p99'))} "
            f"| {as_number(at_rate, 0)} | {as_number(saturated, 0)} | {as_number(at_rate / saturated, 1)}× "
            f"| {as_number(100 * results.fixed_rate_busy(target), 0)} % "
            f"| {as_share(results.fixed_rate_wait(target))} "
            f"| {as_share(results.fixed_rate_queued(target))} |\n")
    steal = [sample.steal for samples in results.fixed_rate.values() for sample in samples]
    noop_runs = {target.name: results.fixed_rate_samples(target)
                 for target in (direct, full, lean, nginx) if target is not None}
    hop_runs = {target.name: results.fixed_rate_samples(target)
                for target in (full, lean, nginx, *results.priority_targets) if target is not None}
    return (
        "## What bounds the tail latency\n\n"
        f"The fixed-rate runs of the no-op backends ({rate:.0f} req/s), with the CPU the hop's processes used during "
        "each whole run (warm-up included; the balancer's store writer process counts). \"Busy\" is that CPU time "
        "over the run's wall time: 100 % is one core kept busy. Below saturation a request costs more CPU than at "
        "saturation: each one wakes the process from `epoll_wait` on its own instead of arriving in a batch that "
        "one wake-up serves.\n\n"
        "\"Waited\": the time the hop's serving threads (the balancer's event loop, nginx's worker) were runnable "
        "but had no CPU, over the run's wall time (`/proc/<pid>/schedstat`; the store writer, idle by design, left "
        "out). A request that arrives while its hop waits waits too.\n\n"
        "| hop | p99 ms | added p99 ms | CPU µs/req at the fixed rate | at saturation | ratio | busy | waited for a CPU "
        "| queued |\n|---|---|---|---|---|---|---|---|---|\n" + "".join(rows)
        + "\n" + queue_correlation(hop_runs, results.settings.rate_connections, rate) + "\n"
        + f"\nThe hypervisor took {as_number(100 * median(steal), 1)} % of the machine's CPU time during the fixed-rate "
        f"runs (median; from {as_number(100 * min(steal, default=float('nan')), 1)} % to "
        f"{as_number(100 * max(steal, default=float('nan')), 1)} %, `steal` in `/proc/stat`): time in which every "
        "process here, client included, waited. " + steal_correlation(noop_runs) + "\n"
        + _sharing(results, rate, (("direct", direct), ("balancer", full), ("nginx", nginx)))
        + _pinned_tail(results, (("direct", direct), ("balancer", full), (f"balancer, {FEATURE_BASELINE}", lean),
                                 ("nginx", nginx)))
    )


def _sharing(results: BenchResults, rate: float, paths: tuple[tuple[str, Target], ...]) -> str:
    """Who else used the two cores during the fixed-rate runs: the client's and the backends' CPU beside the hop's."""
    rows = []
    for label, target in paths:
        samples = results.fixed_rate_samples(target)
        client = median([sample.client_us_per_request for sample in samples])
        backends = median([sample.backend_us_per_request for sample in samples])
        hop = 0.0 if target.hop == "direct" else results.fixed_rate_hop_cpu(target)
        if math.isnan(backends):
            return ""
        rows.append(f"| {label} | {as_number(client, 0)} | {as_number(backends, 0)} "
                    f"| {'—' if target.hop == 'direct' else as_number(hop, 0)} "
                    f"| {as_number((client + backends + hop) * rate / 1e6, 2)} |\n")
    return (
        f"\nWho else uses the two cores at {rate:.0f} req/s: CPU per request of the load generator "
        "(`bench.openloop`, its own `getrusage`) and of both backends together (`/proc/<pid>/stat` around each "
        "run), medians over the same fixed-rate runs, beside the hop's. \"Cores\" is their sum at the rate: out of "
        "2.\n\n"
        "| path | client µs/req | backends µs/req | hop µs/req | cores |\n|---|---|---|---|---|\n" + "".join(rows)
    )


def episodes_section(results: BenchResults) -> str:
    """What the slow answers of traced fixed-rate runs are made of, and what the serving thread did meanwhile."""
    if not results.tail_runs:
        return ""
    first = results.tail_runs[0]
    hops = list(dict.fromkeys(run.hop for run in results.tail_runs))
    rows, during = [], {}
    for hop in hops:
        runs = [run for run in results.tail_runs if run.hop == hop]
        slow, answers = sum(run.slow for run in runs), sum(run.requests for run in runs)
        in_episodes = sum(episode.requests for run in runs for episode in run.episodes)
        lengths = [1000 * (episode.end_s - episode.start_s) for run in runs for episode in run.episodes]
        during[hop] = episode_shares(runs)
        rows.append(
            f"| {hop} | {', '.join(as_number(run.p99_ms, 1) for run in runs)} | {as_share(slow / answers)} "
            f"| {as_share(in_episodes / slow) if slow else 'n/a'} | {sum(len(run.episodes) for run in runs)} "
            f"| {as_number(median(lengths), 0) if lengths else 'n/a'} "
            f"| {as_share(median([run.running for run in runs]))} | {as_share(median([run.waiting for run in runs]))} "
            f"| {as_share(during[hop][0])} | {as_share(during[hop][1])} |\n")
    return (
        "\n## What the slow answers are made of\n\n"
        f"`python -m bench.tail_episodes --rate {first.rate:.0f} --rounds {len(results.tail_runs) // len(hops)} "
        f"--seconds {results.settings.fixed_rate_s:g} --slow-ms {first.slow_ms:g}`, run here on the same processes "
        "after the runs above: each round a fixed-rate run against each hop in turn, cores shared, with "
        "`bench.openloop --trace` keeping every answer's dispatch time and latency. Meanwhile the hop's serving "
        "thread (the balancer's event loop, nginx's worker) is sampled every "
        f"{1000 * tail_episodes.SAMPLE_S:g} ms from `/proc/<pid>/task/<tid>/schedstat`: the time it ran and the time "
        f"it was runnable but had no CPU. An *episode* is a stretch of answers over {first.slow_ms:g} ms (the p99 "
        f"goal) dispatched less than {1000 * tail_episodes.EPISODE_GAP_S:g} ms apart, at least "
        f"{tail_episodes.EPISODE_MIN_REQUESTS} of them: the hop falling behind, not one unlucky request. Its shares "
        f"run from {1000 * tail_episodes.EPISODE_LEAD_S:g} ms before its first slow answer (a backlog builds before "
        "answers turn slow) to its last, weighted by length over all episodes.\n\n"
        "| hop | each run's p99 ms | answers over the goal | of them in episodes | episodes | median episode ms "
        "| ran, whole runs | waited for a CPU, whole runs | ran, in episodes | waited, in episodes |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "".join(rows) + _episodes_reading(results, hops, during)
        + _episode_groups(results, hops, during)
    )


def _episode_groups(results: BenchResults, hops: list[str], during: dict[str, tuple[float, float]]) -> str:
    """Who had the two CPUs during the episodes and over whole runs: every sampled group's ran and waited shares."""
    runs_by_hop = {hop: [run for run in results.tail_runs if run.hop == hop] for hop in hops}
    if not any(run.groups for runs in runs_by_hop.values() for run in runs):
        return ""  # a results file from before the other threads were sampled
    names = [name for name in (*tail_episodes.GROUPS, tail_episodes.IDLE)
             if any(name in run.groups for runs in runs_by_hop.values() for run in runs)]
    rows = []
    for hop, runs in runs_by_hop.items():
        in_episodes = tail_episodes.group_episode_shares(runs)
        whole = {name: (median([run.groups[name][0] for run in runs if name in run.groups]),
                        median([run.groups[name][1] for run in runs if name in run.groups])) for name in names}
        for label, shares, serving in (("in episodes", in_episodes, during[hop]),
                                       ("whole runs", whole, (median([run.running for run in runs]),
                                                              median([run.waiting for run in runs])))):
            if math.isnan(serving[0]):
                continue
            cells = [f"{as_share(serving[0])} / {as_share(serving[1])}"]
            for name in names:
                running, waiting = shares.get(name, (math.nan, math.nan))
                cells.append(as_share(running) if name == tail_episodes.IDLE else f"{as_share(running)} / {as_share(waiting)}")
            rows.append(f"| {hop}, {label} | " + " | ".join(cells) + " |\n")
    header = " | ".join(("idle CPUs" if name == tail_episodes.IDLE else f"{name}: ran / waited") for name in names)
    return (
        "\nWho had the two CPUs meanwhile: the same samples, taken of every other thread the runs keep busy (the "
        "hop's other threads and processes, both backends, the client, the kernel's `ksoftirqd` threads and the "
        "harness's own, the sampler among them) and of the CPUs' idle time (`/proc/uptime`, both CPUs together, in "
        "10 ms steps). Shares of the wall time, each group's threads summed: with two CPUs, what ran and the idle "
        "time add up to at most 200 % (the rest ran other processes).\n\n"
        f"| hop, stretch | serving thread: ran / waited | {header} |\n"
        "|---|" + "---|" * (len(names) + 1) + "\n" + "".join(rows) + _idle_reading(results, hops[0], during)
    )


IDLE_WORTH_NOTING = 0.05  # idle CPU time in episodes (out of 100 % per CPU) from which the report points it out


def _idle_in_episodes(shares: dict[str, tuple[float, float]]) -> float:
    """The CPUs' idle share among a hop's `group_episode_shares` (NaN when not sampled)."""
    return shares.get(tail_episodes.IDLE, (math.nan, math.nan))[0]


def _idle_reading(results: BenchResults, hop: str, during: dict[str, tuple[float, float]]) -> str:
    """A sentence when the CPUs sat idle in the episodes while the serving thread waited for one."""
    runs = [run for run in results.tail_runs if run.hop == hop]
    shares = tail_episodes.group_episode_shares(runs)
    idle, waiting = _idle_in_episodes(shares), during[hop][1]
    if math.isnan(idle) or math.isnan(waiting) or idle < IDLE_WORTH_NOTING or waiting < IDLE_WORTH_NOTING:
        return ""
    others = sum(shares.get(name, (0.0, 0.0))[1] for name in tail_episodes.GROUPS)
    whole = median([run.groups[tail_episodes.IDLE][0] for run in runs if tail_episodes.IDLE in run.groups])
    return (f"\nIn the {hop}'s episodes the CPUs were idle {as_share(idle)} of the time (out of 200 %; "
            f"{as_share(whole)} over whole runs) while, over the "
            f"same stretches, its serving thread waited for a CPU {as_share(waiting)} and the other threads sampled "
            f"{as_share(others)} between them. The slow answers there are not a shortage of CPU time: threads waited "
            "for a CPU while, part of that time, one had nothing to run. Where a runnable thread runs is the "
            "kernel's choice; what the balancer can set is its weight in that choice (`server.priority`) and how "
            "many of its processes share the load (`server.workers`), both measured above.\n")


def _episodes_reading(results: BenchResults, hops: list[str], during: dict[str, tuple[float, float]]) -> str:
    """What the episode table says, from its own figures."""
    hop = hops[0]
    running, waiting = during[hop]
    if math.isnan(running):
        return f"\nThe {hop} had no episodes in these runs.\n"
    runs = [run for run in results.tail_runs if run.hop == hop]
    whole_running = median([run.running for run in runs])
    whole_waiting = median([run.waiting for run in runs])
    text = (f"\nIn its episodes the {hop}'s serving thread ran {as_share(running)} of the time and waited for a CPU "
            f"{as_share(waiting)}, against {as_share(whole_running)} and {as_share(whole_waiting)} over whole runs")
    if running + waiting >= 0.9:
        text += (f": running or runnable {as_share(running + waiting)} of the time, so it always had work and was "
                 "blocked on nothing but a CPU")
        if _idle_in_episodes(tail_episodes.group_episode_shares(runs)) >= IDLE_WORTH_NOTING:
            text += "; who had the CPUs meanwhile is below."
        else:
            text += (". Those slow answers come from CPU contention: requests waited in the hop while it waited for "
                     "a core that the load generator and the backends were using.")
    else:
        text += (f": running or runnable only {as_share(running + waiting)} of the time, so something other than "
                 "CPU contention held it too.")
    return text + "\n"


def _pinned_tail(results: BenchResults, paths: tuple[tuple[str, Target | None], ...]) -> str:
    """The same fixed-rate runs with the hop on a CPU of its own: how much of the tail sharing cores explains."""
    direct = paths[0][1]
    if not results.pinned_samples(direct):
        return ""
    rows = []
    for label, target in paths:
        samples = results.pinned_samples(target)
        if not samples:
            continue
        p99 = results.pinned_p99(target)
        added = "—" if target is direct else as_signed(p99 - results.pinned_p99(direct))
        busy = median([sample.proxy_busy or math.nan for sample in samples])
        busy_text = "—" if target is direct else f"{as_number(100 * busy, 0)} %"
        waited = "—" if target is direct else as_share(median([sample.proxy_wait_share for sample in samples]))
        rows.append(f"| {label} | {as_number(p99, 2)} | {added} | {as_number(results.latency(target, 'p99'), 2)} "
                    f"| {', '.join(as_number(sample.p99_ms, 1) for sample in samples)} | {busy_text} | {waited} "
                    f"| {as_share(median([sample.backend_wait_share for sample in samples]))} |\n")
    return (
        f"\nThe same fixed-rate runs once more, {PINNED_HOW}: the hop's processes (the balancer and its store writer; "
        "nginx's master and worker) pinned to one CPU, the client and the backends to the other (direct calls "
        "leave the first idle), interleaved over the same number of rounds (`measure_fixed_rate(pinned=...)` in "
        "`bench/runs.py`). Nothing else then competes for the hop's core, so the difference from the shared "
        "runs is what sharing the cores with the load generator and the backends adds to the tail.\n\n"
        "\"Waited\" as above; the backends' is both backends' time waiting for a CPU over the run's wall time (up to "
        "200 %): they share their CPU with the load generator.\n\n"
        "| path | p99 ms, own CPU | added p99 ms, own CPU | p99 ms, cores shared (above) | each round's p99 ms, own CPU "
        "| busy | hop waited for a CPU | backends waited |\n|---|---|---|---|---|---|---|---|\n" + "".join(rows)
    )


def cold_start_section(results: BenchResults) -> str:
    """The first seconds of a fresh balancer: what a user's first traffic meets, unlike the warmed-up runs above."""
    if not results.cold_start:
        return ""
    starts, window_s = results.cold_start, results.cold_start_window_s
    rate = starts[0][0].rate
    rows = []
    for index in range(len(starts[0])):
        window = [samples[index] for samples in starts]
        rows.append(f"| {index * window_s:g}–{(index + 1) * window_s:g} s "
                    f"| {as_number(median([sample.p50_ms for sample in window]), 2)} "
                    f"| {as_number(median([sample.p99_ms for sample in window]), 2)} "
                    f"| {', '.join(as_number(sample.p99_ms, 1) for sample in window)} "
                    f"| {sum(sample.errors for sample in window)} |\n")
    return (
        "## The first seconds after a start\n\n"
        "Every balancer above was warmed up at saturation before it was measured. A user's first traffic meets a "
        f"fresh one: {len(starts)} balancers (sticky, outcome log and metrics on) were started one after another in "
        f"front of the no-op backends, and each, the moment its health check answered, got {len(starts[0])} "
        f"consecutive fixed-rate windows of {window_s:g} s at {rate:.0f} req/s with no warm-up "
        "(`bench/cold_start.py`; `python -m bench.cold_start` repeats it). The cores are shared, as in the "
        "main fixed-rate runs.\n\n"
        "| window after ready | p50 ms (median) | p99 ms (median) | each start's p99 ms | errors |\n"
        "|---|---|---|---|---|\n" + "".join(rows)
        + "\n" + summarize_cold_start(starts, window_s)[-1].capitalize() + ".\n"
    )


def queue_correlation(runs: dict[str, list[FixedRateSample]], connections: int, rate: float) -> str:
    """How a run's p99 ranks with its share of requests that waited in the client for a free connection: a sentence."""
    pairs = [(sample.queued_share, sample.p99_ms) for samples in runs.values() for sample in samples
             if not (math.isnan(sample.queued_share) or math.isnan(sample.p99_ms))]
    if len(pairs) < 5 or len({queued for queued, _ in pairs}) < 2 or len({p99 for _, p99 in pairs}) < 2:
        return ""
    rho, p_value = spearmanr(*zip(*pairs, strict=True))
    return (f"The client holds {connections} connections: a request due while all of them wait for answers waits for "
            f"one in the client, and that wait counts in its latency. That happens whenever a hop takes longer than "
            f"{connections} / {rate:.0f} req/s = {1000 * connections / rate:.2f} ms to answer the requests it holds, "
            "and the queue then drains only as fast as the hop answers. Over the "
            f"{len(pairs)} fixed-rate runs through a hop above, a run's p99 and its share of such requests (\"queued\") "
            f"have a Spearman rank correlation of {float(rho):.2f} (p = {float(p_value):.2g}).")


def steal_correlation(runs: dict[str, list[FixedRateSample]]) -> str:
    """How a run's p99 (relative to its hop's median p99) ranks with the steal time during it: a sentence."""
    steal, relative_p99 = [], []
    for samples in runs.values():
        typical = median([sample.p99_ms for sample in samples])
        for sample in samples:
            if not (math.isnan(sample.steal) or math.isnan(sample.p99_ms) or math.isnan(typical) or typical <= 0):
                steal.append(sample.steal)
                relative_p99.append(sample.p99_ms / typical)
    if len(steal) < 5 or len(set(steal)) < 2 or len(set(relative_p99)) < 2:
        return ""
    rho, p_value = spearmanr(steal, relative_p99)
    return (f"Over the {len(steal)} fixed-rate runs of the no-op backends, a run's p99 (over its path's median p99) "
            f"and the steal during it have a Spearman rank correlation of {float(rho):.2f} (p = {float(p_value):.2g}, "
            "`scipy.stats.spearmanr`).")


def stalls_section(results: BenchResults) -> str:
    """Event-loop stalls caused by the outcome log: writer process (used) against a writer thread."""
    title = "## Event-loop stalls from the outcome log\n\n"
    if not results.loop_stalls:
        return title + "_Not measured in this run._\n"
    first = results.loop_stalls[0]
    roles = dict(zip(WRITERS, (" (used)", " (before)", ": the machine's own stalls")))
    rows = [f"| {run.writer}{roles.get(run.writer, '')} | {len(run.gaps)} "
            f"| {run.percentile(0.5) * 1000:.2f} | {run.percentile(1.0) * 1000:.2f} | {run.stalled_share * 100:.2f} % "
            f"| {'n/a' if math.isnan(run.steal) else f'{run.steal * 100:.1f} %'} |\n"
            for run in results.loop_stalls]
    return (
        title + f"`python -m bench.loop_stalls --rate {first.rows / first.seconds:.0f} --seconds {first.seconds:g}`: an "
        "event loop records request rows into an outcome log (flushed every 0.2 s) and otherwise spins, noting "
        f"every gap over {STALL_S * 1000:g} ms between two of its iterations. While Python's sqlite3 binds an "
        "INSERT's parameters it holds the GIL, and with it the loop. The balancer commits from a writer process "
        "(`balancer/store_writer.py`); the second row is a thread in the same process running the same writer, as "
        "the balancer did before"
        + ("; the last records nothing, so its stalls are the machine's own (the hypervisor's steal, other "
           "processes), which the other runs suffer too" if any(run.writer == WRITERS[2] for run in results.loop_stalls)
           else "") + ". Stalls are part of the p99 added latency above." + _stalls_comparison(results) + "\n\n"
        "| who commits | stalls | median stall ms | longest ms | share of the time stalled | steal |\n"
        "|---|---|---|---|---|---|\n" + "".join(rows)
    )


def _stalls_comparison(results: BenchResults) -> str:
    """A sentence for a run in which the writer process stalled the loop more than the thread did."""
    runs = {run.writer: run for run in results.loop_stalls}
    used, thread = runs.get(WRITERS[0]), runs.get(WRITERS[1])
    if used is None or thread is None or used.stalled_share <= thread.stalled_share:
        return ""
    return (f" In this run the writer process stalled the loop more than the thread ({len(used.gaps)} stalls against "
            f"{len(thread.gaps)}): those stalls do not come from SQLite, which runs in the other process, and what "
            "causes them is not established.")
