//! `keepalive-agent run`: resolve the kernel, load and attach, then drain events and serve.

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::{info, warn};
use prometheus_client::metrics::{family::Family, gauge::Gauge};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribution::{self, Attributor, Workload},
    audit,
    export::{
        events::{self, EventWriter, EventsTarget},
        http::{self, HttpState},
        labels::AggregateBy,
        metrics::{self, HookLabels, PipelineMetrics, ReserveFailures},
    },
    kernel::{
        self, Session, hz,
        programs::{self, PROGRAM_TYPE},
    },
    pipeline::Pipeline,
    record::{decoder::AuditedSocket, netns_counters::NetnsCounterMaps},
    track::connection_table::ConnectionTable,
};

pub const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0:9879";

#[derive(Debug, Clone, clap::Args)]
pub struct RunConfig {
    /// Address to serve /metrics, /healthz and /readyz on.
    #[arg(long = "web.listen-address", default_value = DEFAULT_LISTEN_ADDRESS)]
    pub listen_address: SocketAddr,
    /// Path of the metrics endpoint.
    #[arg(long = "web.telemetry-path", default_value = "/metrics")]
    pub telemetry_path: String,
    /// Most live connections kept in memory (least recently probed ones are evicted first).
    #[arg(long = "connections.max-tracked", default_value_t = NonZeroUsize::new(65_536).expect("non-zero"))]
    pub max_tracked: NonZeroUsize,
    /// Most dropped connections kept for --connections.dropped-retention.
    #[arg(long = "connections.max-dropped", default_value_t = 10_000)]
    pub max_dropped: usize,
    /// How long a dropped connection's series stays visible, so an alert can name it.
    #[arg(long = "connections.dropped-retention", default_value = "15m", value_parser = humantime::parse_duration)]
    pub dropped_retention: Duration,
    /// Most per-connection series exported per metric; what the cap hides is counted in
    /// keepalive_agent_connection_series_hidden.
    #[arg(long = "connections.max-series", default_value_t = 2_000)]
    pub max_series: usize,
    /// Kernel→agent ring buffer size in bytes: a power of two, at least one page.
    #[arg(long = "ring-buffer.bytes", default_value_t = 4 << 20, value_parser = programs::parse_ring_buffer_bytes)]
    pub ring_buffer_bytes: u32,
    /// Labels of tcp_keepalive_probes_total and tcp_connection_drops_total, comma-separated,
    /// from: netns, pod_uid, container_id, cgroup, remote_port, local_port. `netns` is always
    /// included, so totals can be checked against each namespace's own kernel counters. Every
    /// label added multiplies the series count: pod_uid or container_id give one series per
    /// workload; remote_port and local_port can give one per connection on a busy node.
    #[arg(long = "aggregate-by", value_name = "LIST", default_value = "netns")]
    pub aggregate_by: AggregateBy,
    /// Where cgroup v2 is mounted, to turn socket cgroup ids into paths, pod UIDs and container
    /// ids. Default: the cgroup2 mount listed in /proc/self/mounts (/sys/fs/cgroup, or
    /// /sys/fs/cgroup/unified on hybrid hosts). In a pod, mount the host's cgroup tree.
    #[arg(long = "cgroup.root", value_name = "PATH")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// The proc filesystem to find socket owners in (/proc/PID/fd). Run with the host's PID
    /// namespace, or mount the host's /proc and point this at it.
    #[arg(long = "proc.root", value_name = "PATH", default_value = "/proc")]
    pub proc_root: std::path::PathBuf,
    /// Also write one JSON object per line for every keepalive probe-streak outcome and every
    /// dropped connection to FILE (appended; reopened on SIGHUP, so logrotate can move it), or
    /// to standard output with `-`. The fields are described in README.md.
    #[arg(long = "events", value_name = "FILE|-")]
    pub events: Option<EventsTarget>,
    /// File the kernel tick rate (CONFIG_HZ) is measured from. Container runtimes mask
    /// /proc/timer_list; in a pod, mount the host's /proc and point this at its timer_list.
    #[arg(long = "kernel.timer-list", value_name = "PATH", default_value = hz::DEFAULT_TIMER_LIST)]
    pub timer_list: std::path::PathBuf,
    /// How long the series of a network namespace stay after it was last seen (a record from
    /// it, or an audit walk that found one of its sockets); then they are removed with its
    /// per-connection series. A namespace whose inode is reused by a new one is reset at once.
    #[arg(long = "netns.retention", value_name = "DURATION", default_value = "15m", value_parser = parse_retention)]
    pub netns_retention: Duration,
    #[command(flatten)]
    pub audit: audit::task::AuditConfig,
}

