#!/usr/bin/env bash
# How kvd's cost grows with the number of keys, against etcd 3.4 in the same
# run: for each size, a fresh three-member cluster of each system on the same
# ports is loaded with that many keys of 1 KiB by `kvctl bench put`, then
# measured: write throughput while loading, each member's resident memory
# and data directory, linearizable range p99 (64 clients), and the time from
# a restart of all three members to a healthy cluster; a member that loses
# its data, is removed and added again: the time until it serves the last
# key and its peak memory; then 90% of the keys
# are deleted, the history compacted and every member defragmented, and the
# data directories measured again. Then, each on fresh clusters:
# - writers: puts of 256-byte values from 1, 64, 256 and 1,024 clients
#   (throughput, p50, p99);
# - leases: 1,000, 10,000 and 100,000 leases of 15 s kept alive every 5 s,
#   as etcd's clients do, for 20 s (keep-alives answered per second, their
#   p99, the members' CPU over those 20 s and their memory);
# - an expiry storm: 10,000 leases of 30 s with a key each, renewed at once, left to
#   expire together while puts go on at 200/s (the time until every key is
#   gone, the puts' p99);
# - watchers: 1,000, 10,000 and 50,000 watchers of one prefix on 100 streams,
#   and 200 puts at 200/s under it (p99 from a put to its event at a
#   watcher, the members' memory).
# - data larger than memory: each member in a memory cgroup of 1 GiB (cgroup
#   v1, or systemd-run's MemoryMax where systemd runs), 4 GiB of values of
#   16 KiB written in four steps of new keys; after each step, each member's
#   resident and peak memory, its data directory, a linearizable range p99
#   over the written keys, and whether every member still runs; at the end
#   the time from a restart to a healthy cluster, still within the limit.
# Prints a table per curve, and draws the curves as PNG plots (benches/scale-plot,
# with plotters) into SCALE_PLOTS; with SCALE_JSON, also writes every figure as
# JSON lines.
#
#   cluster-scripts/scale-vs-etcd.sh --quick   # 10,000 and 50,000 keys; up to 10,000 leases (kept
#                                              # alive for 8 s) and watchers; leases of 10 s for
#                                              # the storm; 512 MiB of values in 256 MiB
#   cluster-scripts/scale-vs-etcd.sh           # 10,000, 100,000 and 1,000,000 keys; 4 GiB in 1 GiB
#
# Settings (environment):
#   SCALE_KEYS   the sizes, overriding both (e.g. "10000 50000")
#   SCALE_CURVES which curves to run (default: "keys writers leases storm watchers bigdata")
#   SCALE_BIG_MB, SCALE_BIG_LIMIT_MB, SCALE_BIG_VAL  the data larger than memory: MiB of
#                values, each member's memory limit in MiB, the value size in bytes
#   SCALE_JSON   also write the results as JSON lines to this file
#   SCALE_PLOTS  where the PNG plots go (default: target/scale-plots)
#   SCALE_THREADS threads per member for both systems: GOMAXPROCS for etcd,
#                --worker-threads for kvd (default: each system's own, one per CPU)
#   KVD_BIN_DIR  where kvd and kvctl are (default: target/release, built here)
# Needs etcd (cluster-scripts/test.sh installs Debian's etcd-server and
# etcd-client) and the ports 2379/2380, 22379/22380, 32379/32380.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${KVD_BIN_DIR:-$ROOT/target/release}"
SIZES=(10000 100000 1000000)
LEASES=(1000 10000 100000)
WATCHERS=(1000 10000 50000)
BIG_MB=4096 BIG_LIMIT_MB=1024
# Seconds the leases are kept alive for; the TTL of the leases that expire at once.
LEASE_SECS=20 STORM_TTL=30
if [ "${1:-}" = "--quick" ]; then SIZES=(10000 50000); LEASES=(1000 10000); WATCHERS=(1000 10000)
  BIG_MB=512 BIG_LIMIT_MB=256 LEASE_SECS=8 STORM_TTL=10
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--quick]" >&2; exit 2
fi
[ -z "${SCALE_KEYS:-}" ] || read -r -a SIZES <<< "$SCALE_KEYS"
BIG_MB=${SCALE_BIG_MB:-$BIG_MB} BIG_LIMIT_MB=${SCALE_BIG_LIMIT_MB:-$BIG_LIMIT_MB} BIG_VAL=${SCALE_BIG_VAL:-16384}
# shellcheck source=cluster-scripts/bench-lib.sh
source "$ROOT/cluster-scripts/bench-lib.sh"
command -v etcd > /dev/null || { echo "etcd is not installed; cluster-scripts/test.sh installs it" >&2; exit 1; }
if [ -z "${KVD_BIN_DIR:-}" ]; then
  # The plotter in the same build, which compiles it beside kvd.
  echo "building release binaries..." >&2
  (cd "$ROOT" && cargo build --release --bins -p kvd -p kvd-scale-plot --quiet)
