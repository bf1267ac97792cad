#!/usr/bin/env bash
# Build a local stand-in for `python:3.11-slim` on a machine that cannot reach Docker Hub:
# debootstrap a minimal Debian 12, import it, and add Debian's Python with pip. Tags the result
# docker.io/library/python:3.11-slim so Dockerfile.serve builds unchanged with --pull=never.
# Optional: EXTRA_CA_DIR=/usr/local/share/ca-certificates copies extra CA files in (proxies).
set -euo pipefail
ENGINE=${CONTAINER_ENGINE:-podman}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >/dev/null
tar -C "$work/rootfs" -c . | $ENGINE import - localhost/debian-bookworm-base:latest >/dev/null
mkdir -p "$work/ctx/ca"
if [ -n "${EXTRA_CA_DIR:-}" ]; then cp "$EXTRA_CA_DIR"/*.crt "$work/ctx/ca/" 2>/dev/null || true; fi
cat > "$work/ctx/Dockerfile" <<'DOCKERFILE'
FROM localhost/debian-bookworm-base:latest
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    python-is-python3 ca-certificates && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED && ln -sf /usr/bin/pip3 /usr/bin/pip
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
DOCKERFILE
$ENGINE build --pull=never -q -t docker.io/library/python:3.11-slim "$work/ctx" >/dev/null
echo "stand-in docker.io/library/python:3.11-slim ready"
