//! The agent's cost, measured side by side in one run (`cargo xtask bench`, as root). Not a
//! test: it prints figures.
//!
//! 1. Loopback connection churn without programs, with an empty program on each of the agent's
//!    hooks (`--empty-hooks` for others) and with the agent, in alternating rounds, for four
//!    workloads: orderly closes without keepalive (filtered in the kernel), the same with
//!    keepalive on (counted in the kernel, not sent: no keepalive expiry yet), RST closes
//!    without keepalive (counted in the kernel, not sent to the agent by default) and RST
//!    closes with keepalive on both ends (both reported).
//!    `--churn-only` stops there.
//! 2. Kernel-side cost per hit of the timer and close hooks, from `kernel.bpf_stats_enabled`
//!    run-time counters, as the difference from empty programs on the same hooks; the close
//!    hook per workload of 1, in a namespace without conntrack and in one whose connections it
//!    tracks.
//!    Then, with no agent, what writing a close record costs by how it is written: into the
//!    ring buffer copied in from the stack, reserved in the ring and written in place (how the
//!    agent writes close records), and in place into a per-CPU slot (the floor of a per-CPU
//!    ring), each by a bench program at every TCP close of RST churn, against an empty program
//!    on the same hook.
//! 3. What the agent adds to a keepalive expiry on the CPU: the bench's own programs time each
//!    expiry from `timer_expire_entry` to `timer_expire_exit` around the agent's, over
//!    `--span-connections` connections probing every second, then over `--connections`
//!    connections whose expiries find traffic (a byte every 100 ms) and send no probe, with no
//!    other program, with empty programs on the two hooks, with an entry program that loads one
//!    byte of the socket and nothing else, and with the agent, in alternating phases
//!    (`--rounds`; `--span-only` runs nothing else), with `bpf_stats` off. Unlike the
//!    run-time counters of 2, this includes what the agent's programs change in the callback: a
//!    cache miss taken by the entry program may be one the callback no longer takes, or one it
//!    cannot overlap with its own.
//! 4. Userspace: records through decode → track → classify → metrics, per second of CPU; then
//!    `--probing-connections` live connections probing every second against answering peers
//!    (the synchronized run's records, without the kernel), per second of CPU.
//! 5. Synchronized keepalive: `--sync-connections` connections (several sizes, comma
//!    separated) that start probing in the same second, every second, against answering peers,
//!    for `--sync-seconds`, spread over `--sync-namespaces` namespaces (default 1; a node's
//!    pods each have their own, and a CPU's expiries then alternate between them): the
//!    namespaces' `TCPKeepAlive` against the agent's probe totals (and which namespaces fell
//!    short, by how much, or over), the probes no program counts before the first expiry the
//!    programs saw in each namespace on each CPU (read from the agent's `TIMER_CONTEXT`, with
//!    the slots taken from another namespace: when not 0, that sum is not exact), the keepalive
//!    expiries a perf event on
//!    `timer_expire_entry` counted that no program of the agent ran for, and those a classic (perf-event) tracepoint program on the same hook
//!    missed, records lost, the agent's CPU and RSS; then each size again with the agent's process
//!    stopped (SIGSTOP) while the connections probe, which its kernel programs do not notice.
//!    The connections are held by child processes (this binary run with `--hold`), 6 000 pairs
//!    each, under the per-process descriptor limit.
//!
//! `timer_expire_entry`/`_exit` fire for every kernel timer. Three phases on the same running
//! agent, each with `--connections` loopback connections in a private namespace: first without
//! keepalive, one byte sent on each every 100 ms, so their delayed-ACK timers (`tcp_delack_timer`,
//! filtered out) fire; then the same with keepalive on (1 s idle), whose expiries find traffic
//! and send no probe; then with keepalive every second against a healthy peer and no traffic.
//! Keepalive hits are known exactly from a perf count of `timer_expire_entry` for
//! `tcp_keepalive_timer` on the host, which needs nothing from the agent (an agent built
//! without its counters counts none); the first and last phases give two equations for the
//! two per-hit costs, and the second phase, less the filtered hits at that cost, the cost of
//! an expiry without a probe. Costs are reported as the
//! difference from an empty tp_btf program attached to `timer_expire_entry` at the same time,
//! because an empty program's run time is the measurement's own floor.

use std::{
    collections::HashMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, TcpListener},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, ProgramInfo, loaded_programs};
use keepalive_agent::kernel::programs::{
    BASELINE_PROGRAM, CLOSE_BASELINE_PROGRAM, EXPIRY_SPAN_IN_PROGRAM, EXPIRY_SPAN_MAP,
    EXPIRY_SPAN_OUT_PROGRAM, HOOKS, MIN_RING_BUFFER_BYTES, PROGRAMS_OBJECT, RECORD_RESERVE_PROGRAM,
    RECORD_RING_PROGRAM, RECORD_SLOT_PROGRAM, RECORD_SLOTS_MAP, RECORDS_MAP, SOCKET_LOAD_PROGRAM,
};
use keepalive_agent::sweep_metric;
use keepalive_ebpf::{ExpirySpan, RecordSlots, names};
use keepalive_tests::{
    Agent, Churn, ExpiriesNotRun, ExpiriesNotRunByAnyProgram, KeepaliveExpiryCount, Metrics, Netns,
    TcpPair, UNCOUNTED_METRICS, agent::vm_rss_kib, holder::Holders, set_keepalive,
};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Program names as the kernel keeps them (BPF_OBJ_NAME_LEN - 1 = 15 bytes).
const ENTRY_NAME: &str = "timer_expire_en";
const EXIT_NAME: &str = "timer_expire_ex";
const CLOSE_NAME: &str = "inet_sock_set_s";

const FLAGS: &str = "--connections N --seconds S --rounds N --churn-seconds S \
     --pipeline-connections N --probing-connections N --sync-connections N[,N...] \
     --sync-seconds S --sync-namespaces N --span-connections N --span-only --churn-only --pipeline-only \
     --empty-hooks TRACEPOINT[,TRACEPOINT...]";

