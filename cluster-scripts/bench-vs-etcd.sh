#!/usr/bin/env bash
# Side-by-side benchmark: a three-member etcd 3.4 cluster (Debian's etcd-server),
# then a three-member kvd cluster with the same layout (same ports, one data
# directory each under one scratch directory), each driven by the same
# `kvctl bench` workloads (put from one client at each system's leader, and
# again at a follower). Prints one table: throughput and p99 of each
# workload for both, the ratio kvd/etcd, and each member's resident memory and
# data-directory size after the run.
#
# Settings (environment):
#   BENCH_DIR        scratch directory (default: a new one under /tmp, removed at the end)
#   BENCH_TOTAL      requests per closed-loop workload (default 20000)
#   BENCH_KEYS       keys written before measuring memory and disk (default 100000)
#   BENCH_SETTLE     seconds idle before memory is measured a second time (default 5)
#   BENCH_WORKLOADS  which workloads (default: all of them, see WORKLOADS below)
#   BENCH_JSON       if set, also write every result as JSON lines to this file
#   BENCH_THREADS    if set, threads per member for both: GOMAXPROCS for etcd,
#                    --worker-threads for kvd (default: each system's own, one per CPU)
#   BENCH_AUTH       if 1, each workload runs again with auth on, as a user (not root) with
#                    READWRITE on every key from "k" on; those rows are labelled +auth. Keys
#                    are then 16 bytes ("kkkkkkkk" and the key number), with auth and without
#   KVD_BIN_DIR      where kvd and kvctl are (default: target/release, built here)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${KVD_BIN_DIR:-$ROOT/target/release}"
TOTAL="${BENCH_TOTAL:-20000}"
KEYS="${BENCH_KEYS:-100000}"
SETTLE="${BENCH_SETTLE:-5}"
# shellcheck source=cluster-scripts/bench-lib.sh
source "$ROOT/cluster-scripts/bench-lib.sh"

if ! command -v etcd > /dev/null; then
  echo "etcd is not installed; cluster-scripts/test.sh installs it (etcd-server, etcd-client)" >&2
  exit 1
fi
if [ -z "${KVD_BIN_DIR:-}" ]; then
  echo "building release binaries..." >&2
  (cd "$ROOT" && cargo build --release --bins --quiet)
fi
for b in kvd kvctl; do
  [ -x "$BIN_DIR/$b" ] || { echo "$BIN_DIR/$b is not an executable (KVD_BIN_DIR must hold both kvd and kvctl)" >&2; exit 1; }
done

if [ -n "${BENCH_DIR:-}" ]; then
  WORK="$BENCH_DIR"; mkdir -p "$WORK"; KEEP=1
else
  WORK="$(mktemp -d /tmp/kvd-bench.XXXXXX)"; KEEP=0
fi
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"

cleanup() {
  stop_all
  [ "$KEEP" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

# name label workload options...
WORKLOADS=(
  "put-1|@leader put --conns 1 --clients 1"
  "put-1-follower|@follower put --conns 1 --clients 1"
  "put-64|put --conns 8 --clients 64"
  "put-256|put --conns 16 --clients 256"
  "range-l-64|range --consistency l --conns 8 --clients 64"
  "range-s-64|range --consistency s --conns 8 --clients 64"
  "txn-put-64|txn-put --conns 8 --clients 64"
  "watch-latency|watch-latency --conns 2 --watchers 10 --rate 200 --total 2000"
)
if [ -n "${BENCH_WORKLOADS:-}" ]; then
  selected=()
  for w in "${WORKLOADS[@]}"; do
    for want in $BENCH_WORKLOADS; do [ "${w%%|*}" = "$want" ] && selected+=("$w"); done
  done
  WORKLOADS=("${selected[@]}")
fi

# system: starts its three members on new data directories; a member that
# exits at start (a port already taken, for instance) ends the run: another
# cluster must not be measured.
start() {
  local bin=etcd
  LAUNCH=()
  [ "$1" != kvd ] || bin="$BIN_DIR/kvd"
  member_threads "$bin" "${BENCH_THREADS:-}"
  start_members "$bin" "$WORK/$1-" bench "${THREAD_FLAGS[@]}"
  wait_healthy "$1" "$BIN_DIR/kvctl" 60 || { KEEP=1; exit 1; }
}

# Where a workload sends its requests: all members, or with @leader or
# @follower one member of that role. A single client's writes take a hop
# more through a follower, in both systems, and which member is the first
# endpoint leads is chance: without this, put from one client compared
# one system's leader with the other's follower in some runs.
# The roles are looked up once per system, before auth is turned on.
workload_endpoints() {
  case "$1" in
    @leader) echo "$LEADER_EP" ;;
    @follower) echo "$FOLLOWER_EP" ;;
    *) echo "$EPS" ;;
  esac
}

