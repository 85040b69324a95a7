//! The state tree's records: loading the state at start, copying every
//! record for a snapshot or a backup, and loading them back.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};

use openraft::StoredMembership;
use prost::Message;

use super::super::{decode, LogId, Node, NodeId};
use super::group::Group;
use super::view::State;
use super::{ALARMS, APPLIED, ATTRS, MEMBERSHIP};
use crate::error::Error;
use crate::mvcc::keys::meta_key;
use crate::mvcc::{MvccStore, Rebuild};
use crate::proto::kvdpb::MemberAttributes;

pub(super) type Loaded = (State, Option<LogId>, StoredMembership<NodeId, Node>);

/// Loads the state kept in `tree`. With `rebuilt`, the store's in-memory
/// part comes from the records just loaded into `tree` (see
/// [`load_records`]) instead of a pass over the tree.
pub(super) fn load_state(tree: &sled::Tree, rebuilt: Option<Rebuild>) -> Result<Loaded, Error> {
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
    let store = match rebuilt {
        Some(rebuild) => MvccStore::open_rebuilt(tree.clone(), rebuild)?,
        None => MvccStore::open(tree.clone())?,
    };
    let auth = crate::auth::AuthState::load(tree)?;
    let state = State { store, attrs, alarms, auth, tokens: Default::default(), unflushed: Group::default() };
    Ok((state, last_applied, membership))
}

/// Writes every record of the state tree to `out`, from where it stands,
/// as snapshot data: the layout bincode gives a `Vec<(ByteBuf, ByteBuf)>`
/// (a count, then each key and value as a length and its bytes; integers
/// u64 little-endian), which members of every kvd version read. One record
/// at a time, straight from the tree: nothing proportional to the data is
/// held. Returns the data's length in bytes.
pub(super) fn write_records<W: Write + Seek>(tree: &sled::Tree, out: &mut W) -> Result<u64, Error> {
    let io = |e: std::io::Error| Error::internal(format!("write snapshot data: {e}"));
    let start = out.stream_position().map_err(io)?;
    out.write_all(&0u64.to_le_bytes()).map_err(io)?;
    let (mut count, mut len) = (0u64, 8u64);
    for item in tree.iter() {
        let (k, v) = item?;
        for part in [&k[..], &v[..]] {
            out.write_all(&(part.len() as u64).to_le_bytes()).map_err(io)?;
            out.write_all(part).map_err(io)?;
            len += 8 + part.len() as u64;
        }
        count += 1;
    }
    out.seek(SeekFrom::Start(start)).map_err(io)?;
    out.write_all(&count.to_le_bytes()).map_err(io)?;
    out.seek(SeekFrom::Start(start + len)).map_err(io)?;
    Ok(len)
}

/// Reads `len` bytes of snapshot data from `from` and hands each record to
/// `each`, one at a time: only one record is ever in memory. The data must
/// be exactly as [`write_records`] lays it out, no byte more or less; a
/// length is checked against what is left before anything is allocated for
/// it. Returns the number of records.
pub(super) fn for_each_record(
    from: impl Read,
    len: u64,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
) -> Result<u64, Error> {
    let damaged = |why: String| Error::internal(format!("damaged snapshot data: {why}"));
    let mut r = BufReader::with_capacity(1 << 20, from.take(len));
    let mut left = len;
    let read_u64 = |r: &mut BufReader<_>, left: &mut u64| -> Result<u64, Error> {
        let mut n = [0u8; 8];
        r.read_exact(&mut n).map_err(|e| damaged(format!("{e} ({left} bytes were left)")))?;
        *left -= 8;
        Ok(u64::from_le_bytes(n))
    };
    let count = read_u64(&mut r, &mut left)?;
    let (mut key, mut value) = (Vec::new(), Vec::new());
    for _ in 0..count {
        for part in [&mut key, &mut value] {
            let n = read_u64(&mut r, &mut left)?;
            if n > left {
                return Err(damaged(format!("a record of {n} bytes where {left} are left")));
            }
            part.resize(n as usize, 0);
            r.read_exact(part).map_err(|e| damaged(e.to_string()))?;
            left -= n;
        }
        each(&key, &value)?;
    }
    if left != 0 {
        return Err(damaged(format!("{left} bytes after the last of {count} records")));
    }
    Ok(count)
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

/// Writes the data records of snapshot data (`len` bytes of `records`,
/// as [`Shared::backup`] writes them) into the state tree of `db`, a new
/// data directory's, and flushes it. The records of the cluster it came
/// from are left out, so a member started on the directory with
/// `--initial-cluster-state new` forms a new cluster that holds the data:
/// its first revision is the next one.
pub fn load_backup(db: &sled::Db, records: impl Read, len: u64) -> Result<(), Error> {
    let tree = db.open_tree("state")?;
    if !tree.is_empty() {
        return Err(Error::internal("the state tree is not empty"));
    }
    let mut batch = Batches::new(&tree);
    for_each_record(records, len, |k, v| if is_cluster_record(k) { Ok(()) } else { batch.insert(k, v) })?;
    batch.finish()?;
    db.flush()?;
    Ok(())
}

/// Records written to sled in one batch while a snapshot is loaded. sled
/// keeps memory in proportion to the batches it is given: loading 100 MB
/// of 1 KiB values left a process at 28 MB resident with batches of
/// 256 KiB, 40 MB with 1 MiB, 63 MB with 2 MiB and 140 MB with 4 MiB.
pub(super) const LOAD_BATCH_BYTES: usize = 256 << 10;

/// Writes the records of snapshot data (`len` bytes of `records`) into
/// `tree`, an empty one, and flushes them. Returns what the records say of
/// the store's in-memory part, for [`load_state`].
pub(super) fn load_records(db: &sled::Db, tree: &sled::Tree, records: impl Read, len: u64) -> Result<Rebuild, Error> {
    let mut batch = Batches::new(tree);
    let mut rebuild = Rebuild::default();
    for_each_record(records, len, |k, v| {
        rebuild.record(k, v)?;
        batch.insert(k, v)
    })?;
    batch.finish()?;
    db.flush()?;
    Ok(rebuild)
}

/// Inserts records into a tree, [`LOAD_BATCH_BYTES`] at a time.
pub(super) struct Batches<'t> {
    tree: &'t sled::Tree,
    batch: sled::Batch,
    bytes: usize,
}

impl<'t> Batches<'t> {
    pub(super) fn new(tree: &'t sled::Tree) -> Self {
        Batches { tree, batch: sled::Batch::default(), bytes: 0 }
    }

    pub(super) fn insert(&mut self, k: &[u8], v: &[u8]) -> Result<(), Error> {
        self.batch.insert(k, v);
        self.bytes += k.len() + v.len();
        if self.bytes >= LOAD_BATCH_BYTES {
            self.tree.apply_batch(std::mem::take(&mut self.batch))?;
            self.bytes = 0;
        }
        Ok(())
    }

    pub(super) fn finish(self) -> Result<(), Error> {
        self.tree.apply_batch(self.batch)?;
        Ok(())
    }
}
