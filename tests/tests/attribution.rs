//! Attribution: connections owned by a process inside a cgroup laid out like the kubelet's
//! (systemd driver) carry that cgroup's path, the pod UID, the container id and the process; and
//! `--aggregate-by netns,pod_uid` splits the aggregate counters per pod without losing their
//! per-namespace agreement with the kernel's own counters.
//!
//! The test creates real cgroup v2 directories (removed at the end) and a helper process
//! (`keepalive-client`) that joins one before creating its socket.

use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use keepalive_agent::system_cgroup2_mount;
use keepalive_tests::{
    DEADLINE, DROP_REASONS, Metrics, Netns, TcpExt, TestEnv, skip_or_fail, wait_until,
};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const KEEPALIVE: &str = "TCPKeepAlive";
const ABORT_ON_TIMEOUT: &str = "TCPAbortOnTimeout";
const PROBES: &str = "tcp_keepalive_probes_total";
const DROPS: &str = "tcp_connection_drops_total";
const CONN_PROBES: &str = "tcp_keepalive_connection_probes_total";
const CONN_UNANSWERED: &str = "tcp_keepalive_connection_unanswered_probes";
/// Keepalive of the helper's connection: probe after 1 s idle, every 1 s, give up after 3.
const KEEPALIVE_SETTINGS: [i32; 3] = [1, 1, 3];
const PROBES_PER_CONNECTION: u64 = 3;

/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h): what `stat -f -c %T` calls cgroup2fs.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

static COUNTER: AtomicU32 = AtomicU32::new(0);

type TestResult = anyhow::Result<()>;

/// The cgroup v2 mount, if it is one this test can create cgroups in.
fn cgroup2_root(test: &str) -> Option<PathBuf> {
    let Some(root) = system_cgroup2_mount() else {
        skip_or_fail(test, "no cgroup v2 mount in /proc/self/mounts");
        return None;
    };
    let c_path = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and fs is a live statfs.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut fs) };
    if rc != 0 || fs.f_type != CGROUP2_SUPER_MAGIC {
        skip_or_fail(
            test,
            &format!("{} is not a cgroup2 filesystem", root.display()),
        );
        return None;
    }
    Some(root)
}

/// Unique-enough hex for this test run (pod UIDs and container ids only need to differ between
/// concurrent tests).
fn run_hex(salt: u32) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:08x}{:08x}{nanos:032x}", std::process::id(), salt)
}

/// `kat-test-<pid>-<n>.slice/kubepods-<qos>-pod<uid with _>.slice/cri-containerd-<id>.scope`
/// under the cgroup v2 mount: the systemd driver's layout. Removed (leaf first) on drop.
#[derive(Debug)]
struct KubeCgroup {
    /// Top-down: the test slice, the pod slice, the container scope.
    dirs: Vec<PathBuf>,
    /// The container scope relative to the mount, as the agent reports it.
    relative: String,
    pod_uid: String,
    container_id: String,
}

impl KubeCgroup {
    fn create(root: &Path, qos: &str) -> anyhow::Result<KubeCgroup> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let hex = run_hex(n);
        let pod_uid = format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[36..48]
        );
        // Container ids are 64 hex digits; the agent rejects anything else.
        let container_id = format!("{hex}{}", &hex[..16]);
        let segments = [
            format!("kat-test-{}-{n}.slice", std::process::id()),
            format!("kubepods-{qos}-pod{}.slice", pod_uid.replace('-', "_")),
            format!("cri-containerd-{container_id}.scope"),
        ];
        let mut cgroup = KubeCgroup {
            dirs: Vec::new(),
            relative: String::new(),
            pod_uid,
            container_id,
        };
        let mut dir = root.to_path_buf();
        for segment in segments {
            dir.push(&segment);
            std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            cgroup.dirs.push(dir.clone());
            cgroup.relative.push('/');
            cgroup.relative.push_str(&segment);
        }
        Ok(cgroup)
    }

    fn container_dir(&self) -> &Path {
        self.dirs.last().expect("three directories")
    }
}

impl Drop for KubeCgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // A process killed a moment ago can take a few milliseconds to leave the cgroup.
            let removed = wait_until(Duration::from_secs(5), "cgroup removal", || {
                Ok(std::fs::remove_dir(dir).is_ok() || !dir.exists())
            });
            if let Err(e) = removed {
                eprintln!("warning: could not remove {}: {e:#}", dir.display());
            }
        }
    }
}

/// A running `keepalive-client`, killed on drop (before its cgroup is removed: declare it after
/// the [`KubeCgroup`]).
#[derive(Debug)]
struct Client {
    child: Child,
    /// Closing it tells the client to exit.
    _stdin: ChildStdin,
    pid: u32,
    local_port: u16,
}

