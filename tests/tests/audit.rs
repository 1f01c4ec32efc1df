//! The keepalive configuration audit against the kernel's own answer: the test configures a mix
//! of sockets (namespace defaults, tuned, partly tuned, keepalive off, TCP_USER_TIMEOUT, one in
//! CLOSE_WAIT, IPv4 and IPv6) in a namespace whose `net.ipv4.tcp_keepalive_time` is not the
//! default, reads each socket's effective settings back with `getsockopt` (which returns the
//! namespace value for what the socket did not set), and checks `keepalive-agent sockets` and
//! the agent's audit metrics against those values.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, TcpListener, TcpStream};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use keepalive_tests::deploy::{ScratchDir, agent_in_pod, daemonset_container};
use keepalive_tests::{
    Conn, DEADLINE, Metrics, Netns, TCP_ESTABLISHED, TcpPair, TestEnv, agent_bin, getsockopt_int,
    kernel_tests_enabled, run_sockets, set_keepalive, set_user_timeout, setsockopt_int,
    skip_or_fail, sockets_json, tcp_state, wait_until,
};

/// The namespace's keepalive idle time: not the 7200 s a new namespace starts with, so a socket
/// reporting it proves the namespace's sysctl (not the host's, not a constant) was used.
const NETNS_KEEPALIVE_TIME: i32 = 5400;
use keepalive_ebpf::tcp_state::{
    CLOSE_WAIT as TCP_CLOSE_WAIT, FIN_WAIT2 as TCP_FIN_WAIT2, name as state_name,
};

/// One socket's keepalive configuration as the kernel reports it to the application.
#[derive(Debug, Clone, PartialEq)]
struct Effective {
    conn: Conn,
    state: u8,
    keepalive: bool,
    idle_s: i32,
    interval_s: i32,
    probes: i32,
    user_timeout_ms: i32,
}

