//! Per-connection keepalive state, bounded. Live connections are keyed by socket address; a
//! socket that closes and whose memory is reused for another connection (TCP sockets come from
//! a SLAB_TYPESAFE_BY_RCU cache) starts a new generation, recognised by its endpoints.

use std::{
    collections::{HashMap, HashSet, VecDeque, hash_map::Entry},
    hash::BuildHasherDefault,
    num::NonZeroUsize,
    time::{Duration, Instant},
};

use keepalive_ebpf::expiry_enters_table;
use lru::LruCache;

use crate::{
    attribution::Workload,
    record::decoder::{CloseEvent, Endpoints, KeepaliveExpiry},
    track::{
        classifier::{CloseOutcome, DropReason},
        idle_kill::IdleKill,
    },
};

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConnectionState {
    pub endpoints: Endpoints,
    /// Probes the kernel sent on this connection since the agent first saw it.
    pub probes_sent: u64,
    /// Probes still unanswered when the keepalive timer last ran (`icsk_probes_out` at entry:
    /// the kernel zeroes it on every acceptable ACK, so a non-zero value at the next expiry
    /// means the peer stayed silent for a whole interval).
    pub unanswered_probes: u8,
    /// Probes in the current streak: `icsk_probes_out` when the keepalive timer last finished.
    /// Back at 0 at the next expiry means the peer answered them all.
    pub streak_probes: u8,
    /// Set once the connection was dropped.
    pub dropped: Option<DropReason>,
    /// Set when that drop was an idle kill (boxed: rare, and one pointer in every other entry).
    pub idle_kill: Option<Box<IdleKill>>,
    pub updated: Instant,
    /// Who owns it: filled in by the pipeline when the connection enters the table, completed at
    /// close if the process was not found then.
    pub workload: Workload,
    /// An expiry found a probe unanswered. Only then is the owning process looked up for a
    /// live connection: finding it reads `/proc/PID/fd` (the kernel builds a dentry per
    /// descriptor), which would otherwise be done for every healthy keepalive connection.
    /// Cleared when that lookup found no process, so the next unanswered probe asks again.
    pub at_risk_seen: bool,
    /// The lookup of its owner could not be queued (the attribution queue was full, as when
    /// thousands of connections enter in the same second): its next expiry asks again.
    pub owner_refused: bool,
    /// Live: audit walks in a row that did not find its socket ([`ConnectionTable::reconcile`]).
    missed_walks: u8,
    /// Live: the walk being reconciled found its socket.
    found_by_walk: bool,
}

impl ConnectionState {
    /// A connection first seen `now`: nothing counted, owner unknown.
    fn new(endpoints: Endpoints, now: Instant) -> Self {
        Self {
            endpoints,
            probes_sent: 0,
            unanswered_probes: 0,
            streak_probes: 0,
            dropped: None,
            idle_kill: None,
            updated: now,
            workload: Workload::default(),
            at_risk_seen: false,
            owner_refused: false,
            missed_walks: 0,
            found_by_walk: false,
        }
    }
}

/// What one keepalive expiry meant for its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ExpiryOutcome {
    pub probe_sent: bool,
    /// A streak of probes ended with the peer answering.
    pub streak_answered: bool,
    /// The connection entered the table with this expiry (its workload is still unknown).
    pub entered: bool,
    /// The first expiry of this connection with an unanswered probe: the one whose process is
    /// worth a `/proc` read (see [`ConnectionState::at_risk_seen`]).
    pub first_at_risk: bool,
    /// The lookup of its owner was refused before (see [`ConnectionState::owner_refused`]):
    /// ask again, as for a connection that entered.
    pub owner_retry: bool,
    /// How many probes that answered streak had.
    pub answered_probes: u8,
    /// The first probe the table counted for this connection since it entered.
    pub first_probe: bool,
}

/// Which dropped list a drop goes to. Keepalive drops (and idle kills) are what an alert names;
/// any process on the node (or anyone who can open connections to a pod on it) can cause other
/// drops by the thousand (RST churn), so those must never push a keepalive drop out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropClass {
    Keepalive = 0,
    Other = 1,
}

impl DropClass {
    pub(crate) const ALL: [Self; 2] = [Self::Keepalive, Self::Other];

    fn of(reason: DropReason) -> Self {
        if reason.is_keepalive() {
            Self::Keepalive
        } else {
            Self::Other
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Keepalive => "keepalive",
            Self::Other => "other",
        }
    }
}

/// Where the newest dropped entry on some endpoints is, see `ConnectionTable::newest_dropped`.
#[derive(Debug, Clone, Copy)]
struct DroppedIndex {
    class: DropClass,
    order: u64,
    entries: u32,
}

