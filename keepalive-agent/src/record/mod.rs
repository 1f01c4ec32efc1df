//! Records from the kernel programs: [`ring_reader`] drains the ring buffer, [`decoder`] turns
//! bytes into typed events.

pub(crate) mod decoder;
pub(crate) mod ring_reader;
