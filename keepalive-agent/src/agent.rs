//! `keepalive-agent run`: resolve the kernel, load and attach, then drain events and serve.

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::info;
use prometheus_client::metrics::{family::Family, gauge::Gauge};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    classifier::ResetReasons,
    connection_table::ConnectionTable,
    http::{self, HttpState},
    hz,
    kallsyms::TimerFunctions,
    kernel_layout::KernelLayout,
    metrics::{self, HookLabels, PipelineMetrics, ReserveFailures},
    pipeline::Pipeline,
    programs::{self, PROGRAM_TYPE},
    ring_reader,
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
    #[arg(long = "ring-buffer.bytes", default_value_t = 4 << 20, value_parser = parse_ring_size)]
    pub ring_buffer_bytes: u32,
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let bytes: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if !bytes.is_power_of_two() || bytes < 4096 {
        return Err(format!(
            "{bytes} is not a power of two of at least 4096 (e.g. 4194304)"
        ));
    }
    Ok(bytes)
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    if !config.telemetry_path.starts_with('/') {
        bail!(
            "--web.telemetry-path must start with '/', got {:?}",
            config.telemetry_path
        );
    }
    let layout = KernelLayout::from_vmlinux()
        .context("reading kernel struct layout from /sys/kernel/btf/vmlinux")?;
    info!(
        "kernel layout: keepalive timer in {:?}, sock+{} (write timer at +{})",
        layout.timer_layout, layout.offsets.keepalive_timer, layout.offsets.write_timer
    );
    let timers = TimerFunctions::from_proc().context("finding the TCP timer callbacks")?;
    let hz = tokio::task::spawn_blocking(hz::kernel_hz)
        .await
        .context("measuring the kernel tick rate")?
        .context("measuring the kernel tick rate (CONFIG_HZ)")?;
    info!("kernel tick rate: {hz} Hz");

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

    let kernel = programs::load(&layout, &timers, config.ring_buffer_bytes)
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
        ebpf: _ebpf,
        events,
        reserve_failures,
        ..
    } = kernel;

    let table = Arc::new(Mutex::new(ConnectionTable::new(
        config.max_tracked,
        config.max_dropped,
        config.dropped_retention,
    )));
    let pipeline_metrics = PipelineMetrics::default();
    let registry = metrics::registry(
        &pipeline_metrics,
        Arc::clone(&table),
        config.max_series,
        ReserveFailures(Mutex::new(reserve_failures)),
        &hooks,
    );
    let state = Arc::new(HttpState {
        registry,
        ready: false.into(),
    });
    let server = axum::serve(
        listener,
        http::router(Arc::clone(&state), &config.telemetry_path),
    );
    let pipeline = Pipeline {
        table,
        metrics: pipeline_metrics,
        reset_reasons: ResetReasons {
            keepalive_timeout: layout.rst_reason_keepalive_timeout,
        },
        hz,
    };
    let drain = tokio::spawn(ring_reader::drain(events, pipeline));
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
