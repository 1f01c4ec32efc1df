//! `keepalive-agent sockets`: one audit walk, printed like `ss -o` with each socket's effective
//! keepalive settings and worst-case dead-peer detection time. Attaches no hook.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;
use keepalive_ebpf::tcp_state;

use crate::{
    attribution::Attributor,
    audit::{summary::SocketKeepalive, task, walk},
    kernel::{Session, hz},
    track::idle_kill::IdleThreshold,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for a terminal.
    Table,
    /// One JSON array of objects (fields: netns, state, local_addr, local_port, remote_addr,
    /// remote_port, keepalive, idle_seconds, interval_seconds, probes, user_timeout_ms,
    /// unanswered_probes, worst_case_detection_seconds, silent_seconds, idle_kill_risk,
    /// cgroup_id, socket_ino, pid, comm).
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SocketsConfig {
    /// Only sockets in this network namespace: its inode number, as `ls -L -i /proc/PID/ns/net`
    /// prints it and as the metrics' `netns` label shows it. Repeat for several.
    #[arg(long, value_name = "INODE")]
    pub netns: Vec<u32>,
    /// Only sockets with this local or remote port. Repeat for several.
    #[arg(long, value_name = "PORT")]
    pub port: Vec<u16>,
    /// Include listening sockets (like `ss -a`; by default only connections are shown, like `ss`).
    #[arg(long)]
    pub all: bool,
    /// `table` for people, `json` for scripts (one array; field names are listed in the README).
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// The proc filesystem whose `PID/fd` links name the process holding each socket: the
    /// host's /proc (in a pod, where it is mounted, e.g. /host/proc), as for `run`.
    #[arg(long = "proc.root", value_name = "PATH", default_value = "/proc", value_parser = crate::cmd::flags::parse_proc_root)]
    pub proc_root: std::path::PathBuf,
    /// A middlebox idle timeout, as NAME=SECONDS (repeat for several; as for `run`, added to
    /// each namespace's conntrack timeout and IPVS's where the node uses them): a connection
    /// already silent past one that its keepalive does not beat is marked with it
    /// (IDLE_KILL_RISK): the middlebox has forgotten it, and its next send will die.
    #[arg(long = "idle-timeout-threshold", value_name = "NAME=SECONDS")]
    pub idle_timeout_thresholds: Vec<IdleThreshold>,
}

impl SocketsConfig {
    fn wants(&self, socket: &SocketKeepalive, state: u8) -> bool {
        (self.all || state != tcp_state::LISTEN)
            && (self.netns.is_empty() || self.netns.contains(&socket.netns))
            && (self.port.is_empty()
                || self.port.contains(&socket.local_port)
                || self.port.contains(&socket.remote_port))
    }
}

pub fn run(config: &SocketsConfig) -> anyhow::Result<()> {
    let session = Session::open(Path::new(hz::DEFAULT_TIMER_LIST))
        .context("reading the running kernel (try `keepalive-agent check`)")?;
    let mut program = session
        .load_audit_only()
        .context("loading the audit program (run as root, or see `keepalive-agent check`)")?;
    let hz = session.hz;
    let thresholds = task::node_thresholds(
        &config.idle_timeout_thresholds,
        &config.proc_root,
        hz,
        || session.ipvs_tcp_timeout(),
    );
    drop(session);
    let host = walk::walk_host(&mut program).context("walking the host's TCP sockets")?;
    drop(program);
    for &netns in &config.netns {
        if !host.sockets.iter().any(|s| s.endpoints.netns == netns) {
            log::warn!(
                "no TCP socket in network namespace {netns} (find a namespace's inode with `ls -L \
                 -i /proc/PID/ns/net` or `ls -L -i /run/netns/NAME`)"
            );
        }
    }

    // Owners from the `socket:[INO]` links under --proc.root: one scan of it, cached.
    let attributor = Attributor::new(None, config.proc_root.clone());
    let mut sockets: Vec<SocketKeepalive> = host
        .sockets
        .iter()
        .filter_map(|socket| {
            let mut shown = SocketKeepalive::new(socket, hz)
                .with_idle_kill_risk(&thresholds, &socket.endpoints);
            if !config.wants(&shown, socket.state) {
                return None;
            }
            let owner = attributor.attribute(&socket.owner);
            shown.pid = owner.pid;
            shown.comm = owner.comm;
            Some(shown)
        })
        .collect();
    sockets.sort_by(|a, b| {
        (
            a.netns,
            a.state,
            &a.local_addr,
            a.local_port,
            &a.remote_addr,
            a.remote_port,
        )
            .cmp(&(
                b.netns,
                b.state,
                &b.local_addr,
                b.local_port,
                &b.remote_addr,
                b.remote_port,
            ))
    });

    let text = match config.output {
        OutputFormat::Table => table(&sockets),
        OutputFormat::Json => {
            serde_json::to_string_pretty(&sockets).context("encoding the sockets as JSON")? + "\n"
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

/// `ss`-style address: IPv6 in brackets, a listener's unset peer port as `*`.
fn endpoint(addr: &str, port: u16) -> String {
    if port == 0 {
        return format!("{addr}:*");
    }
    match addr.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{addr}:{port}"),
    }
}

/// Seconds without trailing zeros (`7200`, `0.5`).
fn seconds(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// `7875` → `2h11m15s`, for the worst case where hours matter.
fn human(value: f64) -> String {
    let total = value.round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn row(socket: &SocketKeepalive) -> [String; 12] {
    let user_timeout = if socket.user_timeout_ms == 0 {
        "-".to_owned()
    } else {
        seconds(f64::from(socket.user_timeout_ms) / 1000.0)
    };
    let worst_case = socket.worst_case_detection_seconds.map_or_else(
        || "never".to_owned(),
        |s| format!("{} ({})", seconds(s), human(s)),
    );
    [
        socket.netns.to_string(),
        socket.state.to_owned(),
        endpoint(&socket.local_addr, socket.local_port),
        endpoint(&socket.remote_addr, socket.remote_port),
        if socket.keepalive { "on" } else { "off" }.to_owned(),
        format!(
            "{}/{}/{}",
            seconds(socket.idle_seconds),
            seconds(socket.interval_seconds),
            socket.probes
        ),
        user_timeout,
        socket.unanswered_probes.to_string(),
        worst_case,
        socket
            .silent_seconds
            .map_or_else(|| "-".to_owned(), seconds),
        socket
            .idle_kill_risk
            .clone()
            .unwrap_or_else(|| "-".to_owned()),
        match (&socket.comm, socket.pid) {
            (Some(comm), Some(pid)) => format!("{comm}[{pid}]"),
            _ => "-".to_owned(),
        },
    ]
}

const HEADER: [&str; 12] = [
    "NETNS",
    "STATE",
    "LOCAL",
    "REMOTE",
    "KEEPALIVE",
    "IDLE/INTVL/CNT(s)",
    "USER_TIMEOUT(s)",
    "UNANSWERED",
    "WORST_CASE_DETECTION(s)",
    "SILENT(s)",
    "IDLE_KILL_RISK",
    "PROCESS",
];

fn table(sockets: &[SocketKeepalive]) -> String {
    let rows: Vec<[String; 12]> = sockets.iter().map(row).collect();
    let mut widths = HEADER.map(str::len);
    for cells in &rows {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (cell, width) in cells.iter().zip(widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&HEADER);
    for cells in &rows {
        line(&cells.each_ref().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> SocketKeepalive {
        SocketKeepalive {
            netns: 4026532000,
            state: "ESTABLISHED",
            local_addr: "::1".to_owned(),
            local_port: 40000,
            remote_addr: "::1".to_owned(),
            remote_port: 8080,
            keepalive: true,
            idle_seconds: 7200.0,
            interval_seconds: 75.0,
            probes: 9,
            user_timeout_ms: 0,
            unanswered_probes: 0,
            worst_case_detection_seconds: Some(7875.0),
            silent_seconds: Some(12.5),
            idle_kill_risk: None,
            conntrack_timeout_seconds: None,
            cgroup_id: 0,
            socket_ino: 0,
            pid: Some(4242),
            comm: Some("curl".to_owned()),
        }
    }

    #[test]
    fn table_row_reads_like_ss() {
        assert_eq!(
            row(&socket()),
            [
                "4026532000",
                "ESTABLISHED",
                "[::1]:40000",
                "[::1]:8080",
                "on",
                "7200/75/9",
                "-",
                "0",
                "7875 (2h11m15s)",
                "12.5",
                "-",
                "curl[4242]"
            ]
        );
        let off = SocketKeepalive {
            keepalive: false,
            user_timeout_ms: 2500,
            idle_seconds: 0.5,
            worst_case_detection_seconds: None,
            idle_kill_risk: Some("aws-nlb".to_owned()),
            pid: None,
            comm: None,
            ..socket()
        };
        let cells = row(&off);
        assert_eq!(
            (&*cells[5], &*cells[6], &*cells[8], &*cells[10], &*cells[11]),
            ("0.5/75/9", "2.5", "never", "aws-nlb", "-")
        );
    }

    #[test]
    fn filters_by_namespace_port_and_listening() {
        let config = SocketsConfig {
            netns: vec![4026532000],
            port: vec![8080],
            all: false,
            output: OutputFormat::Table,
            proc_root: "/proc".into(),
            idle_timeout_thresholds: Vec::new(),
        };
        assert!(config.wants(&socket(), tcp_state::ESTABLISHED));
        assert!(!config.wants(&socket(), tcp_state::LISTEN));
        assert!(!config.wants(
            &SocketKeepalive {
                netns: 1,
                ..socket()
            },
            tcp_state::ESTABLISHED
        ));
        let other_port = SocketKeepalive {
            remote_port: 9,
            ..socket()
        };
        assert!(!config.wants(&other_port, tcp_state::ESTABLISHED));
    }
}