/// The dropped index's key for some endpoints: a 64-bit hash, so the index's entries are 24
/// bytes instead of 96 (at 10 000 drops a quarter of the cache lines) and its lookups compare
/// integers. Endpoints that share one (1 in 2^64 for a pair) share an index entry: the lookup
/// checks the entry it finds, and scans when it is the other's.
#[derive(Debug, Default)]
struct Fingerprints {
    hasher: foldhash::quality::RandomState,
    /// Tests set it to 0: every endpoints then share one fingerprint.
    #[cfg(test)]
    mask: u64,
}

impl Fingerprints {
    fn of(&self, endpoints: &Endpoints) -> u64 {
        let fingerprint = std::hash::BuildHasher::hash_one(&self.hasher, endpoints);
        #[cfg(test)]
        let fingerprint = fingerprint & self.mask;
        fingerprint
    }
}

/// Hashes a fingerprint to itself: it is a hash already (foldhash's quality one), whose low bits
/// pick the bucket and top bits the control byte as well as any rehash would.
#[derive(Debug, Default)]
struct FingerprintHasher(u64);

impl std::hash::Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed with it (`write_u64`); anything else still gets a hash.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, fingerprint: u64) {
        self.0 = fingerprint;
    }
}

type DroppedIndexMap = HashMap<u64, DroppedIndex, BuildHasherDefault<FingerprintHasher>>;

/// The newest entry of both dropped lists that `matches`: its order, list and place in it. A
/// scan from each list's newest end, for the index's rare cases.
fn newest_dropped_where(
    dropped: &[VecDeque<(u64, ConnectionState)>; 2],
    matches: impl Fn(&ConnectionState) -> bool,
) -> Option<(u64, DropClass, usize)> {
    DropClass::ALL
        .into_iter()
        .filter_map(|class| {
            let list = &dropped[class as usize];
            let at = list.iter().rposition(|(_, state)| matches(state))?;
            Some((list[at].0, class, at))
        })
        .max_by_key(|&(order, ..)| order)
}

/// Counts a dropped entry pushed at `order` (the newest so far) in the index.
fn index_drop(index: &mut DroppedIndexMap, fingerprint: u64, class: DropClass, order: u64) {
    let entry = index.entry(fingerprint).or_insert(DroppedIndex {
        class,
        order,
        entries: 0,
    });
    entry.entries += 1;
    entry.class = class;
    entry.order = order;
}

#[derive(Debug)]
pub(crate) struct ConnectionTable {
    live: LruCache<u64, ConnectionState>,
    /// Dropped connections by [`DropClass`], oldest first, kept `retention` so alerts can name
    /// them. Each entry carries its place in drop order, which [`Self::newest_dropped`] indexes.
    dropped: [VecDeque<(u64, ConnectionState)>; 2],
    /// Where the newest dropped entry on each endpoints' fingerprint is, and how many entries
    /// there are on it (endpoints come back when a port is reused). The attribution worker looks
    /// a drop up once or twice after the fact, by which time a flood of resets may have buried
    /// or evicted it: a scan per lookup held the pipeline benchmark below 0.1 M records/s per
    /// core.
    newest_dropped: DroppedIndexMap,
    fingerprints: Fingerprints,
    next_drop: u64,
    /// Bound of both lists together; other drops are evicted first.
    max_dropped: usize,
    retention: Duration,
    evictions: u64,
    /// Dropped connections evicted before their retention, by [`DropClass`].
    dropped_evictions: [u64; 2],
    /// Live connections removed because audit walks no longer found their socket.
    vanished: u64,
}

/// Audit walks in a row that must miss a live connection's socket before it is taken for gone.
pub(crate) const VANISHED_AFTER: u8 = 2;

impl ConnectionTable {
    pub(crate) fn new(max_live: NonZeroUsize, max_dropped: usize, retention: Duration) -> Self {
        Self {
            live: LruCache::new(max_live),
            dropped: [VecDeque::new(), VecDeque::new()],
            newest_dropped: HashMap::default(),
            fingerprints: Fingerprints {
                #[cfg(test)]
                mask: u64::MAX,
                ..Fingerprints::default()
            },
            next_drop: 0,
            max_dropped,
            retention,
            evictions: 0,
            dropped_evictions: [0; 2],
            vanished: 0,
        }
    }

