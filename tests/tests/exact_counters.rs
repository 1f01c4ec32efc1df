//! The probe and drop totals come from counters the kernel programs keep per namespace, so no
//! ring-buffer loss changes them. With the smallest ring buffer the kernel accepts (one page,
//! ~22 records) and hundreds of keepalive connections probing in the same jiffy, records are
//! lost, and still
//! - a namespace whose peers are blackholed counts exactly its `TCPKeepAlive` probes and its
//!   `TCPAbortOnTimeout` keepalive timeouts, and the resets its server sockets received,
//! - a namespace whose peers answer counts exactly its `TCPKeepAlive` probes (an answered
//!   probe's ACK can zero `icsk_probes_out` before the timer's exit hook reads it; the probes
//!   are counted from `tcp_sock.segs_out`, which no ACK resets).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::ensure;
use keepalive_tests::{
    DEADLINE, Expectations, Netns, TCP_CLOSE, TestEnv, disable_keepalive, set_keepalive, so_error,
    tcp_state, wait_until,
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
    let Some(env) = TestEnv::start_with_agent_args(test, &["--ring-buffer.bytes", "4096"]) else {
        return Ok(());
    };

    let dead = Netns::new("exact-dead")?;
    let dead_listener = dead.listen(V4)?;
    let dead_pairs = dead.connect_pairs(&dead_listener, BLACKHOLED)?;
    let live = Netns::new("exact-live")?;
    let live_listener = live.listen(V4)?;
    let live_pairs = live.connect_pairs(&live_listener, ANSWERING)?;
    // The servers' ACKs never leave: every client sends 3 probes, then its keepalive timer
    // aborts it, and its RST resets the server socket.
    let _blackhole = dead.blackhole_replies_from_port(dead_listener.local_addr()?.port())?;
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
    let mut resets = 0;
    for pair in &dead_pairs {
        if tcp_state(&pair.server)? == TCP_CLOSE {
            resets += 1;
        }
    }
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

    env.expect_agent(
        "blackholed namespace",
        &Expectations::for_netns(dead.inum())
            .probes(dead_ext.get(KEEPALIVE))
            .drops("keepalive_timeout", dead_ext.get(ABORT_ON_TIMEOUT))
            .drops("reset_received", resets)
            .other_drops_zero(),
    )?;
    env.expect_agent(
        "answering namespace",
        &Expectations::for_netns(live.inum())
            .probes(live_ext.get(KEEPALIVE))
            .other_drops_zero(),
    )?;
    if let Some(agent) = env.agent() {
        let metrics = agent.scrape()?;
        let lost =
            metrics.value::<&str, &str>("keepalive_agent_ringbuf_reserve_failures_total", &[]);
        eprintln!("{test}: agent: {lost} records lost in the one-page ring buffer");
        ensure!(
            lost > 0.0,
            "no record was lost, so this test proved nothing about loss: raise BLACKHOLED"
        );
    }
    Ok(())
}
