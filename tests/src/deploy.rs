//! Helpers for the deployment tests (tests/tests/deploy_*.rs): the shipped files under
//! `deploy/`, the tools that check them (promtool, kubectl, kubernetes-validate, buildah), and
//! a real Prometheus and Alertmanager on loopback ports.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

use crate::agent::{agent_bin, free_loopback_port, http_get_accept};
use crate::netns::run_in_netns;
use crate::{DEADLINE, skip_or_fail, wait_until};

static SCRATCH_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate sits inside the workspace")
        .to_path_buf()
}

/// `<root>/deploy/<relative>`.
pub fn deploy_path(relative: &str) -> PathBuf {
    repo_root().join("deploy").join(relative)
}

/// Whether `program` runs with `arg`; otherwise skips the test (fails under
/// `KEEPALIVE_REQUIRE_KERNEL=1`) naming what installs it.
pub fn tool_available(test: &str, program: &str, arg: &str, installed_by: &str) -> bool {
    let runs = Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    runs || skip_or_fail(
        test,
        &format!("`{program}` is not available (installed by `cargo xtask setup`: {installed_by})"),
    )
}

/// Runs `program args...` and returns (exit success, stdout + stderr).
pub fn run_tool(
    program: &str,
    args: &[&str],
    dir: Option<&Path>,
) -> anyhow::Result<(bool, String)> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Every YAML document of a multi-document text.
pub fn yaml_documents(text: &str) -> anyhow::Result<Vec<Yaml>> {
    let mut documents = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let document: Yaml = serde_yaml_ng::from_str(&current)
                .with_context(|| format!("parsing YAML document:\n{current}"))?;
            if !document.is_null() {
                documents.push(document);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    Ok(documents)
}

/// Reads and parses one YAML file.
pub fn read_yaml(path: &Path) -> anyhow::Result<Yaml> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> anyhow::Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!(
            "keepalive-{tag}-{}-{}",
            std::process::id(),
            SCRATCH_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// The shipped DaemonSet's container: its `add` capabilities as setpriv names them (`bpf`,
/// ...) and its args.
pub fn daemonset_container() -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let ds = read_yaml(&deploy_path("kubernetes/daemonset.yaml"))?;
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let strings = |value: &serde_yaml_ng::Value, lower: bool| -> Vec<String> {
        value
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .map(|v| {
                if lower {
                    v.to_lowercase()
                } else {
                    v.to_owned()
                }
            })
            .collect()
    };
    Ok((
        strings(&container["securityContext"]["capabilities"]["add"], true),
        strings(&container["args"], false),
    ))
}

/// `unshare` arguments that run the agent as the DaemonSet does: in its own PID and mount
/// namespaces (the caller puts it in its own network namespace), with the container's args, the
/// host paths the manifest mounts under /host (/host/proc, /host/sys/fs/cgroup) bind-mounted
/// below `root`, a /proc of its own like a container's, as uid 0 with exactly `capabilities`
/// (effective, inheritable, ambient and bounding sets), listening on `{addr}`.
pub fn agent_as_in_daemonset(root: &Path, capabilities: &[String], args: &[String]) -> Vec<String> {
    let host = root.join("host");
    let mut command = agent_in_pod(root, capabilities);
    for arg in args {
        if arg.starts_with("--web.listen-address") {
            continue;
        }
        command.push(arg.replace("/host/", &format!("{}/", host.display())));
    }
    command.push("--web.listen-address={addr}".into());
    command
}

/// A `setpriv` capability list of exactly `capabilities` (`-all,+bpf,...`).
pub fn setpriv_capabilities(capabilities: &[String]) -> String {
    format!(
        "-all{}",
        capabilities
            .iter()
            .map(|c| format!(",+{c}"))
            .collect::<String>()
    )
}

/// `unshare` arguments up to the agent binary, for any command run as in the DaemonSet's pod
/// (see [`agent_as_in_daemonset`]); the host's /proc is at `root/host/proc` inside.
pub fn agent_in_pod(root: &Path, capabilities: &[String]) -> Vec<String> {
    let set = setpriv_capabilities(capabilities);
    let host = root.join("host");
    // Where this host mounts cgroup v2 (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid
    // hosts): what the DaemonSet's /host/sys/fs/cgroup is on a cgroup v2 node.
    let cgroup2 = keepalive_agent::system_cgroup2_mount()
        .unwrap_or_else(|| "/sys/fs/cgroup".into())
        .to_string_lossy()
        .into_owned();
    vec![
        "--mount".to_owned(),
        "--propagation".into(),
        "private".into(),
        "--pid".into(),
        "--fork".into(),
        "--kill-child".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        // Mount first (needs root): the host's /proc (still the one mounted here) below /host,
        // then a /proc of the new PID namespace over /proc, as a container runtime does; then
        // drop to the capability set and exec the agent.
        "mkdir -p \"$1/proc\" \"$1/sys/fs/cgroup\" && mount --rbind /proc \"$1/proc\" && \
         mount --bind \"$2\" \"$1/sys/fs/cgroup\" && mount -t proc proc /proc && shift 2 && \
         exec \"$@\""
            .into(),
        "sh".into(),
        host.to_string_lossy().into_owned(),
        cgroup2,
        "setpriv".into(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
        "--reuid=0".into(),
        "--regid=0".into(),
        "--clear-groups".into(),
        agent_bin().to_string_lossy().into_owned(),
    ]
}

/// A server process (Prometheus, Alertmanager) on a loopback port, killed on drop. Like
/// [`crate::Agent`] it dies with the thread that started it (PR_SET_PDEATHSIG).
#[derive(Debug)]
pub struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    /// The network namespace it listens in (the agent's pod), when not this process's.
    netns: Option<RawFd>,
}

impl Server {
    /// Starts `program args...` (the args may contain `{addr}`, replaced by the chosen
    /// `127.0.0.1:PORT`) with its output in `dir/<name>.log`, and waits until `ready_path`
    /// answers 200. With `netns` (an fd the caller keeps open for the server's life) it runs
    /// and listens inside that network namespace: beside the agent in its pod.
    pub fn start_in(
        netns: Option<RawFd>,
        name: &'static str,
        program: &str,
        args: &[String],
        dir: &Path,
        ready_path: &str,
    ) -> anyhow::Result<Server> {
        let addr = in_netns(netns, free_loopback_port)?;
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("{}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args.iter().map(|a| a.replace("{addr}", &addr.to_string())))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl and setns are async-signal-safe; nothing else runs between fork and
        // exec. The namespace fd is open in the child until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("spawn {program}"))?;
        let mut server = Server {
            name,
            child,
            addr,
            log,
            netns,
        };
        let ready = wait_until(DEADLINE, &format!("{name} to be ready"), || {
            if let Some(status) = server.child.try_wait()? {
                bail!("{name} exited with {status}:\n{}", server.log_text());
            }
            Ok(matches!(server.get(ready_path, "text/plain"), Ok((200, _))))
        });
        if let Err(e) = ready {
            return Err(e.context(format!("{name} log:\n{}", server.log_text())));
        }
        Ok(server)
    }

    /// GET `path` from inside the server's namespace.
    fn get(&self, path: &str, accept: &str) -> anyhow::Result<(u16, String)> {
        let addr = self.addr;
        in_netns(self.netns, || http_get_accept(addr, path, accept))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<{}: {e}>", self.log.display()))
    }

    /// GET `path` and parse the JSON body; fails unless it answers 200.
    pub fn get_json(&self, path: &str) -> anyhow::Result<Json> {
        let (code, body) = self.get(path, "application/json")?;
        ensure!(
            code == 200,
            "{} GET {path} answered {code}: {body}",
            self.name
        );
        serde_json::from_str(&body)
            .with_context(|| format!("{} GET {path}: not JSON: {body}", self.name))
    }

    /// Prometheus `/api/v1/query?query=<expr>`: the result vector.
    pub fn query(&self, expr: &str) -> anyhow::Result<Vec<Json>> {
        let answer = self.get_json(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        ensure!(answer["status"] == "success", "query {expr}: {answer}");
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "{} log ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Runs `f` here, or inside the network namespace `netns`.
fn in_netns<R: Send>(
    netns: Option<RawFd>,
    f: impl FnOnce() -> anyhow::Result<R> + Send,
) -> anyhow::Result<R> {
    match netns {
        Some(fd) => run_in_netns(fd, f)?,
        None => f(),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The label `key` of a Prometheus/Alertmanager JSON object holding `labels` (or `metric`).
pub fn json_label<'a>(object: &'a Json, key: &str) -> Option<&'a str> {
    object
        .get("labels")
        .or_else(|| object.get("metric"))
        .and_then(|labels| labels.get(key))
        .and_then(Json::as_str)
}

/// Polls every 200 ms until `f` returns `Some`, failing with `what` and the last state after
/// `deadline`.
pub fn poll<T>(
    deadline: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    let start = std::time::Instant::now();
    loop {
        let last = match f()? {
            Ok(value) => return Ok(value),
            Err(last) => last,
        };
        if start.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
