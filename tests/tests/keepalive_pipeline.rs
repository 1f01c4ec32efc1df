//! End-to-end scenarios: real TCP connections over the loopback of a network namespace created
//! for the test, with faults injected by nftables / SO_LINGER / `ss -K`. Each scenario checks the
//! kernel side first (socket errors, `TcpExt` counter deltas) and then that the agent's
//! per-namespace figures equal the kernel's.
//!
//! `KEEPALIVE_TESTS_KERNEL_ONLY=1` runs only the kernel-side half (no agent).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, TcpListener, TcpStream};
use std::time::Instant;

use keepalive_tests::{
    DEADLINE, Expectations, Netns, TCP_ESTABLISHED, TcpExt, TcpPair, TestEnv, disable_keepalive,
    errno_name, fill_send_buffer, rerun_when_kernel_skipped, set_keepalive, set_linger_zero,
    set_user_timeout, so_error, tcp_state, wait_closed, wait_until,
};
use libc::{ECONNABORTED, ECONNRESET, ETIMEDOUT};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Keepalive settings of every scenario: probe after 1 s idle, every 1 s, give up after 3.
const IDLE: i32 = 1;
const INTVL: i32 = 1;
const CNT: i32 = 3;

/// Kernel MIB counters (`/proc/net/netstat`, TcpExt).
const KEEPALIVE: &str = "TCPKeepAlive";
const ABORT_ON_TIMEOUT: &str = "TCPAbortOnTimeout";

type TestResult = anyhow::Result<()>;

fn assert_errno(got: i32, want: i32, what: &str) {
    assert_eq!(
        got,
        want,
        "{what}: SO_ERROR is {}, expected {}",
        errno_name(got),
        errno_name(want)
    );
}

/// The namespace's own keepalive-probe and timeout-abort counters moved by exactly this much.
fn assert_kernel_deltas(before: &TcpExt, after: &TcpExt, keepalive: u64, aborts: u64) {
    assert_eq!(
        after.delta(before, KEEPALIVE),
        keepalive,
        "kernel {KEEPALIVE} delta"
    );
    assert_eq!(
        after.delta(before, ABORT_ON_TIMEOUT),
        aborts,
        "kernel {ABORT_ON_TIMEOUT} delta"
    );
}

/// Waits until the namespace's kernel counter `key` has grown by at least `n` since `before`.
fn wait_kernel_delta(ns: &Netns, before: &TcpExt, key: &str, n: u64) -> TestResult {
    wait_until(DEADLINE, &format!("kernel {key} to grow by {n}"), || {
        Ok(ns.tcp_ext()?.delta(before, key) >= n)
    })
}

/// Reads exactly `buf.len()` bytes with a generous timeout.
fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> TestResult {
    s.set_read_timeout(Some(DEADLINE))?;
    s.read_exact(buf)?;
    Ok(())
}

