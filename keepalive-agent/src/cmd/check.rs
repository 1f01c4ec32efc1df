//! `keepalive-agent check`: can the agent run on this machine? One line per prerequisite, and a
//! plain sentence saying what to do for each one that is missing.

use std::{ffi::CStr, path::Path};

use anyhow::bail;
use aya::util::KernelVersion;

use crate::audit::walk;
use crate::kernel::{
    Session, hash_walk, hz, ipvs,
    kallsyms::{KEEPALIVE_TIMER, TimerFunctions, WRITE_TIMER},
    layout::{self, KernelLayout, VMLINUX_BTF_PATH as VMLINUX_BTF},
    programs::{CloseReports, HOOKS, MIN_RING_BUFFER_BYTES, PROGRAM_TYPE, SweepProgram},
};

/// Ring buffers (5.8) are the newest feature every required hook depends on; the audit runs its
/// walk with BPF_PROG_TEST_RUN on a raw tracepoint program, which needs 5.10.
const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 8, 0);

/// Capability bits (include/uapi/linux/capability.h).
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, Clone, clap::Args)]
pub struct CheckConfig {
    /// Also load the kernel programs, attach every hook and detach again: proves the verifier
    /// accepts them on this kernel (takes a few seconds; changes nothing on the host).
    #[arg(long)]
    pub load: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    /// Works, with something less than the full feature set.
    Warn,
    Fail,
    /// Informational.
    Note,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
            Self::Note => "note",
        }
    }
}

#[derive(Debug)]
struct Check {
    name: String,
    status: Status,
    detail: String,
    /// What the operator should do (for WARN and FAIL).
    remedy: Option<String>,
}

impl Check {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Ok, detail, None)
    }

    fn new(
        name: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        remedy: Option<String>,
    ) -> Self {
        Self {
            name: name.into(),
            status,
            detail: detail.into(),
            remedy,
        }
    }
}

pub async fn run(config: CheckConfig) -> anyhow::Result<()> {
    let mut checks = vec![kernel_version()];
    // Read once: the layout and the hooks come from one parse, and `--load` reuses the bytes.
    let btf = layout::read_vmlinux_btf();
    let layout = match btf
        .as_deref()
        .map_err(|err| err.to_string())
        .and_then(|bytes| KernelLayout::from_btf_bytes(bytes).map_err(|err| err.to_string()))
    {
        Ok(layout) => {
            checks.push(Check::ok(
                "btf",
                format!(
                    "{VMLINUX_BTF} resolves every field the programs read ({})",
                    layout.timer_layout
                ),
            ));
            Some(layout)
        }
        Err(err) => {
            checks.push(Check::new(
                "btf",
                Status::Fail,
                err,
                Some(format!(
                    "Run on a kernel built with CONFIG_DEBUG_INFO_BTF=y ({VMLINUX_BTF} must exist and describe struct sock, inet_connection_sock and tcp_sock)."
                )),
            ));
            None
        }
    };
    checks.extend(hooks(layout.as_ref()));
    checks.push(Check::new(
        "fentry/kprobe",
        Status::Note,
        format!("not used: every hook is {PROGRAM_TYPE}, so lockdown refusing fentry or a kernel without kprobes does not matter"),
        None,
    ));
    checks.push(permissions());
    if let Some(layout) = &layout {
        checks.push(audit_walk(layout));
    }
    let timers = match TimerFunctions::from_proc() {
        Ok(timers) => {
            checks.push(Check::ok(
                "kallsyms",
                format!(
                    "{KEEPALIVE_TIMER} at {:#x}, {WRITE_TIMER} at {:#x}",
                    timers.keepalive, timers.write
                ),
            ));
            Some(timers)
        }
        Err(err) => {
            checks.push(Check::new(
                "kallsyms",
                Status::Fail,
                err.to_string(),
                Some("Run as root or give the agent CAP_SYSLOG, and set kernel.kptr_restrict to 0 or 1, so /proc/kallsyms shows the TCP timer addresses.".to_owned()),
            ));
            None
        }
    };
    checks.push(tracefs());
    let hz = tokio::task::spawn_blocking(hz::kernel_hz).await;
    checks.push(match &hz {
        Ok(Ok(hz)) => Check::ok("hz", format!("CONFIG_HZ = {hz} (measured from /proc/timer_list)")),
        Ok(Err(err)) => Check::new(
            "hz",
            Status::Fail,
            err.to_string(),
            Some("Run as root so the agent can read /proc/timer_list and convert jiffies to seconds.".to_owned()),
        ),
        Err(err) => Check::new("hz", Status::Fail, err.to_string(), None),
    });
    if config.load {
        match (btf, layout, timers, hz) {
            (Ok(btf), Some(layout), Some(timers), Ok(Ok(hz))) => {
                match Session::new(&btf, layout, timers, hz) {
                    Ok(session) => {
                        let (loaded, ipvs_program) = load(&session);
                        checks.push(loaded);
                        let read = ipvs_program
                            .map_or(Err(ipvs::TimeoutError::ProgramOff), |mut p| p.read());
                        checks.push(ipvs_check(read, session.hz));
                    }
                    Err(err) => {
                        checks.push(Check::new("load", Status::Fail, err.to_string(), None))
                    }
                }
            }
            _ => checks.push(Check::new(
                "load",
                Status::Fail,
                "skipped: BTF layout, kallsyms or tick rate missing (see above)",
                None,
            )),
        }
    }

    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in &checks {
        println!("{:<4}  {:<width$}  {}", c.status.label(), c.name, c.detail);
    }
    let warnings: Vec<&String> = checks
        .iter()
        .filter(|c| c.status == Status::Warn)
        .filter_map(|c| c.remedy.as_ref())
        .collect();
    for remedy in &warnings {
        println!("warning: {remedy}");
    }
    let failed: Vec<&Check> = checks.iter().filter(|c| c.status == Status::Fail).collect();
    if failed.is_empty() {
        println!("ready: `keepalive-agent run` can start on this machine");
        return Ok(());
    }
    for c in &failed {
        eprintln!(
            "missing: {}: {}",
            c.name,
            c.remedy.as_deref().unwrap_or(&c.detail)
        );
    }
    bail!(
        "{} prerequisite(s) missing; `keepalive-agent run` would not start",
        failed.len()
    )
}

