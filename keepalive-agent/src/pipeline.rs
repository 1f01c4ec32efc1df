//! One record from the ring buffer, end to end: decode → connection table → classify → metrics.
//! Who owns a connection is asked of the attribution worker ([`attribution_worker`]): the drain
//! never reads a file.

mod attribution_worker;
pub(crate) mod benchmark;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use log::{debug, info, warn};
use tokio::sync::{mpsc, watch};

use crate::{
    attribution::{Attributor, Workload},
    export::{
        events::{ConnectionEvent, EventKind, EventSender, IdleKillFields, WorkloadFields},
        labels::{AggregateBy, AggregateLabels},
        metrics::PipelineMetrics,
    },
    kernel::{Session, tracked::TrackedMarksMap},
    record::{
        decoder::{self, CloseEvent, Endpoints, Event, KeepaliveExpiry, SocketOwner},
        netns_counters::Sweep,
        ring_reader,
    },
    track::{
        classifier::{DropReason, ResetReasons},
        connection_table::{ConnectionTable, ExpiryOutcome},
        idle_kill::NodeThresholds,
        namespaces::{NamespaceIdentity, Sighting},
        tracker::{Dropped, DroppedConnection, Tracker},
    },
};
use attribution_worker::{Count, InFlightHandle, Job, Requests, Resolve, Worker};

/// Which namespace each `netns` inode means, shared by the pipeline (records), the audit (walks
/// that found sockets) and the retention sweep.
pub(crate) type SharedNamespaces = Arc<Mutex<NamespaceIdentity>>;

/// The stages for one record: decode, count, track (table and classifier), then the event
/// stream and logs; attribution is requested from the worker.
pub(crate) struct Pipeline {
    tracker: Tracker,
    metrics: PipelineMetrics,
    /// CONFIG_HZ: receive stamps and keepalive settings are in jiffies.
    hz: u32,
    /// The event stream (`--events`, `watch`), when someone reads it.
    events: Option<EventSender>,
    /// Who owns a connection: the drain reads only its cgroup cache; the worker looks up.
    resolver: Arc<dyn Resolve>,
    /// Labels of the aggregate probe and drop counters (`--aggregate-by`).
    aggregate_by: AggregateBy,
    /// Namespace identity by (inode, cookie): a reused inode resets its series.
    namespaces: SharedNamespaces,
    /// Jobs for the attribution worker.
    requests: Requests,
    /// The worker's end of the queue until [`Self::run`] starts it (a mutex only so that the
    /// pipeline is `Sync`: the drain borrows it across awaits).
    inbox: Mutex<Option<(mpsc::Receiver<Job>, InFlightHandle)>>,
}

/// What the shutdown got through ([`Pipeline::run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Records left in the ring buffer when the programs were detached.
    pub remaining: ring_reader::Remaining,
    /// The attribution worker did every queued job (events waiting for an owner were sent).
    pub worker_finished: bool,
}

/// How often the shutdown looks whether the attribution worker is done.
const WORKER_POLL: Duration = Duration::from_millis(10);

/// The aggregate label set of one record, or what the worker needs to find it.
enum Aggregate {
    /// No aggregate for this record (one without an owner, with workload labels).
    None,
    Labels(AggregateLabels),
    /// Workload labels whose cgroup was not cached: the worker counts it.
    Later {
        endpoints: Endpoints,
        owner: SocketOwner,
    },
}

impl Pipeline {
    /// A pipeline for this kernel that counts into `metrics` and keeps connections in `table`;
    /// it attributes with `attributor` and aggregates by namespace until told otherwise.
    pub(crate) fn new(
        session: &Session,
        table: Arc<Mutex<ConnectionTable>>,
        metrics: PipelineMetrics,
        attributor: Arc<Attributor>,
    ) -> Self {
        let reset_reasons = ResetReasons {
            keepalive_timeout: session.layout.rst_reason_keepalive_timeout,
        };
        Self::with_kernel(session.hz, reset_reasons, table, metrics, attributor)
    }

    /// [`Self::new`] from the two facts it takes from the kernel.
    fn with_kernel(
        hz: u32,
        reset_reasons: ResetReasons,
        table: Arc<Mutex<ConnectionTable>>,
        metrics: PipelineMetrics,
        resolver: Arc<dyn Resolve>,
    ) -> Self {
        let (requests, jobs, in_flight) = attribution_worker::queue(
            attribution_worker::QUEUE_CAPACITY,
            metrics.attribution_requests_dropped.clone(),
        );
        Self {
            tracker: Tracker::new(table, reset_reasons, hz),
            metrics,
            hz,
            events: None,
            resolver,
            aggregate_by: AggregateBy::default(),
            namespaces: SharedNamespaces::default(),
            requests,
            inbox: Mutex::new(Some((jobs, in_flight))),
        }
    }

    /// Checks every drop against these middlebox idle timeouts (`--idle-timeout-threshold`).
    /// (Its metrics count them under the names given to
    /// [`PipelineMetrics::with_idle_thresholds`].)
    pub(crate) fn with_idle_thresholds(mut self, thresholds: NodeThresholds) -> Self {
        self.tracker = self.tracker.with_idle_thresholds(thresholds);
        self
    }

    /// Also sends connection events to `events`.
    pub(crate) fn with_events(mut self, events: EventSender) -> Self {
        self.events = Some(events);
        self
    }

    /// Splits the aggregate counters by these labels.
    pub(crate) fn aggregated_by(mut self, aggregate_by: AggregateBy) -> Self {
        self.aggregate_by = aggregate_by;
        self
    }

    /// Namespace identity, for the audit to mark the namespaces it found alive.
    pub(crate) fn namespaces(&self) -> SharedNamespaces {
        Arc::clone(&self.namespaces)
    }

    /// The connection table this pipeline updates, for the audit's walks to find the gone
    /// connections of.
    pub(crate) fn tracker(&self) -> Tracker {
        self.tracker.clone()
    }

    /// The sweep that removes the series and connections of namespaces not seen for
    /// `retention`; run it with [`NamespaceRetention::run`].
    pub(crate) fn namespace_retention(&self, retention: Duration) -> NamespaceRetention {
        NamespaceRetention {
            namespaces: Arc::clone(&self.namespaces),
            metrics: self.metrics.clone(),
            tracker: self.tracker.clone(),
            retention,
        }
    }

    /// The renewal, every `period`, of the kernel's marks of the connections this pipeline's
    /// table holds.
    pub(crate) fn marks_renewal(&self, marks: TrackedMarksMap, period: Duration) -> MarksRenewal {
        MarksRenewal {
            tracker: self.tracker.clone(),
            marks,
            period,
            metrics: self.metrics.clone(),
        }
    }

