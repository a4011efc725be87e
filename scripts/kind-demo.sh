#!/usr/bin/env bash
# Switchyard on a local kind cluster, no GPU needed:
#   creates a kind cluster whose node port 30080 is published on localhost:8080, builds both images and
#   loads them into the cluster, installs the Helm chart with simulated workers (the vLLM simulator from
#   the gateway image), runs `helm test`, and curls the gateway through the NodePort.
#
# Needs: docker (with a running engine), kind, kubectl, helm (v3.8+), curl.
# NOTE: this script has not been run by the project's automated tests: they run where no Docker engine
# exists. The chart it installs is rendered, linted and schema-checked by tests/helm.
#
# Environment knobs:
#   CLUSTER=switchyard NAMESPACE=switchyard TAG=dev HOST_PORT=8080 NODE_PORT=30080
#   BUILD_WORKER=1   set to 0 to skip the worker image (it starts from the multi-GB vLLM image and is not
#                    used by the simulated demo; it is built to show that it builds)
#   CLEANUP=0        set to 1 to delete the cluster at the end
set -euo pipefail

CLUSTER=${CLUSTER:-switchyard}
NAMESPACE=${NAMESPACE:-switchyard}
RELEASE=${RELEASE:-switchyard}
TAG=${TAG:-dev}
HOST_PORT=${HOST_PORT:-8080}
NODE_PORT=${NODE_PORT:-30080}
BUILD_WORKER=${BUILD_WORKER:-1}
CLEANUP=${CLEANUP:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
URL="http://127.0.0.1:${HOST_PORT}"

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm curl; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info failed)"

step "kind cluster ${CLUSTER} (node port ${NODE_PORT} -> localhost:${HOST_PORT})"
if kind get clusters | grep -qx "${CLUSTER}"; then
  echo "cluster ${CLUSTER} exists; reusing it"
else
  kind create cluster --name "${CLUSTER}" --wait 120s --config - <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraPortMappings:
      - containerPort: ${NODE_PORT}
        hostPort: ${HOST_PORT}
        listenAddress: 127.0.0.1
        protocol: TCP
EOF
fi
kubectl config use-context "kind-${CLUSTER}" >/dev/null

step "building switchyard/gateway:${TAG}"
docker build -f "${ROOT}/Dockerfile.gateway" -t "switchyard/gateway:${TAG}" "${ROOT}"
kind load docker-image "switchyard/gateway:${TAG}" --name "${CLUSTER}"
if [[ "${BUILD_WORKER}" == "1" ]]; then
  step "building switchyard/worker:${TAG} (pulls the vLLM base image: several GB)"
  docker build -f "${ROOT}/Dockerfile.worker" -t "switchyard/worker:${TAG}" "${ROOT}"
  kind load docker-image "switchyard/worker:${TAG}" --name "${CLUSTER}"
fi

step "installing the chart (release ${RELEASE}, namespace ${NAMESPACE})"
values=$(mktemp)
trap 'rm -f "${values}"' EXIT
# BEGIN kind-values (tests/helm checks this block against the chart's schema)
cat >"${values}" <<EOF
image:
  tag: "${TAG}"
  pullPolicy: Never
workerDefaults:
  image:
    tag: "${TAG}"
    pullPolicy: Never
gateway:
  replicas: 1
service:
  type: NodePort
  nodePort: ${NODE_PORT}
models:
  - name: chat
    simulator: true
    servedNames: [demo-chat]
    loras:
      - name: demo-chat-sql
        source: /adapters/sql
  - name: embed
    simulator: true
    servedNames: [demo-embed]
EOF
# END kind-values
kubectl create namespace "${NAMESPACE}" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "${NAMESPACE}" pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
helm upgrade --install "${RELEASE}" "${ROOT}/helm/switchyard" \
  --namespace "${NAMESPACE}" --values "${values}" --wait --timeout 5m

step "helm test"
helm test "${RELEASE}" --namespace "${NAMESPACE}" --logs

step "curl through the NodePort: ${URL}"
for _ in $(seq 1 30); do
  curl -fsS "${URL}/ready" >/dev/null 2>&1 && break
  sleep 2
done
curl -fsS "${URL}/v1/models"
echo
curl -fsS "${URL}/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "demo-chat-sql", "messages": [{"role": "user", "content": "Hello from kind"}], "max_tokens": 16}'
echo

if [[ "${CLEANUP}" == "1" ]]; then
  step "deleting cluster ${CLUSTER}"
  kind delete cluster --name "${CLUSTER}"
else
  printf '\nThe gateway is at %s (OpenAI base_url %s/v1). Remove everything with: kind delete cluster --name %s\n' \
    "${URL}" "${URL}" "${CLUSTER}"
fi
