//! Whether the node balances TCP connections with IPVS (kube-proxy in IPVS mode): then IPVS is a
//! middlebox with an idle timeout on every connection to a Service, and its threshold applies.

use std::{io, path::Path};

use crate::files::{self, cap};

/// IPVS's TCP established timeout when nobody set one (`ip_vs_proto_tcp.c`,
/// `tcp_timeouts[IP_VS_TCP_S_ESTABLISHED]`): 15 minutes. kube-proxy leaves it alone unless
/// `--ipvs-tcp-timeout` is given.
pub(crate) const DEFAULT_TCP_TIMEOUT_SECONDS: f64 = 900.0;

/// Whether the network namespace of pid 1 under `proc_root` (the node's, from the host's
/// procfs) has an IPVS virtual service that can carry TCP: a `TCP` or a firewall-mark (`FWM`)
/// service in `PID/net/ip_vs`. `Ok(false)` when the kernel has no IPVS (the file is absent).
pub(crate) fn balances_tcp(proc_root: &Path) -> io::Result<bool> {
    let path = proc_root.join("1/net/ip_vs");
    match files::find_line(&path, cap::MOUNTS, |line| {
        is_tcp_service(line).then_some(())
    }) {
        Ok(found) => Ok(found.is_some()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// A virtual-service line of `/proc/net/ip_vs` (`ip_vs_info_seq_show`): the protocol, two
/// spaces, then the address. Destinations are indented (`  -> `); the two header lines start
/// with `IP Virtual Server` and `Prot`.
fn is_tcp_service(line: &str) -> bool {
    line.starts_with("TCP  ") || line.starts_with("FWM  ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format `ip_vs_info_seq_show` prints (net/netfilter/ipvs/ip_vs_ctl.c).
    const TWO_SERVICES: &str = "\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
UDP  0A60000A:0035 rr
  -> 0AF40002:0035      Masq    1      0          0
TCP  0A600001:01BB rr
  -> AC120002:192B      Masq    1      3          0
";

    #[test]
    fn a_tcp_service_is_found_and_headers_and_destinations_are_not() {
        assert!(TWO_SERVICES.lines().any(is_tcp_service));
        let headers_only: Vec<&str> = TWO_SERVICES.lines().take(3).collect();
        assert!(!headers_only.into_iter().any(is_tcp_service));
        assert!(!is_tcp_service("UDP  0A60000A:0035 rr"));
        assert!(!is_tcp_service(
            "  -> AC120002:192B      Masq    1      3          0"
        ));
        assert!(is_tcp_service("FWM  00000001 wlc"));
    }

    #[test]
    fn a_procfs_without_ipvs_has_no_service() {
        let dir = std::env::temp_dir().join(format!("keepalive-ipvs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1/net")).expect("mkdir");
        let without = balances_tcp(&dir);
        std::fs::write(dir.join("1/net/ip_vs"), TWO_SERVICES).expect("write");
        let with = balances_tcp(&dir);
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert!(!without.expect("no file is no IPVS"));
        assert!(with.expect("read"));
    }

    /// This machine's kernel: whatever it has, reading it must not fail.
    #[test]
    fn the_running_kernel_answers() {
        balances_tcp(Path::new("/proc")).expect("reading /proc/1/net/ip_vs");
    }
}