fn main() -> anyhow::Result<()> {
    let mut connections = 1_000usize;
    let mut seconds = 6u64;
    let mut rounds = 3usize;
    let mut churn_seconds = 2u64;
    let mut pipeline_connections = 50_000u32;
    let mut probing_connections = 50_000u32;
    let mut sync_connections = vec![50_000usize, 100_000];
    let mut sync_seconds = 10u64;
    let mut sync_namespaces = 1usize;
    let mut span_connections = 5_000usize;
    let mut span_only = false;
    let mut churn_only = false;
    let mut pipeline_only = false;
    let mut empty_hooks: Vec<String> = HOOKS.iter().map(|h| h.tracepoint.to_owned()).collect();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(hold_args) = argv.strip_prefix(&["--hold".to_owned()]) {
        return keepalive_tests::holder::hold(hold_args);
    }
    let mut args = argv.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--connections" => connections = number(&arg, value()?)?,
            "--seconds" => seconds = number(&arg, value()?)?,
            "--rounds" => rounds = number(&arg, value()?)?,
            "--churn-seconds" => churn_seconds = number(&arg, value()?)?,
            "--pipeline-connections" => pipeline_connections = number(&arg, value()?)?,
            "--probing-connections" => probing_connections = number(&arg, value()?)?,
            "--sync-connections" => {
                sync_connections = value()?
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(|n| number(&arg, n.to_owned()))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--sync-seconds" => sync_seconds = number(&arg, value()?)?,
            "--sync-namespaces" => sync_namespaces = number(&arg, value()?)?,
            "--span-connections" => span_connections = number(&arg, value()?)?,
            "--span-only" => span_only = true,
            "--churn-only" => churn_only = true,
            "--pipeline-only" => pipeline_only = true,
            "--empty-hooks" => {
                empty_hooks = value()?
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "--help" | "-h" => {
                println!("usage: hook-cost {FLAGS}\n(as root; see `cargo xtask bench`)");
                return Ok(());
            }
            other => bail!("unknown argument {other}; flags: {FLAGS}"),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the benchmark loads eBPF programs and enables bpf_stats");
    }
    println!("{} CPUs", std::thread::available_parallelism()?);
    if span_only {
        let length = Duration::from_secs(seconds);
        expiry_span(rounds, SpanLoad::Probing(span_connections), length)?;
        return expiry_span(rounds, SpanLoad::Traffic(connections), length);
    }
    if pipeline_only {
        pipeline(pipeline_connections, probing_connections);
        return Ok(());
    }
    if rounds > 0 {
        churn_throughput(rounds, Duration::from_secs(churn_seconds), &empty_hooks)?;
    }
    if churn_only {
        return Ok(());
    }

    let _stats = BpfStats::set(true)?;
    let agent = Agent::start().context("starting the agent")?;

    let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
    let mut baseline_obj =
        aya::Ebpf::load(PROGRAMS_OBJECT).context("loading the programs object")?;
    let baseline = tp_program(&mut baseline_obj, BASELINE_PROGRAM)?;
    baseline.load("timer_expire_entry", &btf)?;
    baseline.attach()?;
    let baseline_id = baseline.info()?.id();
    let close_baseline = tp_program(&mut baseline_obj, CLOSE_BASELINE_PROGRAM)?;
    close_baseline.load("inet_sock_set_state", &btf)?;
    close_baseline.attach()?;
    let close_ids = (close_baseline.info()?.id(), newest(CLOSE_NAME)?);
    let ids = ProgramIds {
        baseline: baseline_id,
        entry: newest(ENTRY_NAME)?,
        exit: newest(EXIT_NAME)?,
    };

    let phase = Duration::from_secs(seconds);
    println!("timer hook cost, {seconds} s per phase");

    let ns = Netns::new("bench")?;
    let netns = ns.inum().to_string();
    let listener = ns.listen(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let pairs = ns.connect_pairs(&listener, connections)?;
    // Keepalive on (`keepalive`) or off, while the clients write: a keepalive timer then
    // expires without a probe.
    let with_traffic = |keepalive: bool| -> anyhow::Result<Phase> {
        if keepalive {
            for pair in &pairs {
                set_keepalive(&pair.client, 1, 1, 3)?;
            }
        }
        while_writing(&pairs, || measure(&ids, &agent, &netns, phase))
    };
    let idle = with_traffic(false)?;
    // Before any probe: connections the agent's table never held.
    let flowing = with_traffic(true)?;
    // The writes stop: a healthy peer answers every probe; the timer then fires once a second.
    let sweep_before = SweepCost::read(&agent)?;
    let busy = measure(&ids, &agent, &netns, phase)?;
    let sweep = SweepCost::read(&agent)?
        .zip(sweep_before)
        .map(|(after, before)| after.since(&before));
    drop(pairs);
    // The two phases are solved for the two paths' costs by the kernel's count of keepalive
    // expiries; without any, the system has no solution and the table would print NaN.
    if busy.keepalive_hits == 0 || flowing.keepalive_hits == 0 {
        bail!(
            "perf counted no keepalive expiry in a phase ({} with traffic, {} probing) of \
             {connections} connections with a 1 s idle for {seconds} s",
            flowing.keepalive_hits,
            busy.keepalive_hits
        );
    }
    for (name, phase) in [("with traffic", &flowing), ("probing", &busy)] {
        // Said, not fatal: the costs are solved from perf's count. (Its window is the stats'
        // own; the agent's is read 300 ms later, so a burst of synchronized expiries may fall
        // in one and not the other: only a count of none says something.)
        if phase.agent_keepalive_hits == 0 {
            println!(
                "note: the agent's tcp_keepalive_timer_expiries_total{{netns=\"{netns}\"}} did \
                 not grow in the {name} phase, where perf counted {} keepalive expiries (an \
                 agent built without its counters?)",
                phase.keepalive_hits
            );
        }
    }

    let (filtered_entry, keepalive_entry) = solve(&idle, &busy, |p| p.entry);
    let (filtered_exit, keepalive_exit) = solve(&idle, &busy, |p| p.exit);

    println!(
        "delayed-ACK phase: {} timer hits, {} keepalive; keepalive phase ({connections} probing connections): {} timer hits, {} keepalive",
        idle.entry.count, idle.keepalive_hits, busy.entry.count, busy.keepalive_hits
    );
    println!(
        "empty tp_btf program (floor): {:.0} ns/hit, then {:.0} ns/hit",
        idle.baseline.per_hit(),
        busy.baseline.per_hit()
    );
    println!(
        "| hook | filtered-out path (ns/hit above floor) | keepalive path (ns/hit above floor) |"
    );
    println!("|---|---|---|");
    println!("| timer_expire_entry | {filtered_entry:.0} | {keepalive_entry:.0} |");
    println!("| timer_expire_exit | {filtered_exit:.0} | {keepalive_exit:.0} |");
    println!(
        "keepalive expiry (entry + exit): {:.0} ns above the floor",
        keepalive_entry + keepalive_exit
    );
    // The filtered path's cost from the two phases above; the rest of this phase's is its
    // expiries'.
    let flowing_cost = |hook: Stats, filtered: f64| {
        let k = flowing.keepalive_hits as f64;
        (flowing.above_floor(hook) - (hook.count as f64 - k) * filtered) / k
    };
    let (flowing_entry, flowing_exit) = (
        flowing_cost(flowing.entry, filtered_entry),
        flowing_cost(flowing.exit, filtered_exit),
    );
    println!(
        "keepalive expiry without a probe (traffic flowing, connection not in the agent's \
         table; {} expiries, {} records sent): {flowing_entry:.0} + {flowing_exit:.0} = {:.0} ns \
         above the floor",
        flowing.keepalive_hits,
        flowing.records,
        flowing_entry + flowing_exit
    );
    match sweep {
        Some(sweep) if sweep.rounds > 0 => println!(
            "counter sweep in the keepalive phase: {} rounds, {} program runs, {:.0} ns per run \
             in the swept CPU's interrupt (bpf_stats), {:.1} µs of the sweeping thread's CPU per \
             round (its test runs and the wait for each CPU's interrupt)",
            sweep.rounds,
            sweep.program.count,
            sweep.program.per_hit(),
            sweep.thread_ns as f64 / sweep.rounds as f64 / 1e3
        ),
        Some(_) => println!("counter sweep in the keepalive phase: no round ran"),
        None => println!("counter sweep: none (an agent without it)"),
    }

    println!(
        "| close path | conntrack | closes | hook runs | ns/run above floor | ns per close above floor |"
    );
    println!("|---|---|---|---|---|---|");
    close_costs(close_ids, phase, ClosePaths::Default)?;

    let rss = vm_rss_kib(agent.pid())?;
    drop(agent);
    // Only a connection that probed (a second at least) takes the reported
    // path by default; with this flag every drop does, so churn measures it.
    let reporting = reporting_agent()?;
    close_costs(
        (close_ids.0, newest(CLOSE_NAME)?),
        phase,
        ClosePaths::Reported,
    )?;
    drop(reporting);
    println!("agent RSS after the run: {} MiB", rss / 1024);
    // The empty programs measured the floor; the rows below measure the agent alone.
    drop(baseline_obj);
    record_write_costs(phase)?;

    if rounds > 0 && span_connections > 0 {
        expiry_span(rounds, SpanLoad::Probing(span_connections), phase)?;
        expiry_span(rounds, SpanLoad::Traffic(connections), phase)?;
    }

    pipeline(pipeline_connections, probing_connections);

    if !sync_connections.is_empty() {
        println!(
            "synchronized keepalive, answering peers, 1 s idle and interval, {sync_seconds} s of \
             probing, in {sync_namespaces} namespace(s) (agent with default flags, \
             --connections.max-tracked raised to the count)"
        );
        println!(
            "| connections | TCPKeepAlive | agent probes | short | namespaces short (by; + over) | probes before a CPU's first expiry seen (slots taken over) | expiries the kernel ran no program for | missed by a classic tracepoint program | records lost | agent CPU (% of a core; of it, the attribution worker) | agent RSS | uncounted by the programs, skipped runs |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for &n in &sync_connections {
            synchronized(
                n,
                sync_namespaces,
                Duration::from_secs(sync_seconds),
                AgentDuringSync::Running,
            )?;
        }
        // The same with the agent's process stopped: its kernel programs still count, so a
        // shortfall here is not the agent's userspace (reads, scrapes, audit walks) at work.
        for &n in &sync_connections {
            synchronized(
                n,
                sync_namespaces,
                Duration::from_secs(sync_seconds),
                AgentDuringSync::Stopped,
            )?;
        }
    }
    Ok(())
}

/// What the agent adds to a keepalive expiry on the CPU. `bpf_stats` charges the agent's entry
/// program with the cache misses on the socket, which it takes first; the kernel's callback
/// reads the same socket, so the programs' run time need not be what the agent adds. Here the
/// bench's own programs time each keepalive expiry from `timer_expire_entry` (attached first, so
/// before any other program on it) to `timer_expire_exit` (attached last, so after the others),
/// in alternating phases over the same connections (`load`): with no other program, with an
/// empty program on each of the two hooks (what any program there costs: the tracepoint's
/// dispatch and the run), with an entry program that loads one byte of the socket (and an empty
/// exit), and with the agent. The agent's own work is its difference from the empty programs,
/// as in the other rows; the one load's difference is what a first touch of a socket line
/// before the callback costs, the floor of any entry program that reads the socket.
///
/// `kernel.bpf_stats_enabled` is off meanwhile, whatever the run-time rows need: with it on the
/// kernel reads the clock before and after every program run (a pvclock read in a KVM guest),
/// which would charge the agent's two programs with four reads a production node does not make.
fn expiry_span(rounds: usize, load: SpanLoad, length: Duration) -> anyhow::Result<()> {
    let _stats = BpfStats::set(false)?;
    let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
    let mut ebpf = keepalive_agent::kernel::open_programs(MIN_RING_BUFFER_BYTES)
        .context("preparing the programs object")?;
    let spans: PerCpuArray<_, ExpirySpan> = PerCpuArray::try_from(
        ebpf.take_map(EXPIRY_SPAN_MAP)
            .context("span map missing from the object")?,
    )?;
    let span_in = tp_program(&mut ebpf, EXPIRY_SPAN_IN_PROGRAM)?;
    span_in.load("timer_expire_entry", &btf)?;
    span_in.attach()?;
    let span_out = tp_program(&mut ebpf, EXPIRY_SPAN_OUT_PROGRAM)?;
    span_out.load("timer_expire_exit", &btf)?;
    tp_program(&mut ebpf, SOCKET_LOAD_PROGRAM)?.load("timer_expire_entry", &btf)?;
    let totals = || -> anyhow::Result<(u64, u64)> {
        let per_cpu = spans.get(&0, 0)?;
        Ok(per_cpu
            .iter()
            .fold((0, 0), |(ns, n), s| (ns + s.total_ns, n + s.expiries)))
    };

    let (SpanLoad::Probing(connections) | SpanLoad::Traffic(connections)) = load;
    let ns = Netns::new("bench-span")?;
    let listener = ns.listen(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let pairs = ns.connect_pairs(&listener, connections)?;
    // Spread over a second: probes sent in one batch overflow the loopback backlog
    // (net.core.netdev_max_backlog), go unanswered, and the connections would die.
    let gap = Duration::from_secs(1) / connections as u32;
    for pair in &pairs {
        set_keepalive(&pair.client, 1, 1, 9)?;
        std::thread::sleep(gap);
    }
    let workload = match load {
        SpanLoad::Probing(_) => "probing every second",
        SpanLoad::Traffic(_) => {
            "with keepalive on (1 s) and a byte sent every 100 ms, so each expiry finds traffic \
             and sends no probe (the agent sends no record for it)"
        }
    };
    println!(
        "keepalive expiry on the CPU, timer_expire_entry to timer_expire_exit (callback and \
         programs), {connections} connections {workload}, {rounds} rounds of {} s per side, \
         alternating; bpf_stats off",
        length.as_secs()
    );
    let mut timed = || span_rounds(rounds, length, &btf, &mut ebpf, &totals);
    match load {
        SpanLoad::Probing(_) => timed(),
        SpanLoad::Traffic(_) => while_writing(&pairs, timed),
    }
}

/// Runs `f` while a thread writes a byte on each pair's client every 100 ms, so their keepalive
/// expiries find traffic and send no probe. Each byte is acknowledged by the peer's delayed-ACK
/// timer (no reply follows); sending again within the RTO keeps the retransmit timer from
/// expiring.
fn while_writing<T>(pairs: &[TcpPair], f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| -> anyhow::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                for pair in pairs {
                    (&pair.client).write_all(b"x")?;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });
        let result = f();
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer thread panicked")?;
        result
    })
}

