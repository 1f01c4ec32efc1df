//! The Debian package `cargo xtask package` builds and the systemd unit in it
//! (deploy/systemd/keepalive-agent.service). `cargo xtask test` builds the package before the
//! tests; run by hand, build it first with `cargo xtask package`.
//!
//! The package is installed by dpkg itself into a scratch root (`dpkg --root`, maintainer
//! scripts run chrootless as they would be with DPKG_ROOT set), so conffile handling, the
//! md5sums and the scripts are dpkg's, not a copy of them. This machine's PID 1 is not systemd,
//! so the unit cannot be started here: it is checked by `systemd-analyze verify` and
//! `systemd-analyze security --offline`, and the installed binary is run with what the unit
//! gives it that can be reproduced without systemd (its capability bounding set, no new
//! privileges, its flags file, SIGHUP for reload, SIGTERM within TimeoutStopSec); what only
//! systemd enforces (seccomp, the read-only file system) is checked on an strace of the run.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use keepalive_tests::deploy::{
    ScratchDir, daemonset_container, deploy_path, repo_root, run_tool, setpriv_capabilities,
    tool_available,
};
use keepalive_tests::{Agent, free_loopback_port, kernel_tests_enabled, skip_or_fail};

type TestResult = anyhow::Result<()>;

const UNIT: &str = "lib/systemd/system/keepalive-agent.service";
const DEFAULTS: &str = "etc/default/keepalive-agent";
const SUBCOMMANDS: [&str; 4] = ["run", "sockets", "check", "watch"];

/// Where `cargo xtask package` writes the package (xtask/src/package.rs).
fn deb() -> PathBuf {
    repo_root().join(format!(
        "target/package/keepalive-agent_{}_amd64.deb",
        env!("CARGO_PKG_VERSION").replace('-', "~")
    ))
}

/// Whether the package exists and dpkg can install it here; otherwise skips (fails under
/// KEEPALIVE_REQUIRE_KERNEL=1).
fn package_available(test: &str) -> bool {
    if !tool_available(test, "dpkg", "--version", "Debian package dpkg") {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip_or_fail(test, "not root (dpkg --root installs as root)");
    }
    deb().is_file()
        || skip_or_fail(
            test,
            &format!("{} not built (run `cargo xtask package`)", deb().display()),
        )
}

/// What a finished command wrote, stdout then stderr.
fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The package installed into a new scratch root (kept while the returned guard lives).
fn installed(tag: &str) -> anyhow::Result<(ScratchDir, PathBuf)> {
    let scratch = ScratchDir::new(tag)?;
    let root = scratch.0.join("root");
    install(&root)?;
    Ok((scratch, root))
}

/// An empty dpkg database below `root`, then `dpkg --root=ROOT -i` the package.
fn install(root: &Path) -> anyhow::Result<()> {
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(dir))?;
    }
    for file in ["status", "available"] {
        fs::write(admin.join(file), "")?;
    }
    dpkg(root, &["-i", &deb().to_string_lossy()])
}

/// `dpkg --root=ROOT ARGS`, maintainer scripts run without chroot (the root has no shell).
fn dpkg(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let root_arg = format!("--root={}", root.display());
    let mut all = vec![root_arg.as_str(), "--force-script-chrootless"];
    all.extend_from_slice(args);
    let (ok, out) = run_tool("dpkg", &all, None)?;
    ensure!(ok, "dpkg {}:\n{out}", all.join(" "));
    Ok(())
}

/// `Key=Value` lines of a unit file, in order (a key may repeat), comments left out.
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with(['#', ';', '[']))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The unit's CapabilityBoundingSet as setpriv names capabilities (`bpf`, `perfmon`, ...).
fn unit_capabilities(settings: &[(String, String)]) -> anyhow::Result<Vec<String>> {
    let set = setting(settings, "CapabilityBoundingSet").context("no CapabilityBoundingSet")?;
    set.split_whitespace()
        .map(|cap| {
            cap.strip_prefix("CAP_")
                .map(str::to_lowercase)
                .with_context(|| format!("{cap} is not a CAP_ name"))
        })
        .collect()
}

