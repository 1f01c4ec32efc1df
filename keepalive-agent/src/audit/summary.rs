//! What one audit walk means: each socket's effective keepalive settings in seconds with its
//! worst-case dead-peer detection time ([`SocketKeepalive`], shown by `keepalive-agent sockets`),
//! and per-namespace figures for the metrics ([`AuditSummary`], rendered by [`AuditCollector`]).
//!
//! The metrics describe the latest walk only: every walk replaces the previous summary, so a
//! socket that closed disappears from the figures at the next walk.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use keepalive_ebpf::tcp_state;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use serde::Serialize;

use crate::{
    export::{labels::AggregateLabels, metrics::DETECTION_BUCKETS},
    record::decoder::{AuditedSocket, Endpoints, KeepaliveSettings},
    track::idle_kill::{self, Applicable, IdleThreshold},
};

/// The connections the audit metrics count: ESTABLISHED and CLOSE_WAIT. Both hold an open
/// connection the application can leave idle indefinitely, and in both the keepalive timer is
/// the only thing that notices a dead peer (in CLOSE_WAIT the peer sent FIN but may still be
/// there to receive). LISTEN has no peer; SYN_SENT/SYN_RECV, FIN_WAIT*, CLOSING and LAST_ACK are
/// handshake or teardown states bounded by their own timers (a non-orphan FIN_WAIT2 is the one
/// exception, rare enough to leave out); TIME_WAIT and request sockets are not walked at all.
pub(crate) fn is_connection_state(state: u8) -> bool {
    matches!(state, tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT)
}

/// `msecs_to_jiffies`: the kernel rounds up, so a user timeout never fires early.
fn msecs_to_jiffies(ms: u32, hz: u32) -> u64 {
    (u64::from(ms) * u64::from(hz)).div_ceil(1000)
}

/// Worst-case time, in jiffies, from the last segment received to `tcp_keepalive_timer`
/// aborting the connection, if the peer died right after sending it. `None` when keepalive is
/// off: then nothing bounds it (TCP_USER_TIMEOUT only acts on unacknowledged data).
///
/// The timer (net/ipv4/tcp_timer.c: `tcp_keepalive_timer`) first fires `idle` after the last
/// segment received and sends probe 1; each later expiry comes one `interval` after the previous
/// probe, so expiries happen at `idle + k × interval` (k = 0, 1, ...). At each one it aborts when
/// - no TCP_USER_TIMEOUT: `icsk_probes_out >= probes`, first true at k = probes, so the abort
///   comes at `idle + probes × interval` (7875 s with the defaults 7200/75/9);
/// - TCP_USER_TIMEOUT set: `elapsed >= user_timeout && icsk_probes_out > 0` (`probes` is
///   ignored). A probe is out from k = 1, so the abort is at the first `idle + k × interval`
///   with k ≥ 1 that reaches the user timeout: `idle + max(1, ⌈(user_timeout − idle) /
///   interval⌉) × interval`. That is never earlier than `idle + interval` and may overshoot
///   the user timeout by up to one interval (captured on 6.18: idle 1 s, interval 1 s, user
///   timeout 2.5 s → abort at 3 s).
///
/// Timer-wheel slack (the kernel may fire a timer slightly late) is not included.
pub(crate) fn worst_case_detection_jiffies(settings: &KeepaliveSettings, hz: u32) -> Option<u64> {
    if !settings.enabled {
        return None;
    }
    let idle = u64::from(settings.idle_jiffies);
    // The kernel refuses a 0 interval (sysctl and TCP_KEEPINTVL minimum is 1 s); guard anyway.
    let interval = u64::from(settings.interval_jiffies).max(1);
    if settings.user_timeout_ms == 0 {
        return Some(idle + u64::from(settings.probes) * interval);
    }
    let user_timeout = msecs_to_jiffies(settings.user_timeout_ms, hz);
    let probes_until_abort = user_timeout.saturating_sub(idle).div_ceil(interval).max(1);
    Some(idle + probes_until_abort * interval)
}

