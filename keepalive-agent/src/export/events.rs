//! The event stream: one JSON object per line for every keepalive probe-streak outcome and every
//! dropped connection (`run --events FILE|-`); `watch` reads the same events, plus one per probe.
//!
//! The pipeline never waits for the writer: it `try_send`s into a bounded channel and counts
//! what does not fit (`keepalive_agent_events_dropped_total`). The writer task owns the output
//! and reopens it on SIGHUP, so logrotate can move the file away and signal the agent.

use std::{
    net::IpAddr,
    path::PathBuf,
    str::FromStr,
    time::{Duration, SystemTime},
};

use log::{info, warn};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    signal::unix::Signal,
    sync::mpsc,
};

use crate::{
    attribution::Workload,
    kernel::hz,
    record::decoder::{CloseEvent, Endpoints, KeepaliveExpiry, KeepaliveSettings, SocketOwner},
    track::classifier::DropReason,
};

/// Events buffered between the pipeline and the writer before new ones are counted as dropped.
pub(crate) const CHANNEL_CAPACITY: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub(crate) enum EventsError {
    #[error("cannot open the events file {path} for appending: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What happened to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// `tcp_write_wakeup` sent a keepalive probe (only `watch` asks for these).
    ProbeSent,
    /// A streak of probes ended with the peer's ACK: `icsk_probes_out` back at 0 at the next
    /// expiry.
    Answered,
    /// The streak ended with a reset from the peer (`keepalive_reset`).
    Reset,
    /// The streak ended with the kernel giving up (`keepalive_timeout`).
    TimedOut,
    /// The kernel ended the connection abnormally (any drop reason).
    Drop,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProbeSent => "probe_sent",
            Self::Answered => "answered",
            Self::Reset => "reset",
            Self::TimedOut => "timed_out",
            Self::Drop => "drop",
        }
    }
}

/// Who owns the connection ([`Workload`] from attribution, plus the socket inode), flattened
/// into one JSON object; fields attribution could not resolve are `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct WorkloadFields {
    #[serde(flatten)]
    pub workload: Workload,
    /// Inode of the socket's file (`socket:[INO]` in /proc/PID/fd); 0 for orphans.
    pub socket_ino: u64,
}

impl WorkloadFields {
    /// What attribution found, plus the socket inode it started from.
    pub fn new(workload: &Workload, socket_ino: u64) -> Self {
        Self {
            workload: workload.clone(),
            socket_ino,
        }
    }
}

impl From<SocketOwner> for WorkloadFields {
    fn from(owner: SocketOwner) -> Self {
        Self {
            workload: Workload {
                cgroup_id: owner.cgroup_id,
                ..Workload::default()
            },
            socket_ino: owner.socket_ino,
        }
    }
}

/// Effective keepalive settings, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KeepaliveSeconds {
    pub enabled: bool,
    pub idle_seconds: f64,
    pub interval_seconds: f64,
    pub count: u8,
    /// `TCP_USER_TIMEOUT`; 0 = unset.
    pub user_timeout_ms: u32,
}

impl KeepaliveSeconds {
    pub fn new(settings: &KeepaliveSettings, hz: u32) -> Self {
        Self {
            enabled: settings.enabled,
            idle_seconds: hz::jiffies_to_seconds(u64::from(settings.idle_jiffies), hz),
            interval_seconds: hz::jiffies_to_seconds(u64::from(settings.interval_jiffies), hz),
            count: settings.probes,
            user_timeout_ms: settings.user_timeout_ms,
        }
    }
}

/// One line of the event stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectionEvent {
    /// When the kernel saw it (wall clock, RFC 3339, UTC).
    pub timestamp: String,
    pub event: EventKind,
    /// Network namespace inode (`ls -L -i /proc/PID/ns/net`).
    pub netns: u32,
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    pub workload: WorkloadFields,
    /// `probe_sent`: this probe's number in its streak; `answered`/`reset`/`timed_out`: probes
    /// in the streak; `drop`: probes the agent saw on the connection since it started.
    pub probes_sent: u64,
    /// Probes without an answer (`icsk_probes_out`) when the event happened.
    pub unanswered_probes: u8,
    pub keepalive: KeepaliveSeconds,
    /// Drop reason (`drop`, `reset`, `timed_out`).
    #[serde(serialize_with = "serialize_reason")]
    pub reason: Option<DropReason>,
    /// The socket error the application sees (`ETIMEDOUT`, `ECONNRESET`, ...), from `sk_err`.
    pub error: Option<String>,
    /// Seconds from the last segment received to the kernel's close (`drop`, `reset`,
    /// `timed_out`).
    pub idle_before_death_seconds: Option<f64>,
}

/// `DropReason` is defined with the kernel programs (no serde there): its name.
fn serialize_reason<S: serde::Serializer>(
    reason: &Option<DropReason>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    reason.map(DropReason::as_str).serialize(serializer)
}

