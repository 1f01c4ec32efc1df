//! Everything the agent exports. Aggregates are prometheus-client families updated by the
//! pipeline; per-connection series and table gauges are rendered from the connection table at
//! scrape time, so the cap and the retention apply without bookkeeping twice.

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        gauge::Gauge, histogram::Histogram, info::Info,
    },
    registry::Registry,
};

use crate::{
    export::labels::{AggregateLabels, connection_labels},
    record::netns_counters::NetnsCounterMaps,
    track::{
        classifier::DropReason,
        connection_table::{ConnectionState, ConnectionTable, DropClass},
        idle_kill::{IdleKill, IdleKillHow, NodeThresholds},
    },
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetnsLabels {
    netns: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DropLabels {
    pub netns: u32,
    pub reason: &'static str,
}

/// Buckets of `tcp_keepalive_dead_peer_detection_seconds`: from a tuned 1 s probe to beyond the
/// Linux default worst case (7200 s idle + 9 × 75 s = 7875 s).
pub(crate) const DETECTION_BUCKETS: [f64; 16] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    7875.0, 14400.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub kind: &'static str,
}

/// Why a namespace's series were removed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ForgetLabels {
    /// `inode_reused`: a record came from a new namespace holding the inode;
    /// `retention`: not seen for `--netns.retention`.
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HookLabels {
    pub hook: &'static str,
    pub program_type: &'static str,
    /// The variant that attached (e.g. `timer_expire_entry_typed`), empty when none did.
    pub program: &'static str,
}

/// The node-wide middlebox idle timeouts in force (the flags' and IPVS's; conntrack's are per
/// namespace), read at each scrape, so dashboards and alerts show what a connection was
/// measured against, and when IPVS's changed.
#[derive(Debug)]
pub(crate) struct IdleThresholdsCollector(pub NodeThresholds);

impl prometheus_client::collector::Collector for IdleThresholdsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let thresholds = self.0.get();
        let mut family = encoder.encode_descriptor(
            "keepalive_agent_idle_timeout_threshold_seconds",
            "Node-wide middlebox idle timeouts in force: each --idle-timeout-threshold, and ipvs (IPVS's TCP established timeout read from the kernel, or its default 900 when unreadable) while the node balances TCP services with IPVS; each namespace's conntrack timeout is not here",
            None,
            MetricType::Gauge,
        )?;
        for t in thresholds.iter() {
            ConstGauge::new(t.seconds)
                .encode(family.encode_family(&[("threshold", t.name.as_str())])?)?;
        }
        Ok(())
    }
}

