//! Connection state, without I/O: the [`connection_table`] of live and dropped connections,
//! the [`classifier`] that names why a connection ended, and the [`tracker`] that applies one
//! decoded record to both.

pub(crate) mod classifier;
pub(crate) mod connection_table;
pub(crate) mod tracker;
