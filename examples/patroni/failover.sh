#!/usr/bin/env bash
# Kills the primary of the two nodes that run.sh started (its Patroni and its
# PostgreSQL, with SIGKILL) and prints how long until the other node is the
# primary, as its REST API reports it. Settings as for run.sh.
set -euo pipefail
DIR="$(realpath -m "${PATRONI_DIR:-./patroni-demo}")"
read -r -a API_PORTS <<< "${API_PORTS:-8008 8009}"
role() { curl -s --max-time 1 "http://127.0.0.1:$1/patroni" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin).get("role",""))' 2>/dev/null || true; }
primary=""
for n in 1 2; do
  r="$(role "${API_PORTS[$((n - 1))]}")"
  if [ "$r" = master ] || [ "$r" = primary ]; then primary=$n; fi
done
if [ -z "$primary" ]; then
  echo "no primary to kill" >&2
  exit 1
fi
other=$((3 - primary))
port="${API_PORTS[$((other - 1))]}"
start=$(date +%s%N)
kill -9 "$(cat "$DIR/pg$primary.pid")"
pkill -9 -f "postgres -D $DIR/pg$primary( |$)" || true
rm -f "$DIR/pg$primary.pid"
deadline=$((SECONDS + ${FAILOVER_WAIT:-60}))
while true; do
  r="$(role "$port")"
  if [ "$r" = master ] || [ "$r" = primary ]; then break; fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "pg$other was not promoted within ${FAILOVER_WAIT:-60} s" >&2
    exit 1
  fi
  sleep 0.1
done
end=$(date +%s%N)
echo "killed pg$primary; pg$other promoted after $(( (end - start) / 1000000 )) ms"
