//! `cargo xtask image`: the container image (deploy/Containerfile, FROM scratch) with a static
//! musl build of the agent, for amd64 and arm64, and a manifest list holding both, built by
//! buildah without a container engine daemon.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    env::{self, AMD64, PLATFORMS, Platform},
    setup::Setup,
};

/// The tag of `platform`'s image. amd64 keeps the plain version tag, which
/// deploy/kubernetes/kustomization.yaml and tests/tests/deploy_image.rs refer to: a manifest
/// list under that name would make `buildah inspect --type image` and `buildah from` of it mean
/// something else, and both need a local image of this host's architecture.
pub(crate) fn image_name(platform: &Platform) -> String {
    let version = env!("CARGO_PKG_VERSION");
    if platform.oci_arch == AMD64.oci_arch {
        format!("localhost/keepalive-agent:{version}")
    } else {
        format!("localhost/keepalive-agent:{version}-{}", platform.oci_arch)
    }
}

/// The manifest list of every platform's image: what is pushed to a registry, under the plain
/// version tag there (deploy/README.md).
pub(crate) fn manifest_name() -> String {
    format!(
        "localhost/keepalive-agent:{}-multiarch",
        env!("CARGO_PKG_VERSION")
    )
}

/// Builds the static agent and its image for every platform, then the manifest list of them.
/// Returns the list's name.
pub(crate) fn build_image(setup: &Setup) -> Result<String> {
    let Some(buildah) = setup.env.which(std::ffi::OsStr::new("buildah")) else {
        bail!(
            "buildah not found: `cargo xtask setup` installs it as root (apt-get install -y \
             buildah)"
        );
    };
    let mut images = Vec::new();
    for platform in PLATFORMS {
        let bin = build_static_agent(setup, platform)?;
        ensure_static(&bin, platform)?;
        // The build context holds only the binary, so nothing else of the tree is sent.
        let context = setup
            .env
            .root
            .join("target/image-context")
            .join(platform.oci_arch);
        fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
        fs::copy(&bin, context.join("keepalive-agent"))
            .with_context(|| format!("copying {} into {}", bin.display(), context.display()))?;
        let tag = image_name(platform);
        // FROM scratch and COPY run nothing, so an arm64 image builds here without emulation;
        // --platform only sets the architecture its config declares.
        env::run(
            setup
                .command(&buildah)
                .args(["build", "--layers=false", "--platform"])
                .arg(format!("linux/{}", platform.oci_arch))
                .arg("-f")
                .arg(setup.env.root.join("deploy/Containerfile"))
                .args(["-t", &tag])
                .arg(&context),
        )
        .context(
            "buildah build failed: it needs a writable container storage (/var/lib/containers) \
             and, as non-root, subuid/subgid ranges",
        )?;
        images.push(tag);
    }

    let list = manifest_name();
    // `manifest create` refuses an existing name, and `manifest add` would keep the previous
    // build's entries beside the new ones: start from an empty list each time.
    if env::output(setup.command(&buildah).args(["manifest", "exists", &list])).is_some() {
        env::run(setup.command(&buildah).args(["manifest", "rm", &list]))
            .with_context(|| format!("removing the previous manifest list {list}"))?;
    }
    env::run(setup.command(&buildah).args(["manifest", "create", &list]))
        .with_context(|| format!("creating the manifest list {list}"))?;
    for image in &images {
        // containers-storage: names the local image; a bare name would be pulled from a registry.
        env::run(
            setup
                .command(&buildah)
                .args(["manifest", "add", &list])
                .arg(format!("containers-storage:{image}")),
        )
        .with_context(|| format!("adding {image} to the manifest list {list}"))?;
    }
    println!(
        "built: {} and the manifest list {list}\n  run it: buildah from {}, then buildah run \
         --isolation chroot <container> /keepalive-agent --version\n  push both architectures: \
         buildah manifest push --all {list} docker://REGISTRY/keepalive-agent:{}",
        images.join(", "),
        image_name(&AMD64),
        env!("CARGO_PKG_VERSION")
    );
    Ok(list)
}

pub(crate) fn build_static_agent(setup: &Setup, platform: &Platform) -> Result<PathBuf> {
    build_static(setup, "keepalive-agent", "keepalive-agent", platform)
}

/// Builds one binary of `package` for `platform`'s musl target (no dynamic loader: it runs in a
/// `FROM scratch` image or a bare initramfs) and returns its path.
pub(crate) fn build_static(
    setup: &Setup,
    package: &str,
    bin: &str,
    platform: &Platform,
) -> Result<PathBuf> {
    let target = platform.rust_target;
    env::run(
        platform
            .cross_env(&mut setup.command("cargo"))
            .args(["build", "--release", "-p", package, "--bin", bin])
            .args(["--target", target]),
    )
    .with_context(|| {
        format!(
            "building {bin} for {target} failed; is the target installed? (rustup target add \
             {target}, which `cargo xtask setup` does with the cross tools it needs)"
        )
    })?;
    let path = setup.env.release_dir(platform).join(bin);
    if !path.is_file() {
        bail!("the build succeeded but {} does not exist", path.display());
    }
    Ok(path)
}

/// A FROM scratch image has no dynamic loader: refuse a binary that asks for one (PT_INTERP),
/// or that is built for another machine than `platform`'s.
pub(crate) fn ensure_static(bin: &Path, platform: &Platform) -> Result<()> {
    let elf = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    match machine(&elf) {
        Ok(machine) if machine == platform.elf_machine => {}
        Ok(machine) => bail!(
            "{} is built for ELF machine {machine}, not {} ({}): build it with --target {}",
            bin.display(),
            platform.elf_machine,
            platform.oci_arch,
            platform.rust_target
        ),
        Err(why) => bail!("{} is not a 64-bit ELF executable: {why}", bin.display()),
    }
    match interpreter(&elf) {
        Ok(None) => Ok(()),
        Ok(Some(interp)) => bail!(
            "{} is dynamically linked (loader {interp}); the image has no libc. Build for \
             {}",
            bin.display(),
            platform.rust_target
        ),
        Err(why) => bail!("{} is not a 64-bit ELF executable: {why}", bin.display()),
    }
}

/// The `e_machine` of a little-endian ELF64 file.
fn machine(elf: &[u8]) -> Result<u16, &'static str> {
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err("no little-endian ELF64 header");
    }
    let bytes = elf.get(0x12..0x14).ok_or("truncated")?;
    Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
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

    #[test]
    fn machine_is_read_from_the_elf_header() {
        let this = fs::read(std::env::current_exe().expect("test binary")).expect("read");
        assert_eq!(machine(&this), Ok(AMD64.elf_machine));
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[0x12] = 183;
        assert_eq!(machine(&header), Ok(crate::env::ARM64.elf_machine));
        assert!(machine(b"\x7fELF\x02\x01").is_err());
    }
}