/// `setpriv` arguments that give a uid-0 process exactly `capabilities` (its bounding set, as
/// systemd sets it for a root service, and the inheritable and ambient sets so they survive
/// the exec of the agent) and no_new_privs (NoNewPrivileges=yes).
fn as_the_unit(capabilities: &[String]) -> Vec<String> {
    let set = setpriv_capabilities(capabilities);
    vec![
        "--no-new-privs".into(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
        "--reuid=0".into(),
        "--regid=0".into(),
        "--clear-groups".into(),
    ]
}

fn gunzip(path: &Path) -> anyhow::Result<String> {
    let (ok, text) = run_tool("gzip", &["-dc", &path.to_string_lossy()], None)?;
    ensure!(ok, "gzip -dc {}: {text}", path.display());
    Ok(text)
}

#[test]
fn unit_keeps_the_daemonset_capabilities_and_no_setting_that_breaks_the_agent() -> TestResult {
    let text = fs::read_to_string(deploy_path("systemd/keepalive-agent.service"))?;
    let settings = unit_settings(&text);

    // Exactly the DaemonSet's capabilities: tests/tests/deploy_end_to_end.rs proves the agent
    // runs with that set, and fails without CAP_SYSLOG.
    let (daemonset, _) = daemonset_container()?;
    let daemonset: BTreeSet<String> = daemonset.into_iter().collect();
    let unit: BTreeSet<String> = unit_capabilities(&settings)?.into_iter().collect();
    assert_eq!(
        unit, daemonset,
        "CapabilityBoundingSet differs from the DaemonSet"
    );
    assert_eq!(
        setting(&settings, "User"),
        None,
        "runs as uid 0 like the DaemonSet"
    );

    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("Restart", "on-failure"),
        ("EnvironmentFile", "-/etc/default/keepalive-agent"),
        ("ExecStart", "/usr/bin/keepalive-agent run $ARGS"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("LogsDirectory", "keepalive-agent"),
    ] {
        assert_eq!(setting(&settings, key), Some(want), "{key}");
    }
    // Each would stop the agent: ProtectKernelTunables makes /proc/kallsyms inaccessible,
    // ProtectKernelLogs drops CAP_SYSLOG, ProtectProc/ProcSubset hide /proc/PID, /proc/kallsyms
    // and /proc/timer_list, PrivateUsers moves the capabilities out of the initial user
    // namespace, PrivateNetwork hides the listener.
    for key in [
        "ProtectKernelTunables",
        "ProtectKernelLogs",
        "ProtectProc",
        "ProcSubset",
        "PrivateUsers",
        "PrivateNetwork",
    ] {
        assert_eq!(setting(&settings, key), None, "{key} breaks the agent");
    }
    let families: BTreeSet<&str> = setting(&settings, "RestrictAddressFamilies")
        .context("no RestrictAddressFamilies")?
        .split_whitespace()
        .collect();
    // AF_UNIX: tokio's signal handling creates a socketpair.
    assert_eq!(
        families,
        BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX"]),
        "RestrictAddressFamilies"
    );
    // The agent's graceful stop gives up after 9 s (cmd/run.rs SHUTDOWN_DEADLINE of 8 s, then
    // 1 s for the runtime, main.rs); systemd must not SIGKILL it earlier.
    let stop = setting(&settings, "TimeoutStopSec").context("no TimeoutStopSec")?;
    let stop: u64 = stop.trim_end_matches('s').parse()?;
    assert!((10..=60).contains(&stop), "TimeoutStopSec={stop}s");
    Ok(())
}

#[test]
fn installed_unit_passes_systemd_analyze_verify_and_security() -> TestResult {
    let test = "installed_unit_passes_systemd_analyze_verify_and_security";
    if !package_available(test)
        || !tool_available(
            test,
            "systemd-analyze",
            "--version",
            "Debian package systemd",
        )
    {
        return Ok(());
    }
    let (scratch, root) = installed("deb-verify")?;
    // verify needs ExecStart to exist on this system, and finds the Documentation= pages
    // through man(1): point both at the installed copies.
    let installed = fs::read_to_string(root.join(UNIT))?;
    let binary = root.join("usr/bin/keepalive-agent");
    let unit = scratch.0.join("keepalive-agent.service");
    fs::write(
        &unit,
        installed.replace("/usr/bin/keepalive-agent", &binary.to_string_lossy()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", root.join("usr/share/man"))
        .output()?;
    let said = said(&out);
    // Unknown or misspelled settings are only warnings: any output is a failure here.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    let (ok, security) = run_tool(
        "systemd-analyze",
        &["security", "--offline=yes", &unit.to_string_lossy()],
        None,
    )?;
    assert!(ok, "{security}");
    // "→ Overall exposure level for keepalive-agent.service: 4.4 OK": 4.4 with this unit.
    // Dropping a protection raises it past 5 (MEDIUM).
    let exposure: f64 = security
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for keepalive-agent.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .context("no overall exposure level")?
        .parse()?;
    println!("systemd-analyze security exposure: {exposure}");
    assert!(exposure <= 5.0, "exposure {exposure}:\n{security}");
    Ok(())
}

/// The package is built, kernel tests are on, and `setpriv` can give the installed agent the
/// unit's capabilities.
fn installed_agent_can_run(test: &str) -> bool {
    package_available(test)
        && kernel_tests_enabled(test)
        && tool_available(test, "setpriv", "--version", "Debian package util-linux")
}

#[test]
fn package_installs_with_dpkg_and_its_agent_passes_check_with_the_unit_capabilities() -> TestResult
{
    let test = "package_installs_with_dpkg_and_its_agent_passes_check_with_the_unit_capabilities";
    if !installed_agent_can_run(test) {
        return Ok(());
    }
    let (_scratch, root) = installed("deb-install")?;
    let root_arg = format!("--root={}", root.display());

    let (ok, status) = run_tool("dpkg", &[&root_arg, "-s", "keepalive-agent"], None)?;
    assert!(ok, "{status}");
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains("Conffiles:\n /etc/default/keepalive-agent "),
        "{status}"
    );
    assert!(!status.contains("Depends:"), "a static binary: {status}");
    // Every installed file matches the package's md5sums.
    let (ok, verify) = run_tool("dpkg", &[&root_arg, "--verify", "keepalive-agent"], None)?;
    assert!(ok && verify.trim().is_empty(), "dpkg --verify: {verify}");

    // Completions, generated from the CLI: every subcommand and the exporter-style flags.
    for file in [
        "usr/share/bash-completion/completions/keepalive-agent",
        "usr/share/zsh/vendor-completions/_keepalive-agent",
        "usr/share/fish/vendor_completions.d/keepalive-agent.fish",
    ] {
        let text = fs::read_to_string(root.join(file)).with_context(|| file.to_owned())?;
        for word in SUBCOMMANDS.iter().copied().chain([
            "web.listen-address",
            "connections.max-tracked",
            "log.level",
        ]) {
            assert!(text.contains(word), "{file} does not mention {word}");
        }
        assert!(
            !text.contains("generate-docs"),
            "{file} offers the packaging entry point"
        );
    }
    // Man pages: the command's page lists every subcommand, and each has its own page.
    let man1 = root.join("usr/share/man/man1");
    let main = gunzip(&man1.join("keepalive-agent.1.gz"))?;
    assert!(main.contains(".TH keepalive-agent 1 "), "{main}");
    for sub in SUBCOMMANDS {
        assert!(
            main.contains(&format!("keepalive\\-agent\\-{sub}(1)")),
            "keepalive-agent.1 does not list {sub}:\n{main}"
        );
        let page = gunzip(&man1.join(format!("keepalive-agent-{sub}.1.gz")))?;
        assert!(
            page.contains(&format!(".TH keepalive-agent-{sub} 1")),
            "{page}"
        );
    }
    let run_page = gunzip(&man1.join("keepalive-agent-run.1.gz"))?;
    assert!(run_page.contains("web.listen\\-address"), "{run_page}");

    // The installed agent loads and attaches nothing more than `check --load` does, with only
    // the unit's capabilities.
    let unit_text = fs::read_to_string(root.join(UNIT))?;
    let capabilities = unit_capabilities(&unit_settings(&unit_text))?;
    let out = Command::new("setpriv")
        .args(as_the_unit(&capabilities))
        .arg(root.join("usr/bin/keepalive-agent"))
        .args(["check", "--load"])
        .output()?;
    let said = said(&out);
    assert!(
        out.status.success(),
        "installed agent's `check --load` with {capabilities:?}:\n{said}"
    );

    // Conffile: an operator's edit survives reinstalling the package and removing it; purge
    // deletes it.
    let defaults = root.join(DEFAULTS);
    let edited = "ARGS=\"--web.listen-address=127.0.0.1:9879\"\n";
    fs::write(&defaults, edited)?;
    dpkg(&root, &["-i", &deb().to_string_lossy()])?;
    assert_eq!(
        fs::read_to_string(&defaults)?,
        edited,
        "reinstall replaced the edit"
    );
    dpkg(&root, &["--remove", "keepalive-agent"])?;
    assert!(!root.join("usr/bin/keepalive-agent").exists());
    assert!(!root.join(UNIT).exists());
    assert_eq!(
        fs::read_to_string(&defaults)?,
        edited,
        "remove deleted the conffile"
    );
    dpkg(&root, &["--purge", "keepalive-agent"])?;
    assert!(!defaults.exists(), "purge left {}", defaults.display());
    Ok(())
}

#[test]
fn installed_agent_runs_with_its_flags_file_reopens_events_on_hup_and_stops_in_time() -> TestResult
{
    let test = "installed_agent_runs_with_its_flags_file_reopens_events_on_hup_and_stops_in_time";
    if !installed_agent_can_run(test) {
        return Ok(());
    }
    let (scratch, root) = installed("deb-run")?;
    let settings = unit_settings(&fs::read_to_string(root.join(UNIT))?);
    let capabilities = unit_capabilities(&settings)?;
    let stop_timeout = Duration::from_secs(
        setting(&settings, "TimeoutStopSec")
            .context("no TimeoutStopSec")?
            .trim_end_matches('s')
            .parse()?,
    );

    // ExecStart's `run $ARGS` with the shipped ARGS, on a free port instead of 9879, and the
    // event stream in the directory LogsDirectory= makes writable.
    let defaults = fs::read_to_string(root.join(DEFAULTS))?;
    let args = defaults
        .lines()
        .find_map(|line| line.strip_prefix("ARGS="))
        .context("no ARGS= in the flags file")?
        .trim_matches('"');
    let addr = free_loopback_port()?;
    let events = scratch.0.join("events.jsonl");
    let mut cmd = Command::new("setpriv");
    cmd.args(as_the_unit(&capabilities))
        .arg(root.join("usr/bin/keepalive-agent"))
        .arg("run");
    for arg in args.split_whitespace() {
        if arg.starts_with("--web.listen-address") {
            cmd.arg(format!("--web.listen-address={addr}"));
        } else {
            cmd.arg(arg);
        }
    }
    cmd.arg(format!("--events={}", events.display()));
    let mut agent = Agent::start_command(cmd, addr)?;

    // ExecReload: logrotate moved the file away; SIGHUP makes the agent open a new one.
    fs::rename(&events, scratch.0.join("events.jsonl.1"))?;
    // SAFETY: kill has no memory preconditions; the pid is the agent's, not yet reaped.
    let rc = unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill -HUP: {}", std::io::Error::last_os_error());
    keepalive_tests::wait_until(
        keepalive_tests::DEADLINE,
        "SIGHUP to reopen the file",
        || Ok(events.exists() && agent.log().contains("SIGHUP: reopened the events file")),
    )
    .with_context(|| agent.log())?;
    let (code, _) = agent.get("/readyz")?;
    assert_eq!(code, 200, "not ready after SIGHUP:\n{}", agent.log());

    // systemctl stop: SIGTERM, then SIGKILL after TimeoutStopSec.
    let start = Instant::now();
    let status = agent.signal_and_wait(libc::SIGTERM)?;
    let took = start.elapsed();
    assert!(status.success(), "{status}:\n{}", agent.log());
    assert!(
        took < stop_timeout,
        "stopped in {took:?}, TimeoutStopSec is {stop_timeout:?}"
    );
    Ok(())
}

/// The pid of `parent`'s child running `exe` (setpriv execs the agent in strace's child).
fn child_running(parent: u32, exe: &Path) -> anyhow::Result<u32> {
    for entry in fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the parenthesised command name: state, then ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if ppid == Some(parent)
            && fs::read_link(format!("/proc/{pid}/exe")).ok().as_deref() == Some(exe)
        {
            return Ok(pid);
        }
    }
    anyhow::bail!("no child of {parent} runs {}", exe.display())
}

