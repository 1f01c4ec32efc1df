//! The guests' initramfs: busybox, the static agent, the static scenario program and an `/init`
//! script, as a gzip-compressed newc cpio archive written here (no staging directory, so device
//! nodes need no root).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use super::cpio::{Newc, gzip};
use crate::{env::AMD64, image, setup::Setup};

/// Debian's busybox-static.
const BUSYBOX: &str = "/bin/busybox";
/// The scenario program's binary in the keepalive-tests crate.
const GUEST_PROGRAM: &str = "guest-scenarios";
/// What loading the IPVS modules and `guest-scenarios --ipvs-setup` said (the scenario's
/// `ipvs::SETUP_LOG`).
const IPVS_SETUP_LOG: &str = "/tmp/ipvs-setup.txt";
/// Where the agent listens inside the guest (its own loopback).
pub(super) const AGENT_ADDR: &str = "127.0.0.1:9879";

/// The guest's pid 1 until it execs the scenario program. Every line that the host reads starts
/// with `KAT-`; see tests/src/bin/guest-scenarios.rs for the rest of the format.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin KEEPALIVE_AGENT_BIN=/bin/keepalive-agent
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tracefs tracefs /sys/kernel/tracing
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
echo "KAT-UNAME $(uname -r)"
# Each step says so before it starts, so that a guest that hangs shows where (KAT-STEP).
# This kernel's IPVS modules (appended archive, see modules.rs), then IPVS as kube-proxy
# leaves it, before the agent starts: the ipvs_timeout scenario reads what the agent found.
for m in /{modules_dir}/*.ko; do
    echo "KAT-STEP insmod ${{m##*/}}"
    insmod "$m" >>{ipvs_log} 2>&1 || echo "insmod $m failed" >>{ipvs_log}
done
echo "KAT-STEP {GUEST_PROGRAM} --ipvs-setup"
{GUEST_PROGRAM} --ipvs-setup >>{ipvs_log} 2>&1
# Its lines as they come (a hang inside it leaves those before on the console).
echo "KAT-STEP keepalive-agent check --load"
(keepalive-agent check --load 2>&1; echo $? >/tmp/check-exit) | sed 's/^/KAT-CHECK /'
echo "KAT-CHECK-EXIT $(cat /tmp/check-exit)"
echo "KAT-STEP keepalive-agent run, {GUEST_PROGRAM}"
RUST_LOG=info keepalive-agent run --web.listen-address {AGENT_ADDR} --audit.interval 2s >/tmp/agent.log 2>&1 &
exec {GUEST_PROGRAM} --agent {AGENT_ADDR} --agent-log /tmp/agent.log --poweroff
"#,
        modules_dir = super::modules::GUEST_DIR,
        ipvs_log = IPVS_SETUP_LOG,
    )
}

/// Builds the static binaries and writes `<work>/initramfs.gz`.
pub(super) fn build(setup: &Setup, work: &Path) -> Result<PathBuf> {
    // The guests are x86_64 kernels under qemu-system-x86.
    let agent = image::build_static_agent(setup, &AMD64)?;
    image::ensure_static(&agent, &AMD64)?;
    let guest = image::build_static(setup, "keepalive-tests", GUEST_PROGRAM, &AMD64)?;
    image::ensure_static(&guest, &AMD64)?;
    let busybox = Path::new(BUSYBOX);
    if !busybox.is_file() {
        bail!("{BUSYBOX} not found: install busybox-static (`cargo xtask setup` does)");
    }
    image::ensure_static(busybox, &AMD64)
        .context("Debian's busybox package is dynamic: install busybox-static")?;

    let mut archive = Newc::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "etc", "root"] {
        archive.dir(dir);
    }
    // The kernel opens /dev/console for pid 1 before anything mounts devtmpfs.
    archive.char_device("dev/console", 5, 1);
    archive.file("init", init_script().as_bytes(), 0o755);
    for (name, path) in [
        ("bin/busybox", busybox),
        ("bin/keepalive-agent", agent.as_path()),
        (&format!("bin/{GUEST_PROGRAM}")[..], guest.as_path()),
    ] {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        archive.file(name, &bytes, 0o755);
    }
    let cpio = archive.finish();
    let gz = gzip(&cpio)?;
    let out = work.join("initramfs.gz");
    std::fs::write(&out, &gz).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "initramfs: {} ({} KiB; busybox, keepalive-agent, {GUEST_PROGRAM}, /init)",
        out.display(),
        gz.len() / 1024
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_script_starts_the_scenarios_against_the_agent() {
        assert!(init_script().contains("exec guest-scenarios --agent 127.0.0.1:9879"));
    }
}
