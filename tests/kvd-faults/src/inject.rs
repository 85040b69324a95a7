//! Injecting each kind of fault, from start to heal, and what it reports.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use kvd::proto::etcdserverpb::AlarmType;
use kvd_faults::Fault;
use rand::rngs::StdRng;
use rand::Rng;

use crate::workload::{Clock, Record};
use crate::{last_error, resumed, serves, Report};
use kvd_faults::cluster::{self, Cluster, MEMBERS};
/// What injecting a fault works with: the cluster, the run's seeded
/// randomness, its report, and the history of operations so far.
pub struct Injection<'a> {
    pub cluster: &'a mut Cluster,
    pub rng: &'a mut StdRng,
    pub report: &'a mut Report,
    pub record: &'a Record,
    pub clock: Clock,
    pub election: Duration,
    pub dir: &'a std::path::Path,
}

/// Injects `fault` (at time `at`, with `leader` leading and `follower` one
/// of the others) and undoes it: each kind of fault, from start to heal.
pub async fn inject(ctx: Injection<'_>, fault: Fault, leader: usize, follower: usize, at: u64) -> anyhow::Result<()> {
    let Injection { cluster, rng, report, record, clock, election, dir } = ctx;
    match fault {
        Fault::KillLeader | Fault::KillMember => {
            let victim = if fault == Fault::KillLeader { leader } else { rng.gen_range(0..MEMBERS) };
            cluster.kill(victim);
            if victim == leader {
                if let Some(d) = cluster.new_leader_without(victim, Duration::from_secs(8)).await {
                    report.elected_after_kill.push(d);
                }
                match resumed(record, at, Duration::from_secs(10)).await {
                    Some(d) => report.resume_after_kill.push(d),
                    None => report.liveness.push(format!("writes did not resume within 10 s of killing m{victim}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(200..3000))).await;
            cluster.start_member(victim)?;
        }
        Fault::RestartAll => {
            for m in 0..MEMBERS {
                cluster.kill(m);
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
            for m in 0..MEMBERS {
                cluster.start_member(m)?;
            }
        }
        Fault::PauseLeader | Fault::PauseFollower => {
            let victim = if fault == Fault::PauseLeader { leader } else { follower };
            cluster.pause(victim, true);
            tokio::time::sleep(election * rng.gen_range(3..7)).await;
            cluster.pause(victim, false);
        }
        Fault::PartitionLeader | Fault::PartitionMember => {
            let victim = if fault == Fault::PartitionLeader { leader } else { follower };
            let mut cuts = HashSet::new();
            for other in (0..MEMBERS).filter(|&o| o != victim) {
                cuts.insert((victim, other));
                cuts.insert((other, victim));
            }
            cluster.cut(cuts);
            let hold = Duration::from_millis(rng.gen_range(1500..4000));
            if victim == leader {
                if let Some(d) = cluster.new_leader_without(victim, Duration::from_secs(8)).await {
                    report.elected_after_cut.push(d);
                }
                match resumed(record, at, hold.max(Duration::from_secs(8))).await {
                    Some(d) => report.resume_after_partition.push(d),
                    None => report.liveness.push(format!(
                        "writes did not resume within {:?} with leader m{victim} cut off",
                        hold.max(Duration::from_secs(8))
                    )),
                }
            }
            let elapsed = Duration::from_nanos(clock.now() - at);
            tokio::time::sleep(hold.saturating_sub(elapsed)).await;
            cluster.cut(HashSet::new());
            match serves(cluster, victim, Duration::from_secs(10)).await {
                Some(d) => report.heal_to_serve.push(d),
                None => report.liveness.push(format!("m{victim} did not serve within 10 s of the heal")),
            }
        }
        Fault::OneWay => {
            // The leader's connections to the followers fail; theirs to
            // it still work.
            let cuts: HashSet<_> = (0..MEMBERS).filter(|&o| o != leader).map(|o| (leader, o)).collect();
            cluster.cut(cuts);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(1500..4000))).await;
            cluster.cut(HashSet::new());
        }
        Fault::CorruptLog => {
            let victim = follower;
            cluster.kill(victim);
            let data = cluster.data_dir(victim);
            let saved = cluster.save_data(victim)?;
            match cluster::flip_a_log_byte(&data) {
                Ok(file) => match cluster.start_refused(victim, Duration::from_secs(10)).await? {
                    Ok(msg) if !msg.contains("refusing to start") => report
                        .anomalies
                        .push(format!("m{victim} failed on a damaged log without a clear message: {msg}")),
                    Ok(msg) => report.notes.push(format!(
                        "m{victim} refused to start on a flipped byte in {}: {msg}",
                        file.file_name().unwrap_or_default().to_string_lossy()
                    )),
                    Err(what) => report
                        .anomalies
                        .push(format!("m{victim} started on a damaged log ({}): {what}", file.display())),
                },
                Err(e) => report.notes.push(format!("corrupt-log skipped: {e}")),
            }
            cluster.restore_data(victim, &saved)?;
            cluster.start_member(victim)?;
        }
        Fault::TruncateLog => {
            // Half of a stopped follower's oldest log segment goes. The
            // member must either start, drop the cut end and catch up
            // (the end held only entries it had not applied), or refuse
            // with a clear message (it had applied some of them); then
            // its data is restored, as an operator would.
            let victim = follower;
            cluster.kill(victim);
            let data = cluster.data_dir(victim);
            let saved = cluster.save_data(victim)?;
            let cut = cluster::truncate_log(&data)?;
            match cluster.start_refused(victim, Duration::from_secs(5)).await? {
                Ok(msg) if msg.contains("refusing to start") => {
                    report.notes.push(format!("m{victim} refused to start on a log cut to {cut} bytes: {msg}"));
                }
                Ok(msg) => report
                    .anomalies
                    .push(format!("m{victim} failed on a log cut to {cut} bytes without a clear message: {msg}")),
                Err(_) => {
                    // It ran for 5 s (stopped now): it took the cut log.
                    report.notes.push(format!("m{victim} started on a log cut to {cut} bytes"));
                }
            }
            cluster.restore_data(victim, &saved)?;
            cluster.start_member(victim)?;
        }
        Fault::ReplaceMember => {
            let victim = follower;
            let old_id = match cluster.member_id(victim).await {
                Ok(id) => id,
                Err(e) => {
                    report.notes.push(format!("replace-member skipped: m{victim} did not answer ({})", e.message()));
                    return Ok(());
                }
            };
            cluster.kill(victim);
            let started = Instant::now();
            match cluster.replace_member(victim, old_id, Duration::from_secs(60)).await {
                Ok((old, new)) => {
                    report.notes.push(format!(
                        "replace-member: m{victim} {old:x} replaced by {new:x}, promoted after {} ms",
                        started.elapsed().as_millis()
                    ));
                    report.replaced.push(started.elapsed());
                }
                Err(e) => report.anomalies.push(format!("replacing m{victim} failed: {e:#}")),
            }
        }
        Fault::AddLearner => match cluster.grow_and_shrink(Duration::from_secs(60)).await {
            Ok((id, promoted)) => {
                report.notes.push(format!(
                    "add-learner: {id:x} added, promoted after {} ms, removed; it stopped itself",
                    promoted.as_millis()
                ));
                report.grown.push(promoted);
            }
            Err(e) => report.anomalies.push(format!("growing to four members and back failed: {e:#}")),
        },
        Fault::RemoveReadd => {
            let victim = follower;
            let old_id = match cluster.member_id(victim).await {
                Ok(id) => id,
                Err(e) => {
                    report.notes.push(format!("remove-readd skipped: m{victim} did not answer ({})", e.message()));
                    return Ok(());
                }
            };
            match cluster.remove_and_readd(victim, old_id, Duration::from_secs(60)).await {
                Ok((old, new)) => match serves(cluster, victim, Duration::from_secs(30)).await {
                    Some(d) => report.notes.push(format!(
                        "remove-readd: m{victim} {old:x} removed and stopped, re-added as {new:x}, serving after {} ms",
                        d.as_millis()
                    )),
                    None => report.liveness.push(format!("m{victim} did not serve within 30 s of being re-added")),
                },
                Err(e) => report.anomalies.push(format!("removing and re-adding m{victim} failed: {e:#}")),
            }
        }
        Fault::MoveLeader => {
            let target = follower;
            let Ok(target_id) = cluster.member_id(target).await else { return Ok(()) };
            let at_leader = cluster.endpoints().only(leader).client(Duration::from_secs(2));
            let started = Instant::now();
            match at_leader.move_leader(target_id).await {
                Ok(_) => report.moved_leader.push(started.elapsed()),
                // Another fault's aftermath may have moved leadership
                // meanwhile; that is no anomaly.
                Err(e) => report.notes.push(format!("move-leader to m{target}: {}", e.message())),
            }
        }
        Fault::DiskFull => {
            let victim = cluster.layout.small_disk.unwrap_or(2);
            let victim_id = cluster.member_id(victim).await.ok();
            let data = cluster.data_dir(victim);
            // 16 MiB left: less than the 64 MiB a member keeps free by
            // default (--quota-disk-free-bytes), so it raises NOSPACE and
            // goes on serving reads instead of failing a write.
            let filled = cluster::fill(&data, 16 << 20)?;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(1500..3000))).await;
            let exited = cluster.exited(victim);
            let last = last_error(dir, victim);
            // The member sees its disk short of free space and raises
            // NOSPACE for itself (--quota-disk-free-bytes).
            let alarms = cluster.alarms().await;
            let raised = victim_id
                .is_some_and(|id| alarms.iter().any(|a| a.member_id == id && a.alarm == AlarmType::Nospace as i32));
            std::fs::remove_file(data.join("filler"))?;
            report.notes.push(format!(
                "disk-full: {} MiB filled m{victim}'s disk; it {}{}; NOSPACE {}",
                filled >> 20,
                if exited { "exited" } else { "kept running" },
                if last.is_empty() { String::new() } else { format!(": {last}") },
                if raised { "raised" } else { "not raised" },
            ));
            if !raised || exited {
                report
                    .anomalies
                    .push(format!("m{victim} did not raise NOSPACE and go on running on a nearly full disk"));
            }
            // As an operator would once space is back.
            if let Err(e) = cluster.disarm().await {
                report.notes.push(format!("disk-full: alarm disarm failed: {e}"));
            }
            if exited {
                // As a supervisor would, once space is back.
                cluster.start_member(victim)?;
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut served = false;
            while !served && Instant::now() < deadline {
                if cluster.exited(victim) {
                    // A write begun on the full disk (a snapshot, say)
                    // can fail a moment after the check above: restart
                    // it for that cause only, as a supervisor would.
                    let last = last_error(dir, victim);
                    if !last.contains("No space left on device") {
                        report.anomalies.push(format!("m{victim} exited after its disk had space again: {last}"));
                        break;
                    }
                    report.notes.push(format!("disk-full: m{victim} exited after the check: {last}"));
                    cluster.start_member(victim)?;
                }
                served = serves(cluster, victim, Duration::from_millis(500)).await.is_some();
            }
            if !served {
                report.anomalies.push(format!("m{victim} did not serve within 20 s of its disk having space again"));
            }
        }
    }
    Ok(())
}
