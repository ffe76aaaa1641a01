"""Experiment configuration: the YAML file, validated once into frozen, typed models.

Every error names the file, the line, the key and the offending value, e.g.::

    experiments/default.yaml:9: variants[1].weight = -5: must be >= 0
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STICKY_KEY_PATTERN = re.compile(r"^(header|cookie|json):([A-Za-z0-9_.\-]{1,128})$")
VARIANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
UPSTREAM_PATTERN = re.compile(r"^http://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)(:(\d{1,5}))?/?$")


class ConfigError(ValueError):
    """The experiment file is unreadable or invalid; the message names file, line, key and value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AnalysisSettings(_Frozen):
    """How the report analyses the experiment (the YAML's optional `analysis:` section)."""

    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    outcome: Literal["auto", "binary", "numeric"] = "auto"
    # True when a larger feedback value is better (e.g. accuracy); False for losses or costs.
    higher_is_better: bool = True
    # Peeking-safe mode: mSPRT always-valid p-values and confidence sequences.
    sequential: bool = True
    # mSPRT mixing prior N(0, tau^2) on the standardized effect (difference / per-request SD).
    # 0.05 makes the confidence sequence tightest around 16 / tau^2 = 6,400 requests per variant;
    # the width depends on it only logarithmically, so any value in 0.02-0.2 is reasonable.
    sequential_tau: Annotated[float, Field(gt=0, le=10)] = 0.05
    min_sample: Annotated[int, Field(ge=1)] = 100
    mde: Annotated[float, Field(gt=0)] = 0.05
    power: Annotated[float, Field(gt=0, lt=1)] = 0.8
    srm_alpha: Annotated[float, Field(gt=0, lt=1)] = 0.001
    srm_min_units: Annotated[int, Field(ge=1)] = 100
    # Absolute error-rate increase over the control tolerated by the guardrail (0.01 = 1 point).
    guardrail_error_rate_margin: Annotated[float, Field(ge=0, le=1)] = 0.01
    # Relative p95-latency increase over the control tolerated by the guardrail (0.10 = 10 %).
    guardrail_latency_margin: Annotated[float, Field(ge=0)] = 0.10
    # Points on the cumulative timeline (lift and traffic split over time).
    timeline_points: Annotated[int, Field(ge=2, le=500)] = 40


class UpstreamSettings(_Frozen):
    """Timeouts, retries, health checking and failure policy for the model upstreams."""

    connect_timeout_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    try_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    total_timeout_s: Annotated[float, Field(gt=0, le=600)] = 15.0
    retries: Annotated[int, Field(ge=0, le=5)] = 1
    max_idle_connections: Annotated[int, Field(ge=0, le=10_000)] = 64
    # Below common servers' keep-alive timeouts (uvicorn 5 s, nginx and aiohttp 75 s): a connection
    # the upstream is about to close is not reused, it is closed here first.
    idle_connection_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 4.0
    dns_refresh_s: Annotated[float, Field(ge=0)] = 5.0
    health_check_interval_s: Annotated[float, Field(ge=0)] = 2.0
    health_check_path: str = "/healthz"
    eject_after_failures: Annotated[int, Field(ge=1)] = 3
    eject_for_s: Annotated[float, Field(gt=0)] = 5.0
    on_variant_down: Literal["fail", "fallback"] = "fail"

    @model_validator(mode="after")
    def _total_covers_a_try(self) -> UpstreamSettings:
        if self.total_timeout_s < self.try_timeout_s:
            raise ValueError(
                f"total_timeout_s = {self.total_timeout_s} must be >= try_timeout_s = {self.try_timeout_s}"
            )
        return self


MAX_WORKERS = 64
MIN_NICENESS, MAX_NICENESS = -20, 19  # server.priority: the range of a Linux niceness
AUTO_WORKERS = "auto"  # server.workers / --workers: one per CPU this process may use (`available_cpus`)


