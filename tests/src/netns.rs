//! Throwaway network namespaces, and doing things inside them: sockets, sysctls, nftables rules,
//! `ss -K`, the namespace's TCP MIB counters.
//!
//! Two kinds: `ip netns` namespaces ([`Netns::new`], on a host with iproute2 and nftables) and
//! namespaces made by `unshare(CLONE_NEWNET)` ([`Netns::unshared`], where there is no `ip` or
//! `nft`, e.g. the busybox guests of `cargo xtask vm`). Socket, sysctl and counter helpers work on
//! both; the `ip netns exec` ones (nft, ss) only on the first.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, RawFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail, ensure};

use crate::sock::TcpPair;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A network namespace created for one test, deleted on drop. Its loopback is up.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// `ip netns` namespaces are bind-mounted at /run/netns/NAME and deleted with `ip netns
    /// delete`; unshared ones live as long as `ns_file` (and whatever is inside them).
    ip_netns: bool,
    /// An open handle on the namespace: threads join it with setns.
    ns_file: File,
    inum: u64,
}

/// Snapshot of the namespace's `TcpExt` MIB (`/proc/net/netstat`), e.g. `TCPKeepAlive`,
/// `TCPAbortOnTimeout`.
#[derive(Debug, Clone, Default)]
pub struct TcpExt(pub HashMap<String, u64>);

