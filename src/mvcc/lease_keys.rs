//! The live keys attached to a lease.
//!
//! Most leases hold one key: a service's registration, a leader's claim, a
//! lock. A B-tree set keeps even one key in a node of eleven slots, 320
//! bytes with kvd's allocator: a lease of one key cost the store 400-424
//! bytes that way, against 98-126 for the key's entry in the index. A lone
//! key is kept as it is, and a set made only once a second key comes: the
//! lease then costs 96-122 bytes (`tests/index_bytes.rs`).

use std::collections::BTreeSet;

/// A set of keys, in key order.
#[derive(Debug, Clone, Default)]
pub struct LeaseKeys(Repr);

#[derive(Debug, Clone, Default)]
enum Repr {
    #[default]
    Empty,
    One(Vec<u8>),
    /// Two keys or more.
    Many(BTreeSet<Vec<u8>>),
}

/// The keys of a [`LeaseKeys`], in key order.
pub type Iter<'a> = std::iter::Chain<
    std::option::IntoIter<&'a Vec<u8>>,
    std::iter::Flatten<std::option::IntoIter<&'a BTreeSet<Vec<u8>>>>,
>;

impl LeaseKeys {
    /// Adds `key`; false if it was there already.
    pub fn insert(&mut self, key: Vec<u8>) -> bool {
        match &mut self.0 {
            Repr::Empty => {
                self.0 = Repr::One(key);
                true
            }
            Repr::One(k) if *k == key => false,
            Repr::One(k) => {
                let first = std::mem::take(k);
                self.0 = Repr::Many(BTreeSet::from([first, key]));
                true
            }
            Repr::Many(set) => set.insert(key),
        }
    }

    /// Removes `key`; false if it was not there.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        match &mut self.0 {
            Repr::Empty => false,
            Repr::One(k) if k.as_slice() == key => {
                self.0 = Repr::Empty;
                true
            }
            Repr::One(_) => false,
            Repr::Many(set) => {
                if !set.remove(key) {
                    return false;
                }
                if set.len() == 1 {
                    if let Some(last) = set.pop_first() {
                        self.0 = Repr::One(last);
                    }
                }
                true
            }
        }
    }

    /// Whether `key` is in the set.
    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.0 {
            Repr::Empty => false,
            Repr::One(k) => k.as_slice() == key,
            Repr::Many(set) => set.contains(key),
        }
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Empty => 0,
            Repr::One(_) => 1,
            Repr::Many(set) => set.len(),
        }
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        matches!(self.0, Repr::Empty)
    }

    /// The keys, in key order.
    pub fn iter(&self) -> Iter<'_> {
        let (one, many) = match &self.0 {
            Repr::Empty => (None, None),
            Repr::One(k) => (Some(k), None),
            Repr::Many(set) => (None, Some(set)),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

impl PartialEq for LeaseKeys {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for LeaseKeys {}

impl<'a> IntoIterator for &'a LeaseKeys {
    type Item = &'a Vec<u8>;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl FromIterator<Vec<u8>> for LeaseKeys {
    fn from_iter<I: IntoIterator<Item = Vec<u8>>>(keys: I) -> Self {
        let mut set = LeaseKeys::default();
        for k in keys {
            set.insert(k);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(s: &LeaseKeys) -> Vec<&[u8]> {
        s.iter().map(|k| k.as_slice()).collect()
    }

    #[test]
    fn keys_come_and_go_as_in_a_set_whatever_their_number() {
        let mut s = LeaseKeys::default();
        let mut model = BTreeSet::new();
        // Adds and removes that walk the set through none, one and many
        // keys, and back, with keys added twice and removed when absent.
        let steps: &[(bool, &[u8])] = &[
            (false, b"a"),
            (true, b"b"),
            (true, b"b"),
            (false, b"a"),
            (true, b"a"),
            (true, b"c"),
            (false, b"b"),
            (false, b"x"),
            (false, b"a"),
            (true, b"d"),
            (false, b"c"),
            (false, b"d"),
            (false, b"d"),
            (true, b""),
        ];
        for (add, k) in steps {
            let (got, want) =
                if *add { (s.insert(k.to_vec()), model.insert(k.to_vec())) } else { (s.remove(k), model.remove(*k)) };
            assert_eq!(got, want, "{} {k:?}", if *add { "insert" } else { "remove" });
            assert_eq!(keys(&s), model.iter().map(|k| k.as_slice()).collect::<Vec<_>>());
            assert_eq!((s.len(), s.is_empty()), (model.len(), model.is_empty()));
            for probe in [&b"a"[..], b"b", b"c", b"d", b""] {
                assert_eq!(s.contains(probe), model.contains(probe));
            }
        }
    }

    #[test]
    fn sets_of_the_same_keys_are_equal_however_they_were_made() {
        let mut shrunk: LeaseKeys = [b"b".to_vec(), b"a".to_vec()].into_iter().collect();
        assert!(shrunk.remove(b"b"));
        let one: LeaseKeys = [b"a".to_vec()].into_iter().collect();
        assert_eq!(shrunk, one);
        assert_ne!(one, LeaseKeys::default());
        let many: LeaseKeys = [b"c".to_vec(), b"a".to_vec(), b"b".to_vec()].into_iter().collect();
        assert_eq!(keys(&many), vec![&b"a"[..], b"b", b"c"]);
        assert_ne!(many, one);
    }
}
