//! Reading the guests' consoles and rendering the matrix. The guest side of the `KAT-*` line
//! format is tests/src/bin/guest-scenarios.rs (plus the `/init` lines in initramfs.rs).

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Deserialize;

use super::{
    btf::Facts,
    qemu::{Boot, Guest, with_parameter},
};

/// One `KAT-RESULT` line.
#[derive(Debug, Deserialize)]
struct ScenarioResult {
    scenario: String,
    expect: String,
    kernel: Option<KernelFigures>,
    agent: Option<AgentFigures>,
    #[serde(default)]
    mismatches: Vec<String>,
    error: Option<String>,
    seconds: f64,
}

/// The namespace's TcpExt deltas over the scenario.
#[derive(Debug, Deserialize)]
struct KernelFigures {
    #[serde(rename = "TCPKeepAlive")]
    keepalive: u64,
    #[serde(rename = "TCPAbortOnTimeout")]
    aborts: u64,
}

/// The agent's aggregate counters for the namespace (drops: non-zero reasons only).
#[derive(Debug, Deserialize)]
struct AgentFigures {
    probes: f64,
    drops: BTreeMap<String, f64>,
}

/// What one guest's console says.
#[derive(Debug, Default)]
struct Console {
    uname: Option<String>,
    check: Vec<String>,
    check_exit: Option<i32>,
    ready: Option<String>,
    /// Each hook, whether it attached, and the program (variant) that did.
    hooks: Vec<(String, bool, String)>,
    plan: Vec<String>,
    results: Vec<ScenarioResult>,
    unreadable: Vec<String>,
    agent_log: Vec<String>,
    /// The `KAT-SWEEP` line as printed: `<sweeps> <failures> <probes>`, or `absent ...`.
    sweep: Option<String>,
    fatal: Vec<String>,
    /// The last step `/init` said it was starting (`KAT-STEP`).
    step: Option<String>,
    done: bool,
}

impl Console {
    fn parse(text: &str) -> Console {
        let mut c = Console::default();
        for line in text.lines() {
            // The serial console ends lines with CR LF; kernel messages are not ours.
            let line = line.trim_end_matches('\r');
            let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
            match tag {
                "KAT-UNAME" => c.uname = Some(rest.to_owned()),
                "KAT-CHECK" => c.check.push(rest.to_owned()),
                "KAT-CHECK-EXIT" => c.check_exit = rest.trim().parse().ok(),
                "KAT-READY" => c.ready = Some(rest.to_owned()),
                "KAT-HOOK" => {
                    let mut words = rest.split_whitespace();
                    if let (Some(hook), Some(value)) = (words.next(), words.next()) {
                        let program = words.next().unwrap_or_default().to_owned();
                        c.hooks
                            .push((hook.to_owned(), value.parse() == Ok(1.0), program));
                    }
                }
                "KAT-PLAN" => c.plan = rest.split_whitespace().map(str::to_owned).collect(),
                "KAT-RESULT" => match serde_json::from_str(rest) {
                    Ok(result) => c.results.push(result),
                    Err(err) => c.unreadable.push(format!("{err}: {line}")),
                },
                "KAT-AGENT-LOG" => c.agent_log.push(rest.to_owned()),
                "KAT-SWEEP" => c.sweep = Some(rest.to_owned()),
                "KAT-FATAL" => c.fatal.push(rest.to_owned()),
                "KAT-STEP" => c.step = Some(rest.to_owned()),
                "KAT-DONE" => c.done = true,
                _ => {}
            }
        }
        c
    }

    /// The `load` line of `check --load`, e.g. `WARN  load  4/5 hooks attached as tp_btf, ...`.
    fn load_line(&self) -> Option<&str> {
        self.check.iter().find_map(|l| {
            let mut words = l.split_whitespace();
            let status = words.next()?;
            (words.next()? == "load")
                .then_some(l.as_str())
                .filter(|_| !status.is_empty())
        })
    }

