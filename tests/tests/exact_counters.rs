//! The probe and drop totals come from counters the kernel programs keep per namespace, so no
//! ring-buffer loss changes them. With the smallest ring buffer the kernel accepts (one page,
//! ~22 records) and hundreds of keepalive connections probing in the same jiffy, records are
//! lost, and still
//! - a namespace whose peers are blackholed counts exactly its `TCPKeepAlive` probes and its
//!   `TCPAbortOnTimeout` keepalive timeouts, and the resets its server sockets received,
//! - a namespace whose peers answer counts exactly its `TCPKeepAlive` probes (an answered
//!   probe's ACK can zero `icsk_probes_out` before the timer's exit hook reads it; the probes
//!   are counted from the namespace's `TCPKeepAlive` on the timer's CPU, which no ACK resets).
//!
//! Exactly, unless the kernel ran none of the agent's programs for some keepalive expiries (it
//! does, now and then, when hundreds of them fall in the same jiffy; `tests/src/tracepoint.rs`).
//! A perf event on the same tracepoint counts those, and the probes may then fall short of
//! `TCPKeepAlive` by at most that count: a shortfall the kernel does not explain still fails.
//!
//! The namespaces' counts are in two places, their entry in the hash map and, once the agent
//! placed them, their slot (`NETNS_SLOTS`): the totals must be their sum.
//!
//! The agent's counter sweep (which adds the probes of such expiries that no later expiry
//! counts) runs every 10ms here, a hundred times its default, in the middle of the bursts: a
//! probe it and an expiry's exit both counted would put the totals above `TCPKeepAlive`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, ensure};
use keepalive_agent::sweep_metric;
use keepalive_ebpf::{NetnsKey, netns_counter_slot};
use keepalive_tests::{
    DEADLINE, Expectations, Metrics, Netns, TCP_CLOSE, TestEnv, UNCOUNTED_METRICS,
    disable_keepalive, set_keepalive, so_error, tcp_state, wait_until,
};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const KEEPALIVE: &str = "TCPKeepAlive";
const ABORT_ON_TIMEOUT: &str = "TCPAbortOnTimeout";

/// Connections per namespace: far more records per interval than one page holds.
const BLACKHOLED: usize = 600;
const ANSWERING: usize = 600;
/// How long the answering namespace probes before its keepalive is switched off.
const ANSWERING_FOR: Duration = Duration::from_secs(4);

