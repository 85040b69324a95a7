# Sourced by bench-vs-etcd.sh, scale-vs-etcd.sh and ab-builds.sh: the three
# members each of them runs (kvd or etcd 3.4, the same flags for both) on
# fixed local ports, started, waited on, stopped and measured the same way.
#
# The caller sets WORK (its scratch directory, where member logs go) and
# keeps the members' pids in PIDS, index i for member i.

CLIENT_PORTS=(2379 22379 32379)
PEER_PORTS=(2380 22380 32380)
NAMES=(n1 n2 n3)
EPS="127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379"
PIDS=()
# Command words put before a member's binary (a memory limit, an
# environment); empty by default.
LAUNCH=()

# Exits unless every port is free: another server there would answer in
# place of the one measured.
require_free_ports() {
  local port
  for port in "${CLIENT_PORTS[@]}" "${PEER_PORTS[@]}"; do
    if (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null; then
      echo "port $port is in use: stop what listens there first (these scripts need ${CLIENT_PORTS[*]} ${PEER_PORTS[*]})" >&2
      exit 1
    fi
  done
}

# The --initial-cluster of the three members.
initial_cluster() {
  local cluster="" i
  for i in 0 1 2; do cluster+="${cluster:+,}${NAMES[$i]}=http://127.0.0.1:${PEER_PORTS[$i]}"; done
  echo "$cluster"
}

# bin i data-dir state token [flag...]: starts member i of a cluster of
# three from `bin` (etcd or a kvd binary: both take these flags) in the
# background, preceded by LAUNCH, its output appended to data-dir.log; its
# pid goes to PIDS[i].
start_member() {
  local bin=$1 i=$2 dir=$3 state=$4 token=$5
  shift 5
  "${LAUNCH[@]}" "$bin" --name "${NAMES[$i]}" --data-dir "$dir" \
    --listen-client-urls "http://127.0.0.1:${CLIENT_PORTS[$i]}" \
    --advertise-client-urls "http://127.0.0.1:${CLIENT_PORTS[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${PEER_PORTS[$i]}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${PEER_PORTS[$i]}" \
    --initial-cluster "$(initial_cluster)" --initial-cluster-state "$state" --initial-cluster-token "$token" \
    "$@" >> "$dir.log" 2>&1 < /dev/null &
  PIDS[i]=$!
}

# bin dir-prefix token [flag...]: starts three members of a new cluster,
# member i on the data directory dir-prefix followed by its name.
start_members() {
  local bin=$1 prefix=$2 token=$3 i
  shift 3
  for i in 0 1 2; do start_member "$bin" "$i" "$prefix${NAMES[$i]}" new "$token" "$@"; done
}

# what kvctl seconds: waits until every member answers health, for at most
# `seconds`. Returns 1, and says why, if a member exited (a port already
# taken, for instance) or the time ran out.
wait_healthy() {
  local what=$1 kvctl=$2 deadline=$((SECONDS + $3)) pid
  while true; do
    for pid in "${PIDS[@]}"; do
      if ! kill -0 "$pid" 2> /dev/null; then
        echo "a $what member exited; logs in $WORK" >&2
        return 1
      fi
    done
    "$kvctl" --endpoints "$EPS" --command-timeout 3s endpoint health > /dev/null 2>&1 && return 0
    if [ $SECONDS -ge "$deadline" ]; then
      echo "$what did not become healthy within $3 s; logs in $WORK" >&2
      return 1
    fi
    sleep 0.1
  done
}

# [seconds]: stops every member: TERM, then KILL to one still running after
# `seconds` (default 10).
stop_all() {
  local pid tenths=$((${1:-10} * 10))
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq "$tenths"); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2> /dev/null || true
  done
  PIDS=()
}

# Stops every member at once (KILL) and waits until each has exited: for a
# cluster whose data goes next, where nothing of the stop is measured. On
# TERM etcd's members take about 7 s to stop, each handing its leadership to
# members that are stopping too.
kill_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2> /dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2> /dev/null || true; done
  PIDS=()
}

# root system...: for the A/B scripts. Sets KVCTL to the kvctl that drives
# every run (built in root's target/release unless KVCTL is set), and exits
# unless each system is "etcd" (installed) or a directory holding a kvd.
ab_setup() {
  local root=$1 b
  shift
  if [ -z "${KVCTL:-}" ]; then
    (cd "$root" && cargo build --release --bin kvctl --quiet)
    KVCTL="$root/target/release/kvctl"
  fi
  for b in "$@"; do
    if [ "$b" = etcd ]; then
      command -v etcd > /dev/null || { echo "etcd is not installed (cluster-scripts/test.sh installs it)" >&2; exit 1; }
    elif [ ! -x "$b/kvd" ]; then
      echo "$b/kvd is not an executable" >&2; exit 1
    fi
  done
}

# system: the binary start_members takes for it (etcd, or DIR/kvd).
system_bin() {
  if [ "$1" = etcd ]; then echo etcd; else echo "$1/kvd"; fi
}

# system [threads]: how each member of `system` ("etcd", or a kvd binary or
# directory) is told to run `threads` threads for its work, the same for
# both systems: GOMAXPROCS for etcd (added to the end of LAUNCH),
# --worker-threads for kvd (into THREAD_FLAGS, emptied first). With no
# threads, each system's own default, one per CPU.
member_threads() {
  THREAD_FLAGS=()
  [ -n "${2:-}" ] || return 0
  case "$2" in *[!0-9]*) echo "threads per member must be a number of at least 1, not '$2'" >&2; exit 2 ;; esac
  [ "$((10#$2))" -ge 1 ] || { echo "threads per member must be a number of at least 1, not '$2'" >&2; exit 2; }
  if [ "$1" = etcd ]; then LAUNCH+=(env GOMAXPROCS="$2"); else THREAD_FLAGS=(--worker-threads "$2"); fi
}

# The members' CPU time in clock ticks (user and system), summed.
cpu_ticks() {
  local pid sum=0
  for pid in "${PIDS[@]}"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done
  echo "$sum"
}

# The client URL of the leader (role "true") or of a follower ("false"),
# asked with `kvctl`.
member_with_role() {
  "$1" --endpoints "$EPS" --command-timeout 3s endpoint status | awk -F', ' -v role="$2" '$5 == role { print $1; exit }'
}