    /// Starts the attribution worker, then drains the ring buffer until `stop` turns true.
    /// Then the shutdown: `detach` (the caller detaches the programs, so no record arrives
    /// after it), the records still in the ring, then the worker's queue, all within `budget`
    /// from the stop. Once this returns, the pipeline and its worker are gone, and with them
    /// every sender of the event stream: its writer sees the channel close after the last event.
    pub(crate) async fn run(
        self,
        ring: RingBuf<MapData>,
        mut stop: watch::Receiver<bool>,
        detach: impl FnOnce(),
        budget: Duration,
    ) -> std::io::Result<Drained> {
        let (worker, jobs) = self.take_worker();
        let worker = worker.spawn(jobs)?;
        let mut handle = |record: &[u8], now| self.handle_at(record, now);
        // On the drain's task, so nothing else holds the queue's sender: once the drain
        // returns, the retries stop with it.
        let retries = async {
            let mut ticker = tokio::time::interval(attribution_worker::RETRY_PERIOD);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                self.retry_deferred();
            }
        };
        let mut ring = tokio::select! {
            drained = ring_reader::drain(ring, &mut handle, &mut stop) => drained?,
            () = retries => unreachable!("the retries loop forever"),
        };
        let deadline = tokio::time::Instant::now() + budget;
        detach();
        let remaining = ring_reader::drain_remaining(&mut ring, deadline, &mut handle).await;
        drop(ring);
        // The queue's only sender: the worker ends once it has done what is queued.
        drop(self);
        while !worker.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(WORKER_POLL).await;
        }
        Ok(Drained {
            remaining,
            worker_finished: worker.is_finished(),
        })
    }

    /// Asks again the owner lookups a full queue refused ([`Requests::defer`]) of connections
    /// the table still holds, as far as the queue has room.
    pub(crate) fn retry_deferred(&self) -> usize {
        self.requests
            .resend_deferred(|sk| self.tracker.live_endpoints(sk))
    }

    /// The worker for this pipeline's queue, with the same table, metrics, labels and events.
    fn take_worker(&self) -> (Worker, mpsc::Receiver<Job>) {
        let (jobs, in_flight) = self
            .inbox
            .lock()
            .expect("inbox lock poisoned")
            .take()
            .expect("the attribution worker is started once");
        let worker = Worker::new(
            Arc::clone(&self.resolver),
            self.tracker.clone(),
            self.metrics.clone(),
            self.aggregate_by.clone(),
            self.events.clone(),
            in_flight,
        );
        (worker, jobs)
    }

    /// One record, read now.
    #[cfg(test)]
    pub(crate) fn handle(&self, bytes: &[u8]) {
        self.handle_at(bytes, Instant::now());
    }

    /// One record, read at `now` (the reader's [`ring_reader::BatchClock`]).
    pub(crate) fn handle_at(&self, bytes: &[u8], now: Instant) {
        let event = match decoder::decode(bytes) {
            Ok(event) => event,
            Err(err) => {
                self.metrics.decode_errors.inc();
                warn!("dropping a kernel record: {err}");
                return;
            }
        };
        self.metrics.count_event(event.kind_name());
        if !matches!(event, Event::Audit(_)) {
            self.identify_namespace(event.endpoints(), now);
        }
        let aggregate = self.aggregate(&event);
        if let Aggregate::Labels(labels) = &aggregate {
            self.metrics.see(labels);
        }
        match event {
            Event::KeepaliveExpiry(expiry) => self.on_expiry(&expiry, aggregate, now),
            Event::Close(close) => self.on_close(&close, aggregate, now),
            // Audit records come from the iter/tcp file, never from the ring buffer.
            Event::Audit(_) => {
                self.metrics.decode_errors.inc();
            }
        }
    }

    fn on_expiry(&self, expiry: &KeepaliveExpiry, aggregate: Aggregate, now: Instant) {
        let outcome = self.tracker.expiry(expiry, now);
        // The process of a connection whose peer answers every probe names nothing an alert
        // needs, and finding it is the dearest lookup there is: it waits until a probe goes
        // unanswered (or the drop). The event stream shows each probe with its process, so
        // with it on every connection gets one at once.
        let asks = outcome.entered || outcome.owner_retry;
        let process = outcome.first_at_risk || (asks && self.events.is_some());
        if asks || process {
            let sent = self.requests.send(Job::Enter {
                sk: expiry.sk,
                endpoints: expiry.endpoints,
                owner: expiry.owner,
                process,
            });
            if let Err(job) = sent
                && asks
            {
                // A full queue (thousands of connections entering at once, as when the
                // agent starts on a busy node): asked again within a second while the queue
                // has room ([`Self::retry_deferred`]), else at the connection's next expiry
                // (with a peer that answers, a whole keepalive idle later), rather than leaving
                // its series without an owner until it closes. The process is asked again
                // only for the event stream, and a refused process lookup alone not before the
                // drop: asking again spent the worker's /proc budget where loopback's backlog
                // drops probes by the thousand (ARCHITECTURE.md, Attribution).
                if !self.requests.defer(&job, self.events.is_some()) {
                    self.tracker.owner_refused(expiry.sk, &expiry.endpoints);
                }
            }
        }
        let count = if outcome.probe_sent {
            // Once per connection, not per probe: a namespace's series and the table's
            // connections in it are forgotten together, so a namespace whose histograms were
            // removed has no connection left that probed.
            if outcome.first_probe {
                self.metrics.probe_sent(expiry.endpoints.netns);
            }
            Count::Probe
        } else {
            Count::Seen
        };
        self.count(aggregate, count);
        if let Some(events) = &self.events {
            let list = self.expiry_events(events, expiry, outcome);
            if !list.is_empty() {
                self.emit(expiry.sk, &expiry.endpoints, expiry.owner, None, list);
            }
        }
    }

    fn on_close(&self, close: &CloseEvent, aggregate: Aggregate, now: Instant) {
        // A cgroup already in the cache goes into the dropped entry as it is stored: no worker
        // job (and no search of the dropped list) per RST close.
        let cached = self.resolver.cached_cgroup(&close.owner);
        // The cache's answer (a path, or known to have none) is all a lookup would find.
        let cgroup_settled = cached.is_some();
        let Some(Dropped { reason, connection }) =
            self.tracker
                .close(close, now, cached, self.events.is_some())
        else {
            self.count(aggregate, Count::Seen);
            return;
        };
        let count = match connection.idle_kill.as_deref() {
            Some(kill) => Count::IdleKill {
                reason,
                threshold: kill.threshold.name.clone(),
                how: kill.how,
            },
            None => Count::Drop(reason),
        };
        if let (Aggregate::None, Some(kill)) = (&aggregate, connection.idle_kill.as_deref()) {
            // The kernel counts the drops (no label set per record), not idle kills: this one
            // is counted under its namespace's label set, built for it alone.
            let labels = self.namespace_labels(&close.endpoints);
            self.metrics
                .count_idle_kill(&labels, &kill.threshold.name, kill.how);
        }
        self.count(aggregate, count);
        if let Some(seconds) = dead_peer_detection_seconds(close, reason, self.hz) {
            self.metrics
                .observe_detection(close.endpoints.netns, reason, seconds);
        }
        let list = match &self.events {
            Some(_) => self.drop_events(close, reason, &connection),
            None => Vec::new(),
        };
        self.emit(
            close.sk,
            &close.endpoints,
            close.owner,
            Some(DroppedOwner {
                connection: &connection,
                process: reason.is_keepalive(),
                cgroup_settled,
            }),
            list,
        );
        let e = &close.endpoints;
        let message = format_args!(
            "connection dropped: {reason} netns={} {} -> {} probes={} unanswered={} errno={}",
            e.netns,
            e.local,
            e.remote,
            connection.probes_sent,
            connection.unanswered_probes,
            close.sk_err
        );
        if let Some(kill) = connection.idle_kill.as_deref() {
            let keepalive = kill
                .keepalive_idle_seconds
                .map_or("off".to_owned(), |idle| format!("idle {idle} s"));
            info!(
                "{message}: idle kill ({}={} s): silent {:.1} s, then its send died by {}; keepalive {keepalive}: turn SO_KEEPALIVE on with TCP_KEEPIDLE {} s or less",
                kill.threshold.name,
                kill.threshold.seconds,
                kill.silence_seconds,
                kill.how.as_str(),
                kill.suggested_keepalive_idle_seconds
            );
        } else if matches!(
            reason,
            DropReason::KeepaliveTimeout | DropReason::KeepaliveReset
        ) {
            info!("{message}");
        } else {
            debug!("{message}");
        }
    }
}