def available_cpus(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, lowered by the CPU quota (cgroup v2 `cpu.max`, as
    `docker run --cpus` sets it) of its cgroup or any cgroup above it, rounded up; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        # "0::/system.slice/x.scope" (cgroup v2); a container sees its own cgroup as "/"
        relative = next(line[3:] for line in (proc / "self" / "cgroup").read_text().splitlines()
                        if line.startswith("0::"))
    except (OSError, StopIteration):
        return max(1, cpus)
    folder = cgroups / relative.strip().lstrip("/")
    for level in (folder, *folder.parents):
        if not level.is_relative_to(cgroups):
            break
        try:
            quota, period = (level / "cpu.max").read_text().split()
            if quota != "max":
                cpus = min(cpus, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError):
            continue
    return max(1, cpus)


def parse_workers(value: object) -> object:
    """`auto` as the number of worker processes it stands for (`available_cpus`, at most MAX_WORKERS); other
    values as given, for the field's own checks."""
    if isinstance(value, str) and value.strip().lower() == AUTO_WORKERS:
        return min(available_cpus(), MAX_WORKERS)
    return value


class ServerSettings(_Frozen):
    """Where the balancer listens and stores; command-line flags override these."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    admin_host: str = "127.0.0.1"
    admin_port: Annotated[int, Field(ge=0, le=65535)] = 8081
    store: str = "var/outcomes.db"
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    # Committed request ids remembered in memory (~160 bytes each) so feedback joins without reading the
    # store; ids not committed yet are always remembered.
    recent_request_ids: Annotated[int, Field(ge=0, le=10_000_000)] = 200_000
    # The store writer process's CPU priority: "idle" runs it in the time the CPUs would otherwise idle
    # (preempted the moment a request needs the CPU; raised for a while if a batch then takes too long),
    # "normal" at niceness 10 only.
    store_writer_priority: Literal["idle", "normal"] = "idle"
    # The balancer's own niceness (-20 to 19, like nginx's worker_priority), set at start for its every thread
    # and process (workers, store writer: 10 below it); None leaves it as started. A negative value needs
    # CAP_SYS_NICE (root) or a raised RLIMIT_NICE; without, the balancer logs an error and keeps its own.
    # Below 0 it keeps its share of a CPU it shares with its backends (see README "Performance").
    priority: Annotated[int, Field(ge=MIN_NICENESS, le=MAX_NICENESS)] | None = None
    max_in_flight: Annotated[int, Field(ge=1)] = 1024  # per worker process
    # Processes serving the public port (SO_REUSEPORT: the kernel spreads connections over them). With
    # more than one, a supervisor process serves the admin port, watches the file and restarts workers.
    # "auto": one per CPU the balancer may use (its affinity and cgroup CPU quota), resolved at load.
    workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] = 1
    max_body_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024
    # A client that sent its headers has this long to send the rest of its body (408 after).
    client_body_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    # Idle keep-alive (and half-sent request headers) on the public port are closed after this.
    client_keepalive_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 75.0
    allow_override_header: bool = True
    trusted_override_sources: tuple[str, ...] = ()
    log_request_data: bool = False
    # Off switches for measuring what each feature costs (`make bench`); keep both on in production.
    record_outcomes: bool = True
    export_metrics: bool = True

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        value = parse_workers(value)
        if isinstance(value, str):
            raise ValueError(f'must be a whole number from 1 to {MAX_WORKERS}, or "{AUTO_WORKERS}" (one per CPU)')
        return value


class Variant(_Frozen):
    """One arm of the experiment: a name, a relative weight and the upstreams that serve it."""

    name: Annotated[str, Field(pattern=VARIANT_NAME_PATTERN)]
    weight: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    upstreams: Annotated[tuple[str, ...], Field(min_length=1)]

    @field_validator("upstreams")
    @classmethod
    def _upstreams_are_http_urls(cls, upstreams: tuple[str, ...]) -> tuple[str, ...]:
        for upstream in upstreams:
            match = UPSTREAM_PATTERN.match(upstream)
            if match is None:
                raise ValueError(f"{upstream!r} is not an http://host[:port] URL")
            if match.group(3) is not None and not 0 < int(match.group(3)) < 65536:
                raise ValueError(f"{upstream!r} has port out of range")
        if len(set(upstreams)) != len(upstreams):
            raise ValueError(f"duplicate upstream in {list(upstreams)}")
        return tuple(u.rstrip("/") for u in upstreams)


class Experiment(_Frozen):
    """A whole experiment file."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    strategy: Literal["random", "sticky"] = "sticky"
    sticky_key: str = "header:X-User-ID"
    seed: int = 0
    status: Literal["running", "paused", "stopped"] = "running"
    control: str | None = None
    winner: str | None = None
    variants: Annotated[tuple[Variant, ...], Field(min_length=2)]
    analysis: AnalysisSettings = AnalysisSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    server: ServerSettings = ServerSettings()

    @field_validator("sticky_key")
    @classmethod
    def _sticky_key_has_a_source(cls, value: str) -> str:
        if STICKY_KEY_PATTERN.match(value) is None:
            raise ValueError(f"{value!r} must be header:NAME, cookie:NAME or json:FIELD")
        return value

    @model_validator(mode="after")
    def _variants_are_consistent(self) -> Experiment:
        names = [variant.name for variant in self.variants]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique, {duplicates} repeated")
        total = sum(variant.weight for variant in self.variants)
        if total <= 0:
            raise ValueError("at least one variant needs a weight > 0")
        if math.isinf(total):  # each weight is finite, but the split divides by their sum
            raise ValueError(f"the weights {[variant.weight for variant in self.variants]} sum to infinity")
        for key in ("control", "winner"):
            chosen = getattr(self, key)
            if chosen is not None and chosen not in names:
                raise ValueError(f"{key} = {chosen!r} is not one of the variants {names}")
        if self.status == "stopped" and self.winner is None:
            raise ValueError("status = 'stopped' needs winner: NAME")
        return self

    @property
    def control_name(self) -> str:
        """The control variant: `control:` if given, else the first variant."""
        return self.control or self.variants[0].name

    @property
    def sticky_source(self) -> tuple[str, str]:
        """(kind, name) of the sticky key, e.g. ("header", "X-User-ID")."""
        kind, _, name = self.sticky_key.partition(":")
        return kind, name

    @property
    def weights(self) -> dict[str, float]:
        """Variant name -> configured relative weight."""
        return {variant.name: variant.weight for variant in self.variants}

    def variant(self, name: str) -> Variant:
        """The variant called `name` (KeyError if none)."""
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(name)


class LoadedConfig(_Frozen):
    """An experiment together with the text it came from and that text's hash."""

    experiment: Experiment
    path: str
    body: str
    hash: str


def parse_experiment(body: str, *, source: str = "<string>") -> LoadedConfig:
    """Validate YAML text into a `LoadedConfig`; raises ConfigError naming source, line, key, value."""
    try:
        document = yaml.safe_load(body)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc
    except (ValueError, RecursionError) as exc:
        # PyYAML lets a bad scalar escape as a bare ValueError (`2001-02-30` is a timestamp but no
        # date), and its composer recurses once per nesting level.
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError(f"{source}: invalid YAML: {problem}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the file must be a mapping of keys, got {type(document).__name__}")
    try:
        experiment = Experiment.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, document, body, source)) from exc
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return LoadedConfig(experiment=experiment, path=source, body=body, hash=digest)


