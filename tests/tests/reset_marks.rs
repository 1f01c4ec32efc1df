//! A reset a socket sends leaves a mark on its CPU (`RESET_CONTEXT`) for the close that follows
//! it there, which reads it to say a reset was sent and why. Some closes come before their reset
//! (a `SO_LINGER` 0 close moves the socket to `TCP_CLOSE`, then sends the reset): such a reset
//! must leave no mark, or the mark waits for the next socket given the freed one's address,
//! whose close would then say it sent a reset.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, ensure};
use aya::maps::{Map, PerCpuArray, PerCpuValues};
use keepalive_tests::{Netns, TestEnv, set_linger_zero};

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
    let ns = Netns::new("reset-mark")?;
    let listener = ns.listen(V4)?;
    let pair = ns.connect_pair(&listener)?;
    // The peer never sees the reset: a reset it received would leave its own mark, and its close
    // would consume it, whatever became of the client's.
    let _rule = ns.drop_resets_from_port(pair.client.local_addr()?.port())?;
    set_linger_zero(&pair.client)?;
    let cpu = pin_to_one_cpu()?;

    let mut marks: PerCpuArray<_, ResetContext> =
        PerCpuArray::try_from(Map::PerCpuArray(agent.bpf_map("RESET_CONTEXT")?))
            .context("RESET_CONTEXT is not the per-CPU array the test expects")?;
    let cpus = marks.get(&0, 0).context("reading RESET_CONTEXT")?.len();
    let sentinels =
        PerCpuValues::try_from(vec![[SENTINEL, 0, 0]; cpus]).context("RESET_CONTEXT's values")?;
    marks
        .set(0, sentinels, 0)
        .context("writing RESET_CONTEXT")?;

    let resets = ns.tcp_mib()?.get(OUT_RESETS);
    // close(2) runs tcp_close here, on the pinned CPU: with linger 0, tcp_disconnect moves the
    // socket to TCP_CLOSE and then sends the reset.
    drop(pair.client);
    let mark = marks.get(&0, 0).context("reading RESET_CONTEXT")?[cpu];
    ensure!(
        ns.tcp_mib()?.get(OUT_RESETS) > resets,
        "the close sent no reset: the test's premise broke"
    );
    ensure!(
        mark[0] == SENTINEL,
        "CPU {cpu}'s reset mark changed at a close whose reset came after it: socket {:#x}, \
         flags and reason {:#x} (expected it left alone)",
        mark[0],
        mark[1]
    );
    Ok(())
}

/// Pins the calling thread to the first CPU it may run on, and returns that CPU.
fn pin_to_one_cpu() -> anyhow::Result<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set, filled by the kernel below.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    ensure!(
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
    ensure!(
        ret == 0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(cpu)
}
