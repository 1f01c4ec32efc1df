//! Connection pairs held by child processes, which turn keepalive on for all of them at once
//! when told: how a benchmark or a test gets more connections than one process may hold
//! descriptors for (20 000 here), all probing in the same jiffy. The child is a binary that
//! hands `--hold NETNS_PATH PAIRS` to [`hold`] (`hook-cost` does).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};

use crate::{Netns, set_keepalive};

/// Pairs one child holds: two descriptors each, under the 20 000 a process may hold here.
pub const PAIRS_PER_HOLDER: usize = 6_000;

/// Children holding connection pairs in one namespace; killed on drop.
#[derive(Debug)]
pub struct Holders {
    children: Vec<Child>,
}

impl Holders {
    /// Spawns `program --hold` children holding `total` pairs in `ns` between them, and waits
    /// until each has connected its pairs.
    pub fn connect(program: &Path, ns: &Netns, total: usize) -> anyhow::Result<Holders> {
        // The namespace by this process's descriptor of it: a `Netns::unshared` has no name
        // under /run/netns.
        let netns_path = format!("/proc/{}/fd/{}", std::process::id(), ns.fd());
        let mut holders = Holders {
            children: Vec::new(),
        };
        let mut left = total;
        while left > 0 {
            let n = left.min(PAIRS_PER_HOLDER);
            left -= n;
            let child = Command::new(program)
                .args(["--hold", &netns_path, &n.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("spawning {} --hold", program.display()))?;
            holders.children.push(child);
        }
        for child in &mut holders.children {
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().context("holder stdout")?).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("a connection holder failed before connecting all its pairs: {line:?}");
            }
        }
        Ok(holders)
    }

    /// Tells every child to turn keepalive on (see [`hold`]), one right after the other.
    pub fn start_probing(&mut self) -> anyhow::Result<()> {
        self.tell("go")
    }

    /// Tells every child to set a 1 h keepalive idle on every client: each keepalive timer is
    /// re-armed an hour out, so no connection expires again while a test runs.
    pub fn quiet(&mut self) -> anyhow::Result<()> {
        self.tell("quiet")
    }

    /// One command line to every child, one right after the other.
    fn tell(&mut self, command: &str) -> anyhow::Result<()> {
        for child in &mut self.children {
            let stdin = child.stdin.as_mut().context("holder stdin")?;
            writeln!(stdin, "{command}")?;
            stdin.flush()?;
        }
        Ok(())
    }

    /// Closes every child's stdin: they exit, and their sockets close. Fails if one failed.
    pub fn close(mut self) -> anyhow::Result<()> {
        for child in &mut self.children {
            drop(child.stdin.take());
        }
        for mut child in std::mem::take(&mut self.children) {
            let status = child.wait()?;
            if !status.success() {
                bail!("a connection holder failed: {status}");
            }
        }
        Ok(())
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The child's side, `--hold NETNS_PATH PAIRS`: joins the namespace, connects the pairs on its
/// loopback, says "ready", and on "go" turns keepalive on for every client (1 s idle, 1 s
/// interval, and enough probes that answering peers never time out), on "quiet" sets a 1 h idle
/// on every client; holds them until stdin closes.
pub fn hold(args: &[String]) -> anyhow::Result<()> {
    let [netns_path, n] = args else {
        bail!("usage: hook-cost --hold NETNS_PATH PAIRS");
    };
    let n: usize = n
        .parse()
        .with_context(|| format!("--hold {netns_path} {n}: not a number of pairs"))?;
    let limit = libc::rlimit {
        rlim_cur: 20_000,
        rlim_max: 20_000,
    };
    // SAFETY: setrlimit and setns read the arguments they are given; this process has one
    // thread, so setns moves all of it.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
        let ns = std::fs::File::open(netns_path).with_context(|| format!("open {netns_path}"))?;
        if libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) != 0 {
            return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
        }
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        pairs.push((client, server));
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdin, &mut line)?;
    if line.trim() != "go" {
        return Ok(());
    }
    for (client, _) in &pairs {
        set_keepalive(client, 1, 1, 120)?;
    }
    loop {
        line.clear();
        if std::io::BufRead::read_line(&mut stdin, &mut line)? == 0 {
            return Ok(());
        }
        if line.trim() == "quiet" {
            for (client, _) in &pairs {
                set_keepalive(client, 3600, 1, 120)?;
            }
        }
    }
}
