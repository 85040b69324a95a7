#!/usr/bin/env bash
# Two PostgreSQL nodes managed by Patroni, with kvd's three members as the
# DCS (Patroni's `etcd3`, which speaks etcd's JSON gateway), all on this
# machine. Starts them, waits until one node is the primary and the other
# a replica streaming from it, and prints how to look at them. Stop it
# with `examples/patroni/run.sh stop`.
#
# Needs root (PostgreSQL runs as the `postgres` user), and installs
# Debian's `patroni`, `python3-etcd` and `postgresql` if missing. kvd must be
# running: `cluster-scripts/start.sh`.
#
# A new data directory joins the cluster that the DCS holds under its scope:
# after wiping the data, remove the scope's keys too (`kvctl del /service/kvd-demo/
# --prefix`) or pick another scope.
#
# Settings (environment):
#   PATRONI_DIR     data and logs (default: ./patroni-demo)
#   DCS_ENDPOINTS   the DCS's client endpoints (default: kvd's from start.sh)
#   DCS_KIND        etcd3 (default)
#   PG_PORTS        the two nodes' PostgreSQL ports (default: 5433 5434)
#   API_PORTS       the two nodes' Patroni REST ports (default: 8008 8009)
#   PATRONI_SCOPE   the cluster's name in the DCS (default: kvd-demo)
set -euo pipefail
DIR="$(realpath -m "${PATRONI_DIR:-./patroni-demo}")"
ENDPOINTS="${DCS_ENDPOINTS:-127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379}"
read -r -a PG_PORTS <<< "${PG_PORTS:-5433 5434}"
read -r -a API_PORTS <<< "${API_PORTS:-8008 8009}"
SCOPE="${PATRONI_SCOPE:-kvd-demo}"

stop() {
  for n in 1 2; do
    local pidfile="$DIR/pg$n.pid"
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  # PostgreSQL servers that Patroni left running.
  for n in 1 2; do
    if [ -f "$DIR/pg$n/postmaster.pid" ]; then
      runuser -u postgres -- /usr/lib/postgresql/*/bin/pg_ctl -D "$DIR/pg$n" -m immediate stop > /dev/null 2>&1 || true
    fi
  done
}

if [ "${1:-}" = stop ]; then
  stop
  echo "stopped; data and logs kept in $DIR"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "run.sh needs root: PostgreSQL runs as the postgres user" >&2
  exit 1
fi
missing=()
command -v patroni > /dev/null || missing+=(patroni)
/usr/bin/python3 -c 'import etcd' 2> /dev/null || missing+=(python3-etcd)
ls /usr/lib/postgresql/*/bin/postgres > /dev/null 2>&1 || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" > /dev/null
fi
BIN_DIR="$(dirname "$(ls /usr/lib/postgresql/*/bin/postgres | sort -V | tail -1)")"

mkdir -p "$DIR"
chown postgres: "$DIR"
for n in 1 2; do
  i=$((n - 1))
  cat > "$DIR/pg$n.yml" <<YAML
scope: $SCOPE
name: pg$n
log:
  level: INFO
restapi:
  listen: 127.0.0.1:${API_PORTS[$i]}
  connect_address: 127.0.0.1:${API_PORTS[$i]}
${DCS_KIND:-etcd3}:
  hosts: $ENDPOINTS
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 2
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
  initdb:
    - encoding: UTF8
  pg_hba:
    - host replication replicator 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
    - local all all trust
postgresql:
  listen: 127.0.0.1:${PG_PORTS[$i]}
  connect_address: 127.0.0.1:${PG_PORTS[$i]}
  data_dir: $DIR/pg$n
  bin_dir: $BIN_DIR
  pgpass: $DIR/pgpass$n
  authentication:
    replication:
      username: replicator
      password: replicator
    superuser:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: '$DIR'
    shared_buffers: 16MB
YAML
  chown postgres: "$DIR/pg$n.yml"
done

for n in 1 2; do
  if [ -f "$DIR/pg$n.pid" ] && kill -0 "$(cat "$DIR/pg$n.pid")" 2>/dev/null; then
    echo "pg$n is running already (pid $(cat "$DIR/pg$n.pid"))"
    continue
  fi
  # The pid file names Patroni itself (runuser's child), so that stop and
  # a failover test reach it.
  runuser -u postgres -- sh -c 'echo $$ > "$1"; exec patroni "$2"' sh "$DIR/pg$n.pid" "$DIR/pg$n.yml" \
    >> "$DIR/pg$n.log" 2>&1 &
  for _ in $(seq 1 50); do [ -s "$DIR/pg$n.pid" ] && break; sleep 0.1; done
done

# The node's role, as its REST API reports it.
role() { curl -s --max-time 1 "http://127.0.0.1:$1/patroni" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin).get("role",""))' 2>/dev/null || true; }
deadline=$((SECONDS + ${PATRONI_WAIT:-90}))
while true; do
  r1="$(role "${API_PORTS[0]}")"; r2="$(role "${API_PORTS[1]}")"
  case "$r1/$r2" in
    master/replica | primary/replica | replica/master | replica/primary) break ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "no primary and replica within ${PATRONI_WAIT:-90} s (pg1: '$r1', pg2: '$r2'); logs in $DIR" >&2
    exit 1
  fi
  sleep 0.5
done
echo "Patroni over $ENDPOINTS: pg1 is $r1, pg2 is $r2 (data and logs in $DIR)"
echo "  roles:   curl -s http://127.0.0.1:${API_PORTS[0]}/patroni ; curl -s http://127.0.0.1:${API_PORTS[1]}/patroni"
echo "  leader:  kvctl get /service/$SCOPE/leader"
echo "  stop:    examples/patroni/run.sh stop"