impl Pipeline {
    /// Before a record counts: if its inode now names another namespace than the one the agent
    /// knew (different `net_cookie`), the old namespace is gone, so its series and connections
    /// are removed and this namespace starts from 0.
    fn identify_namespace(&self, endpoints: &Endpoints, now: Instant) {
        let mut namespaces = self.namespaces.lock().expect("namespaces lock poisoned");
        match namespaces.saw(endpoints.netns, endpoints.netns_cookie, now) {
            Sighting::Known => {}
            Sighting::New => {
                self.metrics.namespaces.set(namespaces.len() as i64);
                if let Some(maps) = self.metrics.kernel_counters() {
                    maps.saw(endpoints.netns, endpoints.netns_cookie);
                }
            }
            Sighting::Replaced => {
                // Still under the namespaces lock, so the retention sweep cannot interleave.
                forget_replaced(
                    &self.metrics,
                    &self.tracker,
                    endpoints.netns,
                    endpoints.netns_cookie,
                    "a record",
                );
            }
        }
    }

    /// The label set of a namespace alone (the default `--aggregate-by`, the only one with
    /// which the kernel counts the aggregates).
    fn namespace_labels(&self, endpoints: &Endpoints) -> AggregateLabels {
        self.aggregate_by.labels(endpoints, &Workload::default())
    }

    /// The aggregate label set of a connection event. Workload labels come from the cgroup
    /// cache only; on a miss the worker counts the record once it has looked the cgroup up.
    fn aggregate(&self, event: &Event) -> Aggregate {
        // The kernel counts the aggregates: building a label set per record would be an
        // allocation per event for nothing.
        if !self.metrics.counts_records() {
            return Aggregate::None;
        }
        let owner = match event {
            Event::KeepaliveExpiry(expiry) => Some(&expiry.owner),
            Event::Close(close) => Some(&close.owner),
            Event::Audit(_) => None,
        };
        let endpoints = event.endpoints();
        let workload = match (self.aggregate_by.needs_workload(), owner) {
            (false, _) => Workload::default(),
            // No series with an empty workload for records without an owner.
            (true, None) => return Aggregate::None,
            (true, Some(owner)) => match self.resolver.cached_cgroup(owner) {
                Some(workload) => workload,
                None => {
                    return Aggregate::Later {
                        endpoints: *endpoints,
                        owner: *owner,
                    };
                }
            },
        };
        Aggregate::Labels(self.aggregate_by.labels(endpoints, &workload))
    }

    fn count(&self, aggregate: Aggregate, count: Count) {
        let labels = match aggregate {
            Aggregate::None => return,
            Aggregate::Labels(labels) => labels,
            Aggregate::Later { endpoints, owner } => {
                let job = Job::Count {
                    endpoints,
                    owner,
                    count: count.clone(),
                };
                if self.requests.send(job).is_ok() {
                    return;
                }
                // Queue full: counted without the workload, so the namespace's total stays
                // exact.
                let labels = self.aggregate_by.labels(
                    &endpoints,
                    &Workload {
                        cgroup_id: owner.cgroup_id,
                        ..Workload::default()
                    },
                );
                self.metrics.see(&labels);
                labels
            }
        };
        count.apply(&self.metrics, &labels);
    }

    /// Sends a connection's events with its owner; `dropped` when the connection is gone (see
    /// [`DroppedOwner`]). Events of a connection with jobs queued follow them through the
    /// worker, so they stay in order and carry what the jobs found.
    fn emit(
        &self,
        sk: u64,
        endpoints: &Endpoints,
        owner: SocketOwner,
        dropped: Option<DroppedOwner<'_>>,
        events: Vec<ConnectionEvent>,
    ) {
        let process = dropped.as_ref().is_some_and(|d| d.process);
        let look_again = dropped.as_ref().is_some_and(DroppedOwner::look_again);
        if events.is_empty() && !look_again {
            return;
        }
        let job = Job::Emit {
            sk,
            endpoints: *endpoints,
            owner,
            dropped: dropped.is_some(),
            process,
            events,
        };
        let sent = if look_again {
            self.requests.send(job)
        } else {
            self.requests.send_if_waiting(job)
        };
        let Err(job) = sent else {
            return;
        };
        let Job::Emit { events, .. } = *job else {
            return;
        };
        let Some(sender) = &self.events else {
            return;
        };
        let known = match dropped {
            // With events, the drop brought its owner (see `Tracker::close`).
            Some(dropped) => dropped.connection.workload.clone(),
            None => self.tracker.known_workload(sk, endpoints),
        };
        for mut event in events {
            if let Some(workload) = &known {
                event.workload = WorkloadFields::new(workload, owner.socket_ino);
            }
            sender.send(event);
        }
    }

    /// The events of one expiry, without their owner yet.
    fn expiry_events(
        &self,
        events: &EventSender,
        expiry: &KeepaliveExpiry,
        outcome: ExpiryOutcome,
    ) -> Vec<ConnectionEvent> {
        let mut list = Vec::new();
        // The ACK that answered the streak arrived before this expiry started.
        if outcome.answered_probes > 0 {
            list.push(ConnectionEvent::from_expiry(
                EventKind::Answered,
                expiry,
                outcome.answered_probes,
                0,
                self.hz,
            ));
        }
        if outcome.probe_sent && events.with_probes {
            let number = expiry.probes_out_before.saturating_add(expiry.probes_sent);
            list.push(ConnectionEvent::from_expiry(
                EventKind::ProbeSent,
                expiry,
                number,
                expiry.probes_out_before,
                self.hz,
            ));
        }
        list
    }

    /// A keepalive drop ends a probe streak too: its outcome first, then the drop (without
    /// their owner yet).
    fn drop_events(
        &self,
        close: &CloseEvent,
        reason: DropReason,
        state: &DroppedConnection,
    ) -> Vec<ConnectionEvent> {
        let streak_end = match reason {
            DropReason::KeepaliveTimeout => Some(EventKind::TimedOut),
            DropReason::KeepaliveReset => Some(EventKind::Reset),
            _ => None,
        };
        let mut list = Vec::new();
        if let Some(kind) = streak_end {
            list.push(ConnectionEvent::from_close(
                kind,
                close,
                reason,
                u64::from(close.probes_out),
                close.probes_out,
                self.hz,
            ));
        }
        list.push(ConnectionEvent {
            idle_kill: state.idle_kill.as_deref().map(IdleKillFields::from),
            ..ConnectionEvent::from_close(
                EventKind::Drop,
                close,
                reason,
                state.probes_sent,
                state.unanswered_probes.max(close.probes_out),
                self.hz,
            )
        });
        list
    }
}

/// A dropped connection's owner as the table kept it, and whether the worker should look again.
struct DroppedOwner<'a> {
    connection: &'a DroppedConnection,
    /// A keepalive drop: whose process is unknown gets a `/proc` lookup once more (its last
    /// chance).
    process: bool,
    /// The cgroup cache already answered for its cgroup (a path, or known to have none).
    cgroup_settled: bool,
}

impl DroppedOwner<'_> {
    /// Other drops only get their cgroup looked up, and only when the cache has no answer yet:
    /// a `/proc` walk per closed connection under RST churn took most of the churn throughput,
    /// for connections no alert names, and a job per RST close for a cgroup known to have no
    /// path woke the worker for nothing.
    fn look_again(&self) -> bool {
        if self.process {
            !self.connection.pid_known
        } else {
            !self.connection.cgroup_path_known && !self.cgroup_settled
        }
    }
}

/// Tells the kernel, every period, which connections the table holds ([`TrackedMarksMap`]), so
/// the close program sends their closes, and lets the marks of connections it no longer holds
/// age out, so their closes stay in the kernel.
#[derive(Debug)]
pub(crate) struct MarksRenewal {
    tracker: Tracker,
    marks: TrackedMarksMap,
    period: Duration,
    metrics: PipelineMetrics,
}