fn parse_retention(s: &str) -> Result<Duration, String> {
    let retention =
        humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 15m, 1h)"))?;
    if retention.is_zero() {
        return Err("must be longer than 0 (e.g. 15m)".to_owned());
    }
    Ok(retention)
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    if !config.telemetry_path.starts_with('/') {
        bail!(
            "--web.telemetry-path must start with '/', got {:?}",
            config.telemetry_path
        );
    }
    let timer_list = config.timer_list.clone();
    let session = tokio::task::spawn_blocking(move || Session::open(&timer_list))
        .await
        .context("reading the running kernel")?
        .context("reading the running kernel")?;
    info!(
        "kernel layout: keepalive timer in {:?}, sock+{} (write timer at +{})",
        session.layout.timer_layout,
        session.layout.offsets.keepalive_timer,
        session.layout.offsets.write_timer
    );
    info!("kernel tick rate: {} Hz", session.hz);

    // Bind first: a taken port should fail before anything is attached to the kernel.
    let listener = tokio::net::TcpListener::bind(config.listen_address)
        .await
        .with_context(|| {
            format!(
                "binding {} (is another agent running? choose another --web.listen-address)",
                config.listen_address
            )
        })?;
    info!(
        "serving {} on http://{}",
        config.telemetry_path,
        listener.local_addr()?
    );

    let kernel = session
        .load(config.ring_buffer_bytes)
        .context("loading the kernel programs")?;
    let hooks: Family<HookLabels, Gauge> = Family::default();
    for status in &kernel.hooks {
        hooks
            .get_or_create(&HookLabels {
                hook: status.hook.tracepoint,
                program_type: PROGRAM_TYPE,
            })
            .set(i64::from(status.attached));
    }
    let ready = kernel.all_required_attached();
    let programs::KernelPrograms {
        ebpf,
        events,
        reserve_failures,
        audit,
        netns_counters,
        ..
    } = kernel;

    let table = Arc::new(Mutex::new(ConnectionTable::new(
        config.max_tracked,
        config.max_dropped,
        config.dropped_retention,
    )));
    let mut pipeline_metrics = PipelineMetrics::default();
    if config.aggregate_by == AggregateBy::default() {
        pipeline_metrics = pipeline_metrics.counted_in_kernel(Arc::new(NetnsCounterMaps::new(
            netns_counters.counters,
            netns_counters.full,
        )));
    } else {
        info!(
            "--aggregate-by {}: probe and drop totals are counted from ring-buffer records \
             (the kernel's exact counters are per namespace only); lost records are missing \
             from them (keepalive_agent_ringbuf_reserve_failures_total)",
            config.aggregate_by
        );
    }
    let event_sender = match config.events.clone() {
        Some(target) => {
            // Installed before ready: SIGHUP's default action would kill the agent.
            let hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
            let writer = EventWriter::open(target, pipeline_metrics.events_dropped.clone())
                .await
                .context("opening the --events output")?;
            let (sender, receiver) = events::channel(
                events::CHANNEL_CAPACITY,
                pipeline_metrics.events_dropped.clone(),
                false,
            );
            tokio::spawn(writer.run(receiver, hangup));
            Some(sender)
        }
        None => None,
    };
    let mut registry = metrics::registry(
        &pipeline_metrics,
        Arc::clone(&table),
        config.max_series,
        ReserveFailures(Mutex::new(reserve_failures)),
        &hooks,
    );
    let cgroup_root = config
        .cgroup_root
        .clone()
        .or_else(attribution::system_cgroup2_mount);
    match &cgroup_root {
        Some(root) => info!(
            "attributing sockets to cgroups under {} and processes under {}; aggregates by {}",
            root.display(),
            config.proc_root.display(),
            config.aggregate_by
        ),
        None => warn!(
            "no cgroup v2 mount found (set --cgroup.root): connections will carry cgroup ids but no cgroup path, pod_uid or container_id"
        ),
    }
    // One attributor (one set of caches) for the pipeline and the audit, which counts sockets
    // under the same label sets as the probe and drop counters.
    let attributor = Arc::new(Attributor::new(cgroup_root, config.proc_root.clone()));
    let audit_group = {
        let aggregate_by = config.aggregate_by.clone();
        let attributor = Arc::clone(&attributor);
        Arc::new(move |socket: &AuditedSocket| {
            let workload = if aggregate_by.needs_workload() {
                attributor.attribute_cgroup(&socket.owner)
            } else {
                Workload::default()
            };
            aggregate_by.labels(&socket.endpoints, &workload)
        })
    };
    let mut pipeline = Pipeline::new(&session, table, pipeline_metrics, attributor)
        .aggregated_by(config.aggregate_by.clone());
    // `_ebpf` keeps the programs (and so the hooks) loaded until `run` returns.
    let (audit_collector, _ebpf) = audit::task::start(
        ebpf,
        audit,
        config.proc_root.clone(),
        session.hz,
        &config.audit,
        audit_group,
        pipeline.namespaces(),
    );
    registry.register_collector(Box::new(audit_collector));
    let state = Arc::new(HttpState {
        registry,
        ready: false.into(),
    });
    let server = axum::serve(
        listener,
        http::router(Arc::clone(&state), &config.telemetry_path),
    );
    if let Some(sender) = event_sender {
        pipeline = pipeline.with_events(sender);
    }
    // The programs are loaded: the loader's BTF is not needed any more.
    drop(session);
    kernel::release_freed_memory();
    info!(
        "series of a network namespace not seen for {} are removed",
        humantime::format_duration(config.netns_retention)
    );
    tokio::spawn(pipeline.namespace_retention(config.netns_retention).run());
    let drain = tokio::spawn(pipeline.run(events));
    state.ready.store(ready, Ordering::Relaxed);
    info!("ready: following TCP keepalive in every network namespace");

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        result = server => result.context("HTTP server failed")?,
        result = drain => result.context("ring buffer reader panicked")?.context("reading the ring buffer")?,
        _ = tokio::signal::ctrl_c() => info!("interrupted, detaching"),
        _ = sigterm.recv() => info!("terminated, detaching"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_retention_is_a_positive_duration() {
        assert_eq!(parse_retention("15m"), Ok(Duration::from_secs(900)));
        assert!(parse_retention("0s").unwrap_err().contains("longer than 0"));
        assert!(parse_retention("soon").unwrap_err().contains("\"soon\""));
    }
}
