//! The scenario program of `cargo xtask vm`: runs inside a qemu guest booted on a Debian kernel,
//! next to a `keepalive-agent run` started by the guest's `/init`, and checks the agent against
//! the kernel's own counters on that kernel.
//!
//! Every scenario runs at the same time in a network namespace of its own (made with unshare:
//! the guest has no iproute2 or nftables), so one agent serves them all and each is compared by
//! the `netns` label. A peer is blackholed with a drop-everything socket filter on the socket
//! that must stop hearing it. The oracle is the namespace's `TcpExt` (`TCPKeepAlive`,
//! `TCPAbortOnTimeout`) in `/proc/net/netstat`.
//!
//! Output on stdout (the guest's serial console), one tagged line each, read by xtask's vm
//! module (`xtask/src/vm/report.rs` is the other end of this format):
//! - `KAT-READY <seconds>`: the agent answered `/readyz` 200
//! - `KAT-HOOK <tracepoint> <0|1> <program>`: `keepalive_agent_hook_attached` once the agent is
//!   ready, and the variant that attached
//! - `KAT-PLAN <scenario>...`: the scenarios about to run
//! - `KAT-RESULT <json>`: one per scenario, when it ends (fields in [`report`])
//! - `KAT-SWEEP <sweeps> <failures> <probes>`: the agent's counter sweep after the scenarios
//!   (`keepalive_agent_probe_sweep*_total`; `absent` when the agent has none: its program
//!   did not load)
//! - `KAT-AGENT-LOG <line>`: the agent's warnings and errors, or its whole log tail on failure
//! - `KAT-FATAL <text>`: the run could not happen (agent never ready)
//! - `KAT-DONE <scenarios> <failed>`: the last line; a console without it was cut short
//!
//! Also runs on a host as root next to a running agent, to debug scenarios without qemu:
//! `guest-scenarios --agent 127.0.0.1:9879 [--only NAME]`.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use keepalive_agent::sweep_metric;
use keepalive_tests::{
    AgentEndpoint, DEADLINE, DROP_REASONS, Expectations, Metrics, Netns, TCP_ESTABLISHED, TcpExt,
    TcpPair, accept_incoming_again, connect_deaf, disable_keepalive, drop_all_incoming, errno_name,
    expect, fill_send_buffer, set_keepalive, set_linger_zero, set_user_timeout, so_error,
    sockets_json, tcp_state, wait_closed, wait_until,
};
use libc::{ECONNRESET, ETIMEDOUT};
use serde_json::json;

/// Keepalive settings of every scenario: probe after 1 s idle, every 1 s, give up after 3.
const IDLE: i32 = 1;
const INTVL: i32 = 1;
const CNT: i32 = 3;

const KEEPALIVE: &str = "TCPKeepAlive";
const ABORT_ON_TIMEOUT: &str = "TCPAbortOnTimeout";

/// Loading and attaching every program under qemu's TCG takes far longer than on hardware.
const READY_DEADLINE: Duration = Duration::from_secs(240);
/// How long the agent gets to show a scenario's figures after the kernel is done. Generous:
/// all scenarios of a guest finish at about the same time on emulated CPUs.
const AGENT_DEADLINE: Duration = Duration::from_secs(45);
/// How long a deleted namespace's inode may take to come back, and how many namespaces are
/// deleted to get one back (see `recycled_namespace`).
const INODE_REUSE_DEADLINE: Duration = Duration::from_secs(40);
const INODE_REUSE_ATTEMPTS: usize = 3;

/// What one scenario leaves for the comparison.
struct Outcome {
    keepalive_probes: u64,
    timeout_aborts: u64,
    expected: Expectations,
    /// Connections kept open until the agent has been compared: closing them earlier would add
    /// closes (a FIN met by RST, unread data) that the scenario is not about.
    hold: Vec<TcpPair>,
}

struct Scenario {
    name: &'static str,
    /// The kernel behaviour it provokes and the drop reason the agent must give, for the matrix.
    expect: &'static str,
    run: fn(&Netns) -> anyhow::Result<Outcome>,
}

const SCENARIOS: [Scenario; 12] = [
    Scenario {
        name: "healthy_peer",
        expect: "probes answered, no drop",
        run: healthy_peer,
    },
    Scenario {
        name: "blackholed_keepalive_timeout",
        expect: "3 probes, keepalive_timeout",
        run: blackholed_keepalive_timeout,
    },
    Scenario {
        name: "user_timeout",
        expect: "2 probes (TCP_USER_TIMEOUT 4500 ms, interval 2 s), keepalive_timeout",
        run: user_timeout,
    },
    Scenario {
        name: "peer_lost_socket",
        expect: "1 probe answered by RST, keepalive_reset",
        run: peer_lost_socket,
    },
    Scenario {
        name: "retransmission_timeout",
        expect: "no probe, retransmit_timeout (never probed: no per-connection series)",
        run: retransmission_timeout,
    },
    Scenario {
        name: "retransmission_timeout_after_probe",
        expect: "1 unanswered probe, then data: retransmit_timeout",
        run: retransmission_timeout_after_probe,
    },
    Scenario {
        name: "zero_window_timeout",
        expect: "no probe, zero_window_timeout",
        run: zero_window_timeout,
    },
    Scenario {
        name: "connect_timeout",
        expect: "no probe, connect_timeout",
        run: connect_timeout,
    },
    Scenario {
        name: "audit_every_namespace",
        expect: "audit: 1 connection with keepalive, 1 without; `sockets --all` lists the listener",
        run: audit_every_namespace,
    },
    Scenario {
        name: "recycled_namespace",
        expect: "a new namespace on a deleted one's inode counts only its own probes",
        run: recycled_namespace,
    },
    Scenario {
        name: "orderly_close",
        expect: "probes answered, FIN close, no drop",
        run: orderly_close,
    },
    Scenario {
        name: "ipvs_timeout",
        expect: "IPVS's TCP timeout set to 1234 s before the agent started: threshold ipvs=1234 \
                 (900, IPVS's default, on 5.10: no module BTF), also read from a private network \
                 and PID namespace; retuned to 1500 s while it runs: 1500; applies to the 2 of 3 \
                 connections IPVS carries",
        run: ipvs_timeout,
    },
];

