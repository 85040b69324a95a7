#!/usr/bin/env bash
# Replaces a member whose disk died (or that must start afresh): stops it if
# it runs, removes it from the cluster, wipes its data directory, adds a new
# member under the same name and URLs (it gets a new member id), starts it
# with --initial-cluster-state existing, and promotes it once it caught up.
#
#   cluster-scripts/replace-member.sh n2
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name=${1:?usage: replace-member.sh NAME}
read -r client peer <<< "$(member_ports "$name")"
pidfile="$CLUSTER_DIR/$name.pid"
if alive "$pidfile"; then
  echo "stopping $name (pid $(cat "$pidfile"))"
  kill -KILL "$(cat "$pidfile")"
  while alive "$pidfile"; do sleep 0.1; done
fi
rm -f "$pidfile"
# Its id, by its peer URL (the name is empty in the list until a member
# publishes it, and a dead one may never have).
id=$(kvctl_all member list | awk -F', ' -v url="$SCHEME://127.0.0.1:$peer" '$4 == url { print $1 }')
if [ -n "$id" ]; then
  echo "removing member $id ($name)"
  kvctl_all member remove "$id"
fi
rm -rf "$CLUSTER_DIR/$name.data"
add_and_start "$name" "$client" "$peer"
