//! A connection whose close never reached the agent leaves its table once audit walks stop
//! finding its socket (issue 10: nothing lost silently). Before, its live entry, its
//! per-connection series and its unanswered probes stayed until the table's bound pushed it
//! out, and a lost close was invisible.
//!
//! The closes are lost for real: the agent is stopped (SIGSTOP) while other connections' probes
//! fill its smallest ring buffer, so the kernel cannot write their records.

use std::{
    net::{IpAddr, Ipv4Addr},
    thread,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use keepalive_tests::{DEADLINE, Netns, TestEnv, set_keepalive, wait_until};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const KEEPALIVE: &str = "TCPKeepAlive";
const PROBES: &str = "tcp_keepalive_connection_probes_total";
const VANISHED: &str = "keepalive_agent_connections_vanished_total";
const RESERVE_FAILURES: &str = "keepalive_agent_ringbuf_reserve_failures_total";
const NO_LABELS: &[(&str, &str)] = &[];
/// Connections whose closes are lost.
const CLOSED: usize = 5;
/// Connections that probe every second, to fill the ring buffer: 200 records of 72 bytes a
/// second against 4 KiB.
const FILLERS: usize = 200;

#[test]
fn connections_whose_close_was_lost_leave_the_table() -> anyhow::Result<()> {
    let test = "connections_whose_close_was_lost_leave_the_table";
    let Some(env) = TestEnv::start_with_agent_args(
        test,
        &["--ring-buffer.bytes", "4096", "--audit.interval", "1s"],
    ) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        eprintln!("{test}: kernel-only mode, nothing to check (it is about the agent's table)");
        return Ok(());
    };
    let ns = Netns::new("vanished")?;
    let listener = ns.listen(V4)?;
    let netns = ns.inum();

    // Connections whose peers answer: they probe every second, and each enters the table.
    let closed = ns.connect_pairs(&listener, CLOSED)?;
    for pair in &closed {
        set_keepalive(&pair.client, 1, 1, 3)?;
    }
    let closed_labels: Vec<_> = closed.iter().map(|p| p.client_conn.labels(netns)).collect();
    wait_until(
        DEADLINE,
        "the connections to be closed to have series",
        || {
            let m = agent.scrape()?;
            Ok(closed_labels
                .iter()
                .all(|l| !m.matching(PROBES, l).is_empty()))
        },
    )?;
    let fillers = ns.connect_pairs(&listener, FILLERS)?;
    let before = ns.tcp_ext()?;
    // Spread over the second, so that while the agent runs their records fit the ring.
    for group in fillers.chunks(FILLERS / 10) {
        for pair in group {
            set_keepalive(&pair.client, 1, 1, 3)?;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let filler_labels: Vec<_> = fillers
        .iter()
        .map(|p| p.client_conn.labels(netns))
        .collect();
    wait_until(DEADLINE, "the fillers to probe", || {
        Ok(ns.tcp_ext()?.delta(&before, KEEPALIVE) >= 2 * FILLERS as u64)
    })?;
    let m = agent.scrape()?;
    // The live connections the table holds: every walk finds them.
    let held: Vec<usize> = (0..FILLERS)
        .filter(|&i| !m.matching(PROBES, &filler_labels[i]).is_empty())
        .collect();
    ensure!(
        held.len() >= FILLERS / 2,
        "{} of {FILLERS} probing connections have series",
        held.len()
    );
    let (vanished_before, failures_before) = (
        m.value(VANISHED, NO_LABELS),
        m.value(RESERVE_FAILURES, NO_LABELS),
    );

    // Stopped, the agent drains nothing: two seconds of the fillers' probes fill the ring, and
    // the closes find no room.
    let pid = agent.pid() as libc::pid_t;
    // SAFETY: signals to the agent this test started.
    ensure!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0, "SIGSTOP");
    thread::sleep(Duration::from_secs(2));
    drop(closed);
    thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    ensure!(unsafe { libc::kill(pid, libc::SIGCONT) } == 0, "SIGCONT");

    let m = agent.scrape()?;
    let failures = m.value(RESERVE_FAILURES, NO_LABELS) - failures_before;
    let ghosts = closed_labels
        .iter()
        .filter(|l| !m.matching(PROBES, l).is_empty())
        .count();
    ensure!(
        failures > 0.0 && ghosts > 0,
        "the test did not lose the closes it is about: {failures} records lost while the agent \
         was stopped, {ghosts} of {CLOSED} closed connections still with series"
    );
    wait_until(DEADLINE, "the closed connections' series to leave", || {
        let m = agent.scrape()?;
        Ok(closed_labels
            .iter()
            .all(|l| m.matching(PROBES, l).is_empty()))
    })
    .context("a closed connection whose close record was lost stayed in the table")?;
    let m = agent.scrape()?;
    let vanished = m.value(VANISHED, NO_LABELS) - vanished_before;
    ensure!(
        vanished >= ghosts as f64,
        "{vanished} connections counted as vanished; {ghosts} lost their close"
    );
    // The live ones were found by every walk: none left.
    let live = held
        .iter()
        .filter(|&&i| !m.matching(PROBES, &filler_labels[i]).is_empty())
        .count();
    ensure!(
        live == held.len(),
        "{live} of {} live probing connections the table held still have series after \
         {vanished} were taken for gone",
        held.len()
    );
    eprintln!(
        "{test}: {failures} records lost while the agent was stopped; {ghosts} of {CLOSED} \
         closed connections kept their series, then left it ({vanished} counted vanished); \
         {live} of {} live connections the table held kept theirs",
        held.len()
    );
    drop(fillers);
    Ok(())
}
