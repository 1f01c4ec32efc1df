//! `keepalive-agent watch`: the event stream as a live, human-readable table, like `tcpstates`.
//! It runs the same pipeline as `run` (same classifier, same connection table) with its own
//! kernel programs, and prints every probe, every streak outcome and every drop as it happens.

use std::{
    io::{IsTerminal as _, Write as _},
    net::IpAddr,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray};
use log::info;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribution::{Attributor, system_cgroup2_mount},
    cmd::flags,
    export::{
        events::{self, ConnectionEvent, EventKind},
        metrics::PipelineMetrics,
    },
    kernel::{Session, hz, programs},
    pipeline::Pipeline,
    track::{classifier::DropReason, connection_table::ConnectionTable},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when standard output is a terminal.
    Auto,
    /// Always colour (e.g. piping into `less -R`).
    Always,
    /// Never colour.
    Never,
}

#[derive(Debug, Clone, clap::Args)]
pub struct WatchConfig {
    /// Only connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Only connections with this local or remote address (repeatable).
    #[arg(long = "addr", value_name = "IP")]
    pub addrs: Vec<IpAddr>,
    /// Only this network namespace, by inode number (`ls -L -i /proc/PID/ns/net`; repeatable).
    #[arg(long = "netns", value_name = "INODE")]
    pub netns: Vec<u32>,
    /// Only connections of this Kubernetes pod, by UID (`kubectl get pod NAME -o
    /// jsonpath='{.metadata.uid}'`; repeatable).
    #[arg(long = "pod", value_name = "UID")]
    pub pods: Vec<String>,
    /// Colour the event column: auto = only when standard output is a terminal.
    #[arg(long = "color", value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Kernel→agent ring buffer size in bytes (or KiB/MiB): a power of two from 4KiB to
    /// 256MiB, a multiple of the page size.
    #[arg(long = "ring-buffer.bytes", value_name = "BYTES", default_value = "1048576", value_parser = flags::parse_ring_buffer_bytes)]
    pub ring_buffer_bytes: u32,
}

/// Which events to print; every given filter must match (within one filter, any value).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub addrs: Vec<IpAddr>,
    pub netns: Vec<u32>,
    pub pods: Vec<String>,
}

impl Filter {
    pub fn matches(&self, e: &ConnectionEvent) -> bool {
        let any = |wanted: bool, empty: bool| empty || wanted;
        any(
            self.ports.contains(&e.local_port) || self.ports.contains(&e.remote_port),
            self.ports.is_empty(),
        ) && any(
            self.addrs.contains(&e.local_addr) || self.addrs.contains(&e.remote_addr),
            self.addrs.is_empty(),
        ) && any(self.netns.contains(&e.netns), self.netns.is_empty())
            && any(
                e.workload
                    .workload
                    .pod_uid()
                    .is_some_and(|uid| self.pods.iter().any(|p| p.eq_ignore_ascii_case(uid))),
                self.pods.is_empty(),
            )
    }
}

/// Wide enough for `keepalive_timeout ETIMEDOUT, 3 unanswered, silent 4.1s`.
const EVENT_WIDTH: usize = 56;

/// Column header, aligned with [`format_line`]; printed once the hooks are attached, so a
/// script reading the output knows events from then on are seen.
pub fn header() -> String {
    format!(
        "{:<12}  {:<10}  {:<22}   {:<22}  {:<EVENT_WIDTH$} WORKLOAD",
        "TIME(UTC)", "NETNS", "LOCAL", "REMOTE", "EVENT"
    )
}

/// One line of `watch` output. `None` for streak ends that the drop line right after says
/// already (`timed_out` → `keepalive_timeout`, `reset` → `keepalive_reset`).
pub fn format_line(e: &ConnectionEvent, color: bool) -> Option<String> {
    let (text, paint) = match e.event {
        EventKind::ProbeSent => (
            format!("probe sent {}/{}", e.probes_sent, e.keepalive.count),
            "33",
        ),
        EventKind::Answered => (
            format!(
                "streak answered ({} probe{})",
                e.probes_sent,
                if e.probes_sent == 1 { "" } else { "s" }
            ),
            "32",
        ),
        EventKind::Reset | EventKind::TimedOut => return None,
        EventKind::Drop => {
            let reason = e.reason.map_or("drop", DropReason::as_str);
            let mut text = reason.to_owned();
            if let Some(error) = &e.error {
                text.push(' ');
                text.push_str(error);
            }
            if matches!(
                e.reason,
                Some(DropReason::KeepaliveTimeout | DropReason::KeepaliveReset)
            ) {
                text.push_str(&format!(
                    ", {} unanswered, silent {:.1}s",
                    e.unanswered_probes,
                    e.idle_before_death_seconds.unwrap_or_default()
                ));
                (text, "1;31")
            } else {
                (text, "31")
            }
        }
    };
    // `2026-11-24T17:10:19.123456Z` → `17:10:19.123`.
    let time = e.timestamp.get(11..23).unwrap_or(&e.timestamp);
    let local = endpoint(e.local_addr, e.local_port);
    let remote = endpoint(e.remote_addr, e.remote_port);
    let event = if color {
        format!("\x1b[{paint}m{text:<EVENT_WIDTH$}\x1b[0m")
    } else {
        format!("{text:<EVENT_WIDTH$}")
    };
    Some(
        format!(
            "{time:<12}  {:<10}  {local:<22} → {remote:<22}  {event} {}",
            e.netns,
            workload(e)
        )
        .trim_end()
        .to_owned(),
    )
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
    }
}

