//! A reset a socket sends leaves a mark on its CPU (`RESET_CONTEXT`) for the close that follows
//! it there, which reads it to say a reset was sent and why. Some closes come before their reset
//! (a `SO_LINGER` 0 close moves the socket to `TCP_CLOSE`, then sends the reset): such a reset
//! must leave no mark, or the mark waits for the next socket given the freed one's address,
//! whose close would then say it sent a reset.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Map, PerCpuArray, PerCpuValues};
use keepalive_tests::{Netns, TestEnv, pin_to_one_cpu, set_linger_zero};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The programs' per-CPU `ResetContext` (keepalive-ebpf/src/reset.rs): the socket's address,
/// then its flags, reason and `packets_out`, 24 bytes in all.
type ResetContext = [u64; 3];
/// Written into every CPU's mark before the close: no socket has this address.
const SENTINEL: u64 = 1;
/// Tcp MIB: resets sent.
const OUT_RESETS: &str = "OutRsts";

#[test]
fn a_reset_sent_after_its_close_leaves_no_mark() -> anyhow::Result<()> {
    let test = "a_reset_sent_after_its_close_leaves_no_mark";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        eprintln!("{test}: kernel-only mode, nothing to check (it is about the agent's programs)");
        return Ok(());
    };
    let cpu = pin_to_one_cpu()?;
    let ns = Netns::new("reset-mark")?;
    let listener = ns.listen(V4)?;
    let mut marks: PerCpuArray<_, ResetContext> =
        PerCpuArray::try_from(Map::PerCpuArray(agent.bpf_map("RESET_CONTEXT")?))
            .context("RESET_CONTEXT is not the per-CPU array the test expects")?;
    let cpus = marks.get(&0, 0).context("reading RESET_CONTEXT")?.len();
    // The control: `ss -K` (run on this CPU: a child inherits the pinning) aborts a connection,
    // which sends its reset before the close (`tcp_abort`), so the programs on this CPU leave a
    // mark and the close consumes it. A sentinel left there would mean they never ran.
    let control = ns.connect_pair(&listener)?;
    let port = control.client.local_addr()?.port().to_string();
    write_sentinels(&mut marks, cpus)?;
    ns.ss_kill(&["sport", "=", &format!(":{port}")])?;
    let mark = marks.get(&0, 0).context("reading RESET_CONTEXT")?[cpu];
    ensure!(
        mark[0] == 0,
        "CPU {cpu}'s reset mark after an `ss -K` abort: socket {:#x} (expected the abort's \
         close to consume its reset's mark; {SENTINEL:#x} means no program ran there)",
        mark[0]
    );

    // Twice at most: a reset another process sends on this CPU meanwhile moves the mark too,
    // but not on both tries.
    let mut changed = Vec::new();
    for _ in 0..2 {
        let pair = ns.connect_pair(&listener)?;
        // The peer never sees the reset: a reset it received would leave its own mark, and its
        // close would consume it, whatever became of the client's.
        let _rule = ns.drop_resets_from_port(pair.client.local_addr()?.port())?;
        set_linger_zero(&pair.client)?;
        write_sentinels(&mut marks, cpus)?;
        let resets = ns.tcp_mib()?.get(OUT_RESETS);
        // close(2) runs tcp_close here, on the pinned CPU: with linger 0, tcp_disconnect moves
        // the socket to TCP_CLOSE and then sends the reset.
        drop(pair.client);
        let mark = marks.get(&0, 0).context("reading RESET_CONTEXT")?[cpu];
        ensure!(
            ns.tcp_mib()?.get(OUT_RESETS) > resets,
            "the close sent no reset: the test's premise broke"
        );
        if mark[0] == SENTINEL {
            return Ok(());
        }
        changed.push(format!(
            "socket {:#x}, flags {:#x}, reason {}",
            mark[0],
            mark[1] & 0xff,
            mark[1] >> 32
        ));
    }
    bail!(
        "CPU {cpu}'s reset mark changed at each of two closes whose reset came after them \
         (expected it left alone): {}",
        changed.join("; ")
    )
}

/// Writes [`SENTINEL`] into every CPU's mark.
fn write_sentinels(
    marks: &mut PerCpuArray<aya::maps::MapData, ResetContext>,
    cpus: usize,
) -> anyhow::Result<()> {
    let sentinels =
        PerCpuValues::try_from(vec![[SENTINEL, 0, 0]; cpus]).context("RESET_CONTEXT's values")?;
    marks.set(0, sentinels, 0).context("writing RESET_CONTEXT")
}
