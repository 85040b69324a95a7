#!/usr/bin/env bash
# What snapshots cost in memory: three members with --snapshot-count 20000;
# member n3 is down while 100,000 keys of 1 KiB are written, then starts and
# installs the leader's snapshot. Prints each member's peak and current
# resident memory (VmHWM, VmRSS), VmRSS again 5 s later, and the snapshot's
# size.
#
# Settings (environment):
#   KVD_BIN_DIR  where kvd and kvctl are (default: target/release, built here)
#   PORT         first client port (default 43379); the members use PORT,
#                PORT+10 and PORT+20 for clients and one more for peers
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PORT="${PORT:-43379}"
build_bins
NAMES=(n1 n2 n3)
CP=("$PORT" "$((PORT + 10))" "$((PORT + 20))")
EPS="127.0.0.1:${CP[0]},127.0.0.1:${CP[1]}"
CLUSTER=""
for i in 0 1 2; do CLUSTER+="${CLUSTER:+,}${NAMES[$i]}=http://127.0.0.1:$((CP[i] + 1))"; done
WORK="$(mktemp -d /tmp/kvd-snapmem.XXXXXX)"
PIDS=()
start() {
  local i=$1 peer="http://127.0.0.1:$((CP[$1] + 1))"
  "$BIN_DIR/kvd" --name "${NAMES[$i]}" --data-dir "$WORK/${NAMES[$i]}" \
    --listen-client-urls "http://127.0.0.1:${CP[$i]}" --advertise-client-urls "http://127.0.0.1:${CP[$i]}" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" --snapshot-count 20000 \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token snapmem \
    >> "$WORK/${NAMES[$i]}.log" 2>&1 < /dev/null &
  PIDS[$i]=$!
}
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for i in 0 1 2; do start "$i"; done
K=("$BIN_DIR/kvctl" --endpoints "$EPS")
until "${K[@]}" --command-timeout 3s endpoint health > /dev/null 2>&1; do sleep 0.2; done
kill "${PIDS[2]}"; wait "${PIDS[2]}" 2>/dev/null || true
"${K[@]}" bench put --conns 2 --clients 16 --total 100000 --sequential-keys --key-space-size 100000 \
  --val-size 1024 --quiet 2>&1 | sed -n 1p
start 2
for _ in $(seq 240); do
  grep -q "installed snapshot" "$WORK/n3.log" && break
  sleep 0.5
done
grep -q "installed snapshot" "$WORK/n3.log" || { echo "n3 installed no snapshot within 2 minutes" >&2; exit 1; }
sleep 1
for i in 0 1 2; do
  echo "${NAMES[$i]}: $(grep -E 'VmHWM|VmRSS' "/proc/${PIDS[$i]}/status" | tr -s ' \t' ' ' | tr '\n' ' ')"
done
# Again once the members have been idle a few seconds (each gives freed heap
# back after a burst of writes, or an install, once it is quiet).
sleep 5
for i in 0 1 2; do
  echo "${NAMES[$i]} 5 s later: $(grep -E 'VmRSS' "/proc/${PIDS[$i]}/status" | tr -s ' \t' ' ')"
done
echo "snapshot file: $(stat -c %s "$WORK/n1/snapshot.bin") bytes (large values are named by their place in the value file, and sent whole)"