fn kernel_version() -> Check {
    // SAFETY: utsname is plain bytes; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a live utsname.
    if unsafe { libc::uname(&raw mut uts) } != 0 {
        return Check::new(
            "kernel",
            Status::Fail,
            format!("uname: {}", std::io::Error::last_os_error()),
            None,
        );
    }
    let field = |chars: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates every field inside its array.
        unsafe { CStr::from_ptr(chars.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    let release = field(&uts.release);
    let machine = field(&uts.machine);
    // aya's reading: Debian's release says 6.1.0 where `uname -v` says 6.1.192 (whose stable
    // backport moved the keepalive timer), Ubuntu's is in /proc/version_signature.
    let version = KernelVersion::current();
    let detail = match &version {
        Ok(version) => format!("Linux {release} ({machine}), upstream {version}"),
        Err(_) => format!("Linux {release} ({machine})"),
    };
    match version {
        Ok(version) if version >= MIN_KERNEL => Check::ok("kernel", detail),
        Ok(_) => Check::new(
            "kernel",
            Status::Fail,
            detail,
            Some(format!(
                "Upgrade the kernel to {MIN_KERNEL} or newer (BPF ring buffer and BTF tracepoints)."
            )),
        ),
        Err(err) => Check::new(
            "kernel",
            Status::Warn,
            detail,
            Some(format!(
                "Cannot read the kernel version from {release:?} ({err}); the agent needs \
                 {MIN_KERNEL}+."
            )),
        ),
    }
}

/// Each hook's BTF tracepoint exists when the kernel's BTF has its `btf_trace_<name>` typedef
/// (what the loader resolves `tp_btf/<name>` against); the audit walk is reported by [`audit_walk`].
fn hooks(layout: Option<&KernelLayout>) -> Vec<Check> {
    let Some(layout) = layout else {
        return vec![Check::new(
            "hooks",
            Status::Fail,
            format!("cannot tell without {VMLINUX_BTF} (see btf above)"),
            Some("BTF tracepoints need the kernel's BTF: use a kernel built with CONFIG_DEBUG_INFO_BTF=y.".to_owned()),
        )];
    };
    HOOKS
        .iter()
        .map(|hook| {
            let name = format!("hook {}", hook.tracepoint);
            let typedef = format!("btf_trace_{}", hook.tracepoint);
            let need = if hook.required { "required" } else { "optional" };
            if let Some(variant) = hook.variant(layout) {
                Check::ok(
                    name,
                    format!(
                        "{PROGRAM_TYPE} ({typedef} in BTF), program {} ({}), {need}: {}",
                        variant.program, variant.why, hook.role
                    ),
                )
            } else if hook.required {
                Check::new(
                    name,
                    Status::Fail,
                    format!("no {typedef} in BTF, {need}: {}", hook.role),
                    Some(format!("This kernel has no {} tracepoint; the agent needs it for {} (Linux 5.8+ has every required tracepoint).", hook.tracepoint, hook.role)),
                )
            } else {
                Check::new(
                    name,
                    Status::Warn,
                    format!("no {typedef} in BTF, {need}: {}", hook.role),
                    Some(format!("Without {} the agent loses {}.", hook.tracepoint, hook.role)),
                )
            }
        })
        .collect()
}

/// The agent's effective capabilities (`CapEff` of /proc/self/status).
fn effective_capabilities() -> Option<u64> {
    crate::files::read_string_bounded(Path::new("/proc/self/status"), crate::files::cap::SMALL)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// How the audit walks every socket on this kernel (whether it runs is `--load`'s to prove).
fn audit_walk(layout: &KernelLayout) -> Check {
    Check::ok(
        "audit walk",
        format!(
            "{}; {}",
            hash_walk::DESCRIPTION,
            layout.listen_table.describe()
        ),
    )
}

fn permissions() -> Check {
    let effective = effective_capabilities();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let Some(effective) = effective else {
        return Check::new(
            "permissions",
            Status::Fail,
            "cannot read CapEff from /proc/self/status",
            Some("Run the agent as root, or with CAP_BPF, CAP_PERFMON and CAP_SYSLOG.".to_owned()),
        );
    };
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYSLOG, "CAP_SYSLOG"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Check::ok(
            "permissions",
            format!("uid {uid}, effective capabilities include CAP_BPF, CAP_PERFMON, CAP_SYSLOG"),
        )
    } else {
        Check::new(
            "permissions",
            Status::Fail,
            format!("uid {uid}, missing {}", missing.join(", ")),
            Some(format!(
                "Run the agent as root, or grant {} (e.g. securityContext.capabilities.add in Kubernetes).",
                missing.join(", ")
            )),
        )
    }
}

fn tracefs() -> Check {
    let mounts = crate::files::read_string_bounded(
        Path::new("/proc/self/mounts"),
        crate::files::cap::MOUNTS,
    )
    .unwrap_or_default();
    let mounted = mounts.lines().find_map(|l| {
        let mut fields = l.split_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        (fields.next()? == "tracefs").then(|| target.to_owned())
    });
    let detail = match mounted {
        Some(at) => {
            format!("mounted at {at}; not required: {PROGRAM_TYPE} hooks attach without it")
        }
        None => format!("not mounted; not required: {PROGRAM_TYPE} hooks attach without it"),
    };
    Check::ok("tracefs", detail)
}

/// IPVS's TCP timeout as the agent reads it (`read`: by the IPVS program the load check left
/// loaded; it loads whatever IPVS's state, so the verifier is checked on every kernel).
fn ipvs_check(read: Result<ipvs::TcpTimeout, ipvs::TimeoutError>, hz: u32) -> Check {
    let services = match ipvs::tcp_services(Path::new("/proc")) {
        Ok(Some(services)) if services.fwmark => {
            "/proc/1/net/ip_vs lists a firewall-mark service: IPVS's timeout applies to every \
             connection"
                .to_owned()
        }
        Ok(Some(services)) => format!(
            "/proc/1/net/ip_vs: {} TCP service(s), {} destination(s); IPVS's timeout applies \
             to connections to or from them",
            services.virtual_endpoints.len(),
            services.real_servers.len()
        ),
        Ok(None) => "no TCP service in /proc/1/net/ip_vs".to_owned(),
        Err(e) => format!("/proc/1/net/ip_vs unreadable: {e}"),
    };
    match read {
        Ok(ipvs::TcpTimeout::Jiffies(jiffies)) => Check::ok(
            "ipvs",
            format!(
                "TCP established timeout {} s in the host's network namespace, read by the IPVS \
                 program ({jiffies} jiffies); {services}",
                f64::from(jiffies) / f64::from(hz)
            ),
        ),
        Ok(ipvs::TcpTimeout::NotLoaded) => Check::ok(
            "ipvs",
            format!("IPVS program loaded; the ip_vs module is not loaded; {services}"),
        ),
        Ok(ipvs::TcpTimeout::NotBuilt) => Check::ok(
            "ipvs",
            format!("IPVS program loaded; this kernel has no IPVS; {services}"),
        ),
        Err(err) => Check::new(
            "ipvs",
            Status::Warn,
            format!("cannot read IPVS's TCP timeout: {err}"),
            Some(
                "Give --idle-timeout-threshold ipvs=SECONDS if kube-proxy runs in IPVS mode with \
                 --ipvs-tcp-timeout; otherwise its default (900 s) is used."
                    .to_owned(),
            ),
        ),
    }
}

/// The load check, and the IPVS program it loaded (kept for [`ipvs_check`]).
fn load(session: &Session) -> (Check, Option<ipvs::IpvsProgram>) {
    // Nothing is read from the ring buffer: the smallest size the kernel accepts.
    match session.load(
        MIN_RING_BUFFER_BYTES,
        CloseReports::KeepaliveOn,
        SweepProgram::Load,
    ) {
        Ok(mut kernel) => {
            let ipvs_program = kernel.ipvs.take();
            let attached = kernel.hooks.iter().filter(|s| s.attached).count();
            let mut audited = false;
            let audit = match kernel.audit.take() {
                Some(mut program) => match walk::walk_host(&mut program) {
                    Ok(host) => {
                        audited = true;
                        format!(
                            "audit walk ran: {} TCP sockets in {} network namespaces ({} runs)",
                            host.sockets.len(),
                            host.namespaces,
                            host.runs
                        )
                    }
                    Err(err) => format!("audit walk loaded but FAILED: {err}"),
                },
                None => "audit walk NOT loaded".to_owned(),
            };
            let mut swept = false;
            let sweep = match kernel.counter_sweep.take() {
                // On a thread of its own: the sweep moves its thread from CPU to CPU.
                Some(sweep) => match std::thread::scope(|s| s.spawn(|| sweep.sweep()).join()) {
                    Ok(Ok(round)) => {
                        swept = round.unreachable.is_none();
                        round.summary()
                    }
                    Ok(Err(err)) => format!("counter sweep loaded but FAILED: {err}"),
                    Err(_) => "counter sweep loaded but its thread panicked".to_owned(),
                },
                None => "counter sweep NOT loaded (the warning logged above says why)".to_owned(),
            };
            // A hook this kernel lacks is already a WARN of its own above; here only what the
            // kernel has and refused counts.
            let refused = kernel
                .hooks
                .iter()
                .any(|s| !s.attached && s.hook.variant(&session.layout).is_some());
            // A typed timer program the kernel refused, replaced by its helper-read variant:
            // the agent works, at the copy's cost.
            let fell_back: Vec<String> = kernel
                .hooks
                .iter()
                .filter_map(|s| {
                    let planned = s.hook.variant(&session.layout)?.program;
                    (s.attached && s.program_name != planned).then(|| {
                        format!(
                            "{} runs {} instead of {planned}",
                            s.hook.tracepoint, s.program_name
                        )
                    })
                })
                .collect();
            let kernel_all_attached = kernel.hooks.iter().all(|s| s.attached);
            let status = if !refused && audited && swept && fell_back.is_empty() {
                Status::Ok
            } else if kernel.all_required_attached() {
                Status::Warn
            } else {
                Status::Fail
            };
            let failed: Vec<String> = kernel
                .hooks
                .iter()
                .filter_map(|s| Some(format!("{}: {}", s.hook.tracepoint, s.error.as_deref()?)))
                .collect();
            let detail = format!(
                "{attached}/{} hooks attached as {PROGRAM_TYPE}, {audit}, {sweep}; detached \
                 again{}{}",
                kernel.hooks.len(),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!("; not attached: {}", failed.join("; "))
                },
                if fell_back.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; the kernel refused the typed variant (verifier log above), so {}",
                        fell_back.join(", ")
                    )
                }
            );
            // Dropping the programs detaches them.
            drop(kernel);
            let check = Check::new(
                "load",
                status,
                detail,
                (status != Status::Ok).then(|| {
                    let mut remedy = String::new();
                    // A hook refused is one not attached.
                    if !kernel_all_attached || !fell_back.is_empty() {
                        remedy.push_str(
                            "See the hooks above: an optional hook this kernel lacks costs only \
                             its role; for one it refused, `dmesg` and the verifier log above \
                             say why. A timer hook on its helper-read variant works, at that \
                             variant's cost: report the kernel version and the verifier log. ",
                        );
                    }
                    if !audited {
                        remedy.push_str(
                            "Without the audit walk the agent cannot see keepalive settings of \
                             sockets that never expire: the warning logged above says why. ",
                        );
                    }
                    if !swept {
                        remedy.push_str(
                            "Without the counter sweep, probes of keepalive expiries the kernel \
                             ran no program for are counted only at a later expiry in their \
                             namespace on the same CPU: the detail and the warning logged above \
                             say why.",
                        );
                    }
                    remedy.trim_end().to_owned()
                }),
            );
            (check, ipvs_program)
        }
        Err(err) => (
            Check::new(
                "load",
                Status::Fail,
                err.to_string(),
                Some("The kernel refused the programs: run as root, check `dmesg` and the verifier log above.".to_owned()),
            ),
            None,
        ),
    }
}
