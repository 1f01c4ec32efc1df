//! Whether the node balances TCP connections with IPVS (kube-proxy in IPVS mode): then IPVS is a
//! middlebox with an idle timeout on every connection to a Service, and its threshold applies.
//! Its configured TCP timeout (kube-proxy's `--ipvs-tcp-timeout`) is read from the kernel by
//! the IPVS program ([`IpvsProgram`]).

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::Path,
};

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::ProgramFd,
};
use keepalive_ebpf::{IpvsQuery, ipvs_status, names};

use crate::{
    files::{self, cap},
    kernel::{
        bpf_syscall::{ProgramLoadError, TestRunError, load_for_test_run, test_run},
        layout::{self, LayoutError, ipvs::IpvsLayout},
        maps::{TakeMapError, take_map},
    },
};

/// IPVS's TCP established timeout when nobody set one (`ip_vs_proto_tcp.c`,
/// `tcp_timeouts[IP_VS_TCP_S_ESTABLISHED]`): 15 minutes. kube-proxy leaves it alone unless
/// `--ipvs-tcp-timeout` is given.
pub(crate) const DEFAULT_TCP_TIMEOUT_SECONDS: f64 = 900.0;

/// The TCP virtual services of the node's IPVS: the connections it balances, and so the ones
/// its idle timeout applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Services {
    /// `TCP` services' virtual addresses: a client's socket to a Service has one as its peer.
    pub virtual_endpoints: HashSet<SocketAddr>,
    /// Their destinations: a backend's socket behind a Service has one as its own address.
    pub real_servers: HashSet<SocketAddr>,
    /// A firewall-mark (`FWM`) service exists: which connections carry the mark is not in the
    /// table, so IPVS's timeout applies to every connection.
    pub fwmark: bool,
}

/// The TCP services in the IPVS table of the network namespace of pid 1 under `proc_root`
/// (the node's, from the host's procfs): `PID/net/ip_vs`. `None` when there is none, or the
/// kernel has no IPVS (the file is absent).
pub(crate) fn tcp_services(proc_root: &Path) -> io::Result<Option<Services>> {
    let path = proc_root.join("1/net/ip_vs");
    let mut services = Services::default();
    // Destination lines follow their service's line: kept only under a TCP one.
    let mut in_tcp = false;
    let scanned = files::find_line(&path, cap::IPVS, |line| {
        if let Some(destination) = line.trim_start().strip_prefix("-> ") {
            if in_tcp && let Some(at) = endpoint(destination) {
                services.real_servers.insert(at);
            }
        } else if let Some(service) = line.strip_prefix("TCP  ") {
            in_tcp = true;
            if let Some(at) = endpoint(service) {
                services.virtual_endpoints.insert(at);
            }
        } else {
            in_tcp = false;
            services.fwmark |= line.starts_with("FWM  ");
        }
        None::<()>
    });
    match scanned {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok((services.fwmark || !services.virtual_endpoints.is_empty()).then_some(services))
}

/// The leading `ADDR:PORT` of a service or destination line, as `ip_vs_info_seq_show` prints
/// them: IPv4 as 8 hex digits, IPv6 in brackets (`%pI6`), the port as 4 hex digits.
fn endpoint(text: &str) -> Option<SocketAddr> {
    let field = text.split_whitespace().next()?;
    let (address, port) = field.rsplit_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match address.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        Some(v6) => IpAddr::V6(v6.parse::<Ipv6Addr>().ok()?),
        None => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(address, 16).ok()?)),
    };
    Some(SocketAddr::new(ip, port))
}