impl Client {
    fn spawn(cgroup: &KubeCgroup, ns: &Netns, server: SocketAddr) -> anyhow::Result<Client> {
        let [idle, intvl, cnt] = KEEPALIVE_SETTINGS.map(|n| n.to_string());
        let mut child = Command::new(env!("CARGO_BIN_EXE_keepalive-client"))
            .arg(cgroup.container_dir())
            .arg(format!("/run/netns/{}", ns.name()))
            .args([server.to_string(), idle, intvl, cnt])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn keepalive-client")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = child.stdout.take().context("client stdout")?;
        let pid = child.id();
        let mut client = Client {
            child,
            _stdin: stdin,
            pid,
            local_port: 0,
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Ok(port) = line.trim().parse() else {
            let status = client.child.wait()?;
            bail!("keepalive-client printed {line:?} and exited with {status}");
        };
        client.local_port = port;
        Ok(client)
    }

    /// `/proc/PID/comm`: what the agent should report as `comm`.
    fn comm(&self) -> anyhow::Result<String> {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid))?;
        Ok(comm.trim_end().to_owned())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the namespace's kernel counter `key` has grown by at least `n` since `before`.
fn wait_kernel_delta(ns: &Netns, before: &TcpExt, key: &str, n: u64) -> TestResult {
    wait_until(DEADLINE, &format!("kernel {key} to grow by {n}"), || {
        Ok(ns.tcp_ext()?.delta(before, key) >= n)
    })
}

/// This process's cgroup v2 path (`0::/path` in /proc/self/cgroup).
fn own_cgroup() -> anyhow::Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .context("no cgroup v2 line in /proc/self/cgroup")
}

/// Polls the agent until `check` finds nothing wrong in one scrape; fails with the last problem.
/// `check` is also given the keepalive expiries the kernel ran none of the agent's programs for
/// since it started, counted afresh each time: how far a probe count may fall short (a CI run
/// saw a timed-out connection's series with 2 of its 3 probes). The count is read before the
/// scrape, so an agent still catching up widens it for one poll, never narrows it.
fn wait_for_agent(
    env: &TestEnv,
    what: &str,
    check: impl Fn(&Metrics, u64) -> Vec<String>,
) -> anyhow::Result<()> {
    let Some(agent) = env.agent() else {
        return Ok(());
    };
    let mut problems = Vec::new();
    let result = wait_until(DEADLINE, what, || {
        let not_run = env.expiries_not_run_since_start()?;
        let metrics = agent.scrape()?;
        problems = check(&metrics, not_run);
        if !problems.is_empty() {
            problems.push(format!("scrape:\n{}", metrics.raw()));
        }
        Ok(problems.is_empty())
    });
    result.with_context(|| format!("{}\nagent log:\n{}", problems.join("\n"), agent.log()))
}

/// What is wrong with a probe count `got` where the kernel sent `expected`: it may fall short by
/// up to `not_run` (expiries the kernel ran no program for), never exceed it.
fn probes_problem(got: f64, expected: u64, not_run: u64) -> Option<String> {
    let min = expected.saturating_sub(not_run) as f64;
    if (min..=expected as f64).contains(&got) {
        return None;
    }
    Some(if not_run == 0 {
        format!("{expected}, got {got}")
    } else {
        format!("{min}..={expected} ({not_run} keepalive expiries ran no program), got {got}")
    })
}

#[test]
fn connection_series_name_the_kubernetes_pod_container_and_process_that_owned_it() -> TestResult {
    let test = "connection_series_name_the_kubernetes_pod_container_and_process_that_owned_it";
    let Some(env) = TestEnv::start_with_agent_args(test, KEEPALIVE_OFF_DROPS) else {
        return Ok(());
    };
    connection_series_name_their_owner(test, &env)
}

/// The same, with the agent as the shipped DaemonSet runs it: its own network, PID and mount
/// namespaces, the host's /proc and cgroup tree mounted at /host, only the manifest's
/// capabilities and args. What the owner labels need must all be reachable from there.
#[test]
fn connection_series_name_their_owner_when_the_agent_runs_as_the_daemonset() -> TestResult {
    let test = "connection_series_name_their_owner_when_the_agent_runs_as_the_daemonset";
    let Some(env) = TestEnv::start_as_daemonset_with_args(test, KEEPALIVE_OFF_DROPS) else {
        return Ok(());
    };
    connection_series_name_their_owner(test, &env)
}

/// The server end has no SO_KEEPALIVE: its drop gets a series (whose owner labels these tests
/// check) only with this flag.
const KEEPALIVE_OFF_DROPS: &[&str] = &["--connections.keepalive-off-drops"];

