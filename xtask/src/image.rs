//! `cargo xtask image`: the container image (deploy/Containerfile, FROM scratch) with a static
//! musl build of the agent, built by buildah without a container engine daemon.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::{deploy_tools::MUSL_TARGET, env, setup::Setup};

/// The tag the image gets; deploy/kubernetes/kustomization.yaml refers to it.
pub(crate) fn image_name() -> String {
    format!("localhost/keepalive-agent:{}", env!("CARGO_PKG_VERSION"))
}

/// Builds the static agent, checks it is static, and builds the image from it. Returns the tag.
pub(crate) fn build_image(setup: &Setup) -> Result<String> {
    let bin = build_static_agent(setup)?;
    ensure_static(&bin)?;
    let Some(buildah) = setup.env.which(std::ffi::OsStr::new("buildah")) else {
        bail!(
            "buildah not found: `cargo xtask setup` installs it as root (apt-get install -y \
             buildah); the static agent is at {}",
            bin.display()
        );
    };
    // The build context holds only the binary, so nothing else of the tree is sent.
    let context = setup.env.root.join("target/image-context");
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    fs::copy(&bin, context.join("keepalive-agent"))
        .with_context(|| format!("copying {} into {}", bin.display(), context.display()))?;
    let tag = image_name();
    env::run(
        setup
            .command(buildah)
            .args(["build", "--layers=false", "-f"])
            .arg(setup.env.root.join("deploy/Containerfile"))
            .args(["-t", &tag])
            .arg(&context),
    )
    .context(
        "buildah build failed: it needs a writable container storage (/var/lib/containers) \
         and, as non-root, subuid/subgid ranges",
    )?;
    println!(
        "built: {tag}\n  run it: buildah from {tag}, then buildah run --isolation chroot <container> \
         /keepalive-agent --version\n  export it: buildah push {tag} \
         docker-archive:keepalive-agent.tar"
    );
    Ok(tag)
}

pub(crate) fn build_static_agent(setup: &Setup) -> Result<PathBuf> {
    build_static(setup, "keepalive-agent", "keepalive-agent")
}

/// Builds one binary of `package` for the musl target (no dynamic loader: it runs in a
/// `FROM scratch` image or a bare initramfs) and returns its path.
pub(crate) fn build_static(setup: &Setup, package: &str, bin: &str) -> Result<PathBuf> {
    env::run(setup.command("cargo").args([
        "build",
        "--release",
        "-p",
        package,
        "--bin",
        bin,
        "--target",
        MUSL_TARGET,
    ]))
    .with_context(|| {
        format!(
            "building {bin} for {MUSL_TARGET} failed; is the target installed? (rustup target \
             add {MUSL_TARGET}, which `cargo xtask setup` does)"
        )
    })?;
    let path = setup
        .env
        .root
        .join("target")
        .join(MUSL_TARGET)
        .join("release")
        .join(bin);
    if !path.is_file() {
        bail!("the build succeeded but {} does not exist", path.display());
    }
    Ok(path)
}

/// A FROM scratch image has no dynamic loader: refuse a binary that asks for one (PT_INTERP).
pub(crate) fn ensure_static(bin: &Path) -> Result<()> {
    let elf = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    match interpreter(&elf) {
        Ok(None) => Ok(()),
        Ok(Some(interp)) => bail!(
            "{} is dynamically linked (loader {interp}); the image has no libc. Build for \
             {MUSL_TARGET}",
            bin.display()
        ),
        Err(why) => bail!("{} is not a 64-bit ELF executable: {why}", bin.display()),
    }
}

/// The PT_INTERP path of a little-endian ELF64 file, if it has one.
fn interpreter(elf: &[u8]) -> Result<Option<String>, &'static str> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| -> Result<u16, &'static str> {
        Ok(u16::from_le_bytes(
            elf.get(at..at + 2)
                .ok_or("truncated")?
                .try_into()
                .map_err(|_| "truncated")?,
        ))
    };
    let u32_at = |at: usize| -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(
            elf.get(at..at + 4)
                .ok_or("truncated")?
                .try_into()
                .map_err(|_| "truncated")?,
        ))
    };
    let u64_at = |at: usize| -> Result<usize, &'static str> {
        let value = u64::from_le_bytes(
            elf.get(at..at + 8)
                .ok_or("truncated")?
                .try_into()
                .map_err(|_| "truncated")?,
        );
        usize::try_from(value).map_err(|_| "offset out of range")
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err("no little-endian ELF64 header");
    }
    // e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38; p_offset at +8, p_filesz at +32.
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, usize::from(u16_at(0x36)?), u16_at(0x38)?);
    for index in 0..usize::from(phnum) {
        let header = phoff + index * phentsize;
        if u32_at(header)? == PT_INTERP {
            let (offset, size) = (u64_at(header + 8)?, u64_at(header + 32)?);
            let path = elf.get(offset..offset + size).ok_or("truncated")?;
            return Ok(Some(
                String::from_utf8_lossy(path)
                    .trim_end_matches('\0')
                    .to_owned(),
            ));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_executables_name_their_loader_and_static_ones_none() {
        let this = fs::read(std::env::current_exe().expect("test binary")).expect("read");
        // cargo test builds for the host (glibc): dynamically linked.
        let loader = interpreter(&this).expect("ELF").expect("has a loader");
        assert!(loader.contains("ld-linux"), "{loader}");
        assert!(interpreter(b"#!/bin/sh\n").is_err());
        // A header with no program headers at all, as far as PT_INTERP goes a static binary.
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[0x20] = 64;
        header[0x36] = 56;
        assert_eq!(interpreter(&header), Ok(None));
    }
}