/// Aggregates the pipeline updates.
#[derive(Debug, Clone)]
pub(crate) struct PipelineMetrics {
    pub probes: Family<AggregateLabels, Counter>,
    pub drops: Family<AggregateLabels, Counter>,
    /// `tcp_idle_kills_total`: counted from records (the kernel sends every candidate). A
    /// series appears with a namespace's first idle kill of its threshold: created at 0 for
    /// every threshold it would be 8 more series per namespace with the default thresholds,
    /// and the `KeepaliveIdleKill` alert works on the per-connection series instead.
    pub idle_kills: Family<AggregateLabels, Counter>,
    /// The `--idle-timeout-threshold` names, to remove a namespace's idle-kill series.
    idle_threshold_names: Arc<[String]>,
    pub events: Family<KindLabels, Counter>,
    /// Handles into `events` for every record kind, so counting a record neither hashes nor
    /// locks the family.
    event_kinds: [(&'static str, Counter); EVENT_KINDS.len()],
    pub decode_errors: Counter,
    /// Events handed to the `--events` stream: each is written or dropped.
    pub events_produced: Counter,
    /// Events written to the `--events` output as whole lines.
    pub events_written: Counter,
    /// Events the `--events` stream could not take (channel full, or write failed).
    pub events_dropped: Counter,
    /// Owner lookups the attribution worker's full queue could not take.
    pub attribution_requests_dropped: Counter,
    /// Process lookups that read nothing: `/proc/PID/fd` reads had spent their share of a core.
    pub process_lookups_deferred: Counter,
    pub detection: Family<DropLabels, Histogram, fn() -> Histogram>,
    /// Namespaces whose series were removed, by cause.
    pub namespaces_forgotten: Family<ForgetLabels, Counter>,
    /// Namespaces that have series.
    pub namespaces: Gauge,
    /// Renewals of the kernel's marks of tracked connections (`pipeline::MarksRenewal`).
    pub marks_renewals: Counter,
    /// The table's live connections the last renewal marked.
    pub marks_connections: Gauge,
    /// Slots of the kernel's marks holding a live mark after the last renewal.
    pub marks_slots_held: Gauge,
    /// Aggregate label sets already created at 0 (one per namespace by default; one per
    /// namespace and workload with `--aggregate-by`).
    seen: Arc<Mutex<HashSet<AggregateLabels>>>,
    /// Set when the probe and drop counters come from the kernel's per-namespace maps: records
    /// then count nothing into `probes`/`drops`, which are not exported.
    kernel_counters: Option<Arc<NetnsCounterMaps>>,
    /// Whether records count into `probes`/`drops` (not when the kernel counts them).
    count_records: bool,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        let events: Family<KindLabels, Counter> = Family::default();
        let event_kinds = EVENT_KINDS.map(|kind| {
            let counter = events.get_or_create(&KindLabels { kind }).clone();
            (kind, counter)
        });
        Self {
            probes: Family::default(),
            drops: Family::default(),
            idle_kills: Family::default(),
            idle_threshold_names: Arc::new([]),
            events,
            event_kinds,
            decode_errors: Counter::default(),
            events_produced: Counter::default(),
            events_written: Counter::default(),
            events_dropped: Counter::default(),
            attribution_requests_dropped: Counter::default(),
            process_lookups_deferred: Counter::default(),
            detection: Family::new_with_constructor(|| {
                Histogram::new(DETECTION_BUCKETS.iter().copied())
            }),
            namespaces_forgotten: Family::default(),
            namespaces: Gauge::default(),
            marks_renewals: Counter::default(),
            marks_connections: Gauge::default(),
            marks_slots_held: Gauge::default(),
            seen: Arc::default(),
            kernel_counters: None,
            count_records: true,
        }
    }
}

/// `kind` values of `keepalive_agent_events_total` (`Event::kind_name`).
const EVENT_KINDS: [&str; 3] = ["keepalive_timer", "close", "audit"];

impl PipelineMetrics {
    /// Counts one record of this kind (a `kind_name`).
    pub(crate) fn count_event(&self, kind: &'static str) {
        match self.event_kinds.iter().find(|(k, _)| *k == kind) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                self.events.get_or_create(&KindLabels { kind }).inc();
            }
        }
    }

    /// Takes `tcp_keepalive_probes_total` and `tcp_connection_drops_total` from the kernel's
    /// per-namespace counters instead of counting records: exact whatever the ring buffer
    /// loses. Only for the default `--aggregate-by` (netns): the kernel cannot split by workload
    /// or port without a lookup per event.
    pub(crate) fn counted_in_kernel(mut self, maps: Arc<NetnsCounterMaps>) -> Self {
        self.kernel_counters = Some(maps);
        self.count_records = false;
        self
    }

    /// Whether the pipeline builds aggregate label sets and counts records into them.
    pub(crate) fn counts_records(&self) -> bool {
        self.count_records
    }

    /// As with [`Self::counted_in_kernel`], without the maps: for the pipeline benchmark, which
    /// runs without a kernel.
    pub(crate) fn not_counting_records(mut self) -> Self {
        self.count_records = false;
        self
    }

    /// The kernel's per-namespace counters, when the aggregates come from them.
    pub(crate) fn kernel_counters(&self) -> Option<&Arc<NetnsCounterMaps>> {
        self.kernel_counters.as_ref()
    }

    /// Idle kills are counted under these threshold names (`--idle-timeout-threshold`). Before
    /// any clone: every copy must know them to remove a namespace's series.
    pub(crate) fn with_idle_thresholds(mut self, names: Vec<String>) -> Self {
        self.idle_threshold_names = names.into();
        self
    }

    /// Creates every aggregate series of a label set (a namespace, or a namespace and workload)
    /// at 0 the first time it shows up, so `increase()` and alerts work from the first scrape.
    pub(crate) fn see(&self, labels: &AggregateLabels) {
        if !self.count_records {
            return;
        }
        let mut seen = self.seen.lock().expect("metrics lock poisoned");
        if seen.contains(labels) {
            return;
        }
        seen.insert(labels.clone());
        let _ = self.probes.get_or_create(labels);
        for reason in DropReason::ALL {
            let _ = self.drops.get_or_create(&with_reason(labels, reason));
        }
    }

    fn forget_idle_kills(&self, labels: &AggregateLabels) {
        for threshold in self.idle_threshold_names.iter() {
            for how in IdleKillHow::ALL {
                self.idle_kills
                    .remove(&with_idle_kill(labels, threshold, how));
            }
        }
    }

    /// One idle kill (see [`crate::track::idle_kill`]) under its threshold's name.
    pub(crate) fn count_idle_kill(
        &self,
        labels: &AggregateLabels,
        threshold: &str,
        how: IdleKillHow,
    ) {
        self.idle_kills
            .get_or_create(&with_idle_kill(labels, threshold, how))
            .inc();
    }

    pub(crate) fn count_drop(&self, labels: &AggregateLabels, reason: DropReason) {
        if !self.count_records {
            return;
        }
        self.drops.get_or_create(&with_reason(labels, reason)).inc();
    }

    pub(crate) fn observe_detection(&self, netns: u32, reason: DropReason, seconds: f64) {
        self.detection
            .get_or_create(&DropLabels {
                netns,
                reason: reason.as_str(),
            })
            .observe(seconds);
    }

    pub(crate) fn count_probe(&self, labels: &AggregateLabels) {
        if !self.count_records {
            return;
        }
        self.probes.get_or_create(labels).inc();
    }

    /// A keepalive probe was sent in `netns`. A keepalive drop follows probes: the namespace's
    /// detection histograms exist at 0 from its first probe, or `increase()` over them would
    /// miss the first drop. Only namespaces that probe get them (their buckets are most of a
    /// namespace's series).
    pub(crate) fn probe_sent(&self, netns: u32) {
        for reason in DropReason::KEEPALIVE {
            let _ = self.detection.get_or_create(&DropLabels {
                netns,
                reason: reason.as_str(),
            });
        }
    }

    /// Removes every aggregate series of these namespaces (every label set created under their
    /// `netns`, every reason, the detection histogram) and forgets they were seen, so the next
    /// record of a namespace with one of these inodes creates them again at 0: a counter reset,
    /// which `rate()`/`increase()` handle. `cause` is counted once per namespace.
    pub(crate) fn forget_namespaces(&self, inodes: &HashSet<u32>, cause: &'static str) {
        if inodes.is_empty() {
            return;
        }
        let values: HashSet<String> = inodes.iter().map(u32::to_string).collect();
        let mut seen = self.seen.lock().expect("metrics lock poisoned");
        seen.retain(|labels| {
            let gone = labels
                .iter()
                .any(|(name, value)| *name == "netns" && values.contains(value));
            if gone {
                self.probes.remove(labels);
                for reason in DropReason::ALL {
                    self.drops.remove(&with_reason(labels, reason));
                }
                self.forget_idle_kills(labels);
            }
            !gone
        });
        for &netns in inodes {
            // Where the kernel counts the aggregates, idle kills are counted under the
            // namespace alone, which `seen` does not list.
            self.forget_idle_kills(&vec![("netns", netns.to_string())]);
            for reason in DropReason::ALL {
                self.detection.remove(&DropLabels {
                    netns,
                    reason: reason.as_str(),
                });
            }
        }
        self.namespaces_forgotten
            .get_or_create(&ForgetLabels { cause })
            .inc_by(inodes.len() as u64);
    }
}