    pub(crate) fn on_expiry(&mut self, e: &KeepaliveExpiry, now: Instant) -> ExpiryOutcome {
        if e.closed_in_timer {
            // Reported at timer exit, after the close record that already ended the connection.
            return ExpiryOutcome::default();
        }
        let probe_sent = e.probe_sent();
        let mut entered = false;
        let state = match self.live.get_mut(&e.sk) {
            Some(state) if state.endpoints == e.endpoints => state,
            _ => {
                // First sight, or the slot now holds another connection. The rule the timer's
                // exit marks the kernel's tracked connections by (a closed_in_timer expiry
                // returned above).
                if !expiry_enters_table(e.probes_sent, e.probes_out_before) {
                    self.live.pop(&e.sk);
                    return ExpiryOutcome::default();
                }
                self.insert_live(e.sk, e.endpoints, now);
                entered = true;
                self.live.get_mut(&e.sk).expect("entry inserted just above")
            }
        };
        let answered_probes = if e.probes_out_before == 0 {
            state.streak_probes.max(state.unanswered_probes)
        } else {
            0
        };
        state.unanswered_probes = e.probes_out_before;
        // A probe answered before the exit hook read icsk_probes_out still belongs to the
        // streak the next expiry reports as answered.
        let after = e.probes_out_after.unwrap_or(e.probes_out_before);
        state.streak_probes = after.max(e.probes_out_before.saturating_add(e.probes_sent));
        let first_probe = probe_sent && state.probes_sent == 0;
        if probe_sent {
            state.probes_sent += u64::from(e.probes_sent);
        }
        state.updated = now;
        let first_at_risk = e.probes_out_before > 0 && !state.at_risk_seen;
        state.at_risk_seen |= first_at_risk;
        ExpiryOutcome {
            probe_sent,
            streak_answered: answered_probes > 0,
            entered,
            first_at_risk,
            owner_retry: std::mem::take(&mut state.owner_refused),
            answered_probes,
            first_probe,
        }
    }

    /// Ends the connection. Returns its final state when it was dropped, kept in the dropped
    /// list or not (a non-keepalive drop finding the list full of keepalive drops).
    pub(crate) fn on_close(
        &mut self,
        c: &CloseEvent,
        outcome: CloseOutcome,
        now: Instant,
    ) -> Option<ConnectionState> {
        self.on_close_with(c, outcome, now, None, None, ConnectionState::clone)
    }

    /// [`Self::on_close`], completing the connection's owner with `known` first, and returning
    /// what `view` takes of the final state instead of a copy of it.
    pub(crate) fn on_close_with<R>(
        &mut self,
        c: &CloseEvent,
        outcome: CloseOutcome,
        now: Instant,
        known: Option<Workload>,
        idle_kill: Option<Box<IdleKill>>,
        view: impl FnOnce(&ConnectionState) -> R,
    ) -> Option<R> {
        let previous = self
            .live
            .pop(&c.sk)
            .filter(|state| state.endpoints == c.endpoints);
        let CloseOutcome::Dropped(reason) = outcome else {
            return None;
        };
        let mut state = previous.unwrap_or_else(|| ConnectionState::new(c.endpoints, now));
        if reason == DropReason::KeepaliveTimeout {
            // The abort expiry found every probe unanswered.
            state.unanswered_probes = state.unanswered_probes.max(c.probes_out);
        }
        state.dropped = Some(reason);
        // Kept like a keepalive drop: it is what the agent is for, and a flood of other drops
        // must not push it out.
        let class = match idle_kill {
            Some(_) => DropClass::Keepalive,
            None => DropClass::of(reason),
        };
        state.idle_kill = idle_kill;
        state.updated = now;
        if let Some(known) = known {
            state.workload.fill_unknown_from(known);
        }
        if self.dropped_len() >= self.max_dropped {
            // Another drop goes first; a keepalive drop only pushes out the oldest keepalive
            // drop, and only when the whole list is keepalive drops.
            let victim = if self.dropped[DropClass::Other as usize].is_empty() {
                DropClass::Keepalive
            } else {
                DropClass::Other
            };
            if victim == DropClass::Keepalive && class == DropClass::Other {
                self.dropped_evictions[DropClass::Other as usize] += 1;
                self.evictions += 1;
                return Some(view(&state));
            }
            let list = &mut self.dropped[victim as usize];
            if let Some((order, endpoints)) = list.front().map(|(o, e)| (*o, e.endpoints)) {
                // Dropped where it lies: `pop_front` would first copy the whole entry out of
                // the oldest, cold end of the list (the agent's largest cost under RST churn
                // with every drop reported, `perf`).
                list.drain(..1);
                self.unindex(victim, order, self.fingerprints.of(&endpoints));
                self.dropped_evictions[victim as usize] += 1;
                self.evictions += 1;
            }
        }
        let order = self.next_drop;
        self.next_drop += 1;
        index_drop(
            &mut self.newest_dropped,
            self.fingerprints.of(&state.endpoints),
            class,
            order,
        );
        let seen = view(&state);
        self.dropped[class as usize].push_back((order, state));
        Some(seen)
    }

    /// Takes a dropped entry that left its list out of the index.
    fn unindex(&mut self, class: DropClass, order: u64, fingerprint: u64) {
        // One hash lookup, not a second one to remove.
        let Entry::Occupied(mut entry) = self.newest_dropped.entry(fingerprint) else {
            return;
        };
        let index = entry.get_mut();
        index.entries -= 1;
        if index.entries == 0 {
            entry.remove();
        } else if (index.class, index.order) == (class, order) {
            // The newest left while an older one on the same fingerprint stays (it can be
            // younger only in the other list): rare enough for a scan.
            let fingerprints = &self.fingerprints;
            let newest = newest_dropped_where(&self.dropped, |state| {
                fingerprints.of(&state.endpoints) == fingerprint
            });
            if let Some((order, class, _)) = newest {
                index.class = class;
                index.order = order;
            }
        }
    }