/// The alternating rounds of [`expiry_span`], printed as a table and its medians.
fn span_rounds(
    rounds: usize,
    length: Duration,
    btf: &aya::Btf,
    ebpf: &mut aya::Ebpf,
    totals: &dyn Fn() -> anyhow::Result<(u64, u64)>,
) -> anyhow::Result<()> {
    println!(
        "| round | expiries (none / empty / one load / agent) | ns/expiry, no programs | empty programs | one socket load | agent | empty programs add | one socket load adds over them | agent adds over them |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let timer_hooks = [
        "timer_expire_entry".to_owned(),
        "timer_expire_exit".to_owned(),
    ];
    let (mut floor, mut one_load, mut added) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let mut side = |programs: SpanSide| -> anyhow::Result<(u64, f64)> {
            let empty = (programs == SpanSide::Empty)
                .then(|| EmptyPrograms::attach(btf, &timer_hooks))
                .transpose()?;
            let socket_load = (programs == SpanSide::SocketLoad)
                .then(|| -> anyhow::Result<_> {
                    let exit = EmptyPrograms::attach(btf, &timer_hooks[1..])?;
                    Ok((exit, tp_program(ebpf, SOCKET_LOAD_PROGRAM)?.attach()?))
                })
                .transpose()?;
            let agent = (programs == SpanSide::Agent)
                .then(|| Agent::start().context("starting the agent"))
                .transpose()?;
            let span_out = tp_program(ebpf, EXPIRY_SPAN_OUT_PROGRAM)?;
            let link = span_out.attach()?;
            // Expiries that began before the exit program was attached end unmeasured.
            std::thread::sleep(Duration::from_secs(1));
            let (ns0, n0) = totals()?;
            std::thread::sleep(length);
            let (ns1, n1) = totals()?;
            span_out.detach(link)?;
            drop(agent);
            drop(empty);
            if let Some((exit, link)) = socket_load {
                tp_program(ebpf, SOCKET_LOAD_PROGRAM)?.detach(link)?;
                drop(exit);
            }
            let n = n1 - n0;
            Ok((n, (ns1 - ns0) as f64 / n.max(1) as f64))
        };
        let (n_none, none) = side(SpanSide::None)?;
        let (n_empty, empty) = side(SpanSide::Empty)?;
        let (n_load, load) = side(SpanSide::SocketLoad)?;
        let (n_agent, agent) = side(SpanSide::Agent)?;
        println!(
            "| {round} | {n_none} / {n_empty} / {n_load} / {n_agent} | {none:.0} | {empty:.0} | {load:.0} | {agent:.0} | {:.0} ns | {:.0} ns | {:.0} ns |",
            empty - none,
            load - empty,
            agent - empty
        );
        floor.push(empty - none);
        one_load.push(load - empty);
        added.push(agent - empty);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "per keepalive expiry (median of {rounds} rounds): empty programs on the two hooks add \
         {:.0} ns; an entry that loads one byte of the socket adds {:.0} ns over them, the \
         agent {:.0} ns",
        median(&mut floor),
        median(&mut one_load),
        median(&mut added)
    );
    Ok(())
}

