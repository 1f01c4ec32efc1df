//! Connection state, without I/O: the [`connection_table`] of live and dropped connections,
//! the [`classifier`] that names why a connection ended, [`idle_kill`] for a drop a middlebox's
//! idle timeout explains, the [`tracker`] that applies one decoded record to them, and which
//! namespace an inode currently means ([`namespaces`]).

pub(crate) mod classifier;
pub(crate) mod connection_table;
pub(crate) mod idle_kill;
pub(crate) mod namespaces;
pub(crate) mod tracker;
