//! Every flag fed nonsense: the agent must refuse to start with one line that names the flag,
//! never a panic or a backtrace, and never start anyway. Needs no kernel access: validation
//! runs before anything is read or loaded.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use keepalive_tests::agent_bin;

/// How long a refused start may take; an accepted value would start the agent, which runs
/// until killed.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(20);

/// Runs the agent with `args`; Ok((exit code, stderr)) when it exits by itself in time.
fn run_agent(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let mut child = Command::new(agent_bin())
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", agent_bin().display()))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > REFUSAL_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{args:?} was accepted: the agent kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    let code = status
        .code()
        .with_context(|| format!("{args:?}: killed by a signal ({status}); stderr:\n{stderr}"))?;
    Ok((code, stderr))
}

/// The agent refuses `args` with exit code 1 or 2 and one line naming `flag`.
fn refuses(args: &[&str], flag: &str) -> anyhow::Result<()> {
    let (code, stderr) = run_agent(args)?;
    ensure!(
        code == 1 || code == 2,
        "{args:?}: exit code {code} (101 is a panic); stderr:\n{stderr}"
    );
    ensure!(
        !stderr.contains("panicked")
            && !stderr.contains("backtrace")
            && !stderr.contains("RUST_BACKTRACE"),
        "{args:?}: a panic or backtrace:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        lines.len() == 1,
        "{args:?}: {} lines on stderr, want one reason:\n{stderr}",
        lines.len()
    );
    ensure!(
        lines[0].starts_with("error: ") && lines[0].contains(flag),
        "{args:?}: the reason does not name {flag}: {}",
        lines[0]
    );
    Ok(())
}

/// `--flag=value`: the only way to give a value that starts with '-'.
fn flag_value(flag: &str, value: &str) -> String {
    format!("{flag}={value}")
}

/// As a separate argument a value starting with '-' reads as an unknown flag, which is refused
/// in one line that names it instead.
fn dash_ok(value: &str, e: anyhow::Error) -> anyhow::Result<()> {
    if value.starts_with('-') && format!("{e:#}").contains("error: unexpected argument '-") {
        return Ok(());
    }
    Err(e)
}

