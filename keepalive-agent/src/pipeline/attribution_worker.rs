//! Attribution off the event path. Finding a socket's owner reads files (`/proc/*/fd`, the
//! cgroup tree); a slow `/proc` must not stall the ring-buffer drain, nor the scrapes waiting for
//! the connection table. So the drain only `try_send`s [`Job`]s into a bounded queue, and one
//! worker thread does the lookups and applies what they find when it arrives:
//!
//! - a connection that entered the table gets its owner ([`Tracker::set_workload`]);
//! - aggregate counts (`--aggregate-by` with workload labels) of a record whose cgroup was not
//!   cached yet are counted by the worker under the looked-up labels, so every record is counted
//!   once, under its own workload, only later;
//! - events of a connection with a job in the queue are sent by the worker after it, in order,
//!   with the owner filled in; a drop first completes what is known of its owner.
//!
//! A full queue is counted (`keepalive_agent_attribution_requests_dropped_total`) and logged at
//! most every [`FULL_WARNING_INTERVAL`]; the record is then handled with what is known: counts
//! under empty workload labels (the namespace's totals stay exact), events with the owner known
//! so far. A connection that entered and whose owner lookup was refused is asked again every
//! [`RETRY_PERIOD`] while the queue stays full ([`Requests::defer`], up to
//! [`DEFERRED_CAPACITY`] of them), else at its next expiry ([`Tracker::owner_refused`]): with
//! the default 2 h keepalive idle and a peer that answers, that is two hours later.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use log::warn;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::{
    attribution::{Attributor, Workload},
    export::{
        events::{ConnectionEvent, EventSender, WorkloadFields},
        labels::{AggregateBy, AggregateLabels},
        metrics::PipelineMetrics,
    },
    record::decoder::{Endpoints, SocketOwner},
    track::{classifier::DropReason, idle_kill::IdleKillHow, tracker::Tracker},
};

/// Jobs waiting for the worker before new ones are dropped. A job is a few hundred bytes; the
/// worker resolves a cached owner in microseconds, so only a stalled `/proc` fills this.
pub(crate) const QUEUE_CAPACITY: usize = 4096;

/// Owner lookups of entering connections a full queue refused, kept to ask again: 40 bytes each
/// ([`Deferred`]), 640 KiB when full, which with the queue covers 20 480 connections entering
/// at once. A refused lookup beyond it waits for its connection's next expiry.
pub(crate) const DEFERRED_CAPACITY: usize = 16_384;

/// How often the pipeline asks the deferred lookups again ([`Requests::resend_deferred`]).
pub(crate) const RETRY_PERIOD: Duration = Duration::from_secs(1);

/// How long the worker waits for more jobs before it parks on the queue: what a job may wait
/// beyond its lookup, while the queue (4096 jobs) holds far more than a tick's worth even at a
/// million records a second.
const BATCH_TICK: Duration = Duration::from_millis(1);

/// Shortest time between two "queue full" warnings.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Who owns a socket. [`Attributor`] reads `/proc` and the cgroup tree; tests substitute a slow
/// or counting one.
pub(crate) trait Resolve: Send + Sync + fmt::Debug {
    /// The cgroup side from the cache only, without touching the filesystem; `None` when the
    /// socket's cgroup was not looked up yet.
    fn cached_cgroup(&self, owner: &SocketOwner) -> Option<Workload>;
    /// The cgroup side (path, pod, container), looked up on a miss.
    fn cgroup(&self, owner: &SocketOwner) -> Workload;
    /// Everything, including the process holding the socket.
    fn everything(&self, owner: &SocketOwner) -> Workload;
}

impl Resolve for Attributor {
    fn cached_cgroup(&self, owner: &SocketOwner) -> Option<Workload> {
        Attributor::cached_cgroup(self, owner)
    }

    fn cgroup(&self, owner: &SocketOwner) -> Workload {
        self.attribute_cgroup(owner)
    }

    fn everything(&self, owner: &SocketOwner) -> Workload {
        self.attribute(owner)
    }
}

/// What one aggregate record adds once its labels are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Count {
    /// Nothing but the label set's series, created at 0.
    Seen,
    Probe,
    Drop(DropReason),
    /// A drop that was an idle kill: the drop, and the kill under its threshold's name.
    IdleKill {
        reason: DropReason,
        threshold: String,
        how: IdleKillHow,
    },
}

impl Count {
    /// Adds this count to `labels`' series (which [`PipelineMetrics::see`] created).
    pub(crate) fn apply(&self, metrics: &PipelineMetrics, labels: &AggregateLabels) {
        match self {
            Count::Seen => {}
            Count::Probe => metrics.count_probe(labels),
            Count::Drop(reason) => metrics.count_drop(labels, *reason),
            Count::IdleKill {
                reason,
                threshold,
                how,
            } => {
                metrics.count_drop(labels, *reason);
                metrics.count_idle_kill(labels, threshold, *how);
            }
        }
    }
}

