#!/usr/bin/env bash
# Build the seed's "regular flow" md5 server image offline and tag it
# quay.io/user/md5_server:v1, the image the seed's spec.yaml names, so that spec
# works verbatim with no registry (--pull=never: nothing is ever pulled).
#
# Needs the base image from hack/container-setup.sh. Skips the build when the
# image is present and newer than its sources (AISETL_REBUILD_SEED=1 forces it).
# Then verifies it: runs it with the same flags as the aisetl adapter, POSTs to
# the published loopback port and checks the md5.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONTEXT="$ROOT/tests/fixtures/md5_server"
IMAGE=quay.io/user/md5_server:v1
BASE_IMAGE=localhost/aisetl-python3:bookworm
# Global flags, see sidecar/aisetl/orchestrator/engine.py for why.
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
log() { printf '[build-seed-image] %s\n' "$*" >&2; }

command -v podman >/dev/null || { log "podman missing: run hack/container-setup.sh"; exit 1; }
podman image exists "$BASE_IMAGE" \
    || { log "base image $BASE_IMAGE missing: run hack/container-setup.sh"; exit 1; }

# Creation time of an image, in seconds since the epoch (0 when unknown).
created() {
    local c
    c=$(podman image inspect --format '{{.Created.Unix}}' "$1" 2>/dev/null) || c=0
    echo "${c:-0}"
}

T0=$(now)
up_to_date=0
if [[ ${AISETL_REBUILD_SEED:-0} != 1 ]] && podman image exists "$IMAGE"; then
    newest=$(stat -c %Y "$CONTEXT/server.py" "$CONTEXT/Dockerfile" | sort -n | tail -1)
    base=$(created "$BASE_IMAGE")
    ((base > newest)) && newest=$base
    (($(created "$IMAGE") >= newest)) && up_to_date=1
fi
if ((up_to_date)); then
    log "image $IMAGE already present and up to date"
else
    T=$(now)
    # --network none: the build's RUN steps need no network (nothing is fetched).
    "${PODMAN[@]}" build --quiet --pull=never --network none "${ULIMITS[@]}" \
        -t "$IMAGE" -f "$CONTEXT/Dockerfile" "$CONTEXT" >/dev/null
    log "built $IMAGE in $(elapsed "$T") s"
fi

# --- verify: run it, POST, compare the md5 ----------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
name="aisetl-seed-check-$$"
T=$(now)
cid=$("${PODMAN[@]}" run -d --rm --pull=never --name "$name" \
    --label aisetl.io/test=build-seed-image \
    --network slirp4netns:allow_host_loopback=true -p "127.0.0.1:$port:80" "${ULIMITS[@]}" \
    "$IMAGE")
trap '"${PODMAN[@]}" rm -f -t 0 "$cid" >/dev/null 2>&1 || true' EXIT

payload='some text :)'
want=$(printf '%s\n' "$payload" | md5sum | cut -d' ' -f1)
got=""
for _ in $(seq 1 100); do
    got=$(printf '%s\n' "$payload" \
        | curl -sS --max-time 2 --data-binary @- "http://127.0.0.1:$port/" 2>/dev/null) && break
    sleep 0.05
done
ready=$(elapsed "$T")
if [[ $got != "$want" ]]; then
    log "verification failed: want $want, got '${got}'"
    "${PODMAN[@]}" logs "$cid" >&2 || true
    exit 1
fi
log "verified: POST answered $got (start-to-answer $ready s)"
log "done in $(elapsed "$T0") s"
