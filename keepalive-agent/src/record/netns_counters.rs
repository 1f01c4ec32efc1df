//! The kernel programs' exact per-namespace counters (`NETNS_COUNTERS`): probes and drops by
//! reason, added in the kernel as they happen, so no ring-buffer loss changes them. This module
//! reads them, decides which entry an inode currently means, and deletes the entries of
//! namespaces that are gone.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::maps::{self, MapData, MapError, PerCpuArray};
use keepalive_ebpf::{NetnsCounters, NetnsKey};

/// The two maps, behind locks so scrapes and the retention sweep can share them.
pub(crate) struct NetnsCounterMaps {
    counters: Mutex<maps::HashMap<MapData, NetnsKey, NetnsCounters>>,
    full: Mutex<PerCpuArray<MapData, u64>>,
    /// When each entry's activity last changed, for [`Self::expire`].
    activity: Mutex<HashMap<NetnsKey, (u64, Instant)>>,
}

impl std::fmt::Debug for NetnsCounterMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetnsCounterMaps")
    }
}

impl NetnsCounterMaps {
    pub(crate) fn new(
        counters: maps::HashMap<MapData, NetnsKey, NetnsCounters>,
        full: PerCpuArray<MapData, u64>,
    ) -> Self {
        Self {
            counters: Mutex::new(counters),
            full: Mutex::new(full),
            activity: Mutex::default(),
        }
    }

