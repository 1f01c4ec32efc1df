//! The counter sweep adds, once, the probes a CPU's memory of a namespace's `TCPKeepAlive` lacks
//! when no later expiry in that namespace runs on that CPU to add them.
//!
//! Those probes come from keepalive expiries the kernel ran no program for, which it does only
//! now and then under load (README, "Exact totals and the kernel"). This test makes the same
//! gap on purpose: once a namespace has probed and gone quiet, it sets one CPU's memory of the
//! counter (`CounterSlot::seen` in the agent's `TIMER_CONTEXT` map) back by `GAP` probes, as if
//! that many had been sent by expiries the programs did not see. The sweep must then add
//! exactly that many to the namespace's total, once: the total stands that far above what it
//! was, and stays there.
//!
//! The sweep's guard against a run the kernel makes in the sweeping thread itself must work
//! where the agent has a PID namespace of its own (the DaemonSet): the agent checks it at load,
//! and `check --load` in such a namespace must find the sweep loaded and run.
//!
//! Where a CPU's memory of a namespace's counter starts (its first expiry seen there), and what
//! it leaves uncounted before that, is recorded per slot for the bench; that record is checked
//! here against the probes a namespace sent before the agent started.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use anyhow::{Context as _, ensure};
use aya::maps::PerCpuValues;
use keepalive_agent::sweep_metric;
use keepalive_ebpf::{TimerContext, names};
use keepalive_tests::{
    Agent, DEADLINE, Expectations, Netns, TestEnv, agent_bin, disable_keepalive, kernel_only,
    kernel_tests_enabled, pin_to_one_cpu, program_names_of, set_keepalive, wait_until,
};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const KEEPALIVE: &str = "TCPKeepAlive";
const PROBES: &str = "tcp_keepalive_probes_total";
/// Probes the test takes off one CPU's memory of the counter: one, so that a CPU that sent any
/// of the namespace's probes will do (on many CPUs each may have sent one), and still apart
/// from none added and from one added twice.
const GAP: u64 = 1;

#[test]
fn counter_sweep_adds_what_no_expiry_counted_once() -> anyhow::Result<()> {
    let test = "counter_sweep_adds_what_no_expiry_counted_once";
    let Some(env) =
        TestEnv::start_with_agent_args(test, &["--netns.counter-sweep-interval", "100ms"])
    else {
        return Ok(());
    };
    let ns = Netns::new("sweep")?;
    let listener = ns.listen(V4)?;
    let pairs = ns.connect_pairs(&listener, 1)?;
    let client = &pairs[0].client;
    set_keepalive(client, 1, 1, 3)?;
    wait_until(
        DEADLINE,
        "the kernel to send three keepalive probes",
        || Ok(ns.tcp_ext()?.get(KEEPALIVE) >= 3),
    )?;
    disable_keepalive(client)?;
    let kernel = ns.tcp_ext()?.get(KEEPALIVE);
    env.expect_agent(
        "before the gap",
        &Expectations::for_netns(ns.inum()).probes(kernel),
    )?;
    let Some(agent) = env.agent() else {
        return Ok(());
    };
    // What the test with the sweep off requires absent is there when it is on.
    let programs = program_names_of(agent.pid())?;
    ensure!(
        programs
            .iter()
            .any(|name| name == names::COUNTER_SWEEP_PROGRAM),
        "no {} among the agent's programs: {programs:?}",
        names::COUNTER_SWEEP_PROGRAM
    );
    // What the agent counted, once two more sweeps have added whatever expiries the kernel ran
    // no program for left out: from here on the namespace's total may move only by the gap.
    agent.settle_counters()?;
    let none: &[(&str, &str)] = &[];
    let netns = ns.inum().to_string();
    let metrics = agent.scrape()?;
    let counted = metrics.value(PROBES, &[("netns", netns.as_str())]) as u64;
    let swept_before = metrics.value(sweep_metric::ADDED, none);

    let cookie = netns_cookie(client)?;
    let mut map = agent.timer_context()?;
    let values = map.get(&0, 0).context("reading TIMER_CONTEXT")?;
    // The CPU that ran most of the namespace's probes (its three may be split between CPUs):
    // its slot holds the namespace, with memory, of at least one probe.
    let (cpu, slot, seen) = values
        .iter()
        .enumerate()
        .flat_map(|(cpu, context)| {
            context
                .counters
                .iter()
                .enumerate()
                .filter(|(_, slot)| slot.cookie == cookie && slot.seen_ns != 0)
                .map(move |(index, slot)| (cpu, index, slot.seen))
        })
        .max_by_key(|&(_, _, seen)| seen)
        .with_context(|| {
            format!("no CPU remembers the counter of the namespace with cookie {cookie}")
        })?;
    ensure!(
        seen >= GAP,
        "CPU {cpu} remembers the counter at {seen}, below {GAP}"
    );
    // Every CPU's context is written back as read a moment ago: another namespace's slot that
    // moved meanwhile goes back too (its growth is counted again), which is this agent's
    // figure for that namespace only, and why the sweep's own total below may exceed the gap.
    let mut contexts: Vec<TimerContext> = values.iter().copied().collect();
    contexts[cpu].counters[slot].seen = seen - GAP;
    let contexts = PerCpuValues::try_from(contexts).context("TIMER_CONTEXT's values")?;
    map.set(0, contexts, 0).context("writing TIMER_CONTEXT")?;
    eprintln!("{test}: CPU {cpu}'s memory of the counter set back from {seen} by {GAP}");

    // Exactly: the namespace is quiet, so no expiry the kernel skips can explain a difference.
    let after_gap = Expectations::for_netns(ns.inum()).probes(counted + GAP);
    agent.wait_for(&format!("{test}: after the gap"), &after_gap)?;
    // Two more sweeps: what the first added is not added again.
    agent.settle_counters()?;
    let metrics = agent.scrape()?;
    agent.wait_for(&format!("{test}: two sweeps later"), &after_gap)?;
    let swept = metrics.value(sweep_metric::ADDED, none) - swept_before;
    ensure!(
        swept >= GAP as f64,
        "{} grew by {swept}, expected at least {GAP}",
        sweep_metric::ADDED
    );
    ensure!(
        ns.tcp_ext()?.get(KEEPALIVE) == kernel,
        "the namespace probed again: the test's premise (a quiet namespace) broke"
    );
    let values = map.get(&0, 0).context("reading TIMER_CONTEXT")?;
    let moved = values[cpu].counters[slot].seen;
    ensure!(
        moved == seen,
        "the sweep moved CPU {cpu}'s memory to {moved}, expected the counter's {seen}"
    );
    Ok(())
}

