//! The newc cpio archives the guests boot from (the initramfs, and the IPVS modules appended to
//! it), written in memory, gzip-compressed by gzip(1).

use std::process::Command;

use anyhow::{Result, ensure};

use super::pipe_through;

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

    pub(super) fn char_device(&mut self, name: &str, major: u32, minor: u32) {
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
    }
}
