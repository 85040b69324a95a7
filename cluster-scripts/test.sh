#!/usr/bin/env bash
# Runs kvd's whole test suite, with the format and lint checks. Installs what the interop and differential
# tests need first: etcd 3.4 and etcdctl from Debian's packages (etcd-server,
# etcd-client), without starting Debian's own etcd service.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v etcd > /dev/null || ! command -v etcdctl > /dev/null; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "installing etcd-server and etcd-client (etcd 3.4) from Debian's packages..." >&2
  # Keep the package from starting a system etcd on the default ports.
  policy=/usr/sbin/policy-rc.d
  added_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" > /dev/null
    $SUDO chmod +x "$policy"
    added_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server etcd-client > /dev/null
  [ "$added_policy" = 0 ] || $SUDO rm -f "$policy"
fi
etcd --version | head -n 1 >&2

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
