//! Reading a Debian package's files without installing it.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result};

/// `dpkg-deb --fsys-tarfile deb`, started: the package's files as a tar stream on its stdout.
pub(super) fn fsys_tarfile(deb: &Path) -> Result<Child> {
    Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting dpkg-deb --fsys-tarfile")
}
