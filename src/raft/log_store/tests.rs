use super::*;
use openraft::{CommittedLeaderId, EntryPayload};

fn entry(term: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(super::super::Request(vec![index as u8; 10])),
    }
}

/// The bytes of records in the active segment.
fn records_len(store: &LogStore) -> u64 {
    store.shared.lock().active().map_or(0, |(_, seg)| seg.len)
}

fn indexes(store: &LogStore) -> Vec<u64> {
    store.read(0, None, None).unwrap().iter().map(|e| e.log_id.index).collect()
}

#[test]
fn reopens_with_the_same_entries_after_truncate_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.write_entries((1..=10).map(|i| entry(1, i))).unwrap();
    store.truncate_from(8).unwrap();
    store.write_entries((8..=12).map(|i| entry(2, i))).unwrap();
    store.purge_to(entry(1, 3).log_id).unwrap();
    assert_eq!(indexes(&store), (4..=12).collect::<Vec<_>>());
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&store), (4..=12).collect::<Vec<_>>());
    assert_eq!(store.read(8, Some(9), None).unwrap()[0].log_id.leader_id.term, 2);
    assert_eq!(store.shared.lock().purged.map(|p| p.index), Some(3));
}

#[test]
fn a_torn_tail_is_cut_off_and_damage_elsewhere_refuses_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.write_entries((0..5).map(|i| entry(1, i))).unwrap();
    let full = records_len(&store);
    drop(store);
    let seg = dir.path().join(segment_name(0));
    // A torn last record: the log reopens with the first four entries.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(full - 3).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&store), vec![0, 1, 2, 3]);
    drop(store);
    // A flipped bit in a record that is followed by a later segment.
    std::fs::write(dir.path().join(segment_name(4)), b"").unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[12] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let err = LogStore::open(dir.path()).err().expect("a damaged log must not open");
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[test]
fn damage_before_whole_records_of_the_last_segment_refuses_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.write_entries((0..50).map(|i| entry(1, i))).unwrap();
    let records = records_len(&store) as usize;
    drop(store);
    let seg = dir.path().join(segment_name(0));
    let clean = std::fs::read(&seg).unwrap();
    // A flipped byte in a payload, and one in a length field, each with
    // whole records after it: neither is a torn write.
    for at in [records / 3, 0] {
        let mut bytes = clean.clone();
        bytes[at] ^= 0x5a;
        std::fs::write(&seg, &bytes).unwrap();
        let err = LogStore::open(dir.path()).err().expect("damage before whole records must refuse the start");
        assert!(err.to_string().contains("damaged"), "{err}");
    }
    // The same log undamaged still opens with all of its entries.
    std::fs::write(&seg, &clean).unwrap();
    assert_eq!(indexes(&LogStore::open(dir.path()).unwrap()).len(), 50);
}

#[test]
fn the_zeros_allocated_ahead_end_the_records_and_a_torn_record_before_them_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.write_entries((0..5).map(|i| entry(1, i))).unwrap();
    let records = records_len(&store);
    drop(store);
    let seg = dir.path().join(segment_name(0));
    assert!(std::fs::metadata(&seg).unwrap().len() >= records + PREALLOC_BYTES, "allocated ahead");
    // Reopened, the log goes on after its last record, not after the zeros.
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(records_len(&store), records);
    assert!(std::fs::metadata(&seg).unwrap().len() >= records + PREALLOC_BYTES, "the zeros are not a torn write");
    store.write_entries((5..8).map(|i| entry(1, i))).unwrap();
    let records = records_len(&store);
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&store), (0..8).collect::<Vec<_>>());
    drop(store);
    // A crash that wrote the last record's header but not all of its
    // payload leaves zeros in its place: that record is cut off.
    let mut bytes = std::fs::read(&seg).unwrap();
    let last_payload_end = records as usize;
    bytes[last_payload_end - 4..last_payload_end].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&store), (0..7).collect::<Vec<_>>());
    store.write_entries([entry(2, 7)]).unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&store), (0..8).collect::<Vec<_>>());
    assert_eq!(store.read(7, Some(8), None).unwrap()[0].log_id.leader_id.term, 2);
}

#[test]
fn a_full_segment_is_trimmed_to_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let big = |i: u64| Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
        payload: EntryPayload::Normal(super::super::Request(vec![i as u8; 1 << 20])),
    };
    let count = SEGMENT_BYTES / (1 << 20) + 2;
    for i in 0..count {
        store.write_entries([big(i)]).unwrap();
    }
    let (first, second) = {
        let inner = store.shared.lock();
        let segs: Vec<(u64, u64, u64)> = inner.segments.iter().map(|(k, s)| (*k, s.len, s.allocated)).collect();
        assert_eq!(segs.len(), 2, "{segs:?}");
        (segs[0], segs[1])
    };
    assert_eq!(first.1, first.2, "the full segment keeps no zeros");
    assert_eq!(std::fs::metadata(dir.path().join(segment_name(first.0))).unwrap().len(), first.1);
    assert!(second.2 > second.1, "the active segment is allocated ahead: {second:?}");
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&store), (0..count).collect::<Vec<_>>());
}

#[test]
fn purging_past_the_end_starts_a_fresh_segment() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.write_entries((0..3).map(|i| entry(1, i))).unwrap();
    store.purge_to(entry(1, 100).log_id).unwrap();
    store.write_entries((101..104).map(|i| entry(1, i))).unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&store), vec![101, 102, 103]);
}

