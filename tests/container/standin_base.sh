#!/usr/bin/env bash
# Build a local stand-in for `python:3.11-slim` on a machine that cannot reach Docker Hub:
# debootstrap a minimal Debian 12, trim it as debian:bookworm-slim is trimmed (no apt caches or lists, no
# docs, man pages or locales, and a dpkg filter that keeps them out), import it, and add Debian's Python
# with pip and venv (without .pyc files or test suites, as in the official image). Tags the result
# docker.io/library/python:3.11-slim so Dockerfile.serve builds unchanged with --pull=never; its size is
# close to the real image's, so image sizes measured on it hold.
# Optional: EXTRA_CA_DIR=/usr/local/share/ca-certificates copies extra CA files in (proxies).
set -euo pipefail
ENGINE=${CONTAINER_ENGINE:-podman}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >/dev/null
root="$work/rootfs"
cat > "$root/etc/dpkg/dpkg.cfg.d/slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
DPKG
find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/locale/* "$root"/usr/share/lintian/*
tar -C "$work/rootfs" -c . | $ENGINE import - localhost/debian-bookworm-base:latest >/dev/null
mkdir -p "$work/ctx/ca"
if [ -n "${EXTRA_CA_DIR:-}" ]; then cp "$EXTRA_CA_DIR"/*.crt "$work/ctx/ca/" 2>/dev/null || true; fi
cat > "$work/ctx/Dockerfile" <<'DOCKERFILE'
FROM localhost/debian-bookworm-base:latest
COPY ca/ /usr/local/share/ca-certificates/
# one layer, trimmed like the official image: no apt lists, no .pyc files, no test suites
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    python-is-python3 ca-certificates && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && update-ca-certificates && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED && ln -sf /usr/bin/pip3 /usr/bin/pip \
 && find /usr/lib/python3* -depth \( -name __pycache__ -o -name test -o -name tests -o -name idle_test \) \
    -type d -exec rm -rf {} +
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
DOCKERFILE
$ENGINE build --pull=never -q -t docker.io/library/python:3.11-slim "$work/ctx" >/dev/null
echo "stand-in docker.io/library/python:3.11-slim ready"
