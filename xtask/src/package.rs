//! `cargo xtask package`: a Debian package of the static (musl) agent for plain VMs, built with
//! `dpkg-deb --build` from a tree laid out here: no packaging tool beyond dpkg, which every
//! Debian machine has, and the same bytes from the same binary (`SOURCE_DATE_EPOCH` is the
//! commit's time, owners are root, dpkg-deb sorts the entries).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    env,
    image::{build_static_agent, ensure_static},
    setup::Setup,
};

const PACKAGE: &str = "keepalive-agent";
/// Who answers for the package; change it when you publish your own build.
const MAINTAINER: &str = "keepalive-agent developers <dev@keepalive-agent.invalid>";
/// The flags file the unit reads; a conffile, so dpkg keeps the operator's edits on upgrade.
const DEFAULTS: &str = "etc/default/keepalive-agent";

/// Where the package is written: `target/package/keepalive-agent_<version>_amd64.deb`. The
/// tests (tests/tests/deploy_package.rs) look for it there.
pub(crate) fn deb_path(root: &Path) -> PathBuf {
    root.join("target/package")
        .join(format!("{PACKAGE}_{}_amd64.deb", debian_version()))
}

/// Cargo's version as Debian orders it: a pre-release (`1.0.0-rc.1`) sorts before its release
/// only with `~`, and a `-` would start a Debian revision.
fn debian_version() -> String {
    debian_version_of(env!("CARGO_PKG_VERSION"))
}

fn debian_version_of(cargo_version: &str) -> String {
    cargo_version.replace('-', "~")
}

