//! Alarms and the storage quota, as etcd has them.
//!
//! An alarm is raised for a member and replicated through Raft like any
//! write, so every member refuses the same writes while it is up (see
//! `refused_by_alarm`): NOSPACE refuses what adds data (puts, Txns with a
//! put, lease grants) and lets deletes, compaction and lease revokes through
//! so that space can be freed; CORRUPT refuses every write. Only
//! `alarm disarm` (DEACTIVATE) clears an alarm.
//!
//! A member raises NOSPACE for itself, as etcd's quota check does, when a
//! write it receives would take the data past `--quota-backend-bytes`, and
//! when the filesystem of its data dir has less than `--quota-disk-free-bytes`
//! left, checked every [`DISK_CHECK`]: a member refuses writes before its
//! disk fills, instead of stopping when a write fails. The data is measured
//! as the store counts it (`MvccStore::bytes_in_use`): history, revision
//! order and leases. Compaction lowers it; unlike etcd 3.4, no defragment is
//! needed before the alarm can be disarmed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::Member;
use crate::error::Error;
use crate::proto::etcdserverpb::alarm_request::AlarmAction;
use crate::proto::etcdserverpb::{request_op, AlarmRequest, AlarmResponse, AlarmType, PutRequest, TxnRequest};

/// How often a member looks at its disk's free space.
pub const DISK_CHECK: Duration = Duration::from_secs(1);

/// The quota etcd applies when `--quota-backend-bytes` is 0: 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

/// What a key-value costs beyond its key and value, as etcd counts it.
const KV_OVERHEAD: u64 = 256;
/// What attaching a lease, or granting one, costs, as etcd counts it.
const LEASE_OVERHEAD: u64 = 64;

/// Where a member's data may grow to.
#[derive(Debug, Clone)]
pub struct Space {
    /// Most bytes of data (`--quota-backend-bytes`); `None` when disabled.
    pub quota_bytes: Option<u64>,
    /// Free bytes the data dir's filesystem keeps (`--quota-disk-free-bytes`);
    /// 0 to not look.
    pub disk_free_bytes: u64,
    /// The data dir.
    pub data_dir: PathBuf,
}

impl Space {
    /// The quota `--quota-backend-bytes` sets, as etcd reads it: 0 for the
    /// default of 2 GiB, negative to disable it.
    pub fn quota_from_flag(flag: i64) -> Option<u64> {
        match flag {
            0 => Some(DEFAULT_QUOTA_BYTES),
            n if n < 0 => None,
            n => Some(n as u64),
        }
    }
}

/// The bytes a put adds to the data, as etcd's quota counts them.
pub fn put_cost(p: &PutRequest) -> u64 {
    let lease = if p.lease != 0 { LEASE_OVERHEAD } else { 0 };
    (p.key.len() + p.value.len()) as u64 + KV_OVERHEAD + lease
}

/// The bytes a Txn may add: the costlier branch's puts, nested Txns
/// included.
pub fn txn_cost(t: &TxnRequest) -> u64 {
    let branch = |ops: &[crate::proto::etcdserverpb::RequestOp]| -> u64 {
        ops.iter()
            .map(|op| match &op.request {
                Some(request_op::Request::RequestPut(p)) => put_cost(p),
                Some(request_op::Request::RequestTxn(inner)) => txn_cost(inner),
                _ => 0,
            })
            .sum()
    };
    branch(&t.success).max(branch(&t.failure))
}

/// The bytes a lease grant adds.
pub const LEASE_GRANT_COST: u64 = LEASE_OVERHEAD;

/// Checks an alarm change before it is proposed (here, and when a follower
/// forwards one): ACTIVATE or DEACTIVATE of an alarm type etcd has.
pub fn check_alarm_change(a: &AlarmRequest) -> Result<(), Error> {
    match AlarmAction::try_from(a.action) {
        Ok(AlarmAction::Activate) | Ok(AlarmAction::Deactivate) => {}
        _ => return Err(Error::UnknownAlarmAction(a.action)),
    }
    AlarmType::try_from(a.alarm).map(|_| ()).map_err(|_| Error::UnknownAlarmType(a.alarm))
}

impl Member {
    /// The Alarm RPC: GET lists the raised alarms (of one type, unless
    /// NONE) after a read barrier; ACTIVATE and DEACTIVATE go through Raft
    /// and answer the alarm they raised or cleared (nothing when DEACTIVATE
    /// finds no such alarm), as etcd does, without a header.
    pub async fn alarm(&self, req: AlarmRequest) -> Result<AlarmResponse, Error> {
        // etcd's Alarm answers carry no header; neither do these.
        let resp = match AlarmAction::try_from(req.action) {
            Ok(AlarmAction::Get) => {
                if AlarmType::try_from(req.alarm).is_err() {
                    return Err(Error::UnknownAlarmType(req.alarm));
                }
                self.read_barrier().await?;
                let alarms = self
                    .alarms()
                    .into_iter()
                    .filter(|a| req.alarm == AlarmType::None as i32 || a.alarm == req.alarm)
                    .collect();
                AlarmResponse { header: None, alarms }
            }
            _ => {
                check_alarm_change(&req)?;
                self.write(req).await?
            }
        };
        Ok(AlarmResponse { header: None, ..resp })
    }

