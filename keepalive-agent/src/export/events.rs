//! The event stream: one JSON object per line for every keepalive probe-streak outcome and every
//! dropped connection (`run --events FILE|-`); `watch` reads the same events, plus one per probe.
//!
//! The pipeline never waits for the writer: it `try_send`s into a bounded channel and counts
//! what does not fit (`keepalive_agent_events_dropped_total`). The writer task owns the output
//! and reopens it on SIGHUP, so logrotate can move the file away and signal the agent.
//!
//! The file holds whole lines or nothing: a write that fails part-way (a full disk) is cut back
//! to its last whole line, and every event not written is counted as dropped, so
//! `keepalive_agent_event_stream_produced_total` = lines written + dropped (once the channel is
//! empty).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::{Duration, SystemTime},
};

use log::{info, warn};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::{signal::unix::Signal, sync::mpsc};

use crate::{
    attribution::Workload,
    kernel::hz,
    record::decoder::{
        CloseEvent, Endpoints, KeepaliveExpiry, KeepaliveSettings, KernelTime, SocketOwner,
    },
    track::{classifier::DropReason, idle_kill::IdleKill},
};

/// Events buffered between the pipeline and the writer before new ones are counted as dropped.
pub(crate) const CHANNEL_CAPACITY: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub(crate) enum EventsError {
    #[error(
        "cannot open the events file {path} for appending: {}",
        crate::files::io_reason(source)
    )]
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
    /// A `drop` a middlebox idle timeout explains (`--idle-timeout-threshold`); `null` otherwise.
    pub idle_kill: Option<IdleKillFields>,
}

/// What an idle kill's event says: which middlebox timeout, how long the connection was silent,
/// how its next send died, and the keepalive setting that would have kept it alive.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdleKillFields {
    pub threshold: String,
    pub threshold_seconds: f64,
    /// From the last segment received to the send that died.
    pub silence_seconds: f64,
    /// `reset` or `timeout` (see `IdleKillHow`).
    pub died_by: &'static str,
    /// The effective keepalive idle; `null` when keepalive was off.
    pub keepalive_idle_seconds: Option<f64>,
    /// A `TCP_KEEPIDLE` (with `SO_KEEPALIVE` on) below the threshold.
    pub suggested_keepalive_idle_seconds: f64,
}

impl From<&IdleKill> for IdleKillFields {
    fn from(kill: &IdleKill) -> Self {
        Self {
            threshold: kill.threshold.name.clone(),
            threshold_seconds: kill.threshold.seconds,
            silence_seconds: kill.silence_seconds,
            died_by: kill.how.as_str(),
            keepalive_idle_seconds: kill.keepalive_idle_seconds,
            suggested_keepalive_idle_seconds: kill.suggested_keepalive_idle_seconds,
        }
    }
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
            KernelTime::Expiry(expiry.ktime),
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
                KernelTime::Ns(close.ktime_ns),
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
        ktime: KernelTime,
        e: &Endpoints,
        owner: SocketOwner,
        probes_sent: u64,
        unanswered_probes: u8,
        keepalive: KeepaliveSeconds,
    ) -> Self {
        Self {
            timestamp: rfc3339_from_ktime(ktime),
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
            idle_kill: None,
        }
    }
}

/// The C name of an errno (`ETIMEDOUT`), as `sk_err` holds it; a number no libc names prints
/// as `errno N`.
pub fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => format!("errno {errno}"),
        // The variants are named after the C constants.
        known => format!("{known:?}"),
    }
}

/// The wall-clock time of a kernel `bpf_ktime_get_ns` stamp (CLOCK_MONOTONIC), so the line
/// says when the kernel acted, not when the agent got round to it.
pub(crate) fn rfc3339_from_ktime(ktime: KernelTime) -> String {
    let now = SystemTime::now();
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a live timespec; CLOCK_MONOTONIC always exists.
    let monotonic_ns = if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) } == 0 {
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    } else {
        return humantime::format_rfc3339_micros(now).to_string();
    };
    let ktime_ns = ktime.ns(monotonic_ns);
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

