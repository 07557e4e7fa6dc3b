#!/usr/bin/env bash
# Build the three images the Helm chart runs, with Docker (or podman with
# AISETL_BUILDER=podman), and optionally load them into a kind cluster:
#   hack/build-images.sh [--kind-load CLUSTER] [--tag TAG]
#     aisetl/aisetl:TAG            the gateway and target roles (sidecar/Dockerfile)
#     aisetl/runtime-python3:TAG   the python3 build runtime (runtimes/python3)
#     aisetl/runtime-python2:TAG   the python2 build runtime (runtimes/python2)
# TAG defaults to the chart's appVersion. The base images (python:3.11-slim,
# python:2.7.18) are pulled from your registry: this needs a machine with a
# container engine that can pull. About 2-4 minutes on a warm cache.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
TAG=$(awk '/^appVersion:/ {gsub(/"/, "", $2); print $2}' chart/Chart.yaml)
KIND_CLUSTER=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --kind-load) KIND_CLUSTER="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-images: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
BUILDER=${AISETL_BUILDER:-docker}
command -v "$BUILDER" > /dev/null || { echo "build-images: $BUILDER not found; set AISETL_BUILDER" >&2; exit 1; }

build() {  # NAME CONTEXT DOCKERFILE
  local start=$SECONDS
  "$BUILDER" build -t "$1:$TAG" -f "$3" "$2"
  echo "[build-images] $1:$TAG in $((SECONDS - start)) s"
}
build aisetl/aisetl . sidecar/Dockerfile
build aisetl/runtime-python3 runtimes/python3 runtimes/python3/Dockerfile
build aisetl/runtime-python2 runtimes/python2 runtimes/python2/Dockerfile

if [[ -n "$KIND_CLUSTER" ]]; then
  for img in aisetl/aisetl aisetl/runtime-python3 aisetl/runtime-python2; do
    kind load docker-image "$img:$TAG" --name "$KIND_CLUSTER"
  done
fi
