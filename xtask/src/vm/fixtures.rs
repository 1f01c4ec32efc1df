//! `cargo xtask vm --update-btf-fixtures`: every matrix kernel's BTF, and this machine's, stored
//! zstd-compressed under keepalive-agent/tests/btf/ with a README saying where each came from,
//! so BTF layout code is unit-tested against the kernels users run without booting them.

use std::{fmt::Write as _, process::Command};

use anyhow::{Context as _, Result, ensure};

use super::{btf, kernels::Kernel, pipe_through, write_atomically};
use crate::setup::Setup;

pub(super) const FIXTURE_DIR: &str = "keepalive-agent/tests/btf";
const HOST_BTF: &str = "/sys/kernel/btf/vmlinux";

pub(super) fn update(setup: &Setup, kernels: &[Kernel]) -> Result<()> {
    let dir = setup.env.root.join(FIXTURE_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut readme = String::from(
        "# Kernel BTF fixtures\n\n\
         Raw `.BTF` sections (what `/sys/kernel/btf/vmlinux` holds on that kernel), compressed \
         with `zstd -19`; decompress with `zstd -d` or the `zstd`/`ruzstd` crates. Regenerate \
         with `cargo xtask vm --update-btf-fixtures` (the Debian kernels are picked the way the \
         matrix picks them; the host entry is the machine that ran it).\n\n\
         | file | kernel | source | raw bytes | timers | hooks |\n|---|---|---|---|---|---|\n",
    );
    let mut entries: Vec<(String, String, String, Vec<u8>)> = kernels
        .iter()
        .map(|k| {
            (
                format!("{}_{}.btf.zst", k.upstream(), k.release),
                k.release.clone(),
                format!("Debian `{}` {}", k.package, k.version),
                k.btf.clone(),
            )
        })
        .collect();
    let host = std::fs::read(HOST_BTF).with_context(|| {
        format!("reading {HOST_BTF}: the host's BTF fixture needs a kernel with BTF")
    })?;
    let release = host_release()?;
    let host_upstream = release
        .split(['-', '+'])
        .next()
        .unwrap_or(&release)
        .to_owned();
    entries.push((
        format!("{host_upstream}_{release}.btf.zst"),
        release.clone(),
        "the development machine (`/sys/kernel/btf/vmlinux`)".to_owned(),
        host,
    ));
    for (file, release, source, raw) in &entries {
        let facts = btf::Facts::from_btf(raw)
            .with_context(|| format!("the BTF for {file} does not parse"))?;
        let compressed = zstd(raw)?;
        let path = dir.join(file);
        write_atomically(&path, &compressed)?;
        println!(
            "fixture: {} ({} KiB from {} KiB raw)",
            path.display(),
            compressed.len() / 1024,
            raw.len() / 1024
        );
        let _ = writeln!(
            readme,
            "| `{file}` | `{release}` | {source} | {} | {} | {} |",
            raw.len(),
            facts.timer_layout().trim_start_matches("BTF: "),
            facts.hooks()
        );
    }
    write_atomically(&dir.join("README.md"), readme.as_bytes())?;
    println!("fixtures listed in {}", dir.join("README.md").display());
    Ok(())
}

fn host_release() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?
        .trim()
        .to_owned())
}

fn zstd(data: &[u8]) -> Result<Vec<u8>> {
    let out = pipe_through(Command::new("zstd").args(["-19", "-q", "-c"]), data, "zstd")?;
    ensure!(out.status.success(), "zstd failed ({})", out.status);
    Ok(out.stdout)
}
