//! `keepalive-agent run`: resolve the kernel, load and attach, then drain events and serve.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    num::NonZeroUsize,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use log::{info, warn};
use prometheus_client::metrics::{family::Family, gauge::Gauge};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    attribution::{self, Attributor, Workload},
    audit,
    cmd::flags,
    export::{
        events::{self, EventWriter, EventsTarget},
        http::{self, HttpState},
        labels::AggregateBy,
        metrics::{
            self, CounterSweepMetrics, HookLabels, PipelineMetrics, RecursionMisses,
            ReserveFailures,
        },
        web_config::WebConfig,
    },
    kernel::{
        self, Session,
        counter_sweep::UNSWEPT,
        hz,
        programs::{self, CloseReports, PROGRAM_TYPE, SweepProgram},
    },
    pipeline::{Drained, Pipeline},
    record::{decoder::AuditedSocket, netns_counters::NetnsCounterMaps},
    track::{
        connection_table::ConnectionTable,
        idle_kill::{self, NodeThresholds},
    },
};

pub const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0:9879";

#[derive(Debug, Clone, clap::Args)]
pub struct RunConfig {
    /// Address to serve /metrics, /healthz and /readyz on (IP:PORT, port not 0). The default
    /// listens on every interface: see README.md for what the port reveals.
    #[arg(long = "web.listen-address", default_value = DEFAULT_LISTEN_ADDRESS, value_parser = flags::parse_listen_address)]
    pub listen_address: SocketAddr,
    /// exporter-toolkit's web configuration file (YAML): `tls_server_config` (cert_file,
    /// key_file, optional client_ca_file with client_auth_type) and `basic_auth_users` (bcrypt
    /// hashes). Read at start; without it the port is plain HTTP with no authentication.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<std::path::PathBuf>,
    /// Path of the metrics endpoint: letters, digits and - _ . ~ /, not /healthz or /readyz.
    #[arg(long = "web.telemetry-path", default_value = "/metrics", value_parser = flags::parse_telemetry_path)]
    pub telemetry_path: String,
    /// Most live connections kept in memory (least recently probed ones are evicted first);
    /// 1 to 1048576, reserved at start.
    #[arg(long = "connections.max-tracked", default_value = "65536", value_parser = flags::parse_max_tracked)]
    pub max_tracked: NonZeroUsize,
    /// Most dropped connections kept for --connections.dropped-retention; 0 to 1000000.
    #[arg(long = "connections.max-dropped", default_value = "10000", value_parser = flags::parse_max_dropped)]
    pub max_dropped: usize,
    /// How long a dropped connection's series stays visible, so an alert can name it; 1s to
    /// 30 days.
    #[arg(long = "connections.dropped-retention", value_name = "DURATION", default_value = "15m", value_parser = flags::parse_retention)]
    pub dropped_retention: Duration,
    /// Most per-connection series exported per metric; what the cap hides is counted in
    /// keepalive_agent_connection_series_hidden; 0 to 100000.
    #[arg(long = "connections.max-series", default_value = "2000", value_parser = flags::parse_max_series)]
    pub max_series: usize,
    /// Also export per-connection series for connections without SO_KEEPALIVE that ended in a
    /// drop (a RST received, a retransmission or connect timeout, an abort), and for such drops
    /// of keepalive connections that never probed. Off, their drops count in
    /// tcp_connection_drops_total only, and their closes never leave the kernel (unless the
    /// drop may be an idle kill), which keeps the agent idle under connection churn. Always on
    /// with --events or an --aggregate-by label beyond netns, which need every close.
    #[arg(long = "connections.keepalive-off-drops")]
    pub keepalive_off_drops: bool,
    /// How often the kernel is told again which keepalive connections the agent tracks, so
    /// that it sends their closes and keeps every other one's (counted) to itself. A connection
    /// the agent stopped tracking (evicted, or its close or records lost) has its close sent
    /// for at most three of these. 1s to 1h.
    #[arg(long = "connections.marks-interval", value_name = "DURATION", default_value = "1m", value_parser = flags::parse_marks_interval)]
    pub marks_interval: Duration,
    /// Kernel→agent ring buffer size in bytes (or KiB/MiB): a power of two from 4KiB to
    /// 256MiB, a multiple of the page size.
    #[arg(long = "ring-buffer.bytes", value_name = "BYTES", default_value = "4194304", value_parser = flags::parse_ring_buffer_bytes)]
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
    /// 1s to 30 days.
    #[arg(long = "netns.retention", value_name = "DURATION", default_value = "15m", value_parser = flags::parse_retention)]
    pub netns_retention: Duration,
    /// How often every CPU's counter memory is swept: the probes of keepalive expiries the
    /// kernel ran no program for, after the last one it did in a namespace on a CPU, are added
    /// to that namespace's total within this (each sweep costs one interrupt per CPU; isolated
    /// CPUs are left alone). 10ms to 1m, or off.
    #[arg(long = "netns.counter-sweep-interval", value_name = "DURATION", default_value = "1s", value_parser = flags::parse_counter_sweep_interval)]
    pub counter_sweep_interval: flags::SweepInterval,
    #[command(flatten)]
    pub audit: audit::task::AuditConfig,
}

