//! Socket options and kernel-side state of test sockets.

use std::io::{self, Write as _};
use std::mem::size_of;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd as _};
use std::time::Duration;

use anyhow::Context;

use crate::wait_until;

/// `tcpi_state` values (include/net/tcp_states.h).
pub use keepalive_ebpf::tcp_state::{CLOSE as TCP_CLOSE, ESTABLISHED as TCP_ESTABLISHED};

/// A connection's addresses as seen from one end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Conn {
    /// The per-connection label set the agent uses (without `reason`).
    pub fn labels(&self, netns: u64) -> Vec<(String, String)> {
        vec![
            ("netns".to_owned(), netns.to_string()),
            ("local_addr".to_owned(), self.local.ip().to_string()),
            ("local_port".to_owned(), self.local.port().to_string()),
            ("remote_addr".to_owned(), self.remote.ip().to_string()),
            ("remote_port".to_owned(), self.remote.port().to_string()),
        ]
    }
}

/// Both ends of one loopback connection, with their addresses recorded while connected (they
/// cannot be asked for once the connection is gone).
#[derive(Debug)]
pub struct TcpPair {
    pub client: TcpStream,
    pub server: TcpStream,
    pub client_conn: Conn,
    pub server_conn: Conn,
}

impl TcpPair {
    pub fn new(client: TcpStream, server: TcpStream) -> anyhow::Result<TcpPair> {
        let client_conn = Conn {
            local: client.local_addr()?,
            remote: client.peer_addr()?,
        };
        let server_conn = Conn {
            local: server.local_addr()?,
            remote: server.peer_addr()?,
        };
        Ok(TcpPair {
            client,
            server,
            client_conn,
            server_conn,
        })
    }

    /// The listener's port (the server end's local port).
    pub fn server_port(&self) -> u16 {
        self.server_conn.local.port()
    }
}

/// An `int` socket option; `what` names it in the error.
pub fn setsockopt_int(
    s: &impl AsRawFd,
    level: i32,
    opt: i32,
    value: i32,
    what: &str,
) -> anyhow::Result<()> {
    // SAFETY: value is a live c_int and we pass its exact size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setsockopt {what}"));
    }
    Ok(())
}

/// An `int` socket option as the kernel reports it; `what` names it in the error.
pub fn getsockopt_int(s: &impl AsRawFd, level: i32, opt: i32, what: &str) -> anyhow::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value/len are live and len holds value's size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("getsockopt {what}"));
    }
    Ok(value)
}

/// TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT (seconds, seconds, count), then SO_KEEPALIVE on
/// (which arms the timer with the idle time just set).
pub fn set_keepalive(s: &impl AsRawFd, idle_s: i32, intvl_s: i32, cnt: i32) -> anyhow::Result<()> {
    setsockopt_int(
        s,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        idle_s,
        "TCP_KEEPIDLE",
    )?;
    setsockopt_int(
        s,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        intvl_s,
        "TCP_KEEPINTVL",
    )?;
    setsockopt_int(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, cnt, "TCP_KEEPCNT")?;
    setsockopt_int(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1, "SO_KEEPALIVE")
}

/// SO_KEEPALIVE off: deletes the keepalive timer, so no further probes.
pub fn disable_keepalive(s: &impl AsRawFd) -> anyhow::Result<()> {
    setsockopt_int(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0, "SO_KEEPALIVE")
}

/// TCP_USER_TIMEOUT in milliseconds.
pub fn set_user_timeout(s: &impl AsRawFd, ms: i32) -> anyhow::Result<()> {
    setsockopt_int(
        s,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        ms,
        "TCP_USER_TIMEOUT",
    )
}

/// SO_LINGER {on, 0}: closing the socket then sends RST instead of FIN.
pub fn set_linger_zero(s: &impl AsRawFd) -> anyhow::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: linger is a live struct linger and we pass its exact size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setsockopt SO_LINGER");
    }
    Ok(())
}

/// SO_ERROR (reading it clears the pending error). 0 when none.
pub fn so_error(s: &impl AsRawFd) -> anyhow::Result<i32> {
    getsockopt_int(s, libc::SOL_SOCKET, libc::SO_ERROR, "SO_ERROR")
}

