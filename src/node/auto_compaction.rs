//! Automatic compaction, as etcd's `--auto-compaction-mode` and
//! `--auto-compaction-retention` set it. Only the leader compacts; every
//! member keeps its plan up to date, so a new leader goes on where the old
//! one stopped.
//!
//! - `periodic` keeps at least the retention's worth of history: the
//!   revision is sampled every tenth of the compaction interval, and every
//!   interval (the retention, at most an hour) history is compacted up to the
//!   newest sample that is at least the retention old. A bare number is
//!   hours, as in etcd; otherwise a duration such as `30m` or `10s`.
//! - `revision` keeps the last N revisions: every [`REVISION_CHECK`] the
//!   leader compacts up to the current revision minus N.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Member;
use crate::error::Error;
use crate::proto::etcdserverpb::CompactionRequest;

/// How often `revision` mode looks at the revision, as etcd does.
pub const REVISION_CHECK: Duration = Duration::from_secs(5 * 60);

/// The longest interval between two periodic compactions.
const MAX_PERIODIC_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// What `--auto-compaction-mode` and `--auto-compaction-retention` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// No automatic compaction (a retention of 0).
    Off,
    /// Keep this much time of history.
    Periodic(Duration),
    /// Keep this many revisions.
    Revision(i64),
}

impl AutoCompaction {
    /// Reads the two flags as etcd reads them.
    pub fn parse(mode: &str, retention: &str) -> Result<AutoCompaction, String> {
        let retention = retention.trim();
        match mode {
            "periodic" => {
                let period = match retention.parse::<u64>() {
                    Ok(hours) => Duration::from_secs(hours.saturating_mul(3600)),
                    Err(_) => humantime::parse_duration(retention).map_err(|e| {
                        format!("--auto-compaction-retention {retention:?}: not a number of hours or a duration ({e})")
                    })?,
                };
                Ok(if period.is_zero() { AutoCompaction::Off } else { AutoCompaction::Periodic(period) })
            }
            "revision" => match retention.parse::<i64>() {
                Ok(0) => Ok(AutoCompaction::Off),
                Ok(n) if n > 0 => Ok(AutoCompaction::Revision(n)),
                _ => Err(format!("--auto-compaction-retention {retention:?}: not a number of revisions")),
            },
            other => Err(format!("--auto-compaction-mode {other:?}: must be periodic or revision")),
        }
    }
}

/// The periodic plan: samples of the revision, and when it last compacted.
#[derive(Debug)]
pub struct Periodic {
    period: Duration,
    samples: VecDeque<(Instant, i64)>,
    last: Instant,
    /// Until the first compaction, the whole period must pass; then the
    /// interval.
    first: bool,
}

impl Periodic {
    /// A plan for `period` started at `now`.
    pub fn new(period: Duration, now: Instant) -> Periodic {
        Periodic { period, samples: VecDeque::new(), last: now, first: true }
    }

    /// How often history is compacted.
    pub fn interval(&self) -> Duration {
        self.period.min(MAX_PERIODIC_INTERVAL)
    }

    /// How often the revision is sampled.
    pub fn tick(&self) -> Duration {
        (self.interval() / 10).max(Duration::from_millis(10))
    }

    /// Records the revision `rev` seen at `now`, and answers the revision
    /// to compact up to, if it is time to.
    pub fn sample(&mut self, now: Instant, rev: i64) -> Option<i64> {
        self.samples.push_back((now, rev));
        // Keep the newest sample at least a period old, and those after it.
        while self.samples.get(1).is_some_and(|(t, _)| now.duration_since(*t) >= self.period) {
            self.samples.pop_front();
        }
        let wait = if self.first { self.period } else { self.interval() };
        if now.duration_since(self.last) < wait {
            return None;
        }
        let (t, rev) = *self.samples.front()?;
        (now.duration_since(t) >= self.period).then_some(rev)
    }

    /// Records that compaction up to a revision was done (or was not
    /// needed) at `now`.
    pub fn done(&mut self, now: Instant) {
        self.last = now;
        self.first = false;
    }
}

/// The revision `revision` mode compacts up to, keeping `keep` revisions
/// of the current `rev`, if that is past what is compacted already.
pub fn revision_target(rev: i64, keep: i64, compacted: i64) -> Option<i64> {
    let target = rev.saturating_sub(keep);
    (target > 0 && target > compacted).then_some(target)
}

