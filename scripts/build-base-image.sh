#!/usr/bin/env bash
# Build a local `python:3.11-slim` image from Debian packages, for machines
# that reach Debian's and PyPI's mirrors but no container registry.
#
# The image is a debootstrap'ed bookworm (Python 3.11) with python3, venv,
# pip, ca-certificates and libgomp1, shaped like the official image for our
# Dockerfiles: `python`/`pip` on PATH, pip installs allowed, and the host's
# CA bundle plus apt/pip mirror config so `apt-get install` and
# `pip install` inside `docker build --network host` go through the same
# proxy the host uses.
#
# Usage: scripts/build-base-image.sh [--force] [--pull]
#   --force  rebuild even if the tag already exists
#   --pull   try `docker pull` of the real image first (needs a registry)
# Environment: BASE_IMAGE (default python:3.11-slim), DEBIAN_MIRROR
# (default: the host apt's bookworm mirror), SUITE (default bookworm).
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
SUITE=${SUITE:-bookworm}
FORCE=0
PULL=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --pull) PULL=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "build-base-image: unknown argument '$arg' (expected --force or --pull)" >&2; exit 2 ;;
    esac
done

log() { printf 'build-base-image: %s\n' "$*" >&2; }

previous_id=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)
if [[ $FORCE == 0 && -n $previous_id ]]; then
    log "$BASE_IMAGE already present (${previous_id:7:12}); nothing to do (--force rebuilds)"
    exit 0
fi

if [[ $PULL == 1 ]] && timeout 60 docker pull "$BASE_IMAGE" >/dev/null 2>&1; then
    log "pulled $BASE_IMAGE from a registry"
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    log "debootstrap needs root (run as root or with sudo)"
    exit 1
fi
command -v debootstrap >/dev/null || { log "debootstrap not found: apt-get install debootstrap"; exit 1; }

# The same Debian mirror the host's apt uses: first URIs of a deb822 source
# carrying our suite, else the first one-line `deb` entry, else Debian's own.
host_mirror() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [[ -f $file ]] || continue
        awk -v suite="$SUITE" '
            /^[[:space:]]*$/ { if (uri != "" && hit) { print uri; exit } uri = ""; hit = 0; next }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
            END { if (uri != "" && hit) print uri }
        ' "$file" | head -n1
    done | head -n1
    if [[ -f /etc/apt/sources.list ]]; then
        awk -v suite="$SUITE" '$1 == "deb" && $0 ~ (" " suite " ") { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list
    fi
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/base-image.XXXXXX")
ROOTFS=$WORK/rootfs
cleanup() {
    # A failed chroot step can leave these mounted; never rm through a mount.
    umount "$ROOTFS/proc" 2>/dev/null || true
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

started=$SECONDS
log "debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,libgomp1 \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }

# --- apt: the host's sources and proxy settings, Docker-style space savers.
rm -f "$ROOTFS/etc/apt/sources.list"
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    cp /etc/apt/sources.list.d/debian.sources "$ROOTFS/etc/apt/sources.list.d/debian.sources"
else
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOTFS/etc/apt/sources.list"
fi
for conf in /etc/apt/apt.conf.d/99artifact-registry /etc/apt/apt.conf.d/*proxy*; do
    [[ -f $conf ]] && cp "$conf" "$ROOTFS/etc/apt/apt.conf.d/"
done
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-slim" <<'EOF'
// As in Debian's official container images: no caches, no translations,
// compressed indexes, aggressive autoremove.
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::GzipIndexes "true";
Acquire::Languages "none";
Apt::AutoRemove::SuggestsImportant "false";
APT::Install-Recommends "false";
EOF
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
# Later `apt-get install`s leave out docs, man pages and translations.
force-unsafe-io
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
# pip installs are allowed, as in the official image (no PEP 668 marker).
path-exclude /usr/lib/python3*/EXTERNALLY-MANAGED
EOF

# --- TLS: the host's CA bundle (it trusts the mirror proxy), kept across
# `update-ca-certificates` by also installing the host's local CAs.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
fi
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"

# --- pip: the host's config (CA bundle).
if [[ -f /etc/pip.conf ]]; then
    cp /etc/pip.conf "$ROOTFS/etc/pip.conf"
else
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$ROOTFS/etc/pip.conf"
fi

# --- security and point-release updates through the same mirror.
mount -t proc proc "$ROOTFS/proc"
chroot "$ROOTFS" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade' \
    >"$WORK/upgrade.log" 2>&1 || { tail -n 30 "$WORK/upgrade.log" >&2; log "apt-get upgrade failed"; exit 1; }
umount "$ROOTFS/proc"
rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED

# --- trim: apt lists and caches, docs, logs.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/log/* \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/* \
    "$ROOTFS"/usr/share/lintian/* "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
mkdir -p "$ROOTFS/var/log/apt"
# Machine-specific state that must not be baked in.
: >"$ROOTFS/etc/machine-id"
rm -f "$ROOTFS/etc/hostname" "$ROOTFS/etc/resolv.conf"

python_version=$(chroot "$ROOTFS" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
log "packing rootfs (Python $python_version) into $BASE_IMAGE"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV PYTHON_VERSION=$python_version" \
    --change 'CMD ["python3"]' \
    --message "debootstrap $SUITE minbase + python3 from $MIRROR (scripts/build-base-image.sh)" \
    - "$BASE_IMAGE" >/dev/null
if [[ -n $previous_id && $previous_id != "$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")" ]]; then
    # The replaced image, unless images built on it still hold it.
    docker image rm "$previous_id" >/dev/null 2>&1 || true
fi
docker run --rm "$BASE_IMAGE" sh -c 'python --version && pip --version && test ! -e /usr/lib/python3.11/EXTERNALLY-MANAGED' >&2
log "built $BASE_IMAGE in $((SECONDS - started))s, $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
