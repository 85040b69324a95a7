//! Patroni, the PostgreSQL high-availability manager, with kvd as its DCS
//! through etcd's JSON gateway, and with etcd 3.4 beside it in the same run:
//! `examples/patroni/compare.sh` starts three members of each, and for each
//! of three cases a fresh pair of PostgreSQL nodes under Patroni, kills the
//! primary (alone, after a DCS follower, or with the DCS leader) and times
//! the replica's promotion. Every case must promote the replica on kvd
//! within ttl + loop_wait + 10 s, and etcd's figures are printed beside
//! kvd's.
//!
//! It needs root (PostgreSQL runs as the postgres user) and Debian's
//! patroni, python3-etcd and postgresql, which `cluster-scripts/test.sh`
//! installs.

use std::path::Path;
use std::process::Command;

/// Patroni's ttl and loop_wait in run.sh, and the margin allowed on top.
const TTL_MS: u64 = 10_000;
const LOOP_WAIT_MS: u64 = 2_000;
const MARGIN_MS: u64 = 10_000;

#[test]
fn patroni_fails_over_on_kvd_as_on_etcd() {
    let bins = Path::new(env!("CARGO_BIN_EXE_kvd")).parent().expect("the build's bin directory");
    assert!(bins.join("kvctl").exists(), "no kvctl beside kvd in {}", bins.display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/patroni/compare.sh");
    let out = Command::new("timeout")
        .arg("900")
        .arg(&script)
        .env("KVD_BIN_DIR", bins)
        .output()
        .expect("run examples/patroni/compare.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    println!("{stdout}");
    assert!(out.status.success(), "compare.sh failed (exit {:?}):\n{stdout}\n{stderr}", out.status.code());
    let times: Vec<(String, String, u64)> = stdout
        .lines()
        .filter_map(|l| {
            let mut parts = l.strip_prefix("failover ")?.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string(), parts.next()?.parse().ok()?))
        })
        .collect();
    for dcs in ["kvd", "etcd"] {
        for case in ["primary", "member", "leader"] {
            let ms = times
                .iter()
                .find(|(d, c, _)| d == dcs && c == case)
                .map(|(_, _, ms)| *ms)
                .unwrap_or_else(|| panic!("no time for {dcs} {case} in:\n{stdout}\n{stderr}"));
            if dcs == "kvd" {
                assert!(
                    ms <= TTL_MS + LOOP_WAIT_MS + MARGIN_MS,
                    "kvd, {case}: the replica was promoted after {ms} ms:\n{stdout}"
                );
            }
        }
    }
}
