//! A write in progress at one revision: puts, deletes and lease revocations,
//! and the batch and events they come to.

use super::keys::{self, RangeEnd};
use super::{Batch, Meta, MvccStore};
use crate::error::Result;
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};

/// A write in progress at one revision. Reads through it see its own changes.
pub struct Writer<'a> {
    pub(super) store: &'a mut MvccStore,
    pub(super) batch: Batch,
    pub(super) rev: i64,
    pub(super) sub: u32,
    pub(super) events: Vec<Event>,
}

impl Writer<'_> {
    /// The store as this write sees it.
    pub fn store(&self) -> &MvccStore {
        self.store
    }

    /// The revision reads through this write see: the new revision once
    /// something changed, the old one before.
    pub fn view_revision(&self) -> i64 {
        if self.sub > 0 {
            self.rev
        } else {
            self.rev - 1
        }
    }

    /// The revision this write commits at.
    pub fn revision(&self) -> i64 {
        self.rev
    }

    /// Puts `key`; returns the index entry of the previous version. `lease`,
    /// if not 0, must be granted. Its event carries no previous key-value:
    /// a watch that asks for one reads it from history
    /// ([`MvccStore::prev_version`]).
    pub fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Option<Meta> {
        // One walk of the index for a key that is live, the common case: the
        // entry is changed where it is.
        let rev = self.rev;
        let (prev, meta) = match self.store.index.get_mut(key) {
            Some(entry) => {
                let prev = *entry;
                *entry = Meta { mod_revision: rev, version: prev.version + 1, lease, ..prev };
                (Some(prev), *entry)
            }
            None => {
                let meta = Meta { create_revision: rev, mod_revision: rev, version: 1, lease };
                self.store.index.insert(super::IndexKey::from_slice(key), meta);
                (None, meta)
            }
        };
        let old_lease = prev.as_ref().map_or(0, |p| p.lease);
        if old_lease != lease {
            self.detach(old_lease, key);
            if let Some(l) = self.store.leases.get_mut(&lease) {
                l.keys.insert(key.to_vec());
            }
        }
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: meta.create_revision,
            mod_revision: rev,
            version: meta.version,
            value,
            lease,
        };
        self.record(kv.clone());
        self.events.push(Event { r#type: EventType::Put as i32, kv: Some(kv), prev_kv: None });
        prev
    }

    /// Deletes every live key in `[key, end)`; returns how many, and, if
    /// `load` is set, the deleted versions. Like a put's, the events carry
    /// no previous key-value.
    pub fn delete_range(&mut self, key: &[u8], end: &RangeEnd, load: bool) -> Result<(usize, Vec<KeyValue>)> {
        let doomed: Vec<(Vec<u8>, Meta)> = self.store.current(key, end).map(|(k, m)| (k.to_vec(), *m)).collect();
        let loaded = match load {
            true => doomed.iter().map(|(k, m)| self.store.load(k, m)).collect::<Result<Vec<_>>>()?,
            false => Vec::new(),
        };
        self.delete(&doomed);
        Ok((doomed.len(), loaded))
    }

    fn delete(&mut self, doomed: &[(Vec<u8>, Meta)]) {
        for (k, prev) in doomed {
            let tomb = KeyValue { key: k.clone(), mod_revision: self.rev, ..Default::default() };
            self.record(tomb.clone());
            self.detach(prev.lease, k);
            self.store.index.remove(k.as_slice());
            self.events.push(Event { r#type: EventType::Delete as i32, kv: Some(tomb), prev_kv: None });
        }
    }

    /// Revokes lease `id`: deletes its keys at this revision and forgets it.
    /// Returns false if there is no such lease.
    pub fn revoke_lease(&mut self, id: i64) -> bool {
        let Some(lease) = self.store.leases.get(&id) else { return false };
        let doomed: Vec<(Vec<u8>, Meta)> =
            lease.keys.iter().filter_map(|k| self.store.index.get(k.as_slice()).map(|m| (k.clone(), *m))).collect();
        self.delete(&doomed);
        self.store.leases.remove(&id);
        self.store.lease_log.record(id);
        self.store.in_use = self.store.in_use.saturating_sub(super::LEASE_RECORD_BYTES);
        self.batch.remove(keys::lease_key(id));
        true
    }

    fn detach(&mut self, lease: i64, key: &[u8]) {
        if lease != 0 {
            if let Some(l) = self.store.leases.get_mut(&lease) {
                l.keys.remove(key);
            }
        }
    }

    /// Writes a version to history, and keeps it among the pending ones
    /// until the state machine commits.
    fn record(&mut self, kv: KeyValue) {
        let rec = keys::hist_key(&kv.key, self.rev);
        self.store.in_use += self.batch.insert_version(rec.clone(), &kv);
        self.store.run.push(self.rev, self.sub, &kv.key);
        self.store.pending.insert(rec, kv);
        self.sub += 1;
    }

    /// Finishes the write: returns the sled batch to commit and the events it
    /// produced (empty if nothing changed, and then the revision stays).
    pub fn finish(self) -> (Batch, Vec<Event>) {
        let mut batch = self.batch;
        if self.sub > 0 {
            self.store.revision = self.rev;
            batch.insert(keys::meta_key("revision"), self.rev.to_be_bytes());
        }
        (batch, self.events)
    }
}