/// What the unit's sandbox would refuse, from an `strace -f` of the agent: a socket of a family
/// outside RestrictAddressFamilies, a writable-and-executable mapping or a mapping made
/// executable (MemoryDenyWriteExecute), a namespace call (RestrictNamespaces), and a file
/// opened for writing outside `writable` (ProtectSystem=strict with LogsDirectory).
fn sandbox_violations(
    trace: &str,
    exe: &Path,
    families: &BTreeSet<&str>,
    writable: &Path,
) -> Vec<String> {
    let exec = format!("execve(\"{}\"", exe.display());
    let mut agent_started = false;
    let mut violations = Vec::new();
    for line in trace.lines() {
        // Before the exec the traced process is setpriv (and its dynamic loader).
        if !agent_started {
            agent_started = line.contains(&exec) && line.trim_end().ends_with("= 0");
            continue;
        }
        let call = line
            .split_whitespace()
            .nth(1)
            .and_then(|call| call.split('(').next())
            .unwrap_or_default();
        let args = line.split_once('(').map_or("", |(_, args)| args);
        let refused = match call {
            "socket" | "socketpair" => {
                let family = args.split(',').next().unwrap_or_default().trim();
                !families.contains(family)
            }
            "mmap" => args.contains("PROT_EXEC") && args.contains("PROT_WRITE"),
            "mprotect" | "pkey_mprotect" => args.contains("PROT_EXEC"),
            "unshare" | "setns" => true,
            "open" | "openat" | "openat2" | "creat" => {
                let writes = call == "creat"
                    || ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                        .iter()
                        .any(|flag| args.contains(flag));
                let path = args.split('"').nth(1).unwrap_or_default();
                writes && !Path::new(path).starts_with(writable)
            }
            _ => false,
        };
        if refused {
            violations.push(line.to_owned());
        }
    }
    if !agent_started {
        violations.push(format!("the trace never shows {exec}"));
    }
    violations
}

