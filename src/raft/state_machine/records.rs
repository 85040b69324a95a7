//! The state tree's records: loading the state at start, copying every
//! record for a snapshot or a backup, and loading them back.

use std::collections::{BTreeMap, BTreeSet};

use openraft::StoredMembership;
use prost::Message;

use super::super::{decode, LogId, Node, NodeId};
use super::group::Group;
use super::view::State;
use super::{ALARMS, APPLIED, ATTRS, INSTALLING, MEMBERSHIP};
use crate::error::Error;
use crate::mvcc::keys::meta_key;
use crate::mvcc::MvccStore;
use crate::proto::kvdpb::MemberAttributes;

pub(super) type Records<'a> = Vec<(&'a [u8], &'a [u8])>;

pub(super) type Loaded = (State, Option<LogId>, StoredMembership<NodeId, Node>);

pub(super) fn load_state(tree: &sled::Tree) -> Result<Loaded, Error> {
    let read = |name: &str| tree.get(meta_key(name));
    let last_applied = match read(APPLIED)? {
        Some(v) => decode(&v)?,
        None => None,
    };
    let membership = match read(MEMBERSHIP)? {
        Some(v) => decode(&v)?,
        None => StoredMembership::default(),
    };
    let mut attrs = BTreeMap::new();
    for item in tree.scan_prefix([ATTRS]) {
        let (_, v) = item?;
        let a =
            MemberAttributes::decode(v.as_ref()).map_err(|e| Error::internal(format!("corrupt member record: {e}")))?;
        attrs.insert(a.id, a);
    }
    let mut alarms = BTreeSet::new();
    for item in tree.scan_prefix([ALARMS]) {
        let (k, _) = item?;
        alarms.insert(parse_alarm_key(&k).ok_or_else(|| Error::internal("corrupt alarm record"))?);
    }
    let store = MvccStore::open(tree.clone())?;
    let auth = crate::auth::AuthState::load(tree)?;
    let state = State { store, attrs, alarms, auth, tokens: Default::default(), unflushed: Group::default() };
    Ok((state, last_applied, membership))
}

/// Every record of the state tree, as snapshot data: the layout bincode
/// gives a `Vec<(ByteBuf, ByteBuf)>` (a count, then each key and value as a
/// length and its bytes; integers u64 little-endian), which members of
/// every kvd version read. Written straight from the tree, so that the
/// records are held once while a snapshot is built, not twice.
pub(super) fn copy_records(tree: &sled::Tree) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; 8];
    let mut count = 0u64;
    for item in tree.iter() {
        let (k, v) = item?;
        for part in [&k[..], &v[..]] {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
            out.extend_from_slice(part);
        }
        count += 1;
    }
    out[..8].copy_from_slice(&count.to_le_bytes());
    Ok(out)
}

/// Whether a record of the state tree belongs to the cluster that wrote it
/// rather than to its data: the last applied log id, the membership, the
/// members' published attributes and the alarms raised for them.
pub(super) fn is_cluster_record(key: &[u8]) -> bool {
    matches!(key.first(), Some(&ATTRS) | Some(&ALARMS)) || key == meta_key(APPLIED) || key == meta_key(MEMBERSHIP)
}

/// The record key of the alarm `alarm` of member `member`.
pub(super) fn alarm_key(member: NodeId, alarm: i32) -> Vec<u8> {
    let mut key = vec![ALARMS];
    key.extend_from_slice(&member.to_be_bytes());
    key.extend_from_slice(&alarm.to_be_bytes());
    key
}

fn parse_alarm_key(key: &[u8]) -> Option<(NodeId, i32)> {
    let member: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    let alarm: [u8; 4] = key.get(9..13)?.try_into().ok()?;
    (key.len() == 13).then(|| (NodeId::from_be_bytes(member), i32::from_be_bytes(alarm)))
}

/// Writes the data records of `records` (snapshot data, as [`Shared::backup`]
/// copies it) into the state tree of `db`, a new data directory's, and
/// flushes it. The records of the cluster it came from are left out, so a
/// member started on the directory with `--initial-cluster-state new` forms
/// a new cluster that holds the data: its first revision is the next one.
pub fn load_backup(db: &sled::Db, records: &[u8]) -> Result<(), Error> {
    let records: Records = decode(records)?;
    let tree = db.open_tree("state")?;
    if !tree.is_empty() {
        return Err(Error::internal("the state tree is not empty"));
    }
    insert_in_batches(&tree, records.into_iter().filter(|(k, _)| !is_cluster_record(k)))?;
    db.flush()?;
    Ok(())
}

/// Records written to sled in one batch while a snapshot is loaded: a
/// batch holds a copy of what it writes, so a whole snapshot in one would
/// hold the data once more.
pub(super) const LOAD_BATCH_BYTES: usize = 16 << 20;

/// Replaces the state tree with `records`, marking the install in progress so
/// that a crash midway is finished at the next start.
pub(super) fn load_records(db: &sled::Db, tree: &sled::Tree, records: &Records<'_>) -> Result<(), Error> {
    db.insert(INSTALLING, &[1u8])?;
    db.flush()?;
    tree.clear()?;
    insert_in_batches(tree, records.iter().copied())?;
    db.flush()?;
    db.remove(INSTALLING)?;
    db.flush()?;
    Ok(())
}

/// Inserts `records` into `tree`, [`LOAD_BATCH_BYTES`] at a time.
pub(super) fn insert_in_batches<'a>(
    tree: &sled::Tree,
    records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<(), Error> {
    let mut batch = sled::Batch::default();
    let mut bytes = 0;
    for (k, v) in records {
        batch.insert(k, v);
        bytes += k.len() + v.len();
        if bytes >= LOAD_BATCH_BYTES {
            tree.apply_batch(std::mem::take(&mut batch))?;
            bytes = 0;
        }
    }
    tree.apply_batch(batch)?;
    Ok(())
}
