#!/usr/bin/env bash
# Shows which members run, and their Raft status.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

for i in 0 1 2; do
  n=${NAMES[$i]}
  if alive "$CLUSTER_DIR/$n.pid"; then state="running (pid $(cat "$CLUSTER_DIR/$n.pid"))"; else state="stopped"; fi
  echo "$n: client 127.0.0.1:${CLIENT_PORTS[$i]}, peer 127.0.0.1:${PEER_PORTS[$i]}: $state"
done
# shellcheck disable=SC2046
"$BIN_DIR/kvctl" --endpoints "$(endpoints)" $(client_tls_flags) endpoint status -w table