/// The connections whose keepalive expiries [`expiry_span`] times.
#[derive(Clone, Copy)]
enum SpanLoad {
    /// This many connections whose idle peers answer a probe every second.
    Probing(usize),
    /// This many connections sending a byte every 100 ms: every expiry finds traffic, sends no
    /// probe and re-arms, the keepalive expiry most connections of a busy node have.
    Traffic(usize),
}

/// Which programs besides the bench's own run on the timer hooks in a phase of [`expiry_span`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum SpanSide {
    None,
    /// An empty program on `timer_expire_entry` and one on `timer_expire_exit`.
    Empty,
    /// On `timer_expire_entry`, a program that loads one byte of the expiring keepalive
    /// timer's socket (`timer_entry_socket_load`); an empty one on `timer_expire_exit`.
    SocketLoad,
    Agent,
}

/// A tp_btf program of the object, by name.
fn tp_program<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> anyhow::Result<&'a mut BtfTracePoint> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?)
}

/// What the agent's process does while the synchronized connections probe.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AgentDuringSync {
    Running,
    /// SIGSTOP from "go" until the children are gone, then SIGCONT before the counters are read.
    Stopped,
}

/// One row of the synchronized run: `total` connections whose keepalive starts in the same
/// second (the children get "go" together), probing every second for `length`.
/// `total` connections split evenly over `namespaces` namespaces; the totals are their sums.
fn synchronized(
    total: usize,
    namespaces: usize,
    length: Duration,
    during: AgentDuringSync,
) -> anyhow::Result<()> {
    if namespaces == 0 || namespaces > total {
        bail!("--sync-namespaces {namespaces}: must be 1 to the number of connections ({total})");
    }
    let max_tracked = total.max(65_536).to_string();
    let agent = Agent::start_with_args(&["--connections.max-tracked", &max_tracked])
        .context("starting the agent")?;
    let program = std::env::current_exe()?;
    let mut spaces = Vec::with_capacity(namespaces);
    for i in 0..namespaces {
        let ns = Netns::new("sync")?;
        // The first `total % namespaces` take one more.
        let share = total / namespaces + usize::from(i < total % namespaces);
        let holders = Holders::connect(&program, &ns, share)?;
        spaces.push((ns, holders));
    }
    let inums: Vec<String> = spaces.iter().map(|(ns, _)| ns.inum().to_string()).collect();
    // Each namespace's, in the order of `spaces`.
    let agent_probes = |scrape: &Metrics| -> Vec<f64> {
        inums
            .iter()
            .map(|inum| scrape.value("tcp_keepalive_probes_total", &[("netns", inum.as_str())]))
            .collect()
    };
    // The same expiries counted by a classic tracepoint program, which the kernel runs from the
    // tracepoint's perf probe rather than as a raw-tracepoint probe like the agent's.
    let classic = ExpiriesNotRunByAnyProgram::open()
        .context("counting keepalive expiries with a classic tracepoint program")?;
    let not_run = ExpiriesNotRun::open(&agent)
        .context("counting keepalive expiries with a perf event on timer_expire_entry")?;
    let kernel_before = spaces
        .iter()
        .map(|(ns, _)| Ok(ns.tcp_ext()?.get("TCPKeepAlive")))
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let before = agent.scrape()?;
    let agent_before = agent_probes(&before);
    let lost_before = before.value(
        "keepalive_agent_ringbuf_reserve_failures_total",
        &[] as &[(&str, &str)],
    );
    let attribution = attribution_thread(agent.pid())?;
    let cpu_before = thread_cpu_ns(agent.pid())?;
    let signal_agent = |signal: libc::c_int| -> anyhow::Result<()> {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        if unsafe { libc::kill(agent.pid() as libc::pid_t, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling the agent");
        }
        Ok(())
    };
    if during == AgentDuringSync::Stopped {
        signal_agent(libc::SIGSTOP)?;
    }
    for (_, holders) in &mut spaces {
        holders.start_probing()?;
    }
    std::thread::sleep(length);
    let cpu_after = thread_cpu_ns(agent.pid())?;
    let cpu = ns_since(&cpu_before, &cpu_after);
    let of_thread = |threads: &HashMap<u32, u64>| threads.get(&attribution).copied().unwrap_or(0);
    let attribution = of_thread(&cpu_after).saturating_sub(of_thread(&cpu_before));
    let rss = vm_rss_kib(agent.pid())?;
    // The holders exit; their sockets close and probing stops.
    let mut kernel_each = Vec::with_capacity(namespaces);
    // The namespaces outlive the scrape: one deleted before it could lend its inode, and so
    // its series, to another namespace.
    let mut held = Vec::with_capacity(namespaces);
    for ((ns, holders), before) in spaces.into_iter().zip(&kernel_before) {
        holders.close()?;
        kernel_each.push(ns.tcp_ext()?.get("TCPKeepAlive") - before);
        held.push(ns);
    }
    let kernel: u64 = kernel_each.iter().sum();
    if during == AgentDuringSync::Stopped {
        signal_agent(libc::SIGCONT)?;
    }
    // The counters live in a kernel map, read at scrape: settled once the sockets are gone
    // and the counter sweep has added what no exit counted.
    agent.settle_counters()?;
    let scrape = agent.scrape()?;
    let probes_each: Vec<f64> = agent_probes(&scrape)
        .iter()
        .zip(&agent_before)
        .map(|(after, before)| after - before)
        .collect();
    let probes: f64 = probes_each.iter().sum();
    // Which namespaces fell short, and by how much (one over, by how much with a +, which the
    // sum would hide): one namespace short alone points at that namespace's counting, all of
    // them at something shared.
    let off: Vec<String> = kernel_each
        .iter()
        .zip(&probes_each)
        .filter(|&(&kernel, &probes)| probes != kernel as f64)
        .map(|(&kernel, &probes)| match kernel as f64 - probes {
            short if short > 0.0 => format!("{short}"),
            over => format!("+{}", -over),
        })
        .collect();
    let short = if off.is_empty() {
        format!("0 of {namespaces}")
    } else {
        format!("{} of {namespaces} ({})", off.len(), off.join(", "))
    };
    let first_seen = before_first_seen(&agent, &held)?;
    let lost = scrape.value(
        "keepalive_agent_ringbuf_reserve_failures_total",
        &[] as &[(&str, &str)],
    ) - lost_before;
    let counts = not_run.counts(&agent)?;
    let classic_missed = classic.not_run()?;
    let not_run = counts.not_run();
    let cpu = match during {
        AgentDuringSync::Running => {
            let percent = |ns: u64| ns as f64 / length.as_nanos() as f64 * 100.0;
            format!("{:.1} % ({:.1} %)", percent(cpu), percent(attribution))
        }
        AgentDuringSync::Stopped => "stopped".to_owned(),
    };
    println!(
        "| {total} | {kernel} | {probes} | {:.2} % | {short} | {first_seen} | {not_run} | {classic_missed} | {lost} | {cpu} | {} MiB | {} |",
        (kernel as f64 - probes) / kernel.max(1) as f64 * 100.0,
        rss / 1024,
        scrape.growth_since(&before, &UNCOUNTED_METRICS)
    );
    drop(held);
    Ok(())
}

/// What no program counts of `spaces`' probes on a CPU before the first expiry the programs saw
/// there in the namespace (`CounterSlot::before_first_seen`, summed over every CPU's slots),
/// and how many slots any namespace on the host took from another
/// (`TimerContext::slots_taken_over`): when that is not 0 the sum may be off either way (a
/// slot taken again starts from probes already counted; one taken over loses its figure). A
/// namespace created after the agent started has nothing on any CPU before that but expiries
/// the kernel ran no program for (or whose probes were unreadable, counted in the last
/// column).
fn before_first_seen(agent: &Agent, spaces: &[Netns]) -> anyhow::Result<String> {
    let cookies = agent.netns_cookies()?;
    let ours: Vec<u64> = spaces
        .iter()
        .filter_map(|ns| u32::try_from(ns.inum()).ok())
        .filter_map(|inum| cookies.get(&inum).copied())
        .collect();
    let contexts = agent.timer_context()?.get(&0, 0)?;
    let (mut before, mut taken_over) = (0, 0);
    for context in contexts.iter() {
        taken_over += context.slots_taken_over;
        before += context
            .counters
            .iter()
            .filter(|slot| slot.net != 0 && ours.contains(&slot.cookie))
            .map(|slot| slot.before_first_seen)
            .sum::<u64>();
    }
    Ok(format!("{before} ({taken_over})"))
}

/// CPU time of each thread of a process, in ns, by thread id (`schedstat`: finer than the
/// clock ticks of `stat`, which count a churn round's agent work in a handful of 10 ms ticks).
fn thread_cpu_ns(pid: u32) -> anyhow::Result<HashMap<u32, u64>> {
    let mut threads = HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Ok(schedstat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            // The thread exited meanwhile.
            continue;
        };
        let ns = schedstat
            .split_whitespace()
            .next()
            .context("empty schedstat")?
            .parse::<u64>()
            .context("schedstat: time on the CPU")?;
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
            threads.insert(tid, ns);
        }
    }
    Ok(threads)
}

