//! Drains the kernel's ring buffer as records arrive.

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

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
        let mut guard = events.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(record) = ring.next() {
            handle(&record);
        }
        guard.clear_ready();
    }
}
