//! The container images `cargo xtask image` builds (deploy/Containerfile, FROM scratch): the amd64
//! one runs the agent, the arm64 one holds a static aarch64 agent that runs under qemu-user, and
//! the manifest list names both. `cargo xtask test` builds them before the tests; run by hand,
//! build them first with `cargo xtask image`.
//!
//! The image is run with `buildah run --isolation chroot`: on this class of host `podman run`
//! (crun) refuses to start any container ("cgroups in hybrid mode not supported", and setting
//! RLIMIT_NOFILE/NPROC is not permitted), while chroot isolation needs neither.

use std::path::Path;

use anyhow::{Context as _, ensure};
use keepalive_tests::deploy::{ScratchDir, run_tool, tool_available};
use keepalive_tests::{agent_bin, skip_or_fail};

type TestResult = anyhow::Result<()>;

/// The tag `cargo xtask image` gives the amd64 image (xtask/src/image.rs).
fn image() -> String {
    format!("localhost/keepalive-agent:{}", env!("CARGO_PKG_VERSION"))
}

/// The arm64 image's tag and the manifest list's (xtask/src/image.rs).
fn arm64_image() -> String {
    format!("{}-arm64", image())
}

fn manifest_list() -> String {
    format!("{}-multiarch", image())
}

/// EM_AARCH64: what an arm64 node's kernel executes.
const EM_AARCH64: u16 = 183;

/// `e_machine` of a little-endian ELF64 file, and whether it asks for a dynamic loader
/// (PT_INTERP); a static-pie binary is ET_DYN, so only the program headers tell.
fn elf_machine_and_interpreter(elf: &[u8]) -> anyhow::Result<(u16, bool)> {
    const PT_INTERP: u32 = 3;
    ensure!(
        elf.get(..6) == Some(b"\x7fELF\x02\x01".as_slice()),
        "not a little-endian ELF64 file"
    );
    let bytes = |at: usize, len: usize| elf.get(at..at + len).context("truncated ELF");
    let u16_at = |at| -> anyhow::Result<u16> { Ok(u16::from_le_bytes(bytes(at, 2)?.try_into()?)) };
    let machine = u16_at(0x12)?;
    let phoff = usize::try_from(u64::from_le_bytes(bytes(0x20, 8)?.try_into()?))?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    let mut interpreter = false;
    for index in 0..phnum {
        let p_type = u32::from_le_bytes(bytes(phoff + index * phentsize, 4)?.try_into()?);
        interpreter |= p_type == PT_INTERP;
    }
    Ok((machine, interpreter))
}

#[test]
fn image_runs_the_static_agent_and_reports_its_version() -> TestResult {
    let test = "image_runs_the_static_agent_and_reports_its_version";
    if !tool_available(test, "buildah", "--version", "Debian package buildah") {
        return Ok(());
    }
    let image = image();
    let (exists, _) = run_tool("buildah", &["inspect", "--type", "image", &image], None)?;
    if !exists {
        skip_or_fail(
            test,
            &format!("image {image} not built (run `cargo xtask image`)"),
        );
        return Ok(());
    }

    // FROM scratch: one layer (the binary), the agent as entrypoint, the metrics port exposed.
    let (ok, inspect) = run_tool("buildah", &["inspect", "--type", "image", &image], None)?;
    assert!(ok, "{inspect}");
    let inspect: serde_json::Value = serde_json::from_str(&inspect)?;
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/keepalive-agent"])
    );
    assert!(config["ExposedPorts"].get("9879/tcp").is_some(), "{config}");
    let layers = inspect["OCIv1"]["rootfs"]["diff_ids"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(layers, 1, "a FROM scratch image with the binary only");

    let container = buildah_from(&["--pull=never", &image])?;
    let run = run_tool(
        "buildah",
        &[
            "run",
            "--isolation",
            "chroot",
            &container,
            "/keepalive-agent",
            "--version",
        ],
        None,
    );
    let _ = run_tool("buildah", &["rm", &container], None);
    let (ok, version) = run?;
    assert!(ok, "the agent in {image} did not run: {version}");

    // The same version as the agent built from this tree.
    let (ok, host_version) = run_tool(&agent_bin().to_string_lossy(), &["--version"], None)?;
    assert!(ok, "{host_version}");
    assert_eq!(version.trim(), host_version.trim());
    // `keepalive-agent 0.1.0 (revision <commit>)`.
    assert!(
        version.trim().starts_with(&format!(
            "keepalive-agent {} (revision ",
            env!("CARGO_PKG_VERSION")
        )),
        "{version}"
    );
    Ok(())
}