    /// Every entry now. An entry deleted while the walk runs is skipped.
    pub(crate) fn entries(&self) -> Result<Vec<(NetnsKey, NetnsCounters)>, MapError> {
        let map = self.counters.lock().expect("counters lock poisoned");
        let mut entries = Vec::new();
        for entry in map.iter() {
            match entry {
                Ok(entry) => entries.push(entry),
                Err(MapError::KeyNotFound) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(entries)
    }

    /// Namespaces the kernel could not count because the map was full, summed over CPUs.
    pub(crate) fn full(&self) -> Result<u64, MapError> {
        let full = self.full.lock().expect("counters lock poisoned");
        Ok(full.get(&0, 0)?.iter().sum())
    }

    /// Deletes the entries of namespaces that held `inode` before the one with cookie `newer`
    /// (every entry of the inode with `None`). Returns how many went.
    pub(crate) fn forget(&self, inode: u32, newer: Option<u64>) -> usize {
        let Ok(entries) = self.entries() else {
            return 0;
        };
        let gone: Vec<NetnsKey> = entries
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| key.inum == inode && older(key.cookie, newer))
            .collect();
        self.delete(&gone)
    }

    fn delete(&self, keys: &[NetnsKey]) -> usize {
        let mut map = self.counters.lock().expect("counters lock poisoned");
        let mut activity = self.activity.lock().expect("activity lock poisoned");
        let mut deleted = 0;
        for key in keys {
            activity.remove(key);
            // Already gone (another sweep) is as good as deleted.
            if map.remove(key).is_ok() {
                deleted += 1;
            }
        }
        deleted
    }

    /// One retention pass over the map: deletes entries of dead namespaces (superseded by a
    /// newer cookie on their inode) and entries nothing touched for `retention`. Returns the
    /// inodes whose namespaces were active since the last pass (alive, even if every one of
    /// their records was lost) and the number of entries deleted.
    pub(crate) fn expire(
        &self,
        now: Instant,
        retention: Duration,
    ) -> Result<(Vec<(u32, u64)>, usize), MapError> {
        let entries = self.entries()?;
        let (active, stale) = {
            let mut activity = self.activity.lock().expect("activity lock poisoned");
            sweep(&mut activity, &entries, now, retention)
        };
        let deleted = self.delete(&stale);
        Ok((active, deleted))
    }
}

/// Whether an entry with `cookie` belongs to a namespace older than the one with `newer`.
/// Cookies only grow, so a late record of a dead namespace (an older cookie) never deletes its
/// successor's counts; a 0 (5.10, not generated) is never told apart.
fn older(cookie: u64, newer: Option<u64>) -> bool {
    match newer {
        None => true,
        Some(newer) => cookie != 0 && cookie < newer,
    }
}

/// Which entries count for an inode: the newest namespace holding it (cookies only grow, so the
/// highest), plus an entry with cookie 0 (5.10 before the cookie was generated: the same
/// namespace as far as anyone can tell, as in [`crate::track::namespaces`]).
pub(crate) fn current(entries: &[(NetnsKey, NetnsCounters)]) -> BTreeMap<u32, NetnsCounters> {
    let mut newest: HashMap<u32, u64> = HashMap::new();
    for (key, _) in entries {
        let cookie = newest.entry(key.inum).or_default();
        *cookie = (*cookie).max(key.cookie);
    }
    let mut totals: BTreeMap<u32, NetnsCounters> = BTreeMap::new();
    for (key, counters) in entries {
        if key.cookie != 0 && Some(&key.cookie) != newest.get(&key.inum) {
            continue;
        }
        let total = totals.entry(key.inum).or_default();
        total.expiries += counters.expiries;
        total.probes += counters.probes;
        total.closes += counters.closes;
        for (sum, n) in total.drops.iter_mut().zip(counters.drops) {
            *sum += n;
        }
    }
    totals
}

/// Everything that moves when a namespace does anything the programs see.
fn activity(counters: &NetnsCounters) -> u64 {
    counters.expiries + counters.closes
}

/// The pure part of [`NetnsCounterMaps::expire`]: updates `seen` (activity and when it last
/// changed, per entry) and returns the active entries' namespaces and the keys to delete.
fn sweep(
    seen: &mut HashMap<NetnsKey, (u64, Instant)>,
    entries: &[(NetnsKey, NetnsCounters)],
    now: Instant,
    retention: Duration,
) -> (Vec<(u32, u64)>, Vec<NetnsKey>) {
    let mut newest: HashMap<u32, u64> = HashMap::new();
    for (key, _) in entries {
        let cookie = newest.entry(key.inum).or_default();
        *cookie = (*cookie).max(key.cookie);
    }
    let mut active = Vec::new();
    let mut stale = Vec::new();
    let mut present = HashMap::with_capacity(entries.len());
    for (key, counters) in entries {
        let now_activity = activity(counters);
        let changed_at = match seen.get(key) {
            Some(&(before, at)) if before == now_activity => at,
            _ => {
                active.push((key.inum, key.cookie));
                now
            }
        };
        let superseded = key.cookie != 0 && Some(&key.cookie) != newest.get(&key.inum);
        if superseded || now.saturating_duration_since(changed_at) >= retention {
            stale.push(*key);
        } else {
            present.insert(*key, (now_activity, changed_at));
        }
    }
    *seen = present;
    (active, stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INODE: u32 = 4026532300;

    fn key(inum: u32, cookie: u64) -> NetnsKey {
        NetnsKey {
            cookie,
            inum,
            _pad: 0,
        }
    }

    fn counters(expiries: u64, probes: u64) -> NetnsCounters {
        NetnsCounters {
            expiries,
            probes,
            ..NetnsCounters::default()
        }
    }

    #[test]
    fn an_inode_means_its_newest_namespace_and_an_old_ones_counts_never_add_up() {
        let entries = [
            (key(INODE, 5), counters(10, 7)),
            // A later namespace on the same inode (cookies only grow).
            (key(INODE, 9), counters(2, 1)),
            (key(INODE + 1, 6), counters(4, 3)),
        ];
        let totals = current(&entries);
        assert_eq!(totals[&INODE].probes, 1);
        assert_eq!(totals[&(INODE + 1)].probes, 3);
    }

    #[test]
    fn only_older_namespaces_of_an_inode_are_forgotten() {
        assert!(older(5, Some(9)));
        // A late record of the dead namespace must not delete its successor's counts.
        assert!(!older(9, Some(5)));
        assert!(!older(9, Some(9)));
        assert!(!older(0, Some(9)));
        assert!(older(9, None));
    }

    #[test]
    fn without_a_cookie_the_counts_of_one_inode_add_up() {
        // 5.10: the cookie was generated while the namespace was counting.
        let entries = [
            (key(INODE, 0), counters(10, 7)),
            (key(INODE, 3), counters(2, 1)),
        ];
        assert_eq!(current(&entries)[&INODE].probes, 8);
    }

    #[test]
    fn a_sweep_keeps_active_entries_and_deletes_quiet_and_superseded_ones() {
        let retention = Duration::from_secs(60);
        let start = Instant::now();
        let mut seen = HashMap::new();
        let first = [
            (key(INODE, 5), counters(1, 0)),
            (key(INODE + 1, 6), counters(1, 0)),
        ];
        let (active, stale) = sweep(&mut seen, &first, start, retention);
        assert_eq!(active, [(INODE, 5), (INODE + 1, 6)]);
        assert!(stale.is_empty());

        // INODE + 1 keeps expiring; INODE is quiet.
        let later = start + Duration::from_secs(59);
        let second = [
            (key(INODE, 5), counters(1, 0)),
            (key(INODE + 1, 6), counters(2, 0)),
        ];
        let (active, stale) = sweep(&mut seen, &second, later, retention);
        assert_eq!(active, [(INODE + 1, 6)]);
        assert!(stale.is_empty());

        let end = start + Duration::from_secs(60);
        let third = [
            (key(INODE, 5), counters(1, 0)),
            (key(INODE + 1, 6), counters(2, 0)),
            // A new namespace took INODE + 1: the old entry is dead at once.
            (key(INODE + 1, 8), counters(1, 0)),
        ];
        let (active, stale) = sweep(&mut seen, &third, end, retention);
        assert_eq!(active, [(INODE + 1, 8)]);
        assert_eq!(stale, [key(INODE, 5), key(INODE + 1, 6)]);
        assert_eq!(seen.len(), 1);
    }
}
