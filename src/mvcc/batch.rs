//! Writes to the store's sled tree, gathered so that the writes of many
//! applied entries can be committed to sled at once (one `apply_batch` per
//! group of entries instead of one per entry).

/// Inserts and removals in order; a later write to a key wins.
#[derive(Debug, Default)]
pub struct Batch {
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.writes.push((key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.writes.push((key.as_ref().to_vec(), None));
    }

    /// Adds `other`'s writes after these.
    pub fn append(&mut self, other: Batch) {
        self.writes.extend(other.writes);
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether it writes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The sled batch that makes these writes atomically.
    pub fn into_sled(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (key, value) in self.writes {
            match value {
                Some(v) => batch.insert(key, v),
                None => batch.remove(key),
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_write_to_a_key_wins() {
        let tree = sled::Config::new().temporary(true).open().unwrap().open_tree("t").unwrap();
        let mut a = Batch::default();
        a.insert(b"k", b"1");
        a.insert(b"gone", b"x");
        let mut b = Batch::default();
        b.insert(b"k", b"2");
        b.remove(b"gone");
        a.append(b);
        tree.apply_batch(a.into_sled()).unwrap();
        assert_eq!(tree.get(b"k").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(tree.get(b"gone").unwrap(), None);
    }
}