impl RunConfig {
    /// Which closes the kernel sends: see `--connections.keepalive-off-drops`.
    pub(crate) fn close_reports(&self) -> CloseReports {
        if self.keepalive_off_drops
            || self.events.is_some()
            || self.aggregate_by != AggregateBy::default()
        {
            CloseReports::All
        } else {
            CloseReports::KeepaliveOn
        }
    }

    /// What clap cannot check value by value: paths on the filesystem, and the flags of other
    /// modules whose bounds are the agent's (not the parser's) business.
    pub fn validate(&self) -> anyhow::Result<()> {
        let fail = |reason: String| anyhow::anyhow!("invalid flag: {reason}");
        flags::check_duration(
            self.audit.interval,
            flags::MIN_AUDIT_INTERVAL,
            flags::MAX_AUDIT_INTERVAL,
        )
        .map_err(|e| fail(format!("--audit.interval: {e}")))?;
        let thresholds = &self.audit.idle_timeout_thresholds;
        if thresholds.len() > flags::MAX_IDLE_THRESHOLDS {
            return Err(fail(format!(
                "--idle-timeout-threshold: {} given, at most {}",
                thresholds.len(),
                flags::MAX_IDLE_THRESHOLDS
            )));
        }
        if let Some(t) = thresholds.iter().find(|t| {
            t.name.len() > flags::MAX_THRESHOLD_NAME || t.seconds > flags::MAX_THRESHOLD_SECONDS
        }) {
            return Err(fail(format!(
                "--idle-timeout-threshold {t}: names up to {} characters, seconds up to {} (10 years)",
                flags::MAX_THRESHOLD_NAME,
                flags::MAX_THRESHOLD_SECONDS
            )));
        }
        flags::check_unique_names(
            "--idle-timeout-threshold",
            thresholds.iter().map(|t| t.name.as_str()),
        )
        .map_err(fail)?;
        flags::check_directory(
            "--proc.root",
            &self.proc_root,
            flags::PROC_SUPER_MAGIC,
            "procfs",
        )
        .map_err(fail)?;
        if let Some(root) = &self.cgroup_root {
            flags::check_directory("--cgroup.root", root, flags::CGROUP2_SUPER_MAGIC, "cgroup2")
                .map_err(fail)?;
        }
        flags::check_readable_file("--kernel.timer-list", &self.timer_list).map_err(fail)?;
        if let Some(EventsTarget::File(path)) = &self.events {
            events::check_target(path).map_err(fail)?;
        }
        Ok(())
    }
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let ablated = keepalive_ebpf::ablation::ABLATED;
    if !ablated.is_empty() {
        warn!(
            "this agent was built for `cargo xtask ablate` without {ablated} in its kernel \
             programs: its figures are wrong; build it again without KEEPALIVE_EBPF_ABLATE"
        );
    }
    config.validate()?;
    // Before the kernel is touched: a file that does not load stops the agent at once.
    let web = match &config.web_config_file {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::default(),
    };
    // Installed first: SIGHUP's default action would kill the agent, and a logrotate
    // `postrotate` shared with other services may send it at any time.
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
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
        .map_err(|e| {
            anyhow::anyhow!(
                "binding {}: {e} ({})",
                config.listen_address,
                http::bind_hint(&e)
            )
        })?;
    info!(
        "serving {} on {}://{}{}",
        config.telemetry_path,
        if web.tls.is_some() { "https" } else { "http" },
        listener.local_addr()?,
        if web.basic_auth.is_some() {
            " (basic auth)"
        } else {
            ""
        }
    );

