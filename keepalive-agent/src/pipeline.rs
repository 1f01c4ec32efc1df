//! One record from the ring buffer, end to end: decode → connection table → classify → metrics.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use log::{debug, info, warn};

use crate::{
    classifier::{self, CloseOutcome, DropReason, ResetReasons},
    connection_table::ConnectionTable,
    decoder::{self, Event},
    metrics::{KindLabels, PipelineMetrics},
};

pub struct Pipeline {
    pub table: Arc<Mutex<ConnectionTable>>,
    pub metrics: PipelineMetrics,
    pub reset_reasons: ResetReasons,
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
        self.metrics.see_netns(netns);
        let now = Instant::now();
        let mut table = self.table.lock().expect("connection table lock poisoned");
        match event {
            Event::KeepaliveExpiry(expiry) => {
                let outcome = table.on_expiry(&expiry, now);
                if outcome.probe_sent {
                    self.metrics.count_probe(netns);
                }
            }
            Event::Close(close) => {
                let outcome = classifier::classify(&close, self.reset_reasons);
                let CloseOutcome::Dropped(reason) = outcome else {
                    table.on_close(&close, outcome, now);
                    return;
                };
                self.metrics.count_drop(netns, reason);
                if let Some(state) = table.on_close(&close, outcome, now) {
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
            // The error is already in the close record (sk_err is set before tcp_done since
            // 6.10); the report only confirms what the application was told.
            // Audit records come from the iter/tcp file, never from the ring buffer.
            Event::Audit(_) => {
                self.metrics.decode_errors.inc();
            }
            Event::ErrorReport(report) => debug!(
                "error {} reported to the application on {} -> {} (netns {})",
                report.error, report.endpoints.local, report.endpoints.remote, netns
            ),
        }
    }
}