impl Effective {
    fn read(s: &TcpStream, conn: Conn) -> anyhow::Result<Effective> {
        let tcp = |opt, what| getsockopt_int(s, libc::IPPROTO_TCP, opt, what);
        Ok(Effective {
            conn,
            state: tcp_state(s)?,
            keepalive: getsockopt_int(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE")?
                != 0,
            idle_s: tcp(libc::TCP_KEEPIDLE, "TCP_KEEPIDLE")?,
            interval_s: tcp(libc::TCP_KEEPINTVL, "TCP_KEEPINTVL")?,
            probes: tcp(libc::TCP_KEEPCNT, "TCP_KEEPCNT")?,
            user_timeout_ms: tcp(libc::TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT")?,
        })
    }

    /// The connections the audit metrics count.
    fn is_connection(&self) -> bool {
        matches!(self.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT)
    }

    /// When `tcp_keepalive_timer` aborts after the peer's last segment: probes go out at
    /// idle, idle + interval, ...; without a user timeout the abort comes at the probe time
    /// after `probes` probes, with one at the first probe time (after the first probe) that
    /// reaches the user timeout. This test's values are whole seconds, exact in jiffies.
    fn worst_case_detection_s(&self) -> Option<f64> {
        if !self.keepalive {
            return None;
        }
        let (idle, interval) = (f64::from(self.idle_s), f64::from(self.interval_s));
        if self.user_timeout_ms == 0 {
            return Some(idle + f64::from(self.probes) * interval);
        }
        let user_timeout = f64::from(self.user_timeout_ms) / 1000.0;
        let probes_until_abort = ((user_timeout - idle) / interval).ceil().max(1.0);
        Some(idle + probes_until_abort * interval)
    }
}

/// The test's sockets, kept open for the whole test, and what getsockopt says about each.
struct SocketMix {
    _listeners: [TcpListener; 2],
    _pairs: Vec<TcpPair>,
    sockets: Vec<Effective>,
    /// Port of the IPv6 listener (only the CLOSE_WAIT pair uses it).
    v6_port: u16,
}

impl SocketMix {
    fn create(ns: &Netns) -> anyhow::Result<SocketMix> {
        ns.sysctl(
            "net.ipv4.tcp_keepalive_time",
            &NETNS_KEEPALIVE_TIME.to_string(),
        )?;
        let v4 = ns.listen(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        let v6 = ns.listen(IpAddr::V6(Ipv6Addr::LOCALHOST))?;
        let mut pairs = ns.connect_pairs(&v4, 6)?;
        pairs.extend(ns.connect_pairs(&v6, 1)?);
        let on = |s: &TcpStream| {
            setsockopt_int(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1, "SO_KEEPALIVE")
        };
        let tcp = |s: &TcpStream, opt, value, what| {
            setsockopt_int(s, libc::IPPROTO_TCP, opt, value, what)
        };

        // 0: keepalive on, everything else from the namespace (5400/75/9).
        on(&pairs[0].client)?;
        // 1, 2: tuned below and exactly at the 600 s threshold.
        set_keepalive(&pairs[1].client, 300, 30, 4)?;
        set_keepalive(&pairs[2].client, 600, 60, 5)?;
        // 3: TCP_USER_TIMEOUT between two probe times decides instead of the count.
        set_keepalive(&pairs[3].client, 60, 10, 3)?;
        set_user_timeout(&pairs[3].client, 95_000)?;
        // 4: only the count tuned: idle and interval still come from the namespace.
        tcp(&pairs[4].client, libc::TCP_KEEPCNT, 2, "TCP_KEEPCNT")?;
        on(&pairs[4].client)?;
        // 5: tuned but keepalive off: still exposed to every middlebox.
        tcp(&pairs[5].client, libc::TCP_KEEPIDLE, 900, "TCP_KEEPIDLE")?;
        // 6 (IPv6): keepalive on in CLOSE_WAIT (the peer shut down its sending side), which the
        // metrics count; the peer's FIN_WAIT2 end is listed but not counted.
        set_keepalive(&pairs[6].client, 1200, 100, 2)?;
        pairs[6].server.shutdown(Shutdown::Write)?;
        wait_until(
            DEADLINE,
            "the IPv6 pair to reach CLOSE_WAIT/FIN_WAIT2",
            || {
                Ok(tcp_state(&pairs[6].client)? == TCP_CLOSE_WAIT
                    && tcp_state(&pairs[6].server)? == TCP_FIN_WAIT2)
            },
        )?;
        // Servers keep the defaults: keepalive off (accepted sockets inherit the listener's).
        let mut sockets = Vec::new();
        for pair in &pairs {
            sockets.push(Effective::read(&pair.client, pair.client_conn)?);
            sockets.push(Effective::read(&pair.server, pair.server_conn)?);
        }
        // The mix is what this test says it is: the kernel applied the namespace's idle time.
        ensure!(
            sockets[0].idle_s == NETNS_KEEPALIVE_TIME,
            "{:?}",
            sockets[0]
        );
        ensure!(
            (sockets[8].idle_s, sockets[8].probes) == (NETNS_KEEPALIVE_TIME, 2),
            "{:?}",
            sockets[8]
        );
        ensure!(sockets[13].state == TCP_FIN_WAIT2, "{:?}", sockets[13]);
        Ok(SocketMix {
            v6_port: v6.local_addr()?.port(),
            _listeners: [v4, v6],
            _pairs: pairs,
            sockets,
        })
    }
}

fn find<'a>(rows: &'a [serde_json::Value], conn: &Conn) -> Option<&'a serde_json::Value> {
    rows.iter().find(|row| {
        row["local_addr"] == conn.local.ip().to_string()
            && row["local_port"] == conn.local.port()
            && row["remote_addr"] == conn.remote.ip().to_string()
            && row["remote_port"] == conn.remote.port()
    })
}

#[test]
fn sockets_json_lists_every_socket_with_the_settings_getsockopt_returns() -> anyhow::Result<()> {
    let test = "sockets_json_lists_every_socket_with_the_settings_getsockopt_returns";
    if !kernel_tests_enabled(test) {
        return Ok(());
    }
    if !agent_bin().is_file() {
        skip_or_fail(
            test,
            "the agent binary is not built (KEEPALIVE_TESTS_KERNEL_ONLY=1?)",
        );
        return Ok(());
    }
    let ns = Netns::new("audit-cli")?;
    let mix = SocketMix::create(&ns)?;
    let netns = ns.inum().to_string();

    let rows = sockets_json(&["--netns", &netns])?;
    // Both ends of 7 connections; listeners only with --all.
    assert_eq!(rows.len(), mix.sockets.len(), "rows: {rows:#?}");
    for socket in &mix.sockets {
        let row = find(&rows, &socket.conn)
            .with_context(|| format!("{socket:?} is missing from {rows:#?}"))?;
        let expected = serde_json::json!({
            "netns": ns.inum(),
            "state": state_name(socket.state),
            "local_addr": socket.conn.local.ip().to_string(),
            "local_port": socket.conn.local.port(),
            "remote_addr": socket.conn.remote.ip().to_string(),
            "remote_port": socket.conn.remote.port(),
            "keepalive": socket.keepalive,
            "idle_seconds": f64::from(socket.idle_s),
            "interval_seconds": f64::from(socket.interval_s),
            "probes": socket.probes,
            "user_timeout_ms": socket.user_timeout_ms,
            "unanswered_probes": 0,
            "worst_case_detection_seconds": socket.worst_case_detection_s(),
        });
        assert_fields_equal(row, &expected, &socket);
        assert!(row["cgroup_id"].as_u64().is_some_and(|id| id != 0), "{row}");
    }

    // Filters: by port (the IPv6 pair only), and --all adds the two listeners.
    let port = mix.v6_port.to_string();
    let v6_rows = sockets_json(&["--netns", &netns, "--port", &port])?;
    assert_eq!(v6_rows.len(), 2, "{v6_rows:#?}");
    let with_listeners = sockets_json(&["--netns", &netns, "--all"])?;
    assert_eq!(with_listeners.len(), mix.sockets.len() + 2);
    assert_eq!(
        with_listeners
            .iter()
            .filter(|row| row["state"] == "LISTEN")
            .count(),
        2
    );

    // The table shows the same socket on one line: defaults from the namespace, no user timeout.
    let table = run_sockets(&["--netns", &netns])?;
    let first = &mix.sockets[0];
    let line = table
        .lines()
        .find(|l| l.contains(&first.conn.local.to_string()) && l.contains(" on "))
        .with_context(|| format!("no line for {:?} in\n{table}", first.conn))?;
    let expected_settings = format!("{NETNS_KEEPALIVE_TIME}/75/9");
    assert!(line.contains(&expected_settings), "{line}");
    assert!(line.contains("6075 (1h41m15s)"), "{line}");
    eprintln!("{test}: keepalive-agent sockets --netns {netns}:\n{table}");
    Ok(())
}

/// The figures the agent should export for this namespace, from the test's own sockets.
fn expected_metrics(
    sockets: &[Effective],
    netns: &str,
    thresholds: &[(&str, f64)],
) -> BTreeMap<(String, Vec<(String, String)>), f64> {
    let connections: Vec<&Effective> = sockets.iter().filter(|s| s.is_connection()).collect();
    let on: Vec<&Effective> = connections
        .iter()
        .copied()
        .filter(|s| s.keepalive)
        .collect();
    let idle: Vec<f64> = on.iter().map(|s| f64::from(s.idle_s)).collect();
    let worst: Vec<f64> = on
        .iter()
        .filter_map(|s| s.worst_case_detection_s())
        .collect();
    let labels = |extra: &[(&str, String)]| -> Vec<(String, String)> {
        let mut all = vec![("netns".to_owned(), netns.to_owned())];
        all.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        all
    };
    let mut expected = BTreeMap::new();
    for (keepalive, n) in [("on", on.len()), ("off", connections.len() - on.len())] {
        expected.insert(
            (
                "tcp_keepalive_sockets".to_owned(),
                labels(&[("keepalive", keepalive.to_owned())]),
            ),
            n as f64,
        );
    }
    for (name, values) in [
        ("tcp_keepalive_idle_seconds", &idle),
        ("tcp_keepalive_worst_case_detection_seconds", &worst),
    ] {
        expected.insert((format!("{name}_count"), labels(&[])), values.len() as f64);
        expected.insert((format!("{name}_sum"), labels(&[])), values.iter().sum());
    }
    for (name, seconds) in thresholds {
        let n = idle.iter().filter(|idle| **idle >= *seconds).count();
        expected.insert(
            (
                "tcp_keepalive_idle_at_or_above_threshold_sockets".to_owned(),
                labels(&[("threshold", (*name).to_owned())]),
            ),
            n as f64,
        );
    }
    expected
}

/// Every `_bucket` sample of `name` for the namespace: the number of `values` at or below `le`.
fn bucket_mismatches(m: &Metrics, name: &str, netns: &str, values: &[f64]) -> Vec<String> {
    let buckets = m.matching(&format!("{name}_bucket"), &[("netns", netns)]);
    if buckets.is_empty() {
        return vec![format!("{name}_bucket: no sample")];
    }
    buckets
        .iter()
        .filter_map(|b| {
            let le: f64 = b.label("le")?.parse().ok()?;
            let want = values.iter().filter(|v| **v <= le).count() as f64;
            (b.value != want)
                .then(|| format!("{name}_bucket{{le={le}}}: want {want}, got {}", b.value))
        })
        .collect()
}

/// `run` flags of the audit metrics tests. Thresholds below, at and above the tuned idle times:
/// 600 s counts the 600 s socket (at or above), 900 s only the namespace-default ones.
const AUDIT_METRICS_ARGS: [&str; 8] = [
    "--audit.interval",
    "1s",
    "--idle-timeout-threshold",
    "aws-nlb=350",
    "--idle-timeout-threshold",
    "edge=600",
    "--idle-timeout-threshold",
    "ipvs=900",
];

#[test]
fn audit_metrics_count_the_namespace_sockets_by_keepalive_idle_and_detection_time()
-> anyhow::Result<()> {
    let test = "audit_metrics_count_the_namespace_sockets_by_keepalive_idle_and_detection_time";
    let Some(env) = TestEnv::start_with_agent_args(test, &AUDIT_METRICS_ARGS) else {
        return Ok(());
    };
    audit_metrics_match_the_sockets(&env)
}

/// The same with the agent as the shipped DaemonSet runs it (its own network, PID and mount
/// namespaces, the manifest's capabilities): the periodic audit sees another namespace's
/// sockets from there.
#[test]
fn audit_metrics_count_another_namespace_s_sockets_when_the_agent_runs_as_the_daemonset()
-> anyhow::Result<()> {
    let test =
        "audit_metrics_count_another_namespace_s_sockets_when_the_agent_runs_as_the_daemonset";
    let Some(env) = TestEnv::start_as_daemonset_with_args(test, &AUDIT_METRICS_ARGS) else {
        return Ok(());
    };
    audit_metrics_match_the_sockets(&env)
}

fn audit_metrics_match_the_sockets(env: &TestEnv) -> anyhow::Result<()> {
    let thresholds = [("aws-nlb", 350.0), ("edge", 600.0), ("ipvs", 900.0)];
    let ns = Netns::new("audit-metrics")?;
    let mix = SocketMix::create(&ns)?;
    let Some(agent) = env.agent() else {
        return Ok(());
    };
    let netns = ns.inum().to_string();
    let expected = expected_metrics(&mix.sockets, &netns, &thresholds);
    let on: Vec<&Effective> = mix
        .sockets
        .iter()
        .filter(|s| s.is_connection() && s.keepalive)
        .collect();
    let idle: Vec<f64> = on.iter().map(|s| f64::from(s.idle_s)).collect();
    let worst: Vec<f64> = on
        .iter()
        .filter_map(|s| s.worst_case_detection_s())
        .collect();
    // The mix has both kinds and something at each threshold, or the test proves little.
    assert_eq!(
        (on.len(), idle.iter().filter(|i| **i >= 600.0).count()),
        (6, 4)
    );

    let mismatches = |m: &Metrics| -> Vec<String> {
        let mut problems: Vec<String> = expected
            .iter()
            .filter_map(|((name, labels), want)| {
                let got = m.value(name, labels);
                ((got - want).abs() > 1e-6)
                    .then(|| format!("{name}{labels:?}: want {want}, got {got}"))
            })
            .collect();
        problems.extend(bucket_mismatches(
            m,
            "tcp_keepalive_idle_seconds",
            &netns,
            &idle,
        ));
        problems.extend(bucket_mismatches(
            m,
            "tcp_keepalive_worst_case_detection_seconds",
            &netns,
            &worst,
        ));
        problems
    };
    let mut last = Vec::new();
    let matched = wait_until(DEADLINE, "the audit metrics of the namespace", || {
        last = mismatches(&agent.scrape()?);
        Ok(last.is_empty())
    });
    if let Err(err) = matched {
        bail!(
            "{err}\nmismatches:\n  {}\nagent series for netns {netns}:\n{}\nagent log:\n{}",
            last.join("\n  "),
            agent.scrape()?.lines_with_label("netns", &netns),
            agent.log()
        );
    }

    let metrics = agent.scrape()?;
    let none: &[(&str, &str)] = &[];
    assert_eq!(metrics.value("keepalive_agent_audit_enabled", none), 1.0);
    assert_eq!(
        metrics.value("keepalive_agent_audit_errors_total", none),
        0.0
    );
    // The walk covers the whole host: at least this namespace's sockets and listeners.
    assert!(metrics.value("keepalive_agent_audit_sockets", none) >= (mix.sockets.len() + 2) as f64);
    assert!(metrics.value("keepalive_agent_audit_duration_seconds", none) > 0.0);
    // The node-wide thresholds in force are the ones given (this host has no IPVS to add one).
    let mut in_force: Vec<(String, f64)> = metrics
        .samples("keepalive_agent_idle_timeout_threshold_seconds")
        .iter()
        .map(|s| (s.label("threshold").unwrap_or("").to_owned(), s.value))
        .collect();
    in_force.sort_by(|a, b| a.0.cmp(&b.0));
    let given: Vec<(String, f64)> = thresholds
        .iter()
        .map(|(name, seconds)| ((*name).to_owned(), *seconds))
        .collect();
    assert_eq!(in_force, given);

    // The metrics describe the latest walk: closing the tuned sockets takes them out.
    drop(mix);
    wait_until(DEADLINE, "the closed sockets to leave the audit", || {
        let m = agent.scrape()?;
        Ok(m.value(
            "tcp_keepalive_sockets",
            &[("netns", netns.as_str()), ("keepalive", "on")],
        ) == 0.0
            && m.value(
                "tcp_keepalive_idle_seconds_count",
                &[("netns", netns.as_str())],
            ) == 0.0)
    })?;
    Ok(())
}

/// An application in its own process: `keepalive-client` connected from inside `ns` with the
/// given keepalive settings, holding its socket until dropped.
struct Application {
    child: std::process::Child,
    _stdin: std::process::ChildStdin,
    pid: u32,
    local_port: u16,
}

impl Application {
    fn spawn(ns: &Netns, server: std::net::SocketAddr, settings: [i32; 3]) -> anyhow::Result<Self> {
        use std::io::BufRead as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_keepalive-client"))
            .arg("-")
            .arg(format!("/run/netns/{}", ns.name()))
            .arg(server.to_string())
            .args(settings.map(|n| n.to_string()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("spawn keepalive-client")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = child.stdout.take().context("client stdout")?;
        let pid = child.id();
        let mut app = Application {
            child,
            _stdin: stdin,
            pid,
            local_port: 0,
        };
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let Ok(port) = line.trim().parse() else {
            let status = app.child.wait()?;
            bail!("keepalive-client printed {line:?} and exited with {status}");
        };
        app.local_port = port;
        Ok(app)
    }

    fn comm(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(format!("/proc/{}/comm", self.pid))?
            .trim_end()
            .to_owned())
    }

    /// A duplicate of the application's socket (`pidfd_getfd`), to ask the kernel what the
    /// application's own getsockopt would return.
    fn socket(&self) -> anyhow::Result<TcpStream> {
        use std::os::fd::FromRawFd as _;
        let fd = std::fs::read_dir(format!("/proc/{}/fd", self.pid))?
            .filter_map(Result::ok)
            .find(|entry| {
                std::fs::read_link(entry.path())
                    .is_ok_and(|target| target.to_string_lossy().starts_with("socket:["))
            })
            .and_then(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .context("the application holds no socket")?;
        // SAFETY: plain syscalls; each descriptor returned is new and owned below.
        unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, self.pid, 0) as i32;
            if pidfd < 0 {
                return Err(std::io::Error::last_os_error()).context("pidfd_open");
            }
            let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd);
            let dup = libc::syscall(
                libc::SYS_pidfd_getfd,
                std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                fd,
                0,
            ) as i32;
            if dup < 0 {
                return Err(std::io::Error::last_os_error()).context("pidfd_getfd");
            }
            Ok(TcpStream::from_raw_fd(dup))
        }
    }
}