fn connection_series_name_their_owner(test: &str, env: &TestEnv) -> TestResult {
    let Some(root) = cgroup2_root(test) else {
        return Ok(());
    };
    let ns = Netns::new("attr")?;
    let listener = ns.listen(V4)?;
    let server_addr = listener.local_addr()?;
    let cgroup = KubeCgroup::create(&root, "burstable")?;
    let before = ns.tcp_ext()?;
    let client = Client::spawn(&cgroup, &ns, server_addr)?;
    let (server, _) = listener.accept().context("accept")?;
    let server_local_port = server.local_addr()?.port();
    let comm = client.comm()?;
    // The server's replies vanish: the client's keepalive probes go unanswered and the kernel
    // aborts the connection (the client's RST still reaches the server).
    let _blackhole = ns.blackhole_replies_from_port(server_addr.port())?;

    wait_kernel_delta(&ns, &before, ABORT_ON_TIMEOUT, 1)?;
    let after = ns.tcp_ext()?;
    assert_eq!(after.delta(&before, KEEPALIVE), PROBES_PER_CONNECTION);
    assert_eq!(after.delta(&before, ABORT_ON_TIMEOUT), 1);

    let netns = ns.inum().to_string();
    let client_port = client.local_port.to_string();
    let pid = client.pid.to_string();
    let client_labels: Vec<(&str, &str)> = vec![
        ("netns", &netns),
        ("local_port", &client_port),
        ("reason", "keepalive_timeout"),
        ("cgroup", &cgroup.relative),
        ("pod_uid", &cgroup.pod_uid),
        ("container_id", &cgroup.container_id),
        ("pid", &pid),
        ("comm", &comm),
    ];
    let server_port = server_local_port.to_string();
    let server_cgroup = own_cgroup()?;
    // The accepting socket inherits the listener's cgroup: this test process's, not a pod.
    let server_labels: Vec<(&str, &str)> = vec![
        ("netns", &netns),
        ("local_port", &server_port),
        ("reason", "reset_received"),
        ("cgroup", &server_cgroup),
        ("pod_uid", ""),
        ("container_id", ""),
    ];
    wait_for_agent(
        env,
        "the client's connection series with its owner",
        |m, not_run| {
            let mut problems = Vec::new();
            // The drop is the close's record, which names the owner even when every expiry ran no
            // program: the series must exist.
            if m.matching(CONN_PROBES, &client_labels).is_empty() {
                problems.push(format!("{CONN_PROBES}{client_labels:?}: present, got none"));
            }
            for name in [CONN_PROBES, CONN_UNANSWERED] {
                let got = m.value(name, &client_labels);
                if let Some(problem) = probes_problem(got, PROBES_PER_CONNECTION, not_run) {
                    problems.push(format!("{name}{client_labels:?}: {problem}"));
                }
            }
            if m.matching(CONN_PROBES, &server_labels).is_empty() {
                problems.push(format!("{CONN_PROBES}{server_labels:?}: present, got none"));
            }
            problems
        },
    )?;
    drop(client);
    Ok(())
}

