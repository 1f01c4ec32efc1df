//! One record from the ring buffer, end to end: decode → connection table → classify → metrics.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use log::{debug, info, warn};

use crate::{
    attribution::{Attributor, Workload},
    export::{
        events::{ConnectionEvent, EventKind, EventSender, WorkloadFields},
        labels::{AggregateBy, AggregateLabels},
        metrics::{KindLabels, PipelineMetrics},
    },
    kernel::Session,
    record::{
        decoder::{self, CloseEvent, Endpoints, Event, KeepaliveExpiry},
        ring_reader,
    },
    track::{
        classifier::{DropReason, ResetReasons},
        connection_table::{ConnectionState, ConnectionTable, ExpiryOutcome},
        namespaces::{NamespaceIdentity, Sighting},
        tracker::{Dropped, Tracker},
    },
};

/// Which namespace each `netns` inode means, shared by the pipeline (records), the audit (walks
/// that found sockets) and the retention sweep.
pub(crate) type SharedNamespaces = Arc<Mutex<NamespaceIdentity>>;

/// The stages for one record: decode, count, track (table and classifier), attribute, then the
/// event stream and logs.
pub(crate) struct Pipeline {
    tracker: Tracker,
    metrics: PipelineMetrics,
    /// CONFIG_HZ: receive stamps and keepalive settings are in jiffies.
    hz: u32,
    /// The event stream (`--events`, `watch`), when someone reads it.
    events: Option<EventSender>,
    /// Who owns a connection: asked once when a connection enters the table (and at close if
    /// its process was unknown), and per event only for the cgroup when aggregates need it.
    attributor: Arc<Attributor>,
    /// Labels of the aggregate probe and drop counters (`--aggregate-by`).
    aggregate_by: AggregateBy,
    /// Namespace identity by (inode, cookie): a reused inode resets its series.
    namespaces: SharedNamespaces,
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
        attributor: Arc<Attributor>,
    ) -> Self {
        Self {
            tracker: Tracker::new(table, reset_reasons),
            metrics,
            hz,
            events: None,
            attributor,
            aggregate_by: AggregateBy::default(),
            namespaces: SharedNamespaces::default(),
        }
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

    /// Drains the ring buffer until its descriptor fails.
    pub(crate) async fn run(self, ring: RingBuf<MapData>) -> std::io::Result<()> {
        ring_reader::drain(ring, |record| self.handle(record)).await
    }

    pub(crate) fn handle(&self, bytes: &[u8]) {
        let event = match decoder::decode(bytes) {
            Ok(event) => event,
            Err(err) => {
                self.metrics.decode_errors.inc();
                warn!("dropping a kernel record: {err}");
                return;
            }
        };
        self.metrics
            .events
            .get_or_create(&KindLabels {
                kind: event.kind_name(),
            })
            .inc();
        let now = Instant::now();
        if !matches!(event, Event::Audit(_)) {
            self.identify_namespace(event.endpoints(), now);
        }
        let aggregate = self.aggregate_labels(&event);
        if let Some(labels) = &aggregate {
            self.metrics.see(labels);
        }
        match event {
            Event::KeepaliveExpiry(expiry) => self.on_expiry(&expiry, aggregate.as_ref(), now),
            Event::Close(close) => self.on_close(&close, aggregate.as_ref(), now),
            // Audit records come from the iter/tcp file, never from the ring buffer.
            Event::Audit(_) => {
                self.metrics.decode_errors.inc();
            }
            // The error is already in the close record (sk_err is set before tcp_done since
            // 6.10); the report only confirms what the application was told.
            Event::ErrorReport(report) => debug!(
                "error {} reported to the application on {} -> {} (netns {})",
                report.error,
                report.endpoints.local,
                report.endpoints.remote,
                report.endpoints.netns
            ),
        }
    }

    fn on_expiry(
        &self,
        expiry: &KeepaliveExpiry,
        aggregate: Option<&AggregateLabels>,
        now: Instant,
    ) {
        let outcome = self.tracker.expiry(expiry, now);
        if outcome.entered {
            let workload = self.attributor.attribute(&expiry.owner);
            self.tracker
                .set_workload(expiry.sk, &expiry.endpoints, workload);
        }
        if outcome.probe_sent
            && let Some(labels) = aggregate
        {
            self.metrics.count_probe(labels);
        }
        if let Some(events) = &self.events
            && (outcome.answered_probes > 0 || (outcome.probe_sent && events.with_probes))
        {
            let workload = self.tracker.workload(expiry.sk);
            self.send_expiry_events(events, expiry, outcome, workload.as_ref());
        }
    }

    fn on_close(&self, close: &CloseEvent, aggregate: Option<&AggregateLabels>, now: Instant) {
        let Some(Dropped {
            reason,
            mut connection,
        }) = self.tracker.close(close, now)
        else {
            return;
        };
        if let Some(labels) = aggregate {
            self.metrics.count_drop(labels, reason);
        }
        if let Some(seconds) = dead_peer_detection_seconds(close, reason, self.hz) {
            self.metrics
                .observe_detection(close.endpoints.netns, reason, seconds);
        }
        if connection.workload.pid.is_none() {
            let newer = self.attributor.attribute(&close.owner);
            connection.workload =
                self.tracker
                    .complete_workload(&close.endpoints, &connection.workload, newer);
        }
        if let Some(events) = &self.events {
            self.send_drop_events(events, close, reason, &connection);
        }
        let e = &connection.endpoints;
        let message = format_args!(
            "connection dropped: {reason} netns={} {} -> {} probes={} unanswered={} errno={}",
            e.netns,
            e.local,
            e.remote,
            connection.probes_sent,
            connection.unanswered_probes,
            close.sk_err
        );
        if matches!(
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
            }
            Sighting::Replaced => {
                // Still under the namespaces lock, so the retention sweep cannot interleave.
                let gone = HashSet::from([endpoints.netns]);
                self.metrics.forget_namespaces(&gone, "inode_reused");
                let connections = self.tracker.forget_namespaces(&gone);
                info!(
                    "netns {} now belongs to a new namespace (cookie {}): the old one's series and {connections} connections removed",
                    endpoints.netns, endpoints.netns_cookie
                );
            }
        }
    }

    /// The aggregate label set of a connection event; `None` for records without an owner
    /// (error reports) when the labels include workload fields, so no series with an empty
    /// workload is created for them.
    fn aggregate_labels(&self, event: &Event) -> Option<AggregateLabels> {
        let owner = match event {
            Event::KeepaliveExpiry(expiry) => Some(&expiry.owner),
            Event::Close(close) => Some(&close.owner),
            Event::ErrorReport(_) | Event::Audit(_) => None,
        };
        let workload = match (self.aggregate_by.needs_workload(), owner) {
            (false, _) => Workload::default(),
            (true, Some(owner)) => self.attributor.attribute_cgroup(owner),
            (true, None) => return None,
        };
        Some(self.aggregate_by.labels(event.endpoints(), &workload))
    }

    fn send_expiry_events(
        &self,
        events: &EventSender,
        expiry: &KeepaliveExpiry,
        outcome: ExpiryOutcome,
        workload: Option<&Workload>,
    ) {
        let with_workload = |mut event: ConnectionEvent| {
            if let Some(workload) = workload {
                event.workload = WorkloadFields::new(workload, expiry.owner.socket_ino);
            }
            event
        };
        // The ACK that answered the streak arrived before this expiry started.
        if outcome.answered_probes > 0 {
            events.send(with_workload(ConnectionEvent::from_expiry(
                EventKind::Answered,
                expiry,
                outcome.answered_probes,
                0,
                self.hz,
            )));
        }
        if outcome.probe_sent && events.with_probes {
            let number = expiry.probes_out_after.unwrap_or(expiry.probes_out_before);
            events.send(with_workload(ConnectionEvent::from_expiry(
                EventKind::ProbeSent,
                expiry,
                number,
                expiry.probes_out_before,
                self.hz,
            )));
        }
    }

    /// A keepalive drop ends a probe streak too: its outcome first, then the drop.
    fn send_drop_events(
        &self,
        events: &EventSender,
        close: &CloseEvent,
        reason: DropReason,
        state: &ConnectionState,
    ) {
        let workload = WorkloadFields::new(&state.workload, close.owner.socket_ino);
        let streak_end = match reason {
            DropReason::KeepaliveTimeout => Some(EventKind::TimedOut),
            DropReason::KeepaliveReset => Some(EventKind::Reset),
            _ => None,
        };
        if let Some(kind) = streak_end {
            let mut event = ConnectionEvent::from_close(
                kind,
                close,
                reason,
                u64::from(close.probes_out),
                close.probes_out,
                self.hz,
            );
            event.workload = workload.clone();
            events.send(event);
        }
        let mut event = ConnectionEvent::from_close(
            EventKind::Drop,
            close,
            reason,
            state.probes_sent,
            state.unanswered_probes.max(close.probes_out),
            self.hz,
        );
        event.workload = workload;
        events.send(event);
    }
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
        let expired = namespaces.expire(now, self.retention);
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
    if !matches!(
        reason,
        DropReason::KeepaliveTimeout | DropReason::KeepaliveReset
    ) {
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
    use crate::record::decoder::fixtures;

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

    fn bytes(rec: &SocketRecord) -> Vec<u8> {
        // SAFETY: SocketRecord is plain data without padding.
        unsafe { std::slice::from_raw_parts((&raw const *rec).cast::<u8>(), SocketRecord::SIZE) }
            .to_vec()
    }

    fn record_bytes(kind: RecordKind, before: u8, after: u8, flags: u8) -> Vec<u8> {
        bytes(&record(kind, before, after, flags))
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

    fn has_detection(metrics: &PipelineMetrics, netns: u32) -> bool {
        metrics
            .detection
            .get(&crate::export::metrics::DropLabels {
                netns,
                reason: DropReason::KeepaliveTimeout.as_str(),
            })
            .is_some()
    }

    /// Namespace `cookie` (inode NETNS) sends `probes` probes on connection `sk`, then the
    /// connection times out.
    fn probes_then_timeout(pipeline: &Pipeline, cookie: u64, sk: u64, probes: u8) {
        for n in 0..probes {
            let mut rec = record(RecordKind::KeepaliveTimer, n, n + 1, 0);
            (rec.netns_cookie, rec.sk) = (cookie, sk);
            pipeline.handle(&bytes(&rec));
        }
        let mut close = record(RecordKind::Close, probes, 0, record_flags::RESET_SENT);
        (close.netns_cookie, close.sk) = (cookie, sk);
        pipeline.handle(&bytes(&close));
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
        pipeline.handle(&bytes(&idle));
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
        pipeline.handle(&bytes(&other));
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
        pipeline.handle(&bytes(&again));
        assert_eq!(probes_of(&metrics, NETNS), Some(1));
        assert_eq!(
            drops_of(&metrics, NETNS, DropReason::KeepaliveTimeout),
            Some(0)
        );
    }

    #[test]
    fn pipeline_reports_answered_streaks_then_the_timeout_and_its_drop() {
        let dropped = Counter::default();
        let (sender, mut receiver) = crate::export::events::channel(64, dropped.clone(), true);
        let pipeline = Pipeline::with_kernel(
            250,
            ResetReasons {
                keepalive_timeout: Some(15),
            },
            Arc::new(Mutex::new(ConnectionTable::new(
                std::num::NonZeroUsize::new(16).unwrap(),
                16,
                Duration::from_secs(60),
            ))),
            PipelineMetrics::default(),
            Arc::new(Attributor::new(None, "/nonexistent".into())),
        )
        .with_events(sender);
        let expiry = RecordKind::KeepaliveTimer;
        // Healthy: each probe's ACK zeroes icsk_probes_out before the next expiry.
        pipeline.handle(&record_bytes(expiry, 0, 1, 0));
        pipeline.handle(&record_bytes(expiry, 0, 1, 0));
        // Then the peer goes silent: 2 more probes, and the abort.
        pipeline.handle(&record_bytes(expiry, 1, 2, 0));
        pipeline.handle(&record_bytes(expiry, 2, 3, 0));
        pipeline.handle(&record_bytes(
            RecordKind::Close,
            3,
            0,
            record_flags::RESET_SENT,
        ));
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