/// `run FLAG=VALUE` and `run FLAG VALUE` for each value.
fn run_refuses_each(flag: &str, values: &[&str]) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for value in values {
        if let Err(e) = refuses(&["run", &flag_value(flag, value)], flag)
            .and_then(|()| refuses(&["run", flag, value], flag).or_else(|e| dash_ok(value, e)))
        {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

const NUMBERS: [&str; 5] = ["", "-1", "x", "1.5", "99999999999999999999999"];
const DURATIONS: [&str; 7] = [
    "",
    "0s",
    "-1s",
    "1ns",
    "x",
    "1000y",
    "99999999999999999999s",
];

#[test]
fn web_flags_refuse_nonsense() -> anyhow::Result<()> {
    run_refuses_each(
        "--web.listen-address",
        &[
            "",
            "0",
            "-1",
            "x",
            "localhost:9879",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            "127.0.0.1",
        ],
    )?;
    let long = format!("/{}", "a".repeat(300));
    run_refuses_each(
        "--web.telemetry-path",
        &[
            "", "/", "metrics", "/healthz", "/readyz", "/{", "/:x", "/*x", "/{x}", "//", "/a b",
            "/m?x=1", "/../m", &long,
        ],
    )
}

#[test]
fn size_flags_refuse_zero_negative_huge_and_wrong_types() -> anyhow::Result<()> {
    run_refuses_each(
        "--connections.max-tracked",
        &[
            &NUMBERS[..],
            &["0", "1e8", "1000000000000", "18446744073709551615"],
        ]
        .concat(),
    )?;
    run_refuses_each(
        "--connections.max-dropped",
        &[&NUMBERS[..], &["1e8", "18446744073709551615"]].concat(),
    )?;
    run_refuses_each(
        "--connections.max-series",
        &[&NUMBERS[..], &["1e9", "18446744073709551615"]].concat(),
    )?;
    run_refuses_each(
        "--ring-buffer.bytes",
        &[
            &NUMBERS[..],
            &[
                "0",
                "4095",
                "5000",
                "1073741824",
                "2147483648",
                "1GiB",
                "4e6",
            ],
        ]
        .concat(),
    )
}

#[test]
fn duration_flags_refuse_zero_negative_tiny_and_huge() -> anyhow::Result<()> {
    for flag in [
        "--connections.dropped-retention",
        "--netns.retention",
        "--audit.interval",
        "--connections.marks-interval",
    ] {
        run_refuses_each(flag, &DURATIONS)?;
    }
    // Above an hour, a connection the agent let go would cost its close for hours.
    run_refuses_each("--connections.marks-interval", &["2h"])?;
    Ok(())
}

#[test]
fn path_flags_refuse_missing_paths_files_and_wrong_filesystems() -> anyhow::Result<()> {
    // A regular file, a directory on the wrong filesystem, nothing at all.
    let file = "/proc/self/status";
    run_refuses_each("--proc.root", &["", "/nonexistent", file, "/tmp", "/sys"])?;
    run_refuses_each(
        "--cgroup.root",
        &["", "/nonexistent", file, "/tmp", "/proc"],
    )?;
    run_refuses_each(
        "--kernel.timer-list",
        &["", "/nonexistent", "/proc", "/nonexistent/x"],
    )?;
    run_refuses_each(
        "--events",
        &[
            "",
            "/",
            "/tmp",
            "/nonexistent/events.jsonl",
            "/proc/self/status/x",
        ],
    )
}

#[test]
fn label_and_threshold_flags_refuse_nonsense_and_duplicates() -> anyhow::Result<()> {
    run_refuses_each(
        "--aggregate-by",
        &["bogus", "netns,bogus", "pod_uid;cgroup"],
    )?;
    let long_name = format!("{}=1", "n".repeat(100));
    run_refuses_each(
        "--idle-timeout-threshold",
        &[
            "", "a", "a=", "=1", "a=0", "a=-1", "a=x", "a=inf", "a=NaN", "a=1e300", "a b=1",
            "a{}=1", &long_name,
        ],
    )?;
    refuses(
        &[
            "run",
            "--idle-timeout-threshold",
            "a=1",
            "--idle-timeout-threshold",
            "a=2",
        ],
        "--idle-timeout-threshold",
    )?;
    let many: Vec<String> = (0..40).map(|i| format!("t{i}=1")).collect();
    let mut args = vec!["run"];
    for t in &many {
        args.extend(["--idle-timeout-threshold", t]);
    }
    refuses(&args, "--idle-timeout-threshold")
}

#[test]
fn watch_flags_refuse_nonsense() -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for (flag, values) in [
        (
            "--ring-buffer.bytes",
            &["", "0", "-1", "5000", "1073741824"][..],
        ),
        ("--port", &["", "-1", "70000", "x"][..]),
        ("--addr", &["", "x", "1.2.3", "::g"][..]),
        ("--netns", &["", "-1", "x", "99999999999"][..]),
        ("--color", &["", "purple"][..]),
    ] {
        for value in values {
            if let Err(e) = refuses(&["watch", &flag_value(flag, value)], flag) {
                failures.push(format!("{e:#}"));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn unknown_flags_and_commands_are_one_line_too() -> anyhow::Result<()> {
    refuses(&["run", "--no-such-flag"], "--no-such-flag")?;
    refuses(&["frobnicate"], "frobnicate")?;
    refuses(&["run", "--web.listen-address"], "--web.listen-address")
}

#[test]
fn sockets_flags_refuse_nonsense() -> anyhow::Result<()> {
    for (flag, value) in [
        ("--proc.root", ""),
        ("--proc.root", "/nonexistent"),
        ("--proc.root", "/tmp"),
        ("--port", "70000"),
        ("--netns", "-1"),
        ("--output", "xml"),
    ] {
        refuses(&["sockets", &flag_value(flag, value)], flag)?;
    }
    Ok(())
}