    let closes = config.close_reports();
    if closes == CloseReports::KeepaliveOn {
        info!(
            "closes of connections without SO_KEEPALIVE, or that never probed, are counted in \
             the kernel only (tcp_connection_drops_total); \
             --connections.keepalive-off-drops exports their per-connection drop series too"
        );
    }
    // Not loaded when turned off (`--netns.counter-sweep-interval off`): no interrupts at all.
    let sweep = match config.counter_sweep_interval.0 {
        Some(_) => SweepProgram::Load,
        None => {
            warn!("counter sweep off (--netns.counter-sweep-interval off): {UNSWEPT}");
            SweepProgram::Skip
        }
    };
    let mut kernel = session
        .load(config.ring_buffer_bytes, closes, sweep)
        .context("loading the kernel programs")?;
    let hooks: Family<HookLabels, Gauge> = Family::default();
    for status in &kernel.hooks {
        hooks
            .get_or_create(&HookLabels {
                hook: status.hook.tracepoint,
                program_type: PROGRAM_TYPE,
                program: status.program_name,
            })
            .set(i64::from(status.attached));
    }
    let ready = kernel.all_required_attached();
    let recursion_misses = RecursionMisses(
        kernel
            .hooks
            .iter_mut()
            .filter_map(|status| Some((status.hook.tracepoint, status.program.take()?)))
            .collect(),
    );
    // `ebpf` keeps the programs (and so the hooks) attached until the shutdown detaches them.
    let programs::KernelPrograms {
        ebpf,
        events,
        reserve_failures,
        audit,
        ipvs,
        counter_sweep,
        idle_kill_filter,
        netns_counters,
        tracked,
        ..
    } = kernel;
    // The node's thresholds: the flags' and what the node uses (IPVS), read now and again
    // every audit interval.
    let node_thresholds = NodeThresholds::default();
    let mut refresh = audit::task::ThresholdRefresh {
        given: config.audit.idle_timeout_thresholds.clone(),
        proc_root: config.proc_root.clone(),
        hz: session.hz,
        ipvs,
        filter: idle_kill_filter,
        shared: node_thresholds.clone(),
    };
    let refresh = tokio::task::spawn_blocking(move || {
        refresh.refresh();
        refresh
    })
    .await
    .context("reading the node's idle-timeout thresholds")?;
    refresh.keep_current(config.audit.interval);

