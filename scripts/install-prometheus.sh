#!/bin/sh
# Installs Debian's `prometheus` package (the server and promtool) for tests/observability, when missing.
# Idempotent: does nothing when both binaries are already on PATH. Needs root (CI runs it as root).
set -eu

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus and promtool already installed: $(command -v prometheus), $(command -v promtool)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-prometheus.sh: run as root (apt-get install needs it)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
# The package's service is not started in a container without systemd; the tests run their own server.
apt-get install -y --no-install-recommends prometheus

prometheus --version
promtool --version