/// One request from the drain to the worker.
#[derive(Debug)]
pub(crate) enum Job {
    /// A connection entered the table, or first has an unanswered probe: find its owner, with
    /// its process when `process` (a `/proc` read; the cgroup side is cached per cgroup).
    Enter {
        sk: u64,
        endpoints: Endpoints,
        owner: SocketOwner,
        process: bool,
    },
    /// An aggregate count whose workload labels were not in the cache.
    Count {
        endpoints: Endpoints,
        owner: SocketOwner,
        count: Count,
    },
    /// Events to send once the connection's owner is known. `dropped`: the connection is gone;
    /// if its process is still unknown, look once more (its last chance).
    Emit {
        sk: u64,
        endpoints: Endpoints,
        owner: SocketOwner,
        dropped: bool,
        /// A dropped connection whose process is worth a `/proc` walk (a keepalive drop);
        /// other drops only get their cgroup (cached), so RST churn costs no walk per close.
        process: bool,
        events: Vec<ConnectionEvent>,
    },
}

impl Job {
    /// The connection whose events must wait behind this job.
    fn socket(&self) -> Option<u64> {
        match self {
            Self::Enter { sk, .. } | Self::Emit { sk, .. } => Some(*sk),
            Self::Count { .. } => None,
        }
    }
}

/// Jobs queued per socket: while a connection has one, its events go through the queue too, so
/// the stream keeps each connection's order and carries the owner once known.
type InFlight = Arc<Mutex<HashMap<u64, usize>>>;

/// The drain's end of the queue: never waits.
#[derive(Debug)]
pub(crate) struct Requests {
    tx: mpsc::Sender<Job>,
    in_flight: InFlight,
    /// `Enter` jobs the full queue refused, oldest first ([`Self::defer`]).
    deferred: Mutex<VecDeque<Deferred>>,
    dropped: Counter,
    /// When the last "queue full" warning was logged, and how many were not logged since.
    warned: Mutex<(Option<Instant>, u64)>,
}

/// The worker's end: receives the jobs, needs everything a job touches.
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) tracker: Tracker,
    pub(crate) metrics: PipelineMetrics,
    pub(crate) aggregate_by: AggregateBy,
    pub(crate) events: Option<EventSender>,
    in_flight: InFlight,
}

/// A bounded queue: the pipeline's [`Requests`], and what [`Worker::new`] needs to drain it.
pub(crate) fn queue(
    capacity: usize,
    dropped: Counter,
) -> (Requests, mpsc::Receiver<Job>, InFlightHandle) {
    let (tx, rx) = mpsc::channel(capacity);
    let in_flight = InFlight::default();
    (
        Requests {
            tx,
            in_flight: Arc::clone(&in_flight),
            deferred: Mutex::new(VecDeque::new()),
            dropped,
            warned: Mutex::new((None, 0)),
        },
        rx,
        InFlightHandle(in_flight),
    )
}

/// An `Enter` job a full queue refused, as [`Requests::defer`] keeps it: the endpoints as a
/// fingerprint, checked against the table's when it is sent again.
#[derive(Debug)]
struct Deferred {
    sk: u64,
    endpoints: u64,
    owner: SocketOwner,
    process: bool,
}

impl Deferred {
    fn fingerprint(endpoints: &Endpoints) -> u64 {
        use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
        BuildHasherDefault::<DefaultHasher>::default().hash_one(endpoints)
    }
}

/// The per-socket job counts the worker decrements (opaque outside this module).
#[derive(Debug)]
pub(crate) struct InFlightHandle(InFlight);

impl Requests {
    /// Queues a job; gives it back when the queue is full (counted and logged).
    pub(crate) fn send(&self, job: Job) -> Result<(), Box<Job>> {
        let mut in_flight = self.in_flight.lock().expect("in-flight lock poisoned");
        self.try_send(&mut in_flight, job)
    }

    /// Queues `job` only if its connection already has jobs queued (its events must follow
    /// them); gives it back otherwise, or when the queue is full.
    pub(crate) fn send_if_waiting(&self, job: Job) -> Result<(), Box<Job>> {
        let mut in_flight = self.in_flight.lock().expect("in-flight lock poisoned");
        let waiting = job
            .socket()
            .is_some_and(|sk| in_flight.get(&sk).is_some_and(|&n| n > 0));
        if !waiting {
            return Err(Box::new(job));
        }
        self.try_send(&mut in_flight, job)
    }

    /// Under the in-flight lock, so the worker cannot finish a socket's last job between the
    /// check and the count.
    fn try_send(&self, in_flight: &mut HashMap<u64, usize>, job: Job) -> Result<(), Box<Job>> {
        self.queue(in_flight, job).inspect_err(|_| {
            self.dropped.inc();
            self.warn_full();
        })
    }