/// Why IPVS's TCP timeout could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TimeoutError {
    #[error("the kernel's BTF: {0}")]
    KernelBtf(#[source] LayoutError),
    #[error(
        "the ip_vs module's BTF ({path}): {0}",
        path = layout::ipvs::MODULE_BTF_PATH
    )]
    ModuleBtf(#[source] LayoutError),
    #[error("loading the IPVS program: {0}")]
    Program(#[source] ProgramLoadError),
    #[error(transparent)]
    Map(#[from] TakeMapError),
    #[error("the IPVS program's answer: {0}")]
    Answer(#[source] aya::maps::MapError),
    #[error("running the IPVS program: {0}")]
    TestRun(#[source] TestRunError),
    #[error(
        "the ip_vs module is loaded but the kernel has no BTF for it ({path} is missing: modules \
         carry BTF from Linux 5.11, with CONFIG_DEBUG_INFO_BTF_MODULES)",
        path = layout::ipvs::MODULE_BTF_PATH
    )]
    NoModuleBtf,
    #[error("the host's network namespace has no IPVS state (the ip_vs module did not set it up)")]
    NotInitialised,
    #[error("IPVS in the host's network namespace has no TCP protocol entry")]
    NoTcp,
    #[error("the host's network namespace was not found (no task is its own parent within 64)")]
    NoRootTask,
    #[error("reading IPVS's state failed (bpf_probe_read_kernel: {0})")]
    Unreadable(i32),
    #[error("the IPVS program did not load (see the warning at start)")]
    ProgramOff,
    #[error("the IPVS program did not answer (status {0})")]
    NoAnswer(u32),
}

/// Present while the `ip_vs` module is loaded.
const MODULE_SYSFS: &str = "/sys/module/ip_vs";

/// What the IPVS program found in the host's network namespace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum TcpTimeout {
    /// The kernel was built without IPVS.
    NotBuilt,
    /// IPVS is a module, and it is not loaded.
    NotLoaded,
    /// IPVS's TCP established timeout (`timeout_table[IP_VS_TCP_S_ESTABLISHED]`), in jiffies.
    Jiffies(i32),
}

/// The IPVS program, loaded (the verifier checks it whatever IPVS's state), and where it reads
/// once the `ip_vs` module's BTF has said so.
pub(crate) struct IpvsProgram {
    program: ProgramFd,
    query: Array<MapData, IpvsQuery>,
    /// What the kernel's and the module's BTF said, once it cannot change until a reboot: the
    /// question, or that there is none to ask. Not kept while the module is not loaded.
    resolved: Option<Resolved>,
}

/// A lasting answer of the BTF ([`IpvsProgram::resolved`]).
#[derive(Debug, Clone, Copy)]
enum Resolved {
    Question(IpvsQuery),
    NotBuilt,
    /// Loaded without BTF of its own: 5.10, before CONFIG_DEBUG_INFO_BTF_MODULES.
    NoModuleBtf,
}

impl std::fmt::Debug for IpvsProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsProgram")
            .field("resolved", &self.resolved)
            .finish_non_exhaustive()
    }
}

impl IpvsProgram {
    /// Loads the program from `ebpf` and takes its map out of it.
    pub(crate) fn load(ebpf: &mut Ebpf) -> Result<Self, TimeoutError> {
        let query: Array<MapData, IpvsQuery> = take_map(ebpf, names::IPVS_QUERY_MAP)?;
        let program =
            load_for_test_run(ebpf, names::IPVS_PROGRAM).map_err(TimeoutError::Program)?;
        Ok(Self {
            program,
            query,
            resolved: None,
        })
    }

    /// IPVS's TCP established timeout in the host's namespace now. Until the BTF has given a
    /// lasting answer, each read parses the kernel's and the module's BTF (blocking, tens of
    /// MiB); after, a read is one test run.
    pub(crate) fn read(&mut self) -> Result<TcpTimeout, TimeoutError> {
        let resolved = match self.resolved {
            Some(resolved) => resolved,
            None => {
                let vmlinux = layout::read_vmlinux_btf().map_err(TimeoutError::KernelBtf)?;
                let found = query(&vmlinux);
                drop(vmlinux);
                crate::kernel::release_freed_memory();
                let resolved = match found? {
                    IpvsLayout::NotBuilt => Resolved::NotBuilt,
                    IpvsLayout::NotLoaded if Path::new(MODULE_SYSFS).exists() => {
                        Resolved::NoModuleBtf
                    }
                    IpvsLayout::NotLoaded => return Ok(TcpTimeout::NotLoaded),
                    IpvsLayout::Query(question) => Resolved::Question(question),
                };
                *self.resolved.insert(resolved)
            }
        };
        let question = match resolved {
            Resolved::Question(question) => question,
            Resolved::NotBuilt => return Ok(TcpTimeout::NotBuilt),
            Resolved::NoModuleBtf => return Err(TimeoutError::NoModuleBtf),
        };
        self.query
            .set(0, question, 0)
            .map_err(TimeoutError::Answer)?;
        test_run(self.program.as_fd(), &[]).map_err(TimeoutError::TestRun)?;
        let answer = self.query.get(&0, 0).map_err(TimeoutError::Answer)?;
        match answer.status {
            ipvs_status::FOUND => Ok(TcpTimeout::Jiffies(answer.timeout_jiffies)),
            ipvs_status::NO_IPVS => Err(TimeoutError::NotInitialised),
            ipvs_status::NO_TCP => Err(TimeoutError::NoTcp),
            ipvs_status::NO_ROOT_TASK => Err(TimeoutError::NoRootTask),
            ipvs_status::UNREADABLE => Err(TimeoutError::Unreadable(answer.error)),
            other => Err(TimeoutError::NoAnswer(other)),
        }
    }
}