struct Args {
    /// `--ipvs-setup`: configure IPVS for the `ipvs_timeout` scenario and exit (run by the
    /// guest's `/init` after loading the modules, before the agent starts).
    ipvs_setup: bool,
    agent: SocketAddr,
    agent_log: Option<PathBuf>,
    only: Vec<String>,
    poweroff: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        ipvs_setup: false,
        agent: SocketAddr::from((Ipv4Addr::LOCALHOST, 9879)),
        agent_log: None,
        only: Vec::new(),
        poweroff: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--agent" => args.agent = value()?.parse().context("--agent ADDR:PORT")?,
            "--agent-log" => args.agent_log = Some(PathBuf::from(value()?)),
            "--only" => args.only.push(value()?),
            "--poweroff" => args.poweroff = true,
            "--ipvs-setup" => args.ipvs_setup = true,
            _ => bail!(
                "usage: guest-scenarios [--agent ADDR:PORT] [--agent-log FILE] [--only NAME]... \
                 [--poweroff] | --ipvs-setup; scenarios: {}",
                SCENARIOS.map(|s| s.name).join(", ")
            ),
        }
    }
    for name in &args.only {
        ensure!(
            SCENARIOS.iter().any(|s| s.name == name),
            "unknown scenario {name}"
        );
    }
    Ok(args)
}

fn main() {
    let started = Instant::now();
    let (scenarios, failed) = match parse_args() {
        Ok(args) if args.ipvs_setup => match ipvs::setup() {
            Ok(said) => {
                println!("{said}");
                std::process::exit(0)
            }
            Err(err) => {
                println!("IPVS setup failed: {err:#}");
                std::process::exit(1)
            }
        },
        Ok(args) => {
            let counts = run(&args, started);
            if args.poweroff {
                // `--poweroff` is given by the guest's /init, which exec'd us as pid 1.
                finish(counts, started);
                power_off();
            }
            counts
        }
        Err(err) => {
            println!("KAT-FATAL {err:#}");
            (0, 1)
        }
    };
    finish((scenarios, failed), started);
    std::process::exit(i32::from(failed > 0));
}

