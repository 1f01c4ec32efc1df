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
use keepalive_ebpf::{NetnsCounters, NetnsKey, Uncounted};

/// The two maps, behind locks so scrapes and the retention sweep can share them.
pub(crate) struct NetnsCounterMaps {
    counters: Mutex<maps::HashMap<MapData, NetnsKey, NetnsCounters>>,
    full: Mutex<PerCpuArray<MapData, u64>>,
    /// Events the programs saw but could not count, by [`Uncounted`].
    uncounted: Mutex<PerCpuArray<MapData, u64>>,
    /// When each entry's activity last changed, for [`Self::expire`] and to tell a live
    /// namespace's entry from a dead one's on the same inode.
    activity: Mutex<HashMap<NetnsKey, (u64, Instant)>>,
    /// The cookie records last showed for each inode (what the pipeline's namespace identity
    /// knows).
    current_cookie: Mutex<HashMap<u32, u64>>,
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
        uncounted: PerCpuArray<MapData, u64>,
    ) -> Self {
        Self {
            counters: Mutex::new(counters),
            full: Mutex::new(full),
            uncounted: Mutex::new(uncounted),
            activity: Mutex::default(),
            current_cookie: Mutex::default(),
        }
    }

    /// A record showed that namespace `cookie` holds `inode` now.
    pub(crate) fn saw(&self, inode: u32, cookie: u64) {
        if cookie != 0 {
            self.current_cookie
                .lock()
                .expect("cookie lock poisoned")
                .insert(inode, cookie);
        }
    }

    /// The records' namespace identity forgot these inodes (retention): so does this.
    pub(crate) fn forget_cookies(&self, inodes: &std::collections::HashSet<u32>) {
        self.current_cookie
            .lock()
            .expect("cookie lock poisoned")
            .retain(|inode, _| !inodes.contains(inode));
    }

    /// Every entry now, and per inode the totals of the namespace holding it (see
    /// [`current`]).
    pub(crate) fn totals(&self) -> Result<(usize, BTreeMap<u32, NetnsCounters>), MapError> {
        let entries = self.entries()?;
        let known = self
            .current_cookie
            .lock()
            .expect("cookie lock poisoned")
            .clone();
        let activity = self.activity.lock().expect("activity lock poisoned");
        Ok((entries.len(), current(&entries, &known, &activity)))
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

    /// Events the programs could not add to the totals, by cause, summed over CPUs.
    pub(crate) fn uncounted(&self) -> Result<Vec<(Uncounted, u64)>, MapError> {
        let uncounted = self.uncounted.lock().expect("uncounted lock poisoned");
        Uncounted::ALL
            .iter()
            .map(|&why| Ok((why, uncounted.get(&(why as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Deletes the entries of the namespaces that held `inode` before the one with cookie
    /// `newer` (a record from it just arrived: every record of a dead namespace came before,
    /// since its sockets were gone before its inode was freed). Returns how many went.
    pub(crate) fn forget(&self, inode: u32, newer: u64) -> usize {
        self.saw(inode, newer);
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

    /// One retention pass over the map: deletes entries nothing touched for `retention` (a dead
    /// namespace's entry stops changing), and finds the inodes a later namespace took over.
    pub(crate) fn expire(&self, now: Instant, retention: Duration) -> Result<Sweep, MapError> {
        let entries = self.entries()?;
        let (active, stale) = {
            let mut activity = self.activity.lock().expect("activity lock poisoned");
            sweep(&mut activity, &entries, now, retention)
        };
        let superseded = {
            let known = self.current_cookie.lock().expect("cookie lock poisoned");
            superseded(&entries, &known, &active)
        };
        let deleted = self.delete(&stale);
        Ok(Sweep {
            active,
            deleted,
            superseded,
        })
    }
}

/// What one retention pass over the map found.
#[derive(Debug)]
pub(crate) struct Sweep {
    /// The namespaces (inode, cookie) active since the last pass: alive, even if every one of
    /// their records was lost.
    pub(crate) active: Vec<(u32, u64)>,
    /// Entries deleted.
    pub(crate) deleted: usize,
    /// Inodes a later namespace took over from the one records last showed, with the later
    /// namespace's cookie (see [`superseded`]).
    pub(crate) superseded: Vec<(u32, u64)>,
}

/// The inodes whose newest entry (by [`NetnsCounters::created_ns`]) is another namespace's than
/// the one records last showed (`known`), whose own entry is older: that namespace is gone
/// (an inode is reused only after). With the newer namespace's cookie, in inode order. Not while
/// the known namespace's entry is still among the `active` ones (it changed since the last
/// sweep): a record of its last events may still wait in the ring buffer, and arriving after
/// the replacement it would replace the live namespace in turn.
fn superseded(
    entries: &[(NetnsKey, NetnsCounters)],
    known: &HashMap<u32, u64>,
    active: &[(u32, u64)],
) -> Vec<(u32, u64)> {
    let stamp = |inum: u32, cookie: u64| {
        entries
            .iter()
            .find(|(key, _)| key.inum == inum && key.cookie == cookie)
            .map(|(_, counters)| counters.created_ns)
    };
    let mut newest: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for (key, counters) in entries {
        if key.cookie == 0 || counters.created_ns == 0 {
            continue;
        }
        let later = newest
            .get(&key.inum)
            .is_none_or(|&(_, created)| counters.created_ns > created);
        if later {
            newest.insert(key.inum, (key.cookie, counters.created_ns));
        }
    }
    newest
        .into_iter()
        .filter(|&(inum, (cookie, created))| match known.get(&inum) {
            Some(&old) if old != 0 && old != cookie && !active.contains(&(inum, old)) => {
                stamp(inum, old)
                    .is_some_and(|old_created| old_created != 0 && old_created < created)
            }
            _ => false,
        })
        .map(|(inum, (cookie, _))| (inum, cookie))
        .collect()
}

/// Whether an entry with `cookie` belongs to another namespace than the one with `newer`: a
/// 0 (5.10, not generated) is never told apart.
fn older(cookie: u64, newer: u64) -> bool {
    cookie != 0 && cookie != newer
}

/// Which entries count for an inode: the entry the kernel inserted last
/// ([`NetnsCounters::created_ns`]: an inode is reused only once its namespace is gone, so the
/// later entry is the live namespace's even before any record of it arrives, as when all its
/// closes are counted and not sent); while an entry is not stamped yet, the namespace records
/// last showed holding it (`known`); without records (all lost), the entry whose activity
/// changed last (a dead namespace's entry stops changing; one not swept yet is the newest).
/// Cookies are not ordered by creation (`gen_cookie_next` hands them out in per-CPU batches), so
/// they cannot decide. An entry with cookie 0 (5.10 before the cookie was generated) adds to it:
/// the same namespace as far as anyone can tell, as in [`crate::track::namespaces`].
pub(crate) fn current(
    entries: &[(NetnsKey, NetnsCounters)],
    known: &HashMap<u32, u64>,
    activity: &HashMap<NetnsKey, (u64, Instant)>,
) -> BTreeMap<u32, NetnsCounters> {
    let mut chosen: HashMap<u32, (NetnsKey, Option<Instant>, u64)> = HashMap::new();
    for (key, counters) in entries {
        if key.cookie == 0 {
            continue;
        }
        let changed = activity.get(key).map(|&(_, at)| at);
        let created = counters.created_ns;
        let better = |(best, best_changed, best_created): &(NetnsKey, Option<Instant>, u64)| {
            if created != 0 && *best_created != 0 && created != *best_created {
                return created > *best_created;
            }
            if known.get(&key.inum) == Some(&key.cookie) {
                return true;
            }
            if known.get(&key.inum) == Some(&best.cookie) {
                return false;
            }
            // Not swept yet (None) is newer than anything swept.
            match (changed, best_changed) {
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (a, b) => a > *b || (a == *b && key.cookie > best.cookie),
            }
        };
        match chosen.get(&key.inum) {
            Some(best) if !better(best) => {}
            _ => {
                chosen.insert(key.inum, (*key, changed, created));
            }
        }
    }
    let mut totals: BTreeMap<u32, NetnsCounters> = BTreeMap::new();
    for (key, counters) in entries {
        if key.cookie != 0 && chosen.get(&key.inum).map(|(k, ..)| k.cookie) != Some(key.cookie) {
            continue;
        }
        let total = totals.entry(key.inum).or_default();
        total.expiries += counters.expiries;
        total.probes += counters.probes;
        total.orderly_closes += counters.orderly_closes;
        for (sum, n) in total.drops.iter_mut().zip(counters.drops) {
            *sum += n;
        }
    }
    totals
}

/// Everything that moves when a namespace does anything the programs see.
fn activity(counters: &NetnsCounters) -> u64 {
    // Wrapping: only a change matters, and the values are the kernel's.
    counters.drops.iter().fold(
        counters.expiries.wrapping_add(counters.orderly_closes),
        |sum, &n| sum.wrapping_add(n),
    )
}

/// The pure part of [`NetnsCounterMaps::expire`]: updates `seen` (activity and when it last
/// changed, per entry) and returns the active entries' namespaces and the keys to delete.
fn sweep(
    seen: &mut HashMap<NetnsKey, (u64, Instant)>,
    entries: &[(NetnsKey, NetnsCounters)],
    now: Instant,
    retention: Duration,
) -> (Vec<(u32, u64)>, Vec<NetnsKey>) {
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
        if now.saturating_duration_since(changed_at) >= retention {
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

    #[test]
    fn uncounted_causes_index_the_map_in_value_order_with_distinct_labels() {
        let mut labels = std::collections::HashSet::new();
        for (index, why) in Uncounted::ALL.into_iter().enumerate() {
            assert_eq!(why as usize, index, "{why:?}");
            assert!(labels.insert((why.event(), why.cause())), "{why:?}");
        }
        assert_eq!(Uncounted::COUNT as usize, labels.len());
    }

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
    fn an_inode_means_the_namespace_records_last_showed_and_an_old_ones_counts_never_add_up() {
        let entries = [
            (key(INODE, 9), counters(10, 7)),
            // A later namespace on the same inode, with a lower cookie (per-CPU batches).
            (key(INODE, 5), counters(2, 1)),
            (key(INODE + 1, 6), counters(4, 3)),
        ];
        let known = HashMap::from([(INODE, 5)]);
        let totals = current(&entries, &known, &HashMap::new());
        assert_eq!(totals[&INODE].probes, 1);
        assert_eq!(totals[&(INODE + 1)].probes, 3);
    }

    #[test]
    fn the_entry_the_kernel_inserted_last_is_the_live_namespace_whatever_records_showed() {
        // A record showed the old namespace (9); the new one (5) has only counted closes.
        let mut old = counters(10, 7);
        old.created_ns = 1_000;
        let mut new = counters(2, 1);
        new.created_ns = 2_000;
        let known = HashMap::from([(INODE, 9)]);
        let entries = [(key(INODE, 9), old), (key(INODE, 5), new)];
        assert_eq!(current(&entries, &known, &HashMap::new())[&INODE].probes, 1);
        let entries = [(key(INODE, 5), new), (key(INODE, 9), old)];
        assert_eq!(current(&entries, &known, &HashMap::new())[&INODE].probes, 1);
        // Not stamped yet (the moment after its insert): the records decide, as before.
        new.created_ns = 0;
        let entries = [(key(INODE, 9), old), (key(INODE, 5), new)];
        assert_eq!(current(&entries, &known, &HashMap::new())[&INODE].probes, 7);
    }

    #[test]
    fn an_inode_is_superseded_when_a_later_entry_than_the_known_namespaces_exists() {
        let stamped = |created_ns| NetnsCounters {
            created_ns,
            ..counters(1, 0)
        };
        let known = HashMap::from([(INODE, 9), (INODE + 1, 6), (INODE + 2, 7)]);
        let entries = [
            // Taken over by 5, created after the known namespace's entry.
            (key(INODE, 9), stamped(1_000)),
            (key(INODE, 5), stamped(2_000)),
            // The known namespace is the newest: nothing to do.
            (key(INODE + 1, 4), stamped(1_000)),
            (key(INODE + 1, 6), stamped(2_000)),
            // Not stamped yet, or the known namespace's entry is gone: no evidence.
            (key(INODE + 2, 7), stamped(1_000)),
            (key(INODE + 2, 8), stamped(0)),
            (key(INODE + 3, 3), stamped(5_000)),
        ];
        assert_eq!(superseded(&entries, &known, &[]), [(INODE, 5)]);
        let without_known_entry = [(key(INODE, 5), stamped(2_000))];
        assert!(superseded(&without_known_entry, &known, &[]).is_empty());
        // The known namespace's entry changed since the last sweep: its last records may
        // still be on their way, so not yet.
        assert!(superseded(&entries, &known, &[(INODE, 9)]).is_empty());
        assert_eq!(superseded(&entries, &known, &[(INODE, 5)]), [(INODE, 5)]);
    }

    #[test]
    fn without_records_the_entry_that_changed_last_is_the_live_namespace() {
        let start = Instant::now();
        let entries = [
            (key(INODE, 9), counters(10, 7)),
            (key(INODE, 5), counters(2, 1)),
        ];
        // The dead namespace's entry stopped changing before the new one's did.
        let activity = HashMap::from([
            (key(INODE, 9), (10, start)),
            (key(INODE, 5), (2, start + Duration::from_secs(5))),
        ]);
        assert_eq!(
            current(&entries, &HashMap::new(), &activity)[&INODE].probes,
            1
        );
        // An entry no sweep has seen yet is newer still.
        let entries = [
            (key(INODE, 9), counters(10, 7)),
            (key(INODE, 5), counters(2, 1)),
            (key(INODE, 3), counters(1, 1)),
        ];
        assert_eq!(
            current(&entries, &HashMap::new(), &activity)[&INODE].expiries,
            1
        );
    }

    #[test]
    fn only_other_namespaces_of_an_inode_are_forgotten() {
        assert!(older(5, 9));
        assert!(older(9, 5));
        assert!(!older(9, 9));
        assert!(!older(0, 9));
    }

    #[test]
    fn without_a_cookie_the_counts_of_one_inode_add_up() {
        // 5.10: the cookie was generated while the namespace was counting.
        let entries = [
            (key(INODE, 0), counters(10, 7)),
            (key(INODE, 3), counters(2, 1)),
        ];
        assert_eq!(
            current(&entries, &HashMap::new(), &HashMap::new())[&INODE].probes,
            8
        );
    }

    #[test]
    fn a_sweep_keeps_active_entries_and_deletes_quiet_ones() {
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
        let (active, stale) = sweep(&mut seen, &second, end, retention);
        assert!(active.is_empty());
        assert_eq!(stale, [key(INODE, 5)]);
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn a_drop_or_an_orderly_close_alone_keeps_a_namespace_active() {
        // A close adds to one counter only: its drop reason, or else the orderly ones.
        let retention = Duration::from_secs(60);
        let start = Instant::now();
        let mut seen = HashMap::new();
        let quiet = counters(1, 0);
        let first = [(key(INODE, 5), quiet), (key(INODE + 1, 6), quiet)];
        sweep(&mut seen, &first, start, retention);
        let mut dropped = quiet;
        dropped.drops[3] += 1;
        let mut orderly = quiet;
        orderly.orderly_closes += 1;
        let second = [(key(INODE, 5), dropped), (key(INODE + 1, 6), orderly)];
        let (active, _) = sweep(
            &mut seen,
            &second,
            start + Duration::from_secs(59),
            retention,
        );
        assert_eq!(active, [(INODE, 5), (INODE + 1, 6)]);
        let (active, stale) = sweep(
            &mut seen,
            &second,
            start + Duration::from_secs(118),
            retention,
        );
        assert!(active.is_empty() && stale.is_empty(), "{stale:?}");
    }
}
