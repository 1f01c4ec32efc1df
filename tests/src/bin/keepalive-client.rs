//! A TCP client that lives where a test puts it: it moves itself into a cgroup and a network
//! namespace *before* creating its socket (the kernel stamps a socket with the cgroup of the
//! process that creates it), connects with the given keepalive settings, prints its local port,
//! then holds the connection until its standard input closes.
//!
//! Usage: keepalive-client CGROUP_DIR NETNS_PATH ADDR IDLE_S INTVL_S CNT
//!   CGROUP_DIR  a cgroup v2 directory (its cgroup.procs is written), or `-` to stay in its own
//!   NETNS_PATH  a network namespace file, e.g. /run/netns/NAME
//!   ADDR        the server to connect to, e.g. 127.0.0.1:5000

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;

use anyhow::{Context, bail};
use keepalive_tests::set_keepalive;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cgroup_dir, netns_path, addr, idle, intvl, cnt] = args.as_slice() else {
        bail!("usage: keepalive-client CGROUP_DIR NETNS_PATH ADDR IDLE_S INTVL_S CNT");
    };
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr:?}"))?;
    let [idle, intvl, cnt] = [idle, intvl, cnt].map(|n| n.parse::<i32>());
    let (idle, intvl, cnt) = (idle?, intvl?, cnt?);

    // The process is single-threaded here, so setns moves the whole process.
    if cgroup_dir != "-" {
        let procs = format!("{cgroup_dir}/cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining the cgroup: write {procs}"))?;
    }
    let netns = File::open(netns_path).with_context(|| format!("open {netns_path}"))?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }

    let stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    set_keepalive(&stream, idle, intvl, cnt)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", stream.local_addr()?.port())?;
    stdout.flush()?;

    // Hold the socket (and its file descriptor, which is how the agent finds this process)
    // until the test closes our stdin.
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    drop(stream);
    Ok(())
}