    /// Rebuilds the index after entries left from the middle of the lists.
    fn reindex(&mut self) {
        self.newest_dropped.clear();
        let fingerprints = &self.fingerprints;
        let mut all: Vec<(u64, DropClass, u64)> = DropClass::ALL
            .into_iter()
            .flat_map(|class| {
                self.dropped[class as usize]
                    .iter()
                    .map(move |(order, state)| (*order, class, fingerprints.of(&state.endpoints)))
            })
            .collect();
        all.sort_unstable_by_key(|&(order, ..)| order);
        for (order, class, fingerprint) in all {
            index_drop(&mut self.newest_dropped, fingerprint, class, order);
        }
    }

    fn insert_live(&mut self, sk: u64, endpoints: Endpoints, now: Instant) {
        if let Some((evicted_sk, _)) = self.live.push(sk, ConnectionState::new(endpoints, now))
            && evicted_sk != sk
        {
            self.evictions += 1;
        }
    }

    /// The owner lookup of a live connection that entered (or asked again) could not be
    /// queued: its next expiry asks again.
    pub(crate) fn owner_refused(&mut self, sk: u64, endpoints: &Endpoints) {
        if let Some(state) = self.live_mut(sk)
            && state.endpoints == *endpoints
        {
            state.owner_refused = true;
        }
    }

    /// A live connection's state, without refreshing its place in the LRU order.
    pub(crate) fn live_mut(&mut self, sk: u64) -> Option<&mut ConnectionState> {
        self.live.peek_mut(&sk)
    }

    /// The newest dropped connection on these endpoints.
    pub(crate) fn dropped_mut(&mut self, endpoints: &Endpoints) -> Option<&mut ConnectionState> {
        let index = *self.newest_dropped.get(&self.fingerprints.of(endpoints))?;
        let list = &self.dropped[index.class as usize];
        // Each list is in drop order.
        let found = list
            .binary_search_by_key(&index.order, |&(order, _)| order)
            .ok()
            .filter(|&at| list[at].1.endpoints == *endpoints);
        let (class, at) = match found {
            Some(at) => (index.class, at),
            // The newest on this fingerprint is another endpoints'.
            None => newest_dropped_where(&self.dropped, |state| state.endpoints == *endpoints)
                .map(|(_, class, at)| (class, at))?,
        };
        self.dropped[class as usize]
            .get_mut(at)
            .map(|(_, state)| state)
    }

    /// Forgets dropped connections older than the retention.
    pub(crate) fn expire(&mut self, now: Instant) {
        for class in DropClass::ALL {
            while let Some((order, state)) = self.dropped[class as usize]
                .pop_front_if(|(_, state)| now.duration_since(state.updated) >= self.retention)
            {
                self.unindex(class, order, self.fingerprints.of(&state.endpoints));
            }
        }
    }

