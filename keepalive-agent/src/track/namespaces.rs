//! Which network namespace a `netns` inode currently means, and when it was last seen.
//!
//! The kernel frees a namespace's inode number when the namespace is destroyed and hands it to
//! the next namespace created (`ns_free_inum`/`ns_alloc_inum`), so the inode alone would let a
//! new namespace inherit a dead one's counters. `net->net_cookie` is never reused: a record whose
//! cookie differs from the one known for its inode comes from a new namespace, and the old one's
//! series must go. On 5.10 the cookie is an `atomic64_t` generated lazily (only when something
//! asks for it, e.g. `bpf_get_netns_cookie`), so the programs send `net->hash_mix` there instead
//! (a random `u32` drawn when the namespace was created, with bit 32 set): two namespaces on the
//! same inode then differ unless their draws collide (1 in 2^32). A 0 (a read that failed) on
//! either side cannot tell two namespaces apart, and identity falls back to the inode (plus the
//! retention below).
//!
//! Nothing here touches metrics or the connection table; the pipeline applies what these
//! methods return.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

/// What the agent knows of the namespace currently holding an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Known {
    /// `net_cookie` (or 5.10's `hash_mix` stand-in); 0 while unknown.
    cookie: u64,
    /// Last record from it, or last audit walk that found one of its sockets.
    last_seen: Instant,
}

/// A record's namespace compared with what was known of its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sighting {
    /// The inode was not known (first record, or its series were already removed).
    New,
    /// The same namespace as before.
    Known,
    /// Another namespace than the one known under this inode: the old one is gone (its inode
    /// was freed and reused), so its series and connections must go before this record counts.
    Replaced,
}

/// Namespace identity by (inode, cookie), with the time each was last seen.
#[derive(Debug, Default)]
pub(crate) struct NamespaceIdentity {
    /// Looked up once per record: foldhash, not the standard SipHash, on the drain's path.
    known: HashMap<u32, Known, foldhash::quality::RandomState>,
}

/// Whether two cookies can name the same namespace: equal, or one of them not generated (0).
fn same_namespace(known: u64, seen: u64) -> bool {
    known == seen || known == 0 || seen == 0
}

impl NamespaceIdentity {
    /// A record from namespace (`inode`, `cookie`) arrived `now`.
    pub(crate) fn saw(&mut self, inode: u32, cookie: u64, now: Instant) -> Sighting {
        match self.known.get_mut(&inode) {
            None => {
                self.known.insert(
                    inode,
                    Known {
                        cookie,
                        last_seen: now,
                    },
                );
                Sighting::New
            }
            Some(known) if same_namespace(known.cookie, cookie) => {
                // A cookie generated after the first record (5.10) is adopted, never dropped.
                if known.cookie == 0 {
                    known.cookie = cookie;
                }
                known.last_seen = now;
                Sighting::Known
            }
            Some(known) => {
                *known = Known {
                    cookie,
                    last_seen: now,
                };
                Sighting::Replaced
            }
        }
    }

    /// An audit walk found sockets in these namespaces `now`: they are alive even when nothing
    /// probed. Only refreshes namespaces that have series (known ones, same cookie); a different
    /// cookie means the known one is dead and is left to expire (or to be replaced by the next
    /// record, which resets it).
    pub(crate) fn present(
        &mut self,
        namespaces: impl IntoIterator<Item = (u32, u64)>,
        now: Instant,
    ) {
        for (inode, cookie) in namespaces {
            if let Some(known) = self.known.get_mut(&inode)
                && same_namespace(known.cookie, cookie)
            {
                known.last_seen = known.last_seen.max(now);
            }
        }
    }

    /// Forgets the namespaces not seen for `retention` and returns their inodes (one pass over
    /// the known namespaces).
    pub(crate) fn expire(&mut self, now: Instant, retention: Duration) -> HashSet<u32> {
        let mut expired = HashSet::new();
        self.known.retain(|&inode, known| {
            let keep = now.saturating_duration_since(known.last_seen) < retention;
            if !keep {
                expired.insert(inode);
            }
            keep
        });
        expired
    }

    /// Namespaces with series.
    pub(crate) fn len(&self) -> usize {
        self.known.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INODE: u32 = 4026532300;

    #[test]
    fn a_new_cookie_on_a_known_inode_replaces_the_namespace() {
        let mut ns = NamespaceIdentity::default();
        let now = Instant::now();
        assert_eq!(ns.saw(INODE, 11, now), Sighting::New);
        assert_eq!(ns.saw(INODE, 11, now), Sighting::Known);
        assert_eq!(ns.saw(INODE, 12, now), Sighting::Replaced);
        // From then on the new namespace is the known one.
        assert_eq!(ns.saw(INODE, 12, now), Sighting::Known);
        assert_eq!(ns.saw(INODE + 1, 12, now), Sighting::New);
        assert_eq!(ns.len(), 2);
    }

    #[test]
    fn without_a_cookie_identity_falls_back_to_the_inode() {
        let mut ns = NamespaceIdentity::default();
        let now = Instant::now();
        // A cookie that could not be read is 0.
        assert_eq!(ns.saw(INODE, 0, now), Sighting::New);
        assert_eq!(ns.saw(INODE, 0, now), Sighting::Known);
        // Generated later for the same namespace: adopted, not a new namespace.
        assert_eq!(ns.saw(INODE, 7, now), Sighting::Known);
        assert_eq!(ns.saw(INODE, 0, now), Sighting::Known);
        // Once adopted, another cookie is another namespace.
        assert_eq!(ns.saw(INODE, 8, now), Sighting::Replaced);
    }

    #[test]
    fn namespaces_not_seen_for_the_retention_expire_and_come_back_new() {
        let mut ns = NamespaceIdentity::default();
        let start = Instant::now();
        let retention = Duration::from_secs(60);
        ns.saw(INODE, 1, start);
        ns.saw(INODE + 1, 2, start + Duration::from_secs(30));
        assert!(
            ns.expire(start + Duration::from_secs(59), retention)
                .is_empty()
        );
        assert_eq!(
            ns.expire(start + Duration::from_secs(60), retention),
            HashSet::from([INODE])
        );
        assert_eq!(ns.len(), 1);
        assert_eq!(
            ns.expire(start + Duration::from_secs(90), retention),
            HashSet::from([INODE + 1])
        );
        assert_eq!(
            ns.saw(INODE, 1, start + Duration::from_secs(91)),
            Sighting::New
        );
    }

    #[test]
    fn an_audit_walk_keeps_a_quiet_namespace_but_not_a_dead_one_whose_inode_was_reused() {
        let mut ns = NamespaceIdentity::default();
        let start = Instant::now();
        let retention = Duration::from_secs(60);
        ns.saw(INODE, 1, start);
        ns.saw(INODE + 1, 2, start);
        // Both inodes have sockets at t=50, but INODE now belongs to namespace 3.
        ns.present(
            [(INODE, 3), (INODE + 1, 2), (INODE + 2, 4)],
            start + Duration::from_secs(50),
        );
        assert_eq!(
            ns.expire(start + Duration::from_secs(60), retention),
            HashSet::from([INODE])
        );
        // A walk never adds a namespace: without records it has no series to keep.
        assert_eq!(ns.len(), 1);
        assert!(
            ns.expire(start + Duration::from_secs(109), retention)
                .is_empty()
        );
        assert_eq!(
            ns.expire(start + Duration::from_secs(110), retention),
            HashSet::from([INODE + 1])
        );
    }
}
