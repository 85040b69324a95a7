#!/usr/bin/env bash
# Starts a three-member kvd cluster on 127.0.0.1 and waits until every member
# is healthy and has published its name. Run again after a member stopped, it
# starts that member alone.
# Settings: see common.sh (KVD_CLUSTER_DIR, KVD_CLIENT_PORTS, KVD_PEER_PORTS, ...).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Starts the members that are not running: all three the first time, or
# one that stopped (it rejoins with its data directory and catches up).
build_bins
for b in kvd kvctl; do
  [ -x "$BIN_DIR/$b" ] || { echo "missing $BIN_DIR/$b" >&2; exit 1; }
done

mkdir -p "$CLUSTER_DIR"
[ "$TLS" = 1 ] && make_tls
cluster=""
for i in 0 1 2; do
  cluster+="${cluster:+,}${NAMES[$i]}=$SCHEME://127.0.0.1:${PEER_PORTS[$i]}"
done
started=()
for n in $(all_members); do
  if alive "$CLUSTER_DIR/$n.pid"; then
    echo "member $n is running already (pid $(cat "$CLUSTER_DIR/$n.pid"))"
    continue
  fi
  case " ${NAMES[*]} " in
    *" $n "*) start_member "$n" "$cluster" new ;;
    # A member added later restarts on its data; it knows its cluster.
    *) start_member "$n" "$n=$SCHEME://127.0.0.1:$(member_ports "$n" | cut -d' ' -f2)" existing ;;
  esac
  started+=("$n")
done

eps=$(endpoints)
deadline=$((SECONDS + 60))
# shellcheck disable=SC2046
until "$BIN_DIR/kvctl" --endpoints "$eps" $(client_tls_flags) --command-timeout 3s endpoint health > /dev/null 2>&1; do
  for n in "${started[@]}"; do
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

for n in "${started[@]}"; do wait_published "$n" "$deadline"; done

[ ${#started[@]} -gt 0 ] && echo "started ${started[*]}"
echo "kvd cluster is up (data and logs in $CLUSTER_DIR)."
echo "  endpoints: $eps"
[ "$TLS" = 1 ] && echo "  TLS:       clients and members; certificates in $TLS_DIR"
echo "  kvctl:     export PATH=\"$BIN_DIR:\$PATH\""
tls=$(client_tls_flags)
echo "  try:       kvctl --endpoints $eps ${tls:+$tls }put greeting hello"
echo "             ETCDCTL_API=3 etcdctl --endpoints $eps ${tls:+$tls }get greeting"
echo "  status:    cluster-scripts/status.sh    stop: cluster-scripts/stop.sh"
