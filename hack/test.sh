#!/usr/bin/env bash
# The whole test suite on a fresh machine, in one command:
#   ./hack/test.sh [PYTEST ARGS...]
# Installs what the tests need (the package with its test extras, podman and the
# locally built images, a wheelhouse, helm/kubectl, and etcd + kube-apiserver +
# kube-controller-manager built from the Go module proxy into ~/.cache/aisetl),
# checks style, types and layering, then runs pytest. About 4 minutes of tests;
# the first run on a new machine adds about 9 minutes (7 of them the Kubernetes
# binaries, built once and cached). CI (.ci/run) runs exactly this with CI=true, where a
# test whose prerequisite is missing fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

step() { printf '\n== %s\n' "$*"; }

step "python package and test tools"
python3 -m pip install --quiet --disable-pip-version-check -e '.[test,kubernetes]'

step "container engine and images (hack/container-setup.sh, hack/build-seed-image.sh)"
bash hack/container-setup.sh
bash hack/build-seed-image.sh

step "wheels for build-ETL dependency tests (pip installs from this wheelhouse, offline)"
WHEELHOUSE="${AISETL_CACHE:-$HOME/.cache/aisetl}/wheelhouse"
mkdir -p "$WHEELHOUSE"
python3 -m pip download --quiet --disable-pip-version-check -d "$WHEELHOUSE" Pillow numpy

step "helm, kubectl, kubernetes-validate (hack/install-tools.sh)"
bash hack/install-tools.sh
export PATH="${AISETL_CACHE:-$HOME/.cache/aisetl}/bin:$PATH"

step "kube-apiserver, etcd, kube-controller-manager binaries (hack/k8s-binaries.sh; ~7 min once, then cached)"
bash hack/k8s-binaries.sh

step "lint, types, layers"
ruff check sidecar tests runtimes hack
mypy
lint-imports

step "tests"
python3 -m pytest "$@"