/// Checks at start that `path` can be an events file: not a directory, in a directory that
/// exists (the file itself is created on open).
pub(crate) fn check_target(path: &Path) -> Result<(), String> {
    let flag = "--events";
    if path.as_os_str().is_empty() {
        return Err(format!(
            "{flag}: give a file path, or - for standard output"
        ));
    }
    if path.is_dir() {
        return Err(format!(
            "{flag} {}: is a directory, not a file",
            path.display()
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "{flag} {}: {} is not a directory",
            path.display(),
            parent.display()
        )),
        Err(e) => Err(format!(
            "{flag} {}: its directory {}: {}",
            path.display(),
            parent.display(),
            crate::files::io_reason(&e)
        )),
    }
}

/// The pipeline's end of the channel: never waits.
#[derive(Debug, Clone)]
pub(crate) struct EventSender {
    tx: mpsc::Sender<ConnectionEvent>,
    produced: Counter,
    dropped: Counter,
    /// Also send `probe_sent` events (for `watch`; the JSON stream has outcomes only).
    pub with_probes: bool,
}

impl EventSender {
    pub(crate) fn send(&self, event: ConnectionEvent) {
        self.produced.inc();
        if self.tx.try_send(event).is_err() {
            self.dropped.inc();
        }
    }
}

/// A bounded channel; `produced` counts every event sent, `dropped` those that found it full
/// (or its reader gone).
pub(crate) fn channel(
    capacity: usize,
    produced: Counter,
    dropped: Counter,
    with_probes: bool,
) -> (EventSender, mpsc::Receiver<ConnectionEvent>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        EventSender {
            tx,
            produced,
            dropped,
            with_probes,
        },
        rx,
    )
}

/// Events the writer takes from the channel per write.
const BATCH: usize = 256;
/// Repeated write errors are summarized at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Where the lines go. Writes are plain `write(2)` calls on the blocking pool, so the writer
/// knows exactly how many bytes reached the output when one fails.
enum Sink {
    Stdout(std::fs::File),
    /// Opened with O_APPEND.
    File(std::fs::File),
}

/// One batch's fate.
struct Written {
    /// Whole lines that reached the output (a prefix of the batch).
    lines: usize,
    /// Bytes that reached the output.
    bytes: usize,
    error: Option<std::io::Error>,
    /// A partial line stayed in the output (it could not be taken back): the next write starts
    /// with a newline so no event is glued to it.
    partial_left: bool,
}

impl Sink {
    fn file(&mut self) -> &mut std::fs::File {
        match self {
            Self::Stdout(file) | Self::File(file) => file,
        }
    }