fn with_reason(labels: &AggregateLabels, reason: DropReason) -> AggregateLabels {
    let mut labels = labels.clone();
    labels.push(("reason", reason.as_str().to_owned()));
    labels
}

fn with_idle_kill(labels: &AggregateLabels, threshold: &str, how: IdleKillHow) -> AggregateLabels {
    let mut labels = labels.clone();
    labels.push(("threshold", threshold.to_owned()));
    labels.push(("died_by", how.as_str().to_owned()));
    labels
}

const PROBES_NAME: &str = "tcp_keepalive_probes";
const PROBES_HELP: &str = "TCP keepalive probes the kernel sent (tcp_write_wakeup from tcp_keepalive_timer), per network namespace";
const EXPIRIES_NAME: &str = "tcp_keepalive_timer_expiries";
const EXPIRIES_HELP: &str = "Runs of tcp_keepalive_timer the kernel programs saw, probing or not (the same timer ends FIN_WAIT2 of orphans), per network namespace";
const DROPS_NAME: &str = "tcp_connection_drops";
const DROPS_HELP: &str = "TCP connections the kernel ended abnormally, by reason";

/// `tcp_keepalive_probes_total` and `tcp_connection_drops_total` read from the kernel's
/// per-namespace counters at scrape time, every reason of a namespace present from its first
/// event.
struct KernelNamespaceCounters(Arc<NetnsCounterMaps>);