/// One socket of a walk, in the units an operator reads. Field names are the JSON schema of
/// `keepalive-agent sockets --output json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct SocketKeepalive {
    /// Network namespace inode (`ls -L -i /proc/PID/ns/net`).
    pub netns: u32,
    /// TCP state, as `ss` names it (`ESTABLISHED`, `CLOSE_WAIT`, `LISTEN`, ...).
    pub state: &'static str,
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    /// `SO_KEEPALIVE` is on.
    pub keepalive: bool,
    /// Effective `TCP_KEEPIDLE`: the socket's own value, else the namespace's
    /// `net.ipv4.tcp_keepalive_time` (what `getsockopt` returns). Shown when keepalive is off
    /// too: it is what enabling it would apply.
    pub idle_seconds: f64,
    /// Effective `TCP_KEEPINTVL` (else `net.ipv4.tcp_keepalive_intvl`).
    pub interval_seconds: f64,
    /// Effective `TCP_KEEPCNT` (else `net.ipv4.tcp_keepalive_probes`).
    pub probes: u8,
    /// `TCP_USER_TIMEOUT` in milliseconds; 0 = not set.
    pub user_timeout_ms: u32,
    /// `icsk_probes_out`: probes sent and not answered yet (0 on a healthy connection).
    pub unanswered_probes: u8,
    /// See [`worst_case_detection_jiffies`]; `null` when keepalive is off.
    pub worst_case_detection_seconds: Option<f64>,
    /// Seconds since the connection last carried data either way
    /// ([`AuditedSocket::silent_jiffies`]); `null` for listeners and teardown states.
    pub silent_seconds: Option<f64>,
    /// The middlebox idle timeout (`--idle-timeout-threshold` name) this connection has already
    /// been silent past, with keepalive off or its idle not below it: the middlebox has
    /// forgotten the flow and the next send dies ([`idle_kill::exposed_to`]). `null` otherwise,
    /// and for listeners.
    pub idle_kill_risk: Option<String>,
    /// The namespace's conntrack established timeout when conntrack tracks its connections of
    /// this family (the `conntrack` threshold, see [`idle_kill::CONNTRACK`]); `null` otherwise.
    pub conntrack_timeout_seconds: Option<f64>,
    /// cgroup v2 id of the owning cgroup (inode of its directory under /sys/fs/cgroup); 0 if
    /// unknown.
    pub cgroup_id: u64,
    /// Inode of the socket (`socket:[INO]` in /proc/PID/fd); 0 when no process holds it.
    pub socket_ino: u64,
    /// The process holding the socket (the lowest pid when several do), from the `socket:[INO]`
    /// links under `--proc.root`; `null` when none is found there (an orphan, or a process in
    /// a PID namespace that proc filesystem does not show).
    pub pid: Option<u32>,
    /// That process's `comm` (at most 15 bytes, as `ps -o comm` shows it).
    pub comm: Option<String>,
}

impl SocketKeepalive {
    pub(crate) fn new(socket: &AuditedSocket, hz: u32) -> Self {
        let seconds = |jiffies: u64| jiffies as f64 / f64::from(hz);
        let e = &socket.endpoints;
        let s = &socket.settings;
        Self {
            netns: e.netns,
            state: tcp_state::name(socket.state),
            local_addr: e.local.ip().to_string(),
            local_port: e.local.port(),
            remote_addr: e.remote.ip().to_string(),
            remote_port: e.remote.port(),
            keepalive: s.enabled,
            idle_seconds: seconds(u64::from(s.idle_jiffies)),
            interval_seconds: seconds(u64::from(s.interval_jiffies)),
            probes: s.probes,
            user_timeout_ms: s.user_timeout_ms,
            unanswered_probes: socket.probes_out,
            worst_case_detection_seconds: worst_case_detection_jiffies(s, hz).map(seconds),
            silent_seconds: is_connection_state(socket.state)
                .then(|| seconds(u64::from(socket.silent_jiffies()))),
            idle_kill_risk: None,
            conntrack_timeout_seconds: (socket.conntrack_timeout_jiffies != 0)
                .then(|| seconds(u64::from(socket.conntrack_timeout_jiffies))),
            cgroup_id: socket.owner.cgroup_id,
            socket_ino: socket.owner.socket_ino,
            pid: None,
            comm: None,
        }
    }

