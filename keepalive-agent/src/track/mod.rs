//! Connection state, without I/O: the [`connection_table`] of live and dropped connections,
//! the [`classifier`] that names why a connection ended, the [`tracker`] that applies one
//! decoded record to both, and which namespace an inode currently means ([`namespaces`]).

pub(crate) mod classifier;
pub(crate) mod connection_table;
pub(crate) mod namespaces;
pub(crate) mod tracker;