    /// Forgets every connection, live or dropped, of these namespaces (gone, or their inode now
    /// names another namespace), so their per-connection series vanish with the aggregates.
    /// One pass over the table. Returns how many were forgotten.
    pub(crate) fn forget_namespaces(&mut self, inodes: &HashSet<u32>) -> usize {
        let before = self.live.len() + self.dropped_len();
        let live: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, state)| inodes.contains(&state.endpoints.netns))
            .map(|(&sk, _)| sk)
            .collect();
        for sk in live {
            self.live.pop(&sk);
        }
        for list in &mut self.dropped {
            list.retain(|(_, state)| !inodes.contains(&state.endpoints.netns));
        }
        self.reindex();
        before - self.live.len() - self.dropped_len()
    }

    /// Removes the live connections whose socket is gone: those [`VANISHED_AFTER`] audit walks
    /// in a row did not find. `walked` is one complete walk's sockets of the established table
    /// (every connection of the namespaces whose sockets the host's tables hold), begun at
    /// `started`. A connection whose close never reached the agent (its record lost to a full
    /// ring buffer, or a close the kernel ran no program for) would otherwise keep its live
    /// entry, its series and its unanswered probes until the table's bound pushed it out.
    /// Not judged: a connection with a record since `started`, and one in a namespace none of
    /// whose connections the walk found (a namespace with tables of its own,
    /// `tcp_child_ehash_entries`, is not in the host's). Two walks, not one: the walk is
    /// lockless, and a socket whose chain changed while it passed may be missed once. Returns
    /// how many were removed.
    pub(crate) fn reconcile<'a>(
        &mut self,
        walked: impl Iterator<Item = (u64, &'a Endpoints)>,
        covered: &WalkedNamespaces,
        started: Instant,
    ) -> usize {
        // A lookup per socket walked, without promoting anything in the LRU order: no copy of
        // the walk is kept (it can be every socket on the host).
        for (sk, endpoints) in walked {
            if let Some(state) = self.live.peek_mut(&sk)
                && state.endpoints == *endpoints
            {
                state.found_by_walk = true;
            }
        }
        let mut gone = Vec::new();
        for (&sk, state) in self.live.iter_mut() {
            if std::mem::take(&mut state.found_by_walk) || state.updated >= started {
                state.missed_walks = 0;
            } else if covered.contains(&state.endpoints) {
                state.missed_walks = state.missed_walks.saturating_add(1);
                if state.missed_walks >= VANISHED_AFTER {
                    gone.push(sk);
                }
            }
        }
        for sk in &gone {
            self.live.pop(sk);
        }
        self.vanished += gone.len() as u64;
        gone.len()
    }

    /// Live connections [`Self::reconcile`] removed, since start.
    pub(crate) fn vanished(&self) -> u64 {
        self.vanished
    }

    /// The ports (remote, local) of every live connection.
    pub(crate) fn live_ports(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        self.live
            .iter()
            .map(|(_, state)| (state.endpoints.remote.port(), state.endpoints.local.port()))
    }

    pub(crate) fn live_len(&self) -> usize {
        self.live.len()
    }

    pub(crate) fn dropped_len(&self) -> usize {
        self.dropped.iter().map(VecDeque::len).sum()
    }

    /// Dropped connections evicted (or not kept) before their retention, since start.
    pub(crate) fn dropped_evictions(&self, class: DropClass) -> u64 {
        self.dropped_evictions[class as usize]
    }

    /// Connections pushed out by the size bounds, since start.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Connections that deserve a series, in the order `--connections.max-series` keeps them:
    /// keepalive drops (newest first), live connections that have probed (most unanswered
    /// probes first), then other drops (newest first). A flood of resets can hide other drops,
    /// never a keepalive drop or a connection whose peer stopped answering.
    pub(crate) fn reportable(&self) -> Vec<&ConnectionState> {
        let mut live: Vec<&ConnectionState> = self
            .live
            .iter()
            .map(|(_, state)| state)
            .filter(|state| state.probes_sent > 0 || state.unanswered_probes > 0)
            .collect();
        live.sort_by(|a, b| {
            (b.unanswered_probes, b.probes_sent).cmp(&(a.unanswered_probes, a.probes_sent))
        });
        let [keepalive, other] = &self.dropped;
        keepalive
            .iter()
            .rev()
            .map(|(_, state)| state)
            .chain(live)
            .chain(other.iter().rev().map(|(_, state)| state))
            .collect()
    }
}

/// The namespaces, by inode and cookie, that one audit walk found connections of: the only ones
/// whose connections [`ConnectionTable::reconcile`] judges. Built from the walk before the
/// table is locked, since it hashes every socket walked (every one on the host).
pub(crate) struct WalkedNamespaces(HashSet<(u32, u64), foldhash::fast::RandomState>);