impl fmt::Debug for KernelNamespaceCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KernelNamespaceCounters")
    }
}

impl prometheus_client::collector::Collector for KernelNamespaceCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (entries, totals) = match self.0.totals() {
            Ok(totals) => totals,
            Err(err) => {
                log::warn!("cannot read the kernel's per-namespace counters: {err}");
                return Ok(());
            }
        };
        let mut probes =
            encoder.encode_descriptor(PROBES_NAME, PROBES_HELP, None, MetricType::Counter)?;
        for (netns, counters) in &totals {
            ConstCounter::new(counters.probes)
                .encode(probes.encode_family(&NetnsLabels { netns: *netns })?)?;
        }
        let mut expiries =
            encoder.encode_descriptor(EXPIRIES_NAME, EXPIRIES_HELP, None, MetricType::Counter)?;
        for (netns, counters) in &totals {
            ConstCounter::new(counters.expiries)
                .encode(expiries.encode_family(&NetnsLabels { netns: *netns })?)?;
        }
        let mut drops =
            encoder.encode_descriptor(DROPS_NAME, DROPS_HELP, None, MetricType::Counter)?;
        for (netns, counters) in &totals {
            for reason in DropReason::ALL {
                ConstCounter::new(counters.drops[reason as usize]).encode(drops.encode_family(
                    &DropLabels {
                        netns: *netns,
                        reason: reason.as_str(),
                    },
                )?)?;
            }
        }
        ConstGauge::new(entries as i64).encode(encoder.encode_descriptor(
            "keepalive_agent_netns_map_entries",
            "Entries in the kernel's per-namespace counter map (one per live namespace, briefly two when an inode is reused)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.0.placed() as i64).encode(encoder.encode_descriptor(
            "keepalive_agent_netns_counters_placed",
            "Namespaces whose kernel counters the programs find at a fixed slot, without the hash lookup (the rest of the map's entries are counted there, as exactly)",
            None,
            MetricType::Gauge,
        )?)?;
        match self.0.full() {
            Ok(full) => ConstCounter::new(full).encode(encoder.encode_descriptor(
                "keepalive_agent_netns_map_full",
                "Kernel events of a namespace not counted because the per-namespace counter map was full (more namespaces than it holds)",
                None,
                MetricType::Counter,
            )?)?,
            Err(err) => log::warn!("cannot read the counter-map overflow count: {err}"),
        }
        match self.0.uncounted() {
            Ok(uncounted) => {
                let mut family = encoder.encode_descriptor(
                    "keepalive_agent_kernel_uncounted",
                    "Keepalive expiries and closes the kernel programs saw but could not add to tcp_keepalive_probes_total or tcp_connection_drops_total, by cause: those totals are short of the kernel's TcpExt by these",
                    None,
                    MetricType::Counter,
                )?;
                for (why, count) in uncounted {
                    ConstCounter::new(count).encode(
                        family.encode_family(&[("event", why.event()), ("cause", why.cause())])?,
                    )?;
                }
            }
            Err(err) => log::warn!("cannot read the kernel's uncounted events: {err}"),
        }
        Ok(())
    }
}