fi
for b in kvd kvctl; do
  [ -x "$BIN_DIR/$b" ] || { echo "$BIN_DIR/$b is not an executable (KVD_BIN_DIR must hold both kvd and kvctl)" >&2; exit 1; }
done
PLOTTER="$BIN_DIR/kvd-scale-plot"
if [ ! -x "$PLOTTER" ]; then
  echo "building the plotter..." >&2
  (cd "$ROOT" && cargo build --release -p kvd-scale-plot --quiet)
  PLOTTER="$ROOT/target/release/kvd-scale-plot"
fi
require_free_ports
WORK="$(mktemp -d /tmp/kvd-scale.XXXXXX)"
# Written as the run goes, so that a run cut short keeps what it measured.
RESULTS="${SCALE_JSON:-$WORK/results.jsonl}"
: > "$RESULTS"
KVCTL=("$BIN_DIR/kvctl" --endpoints "$EPS")

# KiB a directory takes. A member that runs deletes files while du walks its
# directory (sled's blobs); du then complains of the ones gone but still
# prints the total, which is what is wanted.
dir_kb() {
  { du -sk "$1" 2> /dev/null || true; } | cut -f1
}

cleanup() {
  [ -z "${SAMPLER:-}" ] || kill "$SAMPLER" 2> /dev/null || true
  kill_all
  remove_cgroups
  rm -rf "$WORK"
}
trap cleanup EXIT

