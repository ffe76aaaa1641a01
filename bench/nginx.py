"""nginx as the reference proxy: its config, rendered from nginx.conf.template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
SPLIT_KEYS = {"sticky": "${http_x_user_id}", "random": "${request_id}"}


def split_percentages(weights: Mapping[str, float]) -> list[tuple[str, str]]:
    """split_clients lines as (share, variant): percentages of the total weight, the last one `*`."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"weights {dict(weights)} must add up to more than 0")
    names = [name for name, weight in weights.items() if weight > 0]
    shares = [(f"{weights[name] / total * 100:.2f}%", name) for name in names[:-1]]
    return [*shares, ("*", names[-1])]


def render_nginx_config(*, listen: str, upstreams: Mapping[str, Sequence[str]], weights: Mapping[str, float],
                        strategy: str, keepalive: int = 64, workers: int = 1,
                        priority: int | None = None) -> str:
    """nginx.conf for a proxy on `listen` (host:port) splitting traffic over `upstreams` (variant -> host:port list)."""
    if strategy not in SPLIT_KEYS:
        raise ValueError(f"strategy = {strategy!r}: must be one of {sorted(SPLIT_KEYS)}")
    if set(upstreams) != set(weights):
        raise ValueError(f"variants of upstreams {sorted(upstreams)} and of weights {sorted(weights)} differ")
    splits = "\n".join(f"        {share} {name};" for share, name in split_percentages(weights))
    blocks = "".join(
        f"    upstream {name} {{\n"
        + "".join(f"        server {address};\n" for address in addresses)
        + f"        keepalive {keepalive};\n        keepalive_requests 1000000;\n    }}\n"
        for name, addresses in upstreams.items()
    )
    text = TEMPLATE.read_text()
    for placeholder, value in (("@SPLIT_KEY@", SPLIT_KEYS[strategy]), ("@SPLITS@", splits),
                               ("@UPSTREAMS@", blocks), ("@LISTEN@", listen), ("@WORKERS@", str(workers)),
                               ("@REUSEPORT@", " reuseport" if workers > 1 else ""),
                               ("@PRIORITY@", "" if priority is None else f"worker_priority {priority};")):
        text = text.replace(placeholder, value)
    return text


def nginx_command(nginx: str, prefix: Path) -> list[str]:
    """How the harness runs nginx: in the foreground, everything under `prefix`."""
    return [nginx, "-p", str(prefix), "-c", "nginx.conf", "-e", "error.log", "-g", "daemon off;"]


def write_nginx_prefix(prefix: Path, config: str) -> None:
    """Lay out `prefix` for nginx: nginx.conf and the temp folders it names."""
    for folder in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "temp" / folder).mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(config)
