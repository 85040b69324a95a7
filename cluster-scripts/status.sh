#!/usr/bin/env bash
# Shows which members run, and their Raft status.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

for n in $(all_members); do
  read -r client peer <<< "$(member_ports "$n")"
  if alive "$CLUSTER_DIR/$n.pid"; then state="running (pid $(cat "$CLUSTER_DIR/$n.pid"))"; else state="stopped"; fi
  echo "$n: client 127.0.0.1:$client, peer 127.0.0.1:$peer: $state"
done
kvctl_all endpoint status -w table