/// Builds the registry: the pipeline's aggregates, per-connection series, and self-metrics.
pub(crate) fn registry(
    pipeline: &PipelineMetrics,
    table: Arc<Mutex<ConnectionTable>>,
    max_connection_series: usize,
    reserve_failures: ReserveFailures,
    hooks: &Family<HookLabels, Gauge>,
) -> Registry {
    let mut registry = Registry::default();
    match &pipeline.kernel_counters {
        Some(maps) => {
            registry.register_collector(Box::new(KernelNamespaceCounters(Arc::clone(maps))))
        }
        None => {
            registry.register(PROBES_NAME, PROBES_HELP, pipeline.probes.clone());
            registry.register(DROPS_NAME, DROPS_HELP, pipeline.drops.clone());
        }
    }
    registry.register(
        "tcp_idle_kills",
        "Connections that died on their first send after a silence at least as long as a middlebox idle timeout (threshold, from --idle-timeout-threshold), with keepalive off or its idle not below that timeout; died_by: reset, or timeout (never answered)",
        pipeline.idle_kills.clone(),
    );
    registry.register(
        "tcp_keepalive_dead_peer_detection_seconds",
        "Time from the last segment received to a keepalive_timeout or keepalive_reset drop: how long a dead peer went unnoticed",
        pipeline.detection.clone(),
    );
    registry.register(
        "keepalive_agent_events",
        "Records received from the kernel programs, by kind",
        pipeline.events.clone(),
    );
    registry.register(
        "keepalive_agent_decode_errors",
        "Ring buffer records the agent could not decode",
        pipeline.decode_errors.clone(),
    );
    registry.register(
        "keepalive_agent_event_stream_produced",
        "Events handed to the --events stream; each is written or counted in keepalive_agent_events_dropped_total",
        pipeline.events_produced.clone(),
    );
    registry.register(
        "keepalive_agent_event_stream_written",
        "Events written to the --events output, as whole lines",
        pipeline.events_written.clone(),
    );
    registry.register(
        "keepalive_agent_events_dropped",
        "Events not written to the --events stream: its channel was full or the write failed",
        pipeline.events_dropped.clone(),
    );
    registry.register(
        "keepalive_agent_namespaces",
        "Network namespaces that have series (seen within --netns.retention)",
        pipeline.namespaces.clone(),
    );
    registry.register(
        "keepalive_agent_namespaces_forgotten",
        "Network namespaces whose series were removed: inode_reused (a new namespace got the inode) or retention (not seen for --netns.retention)",
        pipeline.namespaces_forgotten.clone(),
    );
    registry.register(
        "keepalive_agent_tracked_marks_renewals",
        "Renewals of the kernel's marks of the connections the agent tracks (every --connections.marks-interval): the kernel sends the close of a keepalive connection only while its mark holds",
        pipeline.marks_renewals.clone(),
    );
    registry.register(
        "keepalive_agent_tracked_marks_connections",
        "Connections the last renewal of the kernel's marks marked: those the connection table held",
        pipeline.marks_connections.clone(),
    );
    registry.register(
        "keepalive_agent_tracked_marks_slots_held",
        format!(
            "Slots of the kernel's {} marks of tracked connections that held a mark after the last renewal; a close of a keepalive connection the agent does not track shares a held slot, and is sent to the agent, in this share of cases",
            keepalive_ebpf::TRACKED_SLOTS
        ),
        pipeline.marks_slots_held.clone(),
    );
    registry.register(
        "keepalive_agent_attribution_requests_dropped",
        "Owner lookups the attribution queue refused because it was full (slow /proc or cgroup tree, or thousands of connections entering at once): those records were handled without their owner; a connection that entered is asked again every second while the queue is full (up to 16384 waiting), else at its next keepalive expiry",
        pipeline.attribution_requests_dropped.clone(),
    );
    registry.register(
        "keepalive_agent_process_lookups_deferred",
        "Socket owner lookups that read no /proc/PID/fd because those reads had used their share of a core (5 % on average, bursts up to 100 ms): the process stays unknown until the next unanswered probe or keepalive drop of the connection looks again",
        pipeline.process_lookups_deferred.clone(),
    );
    registry.register(
        "keepalive_agent_hook_attached",
        "1 when the kernel hook is attached, 0 when it could not be; program: the variant that attached",
        hooks.clone(),
    );
    registry.register(
        "keepalive_agent_build",
        "Build information",
        // The record size makes a mismatch between agent and kernel-program builds visible.
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("revision", env!("KEEPALIVE_GIT_REVISION").to_owned()),
            (
                "ebpf_record_bytes",
                keepalive_ebpf::SocketRecord::SIZE.to_string(),
            ),
        ]),
    );
    registry.register_collector(Box::new(ConnectionSeries {
        table,
        max_series: max_connection_series,
    }));
    registry.register_collector(Box::new(reserve_failures));
    registry
}

