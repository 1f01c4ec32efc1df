//! One record from the ring buffer, end to end: decode → connection table → classify → metrics.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use log::{debug, info, warn};

use crate::{
    attribution::{AggregateBy, Attributor, Workload},
    classifier::{self, CloseOutcome, DropReason, ResetReasons},
    connection_table::{ConnectionState, ConnectionTable, ExpiryOutcome},
    decoder::{self, CloseEvent, Event, KeepaliveExpiry},
    events::{ConnectionEvent, EventKind, EventSender, WorkloadFields},
    metrics::{AggregateLabels, KindLabels, PipelineMetrics},
};

pub struct Pipeline {
    pub table: Arc<Mutex<ConnectionTable>>,
    pub metrics: PipelineMetrics,
    pub reset_reasons: ResetReasons,
    /// CONFIG_HZ: receive stamps and keepalive settings are in jiffies.
    pub hz: u32,
    /// The event stream (`--events`, `watch`), when someone reads it.
    pub events: Option<EventSender>,
    /// Who owns a connection: asked once when a connection enters the table (and at close if
    /// its process was unknown), and per event only for the cgroup when aggregates need it.
    pub attributor: Attributor,
    /// Labels of the aggregate probe and drop counters (`--aggregate-by`).
    pub aggregate_by: AggregateBy,
}

impl Pipeline {
    pub fn handle(&self, bytes: &[u8]) {
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
        let netns = event.endpoints().netns;
        let aggregate = self.aggregate_labels(&event);
        if let Some(labels) = &aggregate {
            self.metrics.see(labels);
        }
        let now = Instant::now();
        let mut table = self.table.lock().expect("connection table lock poisoned");
        match event {
            Event::KeepaliveExpiry(expiry) => {
                let outcome = table.on_expiry(&expiry, now);
                if outcome.entered
                    && let Some(state) = table.live_mut(expiry.sk)
                {
                    state.workload = self.attributor.attribute(&expiry.owner);
                }
                if outcome.probe_sent
                    && let Some(labels) = &aggregate
                {
                    self.metrics.count_probe(labels);
                }
                if let Some(events) = &self.events
                    && (outcome.answered_probes > 0 || (outcome.probe_sent && events.with_probes))
                {
                    let workload = table
                        .live_mut(expiry.sk)
                        .map(|state| state.workload.clone());
                    self.send_expiry_events(events, &expiry, outcome, workload.as_ref());
                }
            }
            Event::Close(close) => {
                let outcome = classifier::classify(&close, self.reset_reasons);
                let CloseOutcome::Dropped(reason) = outcome else {
                    table.on_close(&close, outcome, now);
                    return;
                };
                if let Some(labels) = &aggregate {
                    self.metrics.count_drop(labels, reason);
                }
                if let Some(seconds) = dead_peer_detection_seconds(&close, reason, self.hz) {
                    self.metrics.observe_detection(netns, reason, seconds);
                }
                if let Some(state) = table.on_close(&close, outcome, now) {
                    // The process may have exited since; what was learnt earlier stays.
                    if state.workload.pid.is_none() {
                        let newer = self.attributor.attribute(&close.owner);
                        state.workload.fill_unknown_from(newer);
                    }
                    if let Some(events) = &self.events {
                        self.send_drop_events(events, &close, reason, state);
                    }
                    let e = &state.endpoints;
                    let message = format_args!(
                        "connection dropped: {reason} netns={} {} -> {} probes={} unanswered={} errno={}",
                        e.netns,
                        e.local,
                        e.remote,
                        state.probes_sent,
                        state.unanswered_probes,
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
            // Audit records come from the iter/tcp file, never from the ring buffer.
            Event::Audit(_) => {
                self.metrics.decode_errors.inc();
            }
            // The error is already in the close record (sk_err is set before tcp_done since
            // 6.10); the report only confirms what the application was told.
            Event::ErrorReport(report) => debug!(
                "error {} reported to the application on {} -> {} (netns {})",
                report.error, report.endpoints.local, report.endpoints.remote, netns
            ),
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
pub fn dead_peer_detection_seconds(close: &CloseEvent, reason: DropReason, hz: u32) -> Option<f64> {
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
    use super::*;
    use crate::decoder::fixtures;

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
