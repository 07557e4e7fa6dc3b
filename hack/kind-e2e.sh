#!/usr/bin/env bash
# End-to-end test of the Helm chart on kind, for machines with Docker:
#   hack/kind-e2e.sh [--keep]
# Creates a 3-node kind cluster "aisetl-e2e" (1 control plane, 2 workers, so 2
# targets), builds and loads the images (hack/build-images.sh), installs the
# chart with --wait, runs the seed's examples through the ais CLI against a
# port-forwarded gateway (md5 build ETL, transform one object, transform a
# bucket, stop), runs `helm test`, checks that one transformer pod ran per
# target node, then deletes the cluster (unless --keep). About 6-10 minutes.
# Needs: docker, kind, helm, kubectl on PATH, and Python 3.11+ for the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
KEEP=${1:-}
CLUSTER=aisetl-e2e
NS=aisetl
for tool in docker kind helm kubectl; do
  command -v "$tool" > /dev/null || { echo "kind-e2e: $tool is required" >&2; exit 1; }
done

cleanup() {
  [[ -n "${PF_PID:-}" ]] && kill "$PF_PID" 2>/dev/null || true
  if [[ "$KEEP" != "--keep" ]]; then kind delete cluster --name "$CLUSTER" || true; fi
}
trap cleanup EXIT

cat > /tmp/aisetl-kind.yaml <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
KIND
kind create cluster --name "$CLUSTER" --config /tmp/aisetl-kind.yaml --wait 120s
bash hack/build-images.sh --kind-load "$CLUSTER"

kubectl create namespace "$NS"
helm install aisetl ./chart --namespace "$NS" --wait --timeout 5m \
  --set image.pullPolicy=Never
kubectl -n "$NS" get pods -o wide

python3 -m pip install --quiet -e .
kubectl -n "$NS" port-forward svc/aisetl-gateway 18080:8080 > /tmp/aisetl-pf.log 2>&1 &
PF_PID=$!
export AIS_ENDPOINT=http://127.0.0.1:18080
for _ in $(seq 50); do curl -sf "$AIS_ENDPOINT/v1/health" > /dev/null && break; sleep 0.2; done

WORK=$(mktemp -d)
cat > "$WORK/code.py" <<'PY'
import hashlib

def transform(input_bytes):
    md5 = hashlib.md5()
    md5.update(input_bytes)
    return md5.hexdigest().encode()
PY
cd "$WORK"
ais create bucket transform
echo "some text :)" | ais put - transform/shard.in
ETL_ID=$(ais etl build --from-file=code.py --runtime=python3)
got=$(ais etl object "$ETL_ID" transform/shard.in -)
[[ "$got" == "393c6706efb128fbc442d3f7d084a426" ]] || { echo "kind-e2e: md5 mismatch: $got" >&2; exit 1; }
pods=$(kubectl -n "$NS" get pods -l "aisetl.io/etl-id=$ETL_ID" -o jsonpath='{.items[*].spec.nodeName}' | wc -w)
[[ "$pods" -ge 2 ]] || { echo "kind-e2e: expected a transformer per target node, got $pods" >&2; exit 1; }
XACT_ID=$(ais etl bucket "$ETL_ID" transform transform-md5)
ais wait xaction "$XACT_ID"
ais etl stop "$ETL_ID"
cd - > /dev/null
helm test aisetl --namespace "$NS" --timeout 5m
echo "kind-e2e: all steps succeeded"