#[test]
fn namespace_totals_equal_tcpext_when_the_ring_buffer_loses_records() -> anyhow::Result<()> {
    let test = "namespace_totals_equal_tcpext_when_the_ring_buffer_loses_records";
    let Some(env) = TestEnv::start_with_agent_args(
        test,
        &[
            "--ring-buffer.bytes",
            "4096",
            "--netns.counter-sweep-interval",
            "10ms",
        ],
    ) else {
        return Ok(());
    };

    let not_run = env.count_expiries_not_run();
    let dead = Netns::new("exact-dead")?;
    let dead_listener = dead.listen(V4)?;
    let dead_pairs = dead.connect_pairs(&dead_listener, BLACKHOLED)?;
    let live = Netns::new("exact-live")?;
    let live_listener = live.listen(V4)?;
    let live_pairs = live.connect_pairs(&live_listener, ANSWERING)?;
    // The servers' ACKs never leave: every client sends 3 probes, then its keepalive timer
    // aborts it, and its RST resets the server socket.
    let _blackhole = dead.blackhole_replies_from_port(dead_listener.local_addr()?.port())?;
    // The sweep's rounds while the namespaces probe: it must run through the bursts.
    let sweeps_now = || -> anyhow::Result<f64> {
        let none: &[(&str, &str)] = &[];
        Ok(match env.agent() {
            Some(agent) => agent.scrape()?.value(sweep_metric::ROUNDS, none),
            None => 0.0,
        })
    };
    let sweeps_before = sweeps_now()?;
    for pair in dead_pairs.iter().chain(&live_pairs) {
        set_keepalive(&pair.client, 1, 1, 3)?;
    }

    std::thread::sleep(ANSWERING_FOR);
    for pair in &live_pairs {
        disable_keepalive(&pair.client)?;
    }
    wait_until(DEADLINE, "every blackholed client to be aborted", || {
        let mut closed = 0;
        for pair in &dead_pairs {
            if tcp_state(&pair.client)? == TCP_CLOSE {
                closed += 1;
            }
        }
        Ok(closed == dead_pairs.len())
    })?;
    let sweeps_through_bursts = sweeps_now()? - sweeps_before;
    for pair in &dead_pairs {
        ensure!(
            so_error(&pair.client)? == libc::ETIMEDOUT,
            "a blackholed client ended without ETIMEDOUT"
        );
    }
    // Nothing probes any more: the kernel's figures are final. (The loopback backlog may drop
    // some of the clients' RSTs in the burst, so the resets are counted on the sockets.)
    let dead_ext = dead.tcp_ext()?;
    let live_ext = live.tcp_ext()?;
    // A client's RST may still wait in the loopback backlog when the last client closes: the
    // count is final once it stops changing.
    let count_resets = || -> anyhow::Result<u64> {
        let mut resets = 0;
        for pair in &dead_pairs {
            if tcp_state(&pair.server)? == TCP_CLOSE {
                resets += 1;
            }
        }
        Ok(resets)
    };
    let mut resets = count_resets()?;
    wait_until(DEADLINE, "the servers' resets to settle", || {
        std::thread::sleep(Duration::from_secs(1));
        let now = count_resets()?;
        let settled = now == resets;
        resets = now;
        Ok(settled)
    })?;
    ensure!(
        dead_ext.get(KEEPALIVE) == 3 * BLACKHOLED as u64,
        "kernel: {} probes in the blackholed namespace, expected 3 per connection",
        dead_ext.get(KEEPALIVE)
    );
    ensure!(
        dead_ext.get(ABORT_ON_TIMEOUT) == BLACKHOLED as u64,
        "kernel: {} keepalive aborts, expected {BLACKHOLED}",
        dead_ext.get(ABORT_ON_TIMEOUT)
    );
    ensure!(
        live_ext.get(KEEPALIVE) >= ANSWERING as u64,
        "kernel: the answering namespace sent only {} probes",
        live_ext.get(KEEPALIVE)
    );
    eprintln!(
        "{test}: kernel: blackholed {} probes, {} aborts, {resets} resets received; \
         answering {} probes",
        dead_ext.get(KEEPALIVE),
        dead_ext.get(ABORT_ON_TIMEOUT),
        live_ext.get(KEEPALIVE)
    );

    let not_run = env.expiries_not_run(&not_run)?;
    // On a mismatch, say which of the programs' own loss counts moved: the failure names its cause.
    let uncounted_now = || match env.agent().map(|agent| agent.scrape()) {
        Some(Ok(metrics)) => format!(
            "uncounted by the kernel programs: {}",
            metrics.growth_since(&Metrics::default(), &UNCOUNTED_METRICS)
        ),
        Some(Err(err)) => format!("(no scrape: {err:#})"),
        None => String::new(),
    };
    env.expect_agent(
        "blackholed namespace",
        &Expectations::for_netns(dead.inum())
            .probes_unless_not_run(dead_ext.get(KEEPALIVE), not_run)
            .drops("keepalive_timeout", dead_ext.get(ABORT_ON_TIMEOUT))
            .drops("reset_received", resets)
            .other_drops_zero(),
    )
    .with_context(uncounted_now)?;
    env.expect_agent(
        "answering namespace",
        &Expectations::for_netns(live.inum())
            .probes_unless_not_run(live_ext.get(KEEPALIVE), not_run)
            .other_drops_zero(),
    )
    .with_context(uncounted_now)?;
    if let Some(agent) = env.agent() {
        let metrics = agent.scrape()?;
        let lost =
            metrics.value::<&str, &str>("keepalive_agent_ringbuf_reserve_failures_total", &[]);
        eprintln!("{test}: agent: {lost} records lost in the one-page ring buffer");
        eprintln!(
            "{test}: agent: uncounted by the kernel programs: {}",
            metrics.growth_since(&Metrics::default(), &UNCOUNTED_METRICS)
        );
        // The totals matched, so nothing may have gone uncounted (a cause counted here would be
        // offset by a count in the wrong place). Except the kernel's skips: the probes of an
        // expiry whose entry or exit the kernel did not run are counted by the next expiry on
        // that CPU in that namespace, so the totals can match with those counted.
        let uncounted = metrics.samples("keepalive_agent_kernel_uncounted_total");
        let causes = keepalive_ebpf::Uncounted::COUNT as usize;
        ensure!(
            uncounted.len() == causes,
            "expected keepalive_agent_kernel_uncounted_total for {causes} causes, got {}",
            uncounted.len()
        );
        let uncounted: f64 = uncounted
            .iter()
            .filter(|s| !matches!(s.label("cause"), Some("entry_not_run" | "exit_not_run")))
            .map(|sample| sample.value)
            .sum();
        ensure!(
            uncounted == 0.0,
            "the kernel programs left {uncounted} events uncounted although the totals matched"
        );
        ensure!(
            lost > 0.0,
            "no record was lost, so this test proved nothing about loss: raise BLACKHOLED"
        );
        let none: &[(&str, &str)] = &[];
        // The namespaces were placed in slots (the agent looks once a second; the first probes
        // are counted in the hash map, the rest at the slot): the totals above are the two
        // added up.
        let placed = metrics.value("keepalive_agent_netns_counters_placed", none);
        // Each namespace's probes after its placement were counted at its slot: more than the
        // shortfall the kernel's unrun expiries may explain, so that totals leaving the slots
        // out could not match. Both are required unless the two share a slot (then the first
        // placed holds it).
        let slots = agent.counter_slots()?;
        let cookies = agent.netns_cookies()?;
        let key = |ns: &Netns| -> anyhow::Result<NetnsKey> {
            let inum = u32::try_from(ns.inum())?;
            let cookie = *cookies
                .get(&inum)
                .with_context(|| format!("no counter entry for namespace {inum}"))?;
            Ok(NetnsKey {
                cookie,
                inum,
                _pad: 0,
            })
        };
        let keys = [key(&dead)?, key(&live)?];
        let mut at_slots = [0; 2];
        for (probes, key) in at_slots.iter_mut().zip(&keys) {
            let slot = slots
                .get(&(netns_counter_slot(key) as u32), 0)
                .context("reading NETNS_SLOTS")?;
            if slot.key == *key {
                *probes = slot.counters.probes;
            }
        }
        eprintln!(
            "{test}: agent: {placed} namespaces counted at a slot; probes counted at the slots \
             of the blackholed and the answering namespace: {at_slots:?} ({not_run} expiries \
             unrun)"
        );
        let shared = netns_counter_slot(&keys[0]) == netns_counter_slot(&keys[1]);
        let proved = at_slots.iter().filter(|&&probes| probes > not_run).count();
        ensure!(
            proved == 2 || (shared && proved == 1),
            "probes counted at the namespaces' slots {at_slots:?} (sharing one: {shared}), not \
             above the {not_run} unrun expiries: this test proved nothing about the slots"
        );
        let sweeps = metrics.value(sweep_metric::ROUNDS, none);
        let failures = metrics.value(sweep_metric::FAILURES, none);
        let swept = metrics.value(sweep_metric::ADDED, none);
        eprintln!(
            "{test}: agent: {sweeps} counter sweeps ({sweeps_through_bursts} while the \
             namespaces probed), which added {swept} probes"
        );
        ensure!(
            sweeps_through_bursts >= 100.0 && failures == 0.0,
            "the counter sweep ran {sweeps_through_bursts} times while the namespaces probed \
             (every 10ms) and failed {failures} times: too few rounds among the expiries for \
             this test to say anything about the sweep"
        );
    }
    Ok(())
}
