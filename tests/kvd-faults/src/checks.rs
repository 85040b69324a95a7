//! The checks made of a run's history once the cluster is healed: writes
//! acknowledged and never lost, revisions never going back, leases, fenced
//! writes, and linearizability per register.

use std::collections::HashSet;
use std::time::Duration;

use kvd::proto::mvccpb::KeyValue;

use crate::workload::{self, Record};
use crate::{linearizability, Report};

/// Checks what the clients recorded against `contents`, the members' data at
/// the final revision; `windows` are the spans during which faults were
/// under way.
pub fn records(
    record: &Record,
    contents: &[KeyValue],
    windows: &[(u64, u64)],
    election: Duration,
    report: &mut Report,
) {
    // Acknowledged inserts are all there; definitely failed ones are not.
    let present: HashSet<Vec<u8>> =
        contents.iter().filter(|kv| kv.key.starts_with(b"ins/")).map(|kv| kv.key.clone()).collect();
    let acked = record.inserts_acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    report.acked_inserts = acked.len();
    let lost: Vec<&String> = acked.iter().filter(|k| !present.contains(k.as_bytes())).collect();
    report.lost = lost.len();
    if !lost.is_empty() {
        report.anomalies.push(format!(
            "{} acknowledged inserts lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    for k in record.inserts_failed.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        if present.contains(k.as_bytes()) {
            report.anomalies.push(format!("insert {k} failed before it was sent, yet it is there"));
        }
    }

    // Revisions never went backwards for a client.
    for r in record.regressions.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        report.anomalies.push(format!("revision went back: {r}"));
    }

    for (what, n) in record.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        report.notes.push(format!("{n}× {what}"));
    }

    // Leases: never gone early (checked as they ran); how long they took.
    report.anomalies.extend(record.lease_errors.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
    for life in record.leases.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        if let Some(gone) = life.gone {
            let after = Duration::from_nanos(gone.saturating_sub(life.last_ok_ret));
            report.lease_expiry.push(after);
            if after > Duration::from_nanos(life.ttl_ns) + election {
                report.leases_late += 1;
                // Faults (a new leader restarts every countdown) excuse it;
                // with none under way it is a missed bound.
                let calm = windows.iter().all(|&(from, to)| to < life.last_ok_ret || from > gone);
                if calm {
                    report.liveness.push(format!(
                        "a lease's key went {after:?} after its last keep-alive (TTL {:?}), with no fault under way",
                        Duration::from_nanos(life.ttl_ns)
                    ));
                }
            }
        }
    }
    // Locks: fenced writes never go back to an older token.
    let fenced = record.fenced.lock().unwrap_or_else(|p| p.into_inner()).clone();
    report.fenced = fenced.len();
    report.anomalies.extend(workload::check_fenced(&fenced));
}

/// Checks every register's history for linearizability, one register per
/// blocking task.
pub async fn linearizability(record: &Record, report: &mut Report) -> anyhow::Result<()> {
    // Linearizability, per register.
    let ops = std::mem::take(&mut *record.registers.lock().unwrap_or_else(|p| p.into_inner()));
    report.ops = ops.len();
    report.ops_unknown = ops.iter().filter(|r| r.op.output == linearizability::Output::Unknown).count();
    let mut per_key: Vec<Vec<linearizability::Op>> = vec![Vec::new(); workload::REGISTERS];
    for r in &ops {
        per_key[r.key].push(r.op);
    }
    let checks: Vec<_> = per_key
        .into_iter()
        .enumerate()
        .map(|(k, h)| tokio::task::spawn_blocking(move || (k, h.len(), linearizability::check(&h, 0, 50_000_000))))
        .collect();
    for c in checks {
        let (k, n, verdict) = c.await?;
        report.histories += 1;
        match verdict {
            linearizability::Verdict::Linearizable => {}
            linearizability::Verdict::NotLinearizable { stuck_at } => report
                .anomalies
                .push(format!("register {k}: {n} operations are not linearizable (stuck at op {stuck_at})")),
            linearizability::Verdict::Undecided { steps } => {
                report.undecided += 1;
                report.notes.push(format!("register {k}: {n} operations, undecided after {steps} search steps"));
            }
        }
    }
    Ok(())
}
