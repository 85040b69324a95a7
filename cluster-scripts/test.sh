#!/usr/bin/env bash
# Runs kvd's whole test suite, with the format and lint checks. Installs what the interop, differential
# and Patroni tests need first, from Debian's packages: etcd 3.4 and etcdctl (etcd-server,
# etcd-client), patroni, python3-etcd and postgresql, without starting their system services, and the
# font the scale plots are drawn with (fonts-dejavu-core).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# What the interop and Patroni tests run: etcd 3.4, etcdctl, Patroni with its
# etcd client, and PostgreSQL.
missing=()
command -v etcd > /dev/null || missing+=(etcd-server)
command -v etcdctl > /dev/null || missing+=(etcd-client)
command -v patroni > /dev/null || missing+=(patroni)
/usr/bin/python3 -c 'import etcd' 2> /dev/null || missing+=(python3-etcd)
ls /usr/lib/postgresql/*/bin/postgres > /dev/null 2>&1 || missing+=(postgresql)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "installing ${missing[*]} from Debian's packages..." >&2
  # Keep the packages from starting system services (etcd, PostgreSQL) on
  # their default ports.
  policy=/usr/sbin/policy-rc.d
  added_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" > /dev/null
    $SUDO chmod +x "$policy"
    added_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" > /dev/null
  [ "$added_policy" = 0 ] || $SUDO rm -f "$policy"
fi
# sed reads to the end: head would leave etcd writing into a closed pipe, and
# under pipefail its SIGPIPE fails the whole run.
etcd --version | sed -n 1p >&2

# A one-off build gains nothing from incremental state, which was a quarter of
# target/ on a clean checkout; a developer's own cargo runs keep it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The same checks CI makes of every change: formatting and lints first, as
# they take seconds and say the most about a change that breaks them.
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# Every package: kvd itself and its fault harness (tests/kvd-faults), whose
# short run uses the kvd binary this builds.
cargo test --workspace --all-targets "$@"
