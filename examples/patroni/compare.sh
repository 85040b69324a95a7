#!/usr/bin/env bash
# Patroni's failover with kvd and with etcd 3.4 as its DCS, side by side, in
# one run on this machine: three kvd members (this build) and three etcd
# members, on ports the system picks. For each DCS and each case, a fresh
# pair of PostgreSQL nodes under Patroni (run.sh) elects a primary; then
#   primary  the primary's Patroni and PostgreSQL are killed (SIGKILL);
#   member   a DCS follower, the first of Patroni's hosts, is killed, then
#            the primary;
#   leader   the DCS leader, the first of Patroni's hosts, and the primary
#            are killed together;
# and failover.sh measures the time from the primary's kill until the
# replica is promoted. The killed DCS member is started again after each
# case. Prints one `failover <dcs> <case> <ms>` line per case and a table.
#
# Needs root (PostgreSQL runs as the postgres user). Installs Debian's
# patroni, python3-etcd, postgresql and etcd-server if missing.
#
# Settings (environment):
#   KVD_BIN_DIR     where kvd and kvctl are (default: target/release, built)
#   COMPARE_DIR     data and logs (default: a new directory under /tmp,
#                   removed at the end unless the run fails or KEEP=1)
#   COMPARE_DCS     the systems to run (default: "kvd etcd")
#   COMPARE_CASES   the cases to run (default: "primary member leader")
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
read -r -a SYSTEMS <<< "${COMPARE_DCS:-kvd etcd}"
read -r -a CASES <<< "${COMPARE_CASES:-primary member leader}"

if [ "$(id -u)" != 0 ]; then
  echo "compare.sh needs root: PostgreSQL runs as the postgres user" >&2
  exit 1
