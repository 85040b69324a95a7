#!/usr/bin/env bash
# A rehearsal of docs/operations.md "Three hosts with TLS": three network
# namespaces stand in for three hosts, each with an address of its own on one
# bridge, and kvd runs in each with TLS on the client and peer ports, made by
# the guide's own commands. Then: a write on one host is read on the others;
# one host is cut off the network, the other two go on taking writes, and the
# cut-off host, once healed, serves them too.
#
# Needs root (network namespaces, a bridge); without the rights it says so and
# exits 77. Everything it makes (namespaces, links, processes, files) is
# removed when it ends, however it ends.
#
# KVD_BIN_DIR  where kvd and kvctl are (default: target/release, built when needed)
# KEEP_DIR     keep the certificates and logs in this directory
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${KVD_BIN_DIR:-$ROOT/target/release}"

skip() { echo "three-hosts: skipped: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root for network namespaces"
command -v ip > /dev/null || skip "needs ip (iproute2)"
command -v openssl > /dev/null || apt-get install -y -qq openssl > /dev/null 2>&1 || skip "needs openssl"

# Names unique to this run, short enough for interface names (15 bytes).
tag=$(( $$ % 100000 ))
net="10.$(( 100 + $$ % 100 )).$(( ($$ / 100) % 250 ))"
bridge="kvb$tag"
WORK="${KEEP_DIR:-$(mktemp -d /tmp/kvd-three-hosts.XXXXXX)}"
mkdir -p "$WORK"
PIDS=()
NSES=()

cleanup() {
  local pid ns
  for pid in "${PIDS[@]}"; do kill "$pid" 2> /dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2> /dev/null || true; done
  for ns in "${NSES[@]}"; do ip netns del "$ns" 2> /dev/null || true; done
  ip link del "$bridge" 2> /dev/null || true
  [ -n "${KEEP_DIR:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "kvdprobe$tag" 2> /dev/null || skip "cannot make network namespaces here (ip netns add failed)"
ip netns del "kvdprobe$tag"

if [ ! -x "$BIN_DIR/kvd" ] || [ ! -x "$BIN_DIR/kvctl" ]; then
  [ -z "${KVD_BIN_DIR:-}" ] || { echo "three-hosts: no kvd and kvctl in $BIN_DIR" >&2; exit 1; }
  echo "building release binaries (cargo build --release)..." >&2
  (cd "$ROOT" && cargo build --release --bins)
fi

step() { echo "== $*"; }

step "three hosts: network namespaces on bridge $bridge, addresses $net.1-3"
ip link add "$bridge" type bridge
ip addr add "$net.254/24" dev "$bridge"
ip link set "$bridge" up
HOSTS=(h1 h2 h3)
ADDR=()
for i in 1 2 3; do
  ns="kvh$tag-$i"
  ip netns add "$ns"
  NSES+=("$ns")
  ip link add "kvv$tag-$i" type veth peer name eth0 netns "$ns"
  ip link set "kvv$tag-$i" master "$bridge" up
  ip -n "$ns" addr add "$net.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ADDR+=("$net.$i")
done

# Step 1 of the guide: a CA, a certificate per host for its address (common
# name kvd-member, which every member requires of the others), and one for
# clients.
step "certificates (the guide's step 1)"
(
  cd "$WORK"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca-key.pem
  openssl req -x509 -new -key ca-key.pem -out ca.pem -days 365 -subj /CN=kvd-ca
  for i in 1 2 3; do
    host=${HOSTS[$((i - 1))]} addr=${ADDR[$((i - 1))]}
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$host-key.pem"
    openssl req -new -key "$host-key.pem" -subj /CN=kvd-member -out "$host.csr"
    printf 'subjectAltName=IP:%s,DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$addr" "$host" > "$host.ext"
    openssl x509 -req -in "$host.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 365 \
      -extfile "$host.ext" -out "$host.pem"
  done
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out client-key.pem
  openssl req -new -key client-key.pem -subj /CN=kvd-client -out client.csr
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 365 \
    -extfile client.ext -out client.pem
) 2> "$WORK/openssl.log"

# Step 2: each host runs kvd with its own certificate.
step "kvd on each host (the guide's step 2)"
cluster="h1=https://${ADDR[0]}:2380,h2=https://${ADDR[1]}:2380,h3=https://${ADDR[2]}:2380"
for i in 1 2 3; do
  host=${HOSTS[$((i - 1))]} addr=${ADDR[$((i - 1))]}
  mkdir -p "$WORK/$host"
  ip netns exec "kvh$tag-$i" "$BIN_DIR/kvd" --name "$host" --data-dir "$WORK/$host/data" \
    --listen-client-urls "https://$addr:2379" --advertise-client-urls "https://$addr:2379" \
    --listen-peer-urls "https://$addr:2380" --initial-advertise-peer-urls "https://$addr:2380" \
    --initial-cluster "$cluster" --initial-cluster-token kvd-prod-1 --initial-cluster-state new \
    --cert-file "$WORK/$host.pem" --key-file "$WORK/$host-key.pem" \
    --trusted-ca-file "$WORK/ca.pem" --client-cert-auth \
    --peer-cert-file "$WORK/$host.pem" --peer-key-file "$WORK/$host-key.pem" \
    --peer-trusted-ca-file "$WORK/ca.pem" --peer-client-cert-auth --peer-cert-allowed-cn kvd-member \
    > "$WORK/$host/kvd.log" 2>&1 &
  PIDS+=($!)
done

kvctl() {
  "$BIN_DIR/kvctl" --cacert "$WORK/ca.pem" --cert "$WORK/client.pem" --key "$WORK/client-key.pem" \
    --dial-timeout 1s --command-timeout 3s "$@"
}
EPS="https://${ADDR[0]}:2379,https://${ADDR[1]}:2379,https://${ADDR[2]}:2379"
ep() { echo "https://${ADDR[$(($1 - 1))]}:2379"; }

# Waits up to 30 s for "$@" to succeed.
wait_for() {
  local deadline=$(( SECONDS + 30 ))
  until "$@" > /dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "three-hosts: gave up waiting for: $*" >&2
      for h in "${HOSTS[@]}"; do echo "--- $h" >&2; tail -n 20 "$WORK/$h/kvd.log" >&2; done
      exit 1
    fi
    sleep 0.2
  done
}

# Step 3: check the cluster.
step "the cluster answers (the guide's step 3)"
wait_for kvctl --endpoints "$EPS" endpoint health
kvctl --endpoints "$EPS" endpoint health
kvctl --endpoints "$(ep 1)" member list

# Prints the value of $2 read on host $1 (linearizable).
value_on() { kvctl --endpoints "$(ep "$1")" get "$2" --print-value-only; }
# Succeeds once host $1 reads value $3 for key $2.
reads() { [ "$(value_on "$1" "$2")" = "$3" ]; }

step "only TLS clients with a certificate from the CA are served"
if out=$("$BIN_DIR/kvctl" --endpoints "http://${ADDR[0]}:2379" --dial-timeout 1s --command-timeout 3s get x 2>&1); then
  echo "three-hosts: a plain-text client was served: $out" >&2
  exit 1
fi
if out=$("$BIN_DIR/kvctl" --endpoints "$(ep 1)" --cacert "$WORK/ca.pem" --dial-timeout 1s --command-timeout 3s get x 2>&1); then
  echo "three-hosts: a client without a certificate was served: $out" >&2
  exit 1
fi
echo "plain text and no client certificate: refused"

step "a write on h1 is read on h2 and h3"
kvctl --endpoints "$(ep 1)" put /config/greeting hello > /dev/null
for h in 2 3; do
  got=$(value_on "$h" /config/greeting)
  [ "$got" = hello ] || { echo "three-hosts: h$h read '$got', not hello" >&2; exit 1; }
  echo "h$h: /config/greeting = $got"
done

step "h3 cut off the network"
ip link set "kvv$tag-3" down
# The other two go on: a write through h2 is read on h1.
wait_for kvctl --endpoints "$(ep 2)" put /config/greeting after-the-cut
wait_for reads 1 /config/greeting after-the-cut
echo "h1: /config/greeting = $(value_on 1 /config/greeting)"
for n in $(seq 1 50); do kvctl --endpoints "$(ep $(( 1 + n % 2 )))" put "/jobs/$n" "run $n" > /dev/null; done
echo "50 more writes through h1 and h2"
if out=$(kvctl --endpoints "$(ep 3)" get /config/greeting --print-value-only 2>&1); then
  echo "three-hosts: h3 answered while cut off: $out" >&2
  exit 1
fi
echo "h3 (cut off): no answer, as it should be: ${out##*$'\n'}"

step "h3 back on the network"
ip link set "kvv$tag-3" up
wait_for reads 3 /config/greeting after-the-cut
echo "h3: /config/greeting = $(value_on 3 /config/greeting)"
jobs=$(kvctl --endpoints "$(ep 3)" get /jobs/ --prefix --count-only -w json | sed -e 's/.*"count":\([0-9]*\).*/\1/')
[ "$jobs" = 50 ] || { echo "three-hosts: h3 has $jobs of the 50 writes made while it was cut off" >&2; exit 1; }
echo "h3: all 50 writes made while it was cut off"
kvctl --endpoints "$EPS" endpoint status -w table

step "three hosts with TLS: passed"