impl MarksRenewal {
    /// One renewal: the next epoch, then a mark in it for each live connection.
    pub(crate) fn renew(&mut self) {
        let marks = &mut self.marks;
        let mut connections = 0usize;
        let epochs = self
            .tracker
            .with_live_ports(|ports| marks.renew(ports.inspect(|_| connections += 1)));
        // Outside the table's lock: a read of the whole map (32 KiB), for the filter's
        // pass rate.
        let held = marks.held();
        self.metrics.marks_renewals.inc();
        self.metrics
            .marks_connections
            .set(i64::try_from(connections).unwrap_or(i64::MAX));
        self.metrics
            .marks_slots_held
            .set(i64::try_from(held).unwrap_or(i64::MAX));
        debug!(
            "marked {connections} tracked connections in epoch {}; {held} slots hold a mark",
            epochs.current
        );
    }

    /// Renews every period, forever. The first renewal waits a period: at start the table is
    /// empty, and the marks the programs made since they were loaded hold for three epochs.
    pub(crate) async fn run(mut self) {
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + self.period, self.period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.renew();
        }
    }
}

/// A new namespace (`cookie`) holds `inode`, as `evidence` showed: the old namespace's series,
/// kernel counter entries and connections go, so the new one starts from 0. Called under the
/// namespaces lock.
fn forget_replaced(
    metrics: &PipelineMetrics,
    tracker: &Tracker,
    inode: u32,
    cookie: u64,
    evidence: &str,
) {
    let gone = HashSet::from([inode]);
    metrics.forget_namespaces(&gone, "inode_reused");
    if let Some(maps) = metrics.kernel_counters() {
        maps.forget(inode, cookie);
    }
    let connections = tracker.forget_namespaces(&gone);
    info!(
        "netns {inode} now belongs to a new namespace (cookie {cookie}, from {evidence}): the old one's series and {connections} connections removed"
    );
}

/// Removes what the agent keeps of namespaces not seen (no record, no socket in an audit walk)
/// for the retention: their aggregate series, and their connections with their per-connection
/// series.
#[derive(Debug)]
pub(crate) struct NamespaceRetention {
    namespaces: SharedNamespaces,
    metrics: PipelineMetrics,
    tracker: Tracker,
    retention: Duration,
}

