//! One record from the ring buffer, end to end: decode → connection table → classify → metrics.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
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
        decoder::{self, CloseEvent, Event, KeepaliveExpiry},
        ring_reader,
    },
    track::{
        classifier::{DropReason, ResetReasons},
        connection_table::{ConnectionState, ConnectionTable, ExpiryOutcome},
        tracker::{Dropped, Tracker},
    },
};

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
        let aggregate = self.aggregate_labels(&event);
        if let Some(labels) = &aggregate {
            self.metrics.see(labels);
        }
        let now = Instant::now();
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
    fn record_bytes(kind: RecordKind, before: u8, after: u8, flags: u8) -> Vec<u8> {
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
        // SAFETY: SocketRecord is plain data without padding.
        unsafe { std::slice::from_raw_parts((&raw const rec).cast::<u8>(), SocketRecord::SIZE) }
            .to_vec()
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
