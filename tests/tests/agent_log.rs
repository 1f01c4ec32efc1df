//! The agent's log as `--log.level` and `--log.format` shape it: JSON lines that each parse,
//! a level filter that holds back what is below it, and a warning repeated from one place
//! written once per window, the rest counted in
//! `keepalive_agent_log_messages_suppressed_total` and announced by the next line written.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use keepalive_tests::{Agent, DEADLINE, kernel_tests_enabled, skip_or_fail, wait_until};

/// keepalive-agent's `logging::REPEAT_WINDOW`, plus a margin.
const PAST_REPEAT_WINDOW: Duration = Duration::from_secs(12);

fn start(test: &str, args: &[&str]) -> Option<Agent> {
    match Agent::start_with_args(args) {
        Ok(agent) => Some(agent),
        Err(e) => {
            skip_or_fail(test, &format!("the agent did not start: {e:#}"));
            None
        }
    }
}

#[test]
fn json_log_lines_each_parse_and_debug_level_lets_debug_through() -> anyhow::Result<()> {
    let test = "json_log_lines_each_parse_and_debug_level_lets_debug_through";
    if !kernel_tests_enabled(test) {
        return Ok(());
    }
    let Some(agent) = start(test, &["--log.format", "json", "--log.level", "debug"]) else {
        return Ok(());
    };
    let mut levels = Vec::new();
    let log = agent.log();
    for line in log.lines().filter(|line| !line.trim().is_empty()) {
        let object: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("a log line that is not JSON: {line:?}\n{log}"))?;
        for key in ["ts", "level", "target", "msg"] {
            ensure!(object[key].is_string(), "no string {key:?} in {line}");
        }
        levels.push(object["level"].as_str().unwrap_or_default().to_owned());
    }
    ensure!(
        log.lines()
            .any(|line| line.contains("\"msg\":\"ready: following TCP keepalive")),
        "no ready line:\n{log}"
    );
    ensure!(
        levels.iter().any(|level| level == "debug"),
        "no debug line at --log.level debug:\n{log}"
    );
    Ok(())
}

/// `keepalive_agent_log_messages_suppressed_total{level="warn"}`.
fn warnings_suppressed(agent: &Agent) -> anyhow::Result<f64> {
    Ok(agent.scrape()?.value(
        "keepalive_agent_log_messages_suppressed_total",
        &[("level", "warn")],
    ))
}

fn sighup(agent: &Agent) -> anyhow::Result<()> {
    // SAFETY: kill has no memory preconditions; the pid is our own child.
    let rc = unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGHUP) };
    ensure!(rc == 0, "kill -HUP: {}", std::io::Error::last_os_error());
    Ok(())
}

#[test]
fn warn_level_hides_info_and_a_repeated_warning_is_written_once_per_window_and_counted()
-> anyhow::Result<()> {
    let test =
        "warn_level_hides_info_and_a_repeated_warning_is_written_once_per_window_and_counted";
    if !kernel_tests_enabled(test) {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("keepalive-agent-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let events = dir.join("events.jsonl");
    let Some(agent) = start(
        test,
        &["--log.level", "warn", "--events", &events.to_string_lossy()],
    ) else {
        return Ok(());
    };
    // With the events file's directory gone, every SIGHUP's reopen fails with a warning from
    // the same line of the agent.
    std::fs::remove_dir_all(&dir)?;
    let reopen_failures = |log: &str| {
        log.lines()
            .filter(|line| line.contains("still writing to the previous file"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    sighup(&agent)?;
    wait_until(DEADLINE, "the first reopen warning", || {
        Ok(reopen_failures(&agent.log()).len() == 1)
    })?;
    // Each further SIGHUP (sent once the previous one is counted: pending signals coalesce)
    // is suppressed and counted.
    let before = warnings_suppressed(&agent)?;
    for n in 1..=3 {
        sighup(&agent)?;
        wait_until(DEADLINE, "a suppressed warning counted", || {
            Ok(warnings_suppressed(&agent)? >= before + f64::from(n))
        })?;
    }
    let log = agent.log();
    let lines = reopen_failures(&log);
    ensure!(lines.len() == 1, "suppressed warnings were written:\n{log}");
    ensure!(lines[0].contains("level=warn"), "{}", lines[0]);
    ensure!(
        !log.lines()
            .any(|line| line.contains("level=info") || line.contains("level=debug")),
        "lines below --log.level warn:\n{log}"
    );

    // After the window the next one is written, saying how many were held back.
    std::thread::sleep(PAST_REPEAT_WINDOW);
    sighup(&agent)?;
    wait_until(DEADLINE, "the reopen warning after the window", || {
        Ok(reopen_failures(&agent.log()).len() == 2)
    })?;
    let log = agent.log();
    let second = &reopen_failures(&log)[1];
    ensure!(second.ends_with(" suppressed=3"), "{second}\n{log}");
    Ok(())
}
