#!/usr/bin/env bash
# The programs outside Python that the test suite runs, each from a Debian package:
#   prometheus, promtool   package prometheus          tests/observability (a real server, rule checks)
#   openssl                package openssl             a self-signed certificate for the TLS upstream tests
#   kubectl                package kubernetes-client   `kubectl kustomize manifests/` in tests/helm
#
#   scripts/system-packages.sh --check     exit 0 when all are on PATH, else print one line saying what is
#                                          missing and how to install it, and exit 1
#   scripts/system-packages.sh --install   install the missing ones with apt-get (as root); not root: the
#                                          same line as --check, exit 1
# scripts/setup.sh runs --install; scripts/test.sh runs --check first, so no test is skipped for a missing tool.
set -euo pipefail

# tool -> Debian package (several tools may share one package)
TOOLS=(prometheus promtool openssl kubectl)
package_of() {
    case "$1" in
        prometheus | promtool) echo prometheus ;;
        openssl) echo openssl ;;
        kubectl) echo kubernetes-client ;;
    esac
}

missing_tools=()
missing_packages=()
for tool in "${TOOLS[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        missing_tools+=("$tool")
        package=$(package_of "$tool")
        [[ " ${missing_packages[*]} " == *" $package "* ]] || missing_packages+=("$package")
    fi
done

advice() {
    printf 'the tests need %s, not installed here: install them as root with `apt-get update && apt-get install -y --no-install-recommends %s` (or run scripts/setup.sh as root)\n' \
        "${missing_tools[*]}" "${missing_packages[*]}"
}

case "${1:-}" in
    --check)
        [[ ${#missing_tools[@]} -eq 0 ]] && exit 0
        advice >&2
        exit 1
        ;;
    --install)
        if [[ ${#missing_tools[@]} -eq 0 ]]; then
            echo "system packages for the tests: all present (${TOOLS[*]})"
            exit 0
        fi
        if [[ $EUID -ne 0 ]]; then
            advice >&2
            exit 1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        # Services these packages ship are not started in a container without systemd; the tests run their own.
        apt-get install -y -q --no-install-recommends "${missing_packages[@]}"
        exec "$BASH" "${BASH_SOURCE[0]}" --check
        ;;
    *)
        echo "usage: $0 --check | --install" >&2
        exit 2
        ;;
esac
