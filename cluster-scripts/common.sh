# Shared settings of the cluster scripts; sourced, not run.
#
# KVD_CLUSTER_DIR  where data, logs and pid files go (default: ./kvd-cluster)
# KVD_CLIENT_PORTS client ports of the three members (default: "2379 22379 32379")
# KVD_PEER_PORTS   peer ports of the three members   (default: "2380 22380 32380")
# KVD_BIN_DIR      where kvd and kvctl are (default: target/release, built when needed)
# KVD_EXTRA_FLAGS  more flags for every member (e.g. "--snapshot-count 1000")
# KVD_WORKER_THREADS async threads per member (default: a third of the CPUs, at
#                  least one, since the three members share this machine)
# KVD_TLS          1: TLS for clients and between members, with a throwaway CA
#                  made in $KVD_CLUSTER_DIR/tls (a cluster started so keeps it)

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_DIR="${KVD_CLUSTER_DIR:-$PWD/kvd-cluster}"
read -r -a CLIENT_PORTS <<< "${KVD_CLIENT_PORTS:-2379 22379 32379}"
read -r -a PEER_PORTS <<< "${KVD_PEER_PORTS:-2380 22380 32380}"
NAMES=(n1 n2 n3)
BIN_DIR="${KVD_BIN_DIR:-$ROOT/target/release}"
WORKER_THREADS="${KVD_WORKER_THREADS:-$(( $(nproc) / 3 ))}"
[ "$WORKER_THREADS" -ge 1 ] || WORKER_THREADS=1

endpoints() {
  local out=() p
  for p in "${CLIENT_PORTS[@]}"; do out+=("127.0.0.1:$p"); done
  (IFS=,; echo "${out[*]}")
}

# Whether the member whose pid file is $1 runs: a process that was killed but
# not yet reaped (a zombie) does not.
alive() {
  [ -f "$1" ] || return 1
  local pid state
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  state=$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)
  [ "$state" != Z ]
}

# Builds the release binaries, unless KVD_BIN_DIR names ones already built.
build_bins() {
  if [ -z "${KVD_BIN_DIR:-}" ]; then
    echo "building release binaries (cargo build --release; about five minutes the first time)..." >&2
    (cd "$ROOT" && cargo build --release --bins)
  fi
}

# TLS is on when asked for, or when the cluster was first started with it.
TLS_DIR="$CLUSTER_DIR/tls"
if [ "${KVD_TLS:-0}" = 1 ] || [ -f "$TLS_DIR/ca.pem" ]; then TLS=1; else TLS=0; fi
SCHEME=http
[ "$TLS" = 1 ] && SCHEME=https

# Makes a throwaway CA, a certificate for the members (client and peer port,
# 127.0.0.1 and localhost, common name kvd-member) and one for clients.
make_tls() {
  [ -f "$TLS_DIR/ca.pem" ] && return 0
  command -v openssl > /dev/null || apt-get install -y -qq openssl > /dev/null
  mkdir -p "$TLS_DIR"
  (
    cd "$TLS_DIR"
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2> /dev/null; }
    key ca-key.pem
    openssl req -x509 -new -key ca-key.pem -out ca.pem -days 30 -subj /CN=kvd-throwaway-ca 2> /dev/null
    for who in member client; do
      key "$who-key.pem"
      openssl req -new -key "$who-key.pem" -out "$who.csr" -subj "/CN=kvd-$who" 2> /dev/null
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out "$who.pem" -days 30 \
        -extfile "$who.ext" 2> /dev/null
      rm -f "$who.csr" "$who.ext"
    done
  )
}

# kvd's TLS flags for a member, when TLS is on.
member_tls_flags() {
  [ "$TLS" = 1 ] || return 0
  local t="$TLS_DIR"
  echo "--cert-file $t/member.pem --key-file $t/member-key.pem --trusted-ca-file $t/ca.pem --client-cert-auth" \
    "--peer-cert-file $t/member.pem --peer-key-file $t/member-key.pem --peer-trusted-ca-file $t/ca.pem" \
    "--peer-client-cert-auth --peer-cert-allowed-cn kvd-member"
}

# kvctl's (and etcdctl's) TLS flags, when TLS is on.
client_tls_flags() {
  [ "$TLS" = 1 ] || return 0
  echo "--cacert $TLS_DIR/ca.pem --cert $TLS_DIR/client.pem --key $TLS_DIR/client-key.pem"
}