    let table = Arc::new(Mutex::new(ConnectionTable::new(
        config.max_tracked,
        config.max_dropped,
        config.dropped_retention,
    )));
    let mut pipeline_metrics = PipelineMetrics::default().with_idle_thresholds(
        config
            .audit
            .idle_timeout_thresholds
            .iter()
            .map(|t| t.name.as_str())
            // The node's own, whenever they come.
            .chain([idle_kill::CONNTRACK, idle_kill::IPVS])
            .map(str::to_owned)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    );
    if config.aggregate_by == AggregateBy::default() {
        let maps = Arc::new(NetnsCounterMaps::new(
            netns_counters.counters,
            netns_counters.slots,
            netns_counters.inserts,
            netns_counters.full,
            netns_counters.uncounted,
        ));
        tokio::spawn(Arc::clone(&maps).place_forever());
        pipeline_metrics = pipeline_metrics.counted_in_kernel(maps);
    } else {
        info!(
            "--aggregate-by {}: probe and drop totals are counted from ring-buffer records \
             (the kernel's exact counters are per namespace only); lost records are missing \
             from them (keepalive_agent_ringbuf_reserve_failures_total)",
            config.aggregate_by
        );
    }
    let (stop, stopping) = watch::channel(false);
    let (writer_stop, writer_stopping) = watch::channel(false);
    let events_written = pipeline_metrics.events_written.clone();
    let events_dropped = pipeline_metrics.events_dropped.clone();
    let (event_sender, event_writer) = match config.events.clone() {
        Some(target) => {
            let writer = EventWriter::open(
                target,
                pipeline_metrics.events_dropped.clone(),
                pipeline_metrics.events_written.clone(),
            )
            .context("opening the --events output")?;
            let (sender, receiver) = events::channel(
                events::CHANNEL_CAPACITY,
                pipeline_metrics.events_produced.clone(),
                pipeline_metrics.events_dropped.clone(),
                false,
            );
            // Not the server's stop: the writer ends when the pipeline, draining the ring
            // buffer after the stop, drops the last sender; `writer_stop` only cuts it short
            // at the shutdown deadline.
            let writer = tokio::spawn(writer.run(receiver, hangup, writer_stopping));
            (Some(sender), Some(writer))
        }
        None => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    info!("SIGHUP: no --events file to reopen; ignored");
                }
            });
            (None, None)
        }
    };
    let reserve_failures = ReserveFailures(Arc::new(Mutex::new(reserve_failures)));
    tokio::spawn(
        reserve_failures
            .clone()
            .log_losses(std::time::Duration::from_secs(10)),
    );
    let mut registry = metrics::registry(
        &pipeline_metrics,
        Arc::clone(&table),
        config.max_series,
        reserve_failures,
        &hooks,
    );
    registry.register_collector(Box::new(metrics::IdleThresholdsCollector(
        node_thresholds.clone(),
    )));
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
    let attributor = Arc::new(
        Attributor::new(cgroup_root, config.proc_root.clone())
            .with_process_read_budget(pipeline_metrics.process_lookups_deferred.clone()),
    );
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
        .aggregated_by(config.aggregate_by.clone())
        .with_idle_thresholds(node_thresholds.clone());
    let audit_collector = audit::task::start(
        audit,
        session.hz,
        &config.audit,
        node_thresholds,
        audit_group,
        pipeline.namespaces(),
        pipeline.tracker(),
    );
    registry.register_collector(Box::new(audit_collector));
    registry.register_collector(Box::new(recursion_misses));
    let counter_sweep = counter_sweep.zip(config.counter_sweep_interval.0);
    if let Some((sweep, _)) = &counter_sweep {
        registry.register_collector(Box::new(CounterSweepMetrics(sweep.totals())));
    }
    let server_metrics = http::ServerMetrics::default();
    server_metrics.register(&mut registry);
    crate::logging::register_metrics(&mut registry);
    let state = Arc::new(HttpState {
        registry,
        ready: false.into(),
    });
    let mut server = tokio::spawn(http::serve(
        listener,
        http::router(Arc::clone(&state), &config.telemetry_path),
        web,
        server_metrics,
        stopping.clone(),
    ));
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
    tokio::spawn(pipeline.marks_renewal(tracked, config.marks_interval).run());
    let mut sweep_thread = None;
    if let Some((sweep, interval)) = counter_sweep {
        // Its own thread: it moves itself from CPU to CPU, which a runtime thread must not.
        sweep_thread = Some(
            sweep
                .spawn(interval)
                .context("cannot start the counter sweep's thread")?,
        );
        info!(
            "probes of keepalive expiries the kernel ran no program for are counted within {} \
             (counter sweep on every CPU that is not isolated)",
            humantime::format_duration(interval)
        );
    }
    let mut drain =
        tokio::spawn(pipeline.run(events, stopping, move || drop(ebpf), SHUTDOWN_DRAIN_BUDGET));
    state.ready.store(ready, Ordering::Relaxed);
    info!("ready: following TCP keepalive in every network namespace");

    let mut drain_done = false;
    let outcome = tokio::select! {
        result = &mut server => Err(match result {
            Ok(()) => anyhow::anyhow!("the HTTP server stopped"),
            Err(err) => anyhow::Error::new(err).context("the HTTP server failed"),
        }),
        result = &mut drain => {
            drain_done = true;
            match result {
                Ok(Ok(_)) => Err(anyhow::anyhow!("the ring buffer reader stopped")),
                Ok(Err(err)) => Err(anyhow::Error::new(err).context("reading the ring buffer")),
                Err(err) => Err(anyhow::Error::new(err).context("the ring buffer reader failed")),
            }
        },
        _ = interrupt.recv() => { info!("SIGINT: shutting down"); Ok(()) }
        _ = sigterm.recv() => { info!("SIGTERM: shutting down"); Ok(()) }
    };
    let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
    // Graceful: not ready, stop accepting (scrapes in flight finish), stop reading the ring
    // buffer, detach the programs, put what the ring still holds through the pipeline, and close
    // the event stream after its last event; all before the DaemonSet's grace period ends.
    state.ready.store(false, Ordering::Relaxed);
    // First, so that no thread runs a program of the object the drain drops below (a round
    // finishes within milliseconds).
    if let Some(sweep) = sweep_thread {
        // Its join blocks: off the runtime's threads, which the HTTP server still uses.
        if tokio::task::spawn_blocking(move || sweep.stop())
            .await
            .is_err()
        {
            warn!("shutdown: stopping the counter sweep's thread panicked");
        }
    }
    let _ = stop.send(true);
    if !drain_done {
        match tokio::time::timeout_at(deadline, &mut drain).await {
            Ok(Ok(Ok(drained))) => log_drained(drained),
            Ok(Ok(Err(err))) => warn!("shutdown: reading the ring buffer failed: {err}"),
            Ok(Err(err)) => warn!("shutdown: the ring buffer reader failed: {err}"),
            Err(_) => {
                drain.abort();
                warn!("shutdown: the ring buffer reader did not stop in time");
            }
        }
    }
    if let Some(mut writer) = event_writer {
        let cut_at = deadline - WRITER_FINAL_WRITE;
        if tokio::time::timeout_at(cut_at, &mut writer).await.is_err() {
            // Someone still holds a sender (an owner lookup stuck on /proc): write what the
            // channel holds and stop.
            let _ = writer_stop.send(true);
            if tokio::time::timeout_at(deadline, &mut writer)
                .await
                .is_err()
            {
                writer.abort();
                warn!(
                    "shutdown: the event stream writer did not finish in time; its last events are lost"
                );
            }
        }
        info!(
            "shutdown: event stream closed ({} lines written, {} dropped since start)",
            events_written.get(),
            events_dropped.get()
        );
    }
    if tokio::time::timeout_at(deadline, &mut server)
        .await
        .is_err()
    {
        warn!("shutdown: the HTTP server did not stop in time");
    }
    info!("stopped");
    outcome
}

