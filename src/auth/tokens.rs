//! Simple tokens: random strings a member hands out after checking a
//! password, each standing for its user until it goes unused for the TTL
//! (`--auth-token-ttl`, 300 s by default, as etcd's). Every use restarts the
//! countdown, as in etcd.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use rand::distributions::Alphanumeric;
use rand::Rng;

/// etcd's default `--auth-token-ttl`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// One token: its user, and when it lapses (milliseconds since the
/// store's start), moved on by every use without a write lock.
#[derive(Debug)]
struct Entry {
    user: String,
    until_ms: AtomicU64,
}

/// The tokens a member knows. Looking a token up takes a read lock only,
/// so that every request of every client can do it at once.
#[derive(Debug)]
pub struct Tokens {
    ttl_ms: AtomicU64,
    start: Instant,
    map: RwLock<HashMap<String, Entry>>,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens {
            ttl_ms: AtomicU64::new(DEFAULT_TOKEN_TTL.as_millis() as u64),
            start: Instant::now(),
            map: RwLock::new(HashMap::new()),
        }
    }
}

impl Tokens {
    /// Sets how long a token may go unused.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(ttl.as_millis() as u64, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn until(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.ttl_ms.load(Ordering::Relaxed))
    }

    // A panic while the map was held cannot leave it half-changed.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A new token: 16 random letters and digits, then `.` and 16 more, so
    /// that it is as hard to guess as etcd's and looks like one.
    pub fn generate() -> String {
        let mut rng = rand::thread_rng();
        let mut part = || (0..16).map(|_| rng.sample(Alphanumeric) as char).collect::<String>();
        format!("{}.{}", part(), part())
    }

    /// Makes `token` stand for `user`.
    pub fn insert(&self, token: String, user: String) {
        let now = self.now_ms();
        let mut map = self.write();
        // Tokens nobody uses any more go now and then.
        if map.len() % 1024 == 1023 {
            map.retain(|_, e| e.until_ms.load(Ordering::Relaxed) > now);
        }
        map.insert(token, Entry { user, until_ms: AtomicU64::new(self.until(now)) });
    }

    /// The user `token` stands for, if it is known and has not lapsed; its
    /// countdown starts again.
    pub fn user_of(&self, token: &str) -> Option<String> {
        let now = self.now_ms();
        {
            let map = self.read();
            let entry = map.get(token)?;
            if entry.until_ms.load(Ordering::Relaxed) > now {
                entry.until_ms.fetch_max(self.until(now), Ordering::Relaxed);
                return Some(entry.user.clone());
            }
        }
        self.write().remove(token);
        None
    }

    /// Forgets every token of `user` (deleted, or its password changed).
    pub fn invalidate_user(&self, user: &str) {
        self.write().retain(|_, e| e.user != user);
    }

    /// Forgets every token (auth turned off).
    pub fn clear(&self) {
        self.write().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_lapse_unless_used_and_go_with_their_user() {
        let t = Tokens::default();
        t.set_ttl(Duration::from_millis(200));
        let (a, b) = (Tokens::generate(), Tokens::generate());
        assert_ne!(a, b);
        assert_eq!(a.len(), 33);
        t.insert(a.clone(), "alice".into());
        t.insert(b.clone(), "bob".into());
        assert_eq!(t.user_of(&a).as_deref(), Some("alice"));
        assert_eq!(t.user_of("nope"), None);
        t.invalidate_user("bob");
        assert_eq!(t.user_of(&b), None);
        t.set_ttl(Duration::ZERO);
        t.insert(b.clone(), "bob".into());
        assert_eq!(t.user_of(&b), None, "a token past its TTL is refused");
        t.clear();
        assert_eq!(t.user_of(&a), None);
    }
}
