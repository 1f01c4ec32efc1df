//! The keepalive configuration audit: one walk of every TCP socket on the host through the
//! `iter/tcp` program, which writes one [`SocketRecord`] per full socket into the iterator's file.
//! An iterator only sees the namespace it was created in, so [`walk_namespaces`] creates one in
//! each network namespace [`crate::kernel::netns::all`] finds.

use std::io::Read as _;

use aya::{
    Ebpf,
    programs::{Iter, ProgramError, links::LinkError},
};
use keepalive_ebpf::{SocketRecord, names};

use crate::{
    kernel::netns,
    record::decoder::{self, AuditedSocket, DecodeError, Event},
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum AuditError {
    #[error("the kernel programs object has no {0}: agent built from mismatched sources")]
    Missing(&'static str),
    #[error("the audit program is not an iterator: {0}")]
    Program(#[source] ProgramError),
    #[error("starting an audit walk: {0}")]
    Attach(#[source] ProgramError),
    #[error("opening the audit iterator: {0}")]
    Open(#[source] LinkError),
    #[error("reading the audit iterator: {0}")]
    Read(#[source] std::io::Error),
    #[error("audit record: {0}")]
    Decode(#[source] DecodeError),
    #[error("entering network namespace {path} to audit it: {source}")]
    EnterNetns {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The iterator program, loaded at start-up by [`crate::kernel::programs::load_audit`].
fn program(ebpf: &mut Ebpf) -> Result<&mut Iter, AuditError> {
    ebpf.program_mut(names::AUDIT_PROGRAM)
        .ok_or(AuditError::Missing(names::AUDIT_PROGRAM))?
        .try_into()
        .map_err(AuditError::Program)
}

/// Walks every TCP socket of the calling thread's network namespace once.
pub(crate) fn walk(ebpf: &mut Ebpf) -> Result<Vec<AuditedSocket>, AuditError> {
    let iter = program(ebpf)?;
    let link_id = iter.attach().map_err(AuditError::Attach)?;
    let link = iter.take_link(link_id).map_err(AuditError::Attach)?;
    let mut file = link.into_file().map_err(AuditError::Open)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(AuditError::Read)?;
    bytes
        .chunks(SocketRecord::SIZE)
        .map(|chunk| match decoder::decode(chunk) {
            Ok(Event::Audit(socket)) => Ok(socket),
            Ok(_) => Err(AuditError::Decode(DecodeError::Kind(0))),
            Err(err) => Err(AuditError::Decode(err)),
        })
        .collect()
}

/// One walk of the network namespaces the caller wanted.
#[derive(Debug, Default)]
pub(crate) struct HostWalk {
    pub sockets: Vec<AuditedSocket>,
    /// Namespaces walked (including failed ones).
    pub namespaces: usize,
    /// One per namespace whose walk failed; the others' sockets are still in `sockets`.
    pub failures: Vec<AuditError>,
}

/// Walks every network namespace the host shows ([`netns::all`]) whose inode `wanted` accepts.
/// Each walk runs on a short-lived thread that enters the namespace, so no thread of the
/// caller changes namespace.
pub(crate) fn walk_namespaces(ebpf: &mut Ebpf, wanted: impl Fn(u64) -> bool) -> HostWalk {
    let mut host = HostWalk::default();
    for ns in netns::all().into_iter().filter(|ns| wanted(ns.inode)) {
        host.namespaces += 1;
        let walked = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    ns.enter().map_err(|source| AuditError::EnterNetns {
                        path: ns.path.clone(),
                        source,
                    })?;
                    walk(ebpf)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        match walked {
            Ok(sockets) => host.sockets.extend(sockets),
            Err(err) => host.failures.push(err),
        }
    }
    host
}
