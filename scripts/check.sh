#!/usr/bin/env bash
# Static checks: ruff (lint and format) and mypy (strict). Part of scripts/test.sh; quick on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"
