//! One decoded record applied to the connection table and the classifier. Nothing here reads a
//! file or waits: the pipeline's attribution worker looks owners up with the table lock released
//! and hands the results back with [`Tracker::set_workload`] / [`Tracker::complete_workload`].

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use keepalive_ebpf::tcp_state;

use crate::{
    attribution::Workload,
    record::decoder::{AuditedSocket, CloseEvent, Endpoints, KeepaliveExpiry},
    track::{
        classifier::{self, CloseOutcome, DropReason, ResetReasons},
        connection_table::{ConnectionState, ConnectionTable, ExpiryOutcome, WalkedNamespaces},
        idle_kill::{self, IdleKill, NodeThresholds},
    },
};

/// A connection the kernel dropped: why, and what the pipeline uses of its final state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dropped {
    pub(crate) reason: DropReason,
    pub(crate) connection: DroppedConnection,
}

/// What the pipeline uses of a dropped connection's final state, which the table keeps. Not a
/// copy of that state: its owner's three cgroup names are refcounted, and a copy taken and
/// dropped at every RST close under churn was six atomic operations for nothing. Its endpoints
/// are the close record's (the table keeps a state only under those).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DroppedConnection {
    pub(crate) probes_sent: u64,
    pub(crate) unanswered_probes: u8,
    pub(crate) idle_kill: Option<Box<IdleKill>>,
    /// Whether its owner's process, and its cgroup's path, are known.
    pub(crate) pid_known: bool,
    pub(crate) cgroup_path_known: bool,
    /// Its owner, when the caller asked for it (events carry it).
    pub(crate) workload: Option<Workload>,
}

impl DroppedConnection {
    fn of(state: &ConnectionState, with_workload: bool) -> Self {
        Self {
            probes_sent: state.probes_sent,
            unanswered_probes: state.unanswered_probes,
            idle_kill: state.idle_kill.clone(),
            pid_known: state.workload.pid.is_some(),
            cgroup_path_known: state.workload.cgroup_path().is_some(),
            workload: with_workload.then(|| state.workload.clone()),
        }
    }
}

/// The connection table (shared with the metrics collector, which renders it at scrape time)
/// and what the classifier needs to know about this kernel.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    table: Arc<Mutex<ConnectionTable>>,
    reset_reasons: ResetReasons,
    /// CONFIG_HZ, for the idle-kill silence.
    hz: u32,
    /// Node-wide middlebox idle timeouts a drop is checked against, besides its namespace's
    /// conntrack timeout.
    idle_thresholds: NodeThresholds,
}

impl Tracker {
    pub(crate) fn new(
        table: Arc<Mutex<ConnectionTable>>,
        reset_reasons: ResetReasons,
        hz: u32,
    ) -> Self {
        Self {
            table,
            reset_reasons,
            hz,
            idle_thresholds: NodeThresholds::default(),
        }
    }

    /// Checks every drop against these middlebox idle timeouts ([`idle_kill::classify`]).
    pub(crate) fn with_idle_thresholds(mut self, thresholds: NodeThresholds) -> Self {
        self.idle_thresholds = thresholds;
        self
    }

