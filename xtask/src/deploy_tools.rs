//! What the deployment checks and `cargo xtask image` need beyond Debian packages: the musl
//! Rust targets, `kubernetes-validate` from PyPI, and a `kubectl` for `kubectl kustomize`.
//! Called by `setup`; each prints `ok:` or `installing:` like the other checks.

use std::ffi::OsStr;

use anyhow::{Context as _, Result, bail};

use crate::env::{self, Env, PLATFORMS};

/// PyPI packages: the offline Kubernetes schema validator used by tests/tests/deploy_manifests.rs.
const PIP_PACKAGES: &[(&str, &str)] = &[("kubernetes-validate", "kubernetes-validate")];
/// Debian's kubectl (with `kubectl kustomize`), installed only when no kubectl is in PATH: a
/// kubectl from another source (e.g. a cloud SDK) would conflict with the package.
const KUBECTL_PACKAGE: &str = "kubernetes-client";

pub(crate) fn deploy_tools(env: &Env) -> Result<()> {
    musl_targets(env)?;
    pip_packages(env)?;
    kubectl(env)
}

/// Adds the musl target of every image platform to the active (stable) toolchain with rustup.
fn musl_targets(env: &Env) -> Result<()> {
    let installed = env::output(
        env.command("rustup")
            .args(["target", "list", "--installed"]),
    )
    .context("`rustup target list --installed` failed")?;
    for target in PLATFORMS.map(|platform| platform.rust_target) {
        if installed.lines().any(|line| line.trim() == target) {
            println!("ok: rust target {target} present");
            continue;
        }
        println!("installing: rust target {target} (for the static agent in the container image)");
        env::run(env.command("rustup").args(["target", "add", target]))
            .with_context(|| format!("`rustup target add {target}` failed"))?;
    }
    Ok(())
}

fn pip_packages(env: &Env) -> Result<()> {
    for (package, command) in PIP_PACKAGES {
        if env.which(OsStr::new(command)).is_some() {
            println!("ok: {package} present (PyPI)");
            continue;
        }
        let Some(python) = ["python3", "python"]
            .into_iter()
            .find(|python| env.which(OsStr::new(python)).is_some())
        else {
            bail!("python3 not found: install python3 and pip, then `pip install {package}`");
        };
        println!("installing: {package} (PyPI, {python} -m pip install)");
        env::run(
            env.command(python)
                .args(["-m", "pip", "install", "--quiet", package]),
        )
        .with_context(|| format!("`{python} -m pip install {package}` failed"))?;
        if env.which(OsStr::new(command)).is_none() {
            bail!(
                "`pip install {package}` succeeded but `{command}` is not in PATH: add pip's \
                 script directory (e.g. ~/.local/bin) to PATH"
            );
        }
    }
    Ok(())
}

fn kubectl(env: &Env) -> Result<()> {
    if let Some(path) = env.which(OsStr::new("kubectl")) {
        println!("ok: kubectl present ({})", path.display());
        return Ok(());
    }
    if !env::is_root() {
        bail!(
            "kubectl not found (needed for `kubectl kustomize`). Run as root:\n  apt-get install -y \
             {KUBECTL_PACKAGE}"
        );
    }
    println!("installing: {KUBECTL_PACKAGE} (kubectl, for `kubectl kustomize`)");
    env::run(
        env.command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", KUBECTL_PACKAGE]),
    )
    .context("apt-get install kubernetes-client failed")
}
