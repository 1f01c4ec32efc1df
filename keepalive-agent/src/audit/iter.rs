//! The keepalive configuration audit: one walk of every TCP socket on the host through an
//! iterator program that writes one [`SocketRecord`] per full socket into the iterator's file.
//!
//! - `iter/task_file` (5.11+, [`AuditWalk::TaskFile`]): one iterator visits every process's
//!   files in every network namespace, so [`walk_host`] reads it once, with no setns and no
//!   privilege beyond loading it. A socket shared by several processes (inherited across fork,
//!   passed over a Unix socket) appears once per process: the lowest pid is kept.
//! - `iter/tcp` (the fallback, [`AuditWalk::IterTcp`]): an iterator only sees the namespace it was
//!   created in, so [`walk_namespaces`] creates one in each network namespace
//!   [`crate::kernel::netns::all`] finds, which needs CAP_SYS_ADMIN for setns.

use std::{collections::HashMap, io::Read as _, path::Path};

use aya::{
    Ebpf,
    programs::{Iter, ProgramError, links::LinkError},
};
use keepalive_ebpf::SocketRecord;

use crate::{
    kernel::{layout::AuditWalk, netns, programs::audit_program},
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
fn program(ebpf: &mut Ebpf, walk: AuditWalk) -> Result<&mut Iter, AuditError> {
    let name = audit_program(walk);
    ebpf.program_mut(name)
        .ok_or(AuditError::Missing(name))?
        .try_into()
        .map_err(AuditError::Program)
}

/// Reads one iterator to the end: with [`AuditWalk::IterTcp`], every TCP socket of the calling
/// thread's network namespace; with [`AuditWalk::TaskFile`], every TCP socket file of every
/// process of the caller's PID namespace (once per process holding it).
fn walk(ebpf: &mut Ebpf, walk: AuditWalk) -> Result<Vec<AuditedSocket>, AuditError> {
    let iter = program(ebpf, walk)?;
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

/// One audit of the host with the walk this kernel loaded, keeping the network namespaces whose
/// inode `wanted` accepts. `proc_root` (`--proc.root`) is where the fallback finds namespaces.
/// An error means nothing was walked (the task-file iterator failed); the fallback reports
/// each namespace it could not walk in [`HostWalk::failures`] instead.
pub(crate) fn walk_host(
    ebpf: &mut Ebpf,
    audit: AuditWalk,
    proc_root: &Path,
    wanted: impl Fn(u64) -> bool,
) -> Result<HostWalk, AuditError> {
    match audit {
        AuditWalk::TaskFile => {
            let sockets = once_per_socket(walk(ebpf, AuditWalk::TaskFile)?, |s| {
                wanted(u64::from(s.endpoints.netns))
            });
            let mut namespaces: Vec<u32> = sockets.iter().map(|s| s.endpoints.netns).collect();
            namespaces.sort_unstable();
            namespaces.dedup();
            Ok(HostWalk {
                sockets,
                namespaces: namespaces.len(),
                failures: Vec::new(),
            })
        }
        AuditWalk::IterTcp => Ok(walk_namespaces(ebpf, proc_root, wanted)),
    }
}

/// Each socket once (by `struct sock` address, valid for the duration of one walk): the record
/// of the lowest pid holding it, as attribution does for a `socket:[INO]` link found in several
/// processes. Keeps the walk's order otherwise.
fn once_per_socket(
    sockets: Vec<AuditedSocket>,
    wanted: impl Fn(&AuditedSocket) -> bool,
) -> Vec<AuditedSocket> {
    let pid = |s: &AuditedSocket| s.process.map_or(u32::MAX, |p| p.pid);
    let mut index: HashMap<u64, usize> = HashMap::with_capacity(sockets.len());
    let mut kept: Vec<AuditedSocket> = Vec::with_capacity(sockets.len());
    for socket in sockets.into_iter().filter(|s| wanted(s)) {
        match index.get(&socket.sk) {
            Some(&i) if pid(&socket) < pid(&kept[i]) => kept[i] = socket,
            Some(_) => {}
            None => {
                index.insert(socket.sk, kept.len());
                kept.push(socket);
            }
        }
    }
    kept
}

/// [`AuditWalk::IterTcp`]: every network namespace the host shows ([`netns::all`]) whose inode
/// `wanted` accepts. Each walk runs on a short-lived thread that enters the namespace, so no
/// thread of the caller changes namespace.
fn walk_namespaces(ebpf: &mut Ebpf, proc_root: &Path, wanted: impl Fn(u64) -> bool) -> HostWalk {
    let mut host = HostWalk::default();
    for ns in netns::all(proc_root)
        .into_iter()
        .filter(|ns| wanted(ns.inode))
    {
        host.namespaces += 1;
        let walked = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    ns.enter().map_err(|source| AuditError::EnterNetns {
                        path: ns.path.clone(),
                        source,
                    })?;
                    walk(ebpf, AuditWalk::IterTcp)
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

#[cfg(test)]
mod tests {
    use keepalive_ebpf::{RecordKind, SocketRecord};

    use super::*;
    use crate::record::decoder::decode_record;

    /// A task-file record of socket `sk` in namespace `netns` held by `pid`.
    fn held(sk: u64, netns: u32, pid: u32) -> AuditedSocket {
        let rec = SocketRecord {
            kind: RecordKind::Audit as u8,
            family: keepalive_ebpf::AF_INET,
            sk,
            netns,
            pid,
            comm: *b"app\0\0\0\0\0\0\0\0\0\0\0\0\0",
            ..SocketRecord::default()
        };
        match decode_record(&rec) {
            Ok(Event::Audit(socket)) => socket,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_socket_held_by_several_processes_is_kept_once_with_the_lowest_pid() {
        let walked = vec![
            held(1, 10, 300),
            held(2, 10, 300),
            held(1, 10, 200),
            held(1, 10, 250),
        ];
        let kept = once_per_socket(walked, |_| true);
        let pids: Vec<(u64, Option<u32>)> = kept
            .iter()
            .map(|s| (s.sk, s.process.map(|p| p.pid)))
            .collect();
        assert_eq!(pids, [(1, Some(200)), (2, Some(300))]);
    }

    #[test]
    fn only_wanted_namespaces_are_kept() {
        let walked = vec![held(1, 10, 1), held(2, 11, 1), held(3, 12, 1)];
        let kept = once_per_socket(walked, |s| s.endpoints.netns != 11);
        assert_eq!(kept.iter().map(|s| s.sk).collect::<Vec<_>>(), [1, 3]);
    }
}