/// CPU time a process's threads took since `before` ([`thread_cpu_ns`]); a thread that exited
/// since (a runtime's idle blocking thread) is missing its last share, not subtracted.
fn cpu_ns_since(pid: u32, before: &HashMap<u32, u64>) -> anyhow::Result<u64> {
    Ok(ns_since(before, &thread_cpu_ns(pid)?))
}

/// CPU time the threads in `after` took since `before` (both [`thread_cpu_ns`]).
fn ns_since(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// The thread id of the agent's attribution worker (its thread named `attribution`): owner
/// lookups, which read `/proc` and the cgroup tree, apart from the drain.
fn attribution_thread(pid: u32) -> anyhow::Result<u32> {
    named_thread(pid, "attribution")?
        .with_context(|| format!("the agent (pid {pid}) has no thread named attribution"))
}

/// The id of the thread of process `pid` named `name`, if it has one.
fn named_thread(pid: u32, name: &str) -> anyhow::Result<Option<u32>> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        if std::fs::read_to_string(task.path().join("comm"))?.trim_end() == name
            && let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok())
        {
            return Ok(Some(tid));
        }
    }
    Ok(None)
}

/// What the agent's counter sweep did and cost so far: its rounds (its metric), its program's
/// runs and run time (`bpf_stats`: on the swept CPUs, in their interrupts), and its thread's CPU
/// time (the test runs it makes and its wait for each interrupt to finish).
struct SweepCost {
    rounds: u64,
    program: Stats,
    thread_ns: u64,
}

