#!/usr/bin/env bash
# Start a local cluster and run the seed's examples end to end, in one command:
#   ./hack/quickstart.sh [--keep]
# Installs the package, starts `aisetl up` (1 gateway + 3 targets on this machine,
# state in a temporary directory), runs the seed's commands against it with the
# `ais` CLI, prints what each prints, and stops the cluster (unless --keep:
# then it stays up in the foreground until Ctrl-C). Takes about 10 seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

python3 -m pip install --quiet --disable-pip-version-check -e .

STATE=$(mktemp -d -t aisetl-quickstart.XXXXXX)
PORT=${AISETL_PORT:-8080}
export AIS_ENDPOINT="http://127.0.0.1:$PORT"
aisetl up --targets 3 --port "$PORT" --state "$STATE" > "$STATE/up.log" 2>&1 &
UP_PID=$!
cleanup() { kill -TERM "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; rm -rf "$STATE"; }
trap cleanup EXIT

for _ in $(seq 100); do
  if curl -sf "$AIS_ENDPOINT/v1/health" > /dev/null; then break; fi
  if ! kill -0 "$UP_PID" 2>/dev/null; then cat "$STATE/up.log"; exit 1; fi
  sleep 0.2
done
curl -sf "$AIS_ENDPOINT/v1/health" > /dev/null || { cat "$STATE/up.log"; exit 1; }
head -2 "$STATE/up.log"

run() { printf '$ %s\n' "$*"; eval "$@"; }

run ais create bucket transform
run 'echo "some text :)" | ais put - transform/shard.in'
run ais get transform/shard.in -
run ais ls transform
run ais show cluster

cat > "$STATE/code.py" <<'PY'
import hashlib

def transform(input_bytes):
    md5 = hashlib.md5()
    md5.update(input_bytes)
    return md5.hexdigest().encode()
PY
cd "$STATE"
run ais etl build --from-file=code.py --runtime=python3
ETL_ID=$(ais etl ls | awk 'NR==2 {print $1}')
run ais etl ls
run ais etl object "$ETL_ID" transform/shard.in -
echo
run 'XACT_ID=$(ais etl bucket "$ETL_ID" transform transform-md5)'
run ais wait xaction '"$XACT_ID"'
run ais ls transform-md5
run ais etl stop "$ETL_ID"
cd - > /dev/null

if [[ "${1:-}" == "--keep" ]]; then
  echo "cluster stays up at $AIS_ENDPOINT; Ctrl-C stops it"
  wait "$UP_PID"
fi
echo "quickstart: all steps succeeded"
