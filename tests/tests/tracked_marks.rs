//! The kernel sends the close of a keepalive connection only while the agent's table may hold
//! it (issue 10): the timer marks a connection at an expiry that probed, and the agent renews
//! the marks of the connections its table holds every `--connections.marks-interval`, so the
//! mark of one it let go ages out. Before, every expiry marked its connection for good: the
//! closes of connections that only ever expired with traffic, and of every connection that
//! ever probed, were sent until the agent stopped, and the share of closes sent grew with the
//! distinct connections seen. Nor are the expiries of a connection the table neither holds nor
//! takes in sent: those of connections with traffic, which never probe.
//!
//! Alone in its file: it counts the agent's close records, to which every connection closing on
//! the host adds, and cargo runs test binaries one at a time.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use keepalive_tests::{DEADLINE, Metrics, Netns, TcpPair, TestEnv, set_keepalive, wait_until};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const KEEPALIVE: &str = "TCPKeepAlive";
const RECORDS: &str = "keepalive_agent_events_total";
const PROBES: &str = "tcp_keepalive_connection_probes_total";
const EXPIRIES: &str = "tcp_keepalive_timer_expiries_total";
const RENEWALS: &str = "keepalive_agent_tracked_marks_renewals_total";
const MARKED: &str = "keepalive_agent_tracked_marks_connections";
const SLOTS_HELD: &str = "keepalive_agent_tracked_marks_slots_held";
const NO_LABELS: &[(&str, &str)] = &[];
/// The agent's table holds at most this many live connections.
const TRACKED: usize = 100;
/// Connections that probe, three times what the table holds.
const PROBING: usize = 300;
/// Connections whose keepalive timer runs with traffic flowing: it never probes.
const BUSY: usize = 200;
/// Closes of other connections on the host may add records while a phase runs.
const SLACK: f64 = 30.0;
/// Connections sharing a slot of the kernel's marks (32 768 slots): the clients of one
/// listener take ephemeral ports in turn, blocks of 64 in turn, each on a line of its own
/// (`tracked_slot`); room for the accepted ends' blocks, which hash to other lines and may
/// take one of theirs.
const SHARED_SLOTS: f64 = 10.0;