# system [soft]: waits until every member answers health; a member that
# exits, or ten minutes without health, end the run (with soft: return 1).
healthy() {
  wait_healthy "$1" "$BIN_DIR/kvctl" 600 && return 0
  tail -n 5 "$WORK"/*.log >&2
  [ -n "${2:-}" ] && return 1
  exit 1
}

# The cgroup v1 memory hierarchy this script may make a cgroup in for each
# member, or nothing.
memory_cgroup_base() {
  local rel dir
  rel=$(awk -F: '$2 == "memory" {print $3}' /proc/self/cgroup)
  dir="/sys/fs/cgroup/memory${rel%/}"
  if [ -n "$rel" ] && mkdir "$dir/kvd-scale-probe" 2> /dev/null; then
    rmdir "$dir/kvd-scale-probe"
    echo "$dir"
  fi
}
CGROUP_BASE=$(memory_cgroup_base)
MEM_LIMIT_MB=""

remove_cgroups() {
  [ -z "$CGROUP_BASE" ] || rmdir "$CGROUP_BASE"/kvd-scale-* 2> /dev/null || true
}

# system i: the command words that start member i within MEM_LIMIT_MB of
# memory (none without a limit), into LAUNCH.
limit_launch() {
  local cg="$CGROUP_BASE/kvd-scale-$1-$2" bytes=$((MEM_LIMIT_MB << 20))
  LAUNCH=()
  [ -n "$MEM_LIMIT_MB" ] || return 0
  if [ -n "$CGROUP_BASE" ]; then
    mkdir -p "$cg"
    echo "$bytes" > "$cg/memory.limit_in_bytes"
    # Without swap beyond the limit, where the kernel counts swap.
    [ ! -f "$cg/memory.memsw.limit_in_bytes" ] || echo "$bytes" > "$cg/memory.memsw.limit_in_bytes"
    # shellcheck disable=SC2016 # $$ and $@ are the inner shell's
    LAUNCH=(sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg")
  else
    LAUNCH=(systemd-run --scope --quiet -p "MemoryMax=${MEM_LIMIT_MB}M" -p MemorySwapMax=0)
  fi
}

# system i state: starts member i on its data directory under
# $WORK/$system-*, in the background, within MEM_LIMIT_MB; its pid goes to
# PIDS[i].
launch_member() {
  local bin=etcd
  [ "$1" = kvd ] && bin="$BIN_DIR/kvd"
  limit_launch "$1" "$2"
  member_threads "$bin" "${SCALE_THREADS:-}"
  start_member "$bin" "$2" "$WORK/$1-${NAMES[$2]}" "$3" scale --quota-backend-bytes 8589934592 "${THREAD_FLAGS[@]}"
}

# system [soft]: starts its three members on the data directories under
# $WORK/$system-* (see healthy for soft).
start() {
  local system=$1 i
  for i in 0 1 2; do launch_member "$system" "$i" new; done
  healthy "$system" "${2:-}"
}

# system keys: the third member loses its data (after every member took a
# snapshot); it is removed, added again
# as a new member (a wiped member is never let back under its old id) and
# started empty. Sets CATCHUP_MS, the milliseconds until it serves the last
# key written, read locally, and CATCHUP_PEAK_KB, its peak resident memory.
catch_up() {
  local system=$1 keys=$2 id
  local two="127.0.0.1:${CLIENT_PORTS[0]},127.0.0.1:${CLIENT_PORTS[1]}"
  # The member is to catch up by snapshot. etcd takes one every 100,000
  # writes; kvd counts its snapshot interval in log entries of many writes
  # each, so at these sizes it has taken none and a new member would replay
  # the whole log. A defragment makes each member take one (and is the same
  # command for both systems).
  "$BIN_DIR/kvctl" --endpoints "$EPS" --command-timeout 900s defrag > /dev/null
  id=$("$BIN_DIR/kvctl" --endpoints "$two" -w json member list | python3 -c "import json,sys
print(next(format(m['ID'], 'x') for m in json.load(sys.stdin)['members'] if m['name'] == '${NAMES[2]}'))")
  kill -TERM "${PIDS[2]}"
  while kill -0 "${PIDS[2]}" 2> /dev/null; do sleep 0.1; done
  rm -rf "$WORK/$system-${NAMES[2]}"
  "$BIN_DIR/kvctl" --endpoints "$two" member remove "$id" > /dev/null
  # etcd refuses to add a member until it finds the cluster healthy again.
  local tries=0
  until "$BIN_DIR/kvctl" --endpoints "$two" member add "${NAMES[2]}" \
    --peer-urls "http://127.0.0.1:${PEER_PORTS[2]}" > /dev/null 2> "$WORK/member-add.err"; do
    tries=$((tries + 1))
    [ $tries -lt 300 ] || { echo "member add failed: $(cat "$WORK/member-add.err")" >&2; exit 1; }
    sleep 0.1
  done
  local last t0 deadline=$((SECONDS + 1800))
  last=$(python3 -c "import base64,struct,json
print(json.dumps({'key': base64.b64encode(b'k'*8+struct.pack('>Q',$keys-1)).decode(), 'serializable': True}))")
  t0=$EPOCHREALTIME
  launch_member "$system" 2 existing
  until curl -sf -X POST "http://127.0.0.1:${CLIENT_PORTS[2]}/v3/kv/range" -d "$last" 2> /dev/null |
    grep -q '"kvs"'; do
    kill -0 "${PIDS[2]}" 2> /dev/null || { echo "the $system member that lost its data exited" >&2; exit 1; }
    [ $SECONDS -lt $deadline ] || { echo "the $system member that lost its data did not catch up" >&2; exit 1; }
    # Asked often: at 10,000 keys either system serves within a few
    # hundred milliseconds, and a 100 ms wait was a good part of the figure.
    sleep 0.02
  done
  CATCHUP_MS=$(python3 -c "print(round(($EPOCHREALTIME - $t0) * 1000))")
  CATCHUP_PEAK_KB=$(awk '/VmHWM/ {print $2}' "/proc/${PIDS[2]}/status")
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
    disk+=("$(dir_kb "$WORK/$system-${NAMES[$i]}")")
  done
  echo "[$system] restarting all three members" >&2
  stop_all 20
  local t0=$EPOCHREALTIME
  start "$system"
  local restart_ms
  restart_ms=$(python3 -c "print(round(($EPOCHREALTIME - $t0) * 1000))")
  echo "[$system] a member loses its data and catches up" >&2
  catch_up "$system" "$keys"
  echo "[$system] deleting 90% of the keys, compacting, defragmenting" >&2
  local bounds rev space=()
  # The keys bench writes: eight 'k's, then the key's number (big-endian).
  bounds=$(python3 -c "import base64,struct,json
k=lambda n: base64.b64encode(b'k'*8+struct.pack('>Q',n)).decode()
print(json.dumps({'key':k(0),'range_end':k($keys*9//10)}))")
  local url="http://127.0.0.1:${CLIENT_PORTS[0]}/v3/kv" left deadline=$((SECONDS + 1800))
  curl -s --max-time 900 -X POST "$url/deleterange" -d "$bounds" > /dev/null || true
  # A gateway may answer a long delete with a timeout and apply it all the
  # same: until the keys are gone, delete what is left in slices.
  while true; do
    left=$(curl -sf --max-time 120 -X POST "$url/range" -d "${bounds%\}},\"count_only\":true}" |
      python3 -c 'import json,sys; print(int(json.load(sys.stdin).get("count", 0)))') || left=unknown
    [ "$left" != 0 ] || break
    [ $SECONDS -lt $deadline ] || { echo "the $system members did not delete the keys ($left left)" >&2; exit 1; }
    echo "[$system] $left keys left after the delete; deleting them in slices" >&2
    python3 -c "import base64,struct,json
k=lambda n: base64.b64encode(b'k'*8+struct.pack('>Q',n)).decode()
end=$keys*9//10
for a in range(0, end, 50000): print(json.dumps({'key':k(a),'range_end':k(min(a+50000,end))}))" |
      while read -r slice; do curl -s --max-time 900 -X POST "$url/deleterange" -d "$slice" > /dev/null || true; done
  done
  rev=$(curl -sf --max-time 120 -X POST "$url/range" -d "${bounds%\}},\"count_only\":true}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')
  "${KVCTL[@]}" --command-timeout 600s compaction --physical "$rev" > /dev/null
  "${KVCTL[@]}" --command-timeout 600s defrag > /dev/null
  for i in 0 1 2; do space+=("$(dir_kb "$WORK/$system-${NAMES[$i]}")"); done
  kill_all
  printf '{"system":"%s","keys":%s,"load":%s,"range":%s,"rss_kb":[%s],"disk_kb":[%s],"restart_ms":%s,"defrag_kb":[%s],"catchup_ms":%s,"catchup_peak_kb":%s}\n' \
    "$system" "$keys" "$load" "$range" "$(IFS=,; echo "${rss[*]}")" "$(IFS=,; echo "${disk[*]}")" "$restart_ms" \
    "$(IFS=,; echo "${space[*]}")" "$CATCHUP_MS" "$CATCHUP_PEAK_KB" >> "$RESULTS"
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
  kill_all
}

# The largest resident memory of a member, in KiB.
rss_max() {
  local pid max=0 kb
  for pid in "${PIDS[@]}"; do
    kb=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    [ "$kb" -le "$max" ] || max=$kb
  done
  echo "$max"
}

# Samples the members' CPU time and largest resident memory every 0.2 s
# into the file $1, in the background; its pid is in SAMPLER.
start_sampler() {
  (while true; do echo "$EPOCHREALTIME $(cpu_ticks) $(rss_max)"; sleep 0.2; done) > "$1" 2> /dev/null &
  SAMPLER=$!
}

stop_sampler() { kill "$SAMPLER"; wait "$SAMPLER" 2> /dev/null || true; }

# samples secs: the members' CPU use (cores) over the last `secs` seconds of
# the samples, and their largest resident memory (KiB) over all of them, as
# JSON fields.
sampled() {
  python3 - "$1" "$(getconf CLK_TCK)" "$2" <<'PY'
import sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 3]
tck, secs = float(sys.argv[2]), float(sys.argv[3])
end_t, end_c, _ = rows[-1]
start = min(rows, key=lambda r: abs(r[0] - (end_t - secs)))
cores = (end_c - start[1]) / tck / max(end_t - start[0], 1e-9)
print(f'"cpu_cores":{cores:.3f},"rss_kb":{max(r[2] for r in rows):.0f}')
PY
}

# system: the lease curve, a fresh cluster per point. The members' CPU is
# sampled every 0.2 s, so that only the keep-alive phase counts (the bench
# reports how long it lasted).
leases() {
  local system=$1 n out samples
  for n in "${LEASES[@]}"; do
    rm -rf "$WORK/$system"-*
    start "$system"
    echo "[$system] $n leases kept alive" >&2
    start_sampler "$WORK/samples-$system-$n"
    if ! out=$("${KVCTL[@]}" -w json bench lease-keepalive --leases "$n" --lease-ttl 15 --duration "${LEASE_SECS}s" --keepalive-streams 64 \
      --conns 3 --clients 64 --quiet 2> "$WORK/bench.err"); then
      # A system that cannot keep them all alive is a result, not the end of the run.
      stop_sampler
      printf '{"system":"%s","leases":%s,"failed":%s}\n' "$system" "$n" \
        "$(tail -n 1 "$WORK/bench.err" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')" >> "$RESULTS"
      kill_all
      continue
    fi
    stop_sampler
    printf '{"system":"%s","leases":%s,"keepalive":%s,%s}\n' "$system" "$n" "$out" \
      "$(sampled "$WORK/samples-$system-$n" "$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keepalive_seconds"])')")" \
      >> "$RESULTS"
    kill_all
  done
}

# system: 10,000 leases expiring at once, on a fresh cluster.
storm() {
  local system=$1 out
  rm -rf "$WORK/$system"-*
  start "$system"
  echo "[$system] 10000 leases expiring at once" >&2
  # The bench keeps the leases alive while it grants them, so the TTL need
  # not cover the grants.
  if out=$("${KVCTL[@]}" -w json bench lease-expiry --leases 10000 --lease-ttl "$STORM_TTL" --rate 200 --conns 3 \
    --clients 64 --quiet 2> "$WORK/bench.err"); then
    printf '{"system":"%s","storm":%s}\n' "$system" "$out" >> "$RESULTS"
  else
    printf '{"system":"%s","storm_failed":%s}\n' "$system" \
      "$(tail -n 1 "$WORK/bench.err" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')" >> "$RESULTS"
  fi
  kill_all
}

# system: the watchers curve, a fresh cluster per point.
watchers() {
  local system=$1 n out
  for n in "${WATCHERS[@]}"; do
    rm -rf "$WORK/$system"-*
    start "$system"
    echo "[$system] $n watchers" >&2
    start_sampler "$WORK/samples-$system-w$n"
    out=$("${KVCTL[@]}" -w json bench watch-latency --watchers "$n" --watch-streams 100 --conns 10 \
      --total 200 --rate 200 --val-size 256 --key-space-size 1000 --quiet)
    stop_sampler
    printf '{"system":"%s","watchers":%s,"watch":%s,%s}\n' "$system" "$n" "$out" \
      "$(sampled "$WORK/samples-$system-w$n" 1)" >> "$RESULTS"
    kill_all
  done
}

# pid field: a process's /proc status figure in KiB (VmRSS, VmHWM), 0 if
# it no longer runs.
status_kb() {
  local kb
  kb=$(awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status" 2> /dev/null) || true
  echo "${kb:-0}"
}

# The members' OOM kills, where their cgroups count them; else null.
oom_kills() {
  local system=$1 i n sum=0
  [ -n "$CGROUP_BASE" ] || { echo null; return; }
  for i in 0 1 2; do
    n=$(awk '$1 == "oom_kill" {print $2}' "$CGROUP_BASE/kvd-scale-$system-$i/memory.oom_control" 2> /dev/null)
    sum=$((sum + ${n:-0}))
  done
  echo "$sum"
}

# system: data larger than memory, on a fresh cluster whose members may
# each use BIG_LIMIT_MB of memory: BIG_MB of values of BIG_VAL bytes in four
# steps of new keys. After each step: each member's resident and peak
# memory (VmRSS, VmHWM; 0 for a member that no longer runs) and data
# directory, a linearizable range p99 over the keys written so far, how
# many members run and how many the kernel killed for memory. After the
# last, the time from a restart of all three to a healthy cluster.
bigdata() {
  local system=$1 per_step step written=0 load range alive restart_ms i pid
  per_step=$(( (BIG_MB << 20) / BIG_VAL / 4 ))
  rm -rf "$WORK/$system"-*
  MEM_LIMIT_MB=$BIG_LIMIT_MB
  if ! start "$system" soft; then
    printf '{"system":"%s","big_failed":"did not start within %s MiB"}\n' "$system" "$BIG_LIMIT_MB" >> "$RESULTS"
    kill_all; remove_cgroups; MEM_LIMIT_MB=""
    return
  fi
  for step in 1 2 3 4; do
    echo "[$system] writing $(( BIG_MB / 4 )) MiB of values ($step of 4), members limited to $BIG_LIMIT_MB MiB" >&2
    load=$(timeout 3600 "${KVCTL[@]}" -w json bench put --conns 8 --clients 64 --total "$per_step" \
      --sequential-keys --first-key "$written" --key-size 16 --key-space-size "$per_step" \
      --val-size "$BIG_VAL" --quiet) || load=null
    written=$((written + per_step))
    alive=0
    for pid in "${PIDS[@]}"; do ! kill -0 "$pid" 2> /dev/null || alive=$((alive + 1)); done
    range=null
    if [ "$alive" -eq 3 ]; then
      range=$(timeout 600 "${KVCTL[@]}" -w json bench range --written-keys --consistency l --conns 8 \
        --clients 64 --total 2000 --key-size 16 --key-space-size "$written" --quiet) || range=null
    fi
    local rss=() hwm=() disk=()
    for i in 0 1 2; do
      rss+=("$(status_kb "${PIDS[$i]}" VmRSS)")
      hwm+=("$(status_kb "${PIDS[$i]}" VmHWM)")
      disk+=("$(dir_kb "$WORK/$system-${NAMES[$i]}")")
    done
    restart_ms=null
    if [ "$step" -eq 4 ] && [ "$alive" -eq 3 ]; then
      echo "[$system] restarting all three members within $BIG_LIMIT_MB MiB" >&2
      stop_all 20
      local t0=$EPOCHREALTIME
      if start "$system" soft; then
        restart_ms=$(python3 -c "print(round(($EPOCHREALTIME - $t0) * 1000))")
      fi
    fi
    printf '{"system":"%s","big_mib":%s,"limit_mib":%s,"val_size":%s,"load":%s,"range":%s,"rss_kb":[%s],"hwm_kb":[%s],"disk_kb":[%s],"alive":%s,"oom_kills":%s,"restart_ms":%s}\n' \
      "$system" "$(( BIG_MB * step / 4 ))" "$BIG_LIMIT_MB" "$BIG_VAL" "$load" "$range" "$(IFS=,; echo "${rss[*]}")" \
      "$(IFS=,; echo "${hwm[*]}")" "$(IFS=,; echo "${disk[*]}")" "$alive" "$(oom_kills "$system")" "$restart_ms" >> "$RESULTS"
    [ "$alive" -eq 3 ] || break
  done
  kill_all
  remove_cgroups
  MEM_LIMIT_MB=""
}

echo "etcd: $(etcd --version | sed -n 1p); sizes: ${SIZES[*]}" >&2
CURVES=" ${SCALE_CURVES:-keys writers leases storm watchers bigdata} "
if [[ $CURVES == *" keys "* ]]; then
  for keys in "${SIZES[@]}"; do
    measure etcd "$keys"
    measure kvd "$keys"
  done
fi
WRITES=20000
[ "${1:-}" = "--quick" ] && WRITES=5000
if [[ $CURVES == *" bigdata "* ]] && [ -z "$CGROUP_BASE" ] && ! [ "$(cat /proc/1/comm)" = systemd ]; then
  echo "no memory cgroup can be made here (cgroup v1 memory, or systemd-run): skipping the data larger than memory" >&2
  CURVES=${CURVES/ bigdata / }
fi
for curve in writers leases storm watchers bigdata; do
  if [[ $CURVES == *" $curve "* ]]; then
    "$curve" etcd
    "$curve" kvd
  fi
done
python3 - "$RESULTS" <<'PY'
import json, sys
everything = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = everything
writers = {(r["system"], r["writers"]): r["put"] for r in rows if "writers" in r and "put" in r}
leases = {(r["system"], r["leases"]): r for r in rows if "keepalive" in r}
lease_failed = {(r["system"], r["leases"]): r["failed"] for r in rows if "leases" in r and "failed" in r}
storms = {r["system"]: r["storm"] for r in rows if "storm" in r}
watches = {(r["system"], r["watchers"]): r for r in rows if "watch" in r}
rows = [r for r in rows if "keys" in r and "load" in r]
by = {(r["system"], r["keys"]): r for r in rows}
sizes = sorted({r["keys"] for r in rows})
mb = lambda kb: kb / 1024
cols = [
    ("load puts/s", lambda r: r["load"]["throughput"], "{:,.0f}", True),
    ("range p99 ms", lambda r: r["range"]["latency_ms"]["p99"], "{:.2f}", False),
    ("RSS max MB", lambda r: mb(max(r["rss_kb"])), "{:.0f}", False),
    ("data dir max MB", lambda r: mb(max(r["disk_kb"])), "{:.0f}", False),
    ("restart ms", lambda r: r["restart_ms"], "{:,.0f}", False),
    ("a member that lost its data: ms until it serves the last key", lambda r: r["catchup_ms"], "{:,.0f}", False),
    ("a member that lost its data: peak RSS MB while catching up", lambda r: mb(r["catchup_peak_kb"]), "{:.0f}", False),
    ("data dir max MB after deleting 90%, compaction, defrag", lambda r: mb(max(r["defrag_kb"])), "{:.0f}", False),
]
if rows:
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
if writers:
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
ratio = lambda k, e: f"{k / e:.2f}" if e else "-"
if leases or lease_failed:
    print()
    print("| leases | etcd keep-alives/s | kvd keep-alives/s | etcd p99 ms | kvd p99 ms | kvd/etcd p99 | "
          "etcd CPU cores | kvd CPU cores | etcd RSS max MB | kvd RSS max MB | kvd/etcd RSS | errors etcd/kvd |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in sorted({n for (_, n) in leases} | {n for (_, n) in lease_failed}):
        e, k = leases.get(("etcd", n)), leases.get(("kvd", n))
        ek, kk = (e or {}).get("keepalive"), (k or {}).get("keepalive")
        ep, kp = ek and ek["latency_ms"]["p99"], kk and kk["latency_ms"]["p99"]
        er, kr = e and mb(e["rss_kb"]), k and mb(k["rss_kb"])
        f = lambda v, fmt: "failed" if v is None else fmt.format(v)
        print(f"| {n:,} | {f(ek and ek['answered_per_s'], '{:,.0f}')} | {f(kk and kk['answered_per_s'], '{:,.0f}')} | "
              f"{f(ep, '{:.2f}')} | {f(kp, '{:.2f}')} | {ratio(kp, ep) if e and k else ''} | "
              f"{f(e and e['cpu_cores'], '{:.2f}')} | {f(k and k['cpu_cores'], '{:.2f}')} | {f(er, '{:.0f}')} | "
              f"{f(kr, '{:.0f}')} | {ratio(kr, er) if e and k else ''} | "
              f"{ek['errors'] if ek else '-'}/{kk['errors'] if kk else '-'} |")
    for (s, n), why in sorted(lease_failed.items()):
        print(f"\n{n:,} leases, {s}: {why}")
for s, why in {r["system"]: r["storm_failed"] for r in everything if "storm_failed" in r}.items():
    print()
    print(f"10,000 leases expiring at once, {s}: {why}")
if "etcd" in storms and "kvd" in storms:
    e, k = storms["etcd"], storms["kvd"]
    print()
    print("| 10,000 leases expiring at once | etcd 3.4 | kvd | kvd/etcd |")
    print("| --- | ---: | ---: | ---: |")
    eg, kg = e["keys_gone_after_ttl_ms"], k["keys_gone_after_ttl_ms"]
    print(f"| ms from the TTL's end until every key is gone | {eg:,.0f} | {kg:,.0f} | {ratio(kg, eg)} |")
    ep, kp = e["latency_ms"]["p99"], k["latency_ms"]["p99"]
    print(f"| put p99 ms meanwhile (200/s) | {ep:.2f} | {kp:.2f} | {ratio(kp, ep)} |")
    print(f"| put errors | {e['errors']} | {k['errors']} | |")
big = {(r["system"], r["big_mib"]): r for r in everything if "big_mib" in r}
big_failed = {r["system"]: r["big_failed"] for r in everything if "big_failed" in r}
if big or big_failed:
    print()
    limit = next((r["limit_mib"] for r in big.values()), None)
    val = next((r["val_size"] for r in big.values()), None)
    print(f"Data larger than memory: each member limited to {limit} MiB, values of {val} bytes written in four steps.")
    for s, why in big_failed.items():
        print(f"{s}: {why}")
    print()
    print("| MiB of values | figure | etcd 3.4 | kvd | kvd/etcd |")
    print("| ---: | --- | ---: | ---: | ---: |")
    opt = lambda f: (lambda r: None if r is None else f(r))
    bcols = [
        ("MiB/s written", lambda r: r["load"]["throughput"] * r["val_size"] / 2**20 if r["load"] else None, "{:.1f}"),
        ("put errors", lambda r: r["load"]["errors"] if r["load"] else None, "{:,.0f}"),
        ("linearizable range p99 ms (random written keys)", lambda r: r["range"]["latency_ms"]["p99"] if r["range"] else None, "{:.2f}"),
        ("RSS max MB", lambda r: mb(max(r["rss_kb"])), "{:.0f}"),
        ("peak RSS max MB (VmHWM)", lambda r: mb(max(r["hwm_kb"])), "{:.0f}"),
        ("data dir max MB", lambda r: mb(max(r["disk_kb"])), "{:.0f}"),
        ("members running", lambda r: r["alive"], "{}"),
        ("members killed for memory", lambda r: r["oom_kills"], "{}"),
        ("restart of all three to healthy, ms", lambda r: r["restart_ms"], "{:,.0f}"),
    ]
    for n in sorted({n for (_, n) in big}):
        e, k = big.get(("etcd", n)), big.get(("kvd", n))
        for name, get, fmt in bcols:
            ev, kv = opt(get)(e), opt(get)(k)
            if ev is None and kv is None:
                continue
            show = lambda v: "-" if v is None else fmt.format(v)
            ratio_s = f"{kv / ev:.2f}" if isinstance(ev, (int, float)) and isinstance(kv, (int, float)) and ev and fmt != "{}" and "errors" not in name else ""
            print(f"| {n:,} | {name} | {show(ev)} | {show(kv)} | {ratio_s} |")
if watches:
    print()
    print("| watchers | etcd p50 ms | kvd p50 ms | etcd p99 ms | kvd p99 ms | kvd/etcd p99 | etcd RSS max MB | "
          "kvd RSS max MB | kvd/etcd RSS | events etcd/kvd | errors etcd/kvd |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in sorted({n for (_, n) in watches}):
        e, k = watches.get(("etcd", n)), watches.get(("kvd", n))
        if not (e and k):
            continue
        ew, kw = e["watch"], k["watch"]
        ep, kp = ew["latency_ms"]["p99"], kw["latency_ms"]["p99"]
        er, kr = mb(e["rss_kb"]), mb(k["rss_kb"])
        print(f"| {n:,} | {ew['latency_ms']['p50']:.2f} | {kw['latency_ms']['p50']:.2f} | {ep:.2f} | {kp:.2f} | "
              f"{ratio(kp, ep)} | {er:.0f} | {kr:.0f} | {ratio(kr, er)} | {ew['requests']:,}/{kw['requests']:,} | "
              f"{ew['errors']}/{kw['errors']} |")
PY
"$PLOTTER" "$RESULTS" "${SCALE_PLOTS:-$ROOT/target/scale-plots}"
