//! The guests' initramfs: busybox, the static agent, the static scenario program and an `/init`
//! script, as a gzip-compressed newc cpio archive written here (no staging directory, so device
//! nodes need no root).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::pipe_through;
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
# This kernel's IPVS modules (appended archive, see modules.rs), then IPVS as kube-proxy
# leaves it, before the agent starts: the ipvs_timeout scenario reads what the agent found.
for m in /{modules_dir}/*.ko; do
    insmod "$m" >>{ipvs_log} 2>&1 || echo "insmod $m failed" >>{ipvs_log}
done
{GUEST_PROGRAM} --ipvs-setup >>{ipvs_log} 2>&1
keepalive-agent check --load >/tmp/check.txt 2>&1
echo "KAT-CHECK-EXIT $?"
sed 's/^/KAT-CHECK /' /tmp/check.txt
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

pub(super) fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let out = pipe_through(Command::new("gzip").args(["-6", "-n", "-c"]), data, "gzip")?;
    ensure!(out.status.success(), "gzip failed ({})", out.status);
    Ok(out.stdout)
}

/// A cpio archive in the "new ASCII" (newc) format the kernel unpacks into its rootfs
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
#[derive(Default)]
pub(super) struct Newc {
    out: Vec<u8>,
    next_ino: u32,
}

impl Newc {
    pub(super) fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), b"");
    }

    pub(super) fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100_000 | perm, 1, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, 1, (major, minor), b"");
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let size = u32::try_from(data.len()).expect("initramfs members are below 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short names");
        // magic, then ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
        // rdevminor namesize check, 8 hex digits each.
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name_size,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), b"");
        self.out
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, process::Stdio};

    use super::*;

    /// GNU cpio reads back what we write: names, types, sizes and the device node.
    #[test]
    fn newc_archive_lists_with_gnu_cpio() {
        let mut archive = Newc::default();
        archive.dir("bin");
        archive.char_device("dev/console", 5, 1);
        archive.file("init", b"#!/bin/sh\n", 0o755);
        archive.file("bin/odd", b"12345", 0o644);
        let cpio = archive.finish();
        assert!(cpio.len().is_multiple_of(4));
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio runs: install cpio (`cargo xtask setup` does)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&cpio)
            .expect("write");
        let out = child.wait_with_output().expect("cpio");
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 4, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"));
        assert!(
            lines[1].starts_with("crw-------")
                && lines[1].contains("5,")
                && lines[1].ends_with(" dev/console")
        );
        assert!(lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"));
        assert!(
            lines[3].starts_with("-rw-r--r--")
                && lines[3].contains(" 5 ")
                && lines[3].ends_with(" bin/odd")
        );
        assert!(init_script().contains("exec guest-scenarios --agent 127.0.0.1:9879"));
    }
}