impl WalkedNamespaces {
    pub(crate) fn of<'a>(walked: impl Iterator<Item = &'a Endpoints>) -> Self {
        Self(walked.map(|e| (e.netns, e.netns_cookie)).collect())
    }

    fn contains(&self, endpoints: &Endpoints) -> bool {
        self.0.contains(&(endpoints.netns, endpoints.netns_cookie))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decoder::{KeepaliveSettings, SocketOwner, fixtures};

    const SETTINGS: KeepaliveSettings = KeepaliveSettings {
        enabled: true,
        idle_jiffies: 250,
        interval_jiffies: 250,
        probes: 3,
        user_timeout_ms: 0,
    };

    fn endpoints(port: u16) -> Endpoints {
        Endpoints {
            netns: 7,
            netns_cookie: 0,
            local: format!("127.0.0.1:{port}").parse().unwrap(),
            remote: "127.0.0.1:80".parse().unwrap(),
        }
    }

    fn expiry(sk: u64, port: u16, before: u8, after: u8) -> KeepaliveExpiry {
        KeepaliveExpiry {
            sk,
            endpoints: endpoints(port),
            owner: SocketOwner::default(),
            probes_out_before: before,
            probes_out_after: Some(after),
            probes_sent: after.saturating_sub(before),
            closed_in_timer: false,
            settings: SETTINGS,
            ktime: 0,
        }
    }

    #[test]
    fn a_refused_owner_lookup_is_asked_again_at_the_next_expiry_only() {
        let mut t = ConnectionTable::new(NonZeroUsize::new(4).unwrap(), 4, Duration::from_secs(60));
        let now = Instant::now();
        let first = t.on_expiry(&expiry(1, 1000, 0, 1), now);
        assert!(first.entered && !first.owner_retry);
        t.owner_refused(1, &endpoints(1000));
        let retry = t.on_expiry(&expiry(1, 1000, 0, 1), now);
        assert!(!retry.entered && retry.owner_retry);
        assert!(!t.on_expiry(&expiry(1, 1000, 0, 1), now).owner_retry);

        // Endpoints that are not the slot's connection: nothing marked.
        t.owner_refused(1, &endpoints(2000));
        assert!(!t.on_expiry(&expiry(1, 1000, 0, 1), now).owner_retry);
    }

    #[test]
    fn a_connection_two_walks_in_a_row_miss_is_gone_and_nothing_else() {
        let mut t = ConnectionTable::new(NonZeroUsize::new(8).unwrap(), 4, Duration::from_secs(60));
        let t0 = Instant::now();
        let own_tables = Endpoints {
            netns: 8,
            ..endpoints(4000)
        };
        for (sk, port) in [(1, 1000), (2, 2000), (3, 3000)] {
            t.on_expiry(&expiry(sk, port, 0, 1), t0);
        }
        t.on_expiry(
            &KeepaliveExpiry {
                endpoints: own_tables,
                ..expiry(4, 4000, 0, 1)
            },
            t0,
        );
        let at = |s: u64| t0 + Duration::from_secs(s);
        let reconcile = |t: &mut ConnectionTable, walked: &[(u64, &Endpoints)], started| {
            let covered = WalkedNamespaces::of(walked.iter().map(|&(_, e)| e));
            t.reconcile(walked.iter().copied(), &covered, started)
        };
        let (e1, e3, other) = (endpoints(1000), endpoints(3000), endpoints(9000));
        // 2 and 3 missed once; 4's namespace had no connection in the walk: not judged.
        assert_eq!(reconcile(&mut t, &[(1, &e1), (9, &other)], at(1)), 0);
        // 3 found again; 2 missed twice, its slot now another connection's: gone.
        let reused = endpoints(5555);
        assert_eq!(
            reconcile(&mut t, &[(1, &e1), (2, &reused), (3, &e3)], at(2)),
            1
        );
        assert_eq!(t.vanished(), 1);
        let live = |t: &ConnectionTable| {
            let mut sks: Vec<u64> = t.live.iter().map(|(&sk, _)| sk).collect();
            sks.sort_unstable();
            sks
        };
        assert_eq!(live(&t), [1, 3, 4]);
        // 3 was found by the last walk: one miss is not two. 1 had a record after the walk
        // began: not judged either.
        t.on_expiry(&expiry(1, 1000, 0, 1), at(4));
        assert_eq!(reconcile(&mut t, &[(9, &other)], at(3)), 0);
        assert_eq!(live(&t), [1, 3, 4]);
        assert_eq!(reconcile(&mut t, &[(9, &other)], at(5)), 1);
        assert_eq!(live(&t), [1, 4]);
        assert_eq!(t.vanished(), 2);
    }

    fn close(sk: u64, port: u16, probes_out: u8) -> CloseEvent {
        CloseEvent {
            sk,
            endpoints: endpoints(port),
            probes_out,
            ..fixtures::keepalive_abort()
        }
    }

    fn table() -> ConnectionTable {
        ConnectionTable::new(NonZeroUsize::new(2).unwrap(), 2, Duration::from_secs(60))
    }

    #[test]
    fn blackholed_connection_accumulates_unanswered_probes_then_drops() {
        let mut t = table();
        let now = Instant::now();
        for (before, after) in [(0, 1), (1, 2), (2, 3)] {
            assert!(t.on_expiry(&expiry(1, 1000, before, after), now).probe_sent);
        }
        let dropped = t
            .on_close(
                &close(1, 1000, 3),
                CloseOutcome::Dropped(DropReason::KeepaliveTimeout),
                now,
            )
            .unwrap()
            .clone();
        assert_eq!(dropped.probes_sent, 3);
        assert_eq!(dropped.unanswered_probes, 3);
        assert_eq!(dropped.dropped, Some(DropReason::KeepaliveTimeout));
        assert_eq!(t.live_len(), 0);
        assert_eq!(t.reportable().len(), 1);
    }

    #[test]
    fn answered_probes_leave_nothing_unanswered() {
        let mut t = table();
        let now = Instant::now();
        t.on_expiry(&expiry(1, 1000, 0, 1), now);
        let out = t.on_expiry(&expiry(1, 1000, 0, 1), now);
        assert!(out.probe_sent);
        let state = t.reportable()[0].clone();
        assert_eq!((state.probes_sent, state.unanswered_probes), (2, 0));
        // A streak that had gone unanswered and then got its ACK.
        t.on_expiry(&expiry(1, 1000, 1, 2), now);
        assert!(t.on_expiry(&expiry(1, 1000, 0, 1), now).streak_answered);
    }

    #[test]
    fn abort_expiry_reported_after_the_close_does_not_revive_the_connection() {
        let mut t = table();
        let now = Instant::now();
        t.on_expiry(&expiry(1, 1000, 0, 1), now);
        t.on_close(
            &close(1, 1000, 3),
            CloseOutcome::Dropped(DropReason::KeepaliveTimeout),
            now,
        );
        let mut abort = expiry(1, 1000, 3, 3);
        abort.closed_in_timer = true;
        abort.probes_out_after = None;
        assert_eq!(t.on_expiry(&abort, now), ExpiryOutcome::default());
        assert_eq!(t.live_len(), 0);
        assert_eq!(t.reportable().len(), 1);
    }

    #[test]
    fn idle_expiries_without_probes_are_not_tracked() {
        let mut t = table();
        let out = t.on_expiry(&expiry(1, 1000, 0, 0), Instant::now());
        assert!(!out.probe_sent);
        assert_eq!(t.live_len(), 0);
    }

    #[test]
    fn only_the_first_tracked_expiry_asks_for_the_workload() {
        let mut t = table();
        let now = Instant::now();
        assert!(!t.on_expiry(&expiry(1, 1000, 0, 0), now).entered);
        assert!(t.on_expiry(&expiry(1, 1000, 0, 1), now).entered);
        assert!(!t.on_expiry(&expiry(1, 1000, 1, 2), now).entered);
        t.live_mut(1).expect("tracked").workload.pid = Some(42);
        let dropped = t
            .on_close(
                &close(1, 1000, 3),
                CloseOutcome::Dropped(DropReason::KeepaliveTimeout),
                now,
            )
            .expect("reported");
        // What was learnt while the connection was live goes with it into the dropped list.
        assert_eq!(dropped.workload.pid, Some(42));
        // A slot reused by another connection starts over.
        assert!(t.on_expiry(&expiry(1, 2000, 0, 1), now).entered);
        assert_eq!(
            t.live_mut(1).expect("tracked").workload,
            Workload::default()
        );
    }

    #[test]
    fn reused_socket_slot_starts_a_new_connection() {
        let mut t = table();
        let now = Instant::now();
        t.on_expiry(&expiry(1, 1000, 0, 1), now);
        t.on_expiry(&expiry(1, 2000, 0, 1), now);
        let states = t.reportable();
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].endpoints.local.port(), 2000);
        assert_eq!(states[0].probes_sent, 1);
    }

    #[test]
    fn bounds_evict_and_count() {
        let mut t = table();
        let now = Instant::now();
        for sk in 1..=3 {
            t.on_expiry(&expiry(sk, 1000 + sk as u16, 0, 1), now);
        }
        assert_eq!(t.live_len(), 2);
        assert_eq!(t.evictions(), 1);
        for sk in 1..=3 {
            t.on_close(
                &close(sk, 1000 + sk as u16, 3),
                CloseOutcome::Dropped(DropReason::KeepaliveTimeout),
                now,
            );
        }
        assert_eq!(t.dropped_len(), 2);
        assert_eq!(t.evictions(), 2);
    }

    #[test]
    fn a_keepalive_drop_keeps_its_series_through_a_flood_of_resets() {
        let mut t = ConnectionTable::new(NonZeroUsize::new(8).unwrap(), 4, Duration::from_secs(60));
        let now = Instant::now();
        t.on_expiry(&expiry(1, 1000, 2, 3), now);
        t.on_close(
            &close(1, 1000, 3),
            CloseOutcome::Dropped(DropReason::KeepaliveTimeout),
            now,
        );
        // A connection whose peer stopped answering, still live.
        t.on_expiry(&expiry(2, 1001, 1, 2), now);
        // RST churn: far more resets than the dropped list holds.
        for sk in 10..1010u64 {
            let dropped = t.on_close(
                &close(sk, sk as u16, 0),
                CloseOutcome::Dropped(DropReason::ResetReceived),
                now,
            );
            assert!(dropped.is_some(), "every drop is still reported");
        }
        assert_eq!(t.dropped_len(), 4);
        assert_eq!(t.dropped_evictions(DropClass::Other), 1000 - 3);
        assert_eq!(t.dropped_evictions(DropClass::Keepalive), 0);
        // Under a cap of two series, the keepalive drop and the silent peer are what is shown.
        let shown: Vec<u16> = t.reportable()[..2]
            .iter()
            .map(|s| s.endpoints.local.port())
            .collect();
        assert_eq!(shown, [1000, 1001]);

        // Keepalive drops filling the list push out the resets, then only the oldest of their own.
        for sk in 2000..2005u64 {
            t.on_close(
                &close(sk, sk as u16, 3),
                CloseOutcome::Dropped(DropReason::KeepaliveTimeout),
                now,
            );
        }
        assert_eq!(t.dropped_evictions(DropClass::Other), 1000);
        assert_eq!(t.dropped_evictions(DropClass::Keepalive), 2);
        let oldest = t.reportable()[3].endpoints.local.port();
        assert_eq!(oldest, 2001);
        // A reset now finds no room and is not kept.
        assert!(
            t.on_close(
                &close(3000, 3000, 0),
                CloseOutcome::Dropped(DropReason::ResetReceived),
                now
            )
            .is_some()
        );
        assert_eq!(t.dropped_evictions(DropClass::Other), 1001);
        assert_eq!(t.dropped_len(), 4);
    }

    #[test]
    fn dropped_lookup_finds_the_newest_entry_on_reused_endpoints_as_entries_leave() {
        dropped_lookup_as_entries_leave(u64::MAX);
    }

    #[test]
    fn dropped_lookup_is_right_when_every_endpoints_share_one_fingerprint() {
        // Every index entry then counts every dropped entry and names the newest of all, which
        // is mostly another endpoints': each lookup must check it and find its own.
        dropped_lookup_as_entries_leave(0);
    }

    /// Drops on reused endpoints across both lists, evictions and a forgotten namespace, with
    /// the fingerprints masked by `mask`.
    fn dropped_lookup_as_entries_leave(mask: u64) {
        let mut t = ConnectionTable::new(NonZeroUsize::new(8).unwrap(), 3, Duration::from_secs(60));
        t.fingerprints.mask = mask;
        let now = Instant::now();
        let drop = |t: &mut ConnectionTable, sk: u64, port: u16, reason: DropReason| {
            t.on_close(&close(sk, port, 3), CloseOutcome::Dropped(reason), now);
        };
        // The same endpoints dropped twice, first by a reset, then by keepalive, in two lists.
        drop(&mut t, 1, 1000, DropReason::ResetReceived);
        drop(&mut t, 2, 1000, DropReason::KeepaliveTimeout);
        assert_eq!(
            t.dropped_mut(&endpoints(1000)).unwrap().dropped,
            Some(DropReason::KeepaliveTimeout)
        );
        assert!(t.dropped_mut(&endpoints(1001)).is_none());
        // Another reset evicts nothing yet; the next keepalive drop evicts the older reset.
        drop(&mut t, 3, 1001, DropReason::ResetReceived);
        assert_eq!(
            t.dropped_mut(&endpoints(1001)).unwrap().dropped,
            Some(DropReason::ResetReceived)
        );
        drop(&mut t, 4, 1002, DropReason::KeepaliveTimeout);
        assert_eq!(t.dropped_evictions(DropClass::Other), 1);
        assert_eq!(
            t.dropped_mut(&endpoints(1000)).unwrap().dropped,
            Some(DropReason::KeepaliveTimeout)
        );
        // A newer reset on 1000 is found first; once evicted, the keepalive drop is again.
        drop(&mut t, 5, 1000, DropReason::ResetReceived);
        assert_eq!(
            t.dropped_mut(&endpoints(1000)).unwrap().dropped,
            Some(DropReason::ResetReceived)
        );
        drop(&mut t, 6, 1003, DropReason::KeepaliveTimeout);
        assert_eq!(
            t.dropped_mut(&endpoints(1000)).unwrap().dropped,
            Some(DropReason::KeepaliveTimeout)
        );
        // Forgetting a namespace rebuilds the index: nothing of it is found afterwards.
        let mut gone = HashSet::new();
        gone.insert(endpoints(1000).netns);
        t.forget_namespaces(&gone);
        assert!(t.dropped_mut(&endpoints(1000)).is_none());
        assert_eq!(t.newest_dropped.len(), 0);
    }

    #[test]
    fn dropped_connections_expire_after_retention() {
        let mut t = table();
        let now = Instant::now();
        t.on_close(
            &close(1, 1000, 0),
            CloseOutcome::Dropped(DropReason::ResetReceived),
            now,
        );
        t.expire(now + Duration::from_secs(59));
        assert_eq!(t.dropped_len(), 1);
        t.expire(now + Duration::from_secs(60));
        assert_eq!(t.dropped_len(), 0);
    }

    #[test]
    fn forgetting_a_namespace_removes_its_live_and_dropped_connections_only() {
        let mut t = ConnectionTable::new(NonZeroUsize::new(8).unwrap(), 8, Duration::from_secs(60));
        let now = Instant::now();
        let in_netns = |mut e: KeepaliveExpiry, netns: u32| {
            e.endpoints.netns = netns;
            e
        };
        t.on_expiry(&in_netns(expiry(1, 1000, 0, 1), 7), now);
        t.on_expiry(&in_netns(expiry(2, 1001, 0, 1), 8), now);
        t.on_expiry(&in_netns(expiry(3, 1002, 0, 1), 7), now);
        let mut dropped = close(4, 1003, 0);
        dropped.endpoints.netns = 7;
        t.on_close(
            &dropped,
            CloseOutcome::Dropped(DropReason::ResetReceived),
            now,
        );
        assert_eq!(t.forget_namespaces(&HashSet::from([7])), 3);
        let left = t.reportable();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].endpoints.netns, 8);
        assert_eq!(t.forget_namespaces(&HashSet::from([7])), 0);
    }

    #[test]
    fn orderly_close_forgets_without_reporting() {
        let mut t = table();
        let now = Instant::now();
        t.on_expiry(&expiry(1, 1000, 0, 1), now);
        assert!(
            t.on_close(&close(1, 1000, 0), CloseOutcome::Orderly, now)
                .is_none()
        );
        assert!(t.reportable().is_empty());
    }
}
