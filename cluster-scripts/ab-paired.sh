#!/usr/bin/env bash
# Two systems measured in pairs of runs with both clusters up at once: kvd
# builds, or a build and etcd 3.4 ("etcd"). Runs of one system minutes apart
# on this shared machine differ by more than a change of a few percent (see
# ab-builds.sh, which starts a fresh cluster per run); with both clusters
# running, each run of A is followed at once by one of B, and the ratio of
# each pair is taken in the same stretch of time. The cluster not measured is
# idle meanwhile (its heartbeats only).
#
#   cluster-scripts/ab-paired.sh PAIRS CLIENTS A B
#
# A and B are each a directory holding a kvd binary, or "etcd". Every run is
# `kvctl bench put` over all three members of one cluster, the leader listed
# first (one client puts at the leader), from CLIENTS clients over CLIENTS/8
# connections (at least 1, at most 16), at keys among 100,000; A runs first
# in odd pairs, B in even. Each run prints a line: the system, throughput /s, p50
# and p99 in ms; then, for each system, the median throughput and p99, and
# the median of B/A over the pairs with how many pairs B was ahead in.
#
# Settings (environment):
#   KVCTL   the kvctl that drives every run (default: target/release/kvctl, built here)
#   TOTAL   puts per run (default: 10,000, or 2,000 for one client)
#   THREADS threads per member for both systems: GOMAXPROCS for etcd,
#           --worker-threads for kvd (default: each system's own, one per CPU)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -ne 4 ]; then
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
PAIRS=$1 CLIENTS=$2
SYSTEMS=("$3" "$4")
case "$PAIRS$CLIENTS" in *[!0-9]*) echo "PAIRS and CLIENTS are numbers" >&2; exit 2 ;; esac
[ "$PAIRS" -ge 1 ] && [ "$CLIENTS" -ge 1 ] || { echo "PAIRS and CLIENTS are at least 1" >&2; exit 2; }
CONNS=$((CLIENTS / 8)); [ "$CONNS" -ge 1 ] || CONNS=1; [ "$CONNS" -le 16 ] || CONNS=16
DEFAULT_TOTAL=10000; [ "$CLIENTS" -gt 1 ] || DEFAULT_TOTAL=2000
TOTAL=${TOTAL:-$DEFAULT_TOTAL}
# shellcheck source=cluster-scripts/bench-lib.sh
source "$ROOT/cluster-scripts/bench-lib.sh"
ab_setup "$ROOT" "${SYSTEMS[@]}"

# Cluster 0 on bench-lib's ports, cluster 1 on each of them plus 10.
BASE_CLIENT_PORTS=("${CLIENT_PORTS[@]}") BASE_PEER_PORTS=("${PEER_PORTS[@]}")
ports() {
  local i
  for i in 0 1 2; do
    CLIENT_PORTS[i]=$((BASE_CLIENT_PORTS[i] + $1 * 10))
    PEER_PORTS[i]=$((BASE_PEER_PORTS[i] + $1 * 10))
  done
  EPS="127.0.0.1:${CLIENT_PORTS[0]},127.0.0.1:${CLIENT_PORTS[1]},127.0.0.1:${CLIENT_PORTS[2]}"
}

WORK="$(mktemp -d /tmp/kvd-paired.XXXXXX)"
EVERY=()
TARGET=()
trap 'PIDS=("${EVERY[@]}"); kill_all; rm -rf "$WORK"' EXIT
for side in 0 1; do
  ports "$side"
  require_free_ports
done
for side in 0 1; do
  ports "$side"
  PIDS=()
  LAUNCH=()
  member_threads "${SYSTEMS[side]}" "${THREADS:-}"
  start_members "$(system_bin "${SYSTEMS[side]}")" "$WORK/s$side-" "paired$side" "${THREAD_FLAGS[@]}"
  EVERY+=("${PIDS[@]}")
  wait_healthy "${SYSTEMS[side]}" "$KVCTL" 60 || exit 1
  # kvctl spreads its connections over the endpoints in their order (8 over
  # three: 3, 3 and 2), and a write the leader takes directly is faster than
  # one a follower forwards, so where the leader falls in the list moves a
  # run by several percent. Each cluster's list begins with its leader.
  leader=$(member_with_role "$KVCTL" true)
  TARGET[side]=$leader
  for ep in ${EPS//,/ }; do [ "$ep" = "$leader" ] || TARGET[side]+=",$ep"; done
  [ "$CLIENTS" -gt 1 ] || TARGET[side]=$leader
  # A first run warms the connections and the store; it is not counted.
  "$KVCTL" --endpoints "${TARGET[side]}" bench put --conns "$CONNS" --clients "$CLIENTS" --total "$TOTAL" \
    --key-space-size 100000 --quiet > /dev/null
done

RESULTS="$WORK/results"
# The run that comes second in a pair ran 2-3% slower in runs of one build
# against itself (work the first leaves behind, flushes and collection), so
# the order changes from pair to pair.
for pair in $(seq "$PAIRS"); do
  order="0 1"; [ $((pair % 2)) = 1 ] || order="1 0"
  for side in $order; do
    "$KVCTL" --endpoints "${TARGET[side]}" -w json bench put --conns "$CONNS" --clients "$CLIENTS" --total "$TOTAL" \
      --key-space-size 100000 --quiet |
      python3 -c 'import json, sys
r = json.loads(sys.stdin.read()); lat = r["latency_ms"]
print("%s %s %.0f/s p50 %.3f p99 %.3f" % (sys.argv[1], sys.argv[2], r["throughput"], lat["p50"], lat["p99"]))' \
        "$side" "$(basename "${SYSTEMS[side]}")" | tee -a "$RESULTS" | cut -d' ' -f2-
  done
done
python3 - "$RESULTS" <<'EOF'
import statistics, sys
runs = {0: [], 1: []}
names = {}
for line in open(sys.argv[1]):
    side, name, tput, _, p50, _, p99 = line.split()
    names[int(side)] = name
    runs[int(side)].append((float(tput[:-2]), float(p50), float(p99)))
for side in (0, 1):
    r = runs[side]
    print("%s: throughput median %.0f/s (%.0f-%.0f), p50 median %.3f ms, p99 median %.3f ms" % (
        names[side], statistics.median(x[0] for x in r), min(x[0] for x in r), max(x[0] for x in r),
        statistics.median(x[1] for x in r), statistics.median(x[2] for x in r)))
ratios = [b[0] / a[0] for a, b in zip(runs[0], runs[1])]
print("%s/%s throughput per pair: median %.3f, %s ahead in %d of %d pairs" % (
    names[1], names[0], statistics.median(ratios), names[1], sum(1 for x in ratios if x > 1), len(ratios)))
EOF
