#!/usr/bin/env bash
# Starts a three-member kvd cluster on 127.0.0.1 and waits for a leader.
# Settings: see common.sh (KVD_CLUSTER_DIR, KVD_CLIENT_PORTS, KVD_PEER_PORTS, ...).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

for n in "${NAMES[@]}"; do
  if alive "$CLUSTER_DIR/$n.pid"; then
    echo "kvd cluster already running in $CLUSTER_DIR (member $n, pid $(cat "$CLUSTER_DIR/$n.pid")); stop it with cluster-scripts/stop.sh" >&2
    exit 1
  fi
done

build_bins
for b in kvd kvctl; do
  [ -x "$BIN_DIR/$b" ] || { echo "missing $BIN_DIR/$b" >&2; exit 1; }
done

mkdir -p "$CLUSTER_DIR"
cluster=""
for i in 0 1 2; do
  cluster+="${cluster:+,}${NAMES[$i]}=http://127.0.0.1:${PEER_PORTS[$i]}"
done
for i in 0 1 2; do
  n=${NAMES[$i]}
  # shellcheck disable=SC2086
  nohup "$BIN_DIR/kvd" --name "$n" --data-dir "$CLUSTER_DIR/$n.data" \
    --listen-client-urls "http://127.0.0.1:${CLIENT_PORTS[$i]}" \
    --advertise-client-urls "http://127.0.0.1:${CLIENT_PORTS[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${PEER_PORTS[$i]}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${PEER_PORTS[$i]}" \
    --initial-cluster "$cluster" --worker-threads "$WORKER_THREADS" ${KVD_EXTRA_FLAGS:-} \
    >> "$CLUSTER_DIR/$n.log" 2>&1 < /dev/null &
  echo $! > "$CLUSTER_DIR/$n.pid"
done

eps=$(endpoints)
deadline=$((SECONDS + 60))
until "$BIN_DIR/kvctl" --endpoints "$eps" --command-timeout 3s endpoint health > /dev/null 2>&1; do
  for n in "${NAMES[@]}"; do
    if ! alive "$CLUSTER_DIR/$n.pid"; then
      echo "member $n exited; its log ($CLUSTER_DIR/$n.log) ends with:" >&2
      tail -n 5 "$CLUSTER_DIR/$n.log" >&2
      "$(dirname "${BASH_SOURCE[0]}")/stop.sh" > /dev/null 2>&1 || true
      exit 1
    fi
  done
  if [ $SECONDS -ge $deadline ]; then
    echo "no leader elected within 60s; logs are in $CLUSTER_DIR" >&2
    exit 1
  fi
  sleep 0.2
done

echo "kvd cluster is up (data and logs in $CLUSTER_DIR)."
echo "  endpoints: $eps"
echo "  try:       $BIN_DIR/kvctl --endpoints $eps put greeting hello"
echo "             ETCDCTL_API=3 etcdctl --endpoints $eps get greeting"
echo "  status:    cluster-scripts/status.sh    stop: cluster-scripts/stop.sh"
