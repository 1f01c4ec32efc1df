//! Running the agent binary and reading its HTTP endpoints.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use aya::maps::{Map, MapData, PerCpuArray};
use keepalive_agent::sweep_metric;
use keepalive_ebpf::{NetnsCounterSlot, NetnsCounters, NetnsKey, TimerContext, names};

use crate::deploy::{ScratchDir, agent_as_in_daemonset, daemonset_container};
use crate::expect::Expectations;
use crate::metrics::Metrics;
use crate::netns::{Netns, run_in_netns};
use crate::{DEADLINE, wait_until};

static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The ids `key` (`prog_id:`, `map_id:`) gives in the fdinfo of `pid`'s descriptors: the BPF
/// programs or maps it holds.
fn bpf_ids_of(pid: u32, key: &str) -> anyhow::Result<HashSet<u32>> {
    let mut ids = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let fd = fd?;
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
        let Ok(info) = std::fs::read_to_string(&fdinfo) else {
            continue; // closed meanwhile
        };
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|id| id.trim().parse().ok())
        {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// Ids of the BPF programs `pid` holds a descriptor of.
pub fn programs_of(pid: u32) -> anyhow::Result<HashSet<u32>> {
    bpf_ids_of(pid, "prog_id:")
}

/// The names of the BPF programs `pid` holds a descriptor of (truncated by the kernel to 15
/// bytes).
pub fn program_names_of(pid: u32) -> anyhow::Result<Vec<String>> {
    let ids = programs_of(pid)?;
    Ok(aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .collect())
}

/// Runs `keepalive-agent sockets ARGS` and returns what it printed; fails with its stderr when
/// it exits non-zero.
pub fn run_sockets(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(agent_bin())
        .arg("sockets")
        .args(args)
        .output()
        .context("running keepalive-agent sockets")?;
    ensure!(
        out.status.success(),
        "keepalive-agent sockets {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).context("sockets output is not UTF-8")
}

/// [`run_sockets`] with `--output json`: its rows.
pub fn sockets_json(args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let text = run_sockets(&all)?;
    match serde_json::from_str(&text).with_context(|| format!("parsing {text}"))? {
        serde_json::Value::Array(rows) => Ok(rows),
        other => bail!("expected a JSON array, got {other}"),
    }
}

/// Where the agent binary is: `$KEEPALIVE_AGENT_BIN`, else `<target dir>/release/keepalive-agent`
/// (`$CARGO_TARGET_DIR` or the workspace's `target/`).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEPALIVE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("tests crate sits inside the workspace")
                .join("target")
        });
    target.join("release").join("keepalive-agent")
}

/// The web server of an agent, whoever started it: an [`Agent`] of a host test, or the `/init`
/// of a `cargo xtask vm` guest.
#[derive(Debug, Clone, Copy)]
pub struct AgentEndpoint {
    addr: SocketAddr,
    /// The agent's own network namespace (its pod), whose loopback `addr` is on; an fd kept open
    /// by the [`Agent`] that owns the namespace.
    netns: Option<RawFd>,
}

/// [`AgentEndpoint::poll_until`] gave up: what still differed, and the last scrape.
#[derive(Debug)]
pub struct NeverMatched {
    pub problem: String,
    pub last: Option<Metrics>,
}

impl AgentEndpoint {
    pub fn new(addr: SocketAddr) -> AgentEndpoint {
        AgentEndpoint { addr, netns: None }
    }

    /// The network namespace the agent listens in, when it is not this process's (a pod).
    pub fn netns(&self) -> Option<RawFd> {
        self.netns
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// GET `path`: (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let addr = self.addr;
        match self.netns {
            Some(fd) => run_in_netns(fd, || http_get(addr, path))?,
            None => http_get(addr, path),
        }
    }

    /// Scrapes and parses `/metrics`.
    pub fn scrape(&self) -> anyhow::Result<Metrics> {
        let (code, body) = self.get("/metrics")?;
        ensure!(code == 200, "/metrics answered {code}: {body}");
        Metrics::parse(&body)
    }