#[test]
fn closes_are_sent_while_the_table_may_hold_the_connection() -> anyhow::Result<()> {
    let test = "closes_are_sent_while_the_table_may_hold_the_connection";
    let tracked = TRACKED.to_string();
    let Some(env) = TestEnv::start_with_agent_args(
        test,
        &[
            "--connections.max-tracked",
            &tracked,
            "--connections.marks-interval",
            "1s",
        ],
    ) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        eprintln!("{test}: kernel-only mode, nothing to check (it is about the agent's records)");
        return Ok(());
    };
    let ns = Netns::new("tracked-marks")?;
    let listener = ns.listen(V4)?;
    let netns = ns.inum();
    let netns_label = netns.to_string();
    let close_records =
        || -> anyhow::Result<f64> { Ok(agent.scrape()?.value(RECORDS, &[("kind", "close")])) };
    let expiry_records = || -> anyhow::Result<f64> {
        Ok(agent
            .scrape()?
            .value(RECORDS, &[("kind", "keepalive_timer")]))
    };

    // Keepalive timers that run with traffic flowing: each expiry finds the connection active
    // and re-arms without a probe, so none of them is marked, and neither those expiries nor
    // the connections' closes leave the kernel; the namespace's expiries still count them.
    let mut busy = ns.connect_pairs(&listener, BUSY)?;
    let before = ns.tcp_ext()?;
    let expiries = |m: &Metrics| m.value(EXPIRIES, &[("netns", &netns_label)]);
    let expiries_before = expiries(&agent.scrape()?);
    let expiry_records_before = expiry_records()?;
    for pair in &busy {
        set_keepalive(&pair.client, 1, 1, 3)?;
    }
    // Every 100 ms a byte each way. An expiry probes only after a whole second without one.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        for pair in &mut busy {
            exchange(pair)?;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let busy_expiries = expiries(&agent.scrape()?) - expiries_before;
    let busy_probes = ns.tcp_ext()?.delta(&before, KEEPALIVE);
    ensure!(
        busy_expiries >= BUSY as f64,
        "{busy_expiries} keepalive expiries in the namespace while {BUSY} busy connections ran \
         4 s with a 1 s idle"
    );
    let records_before = close_records()?;
    drop(busy);
    let busy_sent = close_records()? - records_before;
    // Waits for the closes to arrive, if they were sent: the agent drains within milliseconds.
    thread::sleep(Duration::from_secs(1));
    let busy_sent = busy_sent.max(close_records()? - records_before);
    ensure!(
        busy_sent < busy_probes as f64 + SLACK,
        "{busy_sent} close records for {BUSY} busy keepalive connections that expired \
         {busy_expiries} times and probed {busy_probes} times"
    );
    // Their expiries were read after the closes' second: every record sent has arrived.
    let busy_expiries_sent = expiry_records()? - expiry_records_before;
    ensure!(
        busy_expiries_sent < busy_probes as f64 + SLACK,
        "{busy_expiries_sent} expiry records for {BUSY} busy keepalive connections that \
         expired {busy_expiries} times and probed {busy_probes} times"
    );

    // Connections that probe, three times what the table holds: it keeps the most recent
    // ones. Then they stop expiring (a 1 h idle), and after more than three renewals the marks
    // of those it let go have aged out: only the closes of the connections it holds are sent.
    let probing = ns.connect_pairs(&listener, PROBING)?;
    let before = ns.tcp_ext()?;
    for pair in &probing {
        set_keepalive(&pair.client, 1, 1, 3)?;
    }
    wait_until(DEADLINE, "every probing connection to probe", || {
        Ok(ns.tcp_ext()?.delta(&before, KEEPALIVE) >= PROBING as u64)
    })?;
    // They probe every second, so each one's mark is in a live epoch at the next renewal.
    let renewals = agent.scrape()?.value(RENEWALS, NO_LABELS);
    let mut probing_held = 0.0;
    wait_until(DEADLINE, "a renewal of the marks", || {
        let m = agent.scrape()?;
        probing_held = m.value(SLOTS_HELD, NO_LABELS);
        Ok(m.value(RENEWALS, NO_LABELS) > renewals)
    })?;
    ensure!(
        probing_held >= PROBING as f64 - SHARED_SLOTS,
        "{probing_held} slots of the kernel's marks held while {PROBING} connections probed"
    );
    for pair in &probing {
        set_keepalive(&pair.client, 3600, 1, 3)?;
    }
    let renewals = agent.scrape()?.value(RENEWALS, NO_LABELS);
    thread::sleep(Duration::from_secs(6));
    let labels: Vec<_> = probing
        .iter()
        .map(|p| p.client_conn.labels(netns))
        .collect();
    let m = agent.scrape()?;
    let held: Vec<usize> = (0..PROBING)
        .filter(|&i| !m.matching(PROBES, &labels[i]).is_empty())
        .collect();
    ensure!(
        !held.is_empty() && held.len() <= TRACKED,
        "{} of {PROBING} probing connections have series, with a table of {TRACKED}",
        held.len()
    );
    // Every mark the programs made aged out: what holds is what the last renewal marked.
    let (quiet_renewals, marked, quiet_held) = (
        m.value(RENEWALS, NO_LABELS) - renewals,
        m.value(MARKED, NO_LABELS),
        m.value(SLOTS_HELD, NO_LABELS),
    );
    ensure!(
        quiet_renewals >= 4.0,
        "{quiet_renewals} renewals of the marks in 6 s, with a 1 s interval"
    );
    ensure!(
        marked >= held.len() as f64 && marked <= TRACKED as f64,
        "the last renewal marked {marked} connections; {} have series, with a table of {TRACKED}",
        held.len()
    );
    ensure!(
        quiet_held <= marked + SLACK && quiet_held >= marked - SHARED_SLOTS,
        "{quiet_held} slots of the kernel's marks held after the last renewal marked {marked} \
         connections and the {PROBING} that probed stopped expiring"
    );
    let records_before = close_records()?;
    drop(probing);
    wait_until(DEADLINE, "the held connections' series to leave", || {
        let m = agent.scrape()?;
        Ok(held
            .iter()
            .all(|&i| m.matching(PROBES, &labels[i]).is_empty()))
    })
    .context("a close of a connection the table held was not sent")?;
    thread::sleep(Duration::from_secs(1));
    let sent = close_records()? - records_before;
    ensure!(
        sent >= held.len() as f64 && sent < held.len() as f64 + SLACK,
        "{sent} close records for {PROBING} connections that probed, of which the table held {}",
        held.len()
    );
    eprintln!(
        "{test}: {busy_sent} close and {busy_expiries_sent} expiry records for {BUSY} busy \
         keepalive connections ({busy_expiries} expiries, {busy_probes} probes); {sent} for \
         {PROBING} that probed, of which the table held {}; slots held {probing_held} while \
         they probed, {quiet_held} after {quiet_renewals} renewals that marked {marked}",
        held.len()
    );
    Ok(())
}

/// One byte from the server to the client and one back, so both ends have just received.
fn exchange(pair: &mut TcpPair) -> anyhow::Result<()> {
    let mut byte = [0u8; 1];
    pair.server.write_all(b"s")?;
    pair.client.read_exact(&mut byte)?;
    pair.client.write_all(b"c")?;
    pair.server.read_exact(&mut byte)?;
    Ok(())
}
