//! The userspace cost of a record: decode → track → classify → metrics, through the same
//! [`Pipeline`] `run` builds (attribution worker included), over records of the shape the
//! kernel programs write. For `cargo xtask bench`, which prints events/s per core of CPU.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use keepalive_ebpf::{
    AF_INET, CloseContext, DropReason, RecordKind, SocketRecord, record_flags, tcp_state,
};

use crate::{
    attribution::Attributor,
    export::metrics::PipelineMetrics,
    pipeline::Pipeline,
    record::{
        decoder::{self, Event, encode},
        ring_reader::BatchClock,
    },
    track::{
        classifier::ResetReasons,
        connection_table::{ConnectionTable, WalkedNamespaces},
    },
};

/// What one [`pipeline_throughput`] run measured.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub records: u64,
    /// CPU time of the whole process (drain and attribution worker) while handling them.
    pub cpu: Duration,
    pub wall: Duration,
}

impl Throughput {
    /// Records per second of CPU: what one core sustains.
    pub fn per_core_second(&self) -> f64 {
        self.records as f64 / self.cpu.as_secs_f64()
    }
}

/// Runs `connections` connections' records through a pipeline configured as `run` is by
/// default (aggregates counted by the kernel, a connection table of the default bounds): per
/// connection three probing expiries and a keepalive timeout, then `resets_per_connection`
/// closes of other connections by RST (the churn the dropped list sees). Records are built
/// before the clock starts.
pub fn pipeline_throughput(connections: u32, resets_per_connection: u32) -> Throughput {
    let records = records(connections, resets_per_connection);
    run(&records, NonZeroUsize::new(100_000).expect("non-zero"))
}

/// The synchronized bench's shape in userspace: `connections` connections in one namespace,
/// each probing once a second for `rounds` seconds against a peer that answers (every expiry
/// sends a probe and finds the last one answered), in the same order every round. Unlike
/// [`pipeline_throughput`], whose connections each live for four records, every record finds
/// its connection among `connections` live ones, as on a node with that many keepalive sockets.
pub fn probing_throughput(connections: u32, rounds: u32) -> Throughput {
    let mut records = Vec::with_capacity(connections as usize * rounds as usize);
    for _ in 0..rounds {
        for n in 0..connections {
            let sk = 0xffff_8880_0000_0000 + u64::from(n) * 0x1000;
            let mut rec = record(sk, n, RecordKind::KeepaliveTimer);
            // Every connection in one namespace, as the bench's children hold them.
            (rec.netns, rec.netns_cookie) = (4026531840, 1);
            rec.probes_out_before = 0;
            rec.probes_out_after = 1;
            rec.probes_sent = 1;
            records.push(encode(&rec));
        }
    }
    run(
        &records,
        NonZeroUsize::new((connections as usize).max(65_536)).expect("non-zero"),
    )
}

/// What one audit walk's check of the connection table costs ([`ConnectionTable::reconcile`]):
/// `connections` live connections, each having probed once, against a walk of `sockets`
/// sockets (every one of the table's connections, then others), begun after every entry's last
/// record so each is judged. The time of the call alone, under the table's lock as the audit
/// runs it, wall-clock (one thread, no I/O).
pub fn reconcile_cost(connections: u32, sockets: u32) -> Duration {
    let mut table = ConnectionTable::new(
        NonZeroUsize::new(connections.max(1) as usize).expect("non-zero"),
        10_000,
        Duration::from_secs(600),
    );
    let now = Instant::now();
    let mut walked = Vec::with_capacity(sockets.max(connections) as usize);
    for n in 0..sockets.max(connections) {
        let sk = 0xffff_8880_0000_0000 + u64::from(n) * 0x1000;
        let mut rec = record(sk, n, RecordKind::KeepaliveTimer);
        (rec.probes_out_before, rec.probes_out_after, rec.probes_sent) = (0, 1, 1);
        let Ok(Event::KeepaliveExpiry(expiry)) = decoder::decode(&encode(&rec)) else {
            unreachable!("an expiry record decodes as one");
        };
        if n < connections {
            table.on_expiry(&expiry, now);
        }
        walked.push((sk, expiry.endpoints));
    }
    // Built before the lock, as the audit does (see `Tracker::reconcile`).
    let covered = WalkedNamespaces::of(walked.iter().map(|(_, e)| e));
    let started = Instant::now();
    let gone = table.reconcile(walked.iter().map(|(sk, e)| (*sk, e)), &covered, started);
    let took = started.elapsed();
    assert_eq!(gone, 0, "every connection was walked");
    took
}

