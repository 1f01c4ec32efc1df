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

/// Records handed over with one reading of the clock.
const CLOCK_RECORDS: u32 = 256;

/// The time handed with each record of a batch: read at the batch's first record and then once
/// every [`CLOCK_RECORDS`], not per record, where the read (a vDSO `clock_gettime`, dearer in a
/// VM) was about 8 % of the drain's profile. So a record's time is at most that many records
/// old, well under a millisecond at the drain's speed; what the pipeline times with it
/// (detections, idle and retention deadlines) counts in seconds.
pub(crate) struct BatchClock {
    now: std::time::Instant,
    left: u32,
}

impl BatchClock {
    /// A new batch: its first record reads the clock.
    pub(crate) fn new() -> Self {
        Self {
            now: std::time::Instant::now(),
            left: 0,
        }
    }

    pub(crate) fn now(&mut self) -> std::time::Instant {
        if self.left == 0 {
            self.now = std::time::Instant::now();
            self.left = CLOCK_RECORDS;
        }
        self.left -= 1;
        self.now
    }
}

/// Hands `handle` every record `ring` holds now, as one batch (see [`BatchClock`]).
fn hand_over(ring: &mut RingBuf<MapData>, handle: &mut impl FnMut(&[u8], std::time::Instant)) {
    let mut clock = BatchClock::new();
    while let Some(record) = ring.next() {
        handle(&record, clock.now());
    }
}

/// Hands each record's bytes to `handle`, with the time it was read (see [`BatchClock`]), until
/// `stop` turns true (or its sender is gone), then gives the ring back for [`drain_remaining`].
/// Fails only if the ring's descriptor does.
pub(crate) async fn drain(
    events: RingBuf<MapData>,
    handle: &mut impl FnMut(&[u8], std::time::Instant),
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
                        hand_over(guard.get_inner_mut(), handle);
                        guard.clear_ready();
                    }
                    Err(_elapsed) => hand_over(events.get_mut(), handle),
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
    handle: &mut impl FnMut(&[u8], std::time::Instant),
) -> Remaining {
    let mut remaining = Remaining::default();
    for pass in 0..2 {
        if pass == 1 {
            tokio::time::sleep(DETACH_SETTLE).await;
        }
        let mut clock = BatchClock::new();
        while let Some(record) = ring.next() {
            if Instant::now() >= deadline {
                remaining.cut_short = true;
                return remaining;
            }
            handle(&record, clock.now());
            remaining.records += 1;
        }
    }
    remaining
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reads_the_clock_at_its_first_record_and_every_clock_records_after() {
        let mut clock = BatchClock::new();
        let made = clock.now;
        std::thread::sleep(Duration::from_millis(2));
        // Made before the pause, the batch still starts with a fresh reading.
        let first = clock.now();
        assert!(first.duration_since(made) >= Duration::from_millis(2));
        std::thread::sleep(Duration::from_millis(2));
        for _ in 1..CLOCK_RECORDS {
            assert_eq!(clock.now(), first);
        }
        let next = clock.now();
        assert!(next.duration_since(first) >= Duration::from_millis(2));
    }
}
