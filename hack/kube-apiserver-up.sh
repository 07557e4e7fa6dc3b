#!/usr/bin/env bash
# kube-apiserver-up.sh -- start a real, kubelet-less Kubernetes control plane
# on loopback for tests: etcd + kube-apiserver (+ kube-controller-manager when
# its binary is there), all bound to 127.0.0.1, with generated certificates
# (openssl), a service-account signing key, static-token admin auth and RBAC
# authorization (so a ServiceAccount's Role is really enforced).
#
#   hack/kube-apiserver-up.sh DIR          start; prints DIR/kubeconfig
#   hack/kube-apiserver-up.sh --stop DIR   stop what DIR/pids lists
#
# Binaries come from hack/k8s-binaries.sh (run that first; it builds once and
# caches outside the repo). Time, once the binaries exist: ready in about 4 s
# (etcd + apiserver) or 5-7 s with the controller-manager; --stop about 7 s.
#
# Writes into DIR: kubeconfig (admin, token auth), env (shell-sourceable:
# KUBECONFIG, APISERVER_URL, ADMIN_TOKEN, ports), pids ("name pid" lines),
# pki/ (CA, serving cert, SA key pair, tokens.csv), logs/*.log, etcd-data/.
# The etcd data is wiped on each start unless AISETL_KEEP_ETCD_DATA=1.
set -euo pipefail

usage() {
  cat <<EOF
usage: $0 DIR            start etcd + kube-apiserver (+ kube-controller-manager) on 127.0.0.1
       $0 --stop DIR     stop them one by one (SIGTERM, SIGKILL after 15 s each)
       $0 --help

environment (all optional):
  AISETL_K8S_BIN_DIR      where etcd/kube-apiserver/kube-controller-manager are
                          (default: output of hack/k8s-binaries.sh --print-bin-dir)
  AISETL_ETCD_PORT        etcd client port        (default: a free port)
  AISETL_ETCD_PEER_PORT   etcd peer port          (default: a free port)
  AISETL_APISERVER_PORT   kube-apiserver port     (default: a free port)
  AISETL_KCM_PORT         controller-manager port (default: a free port)
  AISETL_KCM              auto|1|0: run kube-controller-manager (default: auto =
                          if its binary exists)
  AISETL_KCM_CONTROLLERS  default: garbagecollector,namespace,serviceaccount,serviceaccount-token,root-ca-cert-publisher
  AISETL_ADMIN_TOKEN      admin bearer token (default: random, kept in DIR/pki/tokens.csv)
  AISETL_READY_TIMEOUT    seconds to wait for readiness (default: 90)
  AISETL_KEEP_ETCD_DATA=1 keep DIR/etcd-data from an earlier run

outputs: DIR/kubeconfig (admin: user "aisetl-admin", group system:masters),
         DIR/env, DIR/pids, DIR/logs/{etcd,kube-apiserver,kube-controller-manager}.log
EOF
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---------------------------------------------------------------- stop
stop_one() { # name pid grace-seconds
  local name="$1" pid="$2" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < $3 * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "killing $name ($pid) after ${3}s" >&2
  kill -KILL "$pid" 2>/dev/null || true
}
stop_dir() {
  local dir="$1" name pid line
  [[ -f "$dir/pids" ]] || { echo "nothing to stop: no $dir/pids"; return 0; }
  # one at a time, reverse start order: controller-manager, apiserver, etcd
  # (the apiserver shuts down quickly only while etcd is still there)
  local -a lines; mapfile -t lines < <(tac "$dir/pids")
  for line in "${lines[@]}"; do
    read -r name pid <<<"$line"
    stop_one "$name" "$pid" 15
  done
  rm -f "$dir/pids"
  echo "stopped control plane in $dir"
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --stop) [[ $# == 2 ]] || { usage >&2; exit 2; }
          stop_dir "$(cd "$2" 2>/dev/null && pwd || echo "$2")"; exit 0 ;;
  "") usage >&2; exit 2 ;;
  -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
esac
[[ $# == 1 ]] || { usage >&2; exit 2; }

mkdir -p "$1"
DIR="$(cd "$1" && pwd)"
PKI="$DIR/pki"; LOGS="$DIR/logs"

# Already running? Then just report.
if [[ -f "$DIR/pids" ]]; then
  running=1
  while read -r name pid; do kill -0 "$pid" 2>/dev/null || running=0; done < "$DIR/pids"
  if [[ $running == 1 ]]; then
    echo "control plane already running in $DIR" >&2
    echo "$DIR/kubeconfig"
    exit 0
  fi
  stop_dir "$DIR" >/dev/null
fi

BIN_DIR="${AISETL_K8S_BIN_DIR:-$("$HERE/k8s-binaries.sh" --print-bin-dir)}"
for b in etcd kube-apiserver; do
  [[ -x "$BIN_DIR/$b" ]] || { echo "error: $BIN_DIR/$b missing; run hack/k8s-binaries.sh first" >&2; exit 1; }
done
case "${AISETL_KCM:-auto}" in
  auto) if [[ -x "$BIN_DIR/kube-controller-manager" ]]; then KCM=1; else KCM=0; fi ;;
  1) KCM=1; [[ -x "$BIN_DIR/kube-controller-manager" ]] || { echo "error: $BIN_DIR/kube-controller-manager missing" >&2; exit 1; } ;;
  0) KCM=0 ;;
  *) echo "AISETL_KCM must be auto, 0 or 1" >&2; exit 2 ;;