impl TcpExt {
    /// The counter `key`; panics when the kernel has no such counter (a typo, not a test result).
    pub fn get(&self, key: &str) -> u64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("TcpExt has no counter {key:?}"))
    }

    /// `self[key] - earlier[key]`.
    pub fn delta(&self, earlier: &TcpExt, key: &str) -> u64 {
        self.get(key) - earlier.get(key)
    }

    /// Every counter that changed since `earlier`, as `Name+delta ...` (for logs).
    pub fn changes(&self, earlier: &TcpExt) -> String {
        let mut changed: Vec<(&String, i128)> = self
            .0
            .iter()
            .map(|(k, v)| {
                let was = earlier.0.get(k).copied().unwrap_or(0);
                (k, i128::from(*v) - i128::from(was))
            })
            .filter(|(_, d)| *d != 0)
            .collect();
        changed.sort();
        changed
            .iter()
            .map(|(k, d)| format!("{k}{d:+}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Netns {
    /// Creates `kat-<tag>-<pid>-<n>` with `ip netns` and brings its loopback up.
    pub fn new(tag: &str) -> anyhow::Result<Netns> {
        let name = format!(
            "kat-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_cmd(Command::new("ip").args(["netns", "add", &name]), None)?;
        let path = PathBuf::from(format!("/run/netns/{name}"));
        let opened = File::open(&path).with_context(|| format!("open {}", path.display()));
        let ns_file = match opened {
            Ok(file) => file,
            Err(err) => {
                delete_ip_netns(&name);
                return Err(err);
            }
        };
        // From here on Drop deletes the namespace, whatever fails next.
        let mut ns = Netns {
            name,
            ip_netns: true,
            ns_file,
            inum: 0,
        };
        run_cmd(
            Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]),
            None,
        )?;
        ns.inum = ns
            .ns_file
            .metadata()
            .with_context(|| format!("stat {}", path.display()))?
            .ino();
        Ok(ns)
    }

    /// Creates a namespace with `unshare(CLONE_NEWNET)` on a short-lived thread and brings its
    /// loopback up with an ioctl: needs root but no `ip` command. It is named `<tag>-<inode>`
    /// and disappears when this value and every socket inside it are gone.
    pub fn unshared(tag: &str) -> anyhow::Result<Netns> {
        let ns_file = std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<File> {
                    // SAFETY: plain syscall; CLONE_NEWNET moves only this thread.
                    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error())
                            .context("unshare(CLONE_NEWNET) (needs root)");
                    }
                    loopback_up()?;
                    File::open("/proc/thread-self/ns/net").context("open /proc/thread-self/ns/net")
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        let inum = ns_file
            .metadata()
            .context("stat the new network namespace")?
            .ino();
        Ok(Netns {
            name: format!("{tag}-{inum}"),
            ip_netns: false,
            ns_file,
            inum,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's inode number: what the agent puts in its `netns` label.
    pub fn inum(&self) -> u64 {
        self.inum
    }

    /// Runs `f` on a fresh thread that has entered this namespace; sockets `f` creates belong to
    /// the namespace (and stay usable from any thread afterwards). A panic in `f` is re-raised.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        run_in_netns(self.fd(), f)
    }

    /// The namespace's file descriptor, to `setns` into (valid while this value lives).
    pub fn fd(&self) -> RawFd {
        self.ns_file.as_raw_fd()
    }

    /// The namespace's `TcpExt` counters, read from `/proc/thread-self/net/netstat` on a thread
    /// inside the namespace.
    pub fn tcp_ext(&self) -> anyhow::Result<TcpExt> {
        let text = self.run(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))??;
        parse_netstat(&text, "TcpExt")
            .map(TcpExt)
            .with_context(|| format!("TcpExt of netns {}", self.name))
    }

    /// The namespace's `Tcp` MIB (`/proc/net/snmp`: `InSegs`, `OutRsts`, ...), in the same shape
    /// as [`Netns::tcp_ext`].
    pub fn tcp_mib(&self) -> anyhow::Result<TcpExt> {
        let text = self.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
        parse_netstat(&text, "Tcp")
            .map(TcpExt)
            .with_context(|| format!("Tcp MIB of netns {}", self.name))
    }

    /// Sets a namespaced sysctl, e.g. `sysctl("net.ipv4.tcp_retries2", "3")`, and reads it back.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let read_back = self.run(|| -> anyhow::Result<String> {
            std::fs::write(&path, value).with_context(|| format!("write {path}"))?;
            Ok(std::fs::read_to_string(&path)?.trim().to_owned())
        })??;
        ensure!(
            read_back == value,
            "sysctl {key} reads {read_back:?} after writing {value:?}"
        );
        Ok(())
    }

    /// The `ip netns` name, for commands run with `ip netns exec`.
    fn ip_netns_name(&self, what: &str) -> anyhow::Result<&str> {
        ensure!(
            self.ip_netns,
            "{what} runs through `ip netns exec`, but namespace {} was created with unshare \
             (Netns::unshared); use Netns::new",
            self.name
        );
        Ok(&self.name)
    }

    /// Runs `prog args...` inside the namespace (`ip netns exec`), returning its stdout.
    pub fn exec(&self, prog: &str, args: &[&str]) -> anyhow::Result<String> {
        let name = self.ip_netns_name(prog)?;
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", name, prog])
                .args(args),
            None,
        )
    }

    /// Loads an nftables script into the namespace (`nft -f -`).
    pub fn nft(&self, script: &str) -> anyhow::Result<()> {
        let name = self.ip_netns_name("nft")?;
        run_cmd(
            Command::new("ip").args(["netns", "exec", name, "nft", "-f", "-"]),
            Some(script),
        )
        .map(drop)
    }

    /// Adds an output-hook rule `<matcher> drop` in a table of its own; the returned handle
    /// removes it. (Deleting the namespace removes it too.)
    pub fn drop_output(&self, matcher: &str) -> anyhow::Result<NftRule> {
        let table = format!("kat_{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        self.nft(&format!(
            "table inet {table} {{\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority 0; policy accept;\n\
             \t\t{matcher} drop\n\
             \t}}\n\
             }}\n"
        ))?;
        Ok(NftRule {
            netns: self.name.clone(),
            table,
            removed: false,
        })
    }

    /// Drops everything the socket bound to `port` sends (its ACKs to keepalive probes, its
    /// retransmission ACKs, ...): to its peer it looks like a dead host.
    pub fn blackhole_replies_from_port(&self, port: u16) -> anyhow::Result<NftRule> {
        self.drop_output(&format!("tcp sport {port}"))
    }

    /// Drops only the RSTs sent from `port`.
    pub fn drop_resets_from_port(&self, port: u16) -> anyhow::Result<NftRule> {
        self.drop_output(&format!("tcp sport {port} tcp flags & rst == rst"))
    }

    /// `ss -K -t -n <filter>`: destroys the matching TCP sockets (SOCK_DESTROY → `tcp_abort`).
    pub fn ss_kill(&self, filter: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["-K", "-t", "-n"];
        args.extend_from_slice(filter);
        self.exec("ss", &args)
    }

    /// A TCP listener on `ip` (use 127.0.0.1 or ::1), ephemeral port.
    pub fn listen(&self, ip: IpAddr) -> anyhow::Result<TcpListener> {
        self.run(|| TcpListener::bind(SocketAddr::new(ip, 0)))?
            .with_context(|| format!("listen on {ip} in netns {}", self.name))
    }

    /// One established connection to `listener`.
    pub fn connect_pair(&self, listener: &TcpListener) -> anyhow::Result<TcpPair> {
        let mut pairs = self.connect_pairs(listener, 1)?;
        Ok(pairs.remove(0))
    }

    /// `n` established connections to `listener` (client side connected from inside the
    /// namespace, server side accepted).
    pub fn connect_pairs(&self, listener: &TcpListener, n: usize) -> anyhow::Result<Vec<TcpPair>> {
        let addr = listener.local_addr()?;
        self.run(|| -> anyhow::Result<Vec<TcpPair>> {
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                let client = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
                let (server, _) = listener.accept().context("accept")?;
                pairs.push(TcpPair::new(client, server)?);
            }
            Ok(pairs)
        })?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.ip_netns {
            delete_ip_netns(&self.name);
        }
    }
}