    /// [`Self::try_send`] without counting or logging a refusal.
    fn queue(&self, in_flight: &mut HashMap<u64, usize>, job: Job) -> Result<(), Box<Job>> {
        let sk = job.socket();
        match self.tx.try_send(job) {
            Ok(()) => {
                if let Some(sk) = sk {
                    *in_flight.entry(sk).or_default() += 1;
                }
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) => {
                Err(Box::new(job))
            }
        }
    }

    /// Keeps the `Enter` job of a connection the full queue refused, to send again with
    /// [`Self::resend_deferred`], its process lookup only `with_process`. False when
    /// [`DEFERRED_CAPACITY`] are waiting already, or the job is not an `Enter`.
    pub(crate) fn defer(&self, job: &Job, with_process: bool) -> bool {
        let Job::Enter {
            sk,
            endpoints,
            owner,
            process,
        } = job
        else {
            return false;
        };
        let mut deferred = self.deferred.lock().expect("deferred lock poisoned");
        if deferred.len() >= DEFERRED_CAPACITY {
            return false;
        }
        deferred.push_back(Deferred {
            sk: *sk,
            endpoints: Deferred::fingerprint(endpoints),
            owner: *owner,
            process: *process && with_process,
        });
        true
    }

    /// Sends the deferred lookups of connections the table still holds (`live` gives a live
    /// connection's endpoints), oldest first, until the queue is full again; those left wait
    /// for the next call. A refusal here is not counted again (each was counted once, when
    /// first refused). Returns how many were sent.
    pub(crate) fn resend_deferred(&self, live: impl Fn(u64) -> Option<Endpoints>) -> usize {
        // Taken out, so `live` (the table's lock) and the in-flight lock are never taken under
        // this one.
        let mut waiting =
            std::mem::take(&mut *self.deferred.lock().expect("deferred lock poisoned"));
        let mut sent = 0;
        while let Some(entry) = waiting.pop_front() {
            // Gone, or its socket now another connection's: that one asks for itself.
            let Some(endpoints) =
                live(entry.sk).filter(|e| Deferred::fingerprint(e) == entry.endpoints)
            else {
                continue;
            };
            let job = Job::Enter {
                sk: entry.sk,
                endpoints,
                owner: entry.owner,
                process: entry.process,
            };
            let mut in_flight = self.in_flight.lock().expect("in-flight lock poisoned");
            if self.queue(&mut in_flight, job).is_err() {
                waiting.push_front(entry);
                break;
            }
            sent += 1;
        }
        if !waiting.is_empty() {
            let mut deferred = self.deferred.lock().expect("deferred lock poisoned");
            // In front of any deferred meanwhile (none when, as in the pipeline, the same task
            // defers and resends): they are older.
            while let Some(job) = waiting.pop_back() {
                deferred.push_front(job);
            }
        }
        sent
    }

    fn warn_full(&self) {
        let now = Instant::now();
        let mut warned = self.warned.lock().expect("warning lock poisoned");
        let (last, suppressed) = &mut *warned;
        if last.is_some_and(|last| now.duration_since(last) < FULL_WARNING_INTERVAL) {
            *suppressed += 1;
            return;
        }
        warn!(
            "attribution queue full ({QUEUE_CAPACITY} jobs; is /proc or the cgroup tree slow?): \
             recording without the owner ({} more since the last warning)",
            *suppressed
        );
        *last = Some(now);
        *suppressed = 0;
    }
}

impl Worker {
    pub(crate) fn new(
        resolver: Arc<dyn Resolve>,
        tracker: Tracker,
        metrics: PipelineMetrics,
        aggregate_by: AggregateBy,
        events: Option<EventSender>,
        in_flight: InFlightHandle,
    ) -> Self {
        Self {
            resolver,
            tracker,
            metrics,
            aggregate_by,
            events,
            in_flight: in_flight.0,
        }
    }

    /// Runs the worker on its own thread until every [`Requests`] is dropped.
    pub(crate) fn spawn(
        self,
        mut jobs: mpsc::Receiver<Job>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("attribution".to_owned())
            .spawn(move || {
                while let Some(job) = jobs.blocking_recv() {
                    self.handle(job);
                    // A receiver parked on the queue costs each send a futex wake and a context
                    // switch: while jobs keep coming, take them a tick at a time instead of
                    // parking.
                    loop {
                        match jobs.try_recv() {
                            Ok(job) => self.handle(job),
                            Err(mpsc::error::TryRecvError::Empty) => {
                                std::thread::sleep(BATCH_TICK);
                                if jobs.is_empty() {
                                    break;
                                }
                            }
                            Err(mpsc::error::TryRecvError::Disconnected) => return,
                        }
                    }
                }
            })
    }