esac
TIMEOUT="${AISETL_READY_TIMEOUT:-90}"

# ---------------------------------------------------------------- ports
# Free ports chosen by the kernel on 127.0.0.1 (bound together, then released).
read -r P1 P2 P3 P4 < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(4):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(*[s.getsockname()[1] for s in socks])
EOF
)
ETCD_PORT="${AISETL_ETCD_PORT:-$P1}"
ETCD_PEER_PORT="${AISETL_ETCD_PEER_PORT:-$P2}"
API_PORT="${AISETL_APISERVER_PORT:-$P3}"
KCM_PORT="${AISETL_KCM_PORT:-$P4}"
API_URL="https://127.0.0.1:$API_PORT"

# ---------------------------------------------------------------- pki
mkdir -p "$PKI" "$LOGS"
if [[ ! -f "$PKI/apiserver.crt" || ! -f "$PKI/sa.pub" || ! -f "$PKI/tokens.csv" ]]; then
  (
    cd "$PKI"
    umask 077
    openssl genrsa -out ca.key 2048 2>/dev/null
    openssl req -x509 -new -key ca.key -subj "/CN=aisetl-test-ca" -days 3650 -out ca.crt 2>/dev/null
    openssl genrsa -out apiserver.key 2048 2>/dev/null
    openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr 2>/dev/null
    printf '%s\n' \
      "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
      > apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -days 3650 -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    ADMIN_TOKEN="${AISETL_ADMIN_TOKEN:-$(openssl rand -hex 24)}"
    KCM_TOKEN="$(openssl rand -hex 24)"
    # token,user,uid,"groups"
    {
      echo "$ADMIN_TOKEN,aisetl-admin,aisetl-admin,\"system:masters\""
      # test-only: the controller-manager runs with cluster-admin rights
      echo "$KCM_TOKEN,system:kube-controller-manager,kcm,\"system:masters\""
    } > tokens.csv
    rm -f apiserver.csr apiserver.ext ca.srl
  )
fi
if [[ -n "${AISETL_ADMIN_TOKEN:-}" ]] && ! grep -q "^$AISETL_ADMIN_TOKEN,aisetl-admin," "$PKI/tokens.csv"; then
  sed -i "s/^[^,]*,aisetl-admin,/$AISETL_ADMIN_TOKEN,aisetl-admin,/" "$PKI/tokens.csv"
fi
ADMIN_TOKEN="$(awk -F, '$2=="aisetl-admin"{print $1}' "$PKI/tokens.csv")"
KCM_TOKEN="$(awk -F, '$2=="system:kube-controller-manager"{print $1}' "$PKI/tokens.csv")"
CA_DATA="$(base64 -w0 < "$PKI/ca.crt")"

write_kubeconfig() { # file user token
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: aisetl
  cluster:
    server: $API_URL
    certificate-authority-data: $CA_DATA
users:
- name: $2
  user:
    token: $3
contexts:
- name: aisetl
  context:
    cluster: aisetl
    user: $2
    namespace: default
current-context: aisetl
EOF
  chmod 600 "$1"
}
write_kubeconfig "$DIR/kubeconfig" aisetl-admin "$ADMIN_TOKEN"
write_kubeconfig "$PKI/kcm.kubeconfig" system:kube-controller-manager "$KCM_TOKEN"

