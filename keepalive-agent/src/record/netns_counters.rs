//! The kernel programs' exact per-namespace counters (`NETNS_COUNTERS`): probes and drops by
//! reason, added in the kernel as they happen, so no ring-buffer loss changes them. This module
//! reads them, decides which entry an inode currently means, and deletes the entries of
//! namespaces that are gone. It also places each namespace's counters in a slot the programs
//! find without hashing (`NETNS_SLOTS`, [`keepalive_ebpf::NetnsCounterSlot`]), and reads a
//! namespace's counts as its entry's plus its slot's.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::maps::{self, MapData, MapError, PerCpuArray};
use keepalive_ebpf::{
    NETNS_COUNTER_SLOTS, NETNS_SLOT_QUARANTINE_SECS, NetnsCounters, NetnsKey, Uncounted,
    netns_counter_slot,
};
use log::debug;

use crate::kernel::netns_slots::NetnsSlotsMap;

/// How often the agent looks for namespaces to place in a slot (when the programs inserted
/// one): the hash lookup a namespace's events pay until then.
pub(crate) const PLACEMENT_PERIOD: Duration = Duration::from_secs(1);

/// The maps, behind locks so scrapes, the retention sweep and the placement can share them.
/// Where one is taken inside another, the order is `counters`, `activity`, `slots`.
pub(crate) struct NetnsCounterMaps {
    counters: Mutex<maps::HashMap<MapData, NetnsKey, NetnsCounters>>,
    /// Which namespaces are placed where.
    slots: Mutex<Placement>,
    /// Entries the programs inserted, per CPU: a placement pass runs when the sum moved.
    inserts: Mutex<PerCpuArray<MapData, u64>>,
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
        slots: NetnsSlotsMap,
        inserts: PerCpuArray<MapData, u64>,
        full: PerCpuArray<MapData, u64>,
        uncounted: PerCpuArray<MapData, u64>,
    ) -> Self {
        Self {
            counters: Mutex::new(counters),
            slots: Mutex::new(Placement {
                map: slots,
                table: SlotTable::default(),
                inserts_seen: None,
            }),
            inserts: Mutex::new(inserts),
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

    /// Every entry now, with what the programs added to its slot if it has one. An entry
    /// deleted while the walk runs is skipped.
    pub(crate) fn entries(&self) -> Result<Vec<(NetnsKey, NetnsCounters)>, MapError> {
        let map = self.counters.lock().expect("counters lock poisoned");
        let mut entries = walk(&map)?;
        // After the entries: an add the programs made to an entry since (a program that looked
        // for the slot just before it was placed) is read next time; every add lands in one of
        // the two, so nothing is counted twice.
        let slots = self.slots.lock().expect("slots lock poisoned");
        for (key, counters) in &mut entries {
            if let Some(index) = slots.table.slot_of(key) {
                let (held, placed) = slots.map.read(index);
                debug_assert_eq!(held, *key, "slot {index}");
                add_counts(counters, &placed);
            }
        }
        Ok(entries)
    }

    /// Namespaces counted at a slot now, not in the hash map.
    pub(crate) fn placed(&self) -> usize {
        self.slots
            .lock()
            .expect("slots lock poisoned")
            .table
            .holders
            .len()
    }

    /// Places in their slots the namespaces the programs inserted since the last pass (a pass
    /// runs only when the programs' insert count moved, or a namespace was left waiting).
    /// Returns how many were placed.
    pub(crate) fn place_new(&self, now: Instant) -> Result<usize, MapError> {
        let inserts: u64 = {
            let inserts = self.inserts.lock().expect("inserts lock poisoned");
            inserts.get(&0, 0)?.iter().sum()
        };
        if self.slots.lock().expect("slots lock poisoned").inserts_seen == Some(inserts) {
            return Ok(0);
        }
        // Held throughout: an entry deleted meanwhile must not get a slot no walk reads.
        let map = self.counters.lock().expect("counters lock poisoned");
        let entries = walk(&map)?;
        let mut slots = self.slots.lock().expect("slots lock poisoned");
        let mut placed = 0;
        let mut waiting = false;
        for (key, counters) in entries {
            if slots.table.slot_of(&key).is_some() {
                continue;
            }
            // Not stamped yet: the program that inserted it is about to.
            if counters.created_ns == 0 {
                waiting = true;
                continue;
            }
            match slots.table.take(key, now) {
                Take::Placed(index) => {
                    slots.map.place(index, key, counters.created_ns);
                    placed += 1;
                }
                Take::Quarantined => waiting = true,
                // Counted in the hash map, exactly, for a hash lookup more.
                Take::Held => {}
            }
        }
        slots.inserts_seen = if waiting { None } else { Some(inserts) };
        Ok(placed)
    }

    /// Runs [`Self::place_new`] every [`PLACEMENT_PERIOD`], forever, off the runtime's
    /// threads (its walk of the map is a few syscalls per namespace, under the map's lock).
    pub(crate) async fn place_forever(self: std::sync::Arc<Self>) {
        let mut ticker = tokio::time::interval(PLACEMENT_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let maps = std::sync::Arc::clone(&self);
            match tokio::task::spawn_blocking(move || maps.place_new(Instant::now())).await {
                Ok(Ok(0)) => {}
                Ok(Ok(placed)) => debug!("{placed} namespaces' kernel counters placed in slots"),
                Ok(Err(err)) => log::warn!(
                    "cannot place namespaces' kernel counters in slots: {err}; nothing to do \
                     (they stay exact, in the hash map, for a hash lookup more per event), \
                     report it if it repeats"
                ),
                Err(err) => {
                    log::error!(
                        "the placement of namespaces' kernel counters in slots stopped: {err}; \
                         this is a bug, please report it; new namespaces are counted in the \
                         hash map from now on"
                    );
                    return;
                }
            }
        }
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
        let mut slots = self.slots.lock().expect("slots lock poisoned");
        let now = Instant::now();
        let mut deleted = 0;
        for key in keys {
            activity.remove(key);
            // Already gone (another sweep) is as good as deleted.
            let gone = match map.remove(key) {
                Ok(()) => {
                    deleted += 1;
                    true
                }
                Err(_) => matches!(map.get(key, 0), Err(MapError::KeyNotFound)),
            };
            // The slot only with its entry: an entry kept and its slot cleared would lose the
            // slot's counts from its totals. Adds a program makes to the slot in between are
            // lost, as adds to an entry the agent is deleting always could be.
            if gone && let Some(index) = slots.table.release(key, now) {
                slots.map.clear(index);
                // A namespace that found this slot held waits for it: the next pass looks,
                // insert or not.
                slots.inserts_seen = None;
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

/// Every entry of the hash map now. An entry deleted while the walk runs is skipped.
fn walk(
    map: &maps::HashMap<MapData, NetnsKey, NetnsCounters>,
) -> Result<Vec<(NetnsKey, NetnsCounters)>, MapError> {
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

/// Adds the counts of `more` (not its `created_ns`, which is the entry's) to `total`.
fn add_counts(total: &mut NetnsCounters, more: &NetnsCounters) {
    total.expiries += more.expiries;
    total.probes += more.probes;
    total.orderly_closes += more.orderly_closes;
    for (sum, n) in total.drops.iter_mut().zip(more.drops) {
        *sum += n;
    }
}

/// The slots map and which namespace holds each slot.
struct Placement {
    map: NetnsSlotsMap,
    table: SlotTable,
    /// The programs' insert count at the last pass that left no namespace waiting.
    inserts_seen: Option<u64>,
}

/// Which namespace the agent placed in which slot, and the slots it cleared lately (no program
/// may still add to a slot once it is placed again: [`NETNS_SLOT_QUARANTINE_SECS`]). A
/// namespace can only be at [`netns_counter_slot`] of its key, so the slot's holder says
/// whether it is placed.
#[derive(Debug, Default)]
struct SlotTable {
    holders: HashMap<usize, NetnsKey>,
    cleared: HashMap<usize, Instant>,
}

/// What [`SlotTable::take`] found at a namespace's slot.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    Placed(usize),
    /// Another namespace holds it.
    Held,
    /// Cleared less than the quarantine ago: try again later.
    Quarantined,
}

impl SlotTable {
    fn slot_of(&self, key: &NetnsKey) -> Option<usize> {
        let index = netns_counter_slot(key);
        (self.holders.get(&index) == Some(key)).then_some(index)
    }

    /// Takes `key`'s slot ([`netns_counter_slot`]) for it, if free.
    fn take(&mut self, key: NetnsKey, now: Instant) -> Take {
        let index = netns_counter_slot(&key);
        debug_assert!(index < NETNS_COUNTER_SLOTS);
        if self.holders.contains_key(&index) {
            return Take::Held;
        }
        let quarantine = Duration::from_secs(NETNS_SLOT_QUARANTINE_SECS);
        if let Some(&cleared) = self.cleared.get(&index) {
            if now.saturating_duration_since(cleared) < quarantine {
                return Take::Quarantined;
            }
            self.cleared.remove(&index);
        }
        self.holders.insert(index, key);
        Take::Placed(index)
    }

    /// Frees `key`'s slot, if it has one, and returns it.
    fn release(&mut self, key: &NetnsKey, now: Instant) -> Option<usize> {
        let index = self.slot_of(key)?;
        self.holders.remove(&index);
        self.cleared.insert(index, now);
        Some(index)
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
        add_counts(totals.entry(key.inum).or_default(), counters);
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
    fn a_slot_is_taken_by_one_namespace_and_placed_again_only_after_the_quarantine() {
        let mut table = SlotTable::default();
        let now = Instant::now();
        let first = key(INODE, 9);
        let index = netns_counter_slot(&first);
        assert_eq!(table.take(first, now), Take::Placed(index));
        assert_eq!(table.slot_of(&first), Some(index));
        // Another namespace hashed to the same slot stays in the hash map.
        let other = (0..u64::MAX)
            .map(|cookie| key(INODE + 1, cookie))
            .find(|other| netns_counter_slot(other) == index)
            .expect("1 in 1024 keys share a slot");
        assert_eq!(table.take(other, now), Take::Held);
        assert_eq!(table.slot_of(&other), None);
        assert_eq!(table.release(&first, now), Some(index));
        assert_eq!(table.release(&first, now), None, "released once");
        let quarantine = Duration::from_secs(NETNS_SLOT_QUARANTINE_SECS);
        let almost = now + quarantine - Duration::from_millis(1);
        assert_eq!(table.take(other, almost), Take::Quarantined);
        assert_eq!(table.take(other, now + quarantine), Take::Placed(index));
        assert_eq!(table.holders.len(), 1);
        assert_eq!(
            table.cleared.len(),
            0,
            "bounded: a slot leaves when placed again"
        );
    }

    #[test]
    fn a_slots_counts_add_to_its_entrys_but_not_its_stamp() {
        let mut entry = counters(10, 7);
        entry.created_ns = 1_000;
        entry.drops[3] = 2;
        let mut slot = counters(5, 4);
        slot.created_ns = 1_000;
        slot.orderly_closes = 6;
        slot.drops[3] = 1;
        add_counts(&mut entry, &slot);
        assert_eq!(
            entry,
            NetnsCounters {
                created_ns: 1_000,
                expiries: 15,
                probes: 11,
                orderly_closes: 6,
                drops: [0, 0, 0, 3, 0, 0, 0, 0],
            }
        );
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