#[test]
fn installed_agent_stays_inside_the_sandbox_only_systemd_would_enforce() -> TestResult {
    let test = "installed_agent_stays_inside_the_sandbox_only_systemd_would_enforce";
    if !package_available(test)
        || !kernel_tests_enabled(test)
        || !tool_available(test, "setpriv", "--version", "Debian package util-linux")
        || !tool_available(test, "strace", "-V", "Debian package strace")
    {
        return Ok(());
    }
    let (scratch, root) = installed("deb-sandbox")?;
    let settings = unit_settings(&fs::read_to_string(root.join(UNIT))?);
    let capabilities = unit_capabilities(&settings)?;
    let families: BTreeSet<&str> = setting(&settings, "RestrictAddressFamilies")
        .context("no RestrictAddressFamilies")?
        .split_whitespace()
        .collect();
    // LogsDirectory: the one writable directory.
    let logs = scratch.0.join("var/log/keepalive-agent");
    fs::create_dir_all(&logs)?;
    let exe = root.join("usr/bin/keepalive-agent");
    let trace = scratch.0.join("strace.txt");
    let addr = free_loopback_port()?;
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-s", "512", "-e", "signal=none", "-e"])
        .arg("trace=execve,socket,socketpair,mmap,mprotect,pkey_mprotect,unshare,setns,open,openat,openat2,creat")
        .arg("-o")
        .arg(&trace)
        .arg("setpriv")
        .args(as_the_unit(&capabilities))
        .arg(&exe)
        .args(["run", &format!("--web.listen-address={addr}")])
        .arg(format!("--events={}", logs.join("events.jsonl").display()));
    let mut agent = Agent::start_command(cmd, addr)?;
    // Scrape once and reload once, so serving and reopening are in the trace too.
    let (code, _) = agent.get("/metrics")?;
    assert_eq!(code, 200);
    let pid = child_running(agent.pid(), &exe)?;
    // SAFETY: kill has no memory preconditions; pid is the traced agent, still running.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) }, 0);
    keepalive_tests::wait_until(
        keepalive_tests::DEADLINE,
        "SIGHUP to reopen the file",
        || Ok(agent.log().contains("SIGHUP: reopened the events file")),
    )?;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let status = agent.wait_exit()?;
    assert!(status.success(), "{status}:\n{}", agent.log());

    let trace = fs::read_to_string(&trace)?;
    // The trace covers the agent: its listener, tokio's socketpair, and the events file opened
    // at start and again on SIGHUP.
    let events_opened = format!("\"{}\", O_WRONLY", logs.join("events.jsonl").display());
    for (seen, times) in [
        ("socket(AF_INET", 1),
        ("socketpair(AF_UNIX", 1),
        (events_opened.as_str(), 2),
    ] {
        assert!(
            trace.matches(seen).count() >= times,
            "{seen} not {times} times in the trace:\n{trace}"
        );
    }
    let violations = sandbox_violations(&trace, &exe, &families, &logs);
    assert!(
        violations.is_empty(),
        "the unit's sandbox would refuse:\n{}",
        violations.join("\n")
    );
    Ok(())
}

