#!/usr/bin/env bash
# Stops the cluster started by start.sh (SIGTERM, then SIGKILL after 10s).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stopped=0
for n in $(all_members); do
  pidfile="$CLUSTER_DIR/$n.pid"
  if alive "$pidfile"; then
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    stopped=$((stopped + 1))
  fi
  rm -f "$pidfile"
done
echo "stopped $stopped member(s); data kept in $CLUSTER_DIR"