    /// The raised alarms, as this member applied them.
    pub fn alarms(&self) -> Vec<crate::proto::etcdserverpb::AlarmMember> {
        let state = self.state.read();
        state
            .alarms
            .iter()
            .map(|(member_id, alarm)| crate::proto::etcdserverpb::AlarmMember { member_id: *member_id, alarm: *alarm })
            .collect()
    }

    fn raised(&self, alarm: AlarmType, for_member: Option<u64>) -> bool {
        let state = self.state.read();
        state.alarms.iter().any(|(m, a)| *a == alarm as i32 && for_member.is_none_or(|id| id == *m))
    }

    /// Refuses a write that adds `cost` bytes while NOSPACE is raised, or
    /// when it would take the data to the quota, in which case it raises
    /// NOSPACE for this member first, as etcd's quota check does. Writes
    /// that add nothing (deletes, revokes, compaction) always pass.
    pub(super) async fn check_quota(&self, cost: u64) -> Result<(), Error> {
        if cost == 0 {
            return Ok(());
        }
        let (raised, in_use) = {
            let state = self.state.read();
            (state.alarms.iter().any(|(_, a)| *a == AlarmType::Nospace as i32), state.store.bytes_in_use())
        };
        if raised {
            return Err(Error::NoSpace);
        }
        let Some(quota) = self.space.quota_bytes else { return Ok(()) };
        if in_use.saturating_add(cost) < quota {
            return Ok(());
        }
        tracing::warn!(in_use, cost, quota, "a write would exceed --quota-backend-bytes: raising NOSPACE");
        self.raise(AlarmType::Nospace).await;
        Err(Error::NoSpace)
    }

    /// Raises `alarm` for this member; a failure is logged (the write that
    /// caused it is refused all the same, and the next one tries again).
    async fn raise(&self, alarm: AlarmType) {
        let req = AlarmRequest { action: AlarmAction::Activate as i32, member_id: self.id, alarm: alarm as i32 };
        if let Err(e) = self.write_as_member(req).await {
            tracing::warn!("could not raise the {} alarm: {e}", alarm.as_str_name());
        }
    }

    /// Raises NOSPACE for this member whenever its data dir's filesystem has
    /// less than `--quota-disk-free-bytes` free; ends when the member stops.
    pub async fn watch_disk(self: Arc<Self>) {
        if self.space.disk_free_bytes == 0 {
            return;
        }
        let mut tick = tokio::time::interval(DISK_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failed_once = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stopped() => return,
            }
            let free = match free_bytes(&self.space.data_dir) {
                Ok(free) => free,
                Err(e) => {
                    if !failed_once {
                        tracing::warn!(dir = %self.space.data_dir.display(), "cannot read the disk's free space: {e}");
                        failed_once = true;
                    }
                    continue;
                }
            };
            if free < self.space.disk_free_bytes && !self.raised(AlarmType::Nospace, Some(self.id)) {
                tracing::warn!(
                    free,
                    keep = self.space.disk_free_bytes,
                    "the data dir's disk is nearly full (--quota-disk-free-bytes): raising NOSPACE"
                );
                self.raise(AlarmType::Nospace).await;
            }
        }
    }
}

/// Bytes that an unprivileged process may still write on the filesystem
/// holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` is memory that
    // statvfs fills on success; it is read only then.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stat.assume_init()
    };
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::RequestOp;

    fn put(key: &str, value: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn costs_are_counted_as_etcd_counts_them() {
        let p = PutRequest { key: b"k".to_vec(), value: vec![0; 100], ..Default::default() };
        assert_eq!(put_cost(&p), 1 + 100 + 256);
        assert_eq!(put_cost(&PutRequest { lease: 7, ..p }), 1 + 100 + 256 + 64);
        let nested = TxnRequest { success: vec![put("a", "1"), put("b", "22")], ..Default::default() };
        let t = TxnRequest {
            success: vec![put("c", "333")],
            failure: vec![RequestOp { request: Some(request_op::Request::RequestTxn(nested)) }],
            ..Default::default()
        };
        assert_eq!(txn_cost(&t), (2 + 256) + (3 + 256));
        assert_eq!(txn_cost(&TxnRequest::default()), 0);
    }

    #[test]
    fn the_quota_flag_reads_as_etcd_reads_it() {
        assert_eq!(Space::quota_from_flag(0), Some(2 << 30));
        assert_eq!(Space::quota_from_flag(-1), None);
        assert_eq!(Space::quota_from_flag(4096), Some(4096));
    }

    #[test]
    fn only_activate_and_deactivate_of_known_alarms_are_proposed() {
        let req = |action: AlarmAction, alarm: i32| AlarmRequest { action: action as i32, member_id: 1, alarm };
        assert!(check_alarm_change(&req(AlarmAction::Activate, AlarmType::Nospace as i32)).is_ok());
        assert!(check_alarm_change(&req(AlarmAction::Deactivate, AlarmType::Corrupt as i32)).is_ok());
        assert_eq!(check_alarm_change(&req(AlarmAction::Get, 0)), Err(Error::UnknownAlarmAction(0)));
        assert_eq!(check_alarm_change(&req(AlarmAction::Activate, 9)), Err(Error::UnknownAlarmType(9)));
    }

    #[test]
    fn free_space_is_read_from_the_filesystem() {
        let dir = std::env::temp_dir();
        assert!(free_bytes(&dir).expect("statvfs") > 0);
        assert!(free_bytes(std::path::Path::new("/nonexistent/kvd")).is_err());
    }
}
