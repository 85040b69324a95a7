#!/usr/bin/env bash
# Alternating A/B runs of kvd builds (and etcd 3.4, named "etcd"), each on a
# fresh three-member cluster on bench-vs-etcd.sh's ports, all driven by one
# kvctl. On a shared, noisy machine two builds measured minutes apart differ
# by more than most changes do; builds taking turns, round after round, are
# compared in the same stretch of time.
#
#   cluster-scripts/ab-builds.sh ROUNDS DIR|etcd [DIR|etcd ...]
#
# Each DIR holds a kvd binary (copy target/release/kvd of each build to a
# directory of its own). Each run prints one line per workload: the build,
# the workload, throughput /s, p50 and p99 in ms, and the CPU time of the
# three members per request in µs (/proc/<pid>/stat). Workloads: put from one
# client at the leader (put-1) and at a follower (put-1-follower), 4,000 puts
# each; put from 64 clients over 8 connections and 256 over 16, 20,000 each.
#
# Settings (environment):
#   KVCTL   the kvctl that drives every run (default: target/release/kvctl, built here)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 2 ]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
ROUNDS=$1; shift
if [ -z "${KVCTL:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin kvctl --quiet)
  KVCTL="$ROOT/target/release/kvctl"
fi
for b in "$@"; do
  if [ "$b" = etcd ]; then
    command -v etcd > /dev/null || { echo "etcd is not installed (cluster-scripts/test.sh installs it)" >&2; exit 1; }
  elif [ ! -x "$b/kvd" ]; then
    echo "$b/kvd is not an executable" >&2; exit 1
  fi
done
CLIENT_PORTS=(2379 22379 32379)
PEER_PORTS=(2380 22380 32380)
NAMES=(n1 n2 n3)
EPS="127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379"
for port in "${CLIENT_PORTS[@]}" "${PEER_PORTS[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use: stop what listens there first" >&2
    exit 1
  fi
done

WORK="$(mktemp -d /tmp/kvd-ab.XXXXXX)"
PIDS=()
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  PIDS=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT

start() {
  local bin=$1 cluster="" i
  [ "$bin" = etcd ] || bin="$bin/kvd"
  for i in 0 1 2; do cluster+="${cluster:+,}${NAMES[$i]}=http://127.0.0.1:${PEER_PORTS[$i]}"; done
  for i in 0 1 2; do
    "$bin" --name "${NAMES[$i]}" --data-dir "$WORK/${NAMES[$i]}" \
      --listen-client-urls "http://127.0.0.1:${CLIENT_PORTS[$i]}" \
      --advertise-client-urls "http://127.0.0.1:${CLIENT_PORTS[$i]}" \
      --listen-peer-urls "http://127.0.0.1:${PEER_PORTS[$i]}" \
      --initial-advertise-peer-urls "http://127.0.0.1:${PEER_PORTS[$i]}" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token ab \
      > "$WORK/${NAMES[$i]}.log" 2>&1 < /dev/null &
    PIDS+=($!)
  done
  local deadline=$((SECONDS + 60))
  until "$KVCTL" --endpoints "$EPS" --command-timeout 3s endpoint health > /dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "$1 did not become healthy; logs in $WORK" >&2; trap - EXIT; exit 1; fi
    sleep 0.2
  done
}

# Clock ticks of CPU the three members have used.
cpu_ticks() {
  local pid total=0
  for pid in "${PIDS[@]}"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done
  echo "$total"
}

role() {
  "$KVCTL" --endpoints "$EPS" --command-timeout 3s endpoint status | awk -F', ' -v r="$1" '$5 == r { print $1; exit }'
}

HZ=$(getconf CLK_TCK)
for _ in $(seq "$ROUNDS"); do
  for b in "$@"; do
    start "$b"
    leader=$(role true); follower=$(role false)
    for w in "put-1|$leader|--conns 1 --clients 1 --total 4000" \
      "put-1-follower|$follower|--conns 1 --clients 1 --total 4000" \
      "put-64|$EPS|--conns 8 --clients 64 --total 20000" \
      "put-256|$EPS|--conns 16 --clients 256 --total 20000"; do
      IFS='|' read -r label eps args <<< "$w"
      before=$(cpu_ticks)
      # shellcheck disable=SC2086
      result=$("$KVCTL" --endpoints "$eps" -w json bench put $args --key-space-size 100000 --quiet)
      after=$(cpu_ticks)
      total=${args##*--total }
      python3 -c 'import json, sys
r = json.loads(sys.argv[1]); lat = r["latency_ms"]
cpu = int(sys.argv[4]) * 1e6 / int(sys.argv[5]) / int(sys.argv[6])
print("%s %s %.0f/s p50 %.3f p99 %.3f cpu/request %.0fus" % (sys.argv[2], sys.argv[3], r["throughput"], lat["p50"], lat["p99"], cpu))' \
        "$result" "$(basename "$b")" "$label" "$((after - before))" "$HZ" "$total"
    done
    stop_all
    rm -rf "${WORK:?}"/n[123]
  done
done