    /// `4/5 (not attached: tcp_send_reset)`, or `4/5 (not in this kernel: tcp_receive_reset)`.
    fn hooks_summary(&self, facts: &Facts) -> String {
        if self.hooks.is_empty() {
            return "unknown (agent never ready)".to_owned();
        }
        let attached = self.hooks.iter().filter(|(_, on, _)| *on).count();
        let (absent, refused): (Vec<&str>, Vec<&str>) = self
            .hooks
            .iter()
            .filter(|(_, on, _)| !on)
            .map(|(h, _, _)| h.as_str())
            .partition(|h| !facts.tracepoints.contains(*h));
        let mut notes = Vec::new();
        if !refused.is_empty() {
            notes.push(format!("not attached: {}", refused.join(", ")));
        }
        if !absent.is_empty() {
            notes.push(format!("not in this kernel: {}", absent.join(", ")));
        }
        let timer_reads = self
            .hooks
            .iter()
            .find(|(hook, on, _)| hook == "timer_expire_entry" && *on)
            .map(|(_, _, program)| {
                if program.ends_with(TYPED_SUFFIX) {
                    "; timers read the socket with typed loads"
                } else {
                    "; timers read the socket with helper calls"
                }
            })
            .unwrap_or_default();
        if notes.is_empty() {
            format!("{attached}/{}{timer_reads}", self.hooks.len())
        } else {
            format!(
                "{attached}/{} ({}){timer_reads}",
                self.hooks.len(),
                notes.join("; ")
            )
        }
    }
}

/// Every kernel's console, read and judged.
pub(super) struct Matrix<'a> {
    rows: Vec<Row<'a>>,
}

struct Row<'a> {
    boot: &'a Boot<'a>,
    guest: &'a Guest,
    console: Console,
    /// Why this kernel fails; empty when every scenario matched.
    problems: Vec<String>,
}

impl<'a> Matrix<'a> {
    pub(super) fn new(boots: &'a [Boot<'a>], guests: &'a [Guest]) -> Matrix<'a> {
        let rows = boots
            .iter()
            .zip(guests)
            .map(|(boot, guest)| {
                let console = Console::parse(&guest.console);
                let mut problems = problems(&console, guest, &boot.kernel.facts);
                problems.extend(
                    boot.isolated_cpu
                        .and_then(|cpu| isolation_problem(&console, cpu)),
                );
                Row {
                    boot,
                    guest,
                    console,
                    problems,
                }
            })
            .collect();
        Matrix { rows }
    }