/// Feeds `records` to a pipeline configured as `run` is by default (aggregates counted by the
/// kernel), with a connection table tracking at most `max_tracked`, and times it.
fn run(records: &[Vec<u8>], max_tracked: NonZeroUsize) -> Throughput {
    let table = Arc::new(Mutex::new(ConnectionTable::new(
        max_tracked,
        10_000,
        Duration::from_secs(600),
    )));
    let metrics = PipelineMetrics::default().not_counting_records();
    let pipeline = Pipeline::with_kernel(
        250,
        ResetReasons {
            keepalive_timeout: Some(15),
        },
        table,
        metrics,
        Arc::new(Attributor::new(None, "/nonexistent".into())),
    );
    let (worker, jobs) = pipeline.take_worker();
    let worker = worker.spawn(jobs).expect("spawning the attribution worker");
    let cpu_before = process_cpu();
    let start = Instant::now();
    // One batch, as the reader hands a full ring over.
    let mut clock = BatchClock::new();
    for record in records {
        pipeline.handle_at(record, clock.now());
    }
    drop(pipeline);
    worker.join().expect("attribution worker panicked");
    Throughput {
        records: records.len() as u64,
        cpu: process_cpu().saturating_sub(cpu_before),
        wall: start.elapsed(),
    }
}

fn records(connections: u32, resets_per_connection: u32) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut port = 0u32;
    for n in 0..connections {
        let sk = 0xffff_8880_0000_0000 + u64::from(n) * 0x1000;
        for before in 0..3u8 {
            let mut rec = record(sk, n, RecordKind::KeepaliveTimer);
            rec.probes_out_before = before;
            rec.probes_out_after = before + 1;
            rec.probes_sent = 1;
            out.push(encode(&rec));
        }
        let mut close = record(sk, n, RecordKind::Close);
        close.context = CloseContext::KeepaliveTimer as u8;
        close.probes_out_before = 3;
        close.flags |= record_flags::RESET_SENT;
        close.reset_reason_sent = 15;
        close.sk_err = libc::ETIMEDOUT;
        close.drop_reason = 0;
        out.push(encode(&close));
        for _ in 0..resets_per_connection {
            port += 1;
            let mut reset = record(sk + 0x800, port, RecordKind::Close);
            reset.flags = record_flags::RESET_RECEIVED;
            reset.sk_err = libc::ECONNRESET;
            reset.drop_reason = DropReason::ResetReceived as u32;
            out.push(encode(&reset));
        }
    }
    out
}

fn record(sk: u64, n: u32, kind: RecordKind) -> SocketRecord {
    let mut rec = SocketRecord {
        sk,
        kind: kind as u8,
        family: AF_INET,
        netns: 4026531840 + n % 16,
        netns_cookie: u64::from(n % 16) + 1,
        local_port: 1024 + (n % 60000) as u16,
        remote_port: 8080,
        state: tcp_state::ESTABLISHED,
        keepalive_time: 250,
        keepalive_intvl: 250,
        keepalive_probes: 3,
        flags: record_flags::KEEPALIVE_ON,
        snd_wnd: 65535,
        cgroup_id: 1 + u64::from(n % 64),
        socket_ino: 100_000 + u64::from(n),
        ..SocketRecord::default()
    };
    rec.local_addr[..4].copy_from_slice(&[10, 0, (n >> 8) as u8, n as u8]);
    rec.remote_addr[..4].copy_from_slice(&[10, 1, 0, 1]);
    rec
}

/// User plus system CPU time of this process.
fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &raw mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}