#[test]
fn multiarch_list_holds_amd64_and_arm64_and_the_arm64_agent_runs_under_qemu() -> TestResult {
    let test = "multiarch_list_holds_amd64_and_arm64_and_the_arm64_agent_runs_under_qemu";
    if !tool_available(test, "buildah", "--version", "Debian package buildah")
        || !tool_available(
            test,
            "qemu-aarch64-static",
            "--version",
            "Debian package qemu-user-static",
        )
    {
        return Ok(());
    }
    let list = manifest_list();
    let (exists, _) = run_tool("buildah", &["manifest", "exists", &list], None)?;
    if !exists {
        skip_or_fail(
            test,
            &format!("manifest list {list} not built (run `cargo xtask image`)"),
        );
        return Ok(());
    }

    // What a registry serves per node: one linux entry per architecture, nothing else.
    let (ok, inspect) = run_tool("buildah", &["manifest", "inspect", &list], None)?;
    assert!(ok, "{inspect}");
    let inspect: serde_json::Value = serde_json::from_str(&inspect)?;
    let mut platforms: Vec<String> = inspect["manifests"]
        .as_array()
        .context("the list has no manifests")?
        .iter()
        .map(|entry| {
            format!(
                "{}/{}",
                entry["platform"]["os"].as_str().unwrap_or("?"),
                entry["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    platforms.sort();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"], "{inspect}");

    let image = arm64_image();
    let (ok, inspect) = run_tool("buildah", &["inspect", "--type", "image", &image], None)?;
    assert!(ok, "{inspect}");
    let inspect: serde_json::Value = serde_json::from_str(&inspect)?;
    assert_eq!(inspect["OCIv1"]["architecture"], "arm64");
    assert_eq!(
        inspect["OCIv1"]["config"]["Entrypoint"],
        serde_json::json!(["/keepalive-agent"])
    );

    // The binary inside the image, not the one in target/: that is what a node runs.
    let container = buildah_from(&["--pull=never", "--arch", "arm64", &image])?;
    let scratch = ScratchDir::new("arm64-agent")?;
    let copied = scratch.0.join("keepalive-agent");
    let copy = run_tool("buildah", &["mount", &container], None).and_then(|(ok, root)| {
        ensure!(ok, "buildah mount {container}: {root}");
        let root = root.trim().lines().last().unwrap_or_default();
        std::fs::copy(Path::new(root).join("keepalive-agent"), &copied)
            .with_context(|| format!("copying /keepalive-agent out of {image}"))
    });
    let _ = run_tool("buildah", &["umount", &container], None);
    let _ = run_tool("buildah", &["rm", &container], None);
    copy?;

    let elf = std::fs::read(&copied)?;
    let (machine, interpreter) = elf_machine_and_interpreter(&elf)?;
    assert_eq!(
        machine, EM_AARCH64,
        "the arm64 image's agent is not aarch64"
    );
    assert!(
        !interpreter,
        "the arm64 image's agent asks for a dynamic loader; FROM scratch has none"
    );

    let (ok, version) = run_tool(
        "qemu-aarch64-static",
        &[&copied.to_string_lossy(), "--version"],
        None,
    )?;
    assert!(ok, "the arm64 agent did not run under qemu: {version}");
    let (ok, host_version) = run_tool(&agent_bin().to_string_lossy(), &["--version"], None)?;
    assert!(ok, "{host_version}");
    assert_eq!(version.trim(), host_version.trim());
    Ok(())
}

/// A working container from an image (`buildah from ARGS`): its name, the last line buildah
/// prints.
fn buildah_from(args: &[&str]) -> anyhow::Result<String> {
    let args: Vec<&str> = std::iter::once("from")
        .chain(args.iter().copied())
        .collect();
    let (ok, out) = run_tool("buildah", &args, None)?;
    anyhow::ensure!(ok, "buildah {}: {out}", args.join(" "));
    Ok(out.trim().lines().last().unwrap_or_default().to_owned())
}
