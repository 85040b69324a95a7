//! A chunk of a snapshot on the wire: openraft's `InstallSnapshotRequest`,
//! with its data read and written as one byte string.
//!
//! openraft's struct derives serde with `data: Vec<u8>`, which serde treats
//! as a sequence: bincode then writes and reads the 1 MiB of every chunk one
//! byte at a time. On a member catching up by snapshot, decoding the chunks
//! so was 8% of its CPU (`perf record`, 300,000 keys of 1 KiB), and it runs
//! between receiving one chunk and asking for the next. A sequence of bytes
//! and a byte string have the same bincode layout (a u64 length, then the
//! bytes), so these mirror types read and write exactly what openraft's
//! struct does, and members of every kvd version understand each other.

use openraft::raft::InstallSnapshotRequest;
use openraft::{SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use super::{decode, encode, CodecError, Node, NodeId, TypeConfig};

/// The fields of `InstallSnapshotRequest`, in its order, borrowed.
#[derive(Serialize)]
struct ChunkOut<'a> {
    vote: &'a Vote<NodeId>,
    meta: &'a SnapshotMeta<NodeId, Node>,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
    done: bool,
}

/// The fields of `InstallSnapshotRequest`, in its order.
#[derive(Deserialize)]
struct ChunkIn {
    vote: Vote<NodeId>,
    meta: SnapshotMeta<NodeId, Node>,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    done: bool,
}

/// Encodes `req` as `encode` would, its data in one copy.
pub fn encode_chunk(req: &InstallSnapshotRequest<TypeConfig>) -> Result<Vec<u8>, CodecError> {
    encode(&ChunkOut { vote: &req.vote, meta: &req.meta, offset: req.offset, data: &req.data, done: req.done })
}

/// Decodes what [`encode_chunk`] (or `encode` of the request) wrote.
pub fn decode_chunk(bytes: &[u8]) -> Result<InstallSnapshotRequest<TypeConfig>, CodecError> {
    let ChunkIn { vote, meta, offset, data, done } = decode(bytes)?;
    Ok(InstallSnapshotRequest { vote, meta, offset, data, done })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership};

    use super::*;

    fn chunk(data: Vec<u8>, done: bool) -> InstallSnapshotRequest<TypeConfig> {
        let nodes: BTreeMap<NodeId, Node> =
            [(1, Node::new("http://127.0.0.1:2380")), (7, Node::new("http://[::1]:2380"))].into();
        let membership = Membership::new(vec![[1u64, 7].into()], nodes);
        let log_id = LogId::new(CommittedLeaderId::new(3, 1), 4_321);
        InstallSnapshotRequest {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(log_id),
                last_membership: StoredMembership::new(Some(log_id), membership),
                snapshot_id: "3-4321-abc".into(),
            },
            offset: 5 << 20,
            data,
            done,
        }
    }

    #[test]
    fn a_chunk_is_laid_out_as_openraft_s_request_both_ways() {
        for (data, done) in [(Vec::new(), true), ((0..=255u8).cycle().take(70_001).collect(), false)] {
            let req = chunk(data, done);
            let ours = encode_chunk(&req).expect("encode");
            let theirs = encode(&req).expect("encode");
            assert_eq!(ours, theirs, "the same bytes as openraft's struct gives");
            assert_eq!(decode_chunk(&theirs).expect("decode"), req);
            let back: InstallSnapshotRequest<TypeConfig> = decode(&ours).expect("decode");
            assert_eq!(back, req);
        }
    }

    #[test]
    fn a_chunk_cut_short_or_claiming_more_bytes_than_it_has_is_refused() {
        let bytes = encode_chunk(&chunk(vec![9; 1000], false)).expect("encode");
        for cut in [0, 10, bytes.len() - 500, bytes.len() - 1] {
            assert!(decode_chunk(&bytes[..cut]).is_err(), "{cut} bytes of {}", bytes.len());
        }
        // The data's length, just before its bytes, claiming far more.
        let at = bytes.len() - 1 - 1000 - 8;
        let mut lying = bytes.clone();
        lying[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_chunk(&lying).is_err());
    }
}
