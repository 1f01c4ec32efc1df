//! The environment child processes run in, and small helpers to run them.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Names the nightly toolchain the agent's build.rs compiles the eBPF crate with.
pub(crate) const TOOLCHAIN_ENV: &str = "KEEPALIVE_BPF_TOOLCHAIN";

/// What every child process gets: a PATH that includes cargo's bin directory (where rustup and
/// `cargo install`ed tools such as bpf-linker live), and the workspace root to run in.
pub(crate) struct Env {
    pub root: PathBuf,
    pub cargo_bin: Option<PathBuf>,
    path: OsString,
}

impl Env {
    pub(crate) fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let cargo_bin = cargo_bin_dir();
        let current = env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
        if let Some(bin) = &cargo_bin
            && !dirs.iter().any(|dir| dir == bin)
        {
            dirs.insert(0, bin.clone());
        }
        let path = env::join_paths(dirs).context("PATH contains an invalid entry")?;
        Ok(Self {
            root,
            cargo_bin,
            path,
        })
    }

    /// The PATH children get.
    pub(crate) fn path(&self) -> &OsStr {
        &self.path
    }

    /// A command for `program` (looked up in our PATH), run in the workspace root.
    pub(crate) fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let program = program.as_ref();
        let resolved = self
            .which(program)
            .unwrap_or_else(|| PathBuf::from(program));
        let mut cmd = Command::new(resolved);
        cmd.env("PATH", &self.path).current_dir(&self.root);
        cmd
    }

    /// Where `program` is in our PATH, if anywhere.
    pub(crate) fn which(&self, program: &OsStr) -> Option<PathBuf> {
        if Path::new(program).components().count() > 1 {
            return Some(PathBuf::from(program));
        }
        env::split_paths(&self.path)
            .map(|dir| dir.join(program))
            .find(|candidate| is_executable(candidate))
    }

    /// The release binary of the agent.
    pub(crate) fn agent_bin(&self) -> PathBuf {
        self.root.join("target/release/keepalive-agent")
    }
}

/// `$CARGO_HOME/bin`, else `~/.cargo/bin`.
fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    env::home_dir().map(|home| home.join(".cargo/bin"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs with effective uid 0.
pub(crate) fn is_root() -> bool {
    // The `Uid:` line of /proc/self/status is "real effective saved filesystem".
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A shell-like rendering of `cmd` for messages.
pub(crate) fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        // PATH is always set; showing it would only add noise.
        if key != "PATH"
            && let Some(value) = value
        {
            parts.push(format!("{}={}", key.display(), value.display()));
        }
    }
    parts.push(cmd.get_program().display().to_string());
    parts.extend(cmd.get_args().map(|arg| arg.display().to_string()));
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio; fails unless it exits successfully.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout if it exits successfully; `None` if it cannot be
/// started or fails.
pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