fn delete_ip_netns(name: &str) {
    if let Err(e) = run_cmd(Command::new("ip").args(["netns", "delete", name]), None) {
        eprintln!("warning: could not delete netns {name}: {e:#}");
    }
}

// The libc crate types these as the ioctl request type on glibc but as u64 on musl (whose ioctl
// takes an int), and the guest program is built for musl.
const SIOCGIFFLAGS: libc::Ioctl = libc::SIOCGIFFLAGS as libc::Ioctl;
const SIOCSIFFLAGS: libc::Ioctl = libc::SIOCSIFFLAGS as libc::Ioctl;

/// Sets IFF_UP on `lo` of the calling thread's network namespace (what `ip link set lo up` does,
/// without iproute2).
fn loopback_up() -> anyhow::Result<()> {
    // SAFETY: plain syscall; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCSIFFLAGS");
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: req is a live ifreq naming an interface; the kernel fills ifru_flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFFLAGS, &raw mut req) } != 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
    }
    // SAFETY: SIOCGIFFLAGS just wrote ifru_flags.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; the kernel reads ifru_flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFFLAGS, &raw const req) } != 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo up");
    }
    Ok(())
}

/// An nftables table holding one drop rule.
#[derive(Debug)]
pub struct NftRule {
    netns: String,
    table: String,
    removed: bool,
}

impl NftRule {
    /// Deletes the rule's table: traffic flows again.
    pub fn remove(&mut self) -> anyhow::Result<()> {
        if !self.removed {
            run_cmd(
                Command::new("ip").args(["netns", "exec", &self.netns, "nft", "-f", "-"]),
                Some(&format!("delete table inet {}\n", self.table)),
            )?;
            self.removed = true;
        }
        Ok(())
    }
}

/// Runs `f` on a fresh thread that has entered the network namespace `ns_fd` refers to. A
/// panic in `f` is re-raised.
pub fn run_in_netns<R: Send>(ns_fd: RawFd, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> anyhow::Result<R> {
            // SAFETY: plain syscall on an fd the caller keeps open for this call; it changes
            // only this thread's netns.
            let rc = unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
            }
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Parses the `<prefix>:` header/value line pair of a `/proc/net/netstat`-style file.
pub fn parse_netstat(text: &str, prefix: &str) -> anyhow::Result<HashMap<String, u64>> {
    let tag = format!("{prefix}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&tag));
    let (Some(header), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {tag} lines");
    };
    let keys: Vec<&str> = header.split_whitespace().skip(1).collect();
    let vals: Vec<&str> = values.split_whitespace().skip(1).collect();
    ensure!(
        keys.len() == vals.len(),
        "{tag} header has {} fields, values {}",
        keys.len(),
        vals.len()
    );
    keys.into_iter()
        .zip(vals)
        // `Tcp: MaxConn` is -1 (no limit): a setting, not a counter.
        .filter(|(_, v)| !v.starts_with('-'))
        .map(|(k, v)| {
            let n = v.parse::<u64>().with_context(|| format!("{k} = {v:?}"))?;
            Ok((k.to_owned(), n))
        })
        .collect()
}

/// Runs a command to completion (optionally feeding `stdin`); fails with its stderr unless it
/// exits 0. Returns stdout.
pub fn run_cmd(cmd: &mut Command, stdin: Option<&str>) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().context("stdin pipe")?;
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("write stdin of {what}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("wait {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