impl NamespaceRetention {
    /// How often to sweep: a quarter of the retention (so a series outlives it by at most that),
    /// between 1 s and 1 min.
    pub(crate) fn period(&self) -> Duration {
        (self.retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// One sweep: one pass over the known namespaces, and one over the connection table when
    /// any expired. Returns the inodes forgotten.
    pub(crate) fn sweep(&self, now: Instant) -> HashSet<u32> {
        // Held throughout, so a record of an expiring namespace is either counted before (and
        // keeps it) or after its series are gone (and creates them again at 0).
        let mut namespaces = self.namespaces.lock().expect("namespaces lock poisoned");
        if let Some(maps) = self.metrics.kernel_counters() {
            // The kernel's counters show a namespace alive even when all its records were
            // lost; entries quiet for the retention (or of dead namespaces) go.
            match maps.expire(now, self.retention) {
                Ok(Sweep {
                    active,
                    deleted,
                    superseded,
                }) => {
                    namespaces.present(active, now);
                    if deleted > 0 {
                        debug!("{deleted} kernel counter entries of gone namespaces deleted");
                    }
                    // A namespace whose records never came (all its closes counted and not
                    // sent) still replaces the dead one before it on its inode: its series
                    // (per connection, and aggregates counted from records) would otherwise
                    // stay under that inode until a record of the new one arrived.
                    for (inode, cookie) in superseded {
                        if let Sighting::Replaced = namespaces.saw(inode, cookie, now) {
                            forget_replaced(
                                &self.metrics,
                                &self.tracker,
                                inode,
                                cookie,
                                "the kernel's counters",
                            );
                        }
                    }
                }
                Err(err) => warn!("cannot sweep the kernel's per-namespace counters: {err}"),
            }
        }
        let expired = namespaces.expire(now, self.retention);
        if let Some(maps) = self.metrics.kernel_counters() {
            maps.forget_cookies(&expired);
        }
        if !expired.is_empty() {
            self.metrics.forget_namespaces(&expired, "retention");
            let connections = self.tracker.forget_namespaces(&expired);
            debug!(
                "{} namespaces not seen for {}: series and {connections} connections removed",
                expired.len(),
                humantime::format_duration(self.retention)
            );
        }
        self.metrics.namespaces.set(namespaces.len() as i64);
        expired
    }

    /// Sweeps every [`Self::period`], forever.
    pub(crate) async fn run(self) {
        let mut ticker = tokio::time::interval(self.period());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.sweep(Instant::now());
        }
    }
}

/// How long the peer was silent before the kernel gave up on it: from the last segment received
/// (the clock `tcp_keepalive_timer` measures idleness with) to the abort. Only for keepalive
/// drops, where silence is what the kernel measured.
pub(crate) fn dead_peer_detection_seconds(
    close: &CloseEvent,
    reason: DropReason,
    hz: u32,
) -> Option<f64> {
    if !DropReason::KEEPALIVE.contains(&reason) {
        return None;
    }
    Some(close.silent_seconds(hz))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keepalive_ebpf::{CloseContext, RecordKind, SocketRecord, record_flags};
    use prometheus_client::metrics::counter::Counter;

    use super::*;
    use crate::{record::decoder::fixtures, track::idle_kill::IdleThreshold};

    /// One record as the kernel would write it for connection `sk` (127.0.0.1:40000 → :8080).
    fn record(kind: RecordKind, before: u8, after: u8, flags: u8) -> SocketRecord {
        let mut rec = SocketRecord {
            sk: 1,
            kind: kind as u8,
            family: keepalive_ebpf::AF_INET,
            netns: 4026532000,
            local_port: 40000,
            remote_port: 8080,
            state: 1,
            probes_out_before: before,
            probes_out_after: after,
            probes_sent: after.saturating_sub(before),
            keepalive_time: 250,
            keepalive_intvl: 250,
            keepalive_probes: 3,
            flags: flags | record_flags::KEEPALIVE_ON,
            cgroup_id: 42,
            socket_ino: 7,
            ..SocketRecord::default()
        };
        rec.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        rec.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        if kind == RecordKind::Close {
            rec.context = CloseContext::KeepaliveTimer as u8;
            rec.reset_reason_sent = 15;
            rec.sk_err = libc::ETIMEDOUT;
            rec.jiffies = 2000;
            rec.rcv_tstamp = 1000;
            rec.lrcvtime = 1000;
        }
        rec
    }

    fn record_bytes(kind: RecordKind, before: u8, after: u8, flags: u8) -> Vec<u8> {
        decoder::encode(&record(kind, before, after, flags))
    }

    fn pipeline_with_table() -> (Pipeline, Arc<Mutex<ConnectionTable>>, PipelineMetrics) {
        let table = Arc::new(Mutex::new(ConnectionTable::new(
            std::num::NonZeroUsize::new(16).unwrap(),
            16,
            Duration::from_secs(60),
        )));
        let metrics = PipelineMetrics::default();
        let pipeline = Pipeline::with_kernel(
            250,
            ResetReasons {
                keepalive_timeout: Some(15),
            },
            Arc::clone(&table),
            metrics.clone(),
            Arc::new(Attributor::new(None, "/nonexistent".into())),
        );
        (pipeline, table, metrics)
    }

    const NETNS: u32 = 4026532000;

    /// `tcp_keepalive_probes_total` of `netns`; `None` when the series does not exist.
    fn probes_of(metrics: &PipelineMetrics, netns: u32) -> Option<u64> {
        metrics
            .probes
            .get(&vec![("netns", netns.to_string())])
            .map(|c| c.get())
    }

    fn drops_of(metrics: &PipelineMetrics, netns: u32, reason: DropReason) -> Option<u64> {
        metrics
            .drops
            .get(&vec![
                ("netns", netns.to_string()),
                ("reason", reason.as_str().to_owned()),
            ])
            .map(|c| c.get())
    }

    /// The observation count of the namespace's keepalive-timeout detection histogram; `None`
    /// when the series does not exist (it is made at 0 by the namespace's first probe).
    fn detection_count(metrics: &PipelineMetrics, netns: u32) -> Option<u64> {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("d", "", metrics.detection.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let count = format!("d_count{{netns=\"{netns}\",reason=\"keepalive_timeout\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&count))
            .map(|n| n.parse().expect("a count"))
    }

    /// Whether the namespace's keepalive-timeout detection histogram has an observation.
    fn has_detection(metrics: &PipelineMetrics, netns: u32) -> bool {
        detection_count(metrics, netns).is_some_and(|n| n > 0)
    }

    /// Namespace `cookie` (inode NETNS) sends `probes` probes on connection `sk`, then the
    /// connection times out.
    fn probes_then_timeout(pipeline: &Pipeline, cookie: u64, sk: u64, probes: u8) {
        for n in 0..probes {
            let mut rec = record(RecordKind::KeepaliveTimer, n, n + 1, 0);
            (rec.netns_cookie, rec.sk) = (cookie, sk);
            pipeline.handle(&decoder::encode(&rec));
        }
        let mut close = record(RecordKind::Close, probes, 0, record_flags::RESET_SENT);
        (close.netns_cookie, close.sk) = (cookie, sk);
        pipeline.handle(&decoder::encode(&close));
    }

    /// A connection without keepalive, silent 400 s after its last segment, whose next send
    /// was answered by a reset.
    fn reset_after_silence() -> SocketRecord {
        let mut close = record(RecordKind::Close, 0, 0, record_flags::RESET_RECEIVED);
        close.flags &= !record_flags::KEEPALIVE_ON;
        (close.keepalive_time, close.keepalive_intvl) = (0, 0);
        (close.sysctl_keepalive_time, close.sysctl_keepalive_intvl) = (7200 * 250, 75 * 250);
        close.context = CloseContext::None as u8;
        close.sk_err = libc::ECONNRESET;
        close.lsndtime = 1000 + 400 * 250;
        close.jiffies = u64::from(close.lsndtime) + 1;
        close
    }

    /// Idle kills count from records whether the kernel counts the drops or the records do.
    #[test]
    fn an_idle_kill_is_counted_under_its_threshold_and_kept_with_its_connection() {
        idle_kill_counted(true);
        idle_kill_counted(false);
    }

    fn idle_kill_counted(records_count: bool) {
        let table = Arc::new(Mutex::new(ConnectionTable::new(
            std::num::NonZeroUsize::new(16).unwrap(),
            16,
            Duration::from_secs(60),
        )));
        let thresholds: Vec<IdleThreshold> = ["aws-nlb=350", "gcp-lb=600"]
            .iter()
            .map(|t| t.parse().expect("threshold"))
            .collect();
        let metrics = PipelineMetrics::default()
            .with_idle_thresholds(thresholds.iter().map(|t| t.name.clone()).collect());
        let metrics = if records_count {
            metrics
        } else {
            metrics.not_counting_records()
        };
        let pipeline = Pipeline::with_kernel(
            250,
            ResetReasons::default(),
            Arc::clone(&table),
            metrics.clone(),
            Arc::new(Attributor::new(None, "/nonexistent".into())),
        )
        .with_idle_thresholds(NodeThresholds::new(thresholds.clone()));
        pipeline.handle(&decoder::encode(&reset_after_silence()));
        let idle_kills = |threshold: &str, died_by: &str| {
            metrics
                .idle_kills
                .get(&vec![
                    ("netns", NETNS.to_string()),
                    ("threshold", threshold.to_owned()),
                    ("died_by", died_by.to_owned()),
                ])
                .map(|c| c.get())
        };
        assert_eq!(idle_kills("aws-nlb", "reset"), Some(1));
        assert_eq!(idle_kills("gcp-lb", "reset"), None);
        assert_eq!(idle_kills("aws-nlb", "timeout"), None);
        // Forgetting the namespace removes them.
        metrics.forget_namespaces(&HashSet::from([NETNS]), "retention");
        assert_eq!(idle_kills("aws-nlb", "reset"), None);
        let table = table.lock().unwrap();
        let reportable = table.reportable();
        let kill = reportable[0]
            .idle_kill
            .as_deref()
            .expect("kept with the drop");
        assert_eq!(kill.threshold.name, "aws-nlb");
        assert_eq!(kill.silence_seconds, 400.0);
    }

    #[test]
    fn without_thresholds_a_reset_after_silence_is_a_plain_drop() {
        let (pipeline, table, metrics) = pipeline_with_table();
        pipeline.handle(&decoder::encode(&reset_after_silence()));
        assert_eq!(
            drops_of(&metrics, NETNS, DropReason::ResetReceived),
            Some(1)
        );
        assert!(table.lock().unwrap().reportable()[0].idle_kill.is_none());
    }

    #[test]
    fn a_new_namespace_on_a_reused_inode_starts_from_zero_without_the_old_connections() {
        let (pipeline, table, metrics) = pipeline_with_table();
        probes_then_timeout(&pipeline, 100, 1, 3);
        assert_eq!(probes_of(&metrics, NETNS), Some(3));
        assert_eq!(
            drops_of(&metrics, NETNS, DropReason::KeepaliveTimeout),
            Some(1)
        );
        assert_eq!(table.lock().unwrap().dropped_len(), 1);
        assert!(has_detection(&metrics, NETNS));

        // Namespace 100 is deleted; namespace 200 gets its inode and idles once (no probe).
        let mut idle = record(RecordKind::KeepaliveTimer, 0, 0, 0);
        (idle.netns_cookie, idle.sk) = (200, 2);
        pipeline.handle(&decoder::encode(&idle));
        assert_eq!(probes_of(&metrics, NETNS), Some(0));
        for reason in DropReason::ALL {
            assert_eq!(drops_of(&metrics, NETNS, reason), Some(0), "{reason}");
        }
        assert!(!has_detection(&metrics, NETNS));
        assert!(table.lock().unwrap().reportable().is_empty());
        assert_eq!(
            metrics
                .namespaces_forgotten
                .get(&crate::export::metrics::ForgetLabels {
                    cause: "inode_reused"
                })
                .map(|c| c.get()),
            Some(1)
        );

        // It counts only its own probes from then on.
        probes_then_timeout(&pipeline, 200, 2, 2);
        assert_eq!(probes_of(&metrics, NETNS), Some(2));
        let reportable = table.lock().unwrap().reportable().len();
        assert_eq!(reportable, 1);
    }

    #[test]
    fn a_namespace_without_a_cookie_keeps_counting_under_its_inode() {
        let (pipeline, _table, metrics) = pipeline_with_table();
        probes_then_timeout(&pipeline, 0, 1, 3);
        probes_then_timeout(&pipeline, 0, 2, 2);
        assert_eq!(probes_of(&metrics, NETNS), Some(5));
    }

    #[test]
    fn detection_histograms_exist_from_the_first_probe_and_again_after_the_namespace_was_forgotten()
    {
        let (pipeline, _table, metrics) = pipeline_with_table();
        let retention = pipeline.namespace_retention(Duration::from_secs(300));
        let probe = |before: u8| {
            let mut rec = record(RecordKind::KeepaliveTimer, before, before + 1, 0);
            rec.netns_cookie = 100;
            pipeline.handle(&decoder::encode(&rec));
        };
        // An idle expiry before the first probe leaves the connection out of the table.
        let mut idle = record(RecordKind::KeepaliveTimer, 0, 0, 0);
        idle.netns_cookie = 100;
        pipeline.handle(&decoder::encode(&idle));
        assert!(detection_count(&metrics, NETNS).is_none());
        probe(0);
        assert!(detection_count(&metrics, NETNS).is_some());
        probe(1);
        // The namespace's series go with its connections; the same connection's next probe
        // makes them again (it enters the table anew), not only a new connection's.
        let later = Instant::now() + Duration::from_secs(300);
        assert_eq!(retention.sweep(later), HashSet::from([NETNS]));
        assert!(detection_count(&metrics, NETNS).is_none());
        probe(2);
        assert!(detection_count(&metrics, NETNS).is_some());
        assert!(!has_detection(&metrics, NETNS));
    }

    #[test]
    fn retention_removes_the_series_and_connections_of_namespaces_not_seen() {
        let (pipeline, table, metrics) = pipeline_with_table();
        let retention = pipeline.namespace_retention(Duration::from_secs(300));
        assert_eq!(retention.period(), Duration::from_secs(60));
        assert_eq!(
            pipeline
                .namespace_retention(Duration::from_secs(2))
                .period(),
            Duration::from_secs(1)
        );
        probes_then_timeout(&pipeline, 100, 1, 3);
        let mut other = record(RecordKind::KeepaliveTimer, 0, 1, 0);
        (other.netns, other.netns_cookie, other.sk) = (NETNS + 1, 101, 2);
        pipeline.handle(&decoder::encode(&other));
        assert_eq!(metrics.namespaces.get(), 2);

        let later = Instant::now() + Duration::from_secs(300);
        // The audit found a socket of NETNS + 1 a moment ago: it stays.
        pipeline
            .namespaces()
            .lock()
            .unwrap()
            .present([(NETNS + 1, 101)], later);
        assert_eq!(retention.sweep(later), HashSet::from([NETNS]));
        assert_eq!(probes_of(&metrics, NETNS), None);
        assert_eq!(
            drops_of(&metrics, NETNS, DropReason::KeepaliveTimeout),
            None
        );
        assert!(!has_detection(&metrics, NETNS));
        assert_eq!(probes_of(&metrics, NETNS + 1), Some(1));
        let left: Vec<u32> = table
            .lock()
            .unwrap()
            .reportable()
            .iter()
            .map(|s| s.endpoints.netns)
            .collect();
        assert_eq!(left, [NETNS + 1]);
        assert_eq!(metrics.namespaces.get(), 1);

        // Seen again later: its series come back at 0 and count from there.
        let mut again = record(RecordKind::KeepaliveTimer, 0, 1, 0);
        again.netns_cookie = 100;
        pipeline.handle(&decoder::encode(&again));
        assert_eq!(probes_of(&metrics, NETNS), Some(1));
        assert_eq!(
            drops_of(&metrics, NETNS, DropReason::KeepaliveTimeout),
            Some(0)
        );
    }

    fn table() -> Arc<Mutex<ConnectionTable>> {
        Arc::new(Mutex::new(ConnectionTable::new(
            std::num::NonZeroUsize::new(16).unwrap(),
            16,
            Duration::from_secs(60),
        )))
    }

    fn pipeline(
        table: Arc<Mutex<ConnectionTable>>,
        metrics: PipelineMetrics,
        resolver: Arc<dyn Resolve>,
    ) -> Pipeline {
        Pipeline::with_kernel(
            250,
            ResetReasons {
                keepalive_timeout: Some(15),
            },
            table,
            metrics,
            resolver,
        )
    }

    /// Two answered probes, then a silent peer: two unanswered probes and the abort.
    fn answered_then_blackholed(pipeline: &Pipeline) {
        let expiry = RecordKind::KeepaliveTimer;
        // Healthy: each probe's ACK zeroes icsk_probes_out before the next expiry.
        pipeline.handle(&record_bytes(expiry, 0, 1, 0));
        unanswered_then_aborted(pipeline);
    }

    /// After an answered probe: the peer goes silent, two more probes, and the abort.
    fn unanswered_then_aborted(pipeline: &Pipeline) {
        let expiry = RecordKind::KeepaliveTimer;
        pipeline.handle(&record_bytes(expiry, 0, 1, 0));
        pipeline.handle(&record_bytes(expiry, 1, 2, 0));
        pipeline.handle(&record_bytes(expiry, 2, 3, 0));
        pipeline.handle(&record_bytes(
            RecordKind::Close,
            3,
            0,
            record_flags::RESET_SENT,
        ));
    }

    #[test]
    fn pipeline_reports_answered_streaks_then_the_timeout_and_its_drop() {
        let dropped = Counter::default();
        let (sender, mut receiver) =
            crate::export::events::channel(64, Counter::default(), dropped.clone(), true);
        let pipeline = pipeline(
            table(),
            PipelineMetrics::default(),
            Arc::new(Attributor::new(None, "/nonexistent".into())),
        )
        .with_events(sender);
        let (worker, mut jobs) = pipeline.take_worker();
        answered_then_blackholed(&pipeline);
        while let Ok(job) = jobs.try_recv() {
            worker.handle(job);
        }
        let mut got = Vec::new();
        while let Ok(event) = receiver.try_recv() {
            got.push((event.event, event.probes_sent, event.unanswered_probes));
        }
        use EventKind::*;
        assert_eq!(
            got,
            [
                (ProbeSent, 1, 0),
                (Answered, 1, 0),
                (ProbeSent, 1, 0),
                (ProbeSent, 2, 1),
                (ProbeSent, 3, 2),
                (TimedOut, 3, 3),
                // Four probes seen on the connection in all, three of them unanswered.
                (Drop, 4, 3),
            ]
        );
        assert_eq!(dropped.get(), 0);
    }

    /// An owner lookup that waits until the test lets it go (a stalled `/proc`).
    #[derive(Debug)]
    struct StalledProc {
        /// Told when the worker is inside the lookup.
        entered: Mutex<std::sync::mpsc::Sender<()>>,
        /// The lookup returns once the test drops the other end.
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl StalledProc {
        fn workload(owner: &SocketOwner) -> Workload {
            Workload {
                cgroup_id: owner.cgroup_id,
                cgroup: crate::attribution::names(None, Some("pod-a"), None),
                ..Workload::default()
            }
        }
    }

    impl Resolve for StalledProc {
        fn cached_cgroup(&self, _: &SocketOwner) -> Option<Workload> {
            None
        }

        fn cgroup(&self, owner: &SocketOwner) -> Workload {
            Self::workload(owner)
        }

        fn everything(&self, owner: &SocketOwner) -> Workload {
            let _ = self.entered.lock().unwrap().send(());
            let _ = self.release.lock().unwrap().recv();
            Workload {
                pid: Some(77),
                comm: Some("app".to_owned()),
                ..Self::workload(owner)
            }
        }
    }

    #[test]
    fn the_drain_goes_on_while_an_owner_lookup_is_stalled_and_gets_its_results_after() {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let resolver = Arc::new(StalledProc {
            entered: Mutex::new(entered_tx),
            release: Mutex::new(release_rx),
        });
        let table = table();
        let metrics = PipelineMetrics::default();
        let (sender, mut receiver) =
            crate::export::events::channel(64, Counter::default(), Counter::default(), false);
        let aggregate_by: AggregateBy = "netns,pod_uid".parse().unwrap();
        let pipeline = pipeline(Arc::clone(&table), metrics.clone(), resolver)
            .with_events(sender)
            .aggregated_by(aggregate_by.clone());
        let (worker, jobs) = pipeline.take_worker();
        let worker = worker.spawn(jobs).unwrap();

        let expiry = RecordKind::KeepaliveTimer;
        pipeline.handle(&record_bytes(expiry, 0, 1, 0));
        // The worker is now inside the lookup for the connection that entered, and stays there.
        entered.recv().unwrap();
        // Everything else of the connection is handled all the same (a drain waiting for the
        // worker would never get past this).
        unanswered_then_aborted(&pipeline);
        let connection = {
            let mut table = table.lock().unwrap();
            let e = decoder::decode(&record_bytes(RecordKind::Close, 3, 0, 0)).unwrap();
            table.dropped_mut(e.endpoints()).cloned().expect("dropped")
        };
        assert_eq!(
            (
                connection.probes_sent,
                connection.dropped,
                connection.workload.pid
            ),
            (4, Some(DropReason::KeepaliveTimeout), None)
        );
        // The events wait behind the lookup, so they can carry its result.
        assert!(receiver.try_recv().is_err());

        drop(release);
        // The queue closes with the pipeline; the worker finishes what is in it.
        drop(pipeline);
        worker.join().unwrap();

        let mut got = Vec::new();
        while let Ok(event) = receiver.try_recv() {
            let w = &event.workload.workload;
            got.push((
                event.event,
                w.pid,
                w.comm.clone(),
                w.pod_uid().map(str::to_owned),
            ));
        }
        let owner = (Some(77), Some("app".to_owned()), Some("pod-a".to_owned()));
        use EventKind::*;
        assert_eq!(
            got,
            [Answered, TimedOut, Drop].map(|kind| (
                kind,
                owner.0,
                owner.1.clone(),
                owner.2.clone()
            ))
        );
        // The aggregates the worker counted carry the pod; none went under an empty pod_uid.
        let endpoints = *decoder::decode(&record_bytes(expiry, 0, 1, 0))
            .unwrap()
            .endpoints();
        let labels = |pod: Option<&str>| {
            aggregate_by.labels(
                &endpoints,
                &Workload {
                    cgroup: crate::attribution::names(None, pod, None),
                    ..Workload::default()
                },
            )
        };
        assert_eq!(
            metrics.probes.get_or_create(&labels(Some("pod-a"))).get(),
            4
        );
        assert_eq!(metrics.probes.get_or_create(&labels(None)).get(), 0);
        let mut drop_labels = labels(Some("pod-a"));
        drop_labels.push(("reason", "keepalive_timeout".to_owned()));
        assert_eq!(metrics.drops.get_or_create(&drop_labels).get(), 1);
        assert_eq!(
            table
                .lock()
                .unwrap()
                .dropped_mut(&endpoints)
                .unwrap()
                .workload
                .pid,
            Some(77)
        );
        assert_eq!(metrics.attribution_requests_dropped.get(), 0);
    }

    /// Counts cgroup lookups; its cache either has no answer yet or knows the cgroup has no
    /// path (no cgroup root, cgroup id 0, or a cgroup that was not found).
    #[derive(Debug)]
    struct CountingCgroups {
        settled: bool,
        lookups: std::sync::atomic::AtomicUsize,
        process_lookups: std::sync::atomic::AtomicUsize,
        /// Process lookups that find no process before one does.
        processes_missed: usize,
    }

    impl CountingCgroups {
        fn new(settled: bool) -> Arc<Self> {
            Arc::new(Self {
                settled,
                lookups: std::sync::atomic::AtomicUsize::new(0),
                process_lookups: std::sync::atomic::AtomicUsize::new(0),
                processes_missed: 0,
            })
        }

        fn counts(&self) -> (usize, usize) {
            use std::sync::atomic::Ordering::Relaxed;
            (
                self.lookups.load(Relaxed),
                self.process_lookups.load(Relaxed),
            )
        }

        /// The counts once they reach `want` (cgroup, process lookups) or 10 s have passed.
        fn settle(&self, want: (usize, usize)) -> (usize, usize) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.counts() != want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.counts()
        }
    }

    /// A pipeline over `table` asking `resolver`, with its attribution worker running.
    fn with_worker(
        table: &Arc<Mutex<ConnectionTable>>,
        resolver: &Arc<CountingCgroups>,
    ) -> (Pipeline, std::thread::JoinHandle<()>) {
        let pipeline = pipeline(
            Arc::clone(table),
            PipelineMetrics::default(),
            resolver.clone(),
        );
        let (worker, jobs) = pipeline.take_worker();
        let worker = worker.spawn(jobs).unwrap();
        (pipeline, worker)
    }

    /// A cgroup without a path: what the resolver finds for every owner.
    fn pathless(owner: &SocketOwner) -> Workload {
        Workload {
            cgroup_id: owner.cgroup_id,
            ..Workload::default()
        }
    }

    impl Resolve for CountingCgroups {
        fn cached_cgroup(&self, owner: &SocketOwner) -> Option<Workload> {
            self.settled.then(|| pathless(owner))
        }

        fn cgroup(&self, owner: &SocketOwner) -> Workload {
            self.lookups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            pathless(owner)
        }

        fn everything(&self, owner: &SocketOwner) -> Workload {
            let before = self
                .process_lookups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Workload {
                pid: (before >= self.processes_missed).then_some(77),
                ..self.cgroup(owner)
            }
        }
    }

    /// RST closes of connections the table never saw: one cgroup lookup each while the cache
    /// has no answer, none once it has one, even when that answer is "no path".
    fn cgroup_lookups_for_reset_closes(settled: bool) -> usize {
        let resolver = CountingCgroups::new(settled);
        let pipeline = pipeline(table(), PipelineMetrics::default(), resolver.clone());
        let (worker, jobs) = pipeline.take_worker();
        let worker = worker.spawn(jobs).unwrap();
        for port in 0..5u16 {
            let mut rec = record(RecordKind::Close, 0, 0, record_flags::RESET_RECEIVED);
            rec.sk = 100 + u64::from(port);
            rec.local_port = 50000 + port;
            rec.context = CloseContext::None as u8;
            rec.flags &= !record_flags::KEEPALIVE_ON;
            rec.sk_err = libc::ECONNRESET;
            rec.drop_reason = DropReason::ResetReceived as u32;
            pipeline.handle(&decoder::encode(&rec));
        }
        drop(pipeline);
        worker.join().unwrap();
        resolver.counts().0
    }

    #[test]
    fn a_reset_close_wakes_the_worker_only_when_its_cgroup_is_not_cached_yet() {
        assert_eq!(cgroup_lookups_for_reset_closes(false), 5);
        assert_eq!(cgroup_lookups_for_reset_closes(true), 0);
    }

    #[test]
    fn a_live_connection_whose_process_was_not_found_is_looked_up_again_at_its_next_unanswered_probe()
     {
        let resolver = Arc::new(CountingCgroups {
            processes_missed: 1,
            ..Arc::into_inner(CountingCgroups::new(false)).unwrap()
        });
        let table = table();
        let (pipeline, worker) = with_worker(&table, &resolver);
        let expiry = RecordKind::KeepaliveTimer;
        let settle = |want| resolver.settle(want);
        pipeline.handle(&record_bytes(expiry, 0, 1, 0));
        // The first unanswered probe: the lookup finds no process (a spent /proc budget)...
        pipeline.handle(&record_bytes(expiry, 1, 2, 0));
        assert_eq!(settle((2, 1)), (2, 1));
        let pid = || table.lock().unwrap().live_mut(1).unwrap().workload.pid;
        assert_eq!(pid(), None);
        // ...so the next one asks again and finds it; later ones do not ask.
        pipeline.handle(&record_bytes(expiry, 2, 3, 0));
        assert_eq!(settle((3, 2)), (3, 2));
        assert_eq!(pid(), Some(77));
        pipeline.handle(&record_bytes(expiry, 3, 4, 0));
        drop(pipeline);
        worker.join().unwrap();
        assert_eq!(resolver.counts(), (3, 2));
    }

    #[test]
    fn a_keepalive_drop_asks_for_its_process_once_more_only_when_it_is_still_unknown() {
        // (probes whose lookup finds no process, process lookups the drop adds)
        for (missed, added) in [(0, 0), (usize::MAX, 1)] {
            let resolver = Arc::new(CountingCgroups {
                processes_missed: missed,
                ..Arc::into_inner(CountingCgroups::new(false)).unwrap()
            });
            let table = table();
            let (pipeline, worker) = with_worker(&table, &resolver);
            let expiry = RecordKind::KeepaliveTimer;
            pipeline.handle(&record_bytes(expiry, 0, 1, 0));
            pipeline.handle(&record_bytes(expiry, 1, 2, 0));
            assert_eq!(resolver.settle((2, 1)), (2, 1));
            // Found at the first unanswered probe, or asked again at the next (see above).
            pipeline.handle(&record_bytes(expiry, 2, 3, 0));
            let want = if missed == 0 { (2, 1) } else { (3, 2) };
            let before = resolver.settle(want);
            assert_eq!(before, want, "lookups before the drop with {missed} missed");
            pipeline.handle(&record_bytes(
                RecordKind::Close,
                3,
                0,
                record_flags::RESET_SENT,
            ));
            drop(pipeline);
            worker.join().unwrap();
            assert_eq!(
                resolver.counts().1,
                before.1 + added,
                "process lookups with {missed} missed"
            );
        }
    }

    #[test]
    fn a_live_connection_gets_its_process_looked_up_at_its_first_unanswered_probe_only() {
        let resolver = CountingCgroups::new(false);
        let table = table();
        let (pipeline, worker) = with_worker(&table, &resolver);
        let expiry = RecordKind::KeepaliveTimer;
        let settle = |want| resolver.settle(want);
        // Answered probes: the connection enters the table, its cgroup is looked up, no /proc.
        for _ in 0..3 {
            pipeline.handle(&record_bytes(expiry, 0, 1, 0));
        }
        assert_eq!(settle((1, 0)), (1, 0));
        // The peer goes silent: one process lookup at the first unanswered probe, no more.
        pipeline.handle(&record_bytes(expiry, 1, 2, 0));
        pipeline.handle(&record_bytes(expiry, 2, 3, 0));
        assert_eq!(settle((2, 1)), (2, 1));
        let pid = table.lock().unwrap().live_mut(1).unwrap().workload.pid;
        assert_eq!(pid, Some(77));
        drop(pipeline);
        worker.join().unwrap();
        assert_eq!(resolver.counts(), (2, 1));
    }

    /// A connection that entered while the attribution queue was full gets its owner from the
    /// retry once the queue has room; one refused when the retry list was full too, at its next
    /// expiry. Each is asked once more, not at every expiry from then on.
    #[test]
    fn an_owner_lookup_the_full_queue_refused_is_retried_or_asked_again_at_the_next_expiry() {
        let capacity = attribution_worker::QUEUE_CAPACITY;
        let deferred = attribution_worker::DEFERRED_CAPACITY;
        let table = Arc::new(Mutex::new(ConnectionTable::new(
            std::num::NonZeroUsize::new(capacity + deferred + 8).unwrap(),
            16,
            Duration::from_secs(60),
        )));
        let resolver = CountingCgroups::new(true);
        let metrics = PipelineMetrics::default();
        let pipeline = pipeline(Arc::clone(&table), metrics.clone(), resolver.clone());
        let expiry = |i: usize| {
            let mut rec = record(RecordKind::KeepaliveTimer, 0, 1, 0);
            rec.sk = 1000 + i as u64;
            rec.local_port = 10000 + i as u16;
            decoder::encode(&rec)
        };
        // The worker is not running yet: the queue fills, then the retry list, and the last
        // connection's lookup is refused by both.
        let (worker, jobs) = pipeline.take_worker();
        for i in 0..=capacity + deferred {
            pipeline.handle(&expiry(i));
        }
        assert_eq!(
            metrics.attribution_requests_dropped.get(),
            deferred as u64 + 1
        );
        let (retried, flagged) = (1000 + capacity as u64, 1000 + (capacity + deferred) as u64);
        assert_eq!(pipeline.retry_deferred(), 0, "the queue is still full");
        let worker = worker.spawn(jobs).unwrap();
        assert_eq!(resolver.settle((capacity, 0)), (capacity, 0));
        let owner = |sk: u64| {
            table
                .lock()
                .unwrap()
                .live_mut(sk)
                .map(|state| state.workload.cgroup_id)
        };
        assert_eq!(owner(1000), Some(42));
        assert_eq!(owner(retried), Some(0), "nothing looked it up yet");

        // As far as the queue has room each time (the worker drains it meanwhile, so one call
        // may send more than it holds), until none is left.
        let mut resent = 0;
        while resent < deferred {
            let sent = pipeline.retry_deferred();
            assert!(sent > 0, "nothing sent with {resent} of {deferred} sent");
            resent += sent;
            let want = (capacity + resent, 0);
            assert_eq!(resolver.settle(want), want);
        }
        assert_eq!(resent, deferred);
        assert_eq!(owner(retried), Some(42));
        assert_eq!(owner(flagged), Some(0));
        assert_eq!(pipeline.retry_deferred(), 0, "nothing left to retry");

        pipeline.handle(&expiry(capacity + deferred));
        let all = (capacity + deferred + 1, 0);
        assert_eq!(resolver.settle(all), all);
        assert_eq!(owner(flagged), Some(42));
        // Neither asks again.
        pipeline.handle(&expiry(capacity));
        pipeline.handle(&expiry(capacity + deferred));
        drop(pipeline);
        worker.join().unwrap();
        assert_eq!(resolver.counts(), all);
        assert_eq!(
            metrics.attribution_requests_dropped.get(),
            deferred as u64 + 1
        );
    }

    /// A deferred lookup of a connection the table no longer holds is not sent.
    #[test]
    fn a_deferred_owner_lookup_of_a_closed_connection_is_not_sent() {
        let capacity = attribution_worker::QUEUE_CAPACITY;
        let table = Arc::new(Mutex::new(ConnectionTable::new(
            std::num::NonZeroUsize::new(capacity + 8).unwrap(),
            16,
            Duration::from_secs(60),
        )));
        let resolver = CountingCgroups::new(true);
        let pipeline = pipeline(
            Arc::clone(&table),
            PipelineMetrics::default(),
            resolver.clone(),
        );
        let (worker, jobs) = pipeline.take_worker();
        for i in 0..=capacity {
            let mut rec = record(RecordKind::KeepaliveTimer, 0, 1, 0);
            rec.sk = 1000 + i as u64;
            rec.local_port = 10000 + i as u16;
            pipeline.handle(&decoder::encode(&rec));
        }
        // Gone with its namespace (every connection here is in the same one).
        let gone = table
            .lock()
            .unwrap()
            .forget_namespaces(&HashSet::from([4026532000]));
        assert_eq!(gone, capacity + 1);
        let worker = worker.spawn(jobs).unwrap();
        assert_eq!(resolver.settle((capacity, 0)), (capacity, 0));
        assert_eq!(pipeline.retry_deferred(), 0);
        drop(pipeline);
        worker.join().unwrap();
        assert_eq!(resolver.counts(), (capacity, 0));
    }

    #[test]
    fn with_the_event_stream_on_every_connection_gets_its_process_when_it_enters() {
        let resolver = CountingCgroups::new(false);
        let (sender, _receiver) =
            crate::export::events::channel(64, Counter::default(), Counter::default(), true);
        let pipeline =
            pipeline(table(), PipelineMetrics::default(), resolver.clone()).with_events(sender);
        let (worker, jobs) = pipeline.take_worker();
        let worker = worker.spawn(jobs).unwrap();
        pipeline.handle(&record_bytes(RecordKind::KeepaliveTimer, 0, 1, 0));
        drop(pipeline);
        worker.join().unwrap();
        assert_eq!(resolver.counts(), (1, 1));
    }

    #[test]
    fn detection_time_counts_jiffies_since_the_last_segment_across_the_wrap() {
        let close = CloseEvent {
            // 1000 jiffies after a stamp taken 500 jiffies before the 32-bit wrap.
            jiffies: (1u64 << 32) + 500,
            last_received_jiffies: u32::MAX - 499,
            ..fixtures::keepalive_abort()
        };
        let seconds = dead_peer_detection_seconds(&close, DropReason::KeepaliveTimeout, 250);
        assert_eq!(seconds, Some(4.0));
        assert_eq!(
            dead_peer_detection_seconds(&close, DropReason::ResetReceived, 250),
            None
        );
    }
}