fn finish((scenarios, failed): (usize, usize), started: Instant) {
    println!(
        "KAT-DONE {scenarios} {failed} {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    // The console is a serial line: wait until the UART has sent everything before the
    // machine goes away.
    // SAFETY: plain call on our stdout descriptor.
    unsafe { libc::tcdrain(libc::STDOUT_FILENO) };
}

/// Runs the scenarios against the agent; returns (scenarios run, scenarios failed).
/// The agent, for scenarios that must see it count something before they go on.
static AGENT: OnceLock<AgentEndpoint> = OnceLock::new();
/// The agent's log (`--agent-log`), for scenarios that check what it said.
static AGENT_LOG: OnceLock<Option<PathBuf>> = OnceLock::new();

fn run(args: &Args, started: Instant) -> (usize, usize) {
    let agent = AgentEndpoint::new(args.agent);
    let _ = AGENT.set(agent);
    let _ = AGENT_LOG.set(args.agent_log.clone());
    if let Err(err) = agent.wait_ready(READY_DEADLINE, || Ok(())) {
        println!(
            "KAT-FATAL the agent at {} is not ready: {err:#}",
            args.agent
        );
        print_agent_log(args, None);
        return (0, 1);
    }
    println!("KAT-READY {:.1}s", started.elapsed().as_secs_f64());
    match agent.scrape() {
        Ok(m) => {
            for hook in m.samples("keepalive_agent_hook_attached") {
                println!(
                    "KAT-HOOK {} {} {}",
                    hook.label("hook").unwrap_or("?"),
                    hook.value,
                    hook.label("program").unwrap_or("-")
                );
            }
        }
        Err(err) => println!("KAT-FATAL first scrape failed: {err:#}"),
    }

    let selected: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.name))
        .collect();
    println!(
        "KAT-PLAN {}",
        selected
            .iter()
            .map(|s| s.name)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Every namespace exists until all comparisons are done: a freed namespace's inode number
    // is handed to the next one created, which would merge two scenarios' counters.
    let namespaces: Vec<anyhow::Result<Netns>> =
        selected.iter().map(|s| Netns::unshared(s.name)).collect();
    let failed = std::thread::scope(|scope| {
        let handles: Vec<_> = selected
            .iter()
            .zip(&namespaces)
            .map(|(scenario, ns)| scope.spawn(move || run_one(scenario, ns, agent)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(false))
            .filter(|passed| !passed)
            .count()
    });
    print_counter_sweep(agent);
    print_agent_log(args, (failed == 0).then_some("WARN"));
    (selected.len(), failed)
}

/// The `KAT-SWEEP` line: whether the counter sweep's program loaded and ran on this kernel.
fn print_counter_sweep(agent: AgentEndpoint) {
    let none: &[(&str, &str)] = &[];
    match agent.scrape() {
        Ok(m) if m.samples(sweep_metric::ROUNDS).is_empty() => {
            println!("KAT-SWEEP absent")
        }
        Ok(m) => println!(
            "KAT-SWEEP {} {} {}",
            m.value(sweep_metric::ROUNDS, none),
            m.value(sweep_metric::FAILURES, none),
            m.value(sweep_metric::ADDED, none)
        ),
        Err(err) => println!("KAT-SWEEP absent (scrape failed: {err:#})"),
    }
}

/// Runs one scenario and prints its `KAT-RESULT` line; true when it passed.
fn run_one(scenario: &Scenario, ns: &anyhow::Result<Netns>, agent: AgentEndpoint) -> bool {
    let started = Instant::now();
    let outcome = match ns {
        Ok(ns) => (scenario.run)(ns).map(|outcome| (ns.inum(), outcome)),
        Err(err) => Err(anyhow::anyhow!("creating its network namespace: {err:#}")),
    };
    let kernel_done = started.elapsed().as_secs_f64();
    // The namespace the expectations are about (a scenario may make its own).
    let outcome = outcome.map(|(_, outcome)| (outcome.expected.netns(), outcome));
    let (netns, outcome) = match outcome {
        Ok(ok) => ok,
        Err(err) => {
            report(json!({
                "scenario": scenario.name,
                "expect": scenario.expect,
                "error": format!("the scenario itself failed (kernel side): {err:#}"),
                "seconds": kernel_done,
            }));
            return false;
        }
    };
    let (mismatches, last) = match agent.poll_until(&outcome.expected, AGENT_DEADLINE) {
        Ok(m) => (Vec::new(), Some(m)),
        Err(never) => {
            let mismatches = match &never.last {
                Some(m) => outcome.expected.mismatches(m),
                None => vec![never.problem.clone()],
            };
            (mismatches, never.last)
        }
    };
    drop(outcome.hold);
    let agent_figures = last.as_ref().map(|m| agent_figures(m, netns));
    let passed = mismatches.is_empty();
    report(json!({
        "scenario": scenario.name,
        "expect": scenario.expect,
        "netns": netns,
        "kernel": {
            KEEPALIVE: outcome.keepalive_probes,
            ABORT_ON_TIMEOUT: outcome.timeout_aborts,
        },
        "agent": agent_figures,
        "mismatches": mismatches,
        "seconds": started.elapsed().as_secs_f64(),
        "kernel_seconds": kernel_done,
    }));
    passed
}

/// The agent's aggregate figures for one namespace: probes, and drops by reason (non-zero only).
fn agent_figures(m: &Metrics, netns: u64) -> serde_json::Value {
    let ns = netns.to_string();
    let probes = m.value(expect::PROBES, &[("netns", ns.as_str())]);
    let drops: serde_json::Map<String, serde_json::Value> = DROP_REASONS
        .iter()
        .filter_map(|reason| {
            let n = m.value(expect::DROPS, &[("netns", ns.as_str()), ("reason", reason)]);
            (n != 0.0).then(|| ((*reason).to_owned(), json!(n)))
        })
        .collect();
    json!({ "probes": probes, "drops": drops })
}

/// One `KAT-RESULT` line; the whole line is written at once so concurrent scenarios do not
/// interleave.
fn report(value: serde_json::Value) {
    println!("KAT-RESULT {value}");
}

/// The agent's log: `filter` keeps only lines containing it (the warnings of a passing run), or
/// everything on failure (the last 80 lines).
fn print_agent_log(args: &Args, filter: Option<&str>) {
    let Some(path) = &args.agent_log else {
        return;
    };
    let log = match std::fs::read_to_string(path) {
        Ok(log) => log,
        Err(err) => {
            println!("KAT-AGENT-LOG <cannot read {}: {err}>", path.display());
            return;
        }
    };
    let lines: Vec<&str> = match filter {
        Some(word) => log
            .lines()
            .filter(|l| l.contains(word) || l.contains("ERROR"))
            .collect(),
        None => log.lines().collect(),
    };
    for line in &lines[lines.len().saturating_sub(80)..] {
        println!("KAT-AGENT-LOG {line}");
    }
}

fn power_off() -> ! {
    // SAFETY: plain syscalls; as pid 1 in a throwaway guest nothing else needs to run.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only reached when not allowed to power off (not root): exit instead.
    std::process::exit(1)
}

// ---------------------------------------------------------------------------------------------
// Scenarios. Each checks the kernel side with `ensure!` (the scenario did what it is meant to)
// and returns the kernel's counter deltas and what the agent must show for its namespace.

fn ensure_errno(got: i32, want: i32, what: &str) -> anyhow::Result<()> {
    ensure!(
        got == want,
        "{what}: SO_ERROR is {}, expected {}",
        errno_name(got),
        errno_name(want)
    );
    Ok(())
}

/// The kernel's deltas since `before`, checked against what the scenario provokes.
fn kernel_deltas(
    ns: &Netns,
    before: &TcpExt,
    keepalive: Option<u64>,
    aborts: u64,
) -> anyhow::Result<(u64, u64)> {
    let after = ns.tcp_ext()?;
    let (probes, timeouts) = (
        after.delta(before, KEEPALIVE),
        after.delta(before, ABORT_ON_TIMEOUT),
    );
    ensure!(
        keepalive.is_none_or(|want| probes == want) && timeouts == aborts,
        "kernel {KEEPALIVE} +{probes} {ABORT_ON_TIMEOUT} +{timeouts}, the scenario expects \
         {KEEPALIVE} +{} {ABORT_ON_TIMEOUT} +{aborts} (TcpExt changes: {})",
        keepalive.map_or("any".to_owned(), |n| n.to_string()),
        after.changes(before)
    );
    Ok((probes, timeouts))
}

fn wait_kernel_delta(ns: &Netns, before: &TcpExt, key: &str, n: u64) -> anyhow::Result<()> {
    wait_until(DEADLINE, &format!("kernel {key} to grow by {n}"), || {
        Ok(ns.tcp_ext()?.delta(before, key) >= n)
    })
}

fn listen(ns: &Netns) -> anyhow::Result<TcpListener> {
    ns.listen(Ipv4Addr::LOCALHOST.into())
}

fn read_to_eof(s: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    s.set_read_timeout(Some(DEADLINE))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn healthy_peer(ns: &Netns) -> anyhow::Result<Outcome> {
    let listener = listen(ns)?;
    let pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    // More probes than KEEPCNT with the connection still up proves every one was answered.
    wait_kernel_delta(ns, &before, KEEPALIVE, CNT as u64 + 1)?;
    // Stop the timer so the kernel's count stops moving, then compare.
    disable_keepalive(&pair.client)?;
    ensure!(
        tcp_state(&pair.client)? == TCP_ESTABLISHED,
        "client not ESTABLISHED"
    );
    ensure_errno(so_error(&pair.client)?, 0, "client")?;
    let (probes, aborts) = kernel_deltas(ns, &before, None, 0)?;
    Ok(Outcome {
        keepalive_probes: probes,
        timeout_aborts: aborts,
        expected: Expectations::for_netns(ns.inum())
            .probes(probes)
            .other_drops_zero()
            .conn_probes(&pair.client_conn, probes)
            .conn_unanswered(&pair.client_conn, 0)
            .conn_not_dropped(&pair.client_conn),
        hold: vec![pair],
    })
}

/// The audit's walk of the kernel's TCP hash tables finds this namespace's sockets (the agent
/// runs in the guest's initial namespace, audits every 2 s): one connection end with keepalive
/// on (an idle time no probe reaches), one with it off, and a listener that is no connection.
fn audit_every_namespace(ns: &Netns) -> anyhow::Result<Outcome> {
    let listener = listen(ns)?;
    let pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    set_keepalive(&pair.client, 3000, 60, 5)?;
    // The listener is in the listeners' table (an array inside tcp_hashinfo up to 5.18, lhash2
    // after): `sockets --all` walks it too.
    let rows = sockets_json(&["--all", "--netns", &ns.inum().to_string()])?;
    let port = listener.local_addr()?.port();
    let listening = rows
        .iter()
        .filter(|r| r["state"] == "LISTEN" && r["local_port"] == port)
        .count();
    let established = rows.iter().filter(|r| r["state"] == "ESTABLISHED").count();
    ensure!(
        (listening, established) == (1, 2),
        "`sockets --all` shows {listening} listener(s) on port {port} and {established} \
         ESTABLISHED socket(s), expected 1 and 2: {rows:?}"
    );
    let (probes, aborts) = kernel_deltas(ns, &before, Some(0), 0)?;
    Ok(Outcome {
        keepalive_probes: probes,
        timeout_aborts: aborts,
        // No probe or drop ever names this namespace, so it has no drop series to compare.
        expected: Expectations::for_netns(ns.inum())
            .probes(0)
            .audit_sockets("on", 1)
            .audit_sockets("off", 1),
        hold: vec![pair],
    })
}

/// Namespace identity across inode reuse: a namespace probes until the agent has counted it and
/// is deleted; the next namespace created on its inode must show only its own probes. On 5.10,
/// where `net_cookie` is generated lazily, this is what `net->hash_mix` is for.
fn recycled_namespace(_ns: &Netns) -> anyhow::Result<Outcome> {
    let agent = *AGENT.get().context("the agent endpoint is not set")?;
    // On 6.1.192 under TCG on a loaded host a deleted namespace's inode twice did not come back
    // (within 30 s, then within 120 s; no `unregister_netdevice` wait on the console): another
    // namespace gets another chance.
    let mut attempts = Vec::new();
    for _ in 0..INODE_REUSE_ATTEMPTS {
        let inode = probe_then_delete(agent)?;
        match namespace_on_inode(inode) {
            Ok(second) => return second_namespace_probes(second, inode),
            Err(why) => attempts.push(why),
        }
    }
    anyhow::bail!(
        "no new namespace got a deleted namespace's inode back in {INODE_REUSE_ATTEMPTS} \
         attempts: {}",
        attempts.join("; ")
    )
}

/// A namespace that probes until the agent has counted its probes, then is deleted with every
/// socket closed. Returns its inode.
fn probe_then_delete(agent: AgentEndpoint) -> anyhow::Result<u64> {
    let first = Netns::unshared("recycled-first")?;
    let inode = first.inum();
    {
        let listener = listen(&first)?;
        let pair = first.connect_pair(&listener)?;
        let before = first.tcp_ext()?;
        set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
        wait_kernel_delta(&first, &before, KEEPALIVE, 2)?;
        disable_keepalive(&pair.client)?;
        let probes = first.tcp_ext()?.get(KEEPALIVE);
        agent
            .poll_until(
                &Expectations::for_netns(inode).probes(probes),
                AGENT_DEADLINE,
            )
            .map_err(|never| {
                anyhow::anyhow!(
                    "the agent never counted the first namespace's {probes} probes: {}",
                    never.problem
                )
            })?;
        // No TIME_WAIT socket may keep the namespace alive.
        set_linger_zero(&pair.client)?;
        set_linger_zero(&pair.server)?;
    }
    // A socket still listed would hold the namespace; wait for the list to empty (the reuse
    // wait below says what was left if it did not).
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = loop {
        let left = tcp_sockets(&first)?;
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !left.is_empty() {
        eprintln!(
            "recycled_namespace: namespace {inode} still lists TCP sockets 10 s after closing \
             them: {left:?}"
        );
    }
    drop(first);
    Ok(inode)
}

/// The lines of the namespace's `/proc/net/tcp` and `tcp6` below their headers.
fn tcp_sockets(ns: &Netns) -> anyhow::Result<Vec<String>> {
    ns.run(|| -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        for table in ["tcp", "tcp6"] {
            let path = format!("/proc/thread-self/net/{table}");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            lines.extend(text.lines().skip(1).map(|l| l.trim().to_owned()));
        }
        Ok(lines)
    })?
}

/// Creates namespaces until one gets `inode`. The kernel frees it at the end of the deleted
/// namespace's cleanup work, which runs later on a workqueue; the namespaces created meanwhile
/// are kept, so each try takes the next free number, and the pause between tries grows.
fn namespace_on_inode(inode: u64) -> Result<Netns, String> {
    let mut others: Vec<Netns> = Vec::new();
    let deadline = Instant::now() + INODE_REUSE_DEADLINE;
    let mut pause = Duration::from_millis(200);
    loop {
        let ns = Netns::unshared("recycled-second").map_err(|e| format!("{e:#}"))?;
        if ns.inum() == inode {
            return Ok(ns);
        }
        others.push(ns);
        if Instant::now() >= deadline {
            let lowest = others.iter().map(Netns::inum).min().unwrap_or_default();
            let highest = others.iter().map(Netns::inum).max().unwrap_or_default();
            return Err(format!(
                "inode {inode} not back within {} s ({} namespaces created got inodes \
                 {lowest}..={highest})",
                INODE_REUSE_DEADLINE.as_secs(),
                others.len()
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 3 / 2).min(Duration::from_secs(1));
    }
}

/// The namespace on the recycled inode probes; the agent must count only its probes there.
fn second_namespace_probes(second: Netns, inode: u64) -> anyhow::Result<Outcome> {
    let listener = listen(&second)?;
    let pair = second.connect_pair(&listener)?;
    let before = second.tcp_ext()?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    wait_kernel_delta(&second, &before, KEEPALIVE, 1)?;
    disable_keepalive(&pair.client)?;
    let own = second.tcp_ext()?.get(KEEPALIVE);
    ensure!(own > 0, "the second namespace sent no probe");
    Ok(Outcome {
        keepalive_probes: own,
        timeout_aborts: second.tcp_ext()?.get(ABORT_ON_TIMEOUT),
        expected: Expectations::for_netns(inode).probes(own),
        hold: vec![pair],
    })
}

fn blackholed(
    ns: &Netns,
    intvl_s: i32,
    user_timeout_ms: Option<i32>,
    probes: u64,
) -> anyhow::Result<Outcome> {
    let listener = listen(ns)?;
    let pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    // The client stops hearing the server: its probes arrive, the ACKs do not.
    drop_all_incoming(&pair.client)?;
    if let Some(ms) = user_timeout_ms {
        set_user_timeout(&pair.client, ms)?;
    }
    set_keepalive(&pair.client, IDLE, intvl_s, CNT)?;
    ensure_errno(
        wait_closed(&pair.client, DEADLINE, "client")?,
        ETIMEDOUT,
        "client after unanswered probes",
    )?;
    // The RST the client sends when it gives up reaches the server.
    ensure_errno(
        wait_closed(&pair.server, DEADLINE, "server")?,
        ECONNRESET,
        "server after the client's keepalive RST",
    )?;
    let (probes, aborts) = kernel_deltas(ns, &before, Some(probes), 1)?;
    Ok(Outcome {
        keepalive_probes: probes,
        timeout_aborts: aborts,
        expected: Expectations::keepalive_timeout(ns.inum(), &pair, probes),
        hold: vec![pair],
    })
}

fn blackholed_keepalive_timeout(ns: &Netns) -> anyhow::Result<Outcome> {
    blackholed(ns, INTVL, None, CNT as u64)
}

fn user_timeout(ns: &Netns) -> anyhow::Result<Outcome> {
    // Probes at 1 s and 3 s; at the 5 s expiry 4.5 s have passed since the last segment received
    // with a probe out, so the kernel aborts instead of sending a third. The host test's 1 s
    // interval and 2500 ms leave 0.5 s for the second expiry to be late; two guests sharing two
    // emulated cores were seen to miss that (one probe, then the abort), hence 1.5 s here.
    blackholed(ns, 2, Some(4500), 2)
}

fn peer_lost_socket(ns: &Netns) -> anyhow::Result<Outcome> {
    let listener = listen(ns)?;
    let TcpPair {
        client,
        server,
        client_conn,
        ..
    } = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    // The server forgets the connection with an abortive close whose RST the client never hears.
    drop_all_incoming(&client)?;
    drop(listener);
    set_linger_zero(&server)?;
    let segments = ns.tcp_mib()?;
    drop(server);
    // The RST is delivered from a softirq that may run late on an emulated CPU: the filter stays
    // until the client's side has taken it in (and dropped it), or the client would hear it.
    wait_until(DEADLINE, "the server's RST to reach the client", || {
        Ok(ns.tcp_mib()?.delta(&segments, "InSegs") >= 1)
    })?;
    accept_incoming_again(&client)?;
    ensure!(
        tcp_state(&client)? == TCP_ESTABLISHED,
        "the client must not have seen the server's RST"
    );
    set_keepalive(&client, IDLE, INTVL, CNT)?;
    ensure_errno(
        wait_closed(&client, DEADLINE, "client")?,
        ECONNRESET,
        "client after its probe met a closed port",
    )?;
    let (probes, aborts) = kernel_deltas(ns, &before, Some(1), 0)?;
    Ok(Outcome {
        keepalive_probes: probes,
        timeout_aborts: aborts,
        // The server's own SO_LINGER 0 close is a local abort.
        expected: Expectations::for_netns(ns.inum())
            .probes(probes)
            .drops("keepalive_reset", 1)
            .drops("local_abort", 1)
            .other_drops_zero()
            .conn_probes(&client_conn, probes)
            .conn_dropped(&client_conn, "keepalive_reset"),
        hold: Vec::new(),
    })
}

fn retransmission_timeout(ns: &Netns) -> anyhow::Result<Outcome> {
    let (mut pair, before) = deaf_client(ns)?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    pair.client.write_all(b"never acknowledged")?;
    ensure_errno(
        wait_closed(&pair.client, DEADLINE, "client")?,
        ETIMEDOUT,
        "client after retransmissions",
    )?;
    // No RST on a retransmission timeout: the server's connection lives on, with the data.
    let mut buf = [0u8; 18];
    pair.server.set_read_timeout(Some(DEADLINE))?;
    pair.server.read_exact(&mut buf)?;
    ensure!(&buf == b"never acknowledged", "server read {buf:?}");
    ensure!(
        tcp_state(&pair.server)? == TCP_ESTABLISHED,
        "server not ESTABLISHED"
    );
    let (probes, aborts) = kernel_deltas(ns, &before, Some(0), 1)?;
    Ok(retransmit_timeout_outcome(ns, pair, probes, aborts))
}

/// An application that writes to a peer which already stopped answering keepalive probes: the
/// write timer, not the keepalive timer, ends the connection, while `icsk_probes_out` is still
/// non-zero. Only the write-timer context tells this apart from a keepalive timeout (the socket
/// alone looks like one: ETIMEDOUT, a probe out, the purged write queue), so this is the
/// scenario that proves the agent finds the write timer on this kernel's layout.
fn retransmission_timeout_after_probe(ns: &Netns) -> anyhow::Result<Outcome> {
    let (mut pair, before) = deaf_client(ns)?;
    // A long interval: the first probe goes out after 1 s and the next would only come 60 s
    // later, long after the data below is in flight (keepalive never probes with data out).
    set_keepalive(&pair.client, IDLE, 60, CNT)?;
    wait_kernel_delta(ns, &before, KEEPALIVE, 1)?;
    pair.client.write_all(b"never acknowledged")?;
    ensure_errno(
        wait_closed(&pair.client, DEADLINE, "client")?,
        ETIMEDOUT,
        "client after retransmissions",
    )?;
    let (probes, aborts) = kernel_deltas(ns, &before, Some(1), 1)?;
    Ok(retransmit_timeout_outcome(ns, pair, probes, aborts))
}

/// A connected pair whose client hears nothing more from the server, and the TcpExt counters
/// before it went deaf. The kernel gives up on unacknowledged data at the first RTO expiry at
/// least 3 s (15 x RTO_MIN) after the first retransmission instead of after ~15 min.
fn deaf_client(ns: &Netns) -> anyhow::Result<(TcpPair, TcpExt)> {
    ns.sysctl("net.ipv4.tcp_retries2", "3")?;
    let listener = listen(ns)?;
    let pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    drop_all_incoming(&pair.client)?;
    Ok((pair, before))
}

/// The client died of retransmission timeout after `probes` keepalive probes; the server lives.
fn retransmit_timeout_outcome(ns: &Netns, pair: TcpPair, probes: u64, aborts: u64) -> Outcome {
    Outcome {
        keepalive_probes: probes,
        timeout_aborts: aborts,
        expected: if probes == 0 {
            Expectations::write_timer_drop_unprobed(ns.inum(), &pair, "retransmit_timeout")
        } else {
            Expectations::write_timer_drop(ns.inum(), &pair, probes, "retransmit_timeout")
        },
        hold: vec![pair],
    }
}

fn zero_window_timeout(ns: &Netns) -> anyhow::Result<Outcome> {
    // tcp_probe_timer gives up after tcp_retries2 unanswered zero-window probes.
    ns.sysctl("net.ipv4.tcp_retries2", "3")?;
    let listener = listen(ns)?;
    let pair = ns.connect_pair(&listener)?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    let before = ns.tcp_ext()?;
    // The server never reads: once its receive buffer is full it advertises a zero window and
    // the client, with data still queued, sends window probes (TcpExt TCPWinProbe).
    fill_send_buffer(&pair.client)?;
    wait_kernel_delta(ns, &before, "TCPWinProbe", 1)?;
    // Now nothing answers the probes.
    drop_all_incoming(&pair.client)?;
    ensure_errno(
        wait_closed(&pair.client, DEADLINE, "client")?,
        ETIMEDOUT,
        "client after unanswered window probes",
    )?;
    // Keepalive never probes a connection with data queued.
    let (probes, aborts) = kernel_deltas(ns, &before, Some(0), 1)?;
    Ok(Outcome {
        keepalive_probes: probes,
        timeout_aborts: aborts,
        expected: Expectations::write_timer_drop(ns.inum(), &pair, 0, "zero_window_timeout"),
        hold: vec![pair],
    })
}

fn connect_timeout(ns: &Netns) -> anyhow::Result<Outcome> {
    // One SYN retransmission: the kernel gives up after about 3 s.
    ns.sysctl("net.ipv4.tcp_syn_retries", "1")?;
    let listener = listen(ns)?;
    let SocketAddr::V4(addr) = listener.local_addr()? else {
        bail!("listener is not IPv4");
    };
    let before = ns.tcp_ext()?;
    let result = ns.run(|| connect_deaf(SocketAddrV4::new(*addr.ip(), addr.port())))??;
    match result {
        Ok(_) => bail!("connect succeeded although no SYN-ACK can be heard"),
        Err(err) => ensure!(
            err.raw_os_error() == Some(ETIMEDOUT),
            "connect failed with {err}, expected ETIMEDOUT"
        ),
    }
    let (probes, aborts) = kernel_deltas(ns, &before, Some(0), 1)?;
    Ok(Outcome {
        keepalive_probes: probes,
        timeout_aborts: aborts,
        expected: Expectations::for_netns(ns.inum())
            .probes(0)
            .drops("connect_timeout", 1)
            .other_drops_zero(),
        hold: Vec::new(),
    })
}

fn orderly_close(ns: &Netns) -> anyhow::Result<Outcome> {
    let listener = listen(ns)?;
    let pair = ns.connect_pair(&listener)?;
    let before = ns.tcp_ext()?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    set_keepalive(&pair.server, IDLE, INTVL, CNT)?;
    // Let keepalive run a little so the connection is known to the agent.
    wait_kernel_delta(ns, &before, KEEPALIVE, 2)?;
    let TcpPair {
        mut client,
        mut server,
        client_conn,
        server_conn,
    } = pair;
    client.write_all(b"bye")?;
    client.shutdown(Shutdown::Write)?;
    ensure!(
        read_to_eof(&mut server)? == b"bye",
        "server did not read bye"
    );
    server.write_all(b"ok")?;
    drop(server);
    ensure!(read_to_eof(&mut client)? == b"ok", "client did not read ok");
    drop(client);
    // A marker connection probed after the close: once the agent has counted its probes too, it
    // has seen everything the closed connection produced.
    let marker_base = ns.tcp_ext()?;
    let marker = ns.connect_pair(&listener)?;
    set_keepalive(&marker.client, IDLE, INTVL, CNT)?;
    wait_kernel_delta(ns, &marker_base, KEEPALIVE, 1)?;
    disable_keepalive(&marker.client)?;
    let (probes, aborts) = kernel_deltas(ns, &before, None, 0)?;
    Ok(Outcome {
        keepalive_probes: probes,
        timeout_aborts: aborts,
        expected: Expectations::for_netns(ns.inum())
            .probes(probes)
            .other_drops_zero()
            .conn_not_dropped(&client_conn)
            .conn_not_dropped(&server_conn)
            .conn_not_dropped(&marker.client_conn),
        hold: vec![marker],
    })
}

/// IPVS as kube-proxy in IPVS mode leaves it, set up through the same `setsockopt` interface
/// `ipvsadm` uses (the guest has no ipvsadm): a TCP timeout and one TCP virtual service.
mod ipvs {
    use std::io;

    use anyhow::{Context as _, ensure};

    /// The TCP established timeout the guest sets (kube-proxy's `--ipvs-tcp-timeout`): not
    /// IPVS's default 900 s, so the agent can only show it by reading it.
    pub(super) const TCP_TIMEOUT_SECONDS: i32 = 1234;
    /// The timeout the scenario sets while the agent runs: the agent must take it without a
    /// restart.
    pub(super) const RETUNED_TCP_TIMEOUT_SECONDS: i32 = 1500;
    /// What `/init` wrote while loading the modules and running [`setup`].
    pub(super) const SETUP_LOG: &str = "/tmp/ipvs-setup.txt";

    /// `IP_VS_BASE_CTL` (include/uapi/linux/ip_vs.h) and the commands used.
    const BASE_CTL: libc::c_int = 64 + 1024 + 64;
    const SO_SET_ADD: libc::c_int = BASE_CTL + 2;
    const SO_SET_TIMEOUT: libc::c_int = BASE_CTL + 10;
    const SO_SET_ADDDEST: libc::c_int = BASE_CTL + 7;
    const SO_GET_TIMEOUT: libc::c_int = BASE_CTL + 6;

    /// `struct ip_vs_timeout_user`, seconds (0 leaves one unchanged).
    #[repr(C)]
    #[derive(Default)]
    struct Timeouts {
        tcp: i32,
        tcp_fin: i32,
        udp: i32,
    }

    /// `struct ip_vs_service_user` (44 bytes; the kernel refuses any other length).
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Service {
        protocol: u16,
        addr: u32,
        port: u16,
        fwmark: u32,
        sched_name: [u8; 16],
        flags: u32,
        timeout: u32,
        netmask: u32,
    }

    const _: () = assert!(std::mem::size_of::<Service>() == 44);

    /// `struct ip_vs_dest_user`.
    #[repr(C)]
    #[derive(Default)]
    struct Dest {
        addr: u32,
        port: u16,
        conn_flags: u32,
        weight: i32,
        u_threshold: u32,
        l_threshold: u32,
    }

    /// What `IP_VS_SO_SET_ADDDEST` takes: the service, then the destination.
    #[repr(C)]
    struct ServiceDest {
        service: Service,
        dest: Dest,
    }

    const _: () = assert!(std::mem::size_of::<ServiceDest>() == 44 + 24);

    /// The Service: its virtual address and one destination. On loopback, so a scenario's own
    /// namespace (where IPVS has no service) can hold connections with these endpoints.
    pub(super) const VIRTUAL: (std::net::Ipv4Addr, u16) =
        (std::net::Ipv4Addr::new(127, 0, 0, 53), 443);
    pub(super) const DESTINATION: (std::net::Ipv4Addr, u16) =
        (std::net::Ipv4Addr::new(127, 0, 0, 55), 8443);

    /// Sets the TCP timeout, adds a round-robin TCP service on [`VIRTUAL`] with [`DESTINATION`],
    /// and reads the timeout back from IPVS.
    pub(super) fn setup() -> anyhow::Result<String> {
        let fd = socket()?;
        let mut sched_name = [0u8; 16];
        sched_name[..2].copy_from_slice(b"rr");
        let service = Service {
            protocol: libc::IPPROTO_TCP as u16,
            addr: u32::from(VIRTUAL.0).to_be(),
            port: VIRTUAL.1.to_be(),
            sched_name,
            netmask: u32::MAX,
            ..Service::default()
        };
        let with_destination = ServiceDest {
            service,
            dest: Dest {
                addr: u32::from(DESTINATION.0).to_be(),
                port: DESTINATION.1.to_be(),
                // IP_VS_CONN_F_MASQ
                conn_flags: 0,
                weight: 1,
                ..Dest::default()
            },
        };
        let added = set_timeout(fd, TCP_TIMEOUT_SECONDS)
            .and_then(|()| set(fd, SO_SET_ADD, &service).context("IP_VS_SO_SET_ADD"))
            .and_then(|()| {
                set(fd, SO_SET_ADDDEST, &with_destination).context("IP_VS_SO_SET_ADDDEST")
            });
        let tcp = added.and_then(|()| get_tcp_timeout(fd));
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(fd) };
        let tcp = tcp?;
        ensure!(
            tcp == TCP_TIMEOUT_SECONDS,
            "IPVS reports a TCP timeout of {tcp} s after setting {TCP_TIMEOUT_SECONDS} s"
        );
        Ok(format!(
            "IPVS: TCP timeout {tcp} s (IP_VS_SO_GET_TIMEOUT), TCP service {}:{} rr -> {}:{}",
            VIRTUAL.0, VIRTUAL.1, DESTINATION.0, DESTINATION.1
        ))
    }

    /// Sets IPVS's TCP timeout to `seconds` (as a restarted kube-proxy with another
    /// `--ipvs-tcp-timeout` would) and reads it back.
    pub(super) fn retune(seconds: i32) -> anyhow::Result<()> {
        let fd = socket()?;
        let tcp = set_timeout(fd, seconds).and_then(|()| get_tcp_timeout(fd));
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(fd) };
        let tcp = tcp?;
        ensure!(
            tcp == seconds,
            "IPVS reports {tcp} s after setting {seconds} s"
        );
        Ok(())
    }

    fn socket() -> anyhow::Result<libc::c_int> {
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(
            fd >= 0,
            "socket(AF_INET, SOCK_RAW): {}",
            io::Error::last_os_error()
        );
        Ok(fd)
    }

    fn set_timeout(fd: libc::c_int, tcp: i32) -> anyhow::Result<()> {
        let timeouts = Timeouts {
            tcp,
            ..Timeouts::default()
        };
        set(fd, SO_SET_TIMEOUT, &timeouts).context("IP_VS_SO_SET_TIMEOUT")
    }

    fn get_tcp_timeout(fd: libc::c_int) -> anyhow::Result<i32> {
        let mut read = Timeouts::default();
        let mut len = std::mem::size_of::<Timeouts>() as libc::socklen_t;
        // SAFETY: `read` is a valid buffer of `len` bytes for the kernel to fill.
        let ret = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_IP,
                SO_GET_TIMEOUT,
                std::ptr::from_mut(&mut read).cast(),
                &mut len,
            )
        };
        if ret == 0 {
            Ok(read.tcp)
        } else {
            Err(io::Error::last_os_error()).context("IP_VS_SO_GET_TIMEOUT")
        }
    }

    fn set<T>(fd: libc::c_int, command: libc::c_int, value: &T) -> io::Result<()> {
        // SAFETY: `value` is a live `#[repr(C)]` struct of the size passed.
        let ret = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                command,
                std::ptr::from_ref(value).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// The agent's `ipvs` threshold is IPVS's configured TCP timeout, read from the kernel: `/init`
/// loaded the IPVS modules, set the timeout to [`ipvs::TCP_TIMEOUT_SECONDS`] (not the default
/// 900 s) and added a TCP service before the agent started.
fn ipvs_timeout(ns: &Netns) -> anyhow::Result<Outcome> {
    let setup = std::fs::read_to_string(ipvs::SETUP_LOG)
        .unwrap_or_else(|e| format!("{}: {e}", ipvs::SETUP_LOG));
    ensure!(
        setup.contains("IPVS: TCP timeout"),
        "IPVS was not set up before the agent started: {}",
        setup.trim()
    );
    // Modules carry BTF from 5.11: on 5.10 the agent cannot know IPVS's structs, says so and
    // takes IPVS's default.
    let (expected, log_says) = if Path::new("/sys/kernel/btf/ip_vs").exists() {
        (ipvs::TCP_TIMEOUT_SECONDS, "read from the kernel")
    } else {
        (900, "the kernel has no BTF for it")
    };
    let agent = *AGENT.get().context("the agent endpoint is not set")?;
    let m = agent.scrape()?;
    let threshold = m
        .matching(
            "keepalive_agent_idle_timeout_threshold_seconds",
            &[("threshold", "ipvs")],
        )
        .first()
        .map(|s| s.value);
    ensure!(
        threshold == Some(f64::from(expected)),
        "keepalive_agent_idle_timeout_threshold_seconds{{threshold=\"ipvs\"}} is {threshold:?}, \
         expected {expected} ({})",
        setup.trim()
    );
    let path = AGENT_LOG
        .get()
        .and_then(Option::as_ref)
        .context("ipvs_timeout reads the agent's log: give --agent-log")?;
    let log =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        log.lines()
            .any(|l| l.contains("threshold ipvs") && l.contains(log_says)),
        "the agent's log does not say where its ipvs threshold came from ({log_says:?})"
    );
    // A DaemonSet's pod has its own network and PID namespaces: the program still finds the
    // host's namespace (climbing to `init_task`), whose IPVS the pod's /proc does not show.
    let out = std::process::Command::new("unshare")
        .args(["--net", "--pid", "--fork", "--mount", "--mount-proc"])
        .arg(keepalive_tests::agent_bin())
        .args(["check", "--load"])
        .output()
        .context("running `unshare ... keepalive-agent check --load`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("ipvs"))
        .with_context(|| {
            format!("`check --load` in a private namespace has no ipvs row: {text}")
        })?;
    let says = if expected == ipvs::TCP_TIMEOUT_SECONDS {
        format!("TCP established timeout {expected} s in the host's network namespace")
    } else {
        "no BTF for it".to_owned()
    };
    ensure!(
        row.contains(&says),
        "`check --load` in a private network and PID namespace says {row:?}, expected {says:?}"
    );
    // Retuned while the agent runs (kube-proxy restarted with another --ipvs-tcp-timeout):
    // taken at the next audit interval, without a restart. 5.10 cannot read it at all.
    if expected == ipvs::TCP_TIMEOUT_SECONDS {
        ipvs::retune(ipvs::RETUNED_TCP_TIMEOUT_SECONDS)?;
        let retuned = f64::from(ipvs::RETUNED_TCP_TIMEOUT_SECONDS);
        let mut last = None;
        wait_until(
            AGENT_DEADLINE,
            "the agent to take the retuned IPVS timeout",
            || {
                last = agent
                    .scrape()?
                    .matching(
                        "keepalive_agent_idle_timeout_threshold_seconds",
                        &[("threshold", "ipvs")],
                    )
                    .first()
                    .map(|s| s.value);
                Ok(last == Some(retuned))
            },
        )
        .with_context(|| format!("the agent's ipvs threshold stayed {last:?}"))?;
    }
    // IPVS's timeout applies to a Service's clients (peer: its virtual address) and backends
    // (own address: a destination), not to the node's other connections: three keepalive-on
    // connections idle 2000 s, above any of its timeouts, and two of them behind IPVS.
    let bind = |(ip, port): (Ipv4Addr, u16)| {
        ns.run(move || TcpListener::bind((ip, port)))?
            .with_context(|| format!("listening on {ip}:{port}"))
    };
    let service = bind(ipvs::VIRTUAL)?;
    let backend = bind(ipvs::DESTINATION)?;
    let elsewhere = bind((Ipv4Addr::new(127, 0, 0, 54), ipvs::VIRTUAL.1))?;
    let client = ns.connect_pair(&service)?;
    set_keepalive(&client.client, 2000, 60, 5)?;
    let served = ns.connect_pair(&backend)?;
    set_keepalive(&served.server, 2000, 60, 5)?;
    let other = ns.connect_pair(&elsewhere)?;
    set_keepalive(&other.client, 2000, 60, 5)?;
    Ok(Outcome {
        keepalive_probes: 0,
        timeout_aborts: 0,
        expected: Expectations::for_netns(ns.inum())
            .probes(0)
            .audit_sockets("on", 3)
            .audit_at_or_above("ipvs", 2),
        hold: vec![client, served, other],
    })
}
