//! The metrics port under hostile clients: slowloris connections trickling headers and an idle
//! flood larger than the agent's file descriptor limit. `/metrics`, `/healthz` and `/readyz`
//! must answer within a second throughout, the agent must close what the hostile clients hold,
//! and it must say so in a few log lines rather than one per connection. Then SIGTERM: the
//! agent exits 0 after finishing.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use keepalive_tests::netns::run_in_netns;
use keepalive_tests::{Agent, DEADLINE, kernel_tests_enabled, skip_or_fail, wait_until};

/// The fd soft limit most distributions give a service.
const AGENT_MAX_FDS: u64 = 1024;
/// More idle connections than the agent has descriptors.
const IDLE_CLIENTS: usize = 1100;
const SLOWLORIS_CLIENTS: usize = 200;
/// The bar for every endpoint while the port is under attack.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Longer than the agent's header-read timeout, so that its closes happen during the watch.
const WATCH_FOR: Duration = Duration::from_secs(15);

/// Connects up to `n` sockets to `addr` from inside `netns` (sockets keep their namespace),
/// giving up after [`DEADLINE`] in all: an agent that stops accepting fills its backlog.
fn connect_many(netns: i32, addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    run_in_netns(netns, || {
        let start = Instant::now();
        (0..n)
            .map_while(|_| (start.elapsed() < DEADLINE).then_some(()))
            .filter_map(|()| TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok())
            .collect::<Vec<_>>()
    })
}

/// Whether the peer closed `s` (EOF or reset), without blocking.
fn closed_by_peer(s: &TcpStream) -> bool {
    s.set_nonblocking(true).ok();
    let mut buf = [0u8; 256];
    match (&*s).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[test]
fn endpoints_answer_within_a_second_while_hostile_clients_hold_sockets() -> anyhow::Result<()> {
    let test = "endpoints_answer_within_a_second_while_hostile_clients_hold_sockets";
    if !kernel_tests_enabled(test) {
        return Ok(());
    }
    let mut agent = match Agent::start_in_own_netns(&[], AGENT_MAX_FDS) {
        Ok(agent) => agent,
        Err(e) => {
            skip_or_fail(test, &format!("the agent did not start: {e:#}"));
            return Ok(());
        }
    };
    let endpoint = agent.endpoint();
    let netns = endpoint
        .netns()
        .context("the agent runs in its own namespace")?;
    let addr = endpoint.addr();

    // Slowloris: a request line and one header, then a header byte every second, never the
    // blank line that ends the headers.
    let slow = connect_many(netns, addr, SLOWLORIS_CLIENTS)?;
    // A connect can time out on a loaded machine; most must get through.
    ensure!(
        slow.len() >= SLOWLORIS_CLIENTS / 2,
        "only {} slowloris connections",
        slow.len()
    );
    for s in &slow {
        s.set_write_timeout(Some(Duration::from_secs(1)))?;
        let _ = (&*s).write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n");
    }
    let idle = connect_many(netns, addr, IDLE_CLIENTS)?;
    eprintln!(
        "{} idle and {} slowloris connections open",
        idle.len(),
        slow.len()
    );
    ensure!(
        idle.len() + slow.len() > AGENT_MAX_FDS as usize,
        "the flood did not exceed the agent's {AGENT_MAX_FDS} descriptors"
    );

    let trickling = Arc::new(AtomicBool::new(true));
    let slow = Arc::new(slow);
    let trickler = {
        let (trickling, slow) = (Arc::clone(&trickling), Arc::clone(&slow));
        std::thread::spawn(move || {
            while trickling.load(Ordering::Relaxed) {
                for s in slow.iter() {
                    let _ = (&*s).write(b"X");
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut answers = 0;
    let result = (|| -> anyhow::Result<()> {
        while start.elapsed() < WATCH_FOR {
            for path in ["/metrics", "/healthz", "/readyz"] {
                let asked = Instant::now();
                let (code, body) = endpoint
                    .get(path)
                    .with_context(|| format!("GET {path} at {:?}", start.elapsed()))?;
                let took = asked.elapsed();
                slowest = slowest.max(took);
                answers += 1;
                ensure!(code == 200, "GET {path}: {code} {body}");
                ensure!(
                    took < ANSWER_WITHIN,
                    "GET {path} took {took:?} at {:?} into the attack",
                    start.elapsed()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    trickling.store(false, Ordering::Relaxed);
    let _ = trickler.join();
    result?;
    eprintln!("{answers} answers, slowest {slowest:?}");

    // Every hostile connection is closed by the agent: shed for room or timed out, slowloris
    // included although it kept sending.
    wait_until(
        DEADLINE,
        "the agent to close every hostile connection",
        || {
            let open_idle = idle.iter().filter(|s| !closed_by_peer(s)).count();
            let open_slow = slow.iter().filter(|s| !closed_by_peer(s)).count();
            if open_idle + open_slow > 0 {
                eprintln!("still open: {open_idle} idle, {open_slow} slowloris");
            }
            Ok(open_idle + open_slow == 0)
        },
    )?;
    let metrics = agent.scrape()?;
    let shed = metrics.value::<&str, &str>("keepalive_agent_http_connections_shed_total", &[]);
    ensure!(
        shed > 0.0,
        "keepalive_agent_http_connections_shed_total = {shed}"
    );
    // A few summary lines, not one per connection.
    let log = agent.log();
    let shed_lines = log
        .lines()
        .filter(|l| l.contains("HTTP connections shed"))
        .count();
    ensure!(
        (1..=5).contains(&shed_lines),
        "{shed_lines} log lines about shed connections:\n{log}"
    );

    // SIGTERM with a connection open: the agent finishes and exits 0.
    let _held = connect_many(netns, addr, 1)?;
    let status = agent.signal_and_wait(libc::SIGTERM)?;
    ensure!(
        status.success(),
        "after SIGTERM: {status}; log:\n{}",
        agent.log()
    );
    ensure!(
        agent.log().contains("SIGTERM: shutting down"),
        "{}",
        agent.log()
    );
    Ok(())
}