/// Per-connection series and the connection table's own gauges, rendered at scrape time.
#[derive(Debug)]
struct ConnectionSeries {
    table: Arc<Mutex<ConnectionTable>>,
    max_series: usize,
}

impl prometheus_client::collector::Collector for ConnectionSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut table = self.table.lock().map_err(|_| fmt::Error)?;
        table.expire(std::time::Instant::now());
        let reportable = table.reportable();
        let shown = &reportable[..reportable.len().min(self.max_series)];
        let labels: Vec<Vec<(&'static str, String)>> = shown
            .iter()
            .map(|state| {
                let e = &state.endpoints;
                let mut labels = vec![
                    ("netns", e.netns.to_string()),
                    ("local_addr", e.local.ip().to_string()),
                    ("local_port", e.local.port().to_string()),
                    ("remote_addr", e.remote.ip().to_string()),
                    ("remote_port", e.remote.port().to_string()),
                ];
                // Always present, empty when unknown (Prometheus reads "" as absent).
                labels.extend(connection_labels(&state.workload));
                if let Some(reason) = state.dropped {
                    labels.push(("reason", reason.as_str().to_owned()));
                }
                labels
            })
            .collect();

        let mut probes = encoder.encode_descriptor(
            "tcp_keepalive_connection_probes",
            "Keepalive probes sent on this connection; `reason` is set once it was dropped; cgroup, pod_uid, container_id, pid and comm name its owner (empty when unknown)",
            None,
            MetricType::Counter,
        )?;
        for (state, labels) in shown.iter().zip(&labels) {
            ConstCounter::new(state.probes_sent).encode(probes.encode_family(labels)?)?;
        }
        let mut unanswered = encoder.encode_descriptor(
            "tcp_keepalive_connection_unanswered_probes",
            "Keepalive probes still unanswered when the keepalive timer last ran on this connection",
            None,
            MetricType::Gauge,
        )?;
        for (state, labels) in shown.iter().zip(&labels) {
            ConstGauge::new(i64::from(state.unanswered_probes))
                .encode(unanswered.encode_family(labels)?)?;
        }
        encode_idle_kills(&mut encoder, shown, &labels)?;

        let gauges = [
            (
                "keepalive_agent_tracked_connections",
                "Connections in the agent's table: live ones that probed, and recently dropped ones",
                (table.live_len() + table.dropped_len()) as i64,
            ),
            (
                "keepalive_agent_connection_series_hidden",
                "Per-connection series not exported because of --connections.max-series",
                (reportable.len() - shown.len()) as i64,
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        ConstCounter::new(table.evictions()).encode(encoder.encode_descriptor(
            "keepalive_agent_connection_table_evictions",
            "Connections pushed out of the agent's table by --connections.max-tracked",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(table.vanished()).encode(encoder.encode_descriptor(
            "keepalive_agent_connections_vanished",
            "Live connections removed from the agent's table because two audit walks in a row did not find their socket: their close never reached the agent (its record lost to a full ring buffer, see keepalive_agent_ringbuf_reserve_failures_total, or a close the kernel ran no program for)",
            None,
            MetricType::Counter,
        )?)?;
        let mut evicted = encoder.encode_descriptor(
            "keepalive_agent_dropped_connections_evicted",
            "Dropped connections whose series went before --connections.dropped-retention because --connections.max-dropped was reached; keepalive drops only ever push out older keepalive drops",
            None,
            MetricType::Counter,
        )?;
        for class in DropClass::ALL {
            ConstCounter::new(table.dropped_evictions(class)).encode(evicted.encode_family(
                &ClassLabels {
                    class: class.as_str(),
                },
            )?)?;
        }
        Ok(())
    }
}

/// One per-connection idle-kill gauge: name, help, and the figure it shows.
type IdleKillFigure = (&'static str, &'static str, fn(&IdleKill) -> f64);

/// The idle-killed connections among `shown`: what each died of and the setting that would have
/// saved it, one gauge per figure, labelled like the connection's other series plus the
/// threshold, how it died and whether keepalive was on.
fn encode_idle_kills(
    encoder: &mut DescriptorEncoder,
    shown: &[&ConnectionState],
    labels: &[Vec<(&'static str, String)>],
) -> Result<(), fmt::Error> {
    let kills: Vec<(&IdleKill, Vec<(&'static str, String)>)> = shown
        .iter()
        .zip(labels)
        .filter_map(|(state, labels)| {
            let kill = state.idle_kill.as_deref()?;
            let mut labels = labels.clone();
            labels.push(("threshold", kill.threshold.name.clone()));
            labels.push(("died_by", kill.how.as_str().to_owned()));
            let keepalive = if kill.keepalive_idle_seconds.is_some() {
                "on"
            } else {
                "off"
            };
            labels.push(("keepalive", keepalive.to_owned()));
            Some((kill, labels))
        })
        .collect();
    let figures: [IdleKillFigure; 4] = [
        (
            "tcp_connection_idle_kill_silence_seconds",
            "Idle-killed connection: seconds from the last segment received to the send that died",
            |k| k.silence_seconds,
        ),
        (
            "tcp_connection_idle_kill_threshold_seconds",
            "Idle-killed connection: the middlebox idle timeout that explains it (the largest --idle-timeout-threshold at or below the silence)",
            |k| k.threshold.seconds,
        ),
        (
            "tcp_connection_idle_kill_keepalive_idle_seconds",
            "Idle-killed connection: its effective keepalive idle (0 with keepalive off)",
            |k| k.keepalive_idle_seconds.unwrap_or(0.0),
        ),
        (
            "tcp_connection_idle_kill_suggested_keepalive_idle_seconds",
            "Idle-killed connection: a TCP_KEEPIDLE (with SO_KEEPALIVE on) below the threshold, so probes keep the middlebox's entry alive",
            |k| k.suggested_keepalive_idle_seconds,
        ),
    ];
    for (name, help, figure) in figures {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (kill, labels) in &kills {
            ConstGauge::new(figure(kill)).encode(family.encode_family(labels)?)?;
        }
    }
    Ok(())
}

/// Ring-buffer reserves that failed in the kernel (events lost), summed over CPUs at scrape.
#[derive(Clone)]
pub(crate) struct ReserveFailures(pub Arc<Mutex<PerCpuArray<MapData, u64>>>);

impl ReserveFailures {
    /// Records the kernel could not reserve in the ring buffer, summed over CPUs.
    fn total(&self) -> Result<u64, String> {
        let map = self
            .0
            .lock()
            .map_err(|_| "the ring buffer failure counters' lock is poisoned".to_owned())?;
        map.get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .map_err(|err| format!("cannot read the ring buffer failure counters: {err}"))
    }

    /// Logs, at most once per `every`, how many records the kernel lost since the last line:
    /// the counter alone would leave an operator reading the logs unaware.
    pub(crate) async fn log_losses(self, every: std::time::Duration) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = 0;
        loop {
            ticker.tick().await;
            match self.total() {
                Ok(total) if total > reported => {
                    log::warn!(
                        "{} kernel records lost in the last {} ({total} since start): the ring \
                         buffer was full, so per-connection series and events miss them (the \
                         namespace totals are counted in the kernel); raise --ring-buffer.bytes",
                        total - reported,
                        humantime::format_duration(every)
                    );
                    reported = total;
                }
                Ok(_) => {}
                Err(err) => log::warn!("{err}"),
            }
        }
    }
}

impl fmt::Debug for ReserveFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReserveFailures")
    }
}

impl prometheus_client::collector::Collector for ReserveFailures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let total = match self.total() {
            Ok(total) => total,
            Err(err) => {
                log::warn!("{err}");
                return Ok(());
            }
        };
        ConstCounter::new(total).encode(encoder.encode_descriptor(
            "keepalive_agent_ringbuf_reserve_failures",
            "Kernel events lost because the ring buffer was full (raise --ring-buffer.bytes)",
            None,
            MetricType::Counter,
        )?)
    }
}

/// The counter sweep's metrics by the names a scrape shows them under; the integration tests
/// and the kernel matrix's guest program read them by these.
pub mod sweep_metric {
    pub const ROUNDS: &str = "keepalive_agent_probe_sweeps_total";
    pub const ADDED: &str = "keepalive_agent_probe_sweep_added_total";
    pub const BUSY: &str = "keepalive_agent_probe_sweep_busy_total";
    pub const FAILURES: &str = "keepalive_agent_probe_sweep_failures_total";
}

/// `keepalive_agent_probe_sweep*_total`: what the counter sweep did (see
/// `kernel::counter_sweep`), registered when it runs.
pub(crate) struct CounterSweepMetrics(pub(crate) Arc<crate::kernel::counter_sweep::SweepTotals>);

impl fmt::Debug for CounterSweepMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CounterSweepMetrics")
    }
}

