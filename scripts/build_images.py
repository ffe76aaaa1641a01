"""Build the images docker-compose.yml names, with `docker build --network host`.

docker-compose.yml is the one place image names and Dockerfiles are listed;
this reads every service that has a `build:` section and builds it directly
(docker-compose 1.29 cannot always build with the host network, and the
host network is how builds reach the Debian and PyPI mirrors here)::

    python scripts/build_images.py              # every service with a build section
    python scripts/build_images.py model_a      # just these services

Unchanged inputs reuse cached layers, so a warm rebuild takes seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"


@dataclass(frozen=True)
class ImageBuild:
    """One image to build: compose service, tag, Dockerfile and context."""

    service: str
    image: str
    dockerfile: Path
    context: Path


def image_builds(compose_file: Path = COMPOSE_FILE) -> list[ImageBuild]:
    """Every service of the compose file with both `image:` and `build:`, in file order."""
    services = yaml.safe_load(compose_file.read_text(encoding="utf-8"))["services"]
    builds = []
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        if "image" not in service:
            raise ValueError(f"{compose_file}: services.{name} has build: but no image: to tag it with")
        context = (compose_file.parent / (build if isinstance(build, str) else build.get("context", "."))).resolve()
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        builds.append(ImageBuild(service=name, image=service["image"], dockerfile=dockerfile, context=context))
    return builds


def build_command(build: ImageBuild) -> list[str]:
    """The `docker build` command line for one image."""
    return [
        "docker", "build", "--network", "host",
        "--tag", build.image, "--file", str(build.dockerfile), str(build.context),
    ]  # fmt: skip


def docker_environment() -> dict[str, str]:
    """The environment for `docker build`: the classic builder unless buildx is installed."""
    environment = dict(os.environ)
    has_buildx = subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0
    if not has_buildx:
        # Docker >= 23 defaults to BuildKit and fails without the buildx plugin.
        environment["DOCKER_BUILDKIT"] = "0"
    return environment


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build the selected images, printing the time each took."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("services", nargs="*", help="compose services to build (default: all with a build section)")
    parser.add_argument("--compose-file", type=Path, default=COMPOSE_FILE)
    parser.add_argument("--quiet", action="store_true", help="print docker's output only when a build fails")
    args = parser.parse_args(argv)
    if shutil.which("docker") is None:
        print("build_images: the docker client is not installed", file=sys.stderr)
        return 1
    builds = image_builds(args.compose_file)
    unknown = set(args.services) - {build.service for build in builds}
    if unknown:
        names = ", ".join(sorted(unknown))
        print(f"build_images: no buildable service named {names} in {args.compose_file}", file=sys.stderr)
        return 2
    environment = docker_environment()
    for build in builds:
        if args.services and build.service not in args.services:
            continue
        started = time.monotonic()
        result = subprocess.run(
            build_command(build),
            env=environment,
            stdout=subprocess.PIPE if args.quiet else None,
            stderr=subprocess.STDOUT if args.quiet else None,
            text=True,
        )
        if result.returncode != 0:
            if args.quiet:
                print(result.stdout[-20_000:], file=sys.stderr)
            print(f"build_images: building {build.image} from {build.dockerfile} failed", file=sys.stderr)
            return result.returncode
        print(f"built {build.image} ({build.service}) in {time.monotonic() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
