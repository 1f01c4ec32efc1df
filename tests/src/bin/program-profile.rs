//! Where the agent's kernel programs spend their time, by source line (`cargo xtask profile`,
//! as root). Not a test: it prints figures.
//!
//! For each workload, `perf record -a -g` samples the whole machine while `hook-cost` (next to
//! this binary) runs it; then an agent started with default flags loads the same programs, and
//! each sample whose call chain is in one of them is attributed to the innermost program line
//! on it (the kernel's `jited_line_info` for the program, its strings from the program's BTF),
//! and to the kernel function the program called when the sample was not in its own code. A
//! sample counts for a program when its frame's symbol (`bpf_prog_TAG_NAME`) is one of the
//! reloaded program's functions and perf saw that function loaded at the frame's address with
//! the same length: the bench's own programs, and the second agent `--churn-only` starts with
//! other flags (its `.rodata` differs, so its JIT code does too, under the same tag), are the
//! "other BPF code" count.
//!
//! Workloads (`--workload`, repeatable; default both):
//! - `expiries`: 50 000 keepalive connections probing every second against answering peers
//!   (`hook-cost`'s synchronized row, with the agent running, then stopped);
//! - `closes`: `hook-cost --churn-only`, one round of 3 s per workload and side.
//!
//! With samples from a timer interrupt (no PMU in a VM), a stall shows on the instruction after
//! it: a cache miss on a load is charged to the line that uses the value, or the next load.
//! A helper's samples go to the line of its call (its return address less one).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use keepalive_tests::profile::{attribute, bpf_symbols, line_table, parse_perf_script};
use keepalive_tests::{Agent, programs_of};

struct Workload {
    name: &'static str,
    args: &'static [&'static str],
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "expiries",
        args: &[
            "--rounds",
            "0",
            "--seconds",
            "1",
            "--connections",
            "100",
            "--pipeline-connections",
            "10",
            "--probing-connections",
            "0",
            "--sync-connections",
            "50000",
        ],
    },
    Workload {
        name: "closes",
        args: &["--churn-only", "--rounds", "1", "--churn-seconds", "3"],
    },
];

fn main() -> anyhow::Result<()> {
    let mut out = PathBuf::from("target/profile");
    let mut top = 12usize;
    let mut chosen: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--out" => out = PathBuf::from(value()?),
            "--top" => {
                let v = value()?;
                top = v
                    .parse()
                    .with_context(|| format!("--top takes a number of lines, not {v:?}"))?;
            }
            "--workload" => {
                let v = value()?;
                if !WORKLOADS.iter().any(|w| w.name == v) {
                    bail!(
                        "no workload {v:?}; there are {}",
                        WORKLOADS.map(|w| w.name).join(", ")
                    );
                }
                chosen.push(v);
            }
            _ => bail!(
                "unknown argument {arg:?}\nusage: program-profile [--out DIR] [--top N] \
                 [--workload expiries|closes]... (as root; see `cargo xtask profile`)"
            ),
        }
    }
    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| chosen.is_empty() || chosen.iter().any(|c| c == w.name))
        .collect();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let hook_cost = std::env::current_exe()
        .context("cannot find this binary's path")?
        .with_file_name("hook-cost");
    if !hook_cost.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release -p keepalive-tests --bins)",
            hook_cost.display()
        );
    }

    let mut recorded = Vec::new();
    for workload in &workloads {
        recorded.push((workload, record(workload, &hook_cost, &out)?));
    }

    // The programs' lines and addresses, from an agent that loads the same code.
    let agent = Agent::start().context("cannot start the agent to read its programs' lines")?;
    let ids = programs_of(agent.pid())?;
    let kallsyms =
        std::fs::read_to_string("/proc/kallsyms").context("cannot read /proc/kallsyms")?;
    let symbols = bpf_symbols(&kallsyms);
    let (table, skipped) = line_table(&ids, &symbols);
    drop(agent);
    for why in &skipped {
        eprintln!("program-profile: skipped {why}");
    }

    for (workload, data) in recorded {
        let script = parse_perf_script(&perf_script(&data)?);
        let bpf_frames = script
            .samples
            .iter()
            .flatten()
            .any(|frame| frame.symbol.starts_with("bpf_prog_"));
        if bpf_frames && script.registrations == 0 {
            bail!(
                "perf recorded samples in BPF code but no BPF load events (PERF_RECORD_KSYMBOL) \
                 in {}: without them no sample can be told to be the agent's code (perf older \
                 than 5.1?)",
                data.display()
            );
        }
        let profile = attribute(&script, &symbols, &table);
        println!(
            "{}: hook-cost {} under perf record -a -g -F {FREQUENCY} ({} samples on the host; \
             hook-cost's output in {})",
            workload.name,
            workload.args.join(" "),
            script.samples.len(),
            out.join(format!("{}.hook-cost.txt", workload.name))
                .display(),
        );
        print!("{}", profile.render(top));
        println!();
    }
    Ok(())
}

/// Sampling frequency (Hz): high enough for thousands of samples in the programs in a minute.
const FREQUENCY: u32 = 4999;

/// Runs `workload` under `perf record`; returns the data file.
fn record(workload: &Workload, hook_cost: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let data = out.join(format!("{}.perf.data", workload.name));
    let log = out.join(format!("{}.hook-cost.txt", workload.name));
    let stdout =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    eprintln!(
        "program-profile: {}: perf record around hook-cost {}",
        workload.name,
        workload.args.join(" ")
    );
    let status = Command::new("perf")
        .args(["record", "-a", "-g", "-F", &FREQUENCY.to_string(), "-o"])
        .arg(&data)
        .arg("--")
        .arg(hook_cost)
        .args(workload.args)
        .stdout(stdout)
        .status()
        .context("cannot run perf (Debian package linux-perf; `cargo xtask setup` installs it)")?;
    if !status.success() {
        bail!(
            "perf record around hook-cost {} failed ({status}); hook-cost's output is in {}",
            workload.args.join(" "),
            log.display()
        );
    }
    Ok(data)
}

/// `perf script`'s text for `data`: the samples with kernel symbols, and the BPF code loaded
/// meanwhile. Without inlined frames: perf would run addr2line on the kernel for each.
fn perf_script(data: &Path) -> anyhow::Result<String> {
    let output = Command::new("perf")
        .args(["script", "--show-bpf-events", "--no-inline", "-i"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run perf script")?;
    if !output.status.success() {
        bail!(
            "perf script -i {} failed ({}): {}",
            data.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).context("perf script wrote something not UTF-8")
}
