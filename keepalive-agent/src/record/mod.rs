//! Records from the kernel programs: [`ring_reader`] drains the ring buffer, [`decoder`] turns
//! bytes into typed events, [`netns_counters`] reads the kernel's exact per-namespace counters.

pub(crate) mod decoder;
pub(crate) mod netns_counters;
pub(crate) mod ring_reader;
