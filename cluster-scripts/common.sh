# Shared settings of the cluster scripts; sourced, not run.
#
# KVD_CLUSTER_DIR  where data, logs and pid files go (default: ./kvd-cluster)
# KVD_CLIENT_PORTS client ports of the three members (default: "2379 22379 32379")
# KVD_PEER_PORTS   peer ports of the three members   (default: "2380 22380 32380")
# KVD_BIN_DIR      where kvd and kvctl are (default: target/release, built when needed)
# KVD_EXTRA_FLAGS  more flags for every member (e.g. "--snapshot-count 1000")
# KVD_WORKER_THREADS async threads per member (default: a third of the CPUs, at
#                  least one, since the three members share this machine)

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_DIR="${KVD_CLUSTER_DIR:-$PWD/kvd-cluster}"
read -r -a CLIENT_PORTS <<< "${KVD_CLIENT_PORTS:-2379 22379 32379}"
read -r -a PEER_PORTS <<< "${KVD_PEER_PORTS:-2380 22380 32380}"
NAMES=(n1 n2 n3)
BIN_DIR="${KVD_BIN_DIR:-$ROOT/target/release}"
WORKER_THREADS="${KVD_WORKER_THREADS:-$(( $(nproc) / 3 ))}"
[ "$WORKER_THREADS" -ge 1 ] || WORKER_THREADS=1

endpoints() {
  local out=() p
  for p in "${CLIENT_PORTS[@]}"; do out+=("127.0.0.1:$p"); done
  (IFS=,; echo "${out[*]}")
}

# Whether the member whose pid file is $1 runs: a process that was killed but
# not yet reaped (a zombie) does not.
alive() {
  [ -f "$1" ] || return 1
  local pid state
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  state=$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)
  [ "$state" != Z ]
}

# Builds the release binaries, unless KVD_BIN_DIR names ones already built.
build_bins() {
  if [ -z "${KVD_BIN_DIR:-}" ]; then
    echo "building release binaries (cargo build --release; about five minutes the first time)..." >&2
    (cd "$ROOT" && cargo build --release --bins)
  fi
}
