#!/usr/bin/env bash
# How kvd's cost grows with the number of keys, against etcd 3.4 in the same
# run: for each size, a fresh three-member cluster of each system on the same
# ports is loaded with that many keys of 1 KiB by `kvctl bench put`, then
# measured: write throughput while loading, each member's resident memory
# and data directory, linearizable range p99 (64 clients), and the time from
# a restart of all three members to a healthy cluster; then 90% of the keys
# are deleted, the history compacted and every member defragmented, and the
# data directories measured again. Then, on one more fresh
# cluster of each, puts of 256-byte values from 1, 64, 256 and 1,024 clients
# (throughput, p50, p99). Prints two tables; with SCALE_JSON, also every
# figure as JSON lines.
#
#   cluster-scripts/scale-vs-etcd.sh --quick   # 10,000 and 100,000 keys (a few minutes)
#   cluster-scripts/scale-vs-etcd.sh           # 10,000, 100,000 and 1,000,000 keys
#
# Settings (environment):
#   SCALE_KEYS   the sizes, overriding both (e.g. "10000 50000")
#   SCALE_JSON   also write the results as JSON lines to this file
#   KVD_BIN_DIR  where kvd and kvctl are (default: target/release, built here)
# Needs etcd (cluster-scripts/test.sh installs Debian's etcd-server and
# etcd-client) and the ports 2379/2380, 22379/22380, 32379/32380.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${KVD_BIN_DIR:-$ROOT/target/release}"
SIZES=(10000 100000 1000000)
if [ "${1:-}" = "--quick" ]; then SIZES=(10000 100000); elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--quick]" >&2; exit 2
fi
[ -z "${SCALE_KEYS:-}" ] || read -r -a SIZES <<< "$SCALE_KEYS"
CLIENT_PORTS=(2379 22379 32379)
PEER_PORTS=(2380 22380 32380)
NAMES=(n1 n2 n3)
EPS="127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379"
command -v etcd > /dev/null || { echo "etcd is not installed; cluster-scripts/test.sh installs it" >&2; exit 1; }
if [ -z "${KVD_BIN_DIR:-}" ]; then
  echo "building release binaries..." >&2
  (cd "$ROOT" && cargo build --release --bins --quiet)
fi
for port in "${CLIENT_PORTS[@]}" "${PEER_PORTS[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use: stop what listens there first" >&2; exit 1
  fi
done
WORK="$(mktemp -d /tmp/kvd-scale.XXXXXX)"
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
PIDS=()
KVCTL=("$BIN_DIR/kvctl" --endpoints "$EPS")

stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  PIDS=()
}
cleanup() { stop_all; rm -rf "$WORK"; }
trap cleanup EXIT

