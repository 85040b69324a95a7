#!/usr/bin/env bash
# How a compaction weighs on writes: one member, 200,000 puts over 100,000
# keys (256-byte values), then puts from 4 clients for 6 s with a compaction
# at the current revision 2 s in. Prints how long `kvctl compaction` took to
# answer, and the longest put and p99.9 of the concurrent load. With
# PHYSICAL=1 the compaction waits for its history to be removed.
#
# Settings (environment):
#   KVD_BIN_DIR  where kvd and kvctl are (default: target/release, built here)
#   PORT         client port (default 42379; the peer port is PORT+1)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PORT="${PORT:-42379}"
E="127.0.0.1:$PORT"
PEER="http://127.0.0.1:$((PORT + 1))"
build_bins
K=("$BIN_DIR/kvctl" --endpoints "$E")
WORK="$(mktemp -d /tmp/kvd-compaction.XXXXXX)"
"$BIN_DIR/kvd" --name c1 --data-dir "$WORK/d" --listen-client-urls "http://$E" --advertise-client-urls "http://$E" \
  --listen-peer-urls "$PEER" --initial-advertise-peer-urls "$PEER" --initial-cluster "c1=$PEER" \
  > "$WORK/log" 2>&1 < /dev/null &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
until "${K[@]}" endpoint health > /dev/null 2>&1; do sleep 0.2; done
"${K[@]}" bench put --conns 4 --clients 32 --total 200000 --key-space-size 100000 --val-size 256 --quiet > /dev/null
REV=$("${K[@]}" -w json get x | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')
"${K[@]}" bench put --conns 1 --clients 4 --duration 6s --key-space-size 100000 --quiet > "$WORK/bench.out" 2>&1 &
BENCH=$!
sleep 2
FLAGS=()
[ -n "${PHYSICAL:-}" ] && FLAGS=(--physical)
START=$(date +%s%N)
"${K[@]}" compaction "${FLAGS[@]}" "$REV" > /dev/null
END=$(date +%s%N)
wait "$BENCH"
echo "compaction at $REV answered after $(( (END - START) / 1000000 )) ms;" \
  "concurrent puts: $(grep -o 'p99.9 [0-9.]*' "$WORK/bench.out") ms, $(grep -o 'max [0-9.]*' "$WORK/bench.out") ms"
