//! The container image `cargo xtask image` builds (deploy/Containerfile, FROM scratch): it runs
//! the agent. `cargo xtask test` builds the image before the tests; run by hand, build it first
//! with `cargo xtask image`.
//!
//! The image is run with `buildah run --isolation chroot`: on this class of host `podman run`
//! (crun) refuses to start any container ("cgroups in hybrid mode not supported", and setting
//! RLIMIT_NOFILE/NPROC is not permitted), while chroot isolation needs neither.

use keepalive_tests::deploy::{run_tool, tool_available};
use keepalive_tests::{agent_bin, skip_or_fail};

type TestResult = anyhow::Result<()>;

/// The tag `cargo xtask image` gives (xtask/src/image.rs).
fn image() -> String {
    format!("localhost/keepalive-agent:{}", env!("CARGO_PKG_VERSION"))
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

    let (ok, container) = run_tool("buildah", &["from", "--pull=never", &image], None)?;
    assert!(ok, "buildah from {image}: {container}");
    let container = container
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
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