fi
missing=()
command -v patroni > /dev/null || missing+=(patroni)
/usr/bin/python3 -c 'import etcd' 2> /dev/null || missing+=(python3-etcd)
ls /usr/lib/postgresql/*/bin/postgres > /dev/null 2>&1 || missing+=(postgresql)
command -v etcd > /dev/null || missing+=(etcd-server)
command -v etcdctl > /dev/null || missing+=(etcd-client)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}..." >&2
  # Keep the packages from starting system services on their default ports.
  policy=/usr/sbin/policy-rc.d
  added_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    added_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
  [ "$added_policy" = 0 ] || rm -f "$policy"
fi

if [ -z "${KVD_BIN_DIR:-}" ]; then
  (cd "$ROOT" && cargo build --release --bins)
  export KVD_BIN_DIR="$ROOT/target/release"
fi
DIR="${COMPARE_DIR:-$(mktemp -d /tmp/kvd-patroni.XXXXXX)}"
mkdir -p "$DIR"
# PostgreSQL, as the postgres user, must reach its directories below.
chmod 755 "$DIR"

# Ports that are free now: bound to port 0 together, then let go.
free_ports() {
  /usr/bin/python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Each system's ports are picked when it first starts, not all at once here:
# a port picked free and let go can be taken (by a PostgreSQL of an earlier
# case, or a connection's local port) before a member binds it, minutes
# later.
KVD_PORTS=()
ETCD_PORTS=()
ETCDCTL_API=3
export ETCDCTL_API

kvd_env() {
  env KVD_CLUSTER_DIR="$DIR/kvd" KVD_CLIENT_PORTS="${KVD_PORTS[*]:0:3}" KVD_PEER_PORTS="${KVD_PORTS[*]:3:3}" "$@"
}

etcd_start() {
  local i=$1 cluster="" j
  for j in 0 1 2; do cluster+="${cluster:+,}e$j=http://127.0.0.1:${ETCD_PORTS[$((j + 3))]}"; done
  mkdir -p "$DIR/etcd"
  nohup etcd --name "e$i" --data-dir "$DIR/etcd/e$i.data" \
    --listen-client-urls "http://127.0.0.1:${ETCD_PORTS[$i]}" \
    --advertise-client-urls "http://127.0.0.1:${ETCD_PORTS[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PORTS[$((i + 3))]}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PORTS[$((i + 3))]}" \
    --initial-cluster "$cluster" --initial-cluster-state new \
    >> "$DIR/etcd/e$i.log" 2>&1 < /dev/null &
  echo $! > "$DIR/etcd/e$i.pid"
  # Killed on purpose later; the shell need not report it.
  disown
}

# The client endpoints of `dcs`' members, in member order.
endpoints_of() {
  local ports i out=()
  if [ "$1" = kvd ]; then ports=("${KVD_PORTS[@]}"); else ports=("${ETCD_PORTS[@]}"); fi
  for i in 0 1 2; do out+=("127.0.0.1:${ports[$i]}"); done
  echo "${out[*]}"
}

pid_file_of() {
  if [ "$1" = kvd ]; then echo "$DIR/kvd/n$(($2 + 1)).pid"; else echo "$DIR/etcd/e$2.pid"; fi
}

# Waits until all three members of `dcs` answer and agree on a leader, and
# prints the leader's index.
wait_leader() {
  local dcs=$1 eps deadline=$((SECONDS + 60)) leader
  read -r -a eps <<< "$(endpoints_of "$dcs")"
  while true; do
    leader=$(etcdctl --endpoints "$(IFS=,; echo "${eps[*]}")" --command-timeout 2s endpoint status -w json 2> /dev/null \
      | /usr/bin/python3 -c '
import json, sys
rows = json.load(sys.stdin)
leaders = {r["Status"]["leader"] for r in rows}
if len(rows) == 3 and len(leaders) == 1 and 0 not in leaders:
    for i, r in enumerate(rows):
        if r["Status"]["header"]["member_id"] == r["Status"]["leader"]:
            print(i)
' 2> /dev/null || true)
    if [ -n "$leader" ]; then
      echo "$leader"
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$dcs: no leader agreed by three members within 60 s; logs in $DIR" >&2
      return 1
    fi
    sleep 0.2
  done
}

# Stops every etcd member this script started and waits until each is gone
# (one still there after 10 s is killed).
etcd_stop() {
  local f tenths
  for f in "$DIR"/etcd/e*.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2> /dev/null || true
  done
  for f in "$DIR"/etcd/e*.pid; do
    [ -f "$f" ] || continue
    tenths=0
    while kill -0 "$(cat "$f")" 2> /dev/null; do
      tenths=$((tenths + 1))
      [ "$tenths" -lt 100 ] || { kill -9 "$(cat "$f")" 2> /dev/null || true; break; }
      sleep 0.1
    done
  done
}

# Starts etcd's three members the first time, on ports picked now; should a
# port be taken before its member binds it (the member exits at once), all
# three start again on others, up to three times.
etcd_first_start() {
  local try i f deadline ready
  for try in 1 2 3; do
    read -r -a ETCD_PORTS <<< "$(free_ports 6)"
    for i in 0 1 2; do etcd_start "$i"; done
    deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
      ready=0
      for i in 0 1 2; do
        if ! kill -0 "$(cat "$DIR/etcd/e$i.pid")" 2> /dev/null; then
          ready=-1
          break
        fi
        grep -q "ready to serve client requests" "$DIR/etcd/e$i.log" && ready=$((ready + 1))
      done
      [ "$ready" = 3 ] && return 0
      [ "$ready" = -1 ] && break
      sleep 0.2
    done
    if ! grep -q "address already in use" "$DIR"/etcd/e*.log; then
      echo "etcd: its members did not start; logs in $DIR/etcd" >&2
      return 1
    fi
    echo "etcd: a port was taken before its member bound it (try $try); starting again on others" >&2
    etcd_stop
    mkdir -p "$DIR/etcd-taken-$try"
    mv "$DIR"/etcd/* "$DIR/etcd-taken-$try/"
  done
  echo "etcd: ports were taken on three tries; logs in $DIR" >&2
  return 1
}

start_dcs() {
  if [ "$1" = kvd ]; then
    [ "${#KVD_PORTS[@]}" -gt 0 ] || read -r -a KVD_PORTS <<< "$(free_ports 6)"
    kvd_env "$ROOT/cluster-scripts/start.sh" > /dev/null
  else
    local i
    if [ "${#ETCD_PORTS[@]}" -eq 0 ]; then
      etcd_first_start
      return
    fi
    for i in 0 1 2; do
      if [ -f "$DIR/etcd/e$i.pid" ] && kill -0 "$(cat "$DIR/etcd/e$i.pid")" 2> /dev/null; then continue; fi
      etcd_start "$i"
    done
  fi
}

stop_all() {
  local d
  for d in "$DIR"/patroni-*; do
    [ -d "$d" ] && PATRONI_DIR="$d" "$HERE/run.sh" stop > /dev/null 2>&1 || true
  done
  [ -d "$DIR/kvd" ] && kvd_env "$ROOT/cluster-scripts/stop.sh" > /dev/null 2>&1 || true
  etcd_stop
}
failed=1
finish() {
  stop_all
  if [ "$failed" = 0 ] && [ "${KEEP:-0}" != 1 ] && [ -z "${COMPARE_DIR:-}" ]; then
    rm -rf "$DIR"
  elif [ "$failed" = 1 ]; then
    echo "data and logs kept in $DIR" >&2
  fi
}
trap finish EXIT

results=()
for dcs in "${SYSTEMS[@]}"; do
  start_dcs "$dcs"
  for case in "${CASES[@]}"; do
    leader=$(wait_leader "$dcs")
    read -r -a eps <<< "$(endpoints_of "$dcs")"
    # The member to kill goes first in Patroni's hosts, the one its DCS
    # client starts with.
    case "$case" in
      leader) victim=$leader ;;
      *) victim=$(( (leader + 1) % 3 )) ;;
    esac
    hosts="${eps[$victim]}"
    for i in 0 1 2; do [ "$i" = "$victim" ] || hosts+=",${eps[$i]}"; done
    read -r -a pg <<< "$(free_ports 4)"
    export PATRONI_DIR="$DIR/patroni-$dcs-$case"
    PATRONI_SCOPE="$dcs-$case" DCS_ENDPOINTS="$hosts" PG_PORTS="${pg[0]} ${pg[1]}" API_PORTS="${pg[2]} ${pg[3]}" \
      "$HERE/run.sh" >&2
    if [ "$case" != primary ]; then
      kill -9 "$(cat "$(pid_file_of "$dcs" "$victim")")"
    fi
    out=$(API_PORTS="${pg[2]} ${pg[3]}" "$HERE/failover.sh")
    echo "$dcs, $case: $out" >&2
    ms=$(echo "$out" | sed -n 's/.* promoted after \([0-9]*\) ms$/\1/p')
    echo "failover $dcs $case $ms"
    results+=("$dcs $case $ms")
    "$HERE/run.sh" stop > /dev/null
    unset PATRONI_DIR
    # The killed member comes back before the next case.
    start_dcs "$dcs"
  done
done
failed=0

echo
echo "Patroni failover (ttl 10 s, loop_wait 2 s): ms from the primary's kill to the replica's promotion"
printf '%-8s' case
for dcs in "${SYSTEMS[@]}"; do printf '%10s' "$dcs"; done
echo
for case in "${CASES[@]}"; do
  printf '%-8s' "$case"
  for dcs in "${SYSTEMS[@]}"; do
    for r in "${results[@]}"; do
      read -r d c ms <<< "$r"
      [ "$d" = "$dcs" ] && [ "$c" = "$case" ] && printf '%10s' "$ms"
    done
  done
  echo
done