    /// Does one job and applies its result.
    pub(crate) fn handle(&self, job: Job) {
        let sk = job.socket();
        match job {
            Job::Enter {
                sk,
                endpoints,
                owner,
                process,
            } => {
                let workload = if process {
                    self.resolver.everything(&owner)
                } else {
                    self.resolver.cgroup(&owner)
                };
                self.tracker.set_workload(sk, &endpoints, workload, process);
            }
            Job::Count {
                endpoints,
                owner,
                count,
            } => {
                let labels = self
                    .aggregate_by
                    .labels(&endpoints, &self.resolver.cgroup(&owner));
                self.metrics.see(&labels);
                count.apply(&self.metrics, &labels);
            }
            Job::Emit {
                sk,
                endpoints,
                owner,
                dropped,
                process,
                events,
            } => {
                let mut workload =
                    self.tracker
                        .known_workload(sk, &endpoints)
                        .unwrap_or_else(|| Workload {
                            cgroup_id: owner.cgroup_id,
                            ..Workload::default()
                        });
                if dropped && process && workload.pid.is_none() {
                    let newer = self.resolver.everything(&owner);
                    workload = self.tracker.complete_workload(&endpoints, &workload, newer);
                } else if dropped && !process && workload.cgroup_path().is_none() {
                    let newer = self.resolver.cgroup(&owner);
                    workload = self.tracker.complete_workload(&endpoints, &workload, newer);
                }
                if let Some(sender) = &self.events {
                    for mut event in events {
                        event.workload = WorkloadFields::new(&workload, owner.socket_ino);
                        sender.send(event);
                    }
                }
            }
        }
        if let Some(sk) = sk {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock poisoned");
            if let Some(n) = in_flight.get_mut(&sk) {
                *n -= 1;
                if *n == 0 {
                    in_flight.remove(&sk);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn endpoints() -> Endpoints {
        Endpoints {
            netns: 1,
            netns_cookie: 0,
            local: SocketAddr::from(([127, 0, 0, 1], 40000)),
            remote: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }

    fn enter(sk: u64) -> Job {
        Job::Enter {
            sk,
            endpoints: endpoints(),
            owner: SocketOwner::default(),
            process: true,
        }
    }

    fn emit(sk: u64) -> Job {
        Job::Emit {
            sk,
            endpoints: endpoints(),
            owner: SocketOwner::default(),
            dropped: false,
            process: false,
            events: Vec::new(),
        }
    }

    #[test]
    fn events_follow_the_queue_only_while_their_connection_has_jobs_in_it() {
        let dropped = Counter::default();
        let (requests, mut jobs, in_flight) = queue(4, dropped.clone());
        let worker = Worker::new(
            Arc::new(Attributor::new(None, "/nonexistent".into())),
            Tracker::new(
                Arc::new(Mutex::new(
                    crate::track::connection_table::ConnectionTable::new(
                        std::num::NonZeroUsize::new(4).unwrap(),
                        4,
                        Duration::from_secs(60),
                    ),
                )),
                crate::track::classifier::ResetReasons::default(),
                250,
            ),
            PipelineMetrics::default(),
            AggregateBy::default(),
            None,
            in_flight,
        );
        // Nothing queued for socket 1: its events go straight out (given back), uncounted.
        assert!(requests.send_if_waiting(emit(1)).is_err());
        assert!(requests.send(enter(1)).is_ok());
        // Now they wait behind the lookup; another socket's do not.
        assert!(requests.send_if_waiting(emit(1)).is_ok());
        assert!(requests.send_if_waiting(emit(2)).is_err());
        assert_eq!(dropped.get(), 0);
        // Once the worker has done both, socket 1's events go straight out again.
        worker.handle(jobs.try_recv().unwrap());
        assert!(
            requests.send_if_waiting(emit(1)).is_ok(),
            "one job still queued"
        );
        worker.handle(jobs.try_recv().unwrap());
        worker.handle(jobs.try_recv().unwrap());
        assert!(requests.send_if_waiting(emit(1)).is_err());
        assert!(jobs.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_gives_the_job_back_and_counts_it() {
        let dropped = Counter::default();
        let (requests, mut jobs, _in_flight) = queue(1, dropped.clone());
        assert!(requests.send(enter(1)).is_ok());
        let refused = requests.send(enter(2)).expect_err("queue of one is full");
        assert!(matches!(*refused, Job::Enter { sk: 2, .. }));
        // Refused jobs leave nothing waiting: socket 2's events are not held back for it.
        assert!(requests.send_if_waiting(emit(2)).is_err());
        assert_eq!(dropped.get(), 1);
        assert!(matches!(jobs.try_recv(), Ok(Job::Enter { sk: 1, .. })));
    }
}
