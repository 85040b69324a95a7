//! Three hosts with TLS: `cluster-scripts/three-hosts.sh` runs the steps of
//! docs/operations.md "Three hosts with TLS" with three network namespaces
//! as the hosts, each with an address of its own, and the kvd and kvctl of
//! this build. A write on one host is read on the others; one host is cut
//! off, the other two take writes, and the healed host serves them.
//!
//! It needs root for the namespaces; where it lacks the rights the script
//! exits 77 and this test says it was skipped and why.

use std::path::Path;
use std::process::Command;

#[test]
fn three_hosts_with_tls_survive_one_cut_off() {
    let bins = Path::new(env!("CARGO_BIN_EXE_kvd")).parent().expect("the build's bin directory");
    assert!(bins.join("kvctl").exists(), "no kvctl beside kvd in {}", bins.display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster-scripts/three-hosts.sh");
    let out =
        Command::new("timeout").arg("180").arg(&script).env("KVD_BIN_DIR", bins).output().expect("run three-hosts.sh");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    if out.status.code() == Some(77) {
        let why = text.lines().find(|l| l.contains("skipped:")).unwrap_or("skipped");
        eprintln!("three hosts: {why}");
        return;
    }
    assert!(out.status.success(), "three-hosts.sh failed (exit {:?}):\n{text}", out.status.code());
    for said in [
        "plain text and no client certificate: refused",
        "h3 (cut off): no answer",
        "h3: all 50 writes made while it was cut off",
        "three hosts with TLS: passed",
    ] {
        assert!(text.contains(said), "no {said:?} in:\n{text}");
    }
}