fn workload(e: &ConnectionEvent) -> String {
    let w = &e.workload.workload;
    let mut parts = Vec::new();
    if let Some(uid) = w.pod_uid() {
        parts.push(format!("pod={uid}"));
    }
    match (&w.comm, w.pid) {
        (Some(comm), Some(pid)) => parts.push(format!("{comm}[{pid}]")),
        (Some(comm), None) => parts.push(comm.clone()),
        _ => {}
    }
    if parts.is_empty() {
        match w.cgroup_path() {
            Some(path) => parts.push(format!("cgroup={path}")),
            None if w.cgroup_id != 0 => parts.push(format!("cgroup_id={}", w.cgroup_id)),
            None => {}
        }
    }
    parts.join(" ")
}

pub async fn run(config: WatchConfig) -> anyhow::Result<()> {
    let color = match config.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => std::io::stdout().is_terminal(),
    };
    let filter = Filter {
        ports: config.ports,
        addrs: config.addrs,
        netns: config.netns,
        pods: config.pods,
    };
    let session = tokio::task::spawn_blocking(|| Session::open(Path::new(hz::DEFAULT_TIMER_LIST)))
        .await
        .context("reading the running kernel")?
        .context("reading the running kernel (try `keepalive-agent check`)")?;
    let kernel = session
        // Every drop is a line.
        .load(
            config.ring_buffer_bytes,
            programs::CloseReports::All,
            // Nothing here reads the namespaces' totals the sweep completes.
            programs::SweepProgram::Skip,
        )
        .context("loading the kernel programs (try `keepalive-agent check`)")?;
    anyhow::ensure!(
        kernel.all_required_attached(),
        "a required hook did not attach (run `keepalive-agent check --load`)"
    );
    let programs::KernelPrograms {
        ebpf: _ebpf,
        events: ring,
        reserve_failures,
        ..
    } = kernel;

    let metrics = PipelineMetrics::default();
    let dropped = metrics.events_dropped.clone();
    let (sender, mut receiver) = events::channel(
        events::CHANNEL_CAPACITY,
        metrics.events_produced.clone(),
        dropped.clone(),
        true,
    );
    // Only this command's connections matter; the bounds just keep a busy host in check.
    let table = ConnectionTable::new(
        NonZeroUsize::new(65_536).expect("non-zero"),
        1024,
        Duration::from_secs(60),
    );
    let pipeline = Pipeline::new(
        &session,
        Arc::new(Mutex::new(table)),
        metrics,
        Arc::new(Attributor::new(
            system_cgroup2_mount(),
            PathBuf::from("/proc"),
        )),
    )
    .with_events(sender);
    drop(session);
    // `watch` prints until it is interrupted; what the ring holds then is not wanted, so the
    // reader is never told to stop and the programs detach when `_ebpf` drops.
    let (_never_stop, keep_reading) = tokio::sync::watch::channel(false);
    let mut drain = tokio::spawn(pipeline.run(ring, keep_reading, || (), Duration::ZERO));
    info!("watching TCP keepalive in every network namespace; Ctrl-C to stop");

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", header())?;
    stdout.flush()?;
    let mut reported_lost = 0;
    let mut kernel_lost = KernelLost::new(reserve_failures);
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    loop {
        tokio::select! {
            _ = lost_check.tick() => {
                if let Some(line) = kernel_lost.report() {
                    writeln!(stdout, "{line}")?;
                    stdout.flush()?;
                }
            }
            event = receiver.recv() => {
                let Some(event) = event else { break };
                if filter.matches(&event)
                    && let Some(line) = format_line(&event, color)
                {
                    writeln!(stdout, "{line}")?;
                    stdout.flush()?;
                }
                let lost = dropped.get();
                if lost > reported_lost {
                    writeln!(stdout, "# {} events lost: this terminal reads slower than the kernel reports", lost - reported_lost)?;
                    reported_lost = lost;
                }
            }
            result = &mut drain => {
                result.context("ring buffer reader panicked")?.context("reading the ring buffer")?;
                break;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // What was lost after the last check still gets its line.
    if let Some(line) = kernel_lost.report() {
        writeln!(stdout, "{line}")?;
    }
    Ok(())
}

/// Events the kernel programs could not reserve room for in the ring buffer (it was full),
/// read from their per-CPU counter: `watch` says so as it goes, or a missing line would look
/// like nothing happened.
struct KernelLost {
    failures: PerCpuArray<MapData, u64>,
    reported: u64,
    read_error_reported: bool,
}

impl KernelLost {
    fn new(failures: PerCpuArray<MapData, u64>) -> Self {
        Self {
            failures,
            reported: 0,
            read_error_reported: false,
        }
    }

    /// A line when more events were lost since the last one.
    fn report(&mut self) -> Option<String> {
        let total: u64 = match self.failures.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().sum(),
            Err(err) => {
                return (!std::mem::replace(&mut self.read_error_reported, true))
                    .then(|| format!("# cannot read the kernel's lost-event counter: {err}"));
            }
        };
        let new = total.checked_sub(self.reported).filter(|&n| n > 0)?;
        self.reported = total;
        Some(lost_line(new, total))
    }
}

fn lost_line(new: u64, total: u64) -> String {
    format!(
        "# {new} events lost in the kernel ({total} so far): the ring buffer was full; \
         raise --ring-buffer.bytes"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::Workload;
    use crate::export::events::{KeepaliveSeconds, WorkloadFields};

    fn event(kind: EventKind) -> ConnectionEvent {
        ConnectionEvent {
            timestamp: "2026-11-24T17:10:19.123456Z".to_owned(),
            event: kind,
            netns: 4026532890,
            local_addr: "127.0.0.1".parse().unwrap(),
            local_port: 40000,
            remote_addr: "127.0.0.1".parse().unwrap(),
            remote_port: 8080,
            workload: WorkloadFields {
                workload: Workload {
                    cgroup_id: 9,
                    comm: Some("curl".to_owned()),
                    pid: Some(42),
                    ..Workload::default()
                },
                socket_ino: 0,
            },
            probes_sent: 2,
            unanswered_probes: 1,
            keepalive: KeepaliveSeconds {
                enabled: true,
                idle_seconds: 1.0,
                interval_seconds: 1.0,
                count: 3,
                user_timeout_ms: 0,
            },
            reason: None,
            error: None,
            idle_before_death_seconds: None,
            idle_kill: None,
        }
    }

    #[test]
    fn lost_line_says_how_many_and_what_to_do() {
        let line = lost_line(3, 10);
        assert!(
            line.starts_with("# 3 events lost in the kernel (10 so far)"),
            "{line}"
        );
        assert!(line.contains("--ring-buffer.bytes"), "{line}");
    }

    #[test]
    fn probe_line_shows_time_endpoints_probe_number_and_process() {
        let line = format_line(&event(EventKind::ProbeSent), false).unwrap();
        assert!(
            line.starts_with("17:10:19.123  4026532890  127.0.0.1:40000"),
            "{line}"
        );
        assert!(line.contains("→ 127.0.0.1:8080"), "{line}");
        assert!(line.contains("probe sent 2/3"), "{line}");
        assert!(line.ends_with("curl[42]"), "{line}");
        assert!(!line.contains('\x1b'));
    }

    #[test]
    fn drop_line_names_reason_error_and_silence_in_colour_on_request() {
        let mut e = event(EventKind::Drop);
        e.reason = Some(DropReason::KeepaliveTimeout);
        e.error = Some("ETIMEDOUT".to_owned());
        e.unanswered_probes = 3;
        e.idle_before_death_seconds = Some(4.02);
        let line = format_line(&e, true).unwrap();
        assert!(
            line.contains("\x1b[1;31mkeepalive_timeout ETIMEDOUT, 3 unanswered, silent 4.0s"),
            "{line}"
        );
        assert_eq!(format_line(&event(EventKind::TimedOut), false), None);
    }

    #[test]
    fn filters_combine_and_each_accepts_any_of_its_values() {
        let e = event(EventKind::ProbeSent);
        assert!(Filter::default().matches(&e));
        let by_port = Filter {
            ports: vec![1, 8080],
            ..Filter::default()
        };
        assert!(by_port.matches(&e));
        let wrong_netns = Filter {
            ports: vec![8080],
            netns: vec![1],
            ..Filter::default()
        };
        assert!(!wrong_netns.matches(&e));
        let by_pod = Filter {
            pods: vec!["abc".to_owned()],
            ..Filter::default()
        };
        assert!(
            !by_pod.matches(&e),
            "no pod known: a pod filter excludes it"
        );
    }
}