/// Where a CPU's memory of a namespace's counter starts (`CounterSlot::before_first_seen`, which
/// the bench sums to explain a row's shortfall): the counter at the first expiry the programs
/// see in the namespace on that CPU. In a namespace that probed before the agent started, then
/// went quiet, that is every probe sent on that CPU before the start, so once each CPU that
/// sent one has run an expiry there since, the slots' sum is the namespace's `TCPKeepAlive` at
/// the start: short of it if the first expiry were not recorded, above it by that expiry's
/// probes if it were recorded after them.
#[test]
fn first_expiry_seen_records_the_probes_sent_before_it() -> anyhow::Result<()> {
    let test = "first_expiry_seen_records_the_probes_sent_before_it";
    // Several connections, so that every CPU that ran the probes before the start soon runs one
    // after it (a timer runs where it was armed or where an idle CPU's timers were pulled).
    const CONNECTIONS: usize = 8;
    if !kernel_tests_enabled(test) || kernel_only() {
        return Ok(());
    }
    // Timers are armed on the CPU of the thread that turns keepalive on and run there again
    // (or on a CPU that pulls an idle one's): pinned, the probes before the start and the
    // expiries after it share their CPUs, however many the host has.
    pin_to_one_cpu()?;
    let ns = Netns::new("first")?;
    let listener = ns.listen(V4)?;
    let pairs = ns.connect_pairs(&listener, CONNECTIONS)?;
    for pair in &pairs {
        set_keepalive(&pair.client, 1, 1, 3)?;
    }
    wait_until(
        DEADLINE,
        "the kernel to send two keepalive probes per connection",
        || Ok(ns.tcp_ext()?.get(KEEPALIVE) >= 2 * CONNECTIONS as u64),
    )?;
    for pair in &pairs {
        disable_keepalive(&pair.client)?;
    }
    // Quiet: a callback that was running when keepalive went off has finished by now.
    let before_start = quiet_counter(&ns)?;

    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        return Ok(());
    };
    ensure!(
        ns.tcp_ext()?.get(KEEPALIVE) == before_start,
        "the namespace probed while the agent started: the test's premise (a quiet namespace) broke"
    );
    let cookie = netns_cookie(&pairs[0].client)?;
    for pair in &pairs {
        set_keepalive(&pair.client, 1, 1, 3)?;
    }
    let map = agent.timer_context()?;
    let mut last = Vec::new();
    let mut inconclusive = false;
    let converged = wait_until(
        2 * DEADLINE,
        "each CPU that probed before the agent started to run an expiry in the namespace since",
        || {
            let values = map.get(&0, 0).context("reading TIMER_CONTEXT")?;
            last = values
                .iter()
                .map(|context| {
                    context
                        .counters
                        .iter()
                        .filter(|slot| slot.cookie == cookie)
                        .map(|slot| slot.before_first_seen)
                        .sum::<u64>()
                })
                .collect();
            let sum: u64 = last.iter().sum();
            if sum > before_start && env.expiries_not_run_since_start()? > 0 {
                // Probes of expiries the kernel ran no program for belong there too: the sum
                // says nothing about the first expiry's own then.
                inconclusive = true;
                return Ok(true);
            }
            ensure!(
                sum <= before_start,
                "the slots hold {sum} probes before each CPU's first expiry seen (by CPU: \
                 {last:?}), above the namespace's {before_start} at the agent's start, with \
                 every expiry since run by the programs: an expiry's own probes were taken for \
                 earlier ones"
            );
            Ok(sum == before_start)
        },
    );
    if inconclusive {
        eprintln!(
            "{test}: the kernel ran no program for some expiries since the agent started, \
             whose probes the slots hold too (by CPU: {last:?}); nothing to conclude"
        );
        return Ok(());
    }
    converged.with_context(|| {
        format!(
            "the slots hold {} of the {before_start} probes the namespace sent before the \
             agent started (by CPU: {last:?})",
            last.iter().sum::<u64>()
        )
    })?;
    Ok(())
}

