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
#   THREADS threads per member for both systems: GOMAXPROCS for etcd,
#           --worker-threads for kvd (default: each system's own, one per CPU)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 2 ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
ROUNDS=$1; shift
# shellcheck source=cluster-scripts/bench-lib.sh
source "$ROOT/cluster-scripts/bench-lib.sh"
ab_setup "$ROOT" "$@"
require_free_ports

WORK="$(mktemp -d /tmp/kvd-ab.XXXXXX)"
trap 'stop_all; rm -rf "$WORK"' EXIT

start() {
  LAUNCH=()
  member_threads "$1" "${THREADS:-}"
  start_members "$(system_bin "$1")" "$WORK/" ab "${THREAD_FLAGS[@]}"
  if ! wait_healthy "$1" "$KVCTL" 60; then trap - EXIT; stop_all; exit 1; fi
}

HZ=$(getconf CLK_TCK)
for _ in $(seq "$ROUNDS"); do
  for b in "$@"; do
    start "$b"
    leader=$(member_with_role "$KVCTL" true); follower=$(member_with_role "$KVCTL" false)
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
    rm -rf "${WORK:?}"/n[123] "${WORK:?}"/n[123].log
  done
done