impl prometheus_client::collector::Collector for CounterSweepMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let totals = &self.0;
        for (name, help, total) in [
            (
                sweep_metric::ROUNDS,
                "Rounds of the counter sweep that ran on every CPU they could reach (a CPU busy in a timer program's update waits for the next round), adding the probes of keepalive expiries the kernel ran no program for, when no later expiry in their namespace on that CPU had",
                &totals.sweeps,
            ),
            (
                sweep_metric::ADDED,
                "Probes the counter sweeps added to tcp_keepalive_probes_total (already in it)",
                &totals.probes,
            ),
            (
                sweep_metric::BUSY,
                "Runs of the counter sweep that read nothing and left their CPU to the next sweep: they came in the middle of a timer program's update of the counter's memory, or the kernel ran them in the sweeping thread (moved to that CPU since it pinned itself)",
                &totals.busy,
            ),
            (
                sweep_metric::FAILURES,
                "Counter sweeps that failed (logged); the probes they would add wait for a later expiry in their namespace on the same CPU",
                &totals.failures,
            ),
        ] {
            // The encoder appends the counter's suffix to the name it is given.
            let name = name.strip_suffix("_total").unwrap_or(name);
            ConstCounter::new(total.load(std::sync::atomic::Ordering::Relaxed))
                .encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        Ok(())
    }
}