impl SweepCost {
    /// `None` for an agent without the sweep (a baseline binary).
    fn read(agent: &Agent) -> anyhow::Result<Option<SweepCost>> {
        let pid = agent.pid();
        let Some(thread) = named_thread(pid, "counter-sweep")? else {
            return Ok(None);
        };
        let none: &[(&str, &str)] = &[];
        let rounds = agent.scrape()?.value(sweep_metric::ROUNDS, none) as u64;
        let thread_ns = thread_cpu_ns(pid)?.get(&thread).copied().unwrap_or(0);
        Ok(Some(SweepCost {
            rounds,
            program: stats(newest(names::COUNTER_SWEEP_PROGRAM)?)?,
            thread_ns,
        }))
    }

    fn since(&self, earlier: &SweepCost) -> SweepCost {
        SweepCost {
            rounds: self.rounds - earlier.rounds,
            program: self.program.since(&earlier.program),
            thread_ns: self.thread_ns - earlier.thread_ns,
        }
    }
}

/// `text`, the value of `flag`, as a number.
fn number<T: std::str::FromStr>(flag: &str, text: String) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text.parse()
        .with_context(|| format!("{flag} {text}: not a number"))
}

/// Connections opened and closed on the namespace's loopback in `length`.
fn churn(ns: &Netns, listener: &TcpListener, kind: Churn, length: Duration) -> anyhow::Result<u64> {
    ns.run(|| -> anyhow::Result<u64> {
        let end = Instant::now() + length;
        let mut n = 0;
        while Instant::now() < end {
            for _ in 0..32 {
                kind.connect_and_close(listener)?;
                n += 1;
            }
        }
        Ok(n)
    })?
}

/// One side of a churn round; its value indexes the totals.
#[derive(Clone, Copy)]
enum Side {
    /// No program on the hooks.
    Bare = 0,
    /// An empty tp_btf program on each of the agent's hooks: what any program there costs
    /// before it does anything (the tracepoint's dispatch to BPF and the program's run).
    Empty = 1,
    /// The agent.
    Agent = 2,
}

impl Side {
    const COUNT: usize = 3;
}

/// Empty tp_btf programs attached to tracepoints (by default every hook the agent attaches to),
/// detached on drop.
struct EmptyPrograms {
    _objects: Vec<aya::Ebpf>,
}

impl EmptyPrograms {
    fn attach(btf: &aya::Btf, hooks: &[String]) -> anyhow::Result<EmptyPrograms> {
        let mut objects = Vec::new();
        for hook in hooks {
            // One object per hook: a loaded program has one attach target.
            let mut object =
                aya::Ebpf::load(PROGRAMS_OBJECT).context("loading the programs object")?;
            let program = tp_program(&mut object, BASELINE_PROGRAM)?;
            program
                .load(hook, btf)
                .with_context(|| format!("loading an empty program for {hook}"))?;
            program
                .attach()
                .with_context(|| format!("attaching an empty program to {hook}"))?;
            objects.push(object);
        }
        Ok(EmptyPrograms { _objects: objects })
    }
}

