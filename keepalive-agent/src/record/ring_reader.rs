//! Drains the kernel's ring buffer: when the kernel wakes the agent (a CPU has submitted its
//! share of a quarter of the ring since it last did), and on a short timer otherwise; at
//! shutdown, what the ring still holds.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch, time::Instant};

/// The programs submit with `BPF_RB_NO_WAKEUP` between wakeups (see
/// [`crate::kernel::programs::wakeup_records`]), so a quiet
/// stretch's records wait at most this long: the latency added to a detection, against one
/// wakeup (an irq_work, and the agent's thread switch) per record under connection churn.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Hands each record's bytes to `handle` until `stop` turns true (or its sender is gone), then
/// gives the ring back for [`drain_remaining`]. Fails only if the ring's descriptor does.
pub(crate) async fn drain(
    events: RingBuf<MapData>,
    handle: &mut impl FnMut(&[u8]),
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<RingBuf<MapData>> {
    // SAFETY: the RingBuf owns its map descriptor and keeps it open, unchanged, for as long as
    // the AsyncFd owns the RingBuf.
    let mut events =
        unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
    loop {
        let stopped = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => true,
            readable = tokio::time::timeout(POLL_INTERVAL, events.readable_mut()) => {
                match readable {
                    Ok(guard) => {
                        let mut guard = guard?;
                        let ring = guard.get_inner_mut();
                        while let Some(record) = ring.next() {
                            handle(&record);
                        }
                        guard.clear_ready();
                    }
                    Err(_elapsed) => {
                        let ring = events.get_mut();
                        while let Some(record) = ring.next() {
                            handle(&record);
                        }
                    }
                }
                false
            }
        };
        if stopped {
            return Ok(events.into_inner());
        }
    }
}

/// What [`drain_remaining`] read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Remaining {
    pub records: u64,
    /// The deadline came first: records were left in the ring.
    pub cut_short: bool,
}

/// How long a program that was running when it was detached may still take to submit its
/// record: tracepoint unregistration does not wait for the probes already running, and a
/// program runs for microseconds.
const DETACH_SETTLE: Duration = Duration::from_millis(20);

/// Hands `handle` every record left in `ring`, once the programs are detached: nothing new
/// arrives, so this ends with the ring empty, unless `deadline` passes first.
pub(crate) async fn drain_remaining(
    ring: &mut RingBuf<MapData>,
    deadline: Instant,
    handle: &mut impl FnMut(&[u8]),
) -> Remaining {
    let mut remaining = Remaining::default();
    for pass in 0..2 {
        if pass == 1 {
            tokio::time::sleep(DETACH_SETTLE).await;
        }
        while let Some(record) = ring.next() {
            if Instant::now() >= deadline {
                remaining.cut_short = true;
                return remaining;
            }
            handle(&record);
            remaining.records += 1;
        }
    }
    remaining
}