/// TCP_INFO of the socket.
pub fn tcp_info(s: &impl AsRawFd) -> anyhow::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info/len are live and len holds info's size; the kernel writes at most len bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("getsockopt TCP_INFO");
    }
    Ok(info)
}

/// The socket's TCP state (`TCP_ESTABLISHED`, `TCP_CLOSE`, ...).
pub fn tcp_state(s: &impl AsRawFd) -> anyhow::Result<u8> {
    Ok(tcp_info(s)?.tcpi_state)
}

/// Waits until the kernel has moved the socket to CLOSE, then returns (and clears) its SO_ERROR.
pub fn wait_closed(s: &impl AsRawFd, deadline: Duration, what: &str) -> anyhow::Result<i32> {
    wait_until(deadline, &format!("{what} to reach TCP_CLOSE"), || {
        Ok(tcp_state(s)? == TCP_CLOSE)
    })?;
    so_error(s)
}

/// Writes until the socket's send buffer is full, so the rest of the data waits for the peer's
/// receive window (the zero-window scenario). Leaves the socket non-blocking.
pub fn fill_send_buffer(s: &TcpStream) -> anyhow::Result<()> {
    s.set_nonblocking(true)?;
    let chunk = [0u8; 16 * 1024];
    loop {
        match (&mut &*s).write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e).context("filling the peer's window"),
        }
    }
}

/// An errno as the agent names it, with its `strerror` text, for messages.
pub fn errno_name(e: i32) -> String {
    format!(
        "{} ({})",
        keepalive_agent::errno_name(e),
        io::Error::from_raw_os_error(e)
    )
}

/// Attaches a classic BPF socket filter that accepts nothing (`ret #0`): from now on every
/// segment for this socket is dropped in `tcp_filter` before TCP sees it — its peer looks dead
/// (no ACKs, no RSTs), while what this socket sends still goes out. Where there is no nftables
/// (the `cargo xtask vm` guests) this is how a peer is blackholed.
pub fn drop_all_incoming(s: &impl AsRawFd) -> anyhow::Result<()> {
    // BPF_RET | BPF_K: return the constant k (0 bytes kept = drop).
    let mut program = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: fprog points at a live one-instruction program; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setsockopt SO_ATTACH_FILTER");
    }
    Ok(())
}

/// Removes the filter [`drop_all_incoming`] attached: the socket hears its peer again.
pub fn accept_incoming_again(s: &impl AsRawFd) -> anyhow::Result<()> {
    setsockopt_int(
        s,
        libc::SOL_SOCKET,
        libc::SO_DETACH_FILTER,
        0,
        "SO_DETACH_FILTER",
    )
}

/// Connects a new IPv4 socket to `addr` with [`drop_all_incoming`] attached *before* the SYN
/// leaves, so no SYN-ACK is ever heard. The outer error is a setup failure; the inner one is what
/// `connect` returned (ETIMEDOUT once `net.ipv4.tcp_syn_retries` retransmissions went unanswered).
pub fn connect_deaf(addr: SocketAddrV4) -> anyhow::Result<io::Result<TcpStream>> {
    // SAFETY: plain syscall; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_INET, SOCK_STREAM)");
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    drop_all_incoming(&stream)?;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sin is a live sockaddr_in and we pass its exact size.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    Ok(if rc == 0 {
        Ok(stream)
    } else {
        Err(io::Error::last_os_error())
    })
}

/// Pins the calling thread to the first CPU it may run on, and returns that CPU: what it
/// arms (a socket's timers) and closes then happens there, and so does what a child process it
/// starts does.
pub fn pin_to_one_cpu() -> anyhow::Result<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set, filled by the kernel below.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    anyhow::ensure!(
        ret == 0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    let cpu = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `set` is a live cpu_set_t and `cpu` below CPU_SETSIZE.
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .context("this thread may run on no CPU")?;
    // SAFETY: as above.
    unsafe {
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
    }
    // SAFETY: as above.
    let ret = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    anyhow::ensure!(
        ret == 0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(cpu)
}