def load_experiment(path: str | Path) -> LoadedConfig:
    """Read and validate an experiment file."""
    path = Path(path)
    try:
        body = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read experiment file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from exc
    return parse_experiment(body, source=str(path))


def _describe_validation_error(exc: ValidationError, document: Any, body: str, source: str) -> str:
    lines = []
    errors = exc.errors(include_url=False)
    failed_locations = [tuple(error["loc"]) for error in errors]
    root = yaml.compose(body)  # once, not per error: safe_load already parsed this text
    for error in errors:
        location = tuple(error["loc"])
        if error["type"] == "too_short" and any(
            len(other) > len(location) and other[: len(location)] == location for other in failed_locations
        ):
            continue  # a list counted short only because one of its items failed: that item's error says it
        key = _format_location(location)
        line = _line_of(root, location)
        where = f"{source}:{line}" if line else source
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key {key!r}")
        elif error["type"] == "missing":
            lines.append(f"{where}: missing required key {key!r}")
        elif key:
            lines.append(f"{where}: {key} = {_value_at(document, location)!r}: {message}")
        else:
            lines.append(f"{where}: {message}")
    return "\n".join(lines)


def _format_location(location: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _value_at(document: Any, location: tuple[Any, ...]) -> Any:
    node = document
    for item in location:
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _line_of(node: yaml.Node | None, location: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `location` under `node`, or of its nearest existing parent."""
    line = None
    for item in location:
        if isinstance(node, yaml.MappingNode):
            match = next((pair for pair in node.value if pair[0].value == item), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and item < len(node.value):
            node = node.value[item]
            line = node.start_mark.line + 1
        else:
            break
    return line