/// Builds the static agent and the package around it; returns the package's path.
pub(crate) fn build_package(setup: &Setup) -> Result<PathBuf> {
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "the package is amd64 (the static agent is built for x86_64-unknown-linux-musl); \
             build it on an x86_64 machine"
        );
    }
    let bin = build_static_agent(setup, &env::AMD64)?;
    ensure_static(&bin, &env::AMD64)?;
    let root = &setup.env.root;
    let work = root.join("target/package");
    let tree = work.join("tree");
    let docs = work.join("docs");
    for dir in [&tree, &docs] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }

    // Man pages and completions come from the clap definitions compiled into this binary.
    env::run(setup.command(&bin).arg("generate-docs").arg(&docs))
        .context("the agent could not write its man pages and completions")?;

    let installed = tree.join("usr/bin/keepalive-agent");
    install(&bin, &installed, 0o755)?;
    // Debian ships binaries without debug information (policy 10.1): half the size here. The
    // image keeps the unstripped build.
    env::run(setup.command("strip").arg(&installed))
        .context("strip failed (Debian package binutils, which `cargo xtask setup` installs)")?;
    let deploy = root.join("deploy");
    install(
        &deploy.join("systemd/keepalive-agent.service"),
        &tree.join("lib/systemd/system/keepalive-agent.service"),
        0o644,
    )?;
    install(
        &deploy.join("systemd/keepalive-agent.default"),
        &tree.join(DEFAULTS),
        0o644,
    )?;
    let completions = docs.join("completions");
    for (file, to) in [
        ("keepalive-agent", "usr/share/bash-completion/completions"),
        ("_keepalive-agent", "usr/share/zsh/vendor-completions"),
        (
            "keepalive-agent.fish",
            "usr/share/fish/vendor_completions.d",
        ),
    ] {
        install(&completions.join(file), &tree.join(to).join(file), 0o644)?;
    }
    let man1 = tree.join("usr/share/man/man1");
    let mut pages: Vec<PathBuf> = fs::read_dir(docs.join("man"))
        .context("reading the generated man pages")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .context("reading the generated man pages")?;
    pages.sort();
    if pages.is_empty() {
        bail!("the agent wrote no man page into {}", docs.display());
    }
    for page in &pages {
        gzip(setup, page, &man1)?;
    }
    install(
        &deploy.join("debian/copyright"),
        &tree.join("usr/share/doc/keepalive-agent/copyright"),
        0o644,
    )?;

    let control = tree.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &deploy.join("debian").join(script),
            &control.join(script),
            0o755,
        )?;
    }
    write(&control.join("conffiles"), &format!("/{DEFAULTS}\n"))?;
    write(&control.join("md5sums"), &md5sums(setup, &tree)?)?;
    write(
        &control.join("control"),
        &control_file(installed_size_kib(&tree)?),
    )?;

    let deb = deb_path(root);
    let mut build = setup.command("dpkg-deb");
    build
        .args(["--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&deb);
    if std::env::var_os("SOURCE_DATE_EPOCH").is_none()
        && let Some(epoch) = env::output(setup.command("git").args(["log", "-1", "--format=%ct"]))
    {
        build.env("SOURCE_DATE_EPOCH", epoch.trim());
    }
    env::run(&mut build).context("dpkg-deb --build failed (dpkg-deb comes with dpkg)")?;
    println!(
        "built: {}\n  install: apt install {}\n  then: edit /{DEFAULTS}, systemctl enable --now \
         keepalive-agent (deploy/README.md, \"Plain VMs\")",
        deb.display(),
        deb.display()
    );
    Ok(deb)
}

fn control_file(installed_size_kib: u64) -> String {
    // No Depends: the binary is static, and systemd is how it is started, not what it needs.
    format!(
        "Package: {PACKAGE}\n\
         Version: {}\n\
         Architecture: amd64\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_size_kib}\n\
         Section: net\n\
         Priority: optional\n\
         Description: per-connection TCP keepalive metrics from eBPF, for Prometheus\n \
         Follows every TCP connection on the host, in every network namespace, from BTF\n \
         tracepoints: how many keepalive probes the kernel sent, whether they were answered,\n \
         and which connections the kernel dropped and why (keepalive timeout, retransmission\n \
         timeout, reset). Serves the figures as Prometheus metrics; `keepalive-agent check`\n \
         says whether this kernel can run it. Needs Linux 5.8+ with BTF.\n",
        debian_version()
    )
}

/// Copies `from` to `to` (creating its directories) with `mode`, whatever the checkout's umask.
fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", to.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// `gzip -9n`: no name or time stamp in the header, so the page compresses to the same bytes
/// every time (Debian policy 12.1 wants man pages compressed).
fn gzip(setup: &Setup, page: &Path, into: &Path) -> Result<()> {
    let name = page
        .file_name()
        .context("a generated man page has no file name")?;
    let mut target = name.to_owned();
    target.push(".gz");
    let out = into.join(target);
    fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    let file = fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    let status = setup
        .command("gzip")
        .args(["-9n", "--stdout"])
        .arg(page)
        .stdout(Stdio::from(file))
        .status()
        .context("running gzip (Debian package gzip, which `cargo xtask setup` installs)")?;
    if !status.success() {
        bail!("gzip -9n {} failed ({status})", page.display());
    }
    fs::set_permissions(&out, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", out.display()))
}

/// Every regular file below `tree` except DEBIAN/, relative to it, sorted.
fn payload_files(tree: &Path) -> Result<Vec<PathBuf>> {
    fn walk(tree: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry
                .with_context(|| format!("reading {}", dir.display()))?
                .path();
            if path.is_dir() {
                if path != tree.join("DEBIAN") {
                    walk(tree, &path, files)?;
                }
            } else {
                files.push(path.strip_prefix(tree).unwrap_or(&path).to_path_buf());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(tree, tree, &mut files)?;
    files.sort();
    Ok(files)
}

/// DEBIAN/md5sums, which `dpkg --verify` (debsums) checks the installed files against.
fn md5sums(setup: &Setup, tree: &Path) -> Result<String> {
    let files = payload_files(tree)?;
    let sums = env::output(setup.command("md5sum").current_dir(tree).args(&files))
        .context("md5sum failed (coreutils)")?;
    if sums.lines().count() != files.len() {
        bail!(
            "md5sum listed {} files of {}",
            sums.lines().count(),
            files.len()
        );
    }
    Ok(sums)
}

/// Installed-Size: what dpkg-gencontrol would say, KiB per file rounded up.
fn installed_size_kib(tree: &Path) -> Result<u64> {
    let mut total = 0;
    for file in payload_files(tree)? {
        let path = tree.join(&file);
        let size = fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        total += size.div_ceil(1024);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_file_is_one_paragraph_with_a_continued_description() {
        let control = control_file(4242);
        assert!(
            control.ends_with('\n') && !control.contains("\n\n"),
            "{control}"
        );
        let mut fields = Vec::new();
        for line in control.lines() {
            if let Some(continued) = line.strip_prefix(' ') {
                assert!(
                    !continued.trim().is_empty(),
                    "empty continuation: {control}"
                );
            } else {
                let (field, value) = line.split_once(": ").expect("field: value");
                assert!(!value.trim().is_empty(), "{field} is empty");
                fields.push(field);
            }
        }
        for required in [
            "Package",
            "Version",
            "Architecture",
            "Maintainer",
            "Description",
        ] {
            assert!(fields.contains(&required), "{required} missing: {control}");
        }
        assert!(control.contains("Installed-Size: 4242\n"));
        assert!(
            !control.contains("Depends"),
            "a static binary depends on nothing"
        );
    }

    #[test]
    fn pre_releases_sort_before_their_release() {
        assert_eq!(debian_version_of("1.0.0-rc.1"), "1.0.0~rc.1");
        assert_eq!(debian_version_of("0.1.0"), "0.1.0");
        assert!(deb_path(Path::new("/r")).ends_with(format!(
            "target/package/keepalive-agent_{}_amd64.deb",
            debian_version()
        )));
    }
}
