//! One keepalive configuration audit: every TCP socket of the host, in every network
//! namespace, from the kernel's own TCP hash tables ([`HashWalk`], the kernel side is
//! `keepalive-ebpf/src/audit.rs`). The walk does not depend on the agent's namespaces: from a pod
//! without host PID, without setns and without CAP_SYS_ADMIN it sees what it sees on the host.
//!
//! The established table comes first, then the listeners'. The program stops after a bounded
//! number of steps and this loop runs it again from where it stopped, draining its records in
//! between. The walk is lockless, like the kernel's own lookups: a socket that moves while the
//! walk passes may be seen twice (kept once, by `struct sock` address) or missed until the next
//! audit.

use std::collections::HashSet;

use keepalive_ebpf::{AuditCursor, audit_table};

use crate::{
    kernel::hash_walk::{HashWalk, RunError},
    record::decoder::{self, AuditedSocket, DecodeError, Event},
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum AuditError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("the kernel refused a read of its TCP hash tables (error {0}): audit skipped")]
    Table(i32),
    #[error("audit record: {0}")]
    Decode(#[source] DecodeError),
    #[error(
        "the walk of the {table} table made no progress at bucket {bucket} of {buckets}: audit \
         skipped (report this with the output of `keepalive-agent check`)"
    )]
    Stuck {
        table: &'static str,
        bucket: u32,
        buckets: u32,
    },
}

/// One walk of the host's TCP sockets.
#[derive(Debug, Default)]
pub(crate) struct HostWalk {
    /// Every full socket (not time-wait or request sockets), once.
    pub sockets: Vec<AuditedSocket>,
    /// Network namespaces with at least one socket.
    pub namespaces: usize,
    /// Sockets the kernel side could not read (freed while it read them).
    pub unreadable: u64,
    /// Program runs it took.
    pub runs: u64,
}

/// Walks both tables.
pub(crate) fn walk_host(walk: &mut HashWalk) -> Result<HostWalk, AuditError> {
    let mut host = HostWalk::default();
    let mut seen = HashSet::new();
    for table in [audit_table::ESTABLISHED, audit_table::LISTENING] {
        walk_table(walk, table, &mut host, &mut seen)?;
    }
    let mut namespaces: Vec<u32> = host.sockets.iter().map(|s| s.endpoints.netns).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    host.namespaces = namespaces.len();
    Ok(host)
}

fn table_name(table: u32) -> &'static str {
    if table == audit_table::ESTABLISHED {
        "established"
    } else {
        "listening"
    }
}

fn walk_table(
    walk: &mut HashWalk,
    table: u32,
    host: &mut HostWalk,
    seen: &mut HashSet<u64>,
) -> Result<(), AuditError> {
    let mut cursor = AuditCursor {
        table,
        ..AuditCursor::default()
    };
    loop {
        let before = (cursor.bucket, cursor.skip);
        let after = walk.run(cursor)?;
        host.runs += 1;
        drain(walk, host, seen)?;
        if after.error != 0 {
            return Err(AuditError::Table(after.error));
        }
        host.unreadable += u64::from(after.unreadable);
        if after.done != 0 {
            return Ok(());
        }
        // Every run visits at least one bucket or socket unless the record buffer was full,
        // and it was drained just now: the same place twice in a row means something is wrong.
        if (after.bucket, after.skip) == before && after.emitted == 0 {
            return Err(AuditError::Stuck {
                table: table_name(table),
                bucket: after.bucket,
                buckets: after.buckets,
            });
        }
        cursor = AuditCursor {
            table,
            bucket: after.bucket,
            skip: after.skip,
            ..AuditCursor::default()
        };
    }
}

fn drain(
    walk: &mut HashWalk,
    host: &mut HostWalk,
    seen: &mut HashSet<u64>,
) -> Result<(), AuditError> {
    while let Some(item) = walk.records.next() {
        let socket = audited(&item)?;
        if seen.insert(socket.sk) {
            host.sockets.push(socket);
        }
    }
    Ok(())
}

fn audited(bytes: &[u8]) -> Result<AuditedSocket, AuditError> {
    match decoder::decode(bytes) {
        Ok(Event::Audit(socket)) => Ok(socket),
        Ok(_) => Err(AuditError::Decode(DecodeError::Kind(0))),
        Err(err) => Err(AuditError::Decode(err)),
    }
}
