"""Print the exact pins from pyproject.toml for a container image, one per line.

pyproject.toml is the one place pins live; each Dockerfile installs a subset so
its image carries only what it runs::

    pip install --no-cache-dir $(python scripts/pins.py --exclude docker lightgbm)

Unknown names are an error, so a renamed dependency cannot silently drop out.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

NAME_PATTERN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 normalized project name: `PyYAML` and `pyyaml` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(pyproject: Path, extra: str | None = None) -> dict[str, str]:
    """Map normalized project name -> requirement string, from [project] (or one extra)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = project["optional-dependencies"][extra] if extra else project["dependencies"]
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = NAME_PATTERN.match(requirement)
        if match is None or "==" not in requirement:
            raise ValueError(f"{pyproject}: requirement {requirement!r} is not an exact '==' pin")
        pins[normalize(match.group(1))] = requirement.strip()
    return pins


def select(pins: dict[str, str], *, only: list[str], exclude: list[str]) -> list[str]:
    """The requirement strings kept by --only / --exclude; unknown names raise ValueError."""
    for name in [*only, *exclude]:
        if normalize(name) not in pins:
            raise ValueError(f"pins: {name!r} is not a dependency in pyproject.toml (known: {', '.join(sorted(pins))})")
    wanted = {normalize(name) for name in only} or set(pins)
    dropped = {normalize(name) for name in exclude}
    return [requirement for key, requirement in pins.items() if key in wanted and key not in dropped]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: print the selected pins."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    parser.add_argument("--extra", help="an optional-dependencies group instead of the main dependencies")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", nargs="+", default=[], metavar="NAME")
    group.add_argument("--exclude", nargs="+", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    try:
        selected = select(read_pins(args.pyproject, args.extra), only=args.only, exclude=args.exclude)
    except (ValueError, KeyError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print("\n".join(selected))
    return 0


if __name__ == "__main__":
    sys.exit(main())
