//! A real middlebox for idle-kill tests: Linux conntrack and NAT in a namespace the test
//! creates, all on loopback. An nftables `nat` output rule sends `127.0.0.2:80` to a server on
//! `127.0.0.1:8080`, and the namespace's conntrack forgets an established flow after a few
//! seconds of silence (`nf_conntrack_tcp_loose=0`, so it does not pick it up again mid-stream):
//! the client's next send is no longer translated and dies.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use anyhow::Context as _;

use crate::{Conn, DEADLINE, Netns, set_keepalive};

/// Where the middlebox drops what it forgot (nowhere: the reset comes back).
#[derive(Clone, Copy)]
pub enum Blackhole {
    None,
    Output,
    Input,
}

/// A namespace whose conntrack is the middlebox, forgetting an idle flow after `timeout`
/// seconds.
pub fn middlebox(tag: &str, timeout: u64, blackhole: Blackhole) -> anyhow::Result<Netns> {
    let ns = Netns::new(tag)?;
    let drop_invalid = match blackhole {
        Blackhole::None => "",
        Blackhole::Output => {
            "chain filter_out { type filter hook output priority 0; ct state invalid drop; }"
        }
        Blackhole::Input => {
            "chain filter_in { type filter hook input priority 0; ct state invalid drop; }"
        }
    };
    ns.nft(&format!(
        "table ip mbox {{
            chain nat_out {{ type nat hook output priority -100; ip daddr 127.0.0.2 tcp dport 80 dnat to 127.0.0.1:8080; }}
            {drop_invalid}
        }}"
    ))?;
    // The nat rule loaded conntrack into the namespace, so its sysctls exist now.
    ns.sysctl(
        "net.netfilter.nf_conntrack_tcp_timeout_established",
        &timeout.to_string(),
    )?;
    ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")?;
    Ok(ns)
}

/// A namespace that defragments without conntrack: an nftables TPROXY rule (on a port nothing
/// uses) enables IPv4 defragmentation, as conntrack does, but attaches no conntrack, so no
/// conntrack timeout applies to its connections. A namespace without netfilter at all proves
/// less: there the programs stop at the first check.
pub fn defragmenting_without_conntrack(tag: &str) -> anyhow::Result<Netns> {
    let ns = Netns::new(tag)?;
    ns.nft(
        "table ip transparent {
            chain pre { type filter hook prerouting priority -150; tcp dport 9 tproxy to 127.0.0.1:9; }
        }",
    )?;
    Ok(ns)
}

/// A connection through the middlebox that went silent: the client read the server's last
/// words at `last_received`, by the test's clock.
pub struct Silent {
    pub client: TcpStream,
    /// Kept open until the end: its close would reach a client that is gone.
    pub server: TcpStream,
    pub conn: Conn,
    pub last_received: Instant,
}

/// Connects through the NAT to `listener` (on `127.0.0.1:8080` in `ns`), with keepalive idle
/// `keepalive_idle` (interval 1 s, 3 probes) or none, and reads the server's first words.
pub fn connect(
    ns: &Netns,
    listener: &TcpListener,
    keepalive_idle: Option<i32>,
) -> anyhow::Result<Silent> {
    let remote: SocketAddr = "127.0.0.2:80".parse()?;
    let client = ns
        .run(|| TcpStream::connect(remote))?
        .context("connect through the NAT")?;
    let (mut server, _) = listener.accept()?;
    if let Some(idle) = keepalive_idle {
        set_keepalive(&client, idle, 1, 3)?;
    }
    let conn = Conn {
        local: client.local_addr()?,
        remote,
    };
    server.write_all(b"hello")?;
    let mut buf = [0u8; 5];
    let mut reader = &client;
    reader.set_read_timeout(Some(DEADLINE))?;
    reader.read_exact(&mut buf)?;
    Ok(Silent {
        client,
        server,
        conn,
        last_received: Instant::now(),
    })
}

/// Sends after the silence; returns the silence by the test's clock.
pub fn send(silent: &Silent) -> anyhow::Result<f64> {
    let sent_at = Instant::now();
    (&silent.client).write_all(b"ping")?;
    Ok(sent_at.duration_since(silent.last_received).as_secs_f64())
}