impl ConnectionEvent {
    /// A `probe_sent` or `answered` event from a keepalive timer expiry.
    pub fn from_expiry(
        event: EventKind,
        expiry: &KeepaliveExpiry,
        probes: u8,
        unanswered_probes: u8,
        hz: u32,
    ) -> Self {
        Self::new(
            event,
            expiry.ktime_ns,
            &expiry.endpoints,
            expiry.owner,
            u64::from(probes),
            unanswered_probes,
            KeepaliveSeconds::new(&expiry.settings, hz),
        )
    }

    /// A `drop`, `reset` or `timed_out` event from the close record.
    pub fn from_close(
        event: EventKind,
        close: &CloseEvent,
        reason: DropReason,
        probes_sent: u64,
        unanswered_probes: u8,
        hz: u32,
    ) -> Self {
        Self {
            reason: Some(reason),
            error: (close.sk_err != 0).then(|| errno_name(close.sk_err)),
            idle_before_death_seconds: Some(close.silent_seconds(hz)),
            ..Self::new(
                event,
                close.ktime_ns,
                &close.endpoints,
                close.owner,
                probes_sent,
                unanswered_probes,
                KeepaliveSeconds::new(&close.settings, hz),
            )
        }
    }

    /// The fields every event has; reason, error and silence are a close's.
    fn new(
        event: EventKind,
        ktime_ns: u64,
        e: &Endpoints,
        owner: SocketOwner,
        probes_sent: u64,
        unanswered_probes: u8,
        keepalive: KeepaliveSeconds,
    ) -> Self {
        Self {
            timestamp: rfc3339_from_ktime(ktime_ns),
            event,
            netns: e.netns,
            local_addr: e.local.ip(),
            local_port: e.local.port(),
            remote_addr: e.remote.ip(),
            remote_port: e.remote.port(),
            workload: owner.into(),
            probes_sent,
            unanswered_probes,
            keepalive,
            reason: None,
            error: None,
            idle_before_death_seconds: None,
        }
    }
}

/// Names of the errors TCP reports in `sk_err`; anything else prints as `errno N`.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EPIPE => "EPIPE",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::ENETDOWN => "ENETDOWN",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOBUFS => "ENOBUFS",
        _ => return format!("errno {errno}"),
    };
    name.to_owned()
}

/// The wall-clock time of a kernel `bpf_ktime_get_ns` stamp (CLOCK_MONOTONIC), so the line
/// says when the kernel acted, not when the agent got round to it.
pub(crate) fn rfc3339_from_ktime(ktime_ns: u64) -> String {
    let now = SystemTime::now();
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a live timespec; CLOCK_MONOTONIC always exists.
    let monotonic_ns = if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) } == 0 {
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    } else {
        ktime_ns
    };
    let age = Duration::from_nanos(monotonic_ns.saturating_sub(ktime_ns));
    // A record without a stamp would be decades old; fall back to now.
    let at = if ktime_ns == 0 { now } else { now - age };
    humantime::format_rfc3339_micros(at).to_string()
}

/// Where `--events` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsTarget {
    Stdout,
    /// Appended to; reopened on SIGHUP.
    File(PathBuf),
}

impl FromStr for EventsTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("give a file path, or - for standard output".to_owned()),
            "-" => Ok(Self::Stdout),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// The pipeline's end of the channel: never waits.
#[derive(Debug, Clone)]
pub(crate) struct EventSender {
    tx: mpsc::Sender<ConnectionEvent>,
    dropped: Counter,
    /// Also send `probe_sent` events (for `watch`; the JSON stream has outcomes only).
    pub with_probes: bool,
}

impl EventSender {
    pub(crate) fn send(&self, event: ConnectionEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped.inc();
        }
    }
}

/// A bounded channel; `dropped` counts events that found it full (or its reader gone).
pub(crate) fn channel(
    capacity: usize,
    dropped: Counter,
    with_probes: bool,
) -> (EventSender, mpsc::Receiver<ConnectionEvent>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        EventSender {
            tx,
            dropped,
            with_probes,
        },
        rx,
    )
}

type Output = Box<dyn AsyncWrite + Unpin + Send>;

/// Owns the `--events` output.
pub(crate) struct EventWriter {
    target: EventsTarget,
    output: Output,
    /// Events lost to write errors count with the ones the channel refused.
    dropped: Counter,
}

impl EventWriter {
    /// Opens the output now, so a bad path stops start-up instead of losing events later.
    pub(crate) async fn open(target: EventsTarget, dropped: Counter) -> Result<Self, EventsError> {
        let output = open_output(&target).await?;
        Ok(Self {
            target,
            output,
            dropped,
        })
    }