    fn table(&self) -> MutexGuard<'_, ConnectionTable> {
        self.table.lock().expect("connection table lock poisoned")
    }

    /// One keepalive timer expiry.
    pub(crate) fn expiry(&self, expiry: &KeepaliveExpiry, now: Instant) -> ExpiryOutcome {
        self.table().on_expiry(expiry, now)
    }

    /// See [`ConnectionTable::owner_refused`].
    pub(crate) fn owner_refused(&self, sk: u64, endpoints: &Endpoints) {
        self.table().owner_refused(sk, endpoints);
    }

    /// The endpoints of the live connection on this socket, if the table holds one.
    pub(crate) fn live_endpoints(&self, sk: u64) -> Option<Endpoints> {
        self.table().live_mut(sk).map(|state| state.endpoints)
    }

    /// One move to `TCP_CLOSE`; `None` when it was not a drop. `known`: what the caller
    /// already knows of the owner (a cached cgroup), filled into a dropped entry that lacks it;
    /// `with_workload`: the owner comes back with the drop.
    pub(crate) fn close(
        &self,
        close: &CloseEvent,
        now: Instant,
        known: Option<Workload>,
        with_workload: bool,
    ) -> Option<Dropped> {
        let outcome = classifier::classify(close, self.reset_reasons);
        let CloseOutcome::Dropped(reason) = outcome else {
            self.table().on_close(close, outcome, now);
            return None;
        };
        let idle_kill = idle_kill::classify(close, reason, self.hz, &self.idle_thresholds.get());
        let connection = self.table().on_close_with(
            close,
            outcome,
            now,
            known,
            idle_kill.map(Box::new),
            |state| DroppedConnection::of(state, with_workload),
        )?;
        Some(Dropped { reason, connection })
    }

    /// The owner of a connection as known so far: the live one on `sk` if it is still this
    /// connection, else its dropped entry; `None` when the table forgot it.
    pub(crate) fn known_workload(&self, sk: u64, endpoints: &Endpoints) -> Option<Workload> {
        let mut table = self.table();
        if let Some(state) = table.live_mut(sk)
            && state.endpoints == *endpoints
        {
            return Some(state.workload.clone());
        }
        table
            .dropped_mut(endpoints)
            .map(|state| state.workload.clone())
    }

    /// Records the owner of a connection that entered the table or became at risk
    /// (`process`: its process was looked for). The lookup ran while the table went on: if the
    /// connection has been dropped since, its dropped entry learns what it did not know yet.
    pub(crate) fn set_workload(
        &self,
        sk: u64,
        endpoints: &Endpoints,
        workload: Workload,
        process: bool,
    ) {
        let mut table = self.table();
        if let Some(state) = table.live_mut(sk)
            && state.endpoints == *endpoints
        {
            if process && workload.pid.is_none() {
                // Not found (the /proc read budget was spent, or the holder was not readable):
                // the next unanswered probe asks again, each time within that budget.
                state.at_risk_seen = false;
            }
            state.workload = workload;
        } else if let Some(state) = table.dropped_mut(endpoints) {
            state.workload.fill_unknown_from(workload);
        }
    }

    /// Completes what is known of a dropped connection's owner with a later lookup (the
    /// process may have exited since; what was learnt earlier stays). Returns the result.
    pub(crate) fn complete_workload(
        &self,
        endpoints: &Endpoints,
        known: &Workload,
        newer: Workload,
    ) -> Workload {
        let mut workload = known.clone();
        workload.fill_unknown_from(newer);
        if let Some(state) = self.table().dropped_mut(endpoints) {
            state.workload = workload.clone();
        }
        workload
    }

    /// Forgets the connections of these namespaces (see
    /// [`ConnectionTable::forget_namespaces`]).
    pub(crate) fn forget_namespaces(&self, inodes: &std::collections::HashSet<u32>) -> usize {
        self.table().forget_namespaces(inodes)
    }

    /// Removes the live connections whose socket one more audit walk did not find (see
    /// [`ConnectionTable::reconcile`]); `sockets` is the whole walk, begun at `started`.
    pub(crate) fn reconcile(&self, sockets: &[AuditedSocket], started: Instant) -> usize {
        // Listening sockets come from their own table, which a namespace with established
        // tables of its own shares with the host: they say nothing about its connections.
        let walked = sockets
            .iter()
            .filter(|s| s.state != tcp_state::LISTEN)
            .map(|s| (s.sk, &s.endpoints));
        // Before the lock: records wait in the ring buffer while the table is locked.
        let covered = WalkedNamespaces::of(walked.clone().map(|(_, e)| e));
        self.table().reconcile(walked, &covered, started)
    }

    /// Calls `f` with the ports (remote, local) of every live connection, the table locked
    /// meanwhile.
    pub(crate) fn with_live_ports<R>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = (u16, u16)>) -> R,
    ) -> R {
        f(&mut self.table().live_ports())
    }
}