    /// Marks a connection already silent past a threshold its keepalive does not beat (see
    /// [`Self::idle_kill_risk`]).
    pub(crate) fn with_idle_kill_risk(
        mut self,
        node_thresholds: &[IdleThreshold],
        endpoints: &Endpoints,
    ) -> Self {
        if let Some(silent) = self.silent_seconds {
            let keepalive_idle = self.keepalive.then_some(self.idle_seconds);
            let thresholds = Applicable::with_seconds(
                node_thresholds,
                (endpoints.local, endpoints.remote),
                self.conntrack_timeout_seconds,
            );
            self.idle_kill_risk = idle_kill::exposed_to(silent, keepalive_idle, thresholds)
                .map(|(name, _)| name.to_owned());
        }
        self
    }
}

/// Observations of one walk in [`DETECTION_BUCKETS`] (plus +Inf), not cumulative.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BucketCounts {
    /// `per_bucket[i]` counts values in `(DETECTION_BUCKETS[i-1], DETECTION_BUCKETS[i]]`; the
    /// last entry counts values above every bound.
    pub per_bucket: [u64; DETECTION_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl Default for BucketCounts {
    fn default() -> Self {
        Self {
            per_bucket: [0; DETECTION_BUCKETS.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }
}

impl BucketCounts {
    pub(crate) fn observe(&mut self, value: f64) {
        let index = DETECTION_BUCKETS
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(DETECTION_BUCKETS.len());
        self.per_bucket[index] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// `(upper bound, count in this bucket)` as prometheus-client's encoder wants them (it
    /// accumulates), ending with +Inf.
    fn buckets(&self) -> Vec<(f64, u64)> {
        DETECTION_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.per_bucket)
            .collect()
    }
}

/// One label set's figures from one walk; connections are ESTABLISHED/CLOSE_WAIT sockets.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct GroupAudit {
    pub keepalive_on: u64,
    pub keepalive_off: u64,
    /// Effective idle time of keepalive-on connections.
    pub idle_seconds: BucketCounts,
    /// Worst-case dead-peer detection time of keepalive-on connections.
    pub worst_case_detection_seconds: BucketCounts,
    /// Keepalive-on connections whose idle time is at or above each threshold (same order as
    /// the thresholds given to [`AuditSummary::new`]).
    pub idle_at_or_above_threshold: Vec<u64>,
    /// Where conntrack tracks connections of the group (see [`idle_kill::CONNTRACK`]): its
    /// keepalive-on connections whose idle time is at or above their namespace's conntrack
    /// established timeout. `None`: no walked socket of the group is tracked (or a node
    /// threshold is named `conntrack`), so the series is absent.
    pub idle_at_or_above_conntrack: Option<u64>,
}

/// Per-label-set figures of one walk. Every label set with at least one walked socket (a
/// listener is enough) appears, so its series exist at 0 before it has connections.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct AuditSummary {
    pub thresholds: Vec<IdleThreshold>,
    pub groups: BTreeMap<AggregateLabels, GroupAudit>,
}

impl AuditSummary {
    pub(crate) fn new(
        sockets: &[AuditedSocket],
        hz: u32,
        thresholds: &[IdleThreshold],
        group_of: impl Fn(&AuditedSocket) -> AggregateLabels,
    ) -> Self {
        let mut groups: BTreeMap<AggregateLabels, GroupAudit> = BTreeMap::new();
        for socket in sockets {
            let netns = groups
                .entry(group_of(socket))
                .or_insert_with(|| GroupAudit {
                    idle_at_or_above_threshold: vec![0; thresholds.len()],
                    ..GroupAudit::default()
                });
            let endpoints = (socket.endpoints.local, socket.endpoints.remote);
            let conntrack =
                Applicable::new(thresholds, endpoints, socket.conntrack_timeout_jiffies, hz)
                    .conntrack_seconds();
            if conntrack.is_some() {
                netns.idle_at_or_above_conntrack.get_or_insert(0);
            }
            if !is_connection_state(socket.state) {
                continue;
            }
            let settings = &socket.settings;
            if !settings.enabled {
                netns.keepalive_off += 1;
                continue;
            }
            netns.keepalive_on += 1;
            let idle = f64::from(settings.idle_jiffies) / f64::from(hz);
            netns.idle_seconds.observe(idle);
            if let Some(jiffies) = worst_case_detection_jiffies(settings, hz) {
                netns
                    .worst_case_detection_seconds
                    .observe(jiffies as f64 / f64::from(hz));
            }
            for (count, threshold) in netns.idle_at_or_above_threshold.iter_mut().zip(thresholds) {
                *count += u64::from(
                    idle >= threshold.seconds && threshold.applies_to(endpoints.0, endpoints.1),
                );
            }
            if let (Some(count), Some(timeout)) = (&mut netns.idle_at_or_above_conntrack, conntrack)
            {
                *count += u64::from(idle >= timeout);
            }
        }
        Self {
            thresholds: thresholds.to_vec(),
            groups,
        }
    }
}

/// What the audit metrics render: the latest summary and the walks' own health.
#[derive(Debug, Default)]
pub(crate) struct AuditState {
    /// False when the iter/tcp program could not be loaded: no walk ever runs.
    pub enabled: bool,
    pub latest: Option<AuditSummary>,
    pub last_duration: Option<Duration>,
    /// Sockets of every state and namespace in the latest walk.
    pub last_sockets: usize,
    pub errors: u64,
}

/// Renders the audit metrics from [`AuditState`] at scrape time.
///
/// The two distributions are exported with the `histogram` type, but they are snapshots: each
/// walk replaces them, so buckets, `_count` and `_sum` can go down. Query them as they are
/// (`histogram_quantile(0.9, tcp_keepalive_idle_seconds_bucket)`, `_count`), never with
/// `rate()`/`increase()`. (OpenMetrics calls this a gauge histogram; prometheus-client 0.26
/// cannot encode that type, and Prometheus would only turn it into separate gauges.)
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditCollector {
    pub state: Arc<Mutex<AuditState>>,
}

/// Which of a namespace's distributions a histogram renders.
type PickCounts = fn(&GroupAudit) -> &BucketCounts;

/// `group` plus one more label.
fn with_label(group: &AggregateLabels, key: &'static str, value: &str) -> AggregateLabels {
    let mut labels = group.clone();
    labels.push((key, value.to_owned()));
    labels
}

impl Collector for AuditCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let state = self.state.lock().map_err(|_| fmt::Error)?;

        ConstGauge::new(i64::from(state.enabled)).encode(encoder.encode_descriptor(
            "keepalive_agent_audit_enabled",
            "1 when the iter/tcp keepalive configuration audit is loaded; 0 means it could not load (see the agent's log) and the tcp_keepalive_* audit metrics are absent",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(state.errors).encode(encoder.encode_descriptor(
            "keepalive_agent_audit_errors",
            "Audit walks of one network namespace that failed (see the agent's log); that namespace is missing from the audit metrics until a walk succeeds",
            None,
            MetricType::Counter,
        )?)?;
        if let Some(duration) = state.last_duration {
            ConstGauge::new(duration.as_secs_f64()).encode(encoder.encode_descriptor(
                "keepalive_agent_audit_duration_seconds",
                "How long the latest audit walk of every TCP socket took",
                None,
                MetricType::Gauge,
            )?)?;
            ConstGauge::new(state.last_sockets as i64).encode(encoder.encode_descriptor(
                "keepalive_agent_audit_sockets",
                "TCP sockets seen by the latest audit walk, every namespace and state (TIME_WAIT and request sockets are not walked)",
                None,
                MetricType::Gauge,
            )?)?;
        }

        let Some(summary) = &state.latest else {
            return Ok(());
        };
        let mut sockets = encoder.encode_descriptor(
            "tcp_keepalive_sockets",
            "ESTABLISHED and CLOSE_WAIT TCP connections by SO_KEEPALIVE (latest audit walk)",
            None,
            MetricType::Gauge,
        )?;
        for (group, audit) in &summary.groups {
            for (keepalive, count) in [("on", audit.keepalive_on), ("off", audit.keepalive_off)] {
                let labels = with_label(group, "keepalive", keepalive);
                ConstGauge::new(count as i64).encode(sockets.encode_family(&labels)?)?;
            }
        }

        let histograms: [(&str, &str, PickCounts); 2] = [
            (
                "tcp_keepalive_idle_seconds",
                "Effective keepalive idle time (TCP_KEEPIDLE, else the namespace's tcp_keepalive_time) of keepalive-on connections; a snapshot of the latest audit walk, not cumulative",
                |audit| &audit.idle_seconds,
            ),
            (
                "tcp_keepalive_worst_case_detection_seconds",
                "Worst-case time from a peer's death to the keepalive abort of keepalive-on connections: idle + count x interval, or with TCP_USER_TIMEOUT the first probe time at or after it; a snapshot of the latest audit walk, not cumulative",
                |audit| &audit.worst_case_detection_seconds,
            ),
        ];
        for (name, help, pick) in histograms {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (group, audit) in &summary.groups {
                let counts = pick(audit);
                family
                    .encode_family(group)?
                    .encode_histogram::<NoLabelSet>(
                        counts.sum,
                        counts.count,
                        &counts.buckets(),
                        None,
                    )?;
            }
        }

        let mut at_or_above = encoder.encode_descriptor(
            "tcp_keepalive_idle_at_or_above_threshold_sockets",
            "Keepalive-on connections whose idle time is at or above a middlebox idle timeout (--idle-timeout-threshold): the middlebox forgets them before the first probe. Keepalive-off connections are all exposed: add tcp_keepalive_sockets{keepalive=\"off\"}",
            None,
            MetricType::Gauge,
        )?;
        for (group, audit) in &summary.groups {
            for (threshold, count) in summary
                .thresholds
                .iter()
                .zip(&audit.idle_at_or_above_threshold)
            {
                let labels = with_label(group, "threshold", &threshold.name);
                ConstGauge::new(*count as i64).encode(at_or_above.encode_family(&labels)?)?;
            }
            if let Some(count) = audit.idle_at_or_above_conntrack {
                let labels = with_label(group, "threshold", idle_kill::CONNTRACK);
                ConstGauge::new(count as i64).encode(at_or_above.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        attribution::Workload,
        export::labels::AggregateBy,
        record::decoder::{Endpoints, SocketOwner},
    };

    const HZ: u32 = 250;

    fn settings(
        idle_s: u32,
        interval_s: u32,
        probes: u8,
        user_timeout_ms: u32,
    ) -> KeepaliveSettings {
        KeepaliveSettings {
            enabled: true,
            idle_jiffies: idle_s * HZ,
            interval_jiffies: interval_s * HZ,
            probes,
            user_timeout_ms,
        }
    }

    #[test]
    fn a_connection_silent_past_a_threshold_its_keepalive_does_not_beat_is_at_risk() {
        let thresholds: Vec<IdleThreshold> = ["aws-nlb=350", "gcp-lb=600"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        // Silent 400 s: nothing received or sent since jiffy 1000.
        let silent = |keepalive: KeepaliveSettings, state: u8| {
            let mut audited = socket(1, state, keepalive);
            (audited.last_received_jiffies, audited.last_sent_jiffies) = (1000, 900);
            audited.jiffies = 1000 + 400 * u64::from(HZ);
            SocketKeepalive::new(&audited, HZ).with_idle_kill_risk(&thresholds, &audited.endpoints)
        };
        let established = tcp_state::ESTABLISHED;
        let default_idle = silent(settings(7200, 75, 9, 0), established);
        assert_eq!(default_idle.silent_seconds, Some(400.0));
        assert_eq!(default_idle.idle_kill_risk.as_deref(), Some("aws-nlb"));
        let off = silent(
            KeepaliveSettings {
                enabled: false,
                ..settings(60, 10, 3, 0)
            },
            established,
        );
        assert_eq!(off.idle_kill_risk.as_deref(), Some("aws-nlb"));
        // Its probes come before any threshold: they keep the flow.
        assert_eq!(
            silent(settings(60, 10, 3, 0), established).idle_kill_risk,
            None
        );
        assert_eq!(
            silent(settings(7200, 75, 9, 0), tcp_state::LISTEN).idle_kill_risk,
            None
        );
        // Data sent 10 s ago: the middlebox saw it, the silence is 10 s.
        let mut recent = socket(1, established, settings(7200, 75, 9, 0));
        recent.jiffies = 1000 + 400 * u64::from(HZ);
        recent.last_sent_jiffies = recent.jiffies as u32 - 10 * HZ;
        let recent =
            SocketKeepalive::new(&recent, HZ).with_idle_kill_risk(&thresholds, &recent.endpoints);
        assert_eq!(recent.silent_seconds, Some(10.0));
        assert_eq!(recent.idle_kill_risk, None);
    }

    fn worst_case_seconds(s: KeepaliveSettings) -> Option<f64> {
        worst_case_detection_jiffies(&s, HZ).map(|j| j as f64 / f64::from(HZ))
    }

    #[test]
    fn worst_case_without_user_timeout_is_idle_plus_count_intervals() {
        assert_eq!(worst_case_seconds(settings(7200, 75, 9, 0)), Some(7875.0));
        assert_eq!(worst_case_seconds(settings(1, 1, 3, 0)), Some(4.0));
        let off = KeepaliveSettings {
            enabled: false,
            ..settings(7200, 75, 9, 0)
        };
        assert_eq!(worst_case_seconds(off), None);
    }

    #[test]
    fn worst_case_with_user_timeout_is_the_first_probe_time_reaching_it() {
        // Captured on 6.18: idle 1, interval 1, user timeout 2.5 s → abort at 3 s.
        assert_eq!(worst_case_seconds(settings(1, 1, 3, 2500)), Some(3.0));
        // The count no longer matters: 9 probes would be 7875 s.
        assert_eq!(
            worst_case_seconds(settings(7200, 75, 9, 7_300_000)),
            Some(7350.0)
        );
        // A user timeout exactly on a probe time aborts there.
        assert_eq!(
            worst_case_seconds(settings(60, 10, 3, 100_000)),
            Some(100.0)
        );
        assert_eq!(worst_case_seconds(settings(60, 10, 3, 95_000)), Some(100.0));
        // Shorter than idle: the abort still needs one probe out, one interval after idle.
        assert_eq!(worst_case_seconds(settings(60, 10, 3, 5_000)), Some(70.0));
        // Rounded up to a whole jiffy like msecs_to_jiffies (4 ms at 250 Hz): 1 ms past
        // idle + interval needs a second interval.
        assert_eq!(worst_case_seconds(settings(1, 1, 3, 2_001)), Some(3.0));
    }

    fn socket(netns: u32, state: u8, settings: KeepaliveSettings) -> AuditedSocket {
        AuditedSocket {
            sk: 1,
            endpoints: Endpoints {
                netns,
                netns_cookie: 0,
                local: SocketAddr::from((Ipv4Addr::LOCALHOST, 1000)),
                remote: SocketAddr::from((Ipv4Addr::LOCALHOST, 2000)),
            },
            owner: SocketOwner::default(),
            state,
            settings,
            probes_out: 0,
            jiffies: 0,
            last_received_jiffies: 0,
            last_sent_jiffies: 0,
            conntrack_timeout_jiffies: 0,
        }
    }

    fn sample_walk() -> Vec<AuditedSocket> {
        let off = KeepaliveSettings {
            enabled: false,
            ..settings(7200, 75, 9, 0)
        };
        vec![
            socket(7, tcp_state::ESTABLISHED, settings(7200, 75, 9, 0)),
            socket(7, tcp_state::CLOSE_WAIT, settings(300, 30, 4, 0)),
            socket(7, tcp_state::ESTABLISHED, off),
            // Not connections: counted nowhere, but the namespace shows up.
            socket(7, tcp_state::LISTEN, settings(1, 1, 1, 0)),
            socket(8, tcp_state::LISTEN, off),
            socket(9, tcp_state::FIN_WAIT2, settings(1, 1, 1, 0)),
        ]
    }

    /// What the agent counts by when `--aggregate-by` is left at its default.
    fn netns_group(socket: &AuditedSocket) -> AggregateLabels {
        AggregateBy::default().labels(&socket.endpoints, &Workload::default())
    }

    #[test]
    fn summary_counts_connections_per_namespace() {
        let thresholds = ["aws-nlb=350", "short=300"].map(|t| t.parse().expect("threshold"));
        let summary = AuditSummary::new(&sample_walk(), HZ, &thresholds, netns_group);
        let group = |netns: &str| vec![("netns", netns.to_owned())];
        assert_eq!(
            summary.groups.keys().cloned().collect::<Vec<_>>(),
            [group("7"), group("8"), group("9")]
        );
        let ns = &summary.groups[&group("7")];
        assert_eq!((ns.keepalive_on, ns.keepalive_off), (2, 1));
        assert_eq!(ns.idle_seconds.count, 2);
        assert_eq!(ns.idle_seconds.sum, 7500.0);
        assert_eq!(ns.worst_case_detection_seconds.sum, 7875.0 + 420.0);
        // 7200 ≥ 350; 300 ≥ 300 (at or above) and 7200 ≥ 300.
        assert_eq!(ns.idle_at_or_above_threshold, [1, 2]);
        assert_eq!(
            summary.groups[&group("8")],
            GroupAudit {
                idle_at_or_above_threshold: vec![0, 0],
                ..GroupAudit::default()
            }
        );
    }

    #[test]
    fn metrics_render_the_latest_walk_as_cumulative_buckets() {
        let thresholds = ["aws-nlb=350".parse().expect("threshold")];
        let collector = AuditCollector::default();
        {
            let mut state = collector.state.lock().expect("lock");
            state.enabled = true;
            state.last_duration = Some(Duration::from_millis(1500));
            state.last_sockets = 6;
            state.latest = Some(AuditSummary::new(
                &sample_walk(),
                HZ,
                &thresholds,
                netns_group,
            ));
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let has = |line: &str| text.lines().any(|l| l == line);
        for line in [
            "keepalive_agent_audit_enabled 1",
            "keepalive_agent_audit_duration_seconds 1.5",
            "keepalive_agent_audit_sockets 6",
            "keepalive_agent_audit_errors_total 0",
            r#"tcp_keepalive_sockets{netns="7",keepalive="on"} 2"#,
            r#"tcp_keepalive_sockets{netns="7",keepalive="off"} 1"#,
            r#"tcp_keepalive_sockets{netns="8",keepalive="on"} 0"#,
            "# TYPE tcp_keepalive_idle_seconds histogram",
            r#"tcp_keepalive_idle_seconds_count{netns="7"} 2"#,
            r#"tcp_keepalive_idle_seconds_sum{netns="7"} 7500.0"#,
            // 300 s falls in (120, 300]; 7200 s in (3600, 7200]; buckets accumulate.
            r#"tcp_keepalive_idle_seconds_bucket{le="120.0",netns="7"} 0"#,
            r#"tcp_keepalive_idle_seconds_bucket{le="300.0",netns="7"} 1"#,
            r#"tcp_keepalive_idle_seconds_bucket{le="3600.0",netns="7"} 1"#,
            r#"tcp_keepalive_idle_seconds_bucket{le="7200.0",netns="7"} 2"#,
            r#"tcp_keepalive_idle_seconds_bucket{le="+Inf",netns="7"} 2"#,
            // 420 s in (300, 600]; 7875 s in (7200, 7875].
            r#"tcp_keepalive_worst_case_detection_seconds_bucket{le="300.0",netns="7"} 0"#,
            r#"tcp_keepalive_worst_case_detection_seconds_bucket{le="600.0",netns="7"} 1"#,
            r#"tcp_keepalive_worst_case_detection_seconds_bucket{le="7200.0",netns="7"} 1"#,
            r#"tcp_keepalive_worst_case_detection_seconds_bucket{le="7875.0",netns="7"} 2"#,
            r#"tcp_keepalive_worst_case_detection_seconds_count{netns="9"} 0"#,
            r#"tcp_keepalive_idle_at_or_above_threshold_sockets{netns="7",threshold="aws-nlb"} 1"#,
            r#"tcp_keepalive_idle_at_or_above_threshold_sockets{netns="8",threshold="aws-nlb"} 0"#,
        ] {
            assert!(has(line), "missing {line:?} in:\n{text}");
        }
    }

    /// Namespace 7 has conntrack attached with a 3600 s established timeout, namespace 8 does
    /// not: only 7 gets a conntrack series, counted against its own timeout.
    #[test]
    fn the_conntrack_threshold_is_each_tracked_namespaces_own() {
        let tracked = |mut socket: AuditedSocket| {
            socket.conntrack_timeout_jiffies = 3600 * HZ;
            socket
        };
        let walk = vec![
            tracked(socket(7, tcp_state::ESTABLISHED, settings(7200, 75, 9, 0))),
            tracked(socket(7, tcp_state::ESTABLISHED, settings(300, 75, 9, 0))),
            socket(8, tcp_state::ESTABLISHED, settings(7200, 75, 9, 0)),
        ];
        let summary = AuditSummary::new(&walk, HZ, &[], netns_group);
        let group = |netns: &str| vec![("netns", netns.to_owned())];
        assert_eq!(
            summary.groups[&group("7")].idle_at_or_above_conntrack,
            Some(1)
        );
        assert_eq!(summary.groups[&group("8")].idle_at_or_above_conntrack, None);

        // A threshold given with the name replaces every namespace's own.
        let given = ["conntrack=60".parse().expect("threshold")];
        let summary = AuditSummary::new(&walk, HZ, &given, netns_group);
        assert_eq!(summary.groups[&group("7")].idle_at_or_above_conntrack, None);
        assert_eq!(summary.groups[&group("7")].idle_at_or_above_threshold, [2]);
        assert_eq!(summary.groups[&group("8")].idle_at_or_above_threshold, [1]);

        let shown = SocketKeepalive::new(&walk[0], HZ);
        assert_eq!(shown.conntrack_timeout_seconds, Some(3600.0));
        assert_eq!(
            SocketKeepalive::new(&walk[2], HZ).conntrack_timeout_seconds,
            None
        );
    }

    #[test]
    fn without_a_walk_only_the_audit_health_is_rendered() {
        let collector = AuditCollector::default();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("keepalive_agent_audit_enabled 0"), "{text}");
        assert!(!text.contains("tcp_keepalive_sockets"), "{text}");
    }
}