wait_healthy() {
  local deadline=$((SECONDS + 600)) pid
  while true; do
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "a $1 member exited; its log:" >&2; tail -5 "$WORK"/*.log >&2; exit 1; }
    done
    "${KVCTL[@]}" --command-timeout 3s endpoint health > /dev/null 2>&1 && return 0
    [ $SECONDS -lt $deadline ] || { echo "$1 did not become healthy" >&2; exit 1; }
    sleep 0.1
  done
}

# system: starts its three members on the data directories under $WORK/$system-*.
start() {
  local system=$1 cluster="" i
  for i in 0 1 2; do cluster+="${cluster:+,}${NAMES[$i]}=http://127.0.0.1:${PEER_PORTS[$i]}"; done
  for i in 0 1 2; do
    local bin=etcd
    [ "$system" = kvd ] && bin="$BIN_DIR/kvd"
    "$bin" --name "${NAMES[$i]}" --data-dir "$WORK/$system-${NAMES[$i]}" \
      --listen-client-urls "http://127.0.0.1:${CLIENT_PORTS[$i]}" \
      --advertise-client-urls "http://127.0.0.1:${CLIENT_PORTS[$i]}" \
      --listen-peer-urls "http://127.0.0.1:${PEER_PORTS[$i]}" \
      --initial-advertise-peer-urls "http://127.0.0.1:${PEER_PORTS[$i]}" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token scale \
      --quota-backend-bytes 8589934592 \
      >> "$WORK/$system-${NAMES[$i]}.log" 2>&1 < /dev/null &
    PIDS+=($!)
  done
  wait_healthy "$system"
}

# system keys: one point of the curve.
measure() {
  local system=$1 keys=$2 i
  rm -rf "$WORK/$system"-*
  start "$system"
  echo "[$system] loading $keys keys of 1 KiB" >&2
  local load range
  load=$("${KVCTL[@]}" -w json bench put --conns 8 --clients 64 --total "$keys" --sequential-keys \
    --key-size 16 --key-space-size "$keys" --val-size 1024 --quiet)
  range=$("${KVCTL[@]}" -w json bench range --consistency l --conns 8 --clients 64 --total 5000 \
    --key-size 16 --key-space-size "$keys" --quiet)
  sleep 2
  local rss=() disk=()
  for i in 0 1 2; do
    rss+=("$(awk '/VmRSS/ {print $2}' "/proc/${PIDS[$i]}/status")")
    disk+=("$(du -sk "$WORK/$system-${NAMES[$i]}" | cut -f1)")
  done
  echo "[$system] restarting all three members" >&2
  stop_all
  local t0=$EPOCHREALTIME
  start "$system"
  local restart_ms
  restart_ms=$(python3 -c "print(round(($EPOCHREALTIME - $t0) * 1000))")
  echo "[$system] deleting 90% of the keys, compacting, defragmenting" >&2
  local bounds rev space=()
  # The keys bench writes: eight 'k's, then the key's number (big-endian).
  bounds=$(python3 -c "import base64,struct,json
k=lambda n: base64.b64encode(b'k'*8+struct.pack('>Q',n)).decode()
print(json.dumps({'key':k(0),'range_end':k($keys*9//10)}))")
  rev=$(curl -sf -X POST "http://127.0.0.1:${CLIENT_PORTS[0]}/v3/kv/deleterange" -d "$bounds" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')
  "${KVCTL[@]}" --command-timeout 600s compaction --physical "$rev" > /dev/null
  "${KVCTL[@]}" --command-timeout 600s defrag > /dev/null
  for i in 0 1 2; do space+=("$(du -sk "$WORK/$system-${NAMES[$i]}" | cut -f1)"); done
  stop_all
  printf '{"system":"%s","keys":%s,"load":%s,"range":%s,"rss_kb":[%s],"disk_kb":[%s],"restart_ms":%s,"defrag_kb":[%s]}\n' \
    "$system" "$keys" "$load" "$range" "$(IFS=,; echo "${rss[*]}")" "$(IFS=,; echo "${disk[*]}")" "$restart_ms" \
    "$(IFS=,; echo "${space[*]}")" >> "$RESULTS"
}

# system: the writers curve, on a fresh cluster.
writers() {
  local system=$1 clients conns out
  rm -rf "$WORK/$system"-*
  start "$system"
  for clients in 1 64 256 1024; do
    conns=$(( clients < 8 ? 1 : clients / 8 ))
    [ "$conns" -le 32 ] || conns=32
    echo "[$system] put from $clients clients" >&2
    out=$("${KVCTL[@]}" -w json bench put --conns "$conns" --clients "$clients" --total "$WRITES" \
      --key-size 16 --key-space-size 100000 --val-size 256 --quiet)
    printf '{"system":"%s","writers":%s,"put":%s}\n' "$system" "$clients" "$out" >> "$RESULTS"
  done
  stop_all
}

echo "etcd: $(etcd --version | head -n 1); sizes: ${SIZES[*]}" >&2
for keys in "${SIZES[@]}"; do
  measure etcd "$keys"
  measure kvd "$keys"
done
WRITES=20000
[ "${1:-}" = "--quick" ] && WRITES=5000
writers etcd
writers kvd
[ -z "${SCALE_JSON:-}" ] || cp "$RESULTS" "$SCALE_JSON"
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
writers = {(r["system"], r["writers"]): r["put"] for r in rows if "writers" in r}
rows = [r for r in rows if "keys" in r]
by = {(r["system"], r["keys"]): r for r in rows}
sizes = sorted({r["keys"] for r in rows})
mb = lambda kb: kb / 1024
cols = [
    ("load puts/s", lambda r: r["load"]["throughput"], "{:,.0f}", True),
    ("range p99 ms", lambda r: r["range"]["latency_ms"]["p99"], "{:.2f}", False),
    ("RSS max MB", lambda r: mb(max(r["rss_kb"])), "{:.0f}", False),
    ("data dir max MB", lambda r: mb(max(r["disk_kb"])), "{:.0f}", False),
    ("restart ms", lambda r: r["restart_ms"], "{:,.0f}", False),
    ("data dir max MB after deleting 90%, compaction, defrag", lambda r: mb(max(r["defrag_kb"])), "{:.0f}", False),
]
print("| keys | figure | etcd 3.4 | kvd | kvd/etcd |")
print("| ---: | --- | ---: | ---: | ---: |")
for n in sizes:
    e, k = by.get(("etcd", n)), by.get(("kvd", n))
    if not (e and k):
        continue
    for name, get, fmt, _ in cols:
        ev, kv = get(e), get(k)
        ratio = f"{kv / ev:.2f}" if ev else "-"
        print(f"| {n:,} | {name} | {fmt.format(ev)} | {fmt.format(kv)} | {ratio} |")
    errs = e["load"]["errors"] + k["load"]["errors"] + e["range"]["errors"] + k["range"]["errors"]
    if errs:
        print(f"| {n:,} | errors | {e['load']['errors'] + e['range']['errors']} | {k['load']['errors'] + k['range']['errors']} | |")
print()
print("| put clients | etcd 3.4 puts/s | kvd puts/s | kvd/etcd | etcd p50 ms | kvd p50 ms | etcd p99 ms | kvd p99 ms | errors etcd/kvd |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for c in sorted({c for (_, c) in writers}):
    e, k = writers.get(("etcd", c)), writers.get(("kvd", c))
    if not (e and k):
        continue
    print(f"| {c:,} | {e['throughput']:,.0f} | {k['throughput']:,.0f} | {k['throughput'] / e['throughput']:.2f} | "
          f"{e['latency_ms']['p50']:.2f} | {k['latency_ms']['p50']:.2f} | {e['latency_ms']['p99']:.2f} | "
          f"{k['latency_ms']['p99']:.2f} | {e['errors']}/{k['errors']} |")
PY