#[test]
fn aggregate_by_pod_uid_splits_counters_per_pod_and_per_netns_sums_match_the_kernel() -> TestResult
{
    let test = "aggregate_by_pod_uid_splits_counters_per_pod_and_per_netns_sums_match_the_kernel";
    let Some(env) = TestEnv::start_with_agent_args(test, &["--aggregate-by", "netns,pod_uid"])
    else {
        return Ok(());
    };
    let Some(root) = cgroup2_root(test) else {
        return Ok(());
    };
    let ns = Netns::new("attr-agg")?;
    let listener = ns.listen(V4)?;
    let server_addr = listener.local_addr()?;
    let pods = [
        KubeCgroup::create(&root, "burstable")?,
        KubeCgroup::create(&root, "besteffort")?,
    ];
    let before = ns.tcp_ext()?;
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for pod in &pods {
        clients.push(Client::spawn(pod, &ns, server_addr)?);
        servers.push(listener.accept().context("accept")?.0);
    }
    let _blackhole = ns.blackhole_replies_from_port(server_addr.port())?;

    wait_kernel_delta(&ns, &before, ABORT_ON_TIMEOUT, pods.len() as u64)?;
    let after = ns.tcp_ext()?;
    let kernel_probes = after.delta(&before, KEEPALIVE);
    let kernel_aborts = after.delta(&before, ABORT_ON_TIMEOUT);
    ensure!(
        kernel_probes == PROBES_PER_CONNECTION * pods.len() as u64 && kernel_aborts == 2,
        "kernel: {}",
        after.changes(&before)
    );

    let netns = ns.inum().to_string();
    wait_for_agent(&env, "per-pod aggregates", |m, not_run| {
        let mut problems = Vec::new();
        let mut present = |name: &str, labels: &[(&str, &str)]| {
            if m.matching(name, labels).is_empty() {
                problems.push(format!("{name}{labels:?}: present, got none"));
            }
        };
        // A pod's probe series may be absent only if every one of its expiries may have run no
        // program (nothing counted a probe for it); the suite's rule (`Expectations`).
        if not_run < PROBES_PER_CONNECTION {
            for pod in &pods {
                present(PROBES, &[("netns", &netns), ("pod_uid", &pod.pod_uid)]);
            }
        }
        let mut probes = |labels: &[(&str, &str)], expected: u64| {
            let got = m.value(PROBES, labels);
            if let Some(problem) = probes_problem(got, expected, not_run) {
                problems.push(format!("{PROBES}{labels:?}: {problem}"));
            }
        };
        for pod in &pods {
            probes(
                &[("netns", &netns), ("pod_uid", &pod.pod_uid)],
                PROBES_PER_CONNECTION,
            );
        }
        // Summed over pods, the namespace's probes are the kernel's.
        probes(&[("netns", &netns)], kernel_probes);
        let mut expect = |name: &str, labels: &[(&str, &str)], expected: f64| {
            if m.matching(name, labels).is_empty() {
                problems.push(format!("{name}{labels:?}: present, got none"));
            }
            let got = m.value(name, labels);
            if got != expected {
                problems.push(format!("{name}{labels:?}: {expected}, got {got}"));
            }
        };
        for pod in &pods {
            let pod_labels = [("netns", netns.as_str()), ("pod_uid", pod.pod_uid.as_str())];
            // Every reason of a newly seen pod starts at 0.
            for reason in DROP_REASONS {
                let expected = f64::from(u8::from(reason == "keepalive_timeout"));
                let mut labels = pod_labels.to_vec();
                labels.push(("reason", reason));
                expect(DROPS, &labels, expected);
            }
        }
        // The servers' sockets belong to no pod: the RSTs they received count under "".
        expect(
            DROPS,
            &[
                ("netns", netns.as_str()),
                ("pod_uid", ""),
                ("reason", "reset_received"),
            ],
            pods.len() as f64,
        );
        // Summed over pods, the namespace's drops are the kernel's.
        expect(
            DROPS,
            &[("netns", netns.as_str()), ("reason", "keepalive_timeout")],
            kernel_aborts as f64,
        );
        problems
    })?;
    drop(clients);
    Ok(())
}

#[test]
fn aggregate_by_pod_uid_splits_the_keepalive_audit_per_pod() -> TestResult {
    let test = "aggregate_by_pod_uid_splits_the_keepalive_audit_per_pod";
    let Some(env) = TestEnv::start_with_agent_args(
        test,
        &["--aggregate-by", "netns,pod_uid", "--audit.interval", "1s"],
    ) else {
        return Ok(());
    };
    let Some(root) = cgroup2_root(test) else {
        return Ok(());
    };
    let ns = Netns::new("attr-audit")?;
    let listener = ns.listen(V4)?;
    let server_addr = listener.local_addr()?;
    let pods = [
        KubeCgroup::create(&root, "burstable")?,
        KubeCgroup::create(&root, "besteffort")?,
    ];
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for pod in &pods {
        clients.push(Client::spawn(pod, &ns, server_addr)?);
        servers.push(listener.accept().context("accept")?.0);
    }
    // The clients' connections have keepalive on and live in their pods' cgroups; the accepted
    // server sockets have keepalive off and belong to the test, in no pod.
    let netns = ns.inum().to_string();
    wait_for_agent(&env, "per-pod audit", |m, _| {
        let mut problems = Vec::new();
        let mut expect = |labels: &[(&str, &str)], expected: f64| {
            let got = m.value("tcp_keepalive_sockets", labels);
            if got != expected || m.matching("tcp_keepalive_sockets", labels).is_empty() {
                problems.push(format!(
                    "tcp_keepalive_sockets{labels:?}: {expected}, got {got}"
                ));
            }
        };
        for pod in &pods {
            let on = [
                ("netns", netns.as_str()),
                ("pod_uid", pod.pod_uid.as_str()),
                ("keepalive", "on"),
            ];
            expect(&on, 1.0);
        }
        let servers_off = [
            ("netns", netns.as_str()),
            ("pod_uid", ""),
            ("keepalive", "off"),
        ];
        expect(&servers_off, pods.len() as f64);
        problems
    })?;
    drop(clients);
    Ok(())
}