/// The namespace's `TCPKeepAlive` once it has stood still for a second.
fn quiet_counter(ns: &Netns) -> anyhow::Result<u64> {
    let mut last = ns.tcp_ext()?.get(KEEPALIVE);
    wait_until(DEADLINE, "the namespace to stop probing", || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = ns.tcp_ext()?.get(KEEPALIVE);
        let stood_still = now == last;
        last = now;
        Ok(stood_still)
    })?;
    Ok(last)
}

/// The namespace's cookie, as the programs see it (`SO_NETNS_COOKIE`, 5.14+).
fn netns_cookie(socket: &impl AsRawFd) -> anyhow::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a u64 of the length passed, written by the kernel.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    ensure!(
        ret == 0,
        "getsockopt(SO_NETNS_COOKIE): {}",
        std::io::Error::last_os_error()
    );
    Ok(cookie)
}

/// In a PID namespace of its own, as in the DaemonSet, the sweep's program still recognises a
/// run the kernel makes in the sweeping thread: the thread's id there is not the kernel's
/// global one. The agent checks this at load and leaves the sweep off when it fails, so
/// `check --load` must find it loaded and run.
#[test]
fn counter_sweep_knows_its_own_thread_in_a_pid_namespace_of_its_own() -> anyhow::Result<()> {
    let test = "counter_sweep_knows_its_own_thread_in_a_pid_namespace_of_its_own";
    if !kernel_tests_enabled(test) {
        return Ok(());
    }
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
        .arg(agent_bin())
        .args(["check", "--load"])
        .stdin(Stdio::null())
        .output()
        .context("running `unshare` (util-linux)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let load = stdout
        .lines()
        .find(|l| l.contains(" load "))
        .with_context(|| format!("`check --load` printed no load line:\n{stdout}{stderr}"))?;
    ensure!(
        load.contains("counter sweep ran on every CPU"),
        "in a PID namespace of its own: {load}\n{stderr}"
    );
    Ok(())
}

/// `--netns.counter-sweep-interval off`: no sweep at all (no interrupt on any CPU), said in the
/// log, and no sweep metrics, which would read as a sweep that never ran.
#[test]
fn counter_sweep_off_runs_no_sweep_and_says_so() -> anyhow::Result<()> {
    let test = "counter_sweep_off_runs_no_sweep_and_says_so";
    if !kernel_tests_enabled(test) {
        return Ok(());
    }
    let agent = Agent::start_with_args(&["--netns.counter-sweep-interval", "off"])?;
    let metrics = agent.scrape()?;
    ensure!(
        metrics.samples(sweep_metric::ROUNDS).is_empty(),
        "sweep metrics with the sweep off"
    );
    ensure!(
        agent.log().contains("counter sweep off"),
        "the agent did not say the sweep is off:\n{}",
        agent.log()
    );
    // Not loaded either: its load checks the guard with a run, and costs a verifier pass.
    let programs = program_names_of(agent.pid())?;
    ensure!(
        !programs.is_empty(),
        "the agent holds no BPF program descriptor"
    );
    ensure!(
        !programs
            .iter()
            .any(|name| name == names::COUNTER_SWEEP_PROGRAM),
        "the agent loaded {} with the sweep off: {programs:?}",
        names::COUNTER_SWEEP_PROGRAM
    );
    Ok(())
}
