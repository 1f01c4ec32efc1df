//! Builds the kernel programs (keepalive-ebpf) for the BPF target so the agent binary embeds
//! them. Needs the nightly toolchain with `rust-src` and `bpf-linker`; `cargo xtask build`
//! installs both and names the toolchain in KEEPALIVE_BPF_TOOLCHAIN.
//!
//! Also records the git revision the agent is built from (KEEPALIVE_GIT_REVISION, shown by the
//! landing page and `keepalive_agent_build_info`).
use std::process::Command;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=KEEPALIVE_BPF_TOOLCHAIN");
    // Parts the programs leave out for `cargo xtask ablate` (keepalive_ebpf::ablation): the
    // programs' build reads it from this script's environment.
    println!("cargo:rerun-if-env-changed=KEEPALIVE_EBPF_ABLATE");
    println!("cargo:rustc-env=KEEPALIVE_GIT_REVISION={}", git_revision());
    let toolchain =
        std::env::var("KEEPALIVE_BPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    let package = aya_build::Package {
        name: "keepalive-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../keepalive-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
}

/// The commit checked out. (No `-dirty` mark: cargo would not rerun this script when a source
/// file changes, so the mark would go stale.) A build from a
/// source tarball (no git, or no repository) gets KEEPALIVE_GIT_REVISION from its environment
/// when the packager sets it, else `unknown`: the revision is information, never a reason for
/// a build to fail.
fn git_revision() -> String {
    println!("cargo:rerun-if-env-changed=KEEPALIVE_GIT_REVISION");
    if let Ok(revision) = std::env::var("KEEPALIVE_GIT_REVISION")
        && !revision.trim().is_empty()
    {
        return revision.trim().to_owned();
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .map(|text| text.trim().to_owned())
    };
    let Some(revision) = git(&["rev-parse", "--short=12", "HEAD"]).filter(|r| !r.is_empty()) else {
        return "unknown".to_owned();
    };
    // A new commit or checkout moves HEAD or the branch it names; rebuild then. (In a worktree
    // HEAD lives in the worktree's git directory, the branch in the common one; --git-path
    // finds both.)
    for path in ["HEAD", "packed-refs"] {
        if let Some(file) = git(&["rev-parse", "--path-format=absolute", "--git-path", path]) {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(file) = git(&["rev-parse", "--path-format=absolute", "--git-path", &branch])
    {
        println!("cargo:rerun-if-changed={file}");
    }
    revision
}
