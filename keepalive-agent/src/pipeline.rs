//! One record from the ring buffer, end to end: decode → connection table → classify → metrics.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use log::{debug, info, warn};

use crate::{
    classifier::{self, CloseOutcome, DropReason, ResetReasons},
    connection_table::ConnectionTable,
    decoder::{self, CloseEvent, Event},
    hz,
    metrics::{KindLabels, PipelineMetrics},
};

pub struct Pipeline {
    pub table: Arc<Mutex<ConnectionTable>>,
    pub metrics: PipelineMetrics,
    pub reset_reasons: ResetReasons,
    /// CONFIG_HZ: receive stamps and keepalive settings are in jiffies.
    pub hz: u32,
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
                if let Some(seconds) = dead_peer_detection_seconds(&close, reason, self.hz) {
                    self.metrics.observe_detection(netns, reason, seconds);
                }
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
    // The stamps are 32-bit jiffies (tcp_jiffies32); wrapping subtraction survives the wrap.
    let silent = (close.jiffies as u32).wrapping_sub(close.last_received_jiffies);
    Some(hz::jiffies_to_seconds(u64::from(silent), hz))
}

#[cfg(test)]
mod tests {
    use keepalive_ebpf::{CloseContext, tcp_state};

    use super::*;
    use crate::decoder::{Endpoints, KeepaliveSettings, SocketOwner};

    #[test]
    fn detection_time_counts_jiffies_since_the_last_segment_across_the_wrap() {
        let close = CloseEvent {
            sk: 1,
            endpoints: Endpoints {
                netns: 1,
                local: "127.0.0.1:1".parse().unwrap(),
                remote: "127.0.0.1:2".parse().unwrap(),
            },
            owner: SocketOwner::default(),
            old_state: tcp_state::ESTABLISHED,
            context: CloseContext::KeepaliveTimer,
            reset_received: false,
            reset_sent_reason: None,
            orphan: false,
            settings: KeepaliveSettings {
                enabled: true,
                idle_jiffies: 250,
                interval_jiffies: 250,
                probes: 3,
                user_timeout_ms: 0,
            },
            probes_out: 3,
            packets_out: 0,
            write_timer_event: 0,
            send_window: 1,
            sk_err: libc::ETIMEDOUT,
            sk_err_soft: 0,
            ktime_ns: 0,
            // 1000 jiffies after a stamp taken 500 jiffies before the 32-bit wrap.
            jiffies: (1u64 << 32) + 500,
            last_received_jiffies: u32::MAX - 499,
        };
        let seconds = dead_peer_detection_seconds(&close, DropReason::KeepaliveTimeout, 250);
        assert_eq!(seconds, Some(4.0));
        assert_eq!(
            dead_peer_detection_seconds(&close, DropReason::ResetReceived, 250),
            None
        );
    }
}
