# Shared settings of the cluster scripts; sourced, not run.
#
# KVD_CLUSTER_DIR  where data, logs and pid files go (default: ./kvd-cluster)
# KVD_CLIENT_PORTS client ports of the three members (default: "2379 22379 32379"),
#                  and of members n4, n5, ... that add-member.sh adds, if given
# KVD_PEER_PORTS   peer ports of the same             (default: "2380 22380 32380")
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
  local out=() i
  for i in 0 1 2; do out+=("127.0.0.1:${CLIENT_PORTS[$i]}"); done
  (IFS=,; echo "${out[*]}")
}

# The client and peer ports of member nK: the K-th of KVD_CLIENT_PORTS and
# KVD_PEER_PORTS; past their end (a member added by add-member.sh), K2379
# and K2380 (n4: 42379, 42380).
member_ports() {
  local k=${1#n}
  case "$k" in
    ''|0|*[!0-9]*) echo "member names are n1, n2, ...: $1 is not one" >&2; return 1 ;;
  esac
  if [ -n "${CLIENT_PORTS[$((k - 1))]:-}" ] && [ -n "${PEER_PORTS[$((k - 1))]:-}" ]; then
    echo "${CLIENT_PORTS[$((k - 1))]} ${PEER_PORTS[$((k - 1))]}"
  else
    echo "$((k * 10000 + 2379)) $((k * 10000 + 2380))"
  fi
}

# Every member the scripts know of: n1-n3, and any added since (a data
# directory in $CLUSTER_DIR).
all_members() {
  local n d
  for n in "${NAMES[@]}"; do echo "$n"; done
  for d in "$CLUSTER_DIR"/n*.data; do
    [ -d "$d" ] || continue
    n=$(basename "$d" .data)
    case " ${NAMES[*]} " in *" $n "*) ;; *) echo "$n" ;; esac
  done
}

# Starts member $1 in the background with --initial-cluster $2 and
# --initial-cluster-state $3; its log, pid and data go in $CLUSTER_DIR.
start_member() {
  local n=$1 cluster=$2 state=$3 ports client peer
  ports=$(member_ports "$n") || return 1
  read -r client peer <<< "$ports"
  # shellcheck disable=SC2086
  nohup "$BIN_DIR/kvd" --name "$n" --data-dir "$CLUSTER_DIR/$n.data" \
    --listen-client-urls "$SCHEME://127.0.0.1:$client" \
    --advertise-client-urls "$SCHEME://127.0.0.1:$client" \
    --listen-peer-urls "$SCHEME://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "$SCHEME://127.0.0.1:$peer" \
    --initial-cluster "$cluster" --initial-cluster-state "$state" \
    --worker-threads "$WORKER_THREADS" $(member_tls_flags) ${KVD_EXTRA_FLAGS:-} \
    >> "$CLUSTER_DIR/$n.log" 2>&1 < /dev/null &
  echo $! > "$CLUSTER_DIR/$n.pid"
}

# kvctl with the TLS flags, against every running member.
kvctl_all() {
  local eps="" n client
  for n in $(all_members); do
    alive "$CLUSTER_DIR/$n.pid" || continue
    client=$(member_ports "$n" | cut -d' ' -f1)
    eps+="${eps:+,}127.0.0.1:$client"
  done
  # shellcheck disable=SC2046
  "$BIN_DIR/kvctl" --endpoints "${eps:-$(endpoints)}" $(client_tls_flags) "$@"
}

# Waits until `member list` shows member $1 started: it has published its
# name and client URLs, with a write of its own once it joined, and clients
# that look members up by name find it. Exits with an error once SECONDS
# reaches $2.
wait_published() {
  local name=$1 deadline=$2
  until kvctl_all member list 2> /dev/null | grep ", started, $name," > /dev/null; do
    if [ $SECONDS -ge "$deadline" ]; then
      echo "member $name did not publish its name in time; its log is $CLUSTER_DIR/$name.log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# Adds member $1 (client port $2, peer port $3) as a learner, starts it with
# the --initial-cluster that member add printed, waits until it serves, and
# promotes it once it has caught up.
add_and_start() {
  local name=$1 client=$2 peer=$3 out initial deadline promote=""
  build_bins
  out=$(kvctl_all member add "$name" --peer-urls "$SCHEME://127.0.0.1:$peer" --learner) || exit 1
  echo "${out%%$'\n'*}"
  initial=$(echo "$out" | sed -n 's/^KVD_INITIAL_CLUSTER="\(.*\)"$/\1/p')
  start_member "$name" "$initial" existing
  echo "started $name (pid $(cat "$CLUSTER_DIR/$name.pid")); log in $CLUSTER_DIR/$name.log"
  local id
  id=$(echo "$out" | awk 'NR == 1 { print $2 }')
  deadline=$((SECONDS + 120))
  # shellcheck disable=SC2046
  until "$BIN_DIR/kvctl" --endpoints "127.0.0.1:$client" $(client_tls_flags) --command-timeout 3s \
      get --consistency l /kvd-add-member-check > /dev/null 2>&1 \
      && promote=$(kvctl_all member promote "$id" 2>&1); do
    if ! alive "$CLUSTER_DIR/$name.pid"; then
      echo "member $name exited; its log ends with:" >&2
      tail -n 5 "$CLUSTER_DIR/$name.log" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "member $name did not catch up within 120s (${promote:-no answer}); it stays a learner" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "$promote"
  wait_published "$name" "$deadline"
  kvctl_all member list -w table
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