# ---------------------------------------------------------------- start
: > "$DIR/pids"
fail() {
  echo "error: $*" >&2
  local f
  for f in "$LOGS"/*.log; do [[ -s "$f" ]] && { echo "--- last lines of $f" >&2; tail -15 "$f" >&2; }; done
  stop_dir "$DIR" >&2 || true
  exit 1
}
start() { # name logfile cmd...
  local name="$1" log="$2"; shift 2
  setsid "$@" >"$log" 2>&1 < /dev/null &
  echo "$name $!" >> "$DIR/pids"
}
pid_of() { awk -v n="$1" '$1==n{print $2}' "$DIR/pids"; }
wait_for() { # name description command...
  local name="$1" what="$2" deadline=$((SECONDS + TIMEOUT)); shift 2
  until "$@" >/dev/null 2>&1; do
    kill -0 "$(pid_of "$name")" 2>/dev/null || fail "$name exited before $what"
    (( SECONDS < deadline )) || fail "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.2
  done
}

[[ "${AISETL_KEEP_ETCD_DATA:-0}" == 1 ]] || rm -rf "$DIR/etcd-data"
start etcd "$LOGS/etcd.log" "$BIN_DIR/etcd" \
  --name aisetl --data-dir "$DIR/etcd-data" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "aisetl=http://127.0.0.1:$ETCD_PEER_PORT" \
  --unsafe-no-fsync --log-level warn
wait_for etcd "etcd /health" curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

SA_ISSUER="https://kubernetes.default.svc.cluster.local"
# Without the controller-manager nothing creates the "default" ServiceAccount
# of a namespace, and the ServiceAccount admission plugin would then refuse
# every pod: drop that plugin in that case.
ADMISSION=()
[[ $KCM == 1 ]] || ADMISSION=(--disable-admission-plugins ServiceAccount)
start kube-apiserver "$LOGS/kube-apiserver.log" "$BIN_DIR/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
  --cert-dir "$PKI" \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --client-ca-file "$PKI/ca.crt" \
  --token-auth-file "$PKI/tokens.csv" \
  --authorization-mode RBAC \
  --service-account-issuer "$SA_ISSUER" --api-audiences "$SA_ISSUER" \
  --service-account-key-file "$PKI/sa.pub" \
  --service-account-signing-key-file "$PKI/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --endpoint-reconciler-type none \
  --allow-privileged=true \
  --profiling=false \
  "${ADMISSION[@]}" \
  --v 1
wait_for kube-apiserver "kube-apiserver /readyz" \
  curl -fsS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "$API_URL/readyz"

if [[ $KCM == 1 ]]; then
  start kube-controller-manager "$LOGS/kube-controller-manager.log" "$BIN_DIR/kube-controller-manager" \
    --kubeconfig "$PKI/kcm.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
    --leader-elect=false \
    --controllers "${AISETL_KCM_CONTROLLERS:-garbagecollector,namespace,serviceaccount,serviceaccount-token,root-ca-cert-publisher}" \
    --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=false \
    --profiling=false \
    --v 1
  wait_for kube-controller-manager "kube-controller-manager /healthz" \
    curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz"
  # the serviceaccount controller creates "default" in each namespace; pods
  # need it (ServiceAccount admission), so wait for the first one.
  wait_for kube-controller-manager "ServiceAccount default/default" \
    curl -fsS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
    "$API_URL/api/v1/namespaces/default/serviceaccounts/default"
fi

cat > "$DIR/env" <<EOF
export KUBECONFIG=$DIR/kubeconfig
export APISERVER_URL=$API_URL
export ADMIN_TOKEN=$ADMIN_TOKEN
export CA_FILE=$PKI/ca.crt
export ETCD_URL=http://127.0.0.1:$ETCD_PORT
export APISERVER_PORT=$API_PORT
export ETCD_PORT=$ETCD_PORT
export ETCD_PEER_PORT=$ETCD_PEER_PORT
export KCM_PORT=$( [[ $KCM == 1 ]] && echo "$KCM_PORT" )
EOF

echo "control plane up in $DIR: apiserver $API_URL, etcd :$ETCD_PORT$( [[ $KCM == 1 ]] && echo ", controller-manager :$KCM_PORT") (pids in $DIR/pids)" >&2
echo "$DIR/kubeconfig"