/// The program's question from the kernel's BTF and, when IPVS is a loaded module, the
/// module's.
fn query(vmlinux: &[u8]) -> Result<IpvsLayout, TimeoutError> {
    let parse = |context: &str, e| LayoutError::BtfInvalid {
        context: context.to_owned(),
        source: e,
    };
    let base = btf_rs::Btf::from_bytes(vmlinux)
        .map_err(|e| TimeoutError::KernelBtf(parse("parsing", e)))?;
    let module_path = Path::new(layout::ipvs::MODULE_BTF_PATH);
    let module = match files::read_bounded(module_path, cap::BTF) {
        Ok(bytes) => Some(
            btf_rs::Btf::from_split_bytes(&bytes, &base)
                .map_err(|e| TimeoutError::ModuleBtf(parse("parsing as split BTF", e)))?,
        ),
        // Not loaded, or built in: then the types are the kernel's own.
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(TimeoutError::ModuleBtf(LayoutError::BtfUnreadable {
                path: module_path.to_path_buf(),
                source,
            }));
        }
    };
    layout::ipvs::query(&base, module.as_ref()).map_err(|e| match module {
        Some(_) => TimeoutError::ModuleBtf(e),
        None => TimeoutError::KernelBtf(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format `ip_vs_info_seq_show` prints (net/netfilter/ipvs/ip_vs_ctl.c).
    const SERVICES: &str = "\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
UDP  0A60000A:0035 rr
  -> 0AF40002:0035      Masq    1      0          0
TCP  0A600001:01BB rr
  -> AC120002:192B      Masq    1      3          0
  -> AC120003:192B      Masq    1      0          0
TCP  [fd00:0010:0096:0000:0000:0000:0000:0001]:0050 rr
  -> [fd00:0010:0244:0001:0000:0000:0000:0005]:1F90      Masq    1      0          0
";

    fn with_file(text: Option<&str>) -> io::Result<Option<Services>> {
        let dir = std::env::temp_dir().join(format!(
            "keepalive-ipvs-{}-{}",
            std::process::id(),
            text.map_or(0, str::len)
        ));
        std::fs::create_dir_all(dir.join("1/net")).expect("mkdir");
        if let Some(text) = text {
            std::fs::write(dir.join("1/net/ip_vs"), text).expect("write");
        }
        let found = tcp_services(&dir);
        std::fs::remove_dir_all(&dir).expect("clean up");
        found
    }

    #[test]
    fn tcp_services_and_their_destinations_are_read_and_udp_ones_are_not() {
        let services = with_file(Some(SERVICES)).expect("read").expect("services");
        let at = |s: &str| s.parse::<SocketAddr>().expect("address");
        assert_eq!(
            services.virtual_endpoints,
            HashSet::from([at("10.96.0.1:443"), at("[fd00:10:96::1]:80")])
        );
        assert_eq!(
            services.real_servers,
            HashSet::from([
                at("172.18.0.2:6443"),
                at("172.18.0.3:6443"),
                at("[fd00:10:244:1::5]:8080")
            ])
        );
        assert!(!services.fwmark);
    }

    #[test]
    fn no_file_or_no_tcp_service_is_no_ipvs_and_a_firewall_mark_service_is_one() {
        assert_eq!(with_file(None).expect("absent"), None);
        let headers_and_udp: String = SERVICES.lines().take(5).map(|l| format!("{l}\n")).collect();
        assert_eq!(with_file(Some(&headers_and_udp)).expect("read"), None);
        let fwm = with_file(Some("FWM  00000001 wlc\n  -> 0A000001:0050 Route 1 0 0\n"))
            .expect("read")
            .expect("services");
        assert!(fwm.fwmark && fwm.virtual_endpoints.is_empty() && fwm.real_servers.is_empty());
    }

    /// This machine's kernel: whatever it has, reading it must not fail.
    #[test]
    fn the_running_kernel_answers() {
        tcp_services(Path::new("/proc")).expect("reading /proc/1/net/ip_vs");
    }
}
