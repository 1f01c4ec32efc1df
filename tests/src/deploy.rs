//! Helpers for the deployment tests (tests/tests/deploy_*.rs): the shipped files under
//! `deploy/`, the tools that check them (promtool, kubectl, kubernetes-validate, buildah), and
//! a real Prometheus and Alertmanager on loopback ports.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

use crate::agent::{free_loopback_port, http_get, http_get_accept};
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

/// A server process (Prometheus, Alertmanager) on a loopback port, killed on drop. Like
/// [`crate::Agent`] it dies with the thread that started it (PR_SET_PDEATHSIG).
#[derive(Debug)]
pub struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Starts `program args...` (the args may contain `{addr}`, replaced by the chosen
    /// `127.0.0.1:PORT`) with its output in `dir/<name>.log`, and waits until `ready_path`
    /// answers 200.
    pub fn start(
        name: &'static str,
        program: &str,
        args: &[String],
        dir: &Path,
        ready_path: &str,
    ) -> anyhow::Result<Server> {
        let addr = free_loopback_port()?;
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("{}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args.iter().map(|a| a.replace("{addr}", &addr.to_string())))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
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
        };
        let ready = wait_until(DEADLINE, &format!("{name} to be ready"), || {
            if let Some(status) = server.child.try_wait()? {
                bail!("{name} exited with {status}:\n{}", server.log_text());
            }
            Ok(matches!(http_get(server.addr, ready_path), Ok((200, _))))
        });
        if let Err(e) = ready {
            return Err(e.context(format!("{name} log:\n{}", server.log_text())));
        }
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<{}: {e}>", self.log.display()))
    }

    /// GET `path` and parse the JSON body; fails unless it answers 200.
    pub fn get_json(&self, path: &str) -> anyhow::Result<Json> {
        let (code, body) = http_get_accept(self.addr, path, "application/json")?;
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