    /// Writes `buf` (whole lines; `ends[i]` is the end of line i). On an error, whole lines
    /// written stay and a partial line is cut off again: the file holds whole lines or nothing.
    fn write_lines(&mut self, buf: &[u8], ends: &[usize]) -> Written {
        use std::io::Write as _;
        // Where this batch starts: O_APPEND writes at the end. Without it (standard output
        // redirected or piped) there is nothing to cut back to.
        let start = match self {
            Self::File(file) => file.metadata().ok().map(|m| m.len()),
            Self::Stdout(_) => None,
        };
        let file = self.file();
        let mut done = 0;
        let mut error = None;
        while done < buf.len() {
            match file.write(&buf[done..]) {
                Ok(0) => {
                    error = Some(std::io::Error::from(std::io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let lines = ends.iter().take_while(|&&end| end <= done).count();
        let whole = lines.checked_sub(1).map_or(0, |last| ends[last]);
        let mut partial_left = done > whole;
        if partial_left
            && let Some(start) = start
            && let Ok(meta) = file.metadata()
            // Someone else truncated the file meanwhile (copytruncate): leave it alone.
            && meta.len() == start + done as u64
            && file.set_len(start + whole as u64).is_ok()
        {
            partial_left = false;
        }
        Written {
            lines,
            bytes: done,
            error,
            partial_left,
        }
    }
}

/// Logs the first write error at once, then one summary per [`ERROR_LOG_INTERVAL`], and says
/// when writing works again: a full disk gives a few lines, not one per batch.
#[derive(Default)]
struct WriteErrors {
    /// Events lost since the last line logged, and since the first error of this episode.
    lost_since_log: u64,
    lost_in_episode: u64,
    last_log: Option<std::time::Instant>,
}

impl WriteErrors {
    fn failed(&mut self, target: &EventsTarget, lost: u64, err: &std::io::Error) {
        self.lost_since_log += lost;
        self.lost_in_episode += lost;
        let first = self.last_log.is_none();
        if first
            || self
                .last_log
                .is_some_and(|at| at.elapsed() >= ERROR_LOG_INTERVAL)
        {
            warn!(
                "writing events to {target} failed: {err}; {} events lost{} (counted in \
                 keepalive_agent_events_dropped_total){}",
                self.lost_since_log,
                if first {
                    String::new()
                } else {
                    format!(" in the last {}s", ERROR_LOG_INTERVAL.as_secs())
                },
                if first {
                    "; further failures are summarized every 10s"
                } else {
                    ""
                }
            );
            self.lost_since_log = 0;
            self.last_log = Some(std::time::Instant::now());
        }
    }

    fn succeeded(&mut self, target: &EventsTarget) {
        if self.last_log.is_some() {
            info!(
                "writing events to {target} works again; {} events were lost",
                self.lost_in_episode
            );
            *self = Self::default();
        }
    }
}

impl std::fmt::Display for EventsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("standard output"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Owns the `--events` output.
pub(crate) struct EventWriter {
    target: EventsTarget,
    /// `None` only while a write runs on the blocking pool.
    sink: Option<Sink>,
    /// Events lost to write errors count with the ones the channel refused.
    dropped: Counter,
    written: Counter,
    errors: WriteErrors,
    newline_first: bool,
}

impl EventWriter {
    /// Opens the output now, so a bad path stops start-up instead of losing events later.
    /// `written` counts the events that reached it.
    pub(crate) fn open(
        target: EventsTarget,
        dropped: Counter,
        written: Counter,
    ) -> Result<Self, EventsError> {
        let sink = open_output(&target)?;
        Ok(Self {
            target,
            sink: Some(sink),
            dropped,
            written,
            errors: WriteErrors::default(),
            newline_first: false,
        })
    }

    /// Writes every event as one line until the channel closes or `stop` turns true (then what
    /// is already in the channel is written first); reopens the file on each `hangup` signal.
    pub(crate) async fn run(
        mut self,
        mut events: mpsc::Receiver<ConnectionEvent>,
        mut hangup: Signal,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                received = events.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                    self.write(&batch).await;
                    batch.clear();
                }
                Some(()) = hangup.recv() => self.reopen(),
                () = crate::export::http::stopped(&mut stop) => {
                    while let Ok(event) = events.try_recv() {
                        batch.push(event);
                        if batch.len() == BATCH {
                            self.write(&batch).await;
                            batch.clear();
                        }
                    }
                    self.write(&batch).await;
                    return;
                }
            }
        }
    }

    async fn write(&mut self, batch: &[ConnectionEvent]) {
        if batch.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(batch.len() * 512 + 1);
        if self.newline_first {
            buf.push(b'\n');
        }
        let mut ends = Vec::with_capacity(batch.len());
        for event in batch {
            // Serializing plain strings, numbers and options cannot fail.
            if serde_json::to_writer(&mut buf, event).is_ok() {
                buf.push(b'\n');
                ends.push(buf.len());
            }
        }
        let Some(mut sink) = self.sink.take() else {
            self.dropped.inc_by(batch.len() as u64);
            return;
        };
        let (sink, written) = match tokio::task::spawn_blocking(move || {
            let written = sink.write_lines(&buf, &ends);
            (sink, written)
        })
        .await
        {
            Ok(done) => done,
            Err(_) => {
                // The blocking pool is shutting down: the output went with it.
                self.dropped.inc_by(batch.len() as u64);
                return;
            }
        };
        self.sink = Some(sink);
        // `ends` holds event lines only, so a leading newline is not counted as one.
        let lines = written.lines.min(batch.len());
        self.newline_first = written.partial_left || (self.newline_first && written.bytes == 0);
        self.written.inc_by(lines as u64);
        let lost = (batch.len() - lines) as u64;
        self.dropped.inc_by(lost);
        match written.error {
            Some(err) => self.errors.failed(&self.target, lost, &err),
            None => self.errors.succeeded(&self.target),
        }
    }

    fn reopen(&mut self) {
        let EventsTarget::File(path) = &self.target else {
            info!("SIGHUP: events go to standard output, nothing to reopen");
            return;
        };
        match open_output(&self.target) {
            Ok(sink) => {
                self.sink = Some(sink);
                self.newline_first = false;
                info!("SIGHUP: reopened the events file {}", path.display());
            }
            Err(err) => warn!("SIGHUP: {err}; still writing to the previous file"),
        }
    }
}

fn open_output(target: &EventsTarget) -> Result<Sink, EventsError> {
    match target {
        EventsTarget::Stdout => {
            use std::os::fd::AsFd as _;
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| EventsError::Open {
                    path: PathBuf::from("-"),
                    source,
                })?;
            Ok(Sink::Stdout(std::fs::File::from(fd)))
        }
        EventsTarget::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| EventsError::Open {
                    path: path.clone(),
                    source,
                })?;
            Ok(Sink::File(file))
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
    fn an_idle_kill_is_an_object_of_the_drop_and_null_otherwise() {
        let plain = ConnectionEvent::from_close(
            EventKind::Drop,
            &close(),
            DropReason::ResetReceived,
            0,
            0,
            250,
        );
        let json: serde_json::Value = serde_json::to_value(&plain).unwrap();
        assert_eq!(json["idle_kill"], serde_json::Value::Null);
        let kill = IdleKill {
            threshold: "aws-nlb=350".parse().unwrap(),
            silence_seconds: 400.0,
            how: crate::track::idle_kill::IdleKillHow::Reset,
            keepalive_idle_seconds: None,
            suggested_keepalive_idle_seconds: 275.0,
        };
        let event = ConnectionEvent {
            idle_kill: Some(IdleKillFields::from(&kill)),
            ..plain
        };
        let json: serde_json::Value = serde_json::to_value(&event).unwrap();
        let fields = &json["idle_kill"];
        assert_eq!(fields["threshold"], "aws-nlb");
        assert_eq!(fields["threshold_seconds"], 350.0);
        assert_eq!(fields["silence_seconds"], 400.0);
        assert_eq!(fields["died_by"], "reset");
        assert_eq!(fields["keepalive_idle_seconds"], serde_json::Value::Null);
        assert_eq!(fields["suggested_keepalive_idle_seconds"], 275.0);
    }

    #[test]
    fn errors_tcp_reports_have_names() {
        assert_eq!(errno_name(libc::ECONNRESET), "ECONNRESET");
        assert_eq!(errno_name(libc::ECONNABORTED), "ECONNABORTED");
        assert_eq!(errno_name(libc::ETIMEDOUT), "ETIMEDOUT");
        // ICMP errors `icmp_err_convert` turns into sk_err, which the hand-written table of
        // before printed as numbers.
        assert_eq!(errno_name(libc::ENOPROTOOPT), "ENOPROTOOPT");
        assert_eq!(errno_name(libc::EOPNOTSUPP), "EOPNOTSUPP");
        assert_eq!(errno_name(4095), "errno 4095");
        assert_eq!(errno_name(-1), "errno -1");
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
        // A close's whole stamp, and a keepalive expiry's 32 bits of it.
        let stamps = [
            KernelTime::Ns(ten_seconds_ago),
            KernelTime::Expiry((ten_seconds_ago >> keepalive_ebpf::EXPIRY_KTIME_SHIFT) as u32),
        ];
        for stamp in stamps {
            let at = humantime::parse_rfc3339(&rfc3339_from_ktime(stamp)).unwrap();
            let age = SystemTime::now().duration_since(at).unwrap().as_secs_f64();
            assert!((age - 10.0).abs() < 1.0, "{stamp:?}: {age}");
        }
    }

    #[test]
    fn full_channel_counts_instead_of_waiting() {
        let dropped = Counter::default();
        let (tx, _rx) = channel(1, Counter::default(), dropped.clone(), false);
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
    fn a_write_cut_short_counts_only_its_whole_lines() {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2 returns.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) },
            0
        );
        // SAFETY: both descriptors were just returned by pipe2 and are owned here only.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A pipe nobody reads takes its capacity, then EAGAIN: a write cut short mid-line.
        let line = [b'x'; 999]
            .iter()
            .copied()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        let buf = line.repeat(200);
        let ends: Vec<usize> = (1..=200).map(|i| i * line.len()).collect();
        let mut sink = Sink::Stdout(std::fs::File::from(writer));
        let written = sink.write_lines(&buf, &ends);
        assert!(written.error.is_some());
        assert!(
            written.bytes > 0 && written.bytes < buf.len(),
            "{}",
            written.bytes
        );
        assert_eq!(written.lines, written.bytes / line.len());
        assert_eq!(
            written.partial_left,
            !written.bytes.is_multiple_of(line.len())
        );
        drop(reader);
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
