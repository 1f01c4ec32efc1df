//! The commands. Each opens a [`crate::kernel::Session`] and starts what it needs from the
//! rooms below; none of them is imported by anything else.

pub mod check;
pub(crate) mod flags;
pub mod run;
pub mod sockets;
pub mod watch;