#[tokio::test]
async fn what_one_append_entries_carries_is_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    // Entries of a quarter of the share: three fit in a message (the
    // fourth's record would pass it), and the rest wait for the next one.
    let quarter = (REPLICATION_BATCH_BYTES / 4) as usize;
    let sized = |index: u64, len: usize| Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(super::super::Request(vec![7u8; len])),
    };
    store.write_entries((1..=10).map(|i| sized(i, quarter))).unwrap();
    let first = store.limited_get_log_entries(1, 11).await.unwrap();
    let got: Vec<u64> = first.iter().map(|e| e.log_id.index).collect();
    assert_eq!(got, vec![1, 2, 3]);
    let bytes: u64 = first.iter().map(|e| encode(e).unwrap().len() as u64 + HEADER_BYTES).sum();
    assert!(bytes <= REPLICATION_BATCH_BYTES, "{bytes} bytes");
    // It goes on from where the last ended, to the end of the range.
    assert_eq!(store.limited_get_log_entries(9, 11).await.unwrap().len(), 2);
    // One entry larger than the share still goes, alone.
    store.write_entries([sized(11, 5 * REPLICATION_BATCH_BYTES as usize)]).unwrap();
    let alone = store.limited_get_log_entries(11, 12).await.unwrap();
    assert_eq!(alone.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![11]);
    assert_eq!(store.limited_get_log_entries(10, 12).await.unwrap().len(), 1);
    // The reader of a whole range is not bounded.
    assert_eq!(store.try_get_log_entries(1..12).await.unwrap().len(), 11);
}

#[tokio::test]
async fn an_append_waits_while_more_than_the_backlog_of_committed_entries_waits_to_be_applied() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    // Entries of just under 1 MiB, record and all.
    let mib = |index: u64| Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(super::super::Request(vec![3u8; (1 << 20) - 1024])),
    };
    // Not paced yet: nothing waits.
    store.write_entries((1..=8).map(mib)).unwrap();
    store.save_committed(Some(mib(8).log_id)).await.unwrap();
    let soon = Duration::from_secs(10);
    tokio::time::timeout(soon, store.let_applying_catch_up()).await.expect("an unpaced append waits for nothing");

    let (applied, rx) = watch::channel(0u64);
    store.pace_by(rx, Duration::from_secs(600));
    // Eight such entries committed, none applied: the append waits.
    let brief = Duration::from_millis(300);
    assert!(tokio::time::timeout(brief, store.let_applying_catch_up()).await.is_err(), "8 MiB wait to be applied");
    // Five left (5 MiB) are still more than the backlog; four are not.
    applied.send_replace(3);
    assert!(tokio::time::timeout(brief, store.let_applying_catch_up()).await.is_err(), "5 MiB wait to be applied");
    let mut waiting = store.clone();
    let append = tokio::spawn(async move { waiting.let_applying_catch_up().await });
    applied.send_replace(4);
    tokio::time::timeout(soon, append).await.expect("4 MiB left: the append goes on").unwrap();
    // Entries appended but not committed never hold an append back.
    applied.send_replace(8);
    store.write_entries((9..=16).map(mib)).unwrap();
    tokio::time::timeout(soon, store.let_applying_catch_up()).await.expect("nothing committed waits");

    // A state machine that does not apply holds an append back for at most
    // the time given.
    store.save_committed(Some(mib(16).log_id)).await.unwrap();
    let (_stuck, rx) = watch::channel(8u64);
    store.pace_by(rx, Duration::from_millis(50));
    let start = std::time::Instant::now();
    tokio::time::timeout(soon, store.let_applying_catch_up()).await.expect("the wait is bounded");
    assert!(start.elapsed() >= Duration::from_millis(50), "{:?}", start.elapsed());
    // Nor does a state machine that is gone.
    let (gone, rx) = watch::channel(8u64);
    store.pace_by(rx, Duration::from_secs(600));
    drop(gone);
    tokio::time::timeout(soon, store.let_applying_catch_up()).await.expect("no state machine to wait for");
}

#[test]
fn the_purge_point_keeps_at_most_so_many_entries_and_bytes_of_those_a_snapshot_covers() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.write_entries((1..=10).map(|i| entry(1, i))).unwrap();
    // Every record is the same size here.
    let rec = records_len(&store) / 10;
    assert_eq!(store.purge_point(10, 100, u64::MAX), None, "ten entries are within both bounds");
    assert_eq!(store.purge_point(10, 4, u64::MAX), Some(6), "keeps 7..=10");
    assert_eq!(store.purge_point(10, 100, 3 * rec), Some(7), "keeps 8..=10");
    assert_eq!(store.purge_point(10, 100, 3 * rec - 1), Some(8), "keeps 9..=10");
    // Only entries up to the snapshot's count; later ones always stay.
    assert_eq!(store.purge_point(8, 100, 3 * rec), Some(5), "keeps 6..=8, and 9 and 10");
    assert_eq!(store.purge_point(8, 2, u64::MAX), Some(6), "keeps 7 and 8, and 9 and 10");
    store.purge_to(entry(1, 5).log_id).unwrap();
    assert_eq!(store.purge_point(10, 100, 5 * rec), None, "what is left is within both bounds");
    assert_eq!(store.purge_point(10, 3, u64::MAX), Some(7));
}