#[test]
fn sandbox_violations_are_found_in_a_trace() {
    let exe = Path::new("/r/usr/bin/keepalive-agent");
    let families = BTreeSet::from(["AF_INET", "AF_UNIX"]);
    let writable = Path::new("/var/log/keepalive-agent");
    let trace = "\
10 openat(AT_FDCWD, \"/etc/ld.so.cache\", O_WRONLY) = 3
10 execve(\"/r/usr/bin/keepalive-agent\", [\"keepalive-agent\"], 0x7ffd /* 3 vars */) = 0
10 socketpair(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC, 0, [6, 7]) = 0
11 socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE) = 8
11 mmap(NULL, 4096, PROT_READ|PROT_WRITE|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f
11 mmap(NULL, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f
11 mprotect(0x7f, 4096, PROT_READ|PROT_EXEC) = 0
11 openat(AT_FDCWD, \"/var/log/keepalive-agent/events.jsonl\", O_WRONLY|O_CREAT|O_APPEND, 0666) = 9
11 openat(AT_FDCWD, \"/etc/passwd\", O_RDWR) = 10
11 openat(AT_FDCWD, \"/proc/kallsyms\", O_RDONLY|O_CLOEXEC) = 11
11 unshare(CLONE_NEWNET) = 0
";
    let found = sandbox_violations(trace, exe, &families, writable);
    let calls: Vec<&str> = found
        .iter()
        .map(|line| line.split_whitespace().nth(1).unwrap_or_default())
        .collect();
    // setpriv's write before the exec is not the agent's.
    assert_eq!(
        calls,
        [
            "socket(AF_NETLINK,",
            "mmap(NULL,",
            "mprotect(0x7f,",
            "openat(AT_FDCWD,",
            "unshare(CLONE_NEWNET)"
        ],
        "{found:#?}"
    );
    assert!(found[3].contains("/etc/passwd"));
    assert_eq!(
        sandbox_violations(
            "1 openat(AT_FDCWD, \"/x\", O_WRONLY) = 3\n",
            exe,
            &families,
            writable
        ),
        ["the trace never shows execve(\"/r/usr/bin/keepalive-agent\""]
    );
}