/// Reads until EOF with a generous timeout.
fn read_to_eof(s: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    s.set_read_timeout(Some(DEADLINE))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Client sends "ping", server answers "pong".
fn exchange(pair: &mut TcpPair) -> TestResult {
    pair.client.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    read_exact(&mut pair.server, &mut buf)?;
    assert_eq!(&buf, b"ping");
    pair.server.write_all(b"pong")?;
    read_exact(&mut pair.client, &mut buf)?;
    assert_eq!(&buf, b"pong");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Healthy peer.

/// The scenarios that judge one connection's keepalive expiries run again when the kernel ran
/// no program for one of them (see `rerun_when_kernel_skipped`).
fn healthy_peer(test: &str, ip: IpAddr) -> TestResult {
    rerun_when_kernel_skipped(test, || healthy_peer_once(test, ip))
}

fn healthy_peer_once(test: &str, ip: IpAddr) -> TestResult {
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let ns = Netns::new("healthy")?;
    let listener = ns.listen(ip)?;
    let pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;

    // Idle for ~5 s: the kernel probes once a second. More probes than KEEPCNT with the
    // connection still up proves every probe was answered.
    wait_kernel_delta(&ns, &before, KEEPALIVE, 4)?;
    assert_eq!(tcp_state(&pair.client)?, TCP_ESTABLISHED);
    // Stop the timer so the kernel's count stops moving, then compare.
    disable_keepalive(&pair.client)?;
    let after = ns.tcp_ext()?;
    let probes = after.delta(&before, KEEPALIVE);
    assert!(probes > CNT as u64, "only {probes} probes");
    assert_eq!(after.delta(&before, ABORT_ON_TIMEOUT), 0);
    assert_eq!(tcp_state(&pair.client)?, TCP_ESTABLISHED);
    assert_errno(so_error(&pair.client)?, 0, "client");
    eprintln!("{test}: kernel TcpExt changes: {}", after.changes(&before));

    env.expect_agent(
        "answered probes are counted, nothing dropped",
        &Expectations::for_netns(ns.inum())
            .probes(probes)
            .other_drops_zero()
            .conn_probes(&pair.client_conn, probes)
            .conn_unanswered(&pair.client_conn, 0)
            .conn_not_dropped(&pair.client_conn),
    )
}

#[test]
fn healthy_peer_probes_match_kernel_and_nothing_is_dropped_ipv4() -> TestResult {
    healthy_peer(
        "healthy_peer_probes_match_kernel_and_nothing_is_dropped_ipv4",
        V4,
    )
}

#[test]
fn healthy_peer_probes_match_kernel_and_nothing_is_dropped_ipv6() -> TestResult {
    healthy_peer(
        "healthy_peer_probes_match_kernel_and_nothing_is_dropped_ipv6",
        V6,
    )
}

// ---------------------------------------------------------------------------------------------
// 2./3. Peer gone silent: keepalive timeout, with and without TCP_USER_TIMEOUT.

fn blackholed_peer(
    test: &str,
    ip: IpAddr,
    user_timeout_ms: Option<i32>,
    expected_probes: u64,
) -> TestResult {
    rerun_when_kernel_skipped(test, || {
        blackholed_peer_once(test, ip, user_timeout_ms, expected_probes)
    })
}

fn blackholed_peer_once(
    test: &str,
    ip: IpAddr,
    user_timeout_ms: Option<i32>,
    expected_probes: u64,
) -> TestResult {
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let ns = Netns::new("blackhole")?;
    let listener = ns.listen(ip)?;
    let pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    let _blackhole = ns.blackhole_replies_from_port(pair.server_port())?;
    if let Some(ms) = user_timeout_ms {
        set_user_timeout(&pair.client, ms)?;
    }
    let started = Instant::now();
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;

    let err = wait_closed(&pair.client, DEADLINE, "client")?;
    let took = started.elapsed();
    assert_errno(err, ETIMEDOUT, "client after unanswered probes");
    // The kernel's RST at the keepalive timeout reaches the server (only the server's own
    // packets are dropped): the server's connection ends with a received reset.
    let err = wait_closed(&pair.server, DEADLINE, "server")?;
    assert_errno(err, ECONNRESET, "server after the client's keepalive RST");
    let after = ns.tcp_ext()?;
    assert_kernel_deltas(&before, &after, expected_probes, 1);
    eprintln!(
        "{test}: client closed after {took:?}; kernel TcpExt changes: {}",
        after.changes(&before)
    );

    env.expect_agent(
        "keepalive timeout",
        &Expectations::keepalive_timeout(ns.inum(), &pair, expected_probes),
    )
}

#[test]
fn blackholed_peer_is_dropped_for_keepalive_timeout_after_keepcnt_probes_ipv4() -> TestResult {
    blackholed_peer(
        "blackholed_peer_is_dropped_for_keepalive_timeout_after_keepcnt_probes_ipv4",
        V4,
        None,
        CNT as u64,
    )
}

#[test]
fn blackholed_peer_is_dropped_for_keepalive_timeout_after_keepcnt_probes_ipv6() -> TestResult {
    blackholed_peer(
        "blackholed_peer_is_dropped_for_keepalive_timeout_after_keepcnt_probes_ipv6",
        V6,
        None,
        CNT as u64,
    )
}

#[test]
fn user_timeout_ends_keepalive_after_fewer_probes_and_is_a_keepalive_timeout() -> TestResult {
    // Probes at 1 s and 2 s; at 3 s 2.5 s have passed since the last received segment with a
    // probe out, so the kernel aborts before a third probe.
    blackholed_peer(
        "user_timeout_ends_keepalive_after_fewer_probes_and_is_a_keepalive_timeout",
        V4,
        Some(2500),
        2,
    )
}

// ---------------------------------------------------------------------------------------------
// 4. Peer lost its socket silently; the probe is answered with RST.

#[test]
fn peer_that_lost_its_socket_answers_the_probe_with_rst_counted_as_keepalive_reset() -> TestResult {
    let test = "peer_that_lost_its_socket_answers_the_probe_with_rst_counted_as_keepalive_reset";
    rerun_when_kernel_skipped(test, || peer_that_lost_its_socket(test))
}

fn peer_that_lost_its_socket(test: &str) -> TestResult {
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let ns = Netns::new("lost")?;
    let listener = ns.listen(V4)?;
    let pair = ns.connect_pair(&listener)?;
    let TcpPair {
        client,
        server,
        client_conn,
        server_conn,
    } = pair;
    let before = ns.tcp_ext()?;

    // The server forgets the connection: abortive close whose RST never leaves the host.
    let mut no_rst = ns.drop_resets_from_port(server_conn.local.port())?;
    drop(listener);
    set_linger_zero(&server)?;
    drop(server);
    no_rst.remove()?;
    assert_eq!(
        tcp_state(&client)?,
        TCP_ESTABLISHED,
        "the client must not have seen the server's RST"
    );

    set_keepalive(&client, IDLE, INTVL, CNT)?;
    let err = wait_closed(&client, DEADLINE, "client")?;
    assert_errno(err, ECONNRESET, "client after its probe met a closed port");
    let after = ns.tcp_ext()?;
    assert_kernel_deltas(&before, &after, 1, 0);
    eprintln!("{test}: kernel TcpExt changes: {}", after.changes(&before));

    // The server's own abortive close (SO_LINGER 0, straight from ESTABLISHED to CLOSE) is a
    // local abort.
    env.expect_agent(
        "RST in answer to a keepalive probe",
        &Expectations::for_netns(ns.inum())
            .probes(1)
            .drops("keepalive_reset", 1)
            .drops("local_abort", 1)
            .drops("reset_received", 0)
            .drops("keepalive_timeout", 0)
            .drops("retransmit_timeout", 0)
            .drops("zero_window_timeout", 0)
            .drops("connect_timeout", 0)
            .conn_probes(&client_conn, 1)
            .conn_dropped(&client_conn, "keepalive_reset"),
    )
}

// ---------------------------------------------------------------------------------------------
// 5. Unacknowledged data: retransmission timeout, not keepalive.

#[test]
fn unacknowledged_data_to_dead_peer_is_a_retransmit_timeout_not_a_keepalive_timeout() -> TestResult
{
    let test = "unacknowledged_data_to_dead_peer_is_a_retransmit_timeout_not_a_keepalive_timeout";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let ns = Netns::new("rto")?;
    // tcp_retries2=3: the kernel gives up at the first RTO expiry at least 3 s (15 x RTO_MIN)
    // after the first retransmission — about 7 s here instead of ~15 min.
    ns.sysctl("net.ipv4.tcp_retries2", "3")?;
    let listener = ns.listen(V4)?;
    let mut pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    let _blackhole = ns.blackhole_replies_from_port(pair.server_port())?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    let started = Instant::now();
    pair.client.write_all(b"never acknowledged")?;

    let err = wait_closed(&pair.client, DEADLINE, "client")?;
    let took = started.elapsed();
    assert_errno(err, ETIMEDOUT, "client after retransmissions");
    // No RST on a retransmission timeout: the server's connection lives on, with the data.
    let mut buf = [0u8; 18];
    read_exact(&mut pair.server, &mut buf)?;
    assert_eq!(&buf, b"never acknowledged");
    assert_eq!(tcp_state(&pair.server)?, TCP_ESTABLISHED);
    let after = ns.tcp_ext()?;
    assert_kernel_deltas(&before, &after, 0, 1);
    eprintln!(
        "{test}: client closed after {took:?}; kernel TcpExt changes: {}",
        after.changes(&before)
    );

    env.expect_agent(
        "retransmission timeout",
        &Expectations::write_timer_drop_unprobed(ns.inum(), &pair, "retransmit_timeout"),
    )
}

// ---------------------------------------------------------------------------------------------
// 5b. The other write-timer aborts: zero-window probes and SYN retries.

#[test]
fn unanswered_zero_window_probes_are_a_zero_window_timeout() -> TestResult {
    let test = "unanswered_zero_window_probes_are_a_zero_window_timeout";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let ns = Netns::new("zwp")?;
    // tcp_probe_timer gives up after tcp_retries2 unanswered zero-window probes.
    ns.sysctl("net.ipv4.tcp_retries2", "3")?;
    let listener = ns.listen(V4)?;
    let pair = ns.connect_pair(&listener)?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    let before = ns.tcp_ext()?;

    // The server never reads: once its receive buffer is full it advertises a zero window and
    // the client, with data still queued, sends window probes (TcpExt TCPWinProbe).
    fill_send_buffer(&pair.client)?;
    wait_kernel_delta(&ns, &before, "TCPWinProbe", 1)?;
    // Now nothing answers the probes.
    let _blackhole = ns.blackhole_replies_from_port(pair.server_port())?;
    let err = wait_closed(&pair.client, DEADLINE, "client")?;
    assert_errno(err, ETIMEDOUT, "client after unanswered window probes");
    let after = ns.tcp_ext()?;
    // Keepalive never probes a connection with data queued.
    assert_kernel_deltas(&before, &after, 0, 1);
    eprintln!("{test}: kernel TcpExt changes: {}", after.changes(&before));

    env.expect_agent(
        "zero-window probe timeout",
        &Expectations::write_timer_drop(ns.inum(), &pair, 0, "zero_window_timeout"),
    )
}

#[test]
fn unanswered_syn_is_a_connect_timeout() -> TestResult {
    let test = "unanswered_syn_is_a_connect_timeout";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let ns = Netns::new("syn")?;
    // One SYN retransmission: the kernel gives up after about 3 s.
    ns.sysctl("net.ipv4.tcp_syn_retries", "1")?;
    let listener = ns.listen(V4)?;
    let addr = listener.local_addr()?;
    let _blackhole = ns.blackhole_replies_from_port(addr.port())?;
    let before = ns.tcp_ext()?;

    let result = ns.run(|| TcpStream::connect(addr))?;
    let err = result.expect_err("connect must fail while SYN-ACKs are dropped");
    assert_eq!(err.raw_os_error(), Some(ETIMEDOUT), "connect error: {err}");
    let after = ns.tcp_ext()?;
    assert_kernel_deltas(&before, &after, 0, 1);
    eprintln!("{test}: kernel TcpExt changes: {}", after.changes(&before));

    env.expect_agent(
        "connect timeout",
        &Expectations::for_netns(ns.inum())
            .probes(0)
            .drops("connect_timeout", 1)
            .other_drops_zero(),
    )
}

// ---------------------------------------------------------------------------------------------
// 6. Resets during normal traffic and local aborts.

#[test]
fn rst_from_peer_during_traffic_is_counted_as_reset_received() -> TestResult {
    let test = "rst_from_peer_during_traffic_is_counted_as_reset_received";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let ns = Netns::new("rst")?;
    let listener = ns.listen(V4)?;
    let mut pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    exchange(&mut pair)?;
    let TcpPair {
        client,
        server,
        client_conn,
        ..
    } = pair;
    set_linger_zero(&server)?;
    drop(server);

    let err = wait_closed(&client, DEADLINE, "client")?;
    assert_errno(err, ECONNRESET, "client after the server's RST");
    let after = ns.tcp_ext()?;
    assert_kernel_deltas(&before, &after, 0, 0);

    eprintln!("{test}: kernel TcpExt changes: {}", after.changes(&before));

    env.expect_agent(
        "reset received",
        &Expectations::for_netns(ns.inum())
            .probes(0)
            .drops("reset_received", 1)
            // The server's SO_LINGER 0 close that sent the RST.
            .drops("local_abort", 1)
            .drops("keepalive_timeout", 0)
            .drops("keepalive_reset", 0)
            .drops("retransmit_timeout", 0)
            .drops("zero_window_timeout", 0)
            .drops("connect_timeout", 0)
            // It never probed (the reset came long before its idle): like a connection
            // without `SO_KEEPALIVE`, counted above and not sent. `close_reports` has a reset
            // connection that probed, whose drop gets its series.
            .conn_without_series(&client_conn),
    )
}

#[test]
fn socket_destroyed_with_ss_kill_is_a_local_abort_and_a_reset_for_its_peer() -> TestResult {
    let test = "socket_destroyed_with_ss_kill_is_a_local_abort_and_a_reset_for_its_peer";
    // The server has no SO_KEEPALIVE: its drop gets a series of its own only with this flag.
    let Some(env) = TestEnv::start_with_agent_args(test, &["--connections.keepalive-off-drops"])
    else {
        return Ok(());
    };
    let ns = Netns::new("sskill")?;
    let listener = ns.listen(V4)?;
    let mut pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    exchange(&mut pair)?;

    let client_port = pair.client_conn.local.port().to_string();
    let out = ns.ss_kill(&["sport", "=", &format!(":{client_port}")])?;
    assert!(
        out.contains(&format!(":{client_port}")),
        "ss -K did not list the client socket:\n{out}"
    );
    let err = wait_closed(&pair.client, DEADLINE, "client")?;
    assert_errno(err, ECONNABORTED, "client destroyed by ss -K");
    let err = wait_closed(&pair.server, DEADLINE, "server")?;
    assert_errno(err, ECONNRESET, "server after the client's abort RST");
    let after = ns.tcp_ext()?;
    assert_kernel_deltas(&before, &after, 0, 0);

    eprintln!("{test}: kernel TcpExt changes: {}", after.changes(&before));

    env.expect_agent(
        "ss -K",
        &Expectations::for_netns(ns.inum())
            .probes(0)
            .drops("local_abort", 1)
            .drops("reset_received", 1)
            .other_drops_zero()
            .conn_dropped(&pair.client_conn, "local_abort")
            .conn_dropped(&pair.server_conn, "reset_received"),
    )
}

// ---------------------------------------------------------------------------------------------
// 7. Orderly close.

#[test]
fn orderly_close_with_keepalive_on_is_not_a_drop() -> TestResult {
    let test = "orderly_close_with_keepalive_on_is_not_a_drop";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let ns = Netns::new("orderly")?;
    let listener = ns.listen(V4)?;
    let pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    set_keepalive(&pair.server, IDLE, INTVL, CNT)?;
    // Let keepalive run a little so the connection is known to the agent.
    wait_kernel_delta(&ns, &before, KEEPALIVE, 2)?;

    let TcpPair {
        mut client,
        mut server,
        client_conn,
        server_conn,
    } = pair;
    client.write_all(b"bye")?;
    client.shutdown(Shutdown::Write)?;
    assert_eq!(read_to_eof(&mut server)?, b"bye");
    server.write_all(b"ok")?;
    drop(server);
    assert_eq!(read_to_eof(&mut client)?, b"ok");
    drop(client);

    // A marker connection probed after the close: once the agent has counted its probes too, it
    // has seen everything the closed connection produced.
    let marker_base = ns.tcp_ext()?;
    let marker = ns.connect_pair(&listener)?;
    set_keepalive(&marker.client, IDLE, INTVL, CNT)?;
    wait_kernel_delta(&ns, &marker_base, KEEPALIVE, 1)?;
    disable_keepalive(&marker.client)?;
    let after = ns.tcp_ext()?;
    let probes = after.delta(&before, KEEPALIVE);
    assert_eq!(
        after.delta(&before, ABORT_ON_TIMEOUT),
        0,
        "kernel {ABORT_ON_TIMEOUT} delta"
    );
    eprintln!("{test}: kernel TcpExt changes: {}", after.changes(&before));

    env.expect_agent(
        "orderly close",
        &Expectations::for_netns(ns.inum())
            .probes(probes)
            .other_drops_zero()
            .conn_not_dropped(&client_conn)
            .conn_not_dropped(&server_conn)
            .conn_not_dropped(&marker.client_conn),
    )?;
    drop(marker);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. Many connections in several namespaces.

const NAMESPACES: usize = 3;
const HEALTHY_PER_NS: usize = 50;
const DEAD_PER_NS: usize = 50;

struct Crowd {
    ns: Netns,
    _listeners: [TcpListener; 2],
    healthy: Vec<TcpPair>,
    dead: Vec<TcpPair>,
    before: TcpExt,
}

#[test]
fn many_connections_in_three_namespaces_match_kernel_counters() -> TestResult {
    let test = "many_connections_in_three_namespaces_match_kernel_counters";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let not_run = env.count_expiries_not_run();
    let mut crowds = Vec::new();
    let mut rules = Vec::new();
    for i in 0..NAMESPACES {
        let ns = Netns::new(&format!("many{i}"))?;
        let healthy_listener = ns.listen(V4)?;
        let dead_listener = ns.listen(V4)?;
        let healthy = ns.connect_pairs(&healthy_listener, HEALTHY_PER_NS)?;
        let dead = ns.connect_pairs(&dead_listener, DEAD_PER_NS)?;
        let before = ns.tcp_ext()?;
        rules.push(ns.blackhole_replies_from_port(dead_listener.local_addr()?.port())?);
        for p in healthy.iter().chain(&dead) {
            set_keepalive(&p.client, IDLE, INTVL, CNT)?;
        }
        crowds.push(Crowd {
            ns,
            _listeners: [healthy_listener, dead_listener],
            healthy,
            dead,
            before,
        });
    }

    for c in &crowds {
        for p in &c.dead {
            let err = wait_closed(&p.client, DEADLINE, "blackholed client")?;
            assert_errno(err, ETIMEDOUT, "blackholed client");
            let err = wait_closed(&p.server, DEADLINE, "server of a blackholed client")?;
            assert_errno(err, ECONNRESET, "server of a blackholed client");
        }
        // Each healthy connection gets past KEEPCNT probes and stays up.
        let want = (DEAD_PER_NS * CNT as usize + HEALTHY_PER_NS * (CNT as usize + 1)) as u64;
        wait_kernel_delta(&c.ns, &c.before, KEEPALIVE, want)?;
    }
    for c in &mut crowds {
        for p in &c.healthy {
            assert_eq!(tcp_state(&p.client)?, TCP_ESTABLISHED);
        }
        // Orderly close of the healthy half; the kernel's counts stop moving.
        c.healthy.clear();
    }

    let dead = DEAD_PER_NS as u64;
    let not_run = env.expiries_not_run(&not_run)?;
    for c in &crowds {
        let after = c.ns.tcp_ext()?;
        let probes = after.delta(&c.before, KEEPALIVE);
        let aborts = after.delta(&c.before, ABORT_ON_TIMEOUT);
        assert_eq!(
            aborts,
            dead,
            "kernel {ABORT_ON_TIMEOUT} delta in {}",
            c.ns.name()
        );
        eprintln!(
            "{test}: {}: kernel TcpExt changes: {}",
            c.ns.name(),
            after.changes(&c.before)
        );
        env.expect_agent(
            &format!("namespace {}", c.ns.name()),
            &Expectations::for_netns(c.ns.inum())
                .probes_unless_not_run(probes, not_run)
                .drops("keepalive_timeout", aborts)
                .drops("reset_received", dead)
                .other_drops_zero(),
        )?;
    }
    if let Some(agent) = env.agent() {
        let m = agent.scrape()?;
        let none: &[(&str, &str)] = &[];
        assert_eq!(
            m.value("keepalive_agent_ringbuf_reserve_failures_total", none),
            0.0,
            "the agent lost events"
        );
    }
    for c in &mut crowds {
        c.dead.clear();
    }
    drop(rules);
    Ok(())
}

#[test]
fn agent_is_healthy_ready_and_reports_every_hook_attached() -> TestResult {
    let test = "agent_is_healthy_ready_and_reports_every_hook_attached";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        eprintln!("{test}: nothing to check without the agent");
        return Ok(());
    };
    assert_eq!(agent.get("/healthz")?.0, 200, "/healthz");
    assert_eq!(agent.get("/readyz")?.0, 200, "/readyz");
    let m = agent.scrape()?;
    let hooks = m.samples("keepalive_agent_hook_attached");
    assert!(
        !hooks.is_empty(),
        "no keepalive_agent_hook_attached series:\n{}",
        m.raw()
    );
    // The timer programs read the socket with typed loads wherever the kernel has the kfunc
    // bpf_rdonly_cast (6.2+); falling back to helper reads would pass every other test.
    let btf = std::fs::read("/sys/kernel/btf/vmlinux")?;
    let rdonly_cast = btf.windows(17).any(|w| w == b"\0bpf_rdonly_cast\0");
    for h in hooks {
        assert_eq!(h.value, 1.0, "hook not attached although ready: {h:?}");
        let hook = h.label("hook").unwrap_or_default();
        if hook.starts_with("timer_expire_") {
            let typed = format!("{hook}_typed");
            let expected = if rdonly_cast { typed.as_str() } else { hook };
            assert_eq!(h.label("program"), Some(expected), "{h:?}");
        }
    }
    for name in [
        "keepalive_agent_ringbuf_reserve_failures_total",
        "keepalive_agent_tracked_connections",
    ] {
        assert!(
            !m.samples(name).is_empty(),
            "no {name} series:\n{}",
            m.raw()
        );
    }
    Ok(())
}

/// A kernel-side sanity check that needs no agent: the harness's namespace plumbing works
/// (counters are per namespace, sysctls are per namespace).
#[test]
fn namespaces_have_their_own_counters_and_sysctls() -> TestResult {
    let test = "namespaces_have_their_own_counters_and_sysctls";
    if !keepalive_tests::kernel_tests_enabled(test) {
        return Ok(());
    }
    let a = Netns::new("own-a")?;
    let b = Netns::new("own-b")?;
    assert_ne!(a.inum(), b.inum());
    a.sysctl("net.ipv4.tcp_retries2", "4")?;
    let in_b = b.exec("sysctl", &["-n", "net.ipv4.tcp_retries2"])?;
    assert_eq!(
        in_b.trim(),
        "15",
        "a sysctl in one namespace leaked into another"
    );
    let in_a = a.exec("sysctl", &["-n", "net.ipv4.tcp_retries2"])?;
    assert_eq!(in_a.trim(), "4");

    let (before_a, before_b) = (a.tcp_ext()?, b.tcp_ext()?);
    let listener = a.listen(V4)?;
    let pair = a.connect_pair(&listener)?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    wait_kernel_delta(&a, &before_a, KEEPALIVE, 1)?;
    assert_eq!(b.tcp_ext()?.delta(&before_b, KEEPALIVE), 0);
    // What `ip netns exec` sees is what the setns'd thread read.
    let via_exec =
        keepalive_tests::netns::parse_netstat(&a.exec("cat", &["/proc/net/netstat"])?, "TcpExt")?;
    assert!(via_exec[KEEPALIVE] > before_a.get(KEEPALIVE));
    drop(pair);
    Ok(())
}
