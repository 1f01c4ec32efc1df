//! Short connections opened and closed on a namespace's loopback, each way the close program
//! tells apart: what the bench's churn rounds and the close-report test drive.

use std::net::{TcpListener, TcpStream};

use anyhow::Context as _;

use crate::{set_linger_zero, setsockopt_int};

/// What is done with a connection before closing it.
#[derive(Clone, Copy, Debug)]
pub enum Churn {
    /// The server closes first, then the client: FIN exchange, no keepalive (not reported).
    Orderly,
    /// The same with `SO_KEEPALIVE` on the client: closed long before its first keepalive
    /// expiry, so counted in the kernel and not sent (the agent does not track it).
    Keepalive,
    /// The client closes with `SO_LINGER` 0: RST, both ends dropped. No keepalive: counted in
    /// the kernel, not sent to the agent (its default).
    Reset,
    /// The same with `SO_KEEPALIVE` on both ends: drops of keepalive connections that never
    /// had a keepalive expiry, counted in the kernel and not sent (reported with
    /// `--connections.keepalive-off-drops`).
    ResetKeepalive,
}

impl Churn {
    pub const ALL: [Churn; 4] = [
        Churn::Orderly,
        Churn::Keepalive,
        Churn::Reset,
        Churn::ResetKeepalive,
    ];

    /// The workloads whose closes are drops (RST).
    pub const RESETS: [Churn; 2] = [Churn::Reset, Churn::ResetKeepalive];

    pub fn name(self) -> &'static str {
        match self {
            Churn::Orderly => "orderly, no keepalive",
            Churn::Keepalive => "orderly, keepalive on",
            Churn::Reset => "RST close, no keepalive",
            Churn::ResetKeepalive => "RST close, keepalive on",
        }
    }

    /// What the close program does with these closes, by the agent's default.
    pub fn close_path(self) -> &'static str {
        match self {
            Churn::Orderly => "filtered",
            Churn::Reset => "counted, not sent",
            Churn::Keepalive | Churn::ResetKeepalive => "counted, not sent: never probed",
        }
    }

    /// Connects to `listener` (call it inside the listener's namespace), accepts, and closes
    /// both ends this way.
    pub fn connect_and_close(self, listener: &TcpListener) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        let client = TcpStream::connect(addr).context("connect")?;
        let (server, _) = listener.accept().context("accept")?;
        let keepalive = |socket: &TcpStream| {
            setsockopt_int(
                socket,
                libc::SOL_SOCKET,
                libc::SO_KEEPALIVE,
                1,
                "SO_KEEPALIVE",
            )
        };
        match self {
            // The server's side ends in TIME_WAIT, which does not hold the client's ephemeral
            // port.
            Churn::Orderly => drop(server),
            Churn::Keepalive => {
                keepalive(&client)?;
                drop(server);
            }
            Churn::Reset => set_linger_zero(&client)?,
            Churn::ResetKeepalive => {
                keepalive(&client)?;
                keepalive(&server)?;
                set_linger_zero(&client)?;
            }
        }
        drop(client);
        Ok(())
    }
}