impl Drop for Application {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fields of a `sockets --output json` row that must equal getsockopt.
fn assert_row_equals(row: &serde_json::Value, socket: &Effective, netns: u64) {
    let expected = serde_json::json!({
        "netns": netns,
        "state": state_name(socket.state),
        "keepalive": socket.keepalive,
        "idle_seconds": f64::from(socket.idle_s),
        "interval_seconds": f64::from(socket.interval_s),
        "probes": socket.probes,
        "user_timeout_ms": socket.user_timeout_ms,
        "worst_case_detection_seconds": socket.worst_case_detection_s(),
    });
    assert_fields_equal(row, &expected, socket);
}

/// Every field of `expected` (from getsockopt) equals the same field of the `sockets` row.
fn assert_fields_equal(
    row: &serde_json::Value,
    expected: &serde_json::Value,
    socket: &impl std::fmt::Debug,
) {
    for (field, want) in expected.as_object().expect("object") {
        let got = &row[field];
        // JSON numbers compare by value: 5400 and 5400.0 are the same setting.
        let same = match (got.as_f64(), want.as_f64()) {
            (Some(g), Some(w)) => g == w,
            _ => got == want,
        };
        assert!(
            same,
            "{field} of {socket:?}: sockets says {got}, getsockopt {want}"
        );
    }
}

/// The audit as the shipped DaemonSet runs it: `sockets` in a network, PID and mount namespace
/// of its own, the host's /proc mounted at /host/proc, exactly the manifest's capabilities (no
/// CAP_SYS_ADMIN, so no setns; no host PID, so no task walk sees the applications). It must
/// still list every application namespace's sockets as getsockopt reports them, and name the
/// processes holding them through the host's /proc.
#[test]
fn audit_in_the_daemonset_pod_sees_every_namespace_and_the_processes_holding_the_sockets()
-> anyhow::Result<()> {
    let test =
        "audit_in_the_daemonset_pod_sees_every_namespace_and_the_processes_holding_the_sockets";
    if !kernel_tests_enabled(test) {
        return Ok(());
    }
    if !agent_bin().is_file() {
        skip_or_fail(test, "the agent binary is not built");
        return Ok(());
    }
    if !Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        skip_or_fail(test, "`setpriv` (util-linux) is not available");
        return Ok(());
    }