    /// Polls `/readyz` every 100 ms until it answers 200; `alive` is asked first each round and
    /// ends the wait with its error (e.g. the agent process exited).
    pub fn wait_ready(
        &self,
        deadline: Duration,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < deadline {
            alive()?;
            match self.get("/readyz") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("/readyz answered {code}: {}", body.trim()),
                Err(e) => last = format!("/readyz: {e:#}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("not ready after {deadline:?} (last: {last})")
    }

    /// Polls `/metrics` every 200 ms until every expectation holds in one scrape. The agent
    /// drains its ring buffer asynchronously, so a single scrape right after the kernel acted
    /// may be behind; only the deadline decides that it is wrong.
    pub fn poll_until(
        &self,
        expected: &Expectations,
        deadline: Duration,
    ) -> Result<Metrics, NeverMatched> {
        let start = Instant::now();
        let mut last = None;
        let mut problem;
        loop {
            match self.scrape() {
                Ok(m) => {
                    let mismatches = expected.mismatches(&m);
                    if mismatches.is_empty() {
                        return Ok(m);
                    }
                    problem = format!(
                        "mismatches (metric: expected, got):\n  {}\n\
                         agent series for netns {}:\n{}\n\
                         agent's own counters:\n{}",
                        mismatches.join("\n  "),
                        expected.netns(),
                        m.aggregate_lines_with_label("netns", &expected.netns().to_string()),
                        m.self_lines()
                    );
                    last = Some(m);
                }
                Err(e) => problem = format!("scrape failed: {e:#}"),
            }
            if start.elapsed() >= deadline {
                return Err(NeverMatched { problem, last });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A running `keepalive-agent run`, killed on drop.
///
/// The child gets PR_SET_PDEATHSIG=SIGKILL, which fires when the *thread* that spawned it exits:
/// create and drop an `Agent` on the same (test) thread.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    endpoint: AgentEndpoint,
    /// As a DaemonSet pod: its network namespace and the directory its /host mounts live under.
    pod: Option<(Netns, ScratchDir)>,
    log_path: PathBuf,
    /// Keep the log file after drop (set when a check fails).
    keep_log: AtomicBool,
}

impl Agent {
    /// Starts the agent on a free loopback port and waits (up to 30 s) for `/readyz` to answer 200.
    pub fn start() -> anyhow::Result<Agent> {
        Self::start_with_args(&[])
    }

    /// [`Agent::start`] with extra `run` flags (e.g. `["--audit.interval", "1s"]`).
    pub fn start_with_args(extra_args: &[&str]) -> anyhow::Result<Agent> {
        let addr = free_loopback_port()?;
        let mut cmd = Command::new(agent_bin());
        cmd.args(["run", "--web.listen-address", &addr.to_string()])
            .args(extra_args);
        Self::spawn(cmd, AgentEndpoint::new(addr), None)
    }

    /// The agent as the shipped DaemonSet runs it (deploy/kubernetes/daemonset.yaml): in a
    /// network namespace of its own (its pod's), its own PID and mount namespaces, the host's
    /// /proc and cgroup tree mounted where the manifest mounts them, exactly the container's
    /// capabilities and args (plus `extra_args`). Requests to it go through its namespace.
    pub fn start_as_daemonset(extra_args: &[&str]) -> anyhow::Result<Agent> {
        let (capabilities, args) = daemonset_container()?;
        let pod = Netns::new("pod")?;
        let scratch = ScratchDir::new("pod")?;
        // The pod's namespace is new and private: the manifest's port is free there.
        let addr: SocketAddr = "127.0.0.1:9879".parse()?;
        let mut cmd = Command::new("unshare");
        cmd.args(
            agent_as_in_daemonset(&scratch.0, &capabilities, &args)
                .into_iter()
                .map(|a| a.replace("{addr}", &addr.to_string())),
        )
        .args(extra_args);
        Self::spawn_in(cmd, pod, scratch, addr, None)
    }

    /// The agent (with `extra_args`) alone in a network namespace of its own, listening on that
    /// namespace's loopback, with RLIMIT_NOFILE (soft and hard) set to `max_fds`: hostile
    /// clients can flood its port from inside the namespace without touching the host's.
    pub fn start_in_own_netns(extra_args: &[&str], max_fds: u64) -> anyhow::Result<Agent> {
        let pod = Netns::new("web")?;
        let scratch = ScratchDir::new("web")?;
        let addr: SocketAddr = "127.0.0.1:9879".parse()?;
        let mut cmd = Command::new(agent_bin());
        cmd.args(["run", "--web.listen-address", &addr.to_string()])
            .args(extra_args);
        Self::spawn_in(cmd, pod, scratch, addr, Some(max_fds))
    }

    /// Spawns `cmd` inside `pod`'s network namespace (with RLIMIT_NOFILE set to `max_fds` when
    /// given); requests to `addr` go through that namespace.
    fn spawn_in(
        mut cmd: Command,
        pod: Netns,
        scratch: ScratchDir,
        addr: SocketAddr,
        max_fds: Option<u64>,
    ) -> anyhow::Result<Agent> {
        let fd = pod.fd();
        // SAFETY: setns and setrlimit are async-signal-safe; the namespace fd is open in the
        // child until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(max_fds) = max_fds {
                    let limit = libc::rlimit {
                        rlim_cur: max_fds,
                        rlim_max: max_fds,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let endpoint = AgentEndpoint {
            addr,
            netns: Some(fd),
        };
        Self::spawn(cmd, endpoint, Some((pod, scratch)))
    }

    /// Starts `cmd`, a `run` command the caller built (an installed agent under `setpriv`, say)
    /// listening on `addr`, and waits for `/readyz` as [`Agent::start`] does.
    pub fn start_command(cmd: Command, addr: SocketAddr) -> anyhow::Result<Agent> {
        Self::spawn(cmd, AgentEndpoint::new(addr), None)
    }

    /// [`Agent::start_with_args`] for an agent whose port plain HTTP cannot probe (TLS, basic
    /// auth): ready once `ready(addr)` returns true.
    pub fn start_with_args_ready_when(
        extra_args: &[&str],
        ready: &mut dyn FnMut(SocketAddr) -> bool,
    ) -> anyhow::Result<Agent> {
        let addr = free_loopback_port()?;
        let mut cmd = Command::new(agent_bin());
        cmd.args(["run", "--web.listen-address", &addr.to_string()])
            .args(extra_args);
        Self::spawn_ready_when(cmd, AgentEndpoint::new(addr), None, Some(ready))
    }

    fn spawn(
        cmd: Command,
        endpoint: AgentEndpoint,
        pod: Option<(Netns, ScratchDir)>,
    ) -> anyhow::Result<Agent> {
        Self::spawn_ready_when(cmd, endpoint, pod, None)
    }

    fn spawn_ready_when(
        mut cmd: Command,
        endpoint: AgentEndpoint,
        pod: Option<(Netns, ScratchDir)>,
        ready: Option<&mut dyn FnMut(SocketAddr) -> bool>,
    ) -> anyhow::Result<Agent> {
        let bin = agent_bin();
        ensure!(
            bin.is_file(),
            "agent binary {} not found (build it, or set KEEPALIVE_AGENT_BIN)",
            bin.display()
        );
        let log_path = std::env::temp_dir().join(format!(
            "keepalive-agent-test-{}-{}.log",
            std::process::id(),
            LOG_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let log = File::create(&log_path).with_context(|| format!("{}", log_path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // RUST_LOG overrides --log.level: a test that sets the flag gets exactly that level.
        let sets_log_level = cmd
            .get_args()
            .any(|arg| arg.to_string_lossy().starts_with("--log.level"));
        if sets_log_level {
            cmd.env_remove("RUST_LOG");
        } else if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {:?}", cmd.get_program()))?;
        let mut agent = Agent {
            child,
            endpoint,
            pod,
            log_path,
            keep_log: AtomicBool::new(false),
        };
        let became_ready = match ready {
            None => agent.wait_ready(),
            Some(ready) => {
                let addr = agent.addr();
                let child = &mut agent.child;
                wait_until(DEADLINE, "the agent to be ready", || {
                    if let Some(status) = child.try_wait()? {
                        bail!("agent exited with {status} before it was ready");
                    }
                    Ok(ready(addr))
                })
            }
        };
        if let Err(e) = became_ready {
            agent.keep_log.store(true, Ordering::Relaxed);
            return Err(e.context(format!(
                "agent did not become ready; its log ({}):\n{}",
                agent.log_path.display(),
                agent.log()
            )));
        }
        Ok(agent)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let Agent {
            child, endpoint, ..
        } = self;
        endpoint.wait_ready(DEADLINE, || match child.try_wait()? {
            Some(status) => bail!("agent exited with {status} before it was ready"),
            None => Ok(()),
        })
    }

    /// The network namespace of the agent's pod (`None` when it runs on the host's).
    pub fn pod_netns(&self) -> Option<&Netns> {
        self.pod.as_ref().map(|(ns, _)| ns)
    }

    /// The agent's process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's BPF map named `name`, among the maps its descriptors hold.
    pub fn bpf_map(&self, name: &str) -> anyhow::Result<MapData> {
        let pid = self.pid();
        for id in bpf_ids_of(pid, "map_id:")? {
            let map = MapData::from_id(id).with_context(|| format!("opening BPF map {id}"))?;
            if map.info()?.name_as_str() == Some(name) {
                return Ok(map);
            }
        }
        bail!("the agent (pid {pid}) holds no map named {name}")
    }

    /// The timer programs' per-CPU context ([`TimerContext`]): each CPU's memory of each
    /// namespace's keepalive counter.
    pub fn timer_context(&self) -> anyhow::Result<PerCpuArray<MapData, TimerContext>> {
        PerCpuArray::try_from(Map::PerCpuArray(self.bpf_map(names::TIMER_CONTEXT_MAP)?))
            .context("TIMER_CONTEXT is not the per-CPU array the tests expect")
    }

    /// The namespaces' counter slots ([`keepalive_ebpf::NetnsCounterSlot`]) the agent placed.
    pub fn counter_slots(&self) -> anyhow::Result<aya::maps::Array<MapData, NetnsCounterSlot>> {
        aya::maps::Array::try_from(Map::Array(self.bpf_map(names::NETNS_SLOTS_MAP)?))
            .context("NETNS_SLOTS is not the array the tests expect")
    }

    /// Each namespace's cookie by its inode, from the agent's exact counters' keys.
    pub fn netns_cookies(&self) -> anyhow::Result<HashMap<u32, u64>> {
        let counters: aya::maps::HashMap<_, NetnsKey, NetnsCounters> =
            aya::maps::HashMap::try_from(Map::HashMap(self.bpf_map(names::NETNS_COUNTERS_MAP)?))
                .context("NETNS_COUNTERS is not the hash map the tests expect")?;
        counters
            .keys()
            .map(|key| Ok(key.map(|key| (key.inum, key.cookie))?))
            .collect()
    }

    /// `http://addr` of the agent's web server.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr()
    }

    /// The agent's web server.
    pub fn endpoint(&self) -> AgentEndpoint {
        self.endpoint
    }

    /// GET `path` from the agent: (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.endpoint.get(path)
    }

    /// Scrapes and parses `/metrics`.
    pub fn scrape(&self) -> anyhow::Result<Metrics> {
        self.endpoint.scrape()
    }

    /// Waits until the agent's counter sweep has completed two more rounds (the first may have
    /// begun before the caller's last probe), so that its namespace totals hold every probe
    /// sent so far, unless a CPU was busy in a timer program at both (it then waits for a
    /// later round); polled, up to [`DEADLINE`]. An agent without the sweep (a baseline binary
    /// in the bench) has no such metric: one second then, as before the sweep existed.
    pub fn settle_counters(&self) -> anyhow::Result<()> {
        let none: &[(&str, &str)] = &[];
        let first = self.scrape()?;
        if first.samples(sweep_metric::ROUNDS).is_empty() {
            std::thread::sleep(Duration::from_secs(1));
            return Ok(());
        }
        let start = first.value(sweep_metric::ROUNDS, none);
        let deadline = Instant::now() + DEADLINE;
        while self.scrape()?.value(sweep_metric::ROUNDS, none) < start + 2.0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent's counter sweep did not run twice within {DEADLINE:?} \
                 ({} stayed at {start})",
                sweep_metric::ROUNDS
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Sends `signal` and waits (up to [`DEADLINE`]) for the agent to exit: its exit status.
    pub fn signal_and_wait(
        &mut self,
        signal: libc::c_int,
    ) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        self.wait_exit()
            .with_context(|| format!("after signal {signal}"))
    }

    /// Waits (up to [`DEADLINE`]) for the process to exit by itself (a wrapper such as strace
    /// whose agent the caller signalled): its exit status.
    pub fn wait_exit(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                start.elapsed() < DEADLINE,
                "the process did not exit within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's stdout+stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The log lines that explain most failures: warnings, errors, namespaces replaced on a
    /// reused inode, loss. The per-connection info lines of a big test would bury them.
    fn log_notable(&self, lines: usize) -> String {
        let log = self.log();
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("level=warn")
                    || l.contains("level=error")
                    || l.contains("new namespace")
                    || l.contains("lost")
            })
            .collect();
        let skipped = notable.len().saturating_sub(lines);
        let mut text = notable[skipped..].join("\n");
        if skipped > 0 {
            text = format!("({skipped} earlier ones left out)\n{text}");
        }
        text
    }

    /// [`wait_until`] for something the agent should come to show: on timeout its log is kept
    /// and the error carries the log's notable lines and its end, as [`Self::wait_for`]'s.
    pub fn wait_until(
        &self,
        deadline: Duration,
        what: &str,
        f: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        wait_until(deadline, what, f).map_err(|err| {
            self.keep_log.store(true, Ordering::Relaxed);
            err.context(format!(
                "agent log, warnings and namespace changes:\n{}\n\
                 agent log (last 10 lines, full log {}):\n{}",
                self.log_notable(15),
                self.log_path.display(),
                self.log_tail(10)
            ))
        })
    }

    /// Polls `/metrics` until every expectation holds in one scrape (deadline 30 s). On timeout
    /// the error lists what differed, the namespace's aggregate series, the agent's own
    /// counters, the notable lines of its log and its end. Kept short: CI shows the head and
    /// the tail of a failure.
    pub fn wait_for(&self, what: &str, expected: &Expectations) -> anyhow::Result<Metrics> {
        self.endpoint
            .poll_until(expected, DEADLINE)
            .or_else(|never| {
                self.keep_log.store(true, Ordering::Relaxed);
                bail!(
                    "agent metrics never matched for {what} within {DEADLINE:?}.\n{}\n\
                     agent log, warnings and namespace changes:\n{}\n\
                     agent log (last 10 lines, full log {}):\n{}",
                    never.problem,
                    self.log_notable(15),
                    self.log_path.display(),
                    self.log_tail(10)
                )
            })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking()
            || self.keep_log.load(Ordering::Relaxed)
            || std::env::var_os("KEEPALIVE_KEEP_LOGS").is_some()
        {
            eprintln!("agent log kept at {}", self.log_path.display());
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// A process's resident memory (`VmRSS` in `/proc/PID/status`), in KiB.
pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// A loopback address whose port was free a moment ago.
pub fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Minimal blocking HTTP/1.1 GET (Connection: close), handling Content-Length, chunked and
/// read-to-EOF bodies. Returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_accept(addr, path, "text/plain")
}

/// [`http_get`] with an `Accept` header of the caller's choice.
pub fn http_get_accept(
    addr: SocketAddr,
    path: &str,
    accept: &str,
) -> anyhow::Result<(u16, String)> {
    let response = http_request(addr, path, &[("Accept", accept)])?;
    Ok((response.status, response.body))
}

/// What [`http_request`] read back.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// The `Content-Type` header, if the server sent one.
    pub content_type: Option<String>,
    pub body: String,
}

/// A GET with exactly the `headers` given besides `Host` and `Connection: close` (none means
/// no `Accept` at all, as `curl` and `promtool` scrape).
pub fn http_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<HttpResponse> {
    let timeout = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("{addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("read GET {path}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().context("empty response")?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    let mut content_type = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "content-type" {
                content_type = Some(v.to_owned());
            }
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        ensure!(body.len() >= n, "body has {} of {n} bytes", body.len());
        body[..n].to_vec()
    } else {
        body.to_vec()
    };
    Ok(HttpResponse {
        status,
        content_type,
        body: String::from_utf8(body).context("body is not UTF-8")?,
    })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk header")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(data.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        let body = b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\n";
        assert_eq!(dechunk(body).expect("dechunk"), b"abcdefg");
    }

    #[test]
    fn http_get_reads_content_length_and_chunked_bodies() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            for reply in [
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            ] {
                let (mut s, _) = listener.accept().expect("accept");
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).expect("read request");
                    assert!(n > 0, "request ended early");
                    request.extend_from_slice(&buf[..n]);
                }
                s.write_all(reply.as_bytes()).expect("reply");
            }
        });
        assert_eq!(
            http_get(addr, "/readyz").expect("get"),
            (503, "not ready".to_owned())
        );
        assert_eq!(
            http_get(addr, "/readyz").expect("get"),
            (200, "ok".to_owned())
        );
        server.join().expect("server thread");
    }
}
