//! Drains the kernel's ring buffer: when the kernel wakes the agent (a quarter of the ring
//! unread), and on a short timer otherwise.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

/// The programs submit with `BPF_RB_NO_WAKEUP` below the wake-up fill level, so a quiet
/// stretch's records wait at most this long: the latency added to a detection, against one
/// wakeup (an irq_work, and the agent's thread switch) per record under connection churn.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Runs until the ring buffer's descriptor fails, handing each record's bytes to `handle`.
pub(crate) async fn drain(
    events: RingBuf<MapData>,
    mut handle: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map descriptor and keeps it open, unchanged, for as long as
    // the AsyncFd owns the RingBuf.
    let mut events =
        unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
    loop {
        match tokio::time::timeout(POLL_INTERVAL, events.readable_mut()).await {
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
    }
}