    /// Guests with at least one problem.
    pub(super) fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.problems.is_empty()).count()
    }

    /// The scenario names, in the order the guests ran them.
    fn scenarios(&self) -> Vec<(&str, &str)> {
        let mut names: Vec<(&str, &str)> = Vec::new();
        for row in &self.rows {
            for name in &row.console.plan {
                if !names.iter().any(|(n, _)| n == name) {
                    let expect = row
                        .console
                        .results
                        .iter()
                        .find(|r| &r.scenario == name)
                        .map_or("", |r| r.expect.as_str());
                    names.push((name, expect));
                }
            }
        }
        names
    }

    pub(super) fn text(&self) -> String {
        let mut out = String::from("\n== kernel matrix\n");
        for row in &self.rows {
            let k = row.boot.kernel;
            let _ = writeln!(
                out,
                "\n{} — {} {} (uname -r: {}), guest ran {:.0} s",
                row.boot.name(),
                k.package,
                k.version,
                row.console.uname.as_deref().unwrap_or("? (no KAT-UNAME)"),
                row.guest.seconds
            );
            let _ = writeln!(out, "  {}; {}", k.facts.timer_layout(), k.facts.hooks());
            for earlier in &row.guest.earlier_boots {
                let _ = writeln!(out, "  booted again: {earlier}");
            }
            let _ = writeln!(
                out,
                "  check --load: {} (exit {})",
                row.console.load_line().unwrap_or("no load line"),
                row.console
                    .check_exit
                    .map_or("?".to_owned(), |c| c.to_string())
            );
            let _ = writeln!(
                out,
                "  hooks attached: {}",
                row.console.hooks_summary(&k.facts)
            );
            for result in &row.console.results {
                let _ = writeln!(
                    out,
                    "  {:<36} kernel {:<5} agent {:<52} {} ({:.0} s)",
                    result.scenario,
                    kernel_cell(result),
                    agent_cell(result),
                    if result.error.is_none() && result.mismatches.is_empty() {
                        "ok"
                    } else {
                        "MISMATCH"
                    },
                    result.seconds
                );
            }
            if row.problems.is_empty() {
                let _ = writeln!(out, "  result: every scenario matches the kernel");
            } else {
                let _ = writeln!(out, "  result: FAILED");
                for problem in &row.problems {
                    let _ = writeln!(out, "    - {problem}");
                }
                if !row.console.agent_log.is_empty() {
                    let _ = writeln!(out, "    agent log (from the guest):");
                    for line in &row.console.agent_log {
                        let _ = writeln!(out, "      {line}");
                    }
                }
                if !row.console.done {
                    let _ = writeln!(
                        out,
                        "    console tail ({}):",
                        row.guest.console_path.display()
                    );
                    let lines: Vec<&str> = row.guest.console.lines().collect();
                    for line in &lines[lines.len().saturating_sub(40)..] {
                        let _ = writeln!(out, "      {}", line.trim_end_matches('\r'));
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "\n{} of {} guest(s) match the kernel's own counters in every scenario\n",
            self.rows.len() - self.failures(),
            self.rows.len()
        );
        out
    }

    pub(super) fn markdown(&self) -> String {
        let mut out = String::from(
            "Produced by `cargo xtask vm`: each Debian kernel booted in qemu with the static agent; \
             every scenario runs in its own network namespace and the agent's per-namespace \
             counters are compared with that namespace's TcpExt deltas.\n\n\
             | kernel | package | timers (from BTF) | hooks attached | result |\n\
             |---|---|---|---|---|\n",
        );
        for row in &self.rows {
            let k = row.boot.kernel;
            let _ = writeln!(
                out,
                "| {} (`{}`) | `{}` {} | {} | {} | {} |",
                row.column(),
                row.console.uname.as_deref().unwrap_or(&k.release),
                k.package,
                k.version,
                k.facts.timer_layout().trim_start_matches("BTF: "),
                row.console.hooks_summary(&k.facts),
                if row.problems.is_empty() {
                    let isolated = row
                        .boot
                        .isolated_cpu
                        .map(|cpu| {
                            format!(
                                "; the counter sweep left the isolated CPU {cpu} alone, and so \
                                 the other unswept"
                            )
                        })
                        .unwrap_or_default();
                    match row.guest.earlier_boots.len() {
                        0 => format!("all scenarios equal the kernel{isolated}"),
                        1 => format!(
                            "all scenarios equal the kernel{isolated} (booted twice: the first \
                             boot panicked in kernel text patching)"
                        ),
                        n => format!(
                            "all scenarios equal the kernel{isolated} (booted {} times: the \
                             earlier {n} panicked in kernel text patching)",
                            n + 1
                        ),
                    }
                } else {
                    format!("**{} problem(s)**", row.problems.len())
                }
            );
        }
        out.push_str(
            "\nCells: kernel `TCPKeepAlive`/`TCPAbortOnTimeout` deltas → agent probes and drops \
             by reason.\n\n| scenario | expected |",
        );
        for row in &self.rows {
            let _ = write!(out, " {} |", row.column());
        }
        out.push_str("\n|---|---|");
        out.push_str(&"---|".repeat(self.rows.len()));
        out.push('\n');
        for (name, expect) in self.scenarios() {
            let _ = write!(out, "| {name} | {expect} |");
            for row in &self.rows {
                let cell = match row.console.results.iter().find(|r| r.scenario == name) {
                    None => "no result".to_owned(),
                    Some(r) if r.error.is_some() => "scenario failed".to_owned(),
                    Some(r) => format!(
                        "{} {} → {}",
                        if r.mismatches.is_empty() {
                            "ok"
                        } else {
                            "**MISMATCH**"
                        },
                        kernel_cell(r),
                        agent_cell(r)
                    ),
                };
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
        out
    }
}

impl Row<'_> {
    /// The markdown's name for this guest: `6.12.118`, or `6.12.118 nohz_full=1`.
    fn column(&self) -> String {
        with_parameter(self.boot.kernel.upstream(), self.boot.parameter())
    }
}

/// What is wrong on a guest booted with `cpu` isolated: `check --load` must say the counter
/// sweep ran and left that CPU alone (the agent reads the kernel's isolated and nohz_full
/// lists). On the guests' two CPUs that also leaves the other one unswept: the sweeping thread
/// would have to run on the isolated CPU to reach it, and says so.
fn isolation_problem(console: &Console, cpu: u32) -> Option<String> {
    let Some(line) = console.load_line() else {
        return Some(format!(
            "booted with nohz_full={cpu}, but check --load printed no load line"
        ));
    };
    let said = format!("the isolated {cpu}, left alone");
    (!line.contains("counter sweep ran") || !line.contains(&said)).then(|| {
        format!(
            "booted with nohz_full={cpu}, but check --load did not say the counter sweep ran \
             and left `{said}`: {line}"
        )
    })
}

fn kernel_cell(r: &ScenarioResult) -> String {
    match &r.kernel {
        Some(k) => format!("{}/{}", k.keepalive, k.aborts),
        None => "-".to_owned(),
    }
}

fn agent_cell(r: &ScenarioResult) -> String {
    match &r.agent {
        None => "no scrape".to_owned(),
        Some(a) => {
            let drops: Vec<String> = a
                .drops
                .iter()
                .map(|(reason, n)| format!("{reason}={n}"))
                .collect();
            format!(
                "{} probes, {}",
                a.probes,
                if drops.is_empty() {
                    "no drop".to_owned()
                } else {
                    drops.join(" ")
                }
            )
        }
    }
}

/// The hooks whose programs read the socket with typed loads where the kernel has
/// `bpf_rdonly_cast`, and the suffix of those variants' names.
const TIMER_HOOKS: [&str; 2] = ["timer_expire_entry", "timer_expire_exit"];
const TYPED_SUFFIX: &str = "_typed";

fn problems(console: &Console, guest: &Guest, facts: &Facts) -> Vec<String> {
    let mut out = Vec::new();
    for (hook, attached, program) in &console.hooks {
        if !attached && facts.tracepoints.contains(hook) {
            out.push(format!(
                "hook {hook}: the kernel has this tracepoint (btf_trace_{hook} in its BTF) but \
                 the agent did not attach it"
            ));
        }
        // Where the kernel has the kfunc, the typed timer programs must load: a fall-back to
        // helper reads passes every scenario and would go unnoticed.
        if *attached && TIMER_HOOKS.contains(&hook.as_str()) {
            let typed = program.ends_with(TYPED_SUFFIX);
            if typed != facts.rdonly_cast {
                out.push(format!(
                    "hook {hook}: attached {program}, but the kernel {} bpf_rdonly_cast",
                    if facts.rdonly_cast { "has" } else { "lacks" }
                ));
            }
        }
    }
    if let Some(problem) = &guest.problem {
        out.push(format!("guest: {problem}"));
    }
    out.extend(console.fatal.iter().map(|f| format!("guest: {f}")));
    match console.check_exit {
        Some(0) => {}
        Some(code) => out.push(format!("`keepalive-agent check --load` exited {code}")),
        None => out.push("`keepalive-agent check --load` did not report".to_owned()),
    }
    if console.plan.is_empty() {
        out.push("the scenario program never said what it would run (no KAT-PLAN)".to_owned());
    }
    if let Some(problem) = sweep_problem(console.sweep.as_deref()) {
        out.push(problem);
    }
    for name in &console.plan {
        if !console.results.iter().any(|r| &r.scenario == name) {
            out.push(format!("{name}: no result"));
        }
    }
    out.extend(
        console
            .unreadable
            .iter()
            .map(|l| format!("unreadable result line: {l}")),
    );
    for r in &console.results {
        if let Some(error) = &r.error {
            out.push(format!("{}: {error}", r.scenario));
        }
        for m in &r.mismatches {
            out.push(format!("{}: {m}", r.scenario));
        }
    }
    if !console.done {
        out.push(format!(
            "the console has no KAT-DONE: the guest was cut short{}",
            match &console.step {
                Some(step) => format!(" (in or after /init's step `{step}`)"),
                None => " before /init's first step".to_owned(),
            }
        ));
    }
    out
}

/// What is wrong with the agent's counter sweep on this kernel, from its `KAT-SWEEP` line:
/// its program must load and every sweep of the guest's two CPUs succeed.
fn sweep_problem(line: Option<&str>) -> Option<String> {
    let Some(line) = line else {
        return Some("the scenario program did not report the counter sweep (no KAT-SWEEP)".into());
    };
    let figures: Vec<f64> = line
        .split_whitespace()
        .map_while(|word| word.parse().ok())
        .collect();
    match figures[..] {
        [sweeps, 0.0, _] if sweeps > 0.0 => None,
        [sweeps, failures, _] => Some(format!(
            "counter sweep: {sweeps} sweeps, {failures} failed (see the agent log)"
        )),
        _ if line.starts_with("absent (scrape failed") => Some(format!(
            "counter sweep: {line} (the agent could not be scraped: see the agent log)"
        )),
        _ => Some(format!(
            "counter sweep: {line} (its program did not load: see the agent log)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_sweep_that_never_ran_or_failed_is_a_problem() {
        assert_eq!(sweep_problem(Some("12 0 0")), None);
        assert!(sweep_problem(Some("0 0 0")).is_some());
        assert!(sweep_problem(Some("12 1 0")).is_some());
        assert!(
            sweep_problem(Some("absent"))
                .unwrap()
                .contains("did not load")
        );
        assert!(sweep_problem(None).unwrap().contains("no KAT-SWEEP"));
        assert!(
            sweep_problem(Some("absent (scrape failed: connection refused)"))
                .unwrap()
                .contains("could not be scraped")
        );
    }

    #[test]
    fn a_guest_with_an_isolated_cpu_must_have_its_sweep_leave_it_alone() {
        let left_alone = Console::parse(
            "KAT-CHECK ok    load  5/5 hooks attached as tp_btf, counter sweep ran on every \
             CPU but the isolated 1, left alone; detached again\n",
        );
        assert_eq!(isolation_problem(&left_alone, 1), None);
        // Two CPUs, one isolated: the other cannot be swept either.
        let two_cpus = Console::parse(
            "KAT-CHECK WARN  load  5/5 hooks attached as tp_btf, counter sweep ran, but not on \
             CPU 0, the only CPU the agent may run on that is not isolated (…), nor on the \
             isolated 1, left alone; detached again\n",
        );
        assert_eq!(isolation_problem(&two_cpus, 1), None);
        let not_loaded = Console::parse(
            "KAT-CHECK WARN  load  5/5 hooks attached as tp_btf, counter sweep NOT loaded; \
             the isolated 1, left alone\n",
        );
        assert!(isolation_problem(&not_loaded, 1).is_some());
        let swept = Console::parse(
            "KAT-CHECK ok    load  5/5 hooks attached as tp_btf, counter sweep ran on every \
             CPU; detached again\n",
        );
        assert!(
            isolation_problem(&swept, 1)
                .unwrap()
                .contains("left `the isolated 1, left alone`")
        );
        assert!(
            isolation_problem(&Console::parse("KAT-UNAME x\n"), 1)
                .unwrap()
                .contains("no load line")
        );
    }

    #[test]
    fn console_lines_are_read_and_a_mismatch_is_a_problem() {
        let text = "[    1.0] kernel noise\r\nKAT-UNAME 6.1.0-57-cloud-amd64\r\n\
            KAT-CHECK-EXIT 0\r\nKAT-CHECK WARN  load  4/5 hooks attached as tp_btf\r\n\
            KAT-HOOK tcp_send_reset 0 \r\nKAT-HOOK timer_expire_entry 1 timer_expire_entry\r\n\
            KAT-HOOK tcp_receive_reset 0\r\n\
            KAT-PLAN a b\r\n\
            KAT-RESULT {\"scenario\":\"a\",\"expect\":\"x\",\"netns\":1,\"kernel\":{\"TCPKeepAlive\":3,\"TCPAbortOnTimeout\":1},\"agent\":{\"probes\":3.0,\"drops\":{\"keepalive_timeout\":1.0}},\"mismatches\":[\"m\"],\"seconds\":1.0}\r\n\
            KAT-SWEEP 9 0 0\r\n\
            KAT-DONE 2 1\r\n";
        let c = Console::parse(text);
        assert_eq!(c.uname.as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(c.check_exit, Some(0));
        assert_eq!(c.sweep.as_deref(), Some("9 0 0"));
        assert!(c.load_line().is_some_and(|l| l.contains("4/5")));
        // tcp_send_reset exists but was refused; tcp_receive_reset's tracepoint is missing (no
        // supported kernel lacks it, but an optional hook may be absent).
        let mut facts = Facts {
            keepalive_timer_member: false,
            retransmit_timer_member: true,
            send_reset_args: Some(2),
            tracepoints: ["tcp_send_reset", "timer_expire_entry"]
                .map(str::to_owned)
                .into(),
            rdonly_cast: false,
        };
        assert_eq!(
            c.hooks_summary(&facts),
            "1/3 (not attached: tcp_send_reset; not in this kernel: tcp_receive_reset); timers \
             read the socket with helper calls"
        );
        assert!(c.done);
        let r = &c.results[0];
        assert_eq!(kernel_cell(r), "3/1");
        assert_eq!(agent_cell(r), "3 probes, keepalive_timeout=1");
        let guest = Guest {
            console: String::new(),
            console_path: "x".into(),
            seconds: 0.0,
            problem: None,
            earlier_boots: Vec::new(),
        };
        let p = problems(&c, &guest, &facts);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("hook tcp_send_reset: the kernel has this tracepoint"));
        assert_eq!(p[1..], ["b: no result", "a: m"]);
        // A kernel with the kfunc whose agent fell back to helper reads.
        facts.rdonly_cast = true;
        let p = problems(&c, &guest, &facts);
        assert_eq!(p.len(), 4, "{p:?}");
        assert_eq!(
            p[1],
            "hook timer_expire_entry: attached timer_expire_entry, but the kernel has \
             bpf_rdonly_cast"
        );
        let typed = Console::parse("KAT-HOOK timer_expire_entry 1 timer_expire_entry_typed\n");
        assert!(typed.hooks_summary(&facts).ends_with("typed loads"));
        assert!(
            problems(&typed, &guest, &facts)
                .iter()
                .all(|p| !p.starts_with("hook"))
        );
        let cut = Console::parse("KAT-UNAME x\n");
        assert!(problems(&cut, &guest, &facts).len() >= 3);
        let hung = Console::parse(
            "KAT-STEP insmod ip_vs.ko\nKAT-STEP keepalive-agent check --load\n\
             KAT-CHECK ok    kernel  6.1\n",
        );
        assert!(
            problems(&hung, &guest, &facts)
                .iter()
                .any(|p| p.ends_with("(in or after /init's step `keepalive-agent check --load`)")),
            "{:?}",
            problems(&hung, &guest, &facts)
        );
    }
}
