#!/usr/bin/env bash
# Install a local container engine (podman + runc + slirp4netns) and build the
# base image localhost/aisetl-python3:bookworm offline, from Debian packages.
#
# Idempotent: packages already installed, the config already written and an
# image already present are skipped. The rootfs tar is cached under
# ${AISETL_CACHE:-$HOME/.cache/aisetl}/images/ so a rebuild is just an import.
#
# Why these choices (see shared/ENVIRONMENT.md, "Containers"):
#   - runc, not crun: crun fails on this machine's hybrid cgroup layout.
#   - cgroupfs, not systemd: there is no systemd here.
#   - ulimits 1024: podman's defaults are above the sandbox's hard limits.
#   - slirp4netns (user-mode networking) with allow_host_loopback: the host only
#     ever sees loopback traffic; the default bridge network routes through
#     non-loopback addresses and must not be used. Inside a container the
#     host's 127.0.0.1 is 10.0.2.2.
# The aisetl adapter (sidecar/aisetl/orchestrator/engine.py) passes all these
# flags explicitly on every call and does not rely on this config; the config
# drop-in written here makes plain `podman run` / `podman build` (this script,
# hack/build-seed-image.sh, a person at a shell) safe and working too.
#
# Env: AISETL_CACHE (cache dir), AISETL_REBUILD_BASE=1 (re-run mmdebstrap).
set -euo pipefail

BASE_IMAGE=localhost/aisetl-python3:bookworm
CACHE_DIR="${AISETL_CACHE:-$HOME/.cache/aisetl}/images"
ROOTFS_TAR="$CACHE_DIR/aisetl-python3-bookworm.tar"
CONF_DIR=/etc/containers/containers.conf.d
CONF_FILE="$CONF_DIR/50-aisetl.conf"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '[container-setup] %s\n' "$*" >&2; }

T0=$(now)

# --- 1. packages -------------------------------------------------------------
T=$(now)
need=()
for pkg in podman runc slirp4netns mmdebstrap; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
        || need+=("$pkg")
done
if ((${#need[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    log "installing: ${need[*]}"
    $SUDO apt-get update -qq
    # --no-install-recommends: keeps crun out (podman would prefer it, and it
    # fails here) and skips buildah/fuse-overlayfs/uidmap, not needed as root.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        podman runc slirp4netns mmdebstrap >/dev/null
    log "packages installed in $(elapsed "$T") s"
else
    log "packages already installed"
fi

# --- 2. podman config drop-in --------------------------------------------------
read -r -d '' CONF <<'EOF' || true
# Written by aisetl hack/container-setup.sh. See the comment at the top of that
# script for why each setting is what it is.
[containers]
netns = "slirp4netns"
default_ulimits = [
  "nofile=1024:1024",
  "nproc=1024:1024",
]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
network_cmd_options = ["allow_host_loopback=true"]
EOF
if [[ ! -f $CONF_FILE ]] || [[ "$(cat "$CONF_FILE")" != "$CONF" ]]; then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO mkdir -p "$CONF_DIR"
    printf '%s\n' "$CONF" | $SUDO tee "$CONF_FILE" >/dev/null
    log "wrote $CONF_FILE"
else
    log "config $CONF_FILE up to date"
fi

# --- 3. base image -------------------------------------------------------------
if [[ ${AISETL_REBUILD_BASE:-0} != 1 ]] && podman image exists "$BASE_IMAGE"; then
    log "image $BASE_IMAGE already present"
else
    mkdir -p "$CACHE_DIR"
    if [[ ${AISETL_REBUILD_BASE:-0} == 1 || ! -s $ROOTFS_TAR ]]; then
        T=$(now)
        log "building rootfs with mmdebstrap (python3, python-is-python3)"
        # Default mirror on purpose: no host name is written into this repo.
        partial="$CACHE_DIR/.partial-$$.tar"
        rm -rf "$partial"
        mmdebstrap --quiet --format=tar --variant=apt --include=python3,python-is-python3 \
            bookworm "$partial"
        mv "$partial" "$ROOTFS_TAR"
        log "rootfs built in $(elapsed "$T") s ($(du -h "$ROOTFS_TAR" | cut -f1))"
    else
        log "using cached rootfs $ROOTFS_TAR"
    fi
    T=$(now)
    podman import --quiet \
        --change 'CMD ["/bin/bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
    log "imported $BASE_IMAGE in $(elapsed "$T") s"
fi

# --- 4. smoke check --------------------------------------------------------------
T=$(now)
out=$(podman --runtime runc --cgroup-manager cgroupfs run --rm --pull=never \
    --network slirp4netns:allow_host_loopback=true \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    "$BASE_IMAGE" python --version 2>&1) || {
    log "smoke run failed: $out"
    exit 1
}
log "smoke run ($out) in $(elapsed "$T") s"
log "done in $(elapsed "$T0") s"
