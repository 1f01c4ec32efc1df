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
/// Parts the kernel programs leave out (`keepalive_ebpf::ablation`): set by `cargo xtask
/// ablate` for its one build, removed from every other command.
pub(crate) const ABLATE_ENV: &str = "KEEPALIVE_EBPF_ABLATE";

/// A platform the static agent and its image are built for.
pub(crate) struct Platform {
    /// The Rust target: musl, so the binary needs no loader (`FROM scratch`, a bare initramfs).
    pub rust_target: &'static str,
    /// The OCI architecture (`buildah build --platform linux/<arch>`, the manifest list).
    pub oci_arch: &'static str,
    /// The ELF `e_machine` its binaries must carry (EM_X86_64, EM_AARCH64).
    pub elf_machine: u16,
    /// Debian's cross tools, for a platform that is not the build host.
    cross: Option<CrossTools>,
}

/// Debian's GNU cross toolchain and qemu-user. Debian packages no aarch64 musl gcc, and none is
/// needed: rustc's musl targets link their own crt objects and libc (self-contained), so gcc only
/// drives the link and compiles ring's C code, which takes nothing from libc headers but
/// `<stdint.h>`, `<stddef.h>` and `<string.h>` (the same ABI in glibc and musl).
struct CrossTools {
    gcc: &'static str,
    ar: &'static str,
    /// Runs the target's binaries on this host: `cargo test` goes through it.
    runner: &'static str,
}

/// The host platform of the images, the kernel matrix's guests and this development machine.
pub(crate) const AMD64: Platform = Platform {
    rust_target: "x86_64-unknown-linux-musl",
    oci_arch: "amd64",
    elf_machine: 62,
    // cc-rs finds Debian's musl-tools wrapper (x86_64-linux-musl-gcc) by the target's name.
    cross: None,
};

/// arm64 nodes: built on this x86_64 host with Debian's cross gcc, tested under qemu-user.
pub(crate) const ARM64: Platform = Platform {
    rust_target: "aarch64-unknown-linux-musl",
    oci_arch: "arm64",
    elf_machine: 183,
    cross: Some(CrossTools {
        gcc: "aarch64-linux-gnu-gcc",
        ar: "aarch64-linux-gnu-ar",
        runner: "qemu-aarch64-static",
    }),
};

/// Every platform the image's manifest list holds, the build host's first.
pub(crate) const PLATFORMS: [&Platform; 2] = [&AMD64, &ARM64];

impl Platform {
    /// Points cargo (and the cc crate in build scripts) at this platform's cross tools, for
    /// this command only: a global cargo config would change every other build on the machine.
    pub(crate) fn cross_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        if let Some(cross) = &self.cross {
            cmd.envs(self.cross_vars(cross));
        }
        cmd
    }

    fn cross_vars(&self, cross: &CrossTools) -> [(String, &'static str); 4] {
        let cargo_key = self.rust_target.to_uppercase().replace('-', "_");
        let cc_key = self.rust_target.replace('-', "_");
        [
            (format!("CARGO_TARGET_{cargo_key}_LINKER"), cross.gcc),
            (format!("CARGO_TARGET_{cargo_key}_RUNNER"), cross.runner),
            (format!("CC_{cc_key}"), cross.gcc),
            (format!("AR_{cc_key}"), cross.ar),
        ]
    }

    /// The qemu-user program that runs this platform's binaries here, if it is not the host's.
    pub(crate) fn runner(&self) -> Option<&'static str> {
        self.cross.as_ref().map(|cross| cross.runner)
    }
}

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

    /// Where cargo puts release binaries built for `platform`.
    pub(crate) fn release_dir(&self, platform: &Platform) -> PathBuf {
        self.root
            .join("target")
            .join(platform.rust_target)
            .join("release")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_variables_are_the_names_cargo_and_cc_read() {
        let mut cmd = Command::new("cargo");
        ARM64.cross_env(&mut cmd);
        let vars: Vec<(String, String)> = cmd
            .get_envs()
            .map(|(key, value)| {
                (
                    key.display().to_string(),
                    value.unwrap_or_default().display().to_string(),
                )
            })
            .collect();
        for expected in [
            (
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER",
                "aarch64-linux-gnu-gcc",
            ),
            (
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER",
                "qemu-aarch64-static",
            ),
            ("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc"),
            ("AR_aarch64_unknown_linux_musl", "aarch64-linux-gnu-ar"),
        ] {
            assert!(
                vars.iter()
                    .any(|(key, value)| (key.as_str(), value.as_str()) == expected),
                "{expected:?} not in {vars:?}"
            );
        }
        let mut cmd = Command::new("cargo");
        AMD64.cross_env(&mut cmd);
        assert_eq!(cmd.get_envs().count(), 0);
    }
}