impl Member {
    /// Runs automatic compaction until the member stops.
    pub async fn run_auto_compaction(self: Arc<Self>, plan: AutoCompaction) {
        let (tick, mut periodic, keep) = match plan {
            AutoCompaction::Off => return,
            AutoCompaction::Periodic(period) => {
                let p = Periodic::new(period, Instant::now());
                (p.tick(), Some(p), 0)
            }
            AutoCompaction::Revision(keep) => (REVISION_CHECK, None, keep),
        };
        tracing::info!(?plan, "automatic compaction");
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.stopped() => return,
            }
            let (rev, compacted) = {
                let state = self.state.read();
                (state.store.revision(), state.store.compacted())
            };
            let target = match periodic.as_mut() {
                Some(p) => p.sample(Instant::now(), rev),
                None => revision_target(rev, keep, compacted),
            };
            let Some(target) = target else { continue };
            if self.leader() != Some(self.id) {
                continue;
            }
            if target > compacted {
                match self.compact(CompactionRequest { revision: target, physical: false }).await {
                    Ok(_) => tracing::info!(revision = target, "auto-compaction: compacted"),
                    Err(Error::Compacted) => {}
                    Err(e) => {
                        tracing::warn!(revision = target, "auto-compaction failed, to be tried again: {e}");
                        continue;
                    }
                }
            }
            if let Some(p) = periodic.as_mut() {
                p.done(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_read_as_etcd_reads_them() {
        assert_eq!(AutoCompaction::parse("periodic", "0"), Ok(AutoCompaction::Off));
        assert_eq!(AutoCompaction::parse("periodic", "1"), Ok(AutoCompaction::Periodic(Duration::from_secs(3600))));
        assert_eq!(AutoCompaction::parse("periodic", "30m"), Ok(AutoCompaction::Periodic(Duration::from_secs(1800))));
        assert_eq!(AutoCompaction::parse("periodic", "1h30m"), Ok(AutoCompaction::Periodic(Duration::from_secs(5400))));
        assert_eq!(AutoCompaction::parse("revision", "1000"), Ok(AutoCompaction::Revision(1000)));
        assert_eq!(AutoCompaction::parse("revision", "0"), Ok(AutoCompaction::Off));
        assert!(AutoCompaction::parse("revision", "1h").unwrap_err().contains("not a number of revisions"));
        assert!(AutoCompaction::parse("periodic", "soon").unwrap_err().contains("not a number of hours"));
        assert!(AutoCompaction::parse("daily", "1").unwrap_err().contains("periodic or revision"));
    }

    #[test]
    fn periodic_keeps_a_period_of_history_and_compacts_every_interval() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut p = Periodic::new(Duration::from_secs(10), start);
        assert_eq!(p.tick(), Duration::from_secs(1));
        // The revision grows by 100 a second; nothing is compacted before a
        // whole period has passed.
        for s in 1..10 {
            assert_eq!(p.sample(at(s), 100 * s as i64), None, "second {s}");
        }
        // At 11 s, the newest sample at least 10 s old is the one of 1 s.
        assert_eq!(p.sample(at(10), 1000), None);
        assert_eq!(p.sample(at(11), 1100), Some(100));
        p.done(at(11));
        // Then every interval (10 s here), keeping 10 s of history.
        for s in 12..21 {
            assert_eq!(p.sample(at(s), 100 * s as i64), None, "second {s}");
        }
        assert_eq!(p.sample(at(21), 2100), Some(1100));
    }

    #[test]
    fn periodic_over_an_hour_compacts_hourly() {
        let p = Periodic::new(Duration::from_secs(5 * 3600), Instant::now());
        assert_eq!(p.interval(), Duration::from_secs(3600));
        assert_eq!(p.tick(), Duration::from_secs(360));
    }

    #[test]
    fn revision_mode_keeps_the_last_revisions() {
        assert_eq!(revision_target(100, 1000, 0), None);
        assert_eq!(revision_target(1500, 1000, 0), Some(500));
        assert_eq!(revision_target(1500, 1000, 500), None);
        assert_eq!(revision_target(1501, 1000, 500), Some(501));
    }
}
