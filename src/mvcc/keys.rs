//! How the MVCC store lays its records out in one sled tree.
//!
//! Every record of the state machine lives in one tree, so that one sled batch
//! writes a log entry's effects and the applied log id atomically. The first
//! byte says what a record is:
//!
//! - `h` + escaped key + revision: one version of a key (its history). The
//!   escaping keeps byte order, so all versions of a key sit together, sorted
//!   by revision, and key ranges map to tree ranges.
//! - `p` + revision + part: history records packed together, the versions
//!   one commit wrote (see [`super::packs`]); read as the `h` records they
//!   stand for.
//! - `s` + revision + sub-index: a run of changes in revision order, each
//!   with the key it wrote, so that a watch can replay history by revision
//!   (see [`super::changes`]).
//! - `m` + name: store metadata (revision, compacted revision, raft state).
//! - `l` + lease id: a granted lease and its TTL. The keys attached to a lease
//!   are not stored twice: they are the live keys whose `lease` names it.

/// Prefix of history records.
pub const HIST: u8 = b'h';
/// Prefix of metadata records.
pub const META: u8 = b'm';
/// Prefix of lease records.
pub const LEASE: u8 = b'l';

/// The record key of lease `id`.
pub fn lease_key(id: i64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = LEASE;
    out[1..].copy_from_slice(&id.to_be_bytes());
    out
}

/// Escapes `key` so that byte order of escaped keys equals byte order of the
/// keys, and no escaped key is a prefix of another: `0x00` becomes
/// `0x00 0xFF`, and the key ends with `0x00 0x01`.
pub fn escape(key: &[u8], out: &mut Vec<u8>) {
    for &b in key {
        if b == 0 {
            out.extend_from_slice(&[0, 0xFF]);
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// Undoes [`escape`] on the start of `buf`; returns the key and the rest of
/// `buf`, or `None` if `buf` is not an escaped key.
pub fn unescape(buf: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut key = Vec::with_capacity(buf.len());
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == 0 {
            match buf.get(i + 1)? {
                0xFF => key.push(0),
                1 => return Some((key, &buf[i + 2..])),
                _ => return None,
            }
            i += 2;
        } else {
            key.push(buf[i]);
            i += 1;
        }
    }
    None
}

/// A record key ordered by revision: `prefix`, the revision and a sub-index
/// or part number, big-endian (runs of revision order, packs of history).
pub fn rev_key(prefix: u8, rev: i64, sub: u32) -> [u8; 13] {
    let mut out = [0u8; 13];
    out[0] = prefix;
    out[1..9].copy_from_slice(&(rev as u64).to_be_bytes());
    out[9..].copy_from_slice(&sub.to_be_bytes());
    out
}

/// The revision and sub-index of a key [`rev_key`] made; `None` if it is
/// not 13 bytes long.
pub fn parse_rev_key(key: &[u8]) -> Option<(i64, u32)> {
    if key.len() != 13 {
        return None;
    }
    let rev: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    let sub: [u8; 4] = key.get(9..13)?.try_into().ok()?;
    Some((u64::from_be_bytes(rev) as i64, u32::from_be_bytes(sub)))
}

/// The revision a history record key ends with.
pub fn hist_rev(rec: &[u8]) -> Option<i64> {
    let tail: [u8; 8] = rec.get(rec.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail) as i64)
}

/// The history record key of `key` at revision `rev`.
pub fn hist_key(key: &[u8], rev: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 12);
    out.push(HIST);
    escape(key, &mut out);
    out.extend_from_slice(&(rev as u64).to_be_bytes());
    out
}

/// The start of all history records of `key`.
pub fn hist_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 4);
    out.push(HIST);
    escape(key, &mut out);
    out
}

/// The end (exclusive) of the history records of `key`: its prefix, with
/// the terminator's last byte one higher.
pub fn hist_prefix_end(key: &[u8]) -> Vec<u8> {
    let mut out = hist_prefix(key);
    if let Some(last) = out.last_mut() {
        *last += 1;
    }
    out
}

/// Splits a history record key into the key and the revision.
pub fn parse_hist_key(rec: &[u8]) -> Option<(Vec<u8>, i64)> {
    let rest = rec.strip_prefix(&[HIST])?;
    let (key, rev) = unescape(rest)?;
    let rev: [u8; 8] = rev.try_into().ok()?;
    Some((key, u64::from_be_bytes(rev) as i64))
}

/// A metadata record key.
pub fn meta_key(name: &str) -> Vec<u8> {
    let mut out = vec![META];
    out.extend_from_slice(name.as_bytes());
    out
}

/// The end of a key range, as etcd reads `range_end`: empty means the single
/// key, `"\0"` means every key from `key` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeEnd {
    /// Only the key itself.
    Single,
    /// Keys in `[key, end)`.
    Before(Vec<u8>),
    /// Every key `>= key`.
    Unbounded,
}

impl RangeEnd {
    /// Interprets a request's `range_end`.
    pub fn from_request(range_end: &[u8]) -> Self {
        match range_end {
            [] => RangeEnd::Single,
            [0] => RangeEnd::Unbounded,
            end => RangeEnd::Before(end.to_vec()),
        }
    }

    /// Whether `k` lies in the range that starts at `key`.
    pub fn contains(&self, key: &[u8], k: &[u8]) -> bool {
        match self {
            RangeEnd::Single => k == key,
            RangeEnd::Before(end) => k >= key && k < end.as_slice(),
            RangeEnd::Unbounded => k >= key,
        }
    }
}

/// The smallest key greater than every key with `prefix`, as etcd's
/// `GetPrefixRangeEnd`: `"\0"` (all keys) when no such key exists.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_order_and_round_trips() {
        let keys: Vec<&[u8]> =
            vec![b"", b"\0", b"\0\0", b"\0\x01", b"a", b"a\0", b"a\0b", b"ab", b"b", b"\xff", b"\xff\0"];
        let mut encoded: Vec<Vec<u8>> = keys.iter().map(|k| hist_key(k, 7)).collect();
        for (k, e) in keys.iter().zip(&encoded) {
            assert_eq!(parse_hist_key(e), Some((k.to_vec(), 7)));
        }
        let before = encoded.clone();
        encoded.sort();
        assert_eq!(before, encoded, "escaped keys must sort like the keys");
    }

    #[test]
    fn history_of_a_key_sorts_by_revision_before_longer_keys() {
        assert!(hist_key(b"a", u32::MAX as i64) < hist_key(b"a\0", 1));
        assert!(hist_key(b"a", 2) < hist_key(b"a", 10));
    }

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"a"), b"b".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
