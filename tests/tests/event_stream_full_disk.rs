//! The event stream on a full disk: the agent writes to a small tmpfs until it is full, then
//! space returns. Every line in the file must be a whole JSON event, every event the pipeline
//! produced must be either in the file or counted as dropped, and the errors must be logged a
//! few times, not once per batch. Also: SIGHUP without `--events` is logged and ignored.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use keepalive_tests::netns::run_cmd;
use keepalive_tests::{
    DEADLINE, Metrics, Netns, TcpPair, TestEnv, set_linger_zero, wait_closed, wait_until,
};
use serde_json::Value;

/// Room for a few dozen events: the first burst overflows it.
const SMALL: &str = "48k";
const LARGE: &str = "16m";
/// Aborted connections in the burst (two drop events each, ~600 bytes per event).
const BURST: usize = 150;
const AFTER: usize = 5;

/// A tmpfs of its own mounted on a fresh directory, unmounted (lazily) and removed on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> anyhow::Result<Tmpfs> {
        let dir = std::env::temp_dir().join(format!("keepalive-full-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let tmpfs = Tmpfs(dir);
        run_cmd(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&tmpfs.0),
            None,
        )?;
        Ok(tmpfs)
    }

    fn resize(&self, size: &str) -> anyhow::Result<()> {
        run_cmd(
            Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(&self.0),
            None,
        )
        .map(drop)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Closes `pair` abortively from the server (RST): a drop event for each end.
fn abort(pair: TcpPair) -> anyhow::Result<()> {
    set_linger_zero(&pair.server)?;
    drop(pair.server);
    wait_closed(&pair.client, DEADLINE, "client of the aborted connection").map(drop)
}

/// Every line of the file, each of which must be a whole JSON event.
fn whole_lines(path: &Path) -> anyhow::Result<Vec<Value>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        bytes.is_empty() || bytes.ends_with(b"\n"),
        "{} ends in a partial line",
        path.display()
    );
    String::from_utf8(bytes)
        .context("events file is not UTF-8")?
        .lines()
        .map(|l| {
            let event: Value = serde_json::from_str(l).with_context(|| format!("not JSON: {l}"))?;
            ensure!(event["event"].is_string(), "not an event: {l}");
            Ok(event)
        })
        .collect()
}

fn counter(m: &Metrics, name: &str) -> u64 {
    m.value::<&str, &str>(name, &[]) as u64
}

#[test]
fn full_disk_leaves_whole_lines_and_every_lost_event_counted() -> anyhow::Result<()> {
    let test = "full_disk_leaves_whole_lines_and_every_lost_event_counted";
    if !keepalive_tests::kernel_tests_enabled(test) {
        return Ok(());
    }
    let tmpfs = Tmpfs::mount(SMALL)?;
    let path = tmpfs.0.join("events.jsonl");
    let path_arg = path.to_str().context("UTF-8 temp path")?.to_owned();
    let Some(env) = TestEnv::start_with_agent_args(test, &["--events", &path_arg]) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        return Ok(());
    };
    let ns = Netns::new("fulldisk")?;
    let listener = ns.listen(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))?;

    for _ in 0..BURST {
        abort(ns.connect_pair(&listener)?)?;
    }
    wait_until(DEADLINE, "events dropped for lack of space", || {
        Ok(counter(&agent.scrape()?, "keepalive_agent_events_dropped_total") > 0)
    })?;
    let while_full = whole_lines(&path)?;
    ensure!(
        !while_full.is_empty(),
        "nothing was written before the disk filled"
    );

    tmpfs.resize(LARGE)?;
    let before = whole_lines(&path)?.len();
    for _ in 0..AFTER {
        abort(ns.connect_pair(&listener)?)?;
    }
    wait_until(DEADLINE, "events written again once space returned", || {
        Ok(whole_lines(&path)?.len() >= before + 2 * AFTER)
    })?;

    // Once the channel is empty: lines in the file + counted as lost = produced.
    let mut last = String::new();
    let balanced = wait_until(DEADLINE, "written + dropped = produced", || {
        let m = agent.scrape()?;
        let lines = whole_lines(&path)?.len() as u64;
        let produced = counter(&m, "keepalive_agent_event_stream_produced_total");
        let written = counter(&m, "keepalive_agent_event_stream_written_total");
        let dropped = counter(&m, "keepalive_agent_events_dropped_total");
        last = format!("{lines} lines, written {written}, dropped {dropped}, produced {produced}");
        Ok(lines == written && written + dropped == produced)
    });
    eprintln!("{last}");
    balanced.with_context(|| last.clone())?;

    let log = agent.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("writing events to") && l.contains("failed"))
        .count();
    ensure!(
        (1..=5).contains(&warnings),
        "{warnings} write-failure lines in the log:\n{log}"
    );
    ensure!(
        log.contains("works again"),
        "no recovery line in the log:\n{log}"
    );
    Ok(())
}

#[test]
fn sighup_without_an_events_file_is_logged_and_ignored() -> anyhow::Result<()> {
    let test = "sighup_without_an_events_file_is_logged_and_ignored";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        return Ok(());
    };
    // SAFETY: kill has no memory preconditions; the pid is our own child.
    let rc = unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGHUP) };
    ensure!(rc == 0, "kill -HUP: {}", std::io::Error::last_os_error());
    wait_until(DEADLINE, "the agent to log the ignored SIGHUP", || {
        Ok(agent
            .log()
            .contains("SIGHUP: no --events file to reopen; ignored"))
    })?;
    std::thread::sleep(Duration::from_millis(200));
    ensure!(agent.get("/healthz")?.0 == 200, "not serving after SIGHUP");
    Ok(())
}