    // Two application namespaces with different namespace defaults; in each, an application
    // process with its own keepalive settings and a server end held by this test.
    let mut apps = Vec::new();
    for (tag, netns_idle, settings) in [
        ("nopriv-a", 4000, [300, 30, 4]),
        ("nopriv-b", 5000, [45, 5, 7]),
    ] {
        let ns = Netns::new(tag)?;
        ns.sysctl("net.ipv4.tcp_keepalive_time", &netns_idle.to_string())?;
        let listener = ns.listen(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        let app = Application::spawn(&ns, listener.local_addr()?, settings)?;
        let (server, _) = listener.accept().context("accept")?;
        let client = Effective::read(
            &app.socket()?,
            Conn {
                local: server.peer_addr()?,
                remote: server.local_addr()?,
            },
        )?;
        ensure!(
            client.conn.local.port() == app.local_port,
            "{client:?} is not the application's"
        );
        ensure!(
            (client.idle_s, client.interval_s, client.probes)
                == (settings[0], settings[1], settings[2]),
            "{client:?}"
        );
        let served = Effective::read(
            &server,
            Conn {
                local: server.local_addr()?,
                remote: server.peer_addr()?,
            },
        )?;
        ensure!(served.idle_s == netns_idle, "{served:?}");
        apps.push((ns, listener, app, server, client, served));
    }

    // The agent in its pod: network, PID and mount namespaces of its own, the manifest's
    // capabilities, the host's /proc where the manifest mounts it.
    let (capabilities, _) = daemonset_container()?;
    let pod = ScratchDir::new("audit-pod")?;
    let host_proc = pod.0.join("host/proc");
    let out = Command::new("unshare")
        .arg("--net")
        .args(agent_in_pod(&pod.0, &capabilities))
        .args(["sockets", "--output", "json", "--proc.root"])
        .arg(&host_proc)
        .output()
        .context("running keepalive-agent sockets in the DaemonSet's pod shape")?;
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "sockets in the DaemonSet's pod shape failed ({}): {log}",
        out.status
    );
    assert!(!log.contains("Operation not permitted"), "{log}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing {}", String::from_utf8_lossy(&out.stdout)))?;

    let own = std::process::id();
    for (ns, _listener, app, _server, client, served) in &apps {
        let in_ns: Vec<&serde_json::Value> =
            rows.iter().filter(|r| r["netns"] == ns.inum()).collect();
        assert_eq!(in_ns.len(), 2, "netns {}: {in_ns:#?}", ns.inum());
        let row = find(&rows, &client.conn)
            .with_context(|| format!("{client:?} is missing from {rows:#?}"))?;
        assert_row_equals(row, client, ns.inum());
        assert_eq!(row["pid"], app.pid, "{row}");
        assert_eq!(row["comm"], app.comm()?, "{row}");
        let row = find(&rows, &served.conn)
            .with_context(|| format!("{served:?} is missing from {rows:#?}"))?;
        assert_row_equals(row, served, ns.inum());
        assert_eq!(row["pid"], own, "{row}");
    }
    Ok(())
}