/// Churn throughput without programs, with empty programs on the agent's hooks and with the
/// agent, in alternating rounds (forward, then backward), so drift on a shared machine falls on
/// every side alike. The empty side splits the agent's cost into the hooks' floor, which any
/// program on those tracepoints pays, and the agent's own work above it. The agent's process's
/// CPU per connection comes with it (what its userspace does with the records), and the same
/// for the RST workloads with an agent that reports every drop
/// (`--connections.keepalive-off-drops`), the path a drop of a connection that probed takes by
/// default.
fn churn_throughput(rounds: usize, length: Duration, empty_hooks: &[String]) -> anyhow::Result<()> {
    let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
    let ns = Netns::new("bench-churn")?;
    let listener = ns.listen(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let sides = [Side::Bare, Side::Empty, Side::Agent];
    let mut totals = [[0u64; Churn::ALL.len()]; Side::COUNT];
    // The agent's CPU (ns) over each workload's rounds.
    let mut agent_cpu = [0u64; Churn::ALL.len()];
    for round in 0..rounds {
        let mut order = sides;
        if round % 2 != 0 {
            order.reverse();
        }
        for side in order {
            let (agent, empty) = match side {
                Side::Bare => (None, None),
                Side::Empty => (None, Some(EmptyPrograms::attach(&btf, empty_hooks)?)),
                Side::Agent => (Some(Agent::start().context("starting the agent")?), None),
            };
            for (i, kind) in Churn::ALL.into_iter().enumerate() {
                let before = agent.as_ref().map(|a| thread_cpu_ns(a.pid())).transpose()?;
                totals[side as usize][i] += churn(&ns, &listener, kind, length)?;
                if let (Some(agent), Some(before)) = (&agent, before) {
                    // The agent drains what the last closes wrote (it polls every 50 ms).
                    std::thread::sleep(Duration::from_millis(200));
                    agent_cpu[i] += cpu_ns_since(agent.pid(), &before)?;
                }
            }
            drop((agent, empty));
        }
    }
    let seconds = (rounds as u64 * length.as_secs()) as f64;
    println!(
        "loopback connection churn, {rounds} rounds of {} s per workload and side, alternating; \
         empty: an empty tp_btf program on each of {}",
        length.as_secs(),
        empty_hooks.join(", ")
    );
    println!(
        "| workload | connections/s, no programs | empty programs | agent | lost to empty programs | \
         lost to the agent | agent against empty programs | agent process CPU per connection |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let lost = |from: f64, to: f64| (1.0 - to / from) * 100.0;
    for (i, kind) in Churn::ALL.into_iter().enumerate() {
        let [bare, empty, agent] = totals.map(|side| side[i] as f64 / seconds);
        println!(
            "| {} | {bare:.0} | {empty:.0} | {agent:.0} | {:.1} % | {:.1} % | {:.1} % | {:.0} ns |",
            kind.name(),
            lost(bare, empty),
            lost(bare, agent),
            lost(empty, agent),
            agent_cpu[i] as f64 / totals[Side::Agent as usize][i].max(1) as f64,
        );
    }

    // Every drop reported: one agent for all rounds (its throughput is not compared here).
    let agent = reporting_agent()?;
    println!(
        "agent process CPU per connection with every drop reported (--connections.keepalive-off-drops), {rounds} rounds of {} s",
        length.as_secs()
    );
    println!("| workload | connections | agent process CPU per connection |");
    println!("|---|---|---|");
    for kind in Churn::RESETS {
        let (mut connections, mut cpu) = (0, 0);
        for _ in 0..rounds {
            let before = thread_cpu_ns(agent.pid())?;
            connections += churn(&ns, &listener, kind, length)?;
            std::thread::sleep(Duration::from_millis(200));
            cpu += cpu_ns_since(agent.pid(), &before)?;
        }
        println!(
            "| {} | {connections} | {:.0} ns |",
            kind.name(),
            cpu as f64 / connections.max(1) as f64
        );
    }
    Ok(())
}

/// An agent that reports every drop (`--connections.keepalive-off-drops`): the path a drop of
/// a connection that probed takes by default, which churn cannot make.
fn reporting_agent() -> anyhow::Result<Agent> {
    Agent::start_with_args(&["--connections.keepalive-off-drops"])
        .context("starting the agent with --connections.keepalive-off-drops")
}

/// Which closes [`close_costs`] measures, and what the agent does with them.
#[derive(Clone, Copy)]
enum ClosePaths {
    /// Every churn workload, with the agent's default flags.
    Default,
    /// The RST workloads with `--connections.keepalive-off-drops`: every drop reported, the path
    /// a drop of a connection that probed takes by default.
    Reported,
}

/// Cost of `inet_sock_set_state` per close above an empty program on the same hook. By default:
/// closes the kernel filters out (orderly, no keepalive), closes of keepalive connections that
/// never probed (counted, not sent), and RST closes it counts without sending (no
/// keepalive). [`ClosePaths::Reported`]: RST closes it reports (drops). Each in a namespace
/// without conntrack, then in one whose connections conntrack tracks, as on every Kubernetes
/// node (a drop's record carries the namespace's conntrack timeout, which takes more reads
/// there).
fn close_costs(
    (baseline_id, close_id): (u32, u32),
    length: Duration,
    paths: ClosePaths,
) -> anyhow::Result<()> {
    let kinds: &[Churn] = match paths {
        ClosePaths::Default => &Churn::ALL,
        ClosePaths::Reported => &Churn::RESETS,
    };
    for conntrack in [false, true] {
        let ns = Netns::new(if conntrack {
            "bench-close-ct"
        } else {
            "bench-close"
        })?;
        if conntrack {
            ns.nft(
                "table inet bench_ct {\n  chain input {\n    type filter hook input priority 0;\n    \
                 ct state established,related accept\n  }\n}\n",
            )
            .context("loading an nftables conntrack rule into the close namespace")?;
        }
        let listener = ns.listen(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        for &kind in kinds {
            let (b0, c0) = (stats(baseline_id)?, stats(close_id)?);
            let connections = churn(&ns, &listener, kind, length)?;
            // Let the last closes (softirq) land before the snapshot.
            std::thread::sleep(Duration::from_millis(200));
            let (b1, c1) = (stats(baseline_id)?, stats(close_id)?);
            let (base, hook) = (b1.since(&b0), c1.since(&c0));
            let above = hook.above(&base);
            // Both ends of every connection close.
            let closes = 2 * connections;
            println!(
                "| {} ({}) | {} | {closes} | {} | {:.0} | {:.0} |",
                kind.name(),
                match paths {
                    ClosePaths::Default => kind.close_path(),
                    ClosePaths::Reported => "reported, drops",
                },
                if conntrack { "tracked" } else { "off" },
                hook.count,
                above / hook.count as f64,
                above / closes as f64
            );
        }
    }
    Ok(())
}

struct ProgramIds {
    baseline: u32,
    entry: u32,
    exit: u32,
}

/// What writing one close record costs, by how it is written, with no agent, per TCP close of
/// RST churn above an empty program on the same hook, in the same run: a record zeroed on the
/// stack and copied into the ring buffer (`bpf_ringbuf_output`: its lock, its copy, its commit;
/// how the agent wrote its records before it reserved them), the same record reserved in the
/// ring and zeroed there (no copy, two helper calls; how it writes close records and keepalive
/// expiries), and plain stores into a per-CPU slot (a per-CPU ring's floor). The ring is drained
/// every 10 ms, as the agent drains it, and what failed to fit is counted.
fn record_write_costs(length: Duration) -> anyhow::Result<()> {
    // Room for about 23 000 close records, many times what the churn closes between two
    // drains (the line's "did not fit" says if not).
    const RING_BYTES: u32 = 4 << 20;
    const SIDES: [(&str, &str); 3] = [
        (
            RECORD_RING_PROGRAM,
            "ring buffer, copied in (zeroed on the stack, `bpf_ringbuf_output`)",
        ),
        (
            RECORD_RESERVE_PROGRAM,
            "ring buffer, reserved and zeroed in place (`bpf_ringbuf_reserve`, `_submit`)",
        ),
        (
            RECORD_SLOT_PROGRAM,
            "this CPU's slot, in place (a per-CPU ring's floor: no reader takes its lines)",
        ),
    ];
    let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
    let mut ebpf = keepalive_agent::kernel::open_programs(RING_BYTES)
        .context("preparing the programs object")?;
    let mut ring = RingBuf::try_from(
        ebpf.take_map(RECORDS_MAP)
            .context("ring buffer missing from the object")?,
    )?;
    let failures: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.take_map(names::RESERVE_FAILURES_MAP)
            .context("reserve-failure counter missing from the object")?,
    )?;
    let slots: PerCpuArray<_, RecordSlots> = PerCpuArray::try_from(
        ebpf.take_map(RECORD_SLOTS_MAP)
            .context("record slots missing from the object")?,
    )?;
    let mut ids = [0; 1 + SIDES.len()];
    let names = std::iter::once(CLOSE_BASELINE_PROGRAM).chain(SIDES.map(|(name, _)| name));
    for (id, name) in ids.iter_mut().zip(names) {
        let program = tp_program(&mut ebpf, name)?;
        program.load("inet_sock_set_state", &btf)?;
        program.attach()?;
        *id = program.info()?.id();
    }
    let measured = std::thread::scope(|scope| -> anyhow::Result<_> {
        let churner = scope.spawn(|| -> anyhow::Result<_> {
            let ns = Netns::new("bench-write")?;
            let listener = ns.listen(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
            let before = ids.map(stats);
            let connections = churn(&ns, &listener, Churn::Reset, length)?;
            // Let the last closes (softirq) land before the snapshot.
            std::thread::sleep(Duration::from_millis(200));
            let after = ids.map(stats);
            Ok((connections, before, after))
        });
        let mut read = 0u64;
        let mut drain = |ring: &mut RingBuf<_>| {
            while ring.next().is_some() {
                read += 1;
            }
        };
        while !churner.is_finished() {
            drain(&mut ring);
            std::thread::sleep(Duration::from_millis(10));
        }
        drain(&mut ring);
        let churned = churner
            .join()
            .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
        Ok((churned, read))
    });
    let ((connections, before, after), read) = measured?;
    let failed: u64 = failures.get(&0, 0)?.iter().sum();
    // Every side writes one record per TCP close: the slot side's count is theirs.
    let closes: u64 = slots.get(&0, 0)?.iter().map(|s| s.head).sum();
    let mut spent = Vec::with_capacity(ids.len());
    for (before, after) in before.into_iter().zip(after) {
        spent.push(after?.since(&before?));
    }
    println!(
        "close record write alone (no agent), RST churn: {connections} connections, {closes} TCP \
         closes, each side one record per close; {read} ring records read, {failed} that did \
         not fit"
    );
    println!("| written to | ns per record above an empty program |");
    println!("|---|---|");
    for ((_, side), hook) in SIDES.iter().zip(&spent[1..]) {
        println!("| {side} | {:.0} |", hook.above(&spent[0]) / closes as f64);
    }
    Ok(())
}

/// The most recently loaded program of that name: the agent this run started.
fn newest(name: &str) -> anyhow::Result<u32> {
    loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .map(|p| p.id())
        .max()
        .with_context(|| format!("no loaded program named {name}: did the agent attach?"))
}

#[derive(Clone, Copy, Default)]
struct Stats {
    count: u64,
    nanos: u64,
}

impl Stats {
    fn per_hit(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.nanos as f64 / self.count as f64
        }
    }

    /// ns spent above `floor`'s per-hit run time over the same number of hits.
    fn above(&self, floor: &Stats) -> f64 {
        self.nanos as f64 - self.count as f64 * floor.per_hit()
    }

    fn since(&self, earlier: &Stats) -> Stats {
        Stats {
            count: self.count - earlier.count,
            nanos: self.nanos - earlier.nanos,
        }
    }
}

fn stats(id: u32) -> anyhow::Result<Stats> {
    let info: ProgramInfo = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .with_context(|| format!("program {id} vanished"))?;
    Ok(Stats {
        count: info.run_count(),
        nanos: info.run_time().as_nanos() as u64,
    })
}

struct Phase {
    baseline: Stats,
    entry: Stats,
    exit: Stats,
    /// Keepalive expiries on the host, counted by perf (`KeepaliveExpiryCount`), whatever the
    /// agent's own counters say.
    keepalive_hits: u64,
    /// The growth of the agent's `tcp_keepalive_timer_expiries_total` for the namespace.
    agent_keepalive_hits: u64,
    /// Keepalive expiry records the agent received.
    records: u64,
}

impl Phase {
    /// ns above the floor spent in `hook` during the phase.
    fn above_floor(&self, hook: Stats) -> f64 {
        hook.above(&self.baseline)
    }
}

/// Per-hit cost above the floor of the filtered-out path `f` and of the keepalive path `c`,
/// from the two phases: `above_floor = (hits - keepalive) * f + keepalive * c` in each.
fn solve(idle: &Phase, busy: &Phase, hook: impl Fn(&Phase) -> Stats) -> (f64, f64) {
    let row = |p: &Phase| {
        let k = p.keepalive_hits as f64;
        let other = hook(p).count as f64 - k;
        (other, k, p.above_floor(hook(p)))
    };
    let (a1, b1, y1) = row(idle);
    let (a2, b2, y2) = row(busy);
    let det = a1 * b2 - a2 * b1;
    ((y1 * b2 - y2 * b1) / det, (a1 * y2 - a2 * y1) / det)
}

/// The namespace's keepalive expiries as the kernel programs count them (exact, sent to the
/// agent or not), and the keepalive expiry records the agent received (from any namespace).
fn keepalive_expiries(agent: &Agent, netns: &str) -> anyhow::Result<(u64, u64)> {
    let m = agent.scrape()?;
    Ok((
        m.value("tcp_keepalive_timer_expiries_total", &[("netns", netns)]) as u64,
        m.value(
            "keepalive_agent_events_total",
            &[("kind", "keepalive_timer")],
        ) as u64,
    ))
}

fn measure(
    ids: &ProgramIds,
    agent: &Agent,
    netns: &str,
    length: Duration,
) -> anyhow::Result<Phase> {
    let expiries =
        KeepaliveExpiryCount::start().context("counting keepalive expiries with perf")?;
    // perf's count is read with the stats. The agent reads the kernel's counters at a scrape,
    // so its count is read a moment after each stats snapshot, at both ends alike: the window
    // shifts, its length does not.
    let snapshot = || -> anyhow::Result<PhaseEnd> {
        let (baseline, entry, exit) = (stats(ids.baseline)?, stats(ids.entry)?, stats(ids.exit)?);
        let hits = expiries.read()?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(PhaseEnd {
            baseline,
            entry,
            exit,
            hits,
            agent: keepalive_expiries(agent, netns)?,
        })
    };
    let start = snapshot()?;
    std::thread::sleep(length);
    let end = snapshot()?;
    Ok(Phase {
        baseline: end.baseline.since(&start.baseline),
        entry: end.entry.since(&start.entry),
        exit: end.exit.since(&start.exit),
        keepalive_hits: end.hits - start.hits,
        agent_keepalive_hits: end.agent.0 - start.agent.0,
        records: end.agent.1 - start.agent.1,
    })
}

/// What [`measure`] reads at each end of a phase.
struct PhaseEnd {
    baseline: Stats,
    entry: Stats,
    exit: Stats,
    /// perf's count of keepalive expiries, read with the stats.
    hits: u64,
    /// The agent's count of the namespace's keepalive expiries, and the records it received.
    agent: (u64, u64),
}

/// Sets `kernel.bpf_stats_enabled` for a phase and restores the previous value.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn set(on: bool) -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?;
        std::fs::write(STATS_SYSCTL, if on { "1" } else { "0" })
            .with_context(|| format!("writing {STATS_SYSCTL}"))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, self.previous.trim()) {
            eprintln!("warning: could not restore {STATS_SYSCTL}: {e}");
        }
    }
}

