#!/usr/bin/env bash
# Adds a member to the cluster start.sh runs, as etcd's runbooks do: `member
# add --learner`, start it with the settings that printed and
# --initial-cluster-state existing, wait until it has caught up, promote it.
#
#   cluster-scripts/add-member.sh n4     # client 127.0.0.1:42379, peer 42380
#   cluster-scripts/add-member.sh n5     # client 52379, peer 52380
#
# The new member's data, log and pid go beside the others'; stop.sh,
# status.sh and start.sh include it from then on.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name=${1:?usage: add-member.sh NAME (n4, n5, ...)}
case " ${NAMES[*]} " in *" $name "*) echo "add-member.sh: $name is one of the first three; use replace-member.sh" >&2; exit 1 ;; esac
read -r client peer <<< "$(member_ports "$name")"
if alive "$CLUSTER_DIR/$name.pid"; then
  echo "add-member.sh: $name runs already (pid $(cat "$CLUSTER_DIR/$name.pid"))" >&2
  exit 1
fi
[ ! -e "$CLUSTER_DIR/$name.data" ] || { echo "add-member.sh: $CLUSTER_DIR/$name.data exists; remove it first" >&2; exit 1; }
add_and_start "$name" "$client" "$peer"