/// `keepalive_agent_program_recursion_misses_total`: per hook, the hits the kernel did not run
/// the agent's program for because it was already running on that CPU (read at scrape).
pub(crate) struct RecursionMisses(pub Vec<(&'static str, aya::programs::ProgramFd)>);

impl fmt::Debug for RecursionMisses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecursionMisses")
    }
}

impl prometheus_client::collector::Collector for RecursionMisses {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "keepalive_agent_program_recursion_misses",
            "Hook hits the kernel did not run the agent's program for, because it was already running on that CPU (bpf_prog_info.recursion_misses; absent before 5.12): events no counter saw",
            None,
            MetricType::Counter,
        )?;
        for (hook, fd) in &self.0 {
            match crate::kernel::programs::recursion_misses(fd) {
                Ok(Some(misses)) => {
                    ConstCounter::new(misses).encode(family.encode_family(&[("hook", *hook)])?)?
                }
                Ok(None) => {}
                Err(err) => log::warn!("cannot read the kernel's run counts of {hook}: {err}"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::Ordering};

    use prometheus_client::registry::Registry;

    use super::{CounterSweepMetrics, sweep_metric};
    use crate::kernel::counter_sweep::SweepTotals;

    #[test]
    fn sweep_metrics_are_scraped_under_the_names_readers_use() {
        let totals = Arc::new(SweepTotals::default());
        totals.sweeps.store(7, Ordering::Relaxed);
        totals.probes.store(3, Ordering::Relaxed);
        totals.busy.store(2, Ordering::Relaxed);
        totals.failures.store(1, Ordering::Relaxed);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(CounterSweepMetrics(totals)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for (name, value) in [
            (sweep_metric::ROUNDS, 7),
            (sweep_metric::ADDED, 3),
            (sweep_metric::BUSY, 2),
            (sweep_metric::FAILURES, 1),
        ] {
            assert!(
                text.lines().any(|line| line == format!("{name} {value}")),
                "no `{name} {value}` in:\n{text}"
            );
        }
    }
}