# system: runs every workload, then fills to $KEYS keys and records memory and disk.
measure() {
  local system=$1 w label args eps
  LEADER_EP=$(member_with_role "$BIN_DIR/kvctl" true); FOLLOWER_EP=$(member_with_role "$BIN_DIR/kvctl" false)
  if [ -z "$LEADER_EP" ] || [ -z "$FOLLOWER_EP" ]; then
    echo "$system: no leader and follower found among $EPS" >&2
    exit 1
  fi
  echo "[$system] leader $LEADER_EP, follower $FOLLOWER_EP" >&2
  for w in "${WORKLOADS[@]}"; do
    label=${w%%|*}; args=${w#*|}
    eps=$(workload_endpoints "${args%% *}")
    args=${args#@* }
    case " $args " in *" --total "*) ;; *) args+=" --total $TOTAL" ;; esac
    [ "${BENCH_AUTH:-0}" = 1 ] && args+=" --key-size 16"
    echo "[$system] $label: kvctl --endpoints $eps bench $args" >&2
    # shellcheck disable=SC2086
    "$BIN_DIR/kvctl" --endpoints "$eps" -w json bench $args --key-space-size "$KEYS" --quiet \
      | sed "s/^{/{\"system\":\"$system\",\"label\":\"$label\",/" >> "$RESULTS"
  done
  local user=()
  if [ "${BENCH_AUTH:-0}" = 1 ]; then
    echo "[$system] turning auth on: user bench with READWRITE on every key from k on" >&2
    local ctl=("$BIN_DIR/kvctl" --endpoints "$EPS")
    "${ctl[@]}" user add root:rootpw > /dev/null
    "${ctl[@]}" role add bench > /dev/null
    "${ctl[@]}" role grant-permission bench readwrite k --from-key > /dev/null
    "${ctl[@]}" user add bench:benchpw > /dev/null
    "${ctl[@]}" user grant-role bench bench > /dev/null
    "${ctl[@]}" auth enable > /dev/null
    user=(--user bench:benchpw)
    for w in "${WORKLOADS[@]}"; do
      label=${w%%|*}; args=${w#*|}
      eps=$(workload_endpoints "${args%% *}")
      args=${args#@* }
      case " $args " in *" --total "*) ;; *) args+=" --total $TOTAL" ;; esac
      args+=" --key-size 16"
      echo "[$system] $label+auth: kvctl --endpoints $eps --user bench bench $args" >&2
      # shellcheck disable=SC2086
      "$BIN_DIR/kvctl" --endpoints "$eps" "${user[@]}" -w json bench $args --key-space-size "$KEYS" --quiet \
        | sed "s/^{/{\"system\":\"$system\",\"label\":\"$label+auth\",/" >> "$RESULTS"
    done
  fi
  echo "[$system] writing $KEYS distinct keys (256-byte values) for the memory and disk figures" >&2
  "$BIN_DIR/kvctl" --endpoints "$EPS" "${user[@]}" bench put --key-size 16 --conns 8 --clients 64 --total "$KEYS" --sequential-keys \
    --key-space-size "$KEYS" --val-size 256 --quiet > /dev/null
  local rss=() settled=() disk=() i
  for i in 0 1 2; do
    rss+=("$(awk '/VmRSS/ {print $2}' "/proc/${PIDS[$i]}/status")")
  done
  # Resident memory again once the members have been idle a few seconds:
  # what a member holds between bursts (both systems free memory lazily).
  sleep "$SETTLE"
  for i in 0 1 2; do
    settled+=("$(awk '/VmRSS/ {print $2}' "/proc/${PIDS[$i]}/status")")
    disk+=("$(du -sk "$WORK/$system-${NAMES[$i]}" | cut -f1)")
  done
  printf '{"system":"%s","label":"resources","rss_kb":[%s],"rss_settled_kb":[%s],"disk_kb":[%s]}\n' \
    "$system" "$(IFS=,; echo "${rss[*]}")" "$(IFS=,; echo "${settled[*]}")" "$(IFS=,; echo "${disk[*]}")" >> "$RESULTS"
}

require_free_ports

echo "etcd: $(etcd --version | sed -n 1p)" >&2
echo "threads per member: ${BENCH_THREADS:-the default of each (one per CPU)}" >&2
# The first system's data directories go, and what is still dirty reaches the
# disk, before the second starts: otherwise the kernel writes the first's
# hundreds of MB back while the second's log syncs are timed.
# Its logs stay.
settle_disk() {
  local name
  for name in "${NAMES[@]}"; do rm -rf "${WORK:?}/$1-$name"; done
  sync
}
start etcd
measure etcd
stop_all
settle_disk etcd
start kvd
measure kvd
stop_all

[ -z "${BENCH_JSON:-}" ] || cp "$RESULTS" "$BENCH_JSON"
python3 - "$RESULTS" "$SETTLE" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {(r["system"], r["label"]): r for r in rows}
labels = [r["label"] for r in rows if r["system"] == "etcd" and r["label"] != "resources"]
def cell(r, key):
    if r is None: return "-"
    return f'{r["throughput"]:,.0f}/s' if key == "tput" else f'{r["latency_ms"]["p99"]:.2f} ms'
print(f'{"workload":<15}{"etcd /s":>12}{"kvd /s":>12}{"kvd/etcd":>10}{"etcd p99":>12}{"kvd p99":>12}{"p50 etcd":>11}{"p50 kvd":>10}')
for l in labels:
    e, k = by.get(("etcd", l)), by.get(("kvd", l))
    ratio = k["throughput"] / e["throughput"] if e and k and e["throughput"] else float("nan")
    err = "" if not (e and k) or (e["errors"] == 0 and k["errors"] == 0) else f'  errors etcd {e["errors"]} kvd {k["errors"]}'
    print(f'{l:<15}{e["throughput"]:>12,.0f}{k["throughput"]:>12,.0f}{ratio:>9.2f}x'
          f'{e["latency_ms"]["p99"]:>10.2f}ms{k["latency_ms"]["p99"]:>10.2f}ms'
          f'{e["latency_ms"]["p50"]:>9.2f}ms{k["latency_ms"]["p50"]:>8.2f}ms{err}')
for s in ("etcd", "kvd"):
    r = by.get((s, "resources"))
    if r:
        mb = lambda kb: f"{kb/1024:.0f}"
        print(f'{s}: resident memory per member {"/".join(mb(x) for x in r["rss_kb"])} MB right after the writes, '
              f'{"/".join(mb(x) for x in r["rss_settled_kb"])} MB {sys.argv[2]} s later; '
              f'data dir per member {"/".join(mb(x) for x in r["disk_kb"])} MB')
EOF