    /// Writes every event as one line until the channel closes; reopens the file on each
    /// `hangup` signal.
    pub(crate) async fn run(
        mut self,
        mut events: mpsc::Receiver<ConnectionEvent>,
        mut hangup: Signal,
    ) {
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                received = events.recv_many(&mut batch, 256) => {
                    if received == 0 {
                        let _ = self.output.flush().await;
                        return;
                    }
                    self.write(&batch).await;
                    batch.clear();
                }
                Some(()) = hangup.recv() => self.reopen().await,
            }
        }
    }

    async fn write(&mut self, batch: &[ConnectionEvent]) {
        let mut lines = Vec::with_capacity(batch.len() * 512);
        for event in batch {
            // Serializing plain strings, numbers and options cannot fail.
            if serde_json::to_writer(&mut lines, event).is_ok() {
                lines.push(b'\n');
            }
        }
        let written = match self.output.write_all(&lines).await {
            Ok(()) => self.output.flush().await,
            Err(err) => Err(err),
        };
        if let Err(err) = written {
            self.dropped.inc_by(batch.len() as u64);
            warn!("writing {} events failed: {err}", batch.len());
        }
    }

    async fn reopen(&mut self) {
        let EventsTarget::File(path) = &self.target else {
            return;
        };
        let _ = self.output.flush().await;
        match open_output(&self.target).await {
            Ok(output) => {
                self.output = output;
                info!("SIGHUP: reopened the events file {}", path.display());
            }
            Err(err) => warn!("SIGHUP: {err}; still writing to the previous file"),
        }
    }
}

async fn open_output(target: &EventsTarget) -> Result<Output, EventsError> {
    match target {
        EventsTarget::Stdout => Ok(Box::new(tokio::io::stdout())),
        EventsTarget::File(path) => {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .map_err(|source| EventsError::Open {
                    path: path.clone(),
                    source,
                })?;
            Ok(Box::new(file))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decoder::{Endpoints, fixtures};

    fn close() -> CloseEvent {
        CloseEvent {
            sk: 1,
            endpoints: Endpoints {
                netns: 4026532000,
                netns_cookie: 0,
                local: "127.0.0.1:40000".parse().unwrap(),
                remote: "[::1]:8080".parse().unwrap(),
            },
            owner: SocketOwner {
                cgroup_id: 42,
                socket_ino: 7,
            },
            reset_sent_reason: Some(15),
            settings: KeepaliveSettings {
                idle_jiffies: 500,
                ..fixtures::keepalive_abort().settings
            },
            send_window: 1,
            jiffies: (1u64 << 32) + 100,
            last_received_jiffies: u32::MAX - 899,
            ..fixtures::keepalive_abort()
        }
    }

    #[test]
    fn drop_event_serializes_every_field_in_seconds() {
        let event = ConnectionEvent::from_close(
            EventKind::Drop,
            &close(),
            DropReason::KeepaliveTimeout,
            3,
            3,
            250,
        );
        let json: serde_json::Value = serde_json::to_value(&event).unwrap();
        assert_eq!(json["event"], "drop");
        assert_eq!(json["netns"], 4026532000u32);
        assert_eq!(json["local_addr"], "127.0.0.1");
        assert_eq!(json["remote_addr"], "::1");
        assert_eq!(json["remote_port"], 8080);
        assert_eq!(json["workload"]["cgroup_id"], 42);
        assert_eq!(json["workload"]["pod_uid"], serde_json::Value::Null);
        assert_eq!(json["keepalive"]["idle_seconds"], 2.0);
        assert_eq!(json["keepalive"]["interval_seconds"], 1.0);
        assert_eq!(json["keepalive"]["count"], 3);
        assert_eq!(json["reason"], "keepalive_timeout");
        assert_eq!(json["error"], "ETIMEDOUT");
        // 1000 jiffies across the 32-bit wrap at 250 Hz.
        assert_eq!(json["idle_before_death_seconds"], 4.0);
        let ts = json["timestamp"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    }

    #[test]
    fn errors_tcp_reports_have_names() {
        assert_eq!(errno_name(libc::ECONNRESET), "ECONNRESET");
        assert_eq!(errno_name(libc::ECONNABORTED), "ECONNABORTED");
        assert_eq!(errno_name(4095), "errno 4095");
    }

    #[test]
    fn kernel_stamp_becomes_the_wall_clock_time_it_was_taken() {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a live timespec.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) },
            0
        );
        let ten_seconds_ago = (ts.tv_sec as u64 - 10) * 1_000_000_000 + ts.tv_nsec as u64;
        let at = humantime::parse_rfc3339(&rfc3339_from_ktime(ten_seconds_ago)).unwrap();
        let age = SystemTime::now().duration_since(at).unwrap().as_secs_f64();
        assert!((age - 10.0).abs() < 1.0, "{age}");
    }

    #[test]
    fn full_channel_counts_instead_of_waiting() {
        let dropped = Counter::default();
        let (tx, _rx) = channel(1, dropped.clone(), false);
        let event = ConnectionEvent::from_close(
            EventKind::Drop,
            &close(),
            DropReason::KeepaliveTimeout,
            3,
            3,
            250,
        );
        tx.send(event.clone());
        tx.send(event);
        assert_eq!(dropped.get(), 1);
    }

    #[test]
    fn dash_means_standard_output() {
        assert_eq!("-".parse(), Ok(EventsTarget::Stdout));
        assert_eq!(
            "/var/log/k.jsonl".parse(),
            Ok(EventsTarget::File("/var/log/k.jsonl".into()))
        );
    }
}