/// From SIGTERM to `run` returning. The DaemonSet's `terminationGracePeriodSeconds` is 10
/// (deploy/kubernetes/daemonset.yaml): this leaves a second for the runtime to stop
/// (`main.rs`) and one for the kubelet, so the agent is never SIGKILLed mid-write.
pub(crate) const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(8);

/// The part of [`SHUTDOWN_DEADLINE`] the ring buffer's last records and the owner lookups
/// they queued get; the rest is the event stream's, to write what they produced.
const SHUTDOWN_DRAIN_BUDGET: Duration = Duration::from_secs(6);

/// The event writer's last stretch: if the channel has not closed by then, it writes what it
/// holds and stops.
const WRITER_FINAL_WRITE: Duration = Duration::from_secs(1);

fn log_drained(drained: Drained) {
    let Drained {
        remaining,
        worker_finished,
    } = drained;
    if remaining.cut_short {
        warn!(
            "shutdown: programs detached; the {SHUTDOWN_DRAIN_BUDGET:?} deadline cut the ring \
             buffer drain short after {} records: the rest are in neither the event stream nor \
             the per-connection series (the namespace totals, counted in the kernel, are exact)",
            remaining.records
        );
    } else {
        info!(
            "shutdown: programs detached; {} records left in the ring buffer went through the \
             pipeline",
            remaining.records
        );
    }
    if !worker_finished {
        warn!(
            "shutdown: owner lookups were still running at the deadline (a slow /proc or cgroup \
             tree); events waiting for their owner are lost"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<RunConfig, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunConfig,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .map(|cli| cli.run)
    }

    #[test]
    fn defaults_pass_validation() {
        config(&[]).unwrap().validate().unwrap();
    }

    #[test]
    fn audit_interval_and_thresholds_are_bounded_and_unique() {
        let err = config(&["--audit.interval", "1ns"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--audit.interval"), "{err}");
        let err = config(&[
            "--idle-timeout-threshold",
            "a=1",
            "--idle-timeout-threshold",
            "a=2",
        ])
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
    }

    #[test]
    fn paths_are_checked_before_start() {
        let err = config(&["--cgroup.root", "/proc"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("not a cgroup2 mount"), "{err}");
        let err = config(&["--kernel.timer-list", "/nonexistent/timer_list"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