/// The userspace pipeline over records built in memory: records per second of process CPU.
fn pipeline(connections: u32, probing: u32) {
    let run = keepalive_agent::pipeline_throughput(connections, 5);
    println!(
        "userspace pipeline (decode → track → classify → metrics, attribution worker included): \
         {} records ({connections} keepalive timeouts of 3 probes each, 5 RST closes \
         per timeout) in {:.2} s CPU ({:.2} s wall): {:.0} events/s per core",
        run.records,
        run.cpu.as_secs_f64(),
        run.wall.as_secs_f64(),
        run.per_core_second()
    );
    // Each audit walk checks the table: a lookup per socket walked, then a pass over the table.
    for (connections, sockets) in [(10_000, 20_000), (100_000, 200_000)] {
        let took = keepalive_agent::reconcile_cost(connections, sockets);
        println!(
            "audit walk's check of the connection table: {connections} live connections \
             against {sockets} sockets walked in {:.1} ms (the table locked meanwhile)",
            took.as_secs_f64() * 1000.0
        );
    }
    if probing == 0 {
        return;
    }
    const ROUNDS: u32 = 10;
    let run = keepalive_agent::probing_throughput(probing, ROUNDS);
    println!(
        "userspace, {probing} live connections probing every second, answered ({ROUNDS} rounds): \
         {} records in {:.2} s CPU ({:.2} s wall): {:.0} events/s per core, {:.1} % of a core \
         at {probing} probes/s",
        run.records,
        run.cpu.as_secs_f64(),
        run.wall.as_secs_f64(),
        run.per_core_second(),
        f64::from(probing) / run.per_core_second() * 100.0
    );
}
