//! Types shared by the kernel programs and the agent. Everything that crosses the ring buffer or
//! is written into the programs' globals is defined here, once.
#![no_std]

/// Names the agent uses to find maps, programs and globals in the object.
pub mod names {
    pub const EVENTS_MAP: &str = "EVENTS";
    /// The audit's walk of the kernel's TCP hash tables (every namespace), run on demand.
    pub const AUDIT_PROGRAM: &str = "audit_hash_walk";
    /// Where a walk starts and where the program stopped ([`super::AuditCursor`]).
    pub const AUDIT_CURSOR_MAP: &str = "AUDIT_CURSOR";
    /// The audit's records, drained by the agent after every run of the walk.
    pub const AUDIT_RECORDS_MAP: &str = "AUDIT_RECORDS";
    pub const RESERVE_FAILURES_MAP: &str = "RESERVE_FAILURES";
    pub const OFFSETS_GLOBAL: &str = "OFFSETS";
    pub const KEEPALIVE_TIMER_FN_GLOBAL: &str = "KEEPALIVE_TIMER_FN";
    pub const WRITE_TIMER_FN_GLOBAL: &str = "WRITE_TIMER_FN";
    /// `SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT` (or `u32::MAX` where the kernel has none).
    pub const KEEPALIVE_RST_REASON_GLOBAL: &str = "KEEPALIVE_RST_REASON";
    /// [`super::KernelOffsets::snapshot_regions`]: the parts of a socket the snapshot copies.
    pub const SNAPSHOT_REGIONS_GLOBAL: &str = "SNAPSHOT_REGIONS";
    /// [`super::KernelOffsets::expiry_regions`]: the parts a keepalive expiry copies.
    pub const EXPIRY_REGIONS_GLOBAL: &str = "EXPIRY_REGIONS";
    /// Records a CPU submits without waking the agent before one wakes it (see `socket::emit`).
    pub const WAKEUP_RECORDS_GLOBAL: &str = "WAKEUP_RECORDS";
    /// 1: closes of connections without `SO_KEEPALIVE` are sent to the agent too.
    pub const REPORT_KEEPALIVE_OFF_GLOBAL: &str = "REPORT_KEEPALIVE_OFF";
    /// The smallest node-wide middlebox idle timeout in jiffies (0 = none; one `u32`, rewritten
    /// when the node's thresholds change): a drop that may be an idle kill
    /// ([`super::idle_kill_candidate`]) is sent to the agent even without keepalive.
    pub const IDLE_KILL_JIFFIES_MAP: &str = "IDLE_KILL_JIFFIES";
    /// Exact per-namespace counters ([`super::NetnsKey`] → [`super::NetnsCounters`]).
    pub const NETNS_COUNTERS_MAP: &str = "NETNS_COUNTERS";
    /// Namespaces' counters at fixed slots ([`super::NetnsCounterSlot`]; mmapped by the agent,
    /// which places them).
    pub const NETNS_SLOTS_MAP: &str = "NETNS_SLOTS";
    /// Per-CPU count of entries the programs inserted in [`NETNS_COUNTERS_MAP`]: what tells the
    /// agent there is a namespace to place, without walking the map.
    pub const NETNS_INSERTS_MAP: &str = "NETNS_INSERTS";
    /// Per-CPU count of namespaces that found [`NETNS_COUNTERS_MAP`] full.
    pub const NETNS_COUNTERS_FULL_MAP: &str = "NETNS_COUNTERS_FULL";
    /// Per-CPU counts of events the programs saw but could not count, by [`super::Uncounted`].
    pub const UNCOUNTED_MAP: &str = "UNCOUNTED";
    /// BTF id of `struct tcp_sock` in the kernel's BTF, for the `bpf_rdonly_cast` kfunc (see
    /// [`super::RDONLY_CAST_CALL`]); 0 where the programs that call it are not loaded.
    pub const TCP_SOCK_BTF_ID_GLOBAL: &str = "TCP_SOCK_BTF_ID";
    /// [`super::TrackedMarks`]: which connections the agent's table may hold (mmapped by the
    /// agent, which renews the marks of its connections every epoch).
    pub const TRACKED_MAP: &str = "TRACKED";
    /// The read of IPVS's TCP established timeout in the host's namespace, run on demand.
    pub const IPVS_PROGRAM: &str = "ipvs_tcp_timeout";
    /// Its question and answer ([`super::IpvsQuery`]).
    pub const IPVS_QUERY_MAP: &str = "IPVS_QUERY";
    /// Adds the probes of expiries no program ran for after the last one seen in a namespace
    /// on a CPU; run by the agent on each CPU.
    pub const COUNTER_SWEEP_PROGRAM: &str = "counter_sweep";
    /// What its runs did, per CPU, since the programs were loaded ([`super::sweep_totals`]).
    pub const COUNTER_SWEEP_TOTALS_MAP: &str = "COUNTER_SWEEP_TOTALS";
    /// The timer programs' per-CPU context ([`super::TimerContext`]); the agent does not read
    /// it, the tests and the bench do.
    pub const TIMER_CONTEXT_MAP: &str = "TIMER_CONTEXT";
}

/// Indices of [`names::COUNTER_SWEEP_TOTALS_MAP`], a per-CPU array of `u64` (raw tracepoint
/// programs cannot return a value to a test run through aya's macro, which returns 0).
pub mod sweep_totals {
    /// Probes the sweep added to their namespaces' totals.
    pub const PROBES: u32 = 0;
    /// Runs that interrupted a keepalive expiry of their CPU (between its entry and its exit's
    /// count) and read nothing: that CPU waits for the next sweep.
    pub const BUSY: u32 = 1;
    /// Runs the kernel made in the sweeping thread itself (it was on the CPU asked for), where
    /// a timer softirq could interrupt them: they read nothing.
    pub const IN_CALLER: u32 = 2;
    /// Runs that were asked only whether they run in the sweeping thread (the agent's check
    /// at load, [`SweepContext::check_only`]) and found that they do.
    pub const RECOGNISED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// The counter sweep's test-run context, as `u64` tracepoint arguments (the kernel copies only
/// the bytes passed, so every run passes all of them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepContext {
    /// The sweeping thread's id in its PID namespace (`gettid`).
    pub thread: u64,
    /// That PID namespace, as `bpf_get_ns_current_pid_tgid` takes it: the kernel's device
    /// number of nsfs (`MKDEV(major, minor)`, not `stat`'s encoding) and its inode number.
    pub pidns_dev: u64,
    pub pidns_ino: u64,
    /// Not 0: the run only counts in [`sweep_totals::RECOGNISED`] whether it was made in that
    /// thread, and sweeps nothing.
    pub check_only: u64,
}

impl SweepContext {
    /// Its arguments, in order.
    pub fn args(&self) -> [u64; 4] {
        [self.thread, self.pidns_dev, self.pidns_ino, self.check_only]
    }
}

/// Parts of the kernel programs a build can leave out, so `cargo xtask ablate` can measure what
/// each costs by running the agent built without it against the agent as built, alternately.
/// Chosen at build time by `KEEPALIVE_EBPF_ABLATE` (a comma-separated list of
/// [`ablation::PARTS`]): the agent's build script passes its environment to the programs'
/// build, and both read it with `option_env!`, so cargo rebuilds them when it changes. Empty in every other build; an agent
/// built with any part left out says so when it starts, since its figures are wrong.
pub mod ablation {
    /// What this build leaves out (empty: nothing).
    pub const ABLATED: &str = match option_env!("KEEPALIVE_EBPF_ABLATE") {
        Some(parts) => parts,
        None => "",
    };

    /// `ring-write`: no record reaches the ring buffer (the agent sees no event).
    /// `counters`: no namespace counter is looked up or added to (its totals stay 0).
    /// `counter-adds`: the namespace's counters are looked up (and created) as built, but
    /// nothing is added to them (its totals stay 0): against `counters`, what the lookup costs
    /// apart from the adds, which every CPU makes to the same lines of a namespace's value.
    /// `cgroup`: the socket's cgroup is not read (every record says cgroup 0).
    /// `short-records`: every keepalive expiry record is reserved in the ring at its first
    /// [`SHORT_RECORD_BYTES`], the fields before its addresses, which with the ring's 8-byte
    /// header fill one cache line, and only those are written (the agent discards them as
    /// malformed): what the bytes of a record cost, against what its write costs whatever its
    /// size. A close record is written whole either way.
    pub const PARTS: [&str; 5] = [
        "ring-write",
        "counters",
        "counter-adds",
        "cgroup",
        "short-records",
    ];

    /// What `short-records` keeps of an expiry record: its head
    /// ([`super::ExpiryRecord::HEAD_BYTES`]), shorter than any record, so it cuts every one.
    pub const SHORT_RECORD_BYTES: usize = 56;
    const _: () = assert!(
        SHORT_RECORD_BYTES < super::ExpiryRecord::IPV4_BYTES
            && super::ExpiryRecord::IPV4_BYTES < super::SocketRecord::SIZE
    );

    /// Whether this build leaves `part` out; a constant where `part` is one, so the programs'
    /// code for it is not compiled at all in a build that keeps it.
    pub const fn ablated(part: &str) -> bool {
        lists(ABLATED, part)
    }

    /// Whether the comma-separated `list` names `part` (exactly; no spaces).
    pub const fn lists(list: &str, part: &str) -> bool {
        let (list, part) = (list.as_bytes(), part.as_bytes());
        let mut start = 0;
        while start < list.len() {
            let mut end = start;
            while end < list.len() && list[end] != b',' {
                end += 1;
            }
            if end - start == part.len() {
                let mut i = 0;
                while i < part.len() && list[start + i] == part[i] {
                    i += 1;
                }
                if i == part.len() {
                    return true;
                }
            }
            start = end + 1;
        }
        false
    }
}

/// TCP states as `include/net/tcp_states.h` numbers them (kernel ABI, stable since 2.6).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;

    /// The name `ss` prints for a state number.
    pub fn name(state: u8) -> &'static str {
        match state {
            ESTABLISHED => "ESTABLISHED",
            SYN_SENT => "SYN_SENT",
            SYN_RECV => "SYN_RECV",
            FIN_WAIT1 => "FIN_WAIT1",
            FIN_WAIT2 => "FIN_WAIT2",
            TIME_WAIT => "TIME_WAIT",
            CLOSE => "CLOSE",
            CLOSE_WAIT => "CLOSE_WAIT",
            LAST_ACK => "LAST_ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => "UNKNOWN",
        }
    }
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// What the programs read at a kernel field's offset, so the agent can refuse a kernel whose
/// field changed type instead of feeding the programs a wrong offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// An integer or enum of exactly this many bytes.
    Int(usize),
    /// Any type of exactly this many bytes (e.g. `struct in6_addr`).
    Bytes(usize),
    /// A pointer (8 bytes: eBPF is 64-bit, and so are the kernels the agent supports).
    Pointer,
    /// A struct with this name.
    Struct(&'static str),
    /// Not one BTF member: the agent computes it (the field's `source` says from what).
    Computed,
}

/// One entry of [`KernelOffsets::FIELDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelField {
    /// The [`KernelOffsets`] field it fills.
    pub name: &'static str,
    /// The BTF dotted path (root struct, then members), e.g. `sock.__sk_common.skc_daddr`; for a
    /// [`FieldKind::Computed`] field, what it is computed from.
    pub source: &'static str,
    pub kind: FieldKind,
}

/// Declares the kernel fields the programs read, once: the `#[repr(C)]` offsets struct, its
/// descriptor list [`KernelOffsets::FIELDS`] and [`KernelOffsets::fields_mut`] all come from it,
/// so the agent's BTF resolution and its test kernel cannot miss a field.
macro_rules! kernel_offsets {
    ($(
        $(#[$doc:meta])*
        $name:ident: $source:literal, $kind:ident $(($arg:expr))?;
    )*) => {
        /// Byte offsets into kernel structures, resolved by the agent from the running kernel's
        /// BTF and written into the programs' read-only data before load. Offsets are from the
        /// start of `struct sock` (which begins `struct inet_connection_sock` and
        /// `struct tcp_sock`) unless the field name says otherwise.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct KernelOffsets {
            $( $(#[$doc])* pub $name: u32, )*
        }

        impl KernelOffsets {
            pub const FIELD_COUNT: usize = [$(stringify!($name)),*].len();

            /// Every field, in declaration order, with where the agent finds it in BTF.
            pub const FIELDS: [KernelField; Self::FIELD_COUNT] = [$(
                KernelField {
                    name: stringify!($name),
                    source: $source,
                    kind: FieldKind::$kind $(($arg))?,
                },
            )*];

            /// The fields in the order of [`Self::FIELDS`], to fill by iterating that list.
            pub fn fields_mut(&mut self) -> [&mut u32; Self::FIELD_COUNT] {
                [$(&mut self.$name),*]
            }
        }
    };
}

kernel_offsets! {
    /// `timer_list.function`, from the start of the timer. Read directly through the BTF-typed
    /// `timer_expire_entry` argument to filter every timer in the system cheaply.
    timer_function: "timer_list.function", Pointer;
    /// The `timer_list` whose callback is `tcp_keepalive_timer`: `icsk_keepalive_timer` where
    /// the kernel has it (6.19+ and the stable backports), else `sk_timer`.
    keepalive_timer: "inet_connection_sock.icsk_keepalive_timer, else sock.sk_timer", Computed;
    /// The `timer_list` whose callback is `tcp_write_timer`: `icsk_retransmit_timer` where the
    /// kernel has it (up to 6.18 and the stable backports), else `sk_timer` (6.19+).
    write_timer: "inet_connection_sock.icsk_retransmit_timer, else sock.sk_timer", Computed;
    skc_daddr: "sock.__sk_common.skc_daddr", Int(4);
    skc_rcv_saddr: "sock.__sk_common.skc_rcv_saddr", Int(4);
    skc_dport: "sock.__sk_common.skc_dport", Int(2);
    skc_family: "sock.__sk_common.skc_family", Int(2);
    skc_state: "sock.__sk_common.skc_state", Int(1);
    /// `unsigned long` holding `enum sock_flags` bits (SOCK_DEAD, SOCK_KEEPOPEN).
    skc_flags: "sock.__sk_common.skc_flags", Int(8);
    /// `possible_net_t skc_net`: resolving its `net` member checks that the pointer is really
    /// there (it is an empty struct without CONFIG_NET_NS).
    skc_net: "sock.__sk_common.skc_net.net", Pointer;
    skc_v6_daddr: "sock.__sk_common.skc_v6_daddr", Bytes(16);
    skc_v6_rcv_saddr: "sock.__sk_common.skc_v6_rcv_saddr", Bytes(16);
    /// `inet_sock.inet_sport` (network order). Not `skc_num`: `inet_put_port` zeroes that before
    /// the `TCP_CLOSE` tracepoint fires (`inet_sk_state_store` runs after the unhash).
    inet_sport: "inet_sock.inet_sport", Int(2);
    /// `sock_common.skc_num`, the local port in host order: with `skc_daddr` and `skc_dport`
    /// in the first 16 bytes of the socket, so a keepalive expiry's exit checks the
    /// connection with one read (it falls back to `inet_sport` when `skc_num` is 0).
    skc_num: "sock.__sk_common.skc_num", Int(2);
    sk_protocol: "sock.sk_protocol", Int(2);
    sk_err: "sock.sk_err", Int(4);
    sk_err_soft: "sock.sk_err_soft", Int(4);
    icsk_probes_out: "inet_connection_sock.icsk_probes_out", Int(1);
    /// `icsk_pending`: which `ICSK_TIME_*` event the write timer is due for.
    icsk_pending: "inet_connection_sock.icsk_pending", Int(1);
    icsk_user_timeout: "inet_connection_sock.icsk_user_timeout", Int(4);
    icsk_ack_lrcvtime: "inet_connection_sock.icsk_ack.lrcvtime", Int(4);
    tcp_keepalive_time: "tcp_sock.keepalive_time", Int(4);
    tcp_keepalive_intvl: "tcp_sock.keepalive_intvl", Int(4);
    tcp_keepalive_probes: "tcp_sock.keepalive_probes", Int(1);
    tcp_rcv_tstamp: "tcp_sock.rcv_tstamp", Int(4);
    /// `tcp_sock.lsndtime` (jiffies, `tcp_jiffies32`): when the socket last sent new data. After
    /// a silence, the send a middlebox that forgot the flow kills (issue 13).
    tcp_lsndtime: "tcp_sock.lsndtime", Int(4);
    /// `tcp_sock.retrans_stamp`: when the oldest unacknowledged segment was first sent,
    /// `CLOCK_MONOTONIC` milliseconds (low 32 bits; microseconds with the 6.7+ `tcp_usec_ts`
    /// option), 0 when nothing is being retransmitted.
    tcp_retrans_stamp: "tcp_sock.retrans_stamp", Int(4);
    /// `inet_connection_sock.icsk_probes_tstamp` (5.11, and 5.10's stable updates; else 0):
    /// when the probe timer first ran for data waiting unsent (jiffies), 0 when it has not. A
    /// send this host's firewall refused never leaves, and each of the timer's attempts moves
    /// `lsndtime`: this dates the first, one probe timeout after the send.
    icsk_probes_tstamp: "inet_connection_sock.icsk_probes_tstamp where present, else 0", Computed;
    tcp_packets_out: "tcp_sock.packets_out", Int(4);
    tcp_snd_wnd: "tcp_sock.snd_wnd", Int(4);
    /// `net.mib.net_statistics`: the namespace's per-CPU `struct linux_mib`, whose
    /// `TCPKeepAlive` (`mib_tcp_keepalive`) `tcp_xmit_probe_skb` counts for every keepalive
    /// probe, on the CPU running the timer. Its growth on this CPU across an expiry is the
    /// probes that expiry sent, exactly what the namespace's `TcpExt TCPKeepAlive` counts.
    net_mib_statistics: "net.mib.net_statistics", Pointer;
    /// `LINUX_MIB_TCPKEEPALIVE` (an anonymous enum) times 8: the byte offset of `TCPKeepAlive`
    /// in `linux_mib.mibs`, an array of `unsigned long`.
    mib_tcp_keepalive: "linux_mib.mibs + LINUX_MIB_TCPKEEPALIVE * sizeof(unsigned long)", Computed;
    /// `bpf_array.pptrs`: a per-CPU array map's element pointers as allocated, before
    /// `this_cpu_ptr`. The timer's entry finds this CPU's per-CPU offset (which it adds to
    /// `net_statistics`) as the distance from its own map's element 0 to where that element
    /// is on this CPU.
    bpf_array_pptrs: "bpf_array.pptrs", Computed;
    /// `net.ns.inum`, from the start of `struct net`.
    net_ns_inum: "net.ns.inum", Int(4);
    /// `net.net_cookie`: unlike the inode, never reused by a later namespace. A `u64` from 5.12,
    /// an `atomic64_t` generated on first use before (so 0 on 5.10 until something asked).
    net_cookie: "net.net_cookie", Bytes(8);
    /// 1 where `net_cookie` is that lazy `atomic64_t` (before 5.12): the programs then identify
    /// the namespace by `net.hash_mix` instead, a random `u32` drawn when it was created.
    net_cookie_lazy: "net.net_cookie is an atomic64_t", Computed;
    net_hash_mix: "net.hash_mix", Int(4);
    /// `net.list`, its place on `net_namespace_list`: `list.prev` (8 bytes in) is poisoned when
    /// the namespace leaves the list, before it is freed. The counter sweep checks it.
    net_list: "net.list", Bytes(16);
    /// `net.ipv4.sysctl_tcp_keepalive_{time,intvl,probes}`, from the start of `struct net`: they
    /// apply when the socket's own values are 0, and a new namespace starts from the defaults,
    /// not from the host's values.
    net_keepalive_time: "net.ipv4.sysctl_tcp_keepalive_time", Int(4);
    net_keepalive_intvl: "net.ipv4.sysctl_tcp_keepalive_intvl", Int(4);
    net_keepalive_probes: "net.ipv4.sysctl_tcp_keepalive_probes", Int(1);
    /// `net.ct.nf_ct_proto.tcp.timeouts[TCP_CONNTRACK_ESTABLISHED]`, from the start of
    /// `struct net`: the namespace's `nf_conntrack_tcp_timeout_established` in jiffies (0 until
    /// the conntrack module set it up), or 0 on a kernel without conntrack. The conntrack
    /// middlebox's idle timeout (issue 13), read where the namespace keeps it.
    net_ct_tcp_established: "net.ct.nf_ct_proto.tcp.timeouts[TCP_CONNTRACK_ESTABLISHED], else 0", Computed;
    /// `net.nf.defrag_ipv4_users`/`defrag_ipv6_users` (a `bool` `defrag_ipv4`/`defrag_ipv6`
    /// before 5.13, see `net_defrag_is_bool`), else 0: non-zero once conntrack is attached to
    /// the namespace for that family (`nf_ct_netns_get` enables defragmentation), which is
    /// when its timeout applies to the namespace's connections.
    net_defrag_ipv4: "net.nf.defrag_ipv4_users, else net.nf.defrag_ipv4, else 0", Computed;
    net_defrag_ipv6: "net.nf.defrag_ipv6_users, else net.nf.defrag_ipv6, else 0", Computed;
    net_defrag_is_bool: "net.nf.defrag_ipv4 is a bool", Computed;
    /// `net.nf.hooks_ipv4[NF_INET_LOCAL_IN]`/`hooks_ipv6[...]`, from the start of
    /// `struct net`, with `nf_hook_entries.hooks`, `sizeof(struct nf_hook_entry)` and
    /// `nf_hook_ops.priority` (all 0 where the types do not say): conntrack is attached for a
    /// family when the last (highest-priority) hook there has its confirm priority, `INT_MAX`.
    /// Defragmentation alone is also TPROXY's and `xt_socket`'s, without conntrack.
    net_hooks_ipv4_local_in: "net.nf.hooks_ipv4[NF_INET_LOCAL_IN], else 0", Computed;
    net_hooks_ipv6_local_in: "net.nf.hooks_ipv6[NF_INET_LOCAL_IN], else 0", Computed;
    nf_hook_entries_hooks: "nf_hook_entries.hooks, else 0", Computed;
    nf_hook_entry_size: "sizeof(struct nf_hook_entry), else 0", Computed;
    nf_hook_ops_priority: "nf_hook_ops.priority, else 0", Computed;
    /// Bit numbers of `SOCK_DEAD` and `SOCK_KEEPOPEN` in the 64-bit `skc_flags`.
    sock_flag_dead: "enum sock_flags SOCK_DEAD", Computed;
    sock_flag_keepopen: "enum sock_flags SOCK_KEEPOPEN", Computed;
    /// `sock.sk_cgrp_data.cgroup` → `cgroup.kn` → `kernfs_node.id`: the cgroup v2 id of the
    /// socket's owner, set when the socket was created (so it is right in softirq too).
    sk_cgroup: "sock.sk_cgrp_data.cgroup", Pointer;
    cgroup_kn: "cgroup.kn", Pointer;
    kernfs_node_id: "kernfs_node.id", Int(8);
    /// `sock.sk_socket`, and from the `struct socket` to its inode number
    /// (`socket_alloc.vfs_inode.i_ino`): what `/proc/PID/fd/N -> socket:[INO]` shows.
    sk_socket: "sock.sk_socket", Pointer;
    socket_ino: "socket_alloc.vfs_inode + inode.i_ino", Computed;
    /// `sock.sk_ino` where the kernel keeps the inode number in the socket itself (6.18+,
    /// "net: lockless sock_i_ino()"; 0 for an orphan or a socket not yet accepted, as through
    /// `sk_socket`), else 0: the programs then follow `sk_socket`, a cache miss on another
    /// object at every expiry.
    sk_ino: "sock.sk_ino where present, else 0", Computed;
    /// `task_struct.nsproxy` → `nsproxy.net_ns` → `net.ipv4.tcp_death_row.hashinfo`: the TCP
    /// hash tables (`tcp_hashinfo`), found from the task running the audit (the agent), so
    /// neither kallsyms data symbols nor a socket are needed.
    task_nsproxy: "task_struct.nsproxy", Pointer;
    nsproxy_net_ns: "nsproxy.net_ns", Pointer;
    net_tcp_hashinfo: "net.ipv4.tcp_death_row.hashinfo", Pointer;
    /// `sock_common.skc_nulls_node`: the link of both hash tables the audit walks
    /// (`hlist_nulls_node.next` is its first member; an odd value ends a chain).
    skc_nulls_node: "sock.__sk_common.skc_nulls_node", Struct("hlist_nulls_node");
    /// From the start of `struct inet_hashinfo`: the established table, `ehash_mask + 1` buckets of
    /// `inet_ehash_bucket` (one `hlist_nulls_head` each).
    hashinfo_ehash: "inet_hashinfo.ehash", Pointer;
    hashinfo_ehash_mask: "inet_hashinfo.ehash_mask", Int(4);
    ehash_bucket_size: "size of struct inet_ehash_bucket", Computed;
    /// From the start of `struct inet_hashinfo`, where the listeners are: up to 5.18 the array
    /// `listening_hash` inside it (its length in `listen_inline_buckets`), after that the
    /// pointer `lhash2` to `lhash2_mask + 1` buckets (`listen_inline_buckets` is 0).
    hashinfo_listen: "inet_hashinfo.listening_hash, else inet_hashinfo.lhash2", Computed;
    listen_inline_buckets: "length of inet_hashinfo.listening_hash, else 0", Computed;
    hashinfo_lhash2_mask: "inet_hashinfo.lhash2_mask", Int(4);
    listen_bucket_size: "size of struct inet_listen_hashbucket", Computed;
    listen_bucket_head: "inet_listen_hashbucket.nulls_head", Struct("hlist_nulls_head");
}

impl KernelOffsets {
    /// The `struct sock`-relative fields the socket snapshot takes from its one copy of the
    /// socket, with their sizes: a keepalive expiry's ([`Self::expiry_fields`]), then what only
    /// the close's and the audit's records carry.
    pub fn snapshot_fields(&self) -> [(u32, u32); 24] {
        let mut fields = [(0, 0); 24];
        let (expiry, rest) = fields.split_at_mut(16);
        expiry.copy_from_slice(&self.expiry_fields());
        rest.copy_from_slice(&[
            (self.sk_err, 4),
            (self.sk_err_soft, 4),
            (self.icsk_ack_lrcvtime, 4),
            (self.tcp_rcv_tstamp, 4),
            (self.tcp_lsndtime, 4),
            (self.tcp_retrans_stamp, 4),
            // Absent (0), it lies inside `skc_daddr`'s span: nothing more is copied.
            (self.icsk_probes_tstamp, 4),
            (self.tcp_snd_wnd, 4),
        ]);
        fields
    }

    /// The fields a keepalive expiry's record needs ([`ExpiryRecord`]): [`Self::snapshot_fields`]
    /// without the close's and the audit's timestamps, errors and window, which lie in other
    /// parts of the socket and would cost the expiry more reads. Its probes are counted from
    /// the namespace, not the socket (`net_mib_statistics`).
    pub fn expiry_fields(&self) -> [(u32, u32); 16] {
        [
            (self.skc_daddr, 4),
            (self.skc_rcv_saddr, 4),
            (self.skc_dport, 2),
            (self.skc_family, 2),
            (self.skc_state, 1),
            (self.skc_flags, 8),
            (self.skc_net, 8),
            (self.skc_v6_daddr, 16),
            (self.skc_v6_rcv_saddr, 16),
            (self.inet_sport, 2),
            (self.icsk_probes_out, 1),
            (self.icsk_user_timeout, 4),
            (self.tcp_keepalive_time, 4),
            (self.tcp_keepalive_intvl, 4),
            (self.tcp_keepalive_probes, 1),
            (self.tcp_packets_out, 4),
        ]
    }

    /// The parts of the socket the snapshot copies, one `bpf_probe_read_kernel` each (see
    /// [`Self::regions_of`]).
    pub fn snapshot_regions(&self) -> [SnapshotRegion; SNAPSHOT_REGIONS] {
        self.regions_of(&self.snapshot_fields())
    }

    /// The parts a keepalive expiry copies: [`Self::expiry_fields`]'s regions.
    pub fn expiry_regions(&self) -> [SnapshotRegion; SNAPSHOT_REGIONS] {
        self.regions_of(&self.expiry_fields())
    }

    /// `fields` (and the two pointers every snapshot follows, `sk_cgroup` and `sk_socket`, and
    /// `sk_ino`) sorted and merged where less than [`REGION_GAP_BYTES`] apart, then the closest
    /// neighbours merged until at most [`SNAPSHOT_REGIONS`] remain. Unused entries are 0.
    /// Each copy lands at its offset in the per-CPU buffer, so fields load from their own
    /// offsets.
    fn regions_of(&self, fields: &[(u32, u32)]) -> [SnapshotRegion; SNAPSHOT_REGIONS] {
        const MAX_SPANS: usize = 30;
        // The three pointers take the last slots; no field may be left out.
        assert!(
            fields.len() <= MAX_SPANS - 3,
            "more snapshot fields than spans"
        );
        let mut spans = [(0u32, 0u32); MAX_SPANS];
        let mut used = 0;
        for &(offset, size) in fields {
            spans[used] = (offset, offset + size);
            used += 1;
        }
        spans[used] = (self.sk_cgroup, self.sk_cgroup + 8);
        spans[used + 1] = (self.sk_socket, self.sk_socket + 8);
        // Without `sk_ino`, a repeat of `sk_socket`, merged away below.
        spans[used + 2] = match self.sk_ino {
            0 => spans[used + 1],
            ino => (ino, ino + 8),
        };
        let spans = &mut spans[..used + 3];
        // Insertion sort: no_std, 30 entries.
        for i in 1..spans.len() {
            let mut j = i;
            while j > 0 && spans[j - 1].0 > spans[j].0 {
                spans.swap(j - 1, j);
                j -= 1;
            }
        }
        // Merge what overlaps or lies closer than REGION_GAP_BYTES...
        let mut merged = [(0u32, 0u32); MAX_SPANS];
        let mut count = 0;
        for &(start, end) in spans.iter() {
            if count > 0 && start <= merged[count - 1].1 + REGION_GAP_BYTES {
                if end > merged[count - 1].1 {
                    merged[count - 1].1 = end;
                }
            } else {
                merged[count] = (start, end);
                count += 1;
            }
        }
        // ...then the closest neighbours until SNAPSHOT_REGIONS remain.
        while count > SNAPSHOT_REGIONS {
            let mut closest = 0;
            for i in 1..count - 1 {
                if merged[i + 1].0 - merged[i].1 < merged[closest + 1].0 - merged[closest].1 {
                    closest = i;
                }
            }
            merged[closest].1 = merged[closest + 1].1;
            for i in closest + 1..count - 1 {
                merged[i] = merged[i + 1];
            }
            count -= 1;
        }
        let mut regions = [SnapshotRegion::default(); SNAPSHOT_REGIONS];
        for (region, &(start, end)) in regions.iter_mut().zip(&merged[..count]) {
            *region = SnapshotRegion {
                start,
                len: end - start,
            };
        }
        regions
    }

    /// Bytes from the start of the socket that hold every [`Self::snapshot_fields`] field
    /// (and the two pointers the snapshot follows, `sk_cgroup` and `sk_socket`, and `sk_ino`):
    /// the size of the copy the snapshot's regions land in.
    pub fn snapshot_bytes(&self) -> u32 {
        let mut end = 0;
        for (offset, size) in self.snapshot_fields() {
            if offset + size > end {
                end = offset + size;
            }
        }
        for pointer in [self.sk_cgroup, self.sk_socket, self.sk_ino] {
            if pointer + 8 > end {
                end = pointer + 8;
            }
        }
        end
    }
}

/// One part of the socket the snapshot copies ([`KernelOffsets::snapshot_regions`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotRegion {
    pub start: u32,
    pub len: u32,
}

/// At most this many `bpf_probe_read_kernel` calls per snapshot.
/// The `imm` of the helper call the programs compile for the kfunc `bpf_rdonly_cast` (6.2+):
/// Rust eBPF gets no kfunc relocation from aya 0.14, so the programs call this number, which no
/// kernel has as a helper, and the agent rewrites each such call into a kfunc call with the
/// kernel's BTF id of `bpf_rdonly_cast` before load. Only the `_typed` timer programs contain
/// it, and they are loaded only where the kernel has the kfunc.
pub const RDONLY_CAST_CALL: i32 = 0x6b66_6e63;

pub const SNAPSHOT_REGIONS: usize = 8;
/// Fields closer than this are copied in one read: a helper call costs more than copying that
/// many bytes.
pub const REGION_GAP_BYTES: u32 = 64;

/// Size of the kernel programs' per-CPU copy of a socket: larger than `struct tcp_sock` on
/// every kernel the agent supports (2.2–2.4 KiB); a kernel whose fields lie beyond it is
/// refused at start-up with that said.
pub const SNAPSHOT_SCRATCH_BYTES: u32 = 4096;

/// What produced a [`SocketRecord`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// One expiry of `tcp_keepalive_timer`: socket state at entry, `icsk_probes_out` at exit.
    KeepaliveTimer = 1,
    /// The socket moved to `TCP_CLOSE` (`inet_sock_set_state`, inside `tcp_done` and friends).
    Close = 2,
    // 3 was `inet_sk_error_report`'s record, which only fed a debug log (the close record
    // carries `sk_err`): not sent any more.
    /// One socket from the audit's walk of the TCP hash tables.
    Audit = 4,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::KeepaliveTimer),
            2 => Some(Self::Close),
            4 => Some(Self::Audit),
            _ => None,
        }
    }
}

/// Which timer callback, if any, was running on this CPU for this socket when it closed.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseContext {
    None = 0,
    KeepaliveTimer = 1,
    WriteTimer = 2,
}

impl CloseContext {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::KeepaliveTimer),
            2 => Some(Self::WriteTimer),
            _ => None,
        }
    }
}

/// `ICSK_TIME_*` values of `icsk_pending` (`include/net/inet_connection_sock.h`, unchanged since
/// 2.6): what `tcp_write_timer_handler` is about to run.
pub mod icsk_timer {
    pub const RETRANS: u8 = 1;
    pub const PROBE0: u8 = 3;
}

/// Bits of [`SocketRecord::flags`].
pub mod record_flags {
    /// `tcp_receive_reset` fired for this socket just before it closed.
    pub const RESET_RECEIVED: u8 = 1 << 0;
    /// `tcp_send_reset` fired for this socket just before it closed;
    /// `reset_reason_sent` holds its reason.
    pub const RESET_SENT: u8 = 1 << 1;
    /// `SOCK_DEAD`: the application has closed its descriptor (an orphan).
    pub const ORPHAN: u8 = 1 << 2;
    /// Timer record: the socket closed inside this expiry (so it was not re-read at exit).
    pub const CLOSED_IN_TIMER: u8 = 1 << 3;
    /// Timer record: at exit the slot no longer held the same connection, so
    /// `probes_out_after` repeats the entry value.
    pub const EXIT_UNVERIFIED: u8 = 1 << 4;
    /// `SOCK_KEEPOPEN`: keepalive is enabled on the socket.
    pub const KEEPALIVE_ON: u8 = 1 << 5;
    /// [`super::ExpiryRecord`] only: where its probes sent (0 to 2) are, as a number.
    pub const PROBES_SENT_SHIFT: u8 = 6;
    pub const PROBES_SENT_MASK: u8 = 0b11 << PROBES_SENT_SHIFT;
}

/// One ring-buffer record. Fixed size, no implicit padding, so both sides agree byte for byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRecord {
    /// Address of the `struct sock`. With the 4-tuple and netns it identifies the connection;
    /// the agent starts a new generation when a closed slot is reused.
    pub sk: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    /// `bpf_jiffies64`, the clock `rcv_tstamp` and the keepalive settings are in.
    pub jiffies: u64,
    /// Network byte order; IPv4 uses the first four bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Network namespace inode number (`net.ns.inum`).
    pub netns: u32,
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    /// A [`RecordKind`].
    pub kind: u8,
    /// A [`CloseContext`] (close records).
    pub context: u8,
    /// TCP state: at timer entry, or the state left when closing.
    pub state: u8,
    /// `icsk_probes_out` at timer entry, or when closing.
    pub probes_out_before: u8,
    /// `icsk_probes_out` at timer exit (timer records).
    pub probes_out_after: u8,
    /// `tcp_sock.keepalive_probes`; 0 means the namespace's sysctl applies.
    pub keepalive_probes: u8,
    pub sysctl_keepalive_probes: u8,
    /// [`record_flags`].
    pub flags: u8,
    /// Close inside the write timer: `icsk_pending` when that timer started ([`icsk_timer`]).
    pub write_timer_event: u8,
    /// Timer record: probes `tcp_write_wakeup` sent in this expiry: the growth of the
    /// namespace's `TCPKeepAlive` on the timer's CPU, which no ACK resets (unlike
    /// `icsk_probes_out`) and no other segment moves (unlike `tcp_sock.segs_out`).
    pub probes_sent: u8,
    /// `tcp_sock.keepalive_time`/`keepalive_intvl` in jiffies; 0 means the sysctl applies.
    pub keepalive_time: u32,
    pub keepalive_intvl: u32,
    /// The namespace's `tcp_keepalive_time`/`intvl` in jiffies.
    pub sysctl_keepalive_time: u32,
    pub sysctl_keepalive_intvl: u32,
    /// `icsk_user_timeout` (TCP_USER_TIMEOUT) in milliseconds; 0 = unset.
    pub user_timeout_ms: u32,
    /// `tcp_sock.rcv_tstamp` and `icsk_ack.lrcvtime` (jiffies, low 32 bits): last segment received.
    pub rcv_tstamp: u32,
    pub lrcvtime: u32,
    /// `tcp_sock.lsndtime` (jiffies, low 32 bits): new data last sent.
    pub lsndtime: u32,
    /// `tcp_sock.retrans_stamp` (see [`KernelOffsets::tcp_retrans_stamp`]): with `ktime_ns`,
    /// when a send that is being retransmitted first went out.
    pub retrans_stamp: u32,
    /// Segments in flight. Close records take it from before the abort purged the write queue
    /// (`tcp_done_with_error` zeroes it): at write-timer entry or at `tcp_receive_reset`.
    pub packets_out: u32,
    pub snd_wnd: u32,
    pub sk_err: i32,
    pub sk_err_soft: i32,
    /// `enum sk_rst_reason` of the reset sent just before closing (with `RESET_SENT`).
    pub reset_reason_sent: u32,
    /// Close record: what the kernel counted it as ([`DropReason`] as `u32`, or
    /// [`NOT_A_DROP`]), by [`classify_close`], the same function the agent uses.
    pub drop_reason: u32,
    /// Close and audit records: the namespace's conntrack established timeout in jiffies when
    /// conntrack tracks the namespace's connections of this family, else 0 (see
    /// [`KernelOffsets::net_ct_tcp_established`]). Close records carry it only for a drop that
    /// may be an idle kill ([`may_be_idle_kill`]), its one use; else 0.
    pub conntrack_timeout: u32,
    /// Close records: `icsk_probes_tstamp` (see [`KernelOffsets::icsk_probes_tstamp`]; 32-bit
    /// jiffies, 0 when the probe timer has not run or the kernel lacks the member).
    pub probes_tstamp: u32,
    /// cgroup v2 id of the socket (0 when unknown).
    pub cgroup_id: u64,
    /// Inode number of the socket's file (0 for orphans, which have no file any more).
    pub socket_ino: u64,
    /// What tells the socket's namespace from an earlier one that had its inode: `net_cookie`
    /// (5.12+), else `net.hash_mix` (drawn at random when the namespace was created) with bit 32
    /// set, so it is never 0 and never equals a 32-bit cookie. 0 when unreadable.
    pub netns_cookie: u64,
}

impl SocketRecord {
    pub const SIZE: usize = core::mem::size_of::<Self>();

    /// The keepalive settings the kernel applies: the socket's own, else the namespace's.
    #[inline(always)]
    pub fn idle_jiffies(&self) -> u32 {
        own_or(self.keepalive_time, self.sysctl_keepalive_time)
    }

    #[inline(always)]
    pub fn interval_jiffies(&self) -> u32 {
        own_or(self.keepalive_intvl, self.sysctl_keepalive_intvl)
    }

    #[inline(always)]
    pub fn probes(&self) -> u8 {
        own_or(self.keepalive_probes, self.sysctl_keepalive_probes)
    }

    #[inline(always)]
    pub fn last_received_jiffies(&self) -> u32 {
        last_received(self.lrcvtime, self.rcv_tstamp)
    }
}

/// The newer of `icsk_ack.lrcvtime` (data) and `tcp_sock.rcv_tstamp` (ACKs): the last segment
/// received, the stamp `keepalive_time_elapsed` measures from. 32-bit jiffies: the comparison
/// survives the wrap.
#[inline(always)]
pub fn last_received(lrcvtime: u32, rcv_tstamp: u32) -> u32 {
    if lrcvtime.wrapping_sub(rcv_tstamp) as i32 > 0 {
        lrcvtime
    } else {
        rcv_tstamp
    }
}

/// Jiffies a connection was silent before its last send of new data: from the last segment
/// received to `lsndtime`; 0 when something was received after that send.
#[inline(always)]
pub fn silence_before_send(last_received: u32, lsndtime: u32) -> u32 {
    let silence = lsndtime.wrapping_sub(last_received);
    if (silence as i32) > 0 { silence } else { 0 }
}

/// Whether a drop may be an idle kill by a middlebox (issue 13): the connection died by a reset
/// or by a send that was never answered (retransmissions, or the probe timer the kernel runs
/// when a firewall on this host refused the send), after at least `threshold_jiffies` of
/// silence (the smallest middlebox idle timeout configured; 0 = never). The kernel sends such a
/// close to the agent even for a connection without keepalive; the agent decides which
/// threshold.
#[inline(always)]
pub fn idle_kill_candidate(
    verdict: Option<DropReason>,
    silence: u32,
    threshold_jiffies: u32,
) -> bool {
    matches!(
        verdict,
        Some(
            DropReason::ResetReceived
                | DropReason::RetransmitTimeout
                | DropReason::ZeroWindowTimeout
        )
    ) && threshold_jiffies != 0
        && silence >= threshold_jiffies
}

/// Whether a drop can be an idle kill under some threshold: a keepalive drop, or a drop on a
/// send after `silence` (from [`silence_before_send`]) jiffies of it. The agent's idle-kill
/// classification stops at once when not, and only then does the kernel read the namespace's
/// conntrack timeout into a close record: a threshold nothing would compare.
#[inline(always)]
pub fn may_be_idle_kill(verdict: Option<DropReason>, silence: u32) -> bool {
    match verdict {
        Some(DropReason::KeepaliveTimeout | DropReason::KeepaliveReset) => true,
        Some(
            DropReason::ResetReceived
            | DropReason::RetransmitTimeout
            | DropReason::ZeroWindowTimeout,
        ) => silence != 0,
        _ => false,
    }
}

/// A socket's own keepalive setting, or the namespace's where the socket has none (0).
#[inline(always)]
fn own_or<T: Copy + Default + PartialEq>(own: T, namespace: T) -> T {
    if own != T::default() { own } else { namespace }
}

/// One keepalive expiry as the timer's exit writes it to the ring buffer: only what the agent
/// reads of an expiry, with the effective settings resolved in the kernel. The addresses come
/// last and an IPv4 record stops after its 8 bytes of them, so an IPv4 expiry takes 72 bytes of
/// the ring (64 and the ring's 8-byte header) where a [`SocketRecord`] takes 176. Every byte
/// counts: the timer softirq runs a synchronized second's expiries in one go, tens of
/// thousands, which the agent cannot drain while it runs; at 72 bytes the default 4 MiB ring
/// holds 58 254 of them (50 000 connections probing together fit), at 88 (the layout before)
/// 47 662. So what the length already says is not repeated: the layout is
/// told apart from a [`SocketRecord`], and IPv4 from IPv6, by the record's length alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpiryRecord {
    /// As in [`SocketRecord`].
    pub sk: u64,
    pub netns_cookie: u64,
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns() >> EXPIRY_KTIME_SHIFT` (units of 1.024 µs), its low 32 bits: it
    /// wraps every 73 minutes, and the agent, which reads a record within moments of its
    /// writing, restores the rest from its own reading of the same clock.
    pub ktime: u32,
    pub netns: u32,
    /// The socket file's inode, 0 for orphans. Socket inodes come from `get_next_ino()`, which
    /// is 32-bit on every kernel (`unsigned int`, so that 32-bit `stat` never overflows); one
    /// that did not fit would be sent as 0, unknown, rather than cut.
    pub socket_ino: u32,
    /// Effective `TCP_KEEPIDLE`/`TCP_KEEPINTVL` in jiffies: the socket's own, else the
    /// namespace's sysctl.
    pub idle_jiffies: u32,
    pub interval_jiffies: u32,
    /// `icsk_user_timeout` (TCP_USER_TIMEOUT) in milliseconds; 0 = unset.
    pub user_timeout_ms: u32,
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    /// As in [`SocketRecord`].
    pub probes_out_before: u8,
    pub probes_out_after: u8,
    /// [`record_flags`], with [`SocketRecord::probes_sent`] (0 to 2) in the bits of
    /// [`record_flags::PROBES_SENT_MASK`].
    pub flags: u8,
    /// Effective `TCP_KEEPCNT`.
    pub probes: u8,
    /// Network byte order. IPv4: local in bytes 0..4, remote in 4..8 (and the record ends
    /// there); IPv6: local in 0..16, remote in 16..32.
    pub addrs: [u8; 32],
}

/// See [`ExpiryRecord::ktime`]: a shift, where a division by 1 000 would cost the timer's exit
/// a 64-bit divide.
pub const EXPIRY_KTIME_SHIFT: u32 = 10;

impl ExpiryRecord {
    pub const SIZE: usize = core::mem::size_of::<Self>();
    /// Bytes of an IPv4 record in the ring buffer: up to the end of its two addresses.
    pub const IPV4_BYTES: usize = Self::SIZE - 24;
    pub const IPV6_BYTES: usize = Self::SIZE;

    /// Bytes before the addresses: what [`Self::write_head`] writes.
    pub const HEAD_BYTES: usize = core::mem::offset_of!(Self, addrs);

    /// The record of the expiry whose entry snapshot is `rec`, with the values the exit read
    /// (`probes_out_after`, `probes_sent`, `flags`) already in it; an IPv4 record's unused
    /// address bytes are zero.
    #[inline(always)]
    pub fn fill_from(&mut self, rec: &SocketRecord) {
        let to = &raw mut *self;
        // SAFETY: `to` is a whole record, so every write below lies within it.
        unsafe {
            Self::write_head(to, rec);
            if rec.family == AF_INET6 {
                Self::write_ipv6_addrs(to, rec);
            } else {
                Self::write_ipv4_addrs(to, rec);
                let words = (&raw mut (*to).addrs).cast::<u64>();
                words.add(1).write(0);
                words.add(2).write(0);
                words.add(3).write(0);
            }
        }
    }

    /// Writes every field before the addresses ([`Self::HEAD_BYTES`]) from `rec`.
    ///
    /// # Safety
    /// `to` is 8-byte aligned and valid for writes of [`Self::HEAD_BYTES`] bytes: a whole
    /// record, or the start of a reservation in the ring buffer, which the timer's exit fills
    /// in place.
    #[inline(always)]
    pub unsafe fn write_head(to: *mut Self, rec: &SocketRecord) {
        let sent = if rec.probes_sent > 2 {
            2
        } else {
            rec.probes_sent
        };
        // SAFETY: within the first `HEAD_BYTES` of `to` (the caller's contract); place
        // writes through the raw pointer, no reference to memory that may be partly outside.
        unsafe {
            (*to).sk = rec.sk;
            (*to).netns_cookie = rec.netns_cookie;
            (*to).cgroup_id = rec.cgroup_id;
            (*to).ktime = (rec.ktime_ns >> EXPIRY_KTIME_SHIFT) as u32;
            (*to).netns = rec.netns;
            (*to).socket_ino = if rec.socket_ino > u64::from(u32::MAX) {
                0
            } else {
                rec.socket_ino as u32
            };
            (*to).idle_jiffies = rec.idle_jiffies();
            (*to).interval_jiffies = rec.interval_jiffies();
            (*to).user_timeout_ms = rec.user_timeout_ms;
            (*to).local_port = rec.local_port;
            (*to).remote_port = rec.remote_port;
            (*to).probes_out_before = rec.probes_out_before;
            (*to).probes_out_after = rec.probes_out_after;
            (*to).flags = (rec.flags & !record_flags::PROBES_SENT_MASK)
                | sent << record_flags::PROBES_SENT_SHIFT;
            (*to).probes = rec.probes();
        }
    }

    /// Writes the two IPv6 addresses of `rec`, as four 8-byte words: a copy of the byte arrays
    /// compiles to a byte loop on the BPF target.
    ///
    /// # Safety
    /// `to` is 8-byte aligned and valid for writes of [`Self::IPV6_BYTES`] bytes.
    #[inline(always)]
    pub unsafe fn write_ipv6_addrs(to: *mut Self, rec: &SocketRecord) {
        let from_local = (&raw const rec.local_addr).cast::<u64>();
        let from_remote = (&raw const rec.remote_addr).cast::<u64>();
        // SAFETY: `rec` is 8-byte aligned (it starts with a u64) and its address fields lie at
        // multiples of 8 (asserted below), so these are aligned word reads inside it; the
        // writes lie within `to`'s `IPV6_BYTES` (the caller's contract).
        unsafe {
            let to = (&raw mut (*to).addrs).cast::<u64>();
            to.write(from_local.read());
            to.add(1).write(from_local.add(1).read());
            to.add(2).write(from_remote.read());
            to.add(3).write(from_remote.add(1).read());
        }
    }

    /// Writes the two IPv4 addresses of `rec` as one 8-byte word: local in bytes 0..4 and
    /// remote in 4..8, as the kernel keeps them.
    ///
    /// # Safety
    /// `to` is 8-byte aligned and valid for writes of [`Self::IPV4_BYTES`] bytes.
    #[inline(always)]
    pub unsafe fn write_ipv4_addrs(to: *mut Self, rec: &SocketRecord) {
        let v4 = |from: *const [u8; 16]| {
            // SAFETY: an address field of `rec`, 8-byte aligned (asserted below).
            u64::from(unsafe { from.cast::<u32>().read() })
        };
        let (local, remote) = (
            v4(&raw const rec.local_addr),
            v4(&raw const rec.remote_addr),
        );
        let word = if cfg!(target_endian = "little") {
            local | remote << 32
        } else {
            local << 32 | remote
        };
        // SAFETY: the first address word lies within `to`'s `IPV4_BYTES` (the caller's
        // contract, and `HEAD_BYTES + 8 == IPV4_BYTES`, asserted below).
        unsafe { (&raw mut (*to).addrs).cast::<u64>().write(word) };
    }

    /// Probes sent in this expiry (see [`SocketRecord::probes_sent`]).
    #[inline(always)]
    pub fn probes_sent(&self) -> u8 {
        (self.flags & record_flags::PROBES_SENT_MASK) >> record_flags::PROBES_SENT_SHIFT
    }

    /// How many bytes of the record of a socket of `family` go into the ring buffer.
    #[inline(always)]
    pub fn ring_len(family: u16) -> usize {
        if family == AF_INET6 {
            Self::IPV6_BYTES
        } else {
            Self::IPV4_BYTES
        }
    }
}

/// Why a connection ended abnormally. The kernel counts every close by this (exact counters that
/// no ring-buffer loss changes) and the agent classifies the same records with the same
/// function, [`classify_close`]; the kernel path behind each reason is in ARCHITECTURE.md.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    KeepaliveTimeout = 0,
    KeepaliveReset = 1,
    RetransmitTimeout = 2,
    ZeroWindowTimeout = 3,
    ConnectTimeout = 4,
    ResetReceived = 5,
    LocalAbort = 6,
    Other = 7,
}

/// [`SocketRecord::drop_reason`] of a close that was not a drop.
pub const NOT_A_DROP: u32 = u32::MAX;

impl DropReason {
    pub const COUNT: usize = 8;
    /// The keepalive drops: silence is what the kernel measured, so they have a dead-peer
    /// detection time.
    pub const KEEPALIVE: [Self; 2] = [Self::KeepaliveTimeout, Self::KeepaliveReset];
    /// In value order: `ALL[r as usize] == r`.
    pub const ALL: [Self; Self::COUNT] = [
        Self::KeepaliveTimeout,
        Self::KeepaliveReset,
        Self::RetransmitTimeout,
        Self::ZeroWindowTimeout,
        Self::ConnectTimeout,
        Self::ResetReceived,
        Self::LocalAbort,
        Self::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::KeepaliveReset => "keepalive_reset",
            Self::RetransmitTimeout => "retransmit_timeout",
            Self::ZeroWindowTimeout => "zero_window_timeout",
            Self::ConnectTimeout => "connect_timeout",
            Self::ResetReceived => "reset_received",
            Self::LocalAbort => "local_abort",
            Self::Other => "other",
        }
    }

    /// Drops whose per-connection series an alert names: kept ahead of every other drop when
    /// the agent's tables are full.
    pub fn is_keepalive(self) -> bool {
        matches!(self, Self::KeepaliveTimeout | Self::KeepaliveReset)
    }
}

impl core::fmt::Display for DropReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Linux errno values (`include/uapi/asm-generic/errno*.h`, the same on every architecture the
/// agent runs on) as `sk_err` holds them.
pub mod errno {
    pub const EPIPE: i32 = 32;
    pub const ECONNABORTED: i32 = 103;
    pub const ECONNRESET: i32 = 104;
    pub const ETIMEDOUT: i32 = 110;
    pub const ECONNREFUSED: i32 = 111;
}

/// What [`classify_close`] needs of a socket moving to `TCP_CLOSE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseFacts {
    /// The state it left.
    pub old_state: u8,
    /// A [`CloseContext`] value.
    pub context: u8,
    /// Closed inside the write timer: its `icsk_pending` ([`icsk_timer`]).
    pub write_timer_event: u8,
    pub orphan: bool,
    /// `SOCK_KEEPOPEN`.
    pub keepalive_on: bool,
    pub probes_out: u8,
    /// In flight before an abort purged the write queue.
    pub packets_out: u32,
    pub send_window: u32,
    pub reset_received: bool,
    /// A reset was sent with reason `SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT` (6.12+).
    pub keepalive_reset_sent: bool,
    pub sk_err: i32,
}

/// Why a connection ended, or `None` for an orderly end (the FIN exchange, an orphan's FIN_WAIT2
/// timeout, `close()` during `connect()`). Kept branch-light: the kernel runs it on every close
/// it reports.
#[inline(always)]
pub fn classify_close(c: &CloseFacts) -> Option<DropReason> {
    use DropReason::*;
    use errno::*;

    let old = c.old_state;
    // `icsk_probes_out` counts keepalive and zero-window probes only (retransmissions count in
    // `icsk_retransmits`); zero-window probing needs a closed send window, and keepalive never
    // probes with data in flight (`packets_out` as it was before the abort purged it).
    let keepalive_probing =
        c.keepalive_on && c.probes_out > 0 && c.packets_out == 0 && c.send_window > 0;
    let zero_window_probing = c.probes_out > 0 && c.send_window == 0;

    if c.context == CloseContext::KeepaliveTimer as u8 {
        // tcp_keepalive_timer → tcp_write_err → tcp_done. The same timer also ends orphaned
        // FIN_WAIT2 sockets (tcp_fin_timeout), which the application had already closed.
        if old == tcp_state::FIN_WAIT2 && c.orphan {
            return None;
        }
        return Some(KeepaliveTimeout);
    }
    if c.context == CloseContext::WriteTimer as u8 {
        // tcp_write_timer_handler runs the event in icsk_pending: ICSK_TIME_PROBE0 →
        // tcp_probe_timer (zero-window probes exhausted), ICSK_TIME_RETRANS →
        // tcp_retransmit_timer → tcp_write_timeout (retransmits or SYN retries exhausted).
        if old == tcp_state::SYN_SENT {
            return Some(ConnectTimeout);
        }
        if c.write_timer_event == icsk_timer::PROBE0 {
            return Some(ZeroWindowTimeout);
        }
        return Some(RetransmitTimeout);
    }
    if c.keepalive_reset_sent {
        return Some(KeepaliveTimeout);
    }
    // tcp_reset: the peer's RST. Matched on this CPU, or recognised by the error it leaves when
    // the close was seen elsewhere (a preempted backlog run).
    let err = c.sk_err;
    if c.reset_received || err == ECONNRESET || err == EPIPE || err == ECONNREFUSED {
        return Some(if keepalive_probing {
            KeepaliveReset
        } else {
            ResetReceived
        });
    }
    // tcp_abort (SOCK_DESTROY, `ss -K`).
    if err == ECONNABORTED {
        return Some(LocalAbort);
    }
    if err == ETIMEDOUT {
        // A timeout whose timer was not seen on this CPU: decide from the socket (the write
        // queue is already purged, so only the probe counters and the window are left).
        return Some(if old == tcp_state::SYN_SENT {
            ConnectTimeout
        } else if keepalive_probing {
            KeepaliveTimeout
        } else if zero_window_probing {
            ZeroWindowTimeout
        } else {
            RetransmitTimeout
        });
    }
    if err != 0 {
        return Some(Other);
    }
    match old {
        // The FIN exchange finished (tcp_time_wait, or the last ACK in LAST_ACK).
        tcp_state::FIN_WAIT2 | tcp_state::CLOSING | tcp_state::LAST_ACK | tcp_state::TIME_WAIT => {
            None
        }
        // Only an abort goes straight from these states to CLOSE without an error: close() with
        // unread data, SO_LINGER 0, or connect(AF_UNSPEC) — the RST goes out after the move.
        tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT | tcp_state::FIN_WAIT1 => Some(LocalAbort),
        // close() during connect(): the application gave up before there was a connection.
        tcp_state::SYN_SENT => None,
        _ => Some(Other),
    }
}

/// Key of the exact per-namespace counters: the cookie first, because a namespace's inode is
/// reused by the next namespace created and its cookie never is (0 on 5.10, where the kernel
/// generates it lazily: identity falls back to the inode there, as in the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetnsKey {
    pub cookie: u64,
    pub inum: u32,
    pub _pad: u32,
}

/// What the kernel programs count per namespace, with atomic adds, whatever happens to the ring
/// buffer. Only the agent deletes entries (namespaces it forgot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsCounters {
    /// `bpf_ktime_get_ns()` when the program that inserted the entry stamped it; 0 for the
    /// moment between. An inode is reused only after its namespace is gone, and every event of
    /// that namespace came before, so of two entries on one inode the later one is the live
    /// namespace's, though no record of it reached the agent yet. First: in a
    /// [`NetnsCounterSlot`] it shares the key's cache line, with the counts an expiry adds to.
    pub created_ns: u64,
    /// Keepalive timer expiries (a namespace with keepalive sockets is alive even when idle).
    pub expiries: u64,
    /// Probes sent (`TCPKeepAlive` of the namespace).
    pub probes: u64,
    /// Closes counted that were not drops: a drop adds to its reason in `drops` alone, so each
    /// close is one atomic add (a locked add waits for the CPU's pending stores).
    pub orderly_closes: u64,
    /// Drops by [`DropReason`] value.
    pub drops: [u64; DropReason::COUNT],
}

/// One element of [`names::NETNS_SLOTS_MAP`]: a namespace's counters where the programs
/// find them without hashing, at [`netns_counter_slot`] of its key. The agent places a
/// namespace there once the programs have inserted its entry in
/// [`names::NETNS_COUNTERS_MAP`], copying the entry's `created_ns`; from then on the programs
/// add to the slot, and the agent reads each namespace's totals as its entry plus its slot
/// (every add lands in one of the two). Finding a value in the hash map (a hash of the 16-byte
/// key, its bucket, then the element) was about 45 ns of a counted close (`cargo xtask ablate
/// counters`, README "Performance"); an array element's address is computed inline.
///
/// Written by the agent alone, apart from the counts: the key and `created_ns` while `inum` is
/// 0 (free), then `inum` last, after a release fence; cleared by zeroing `inum`, the cookie and
/// `created_ns` (in no order other CPUs are bound to see). A program takes the slot only when its inode, cookie and a
/// non-zero `created_ns` all match. Its three loads are not ordered (arm64), so what keeps a
/// program from pairing one placement's inode with another's stamp is the quarantine: a slot
/// the agent clears is not placed again before [`NETNS_SLOT_QUARANTINE_SECS`], by when its
/// zeros are visible everywhere, and a program sees each word either zero (then it counts in
/// the hash map, which is always right) or the new placement's. The counts are zeroed before
/// the inode is stored, and a program's atomic add depends on its loads (a control
/// dependency orders a load before a later store, arm64 included), so no add lands before
/// the zeroing. An add of a program that matched a slot just before it was cleared lands in no
/// namespace read later, as an add to an entry the agent is deleting always could.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsCounterSlot {
    pub key: NetnsKey,
    pub counters: NetnsCounters,
    /// To 128 bytes: the key, `created_ns` and the expiry's counts on the first cache line.
    pub _pad: [u64; 2],
}

/// Elements of [`names::NETNS_SLOTS_MAP`] (128 KiB): a power of two. A namespace whose
/// slot another holds stays in the hash map, counted as exactly, for a hash lookup more.
pub const NETNS_COUNTER_SLOTS: usize = 1024;

/// Seconds a slot the agent cleared stays free before it places another namespace there: far
/// longer than a program runs, and than stores take to reach every CPU. A program preempted
/// for longer between its match and its add (a task-context close on a `PREEMPT_RT` kernel)
/// could add to the next namespace placed there.
pub const NETNS_SLOT_QUARANTINE_SECS: u64 = 2;

/// The slot of [`names::NETNS_SLOTS_MAP`] a namespace's counters may be placed in.
#[inline(always)]
pub fn netns_counter_slot(key: &NetnsKey) -> usize {
    const BITS: u32 = NETNS_COUNTER_SLOTS.trailing_zeros();
    const _: () = assert!(NETNS_COUNTER_SLOTS.is_power_of_two());
    multiplicative_hash(key.cookie ^ u64::from(key.inum), BITS)
}

/// Why a program that saw a keepalive expiry or a close could not add it to
/// [`NetnsCounters`]: the index of its count in [`names::UNCOUNTED_MAP`]. Each one makes the
/// namespace totals fall short of the kernel's own `TcpExt` counters, so none may pass silently.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uncounted {
    /// A keepalive expiry found both per-CPU socket copies taken (programs nested twice).
    ExpiryCopyBusy = 0,
    /// A keepalive expiry whose socket could not be read at entry.
    ExpiryUnreadable = 1,
    /// This CPU's `TCPKeepAlive` of the expiry's namespace could not be read (or moved by more
    /// than the two probes an expiry sends, or implausibly far since the last expiry there),
    /// so the probes it sent could not be counted.
    ExpiryCounterUnreadable = 2,
    /// The exit program ran for a keepalive expiry the entry program was not run for (the
    /// kernel skipped it): the expiry went uncounted, and its probes too unless a later expiry
    /// on that CPU in that namespace counts them (see `timer.rs`, "unseen").
    ExpiryEntryMissed = 3,
    /// A close found both per-CPU socket copies taken.
    CloseCopyBusy = 4,
    /// A close whose socket could not be read.
    CloseUnreadable = 5,
    /// The entry program ran for a keepalive expiry the exit program was not run for (the
    /// kernel skipped it; seen at the next expiry on that CPU): the expiry went uncounted, and
    /// its probes too unless a later expiry on that CPU in that namespace counts them.
    ExpiryExitMissed = 6,
}

impl Uncounted {
    /// In value order: `ALL[u as usize] == u`.
    pub const ALL: [Uncounted; 7] = [
        Uncounted::ExpiryCopyBusy,
        Uncounted::ExpiryUnreadable,
        Uncounted::ExpiryCounterUnreadable,
        Uncounted::ExpiryEntryMissed,
        Uncounted::CloseCopyBusy,
        Uncounted::CloseUnreadable,
        Uncounted::ExpiryExitMissed,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The event that went uncounted, as the agent labels it.
    pub fn event(self) -> &'static str {
        match self {
            Uncounted::ExpiryCopyBusy
            | Uncounted::ExpiryUnreadable
            | Uncounted::ExpiryCounterUnreadable
            | Uncounted::ExpiryEntryMissed
            | Uncounted::ExpiryExitMissed => "keepalive_expiry",
            Uncounted::CloseCopyBusy | Uncounted::CloseUnreadable => "close",
        }
    }

    /// Why, as the agent labels it.
    pub fn cause(self) -> &'static str {
        match self {
            Uncounted::ExpiryCopyBusy | Uncounted::CloseCopyBusy => "copy_busy",
            Uncounted::ExpiryUnreadable | Uncounted::CloseUnreadable => "unreadable",
            Uncounted::ExpiryCounterUnreadable => "probe_counter_unreadable",
            Uncounted::ExpiryEntryMissed => "entry_not_run",
            Uncounted::ExpiryExitMissed => "exit_not_run",
        }
    }
}

/// The one value of [`names::TRACKED_MAP`]: which connections the agent's connection table may
/// hold, so that a close of any other keepalive connection can stay in the kernel. One byte per
/// slot, at [`tracked_slot`] of the connection's ports, holds the mark of the epoch in which it
/// was last marked: by the timer's exit, at an expiry that would put the connection in the table
/// (it probed, or had unanswered probes), and by the agent, every epoch, for each connection its
/// table holds. A slot marked in one of the last three epochs ([`TrackedEpochs::holds`]) says
/// "maybe"; an older one lets a connection the table no longer holds (closed unseen, evicted, its
/// records lost) stop costing its close.
#[repr(C)]
pub struct TrackedMarks {
    /// Written by the agent alone, in one store.
    pub epochs: TrackedEpochs,
    /// Keeps the epochs alone on their cache line, which every CPU reads and only the agent's
    /// epoch change writes.
    pub _pad: [u8; 60],
    pub slots: [u8; TRACKED_SLOTS],
}

/// Slots of [`TrackedMarks`]: a power of two. 32 KiB: at 256 KiB the mark's cache and TLB miss
/// added about 100 ns to the timer's exit.
pub const TRACKED_SLOTS: usize = 1 << 15;

/// The last three epochs, 0 to [`TrackedEpochs::LAST`] each: a slot holds an epoch plus one, so
/// 0 is a slot never marked, and the map's zero value is a valid state (every epoch 0) in which
/// marks only accumulate, as when no agent advances them (`watch`, which asks for every close
/// anyway). Three, not two: the agent's renewal marks what its table holds when it starts an
/// epoch, and a connection the programs marked just before, whose record reached the table just
/// after, is marked by the next renewal only; its first mark must hold until then.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedEpochs {
    pub current: u8,
    pub previous: u8,
    pub oldest: u8,
    pub _pad: u8,
}

impl TrackedEpochs {
    pub const LAST: u8 = 254;

    /// What a mark made now stores.
    #[inline(always)]
    pub fn mark(self) -> u8 {
        self.current.wrapping_add(1)
    }

    /// Whether a slot holding `mark` may be a connection the agent's table holds.
    #[inline(always)]
    pub fn holds(self, mark: u8) -> bool {
        mark != 0
            && (mark == self.current.wrapping_add(1)
                || mark == self.previous.wrapping_add(1)
                || mark == self.oldest.wrapping_add(1))
    }

    /// The next epoch: each one moves down a place, the oldest is dropped.
    pub fn next(self) -> Self {
        Self {
            current: if self.current >= Self::LAST {
                0
            } else {
                self.current + 1
            },
            previous: self.current,
            oldest: self.previous,
            _pad: 0,
        }
    }

    /// All in one `u32` (as they lie in memory), for the agent's single store and the programs'
    /// single load.
    pub fn to_bits(self) -> u32 {
        u32::from_ne_bytes([self.current, self.previous, self.oldest, 0])
    }

    pub fn from_bits(bits: u32) -> Self {
        let [current, previous, oldest, _] = bits.to_ne_bytes();
        Self {
            current,
            previous,
            oldest,
            _pad: 0,
        }
    }
}

/// Whether a keepalive expiry takes its connection into the agent's connection table: it sent
/// a probe, or found probes unanswered. Idle expiries before the first probe are common and
/// tell nothing per connection. The timer's exit marks in [`TrackedMarks`] exactly these, so
/// the close program sends the closes of the connections the table may hold.
#[inline(always)]
pub fn expiry_enters_table(probes_sent: u8, probes_out_before: u8) -> bool {
    probes_sent != 0 || probes_out_before != 0
}

/// The slot of a connection in [`TrackedMarks`], from its ports (host byte order) alone:
/// nothing in the key may change while the connection lives (`IPV6_ADDRFORM` turns an
/// IPv4-mapped IPv6 socket into an IPv4 one), and the close hook's `sk` is a pointer the
/// verifier refuses a hash's arithmetic on. Connections sharing a slot only share a "maybe".
///
/// The ports' blocks of 64 pick a cache line by a multiplicative hash, and the ports' low six
/// bits, XORed, pick the byte in it. A host's connections to one peer port take ephemeral
/// ports in turn, so theirs share lines, where a hash of the whole key put each close's load
/// on a line of its own: in `cargo xtask profile`'s churn that load was 14-21 % of the close
/// program's samples, and alternating hook-cost runs put 50-140 ns per keepalive connection's
/// counted RST close on it, and up to 50 per orderly one (README, "Performance"). Hashing the
/// blocks, not XORing whole ports, keeps ports in turn to two peer ports whose blocks differ
/// (80 and 443) on lines of their own.
#[inline(always)]
pub fn tracked_slot(remote_port: u16, local_port: u16) -> usize {
    const LINE: usize = 64;
    let blocks =
        ((u64::from(remote_port) / LINE as u64) << 16) | (u64::from(local_port) / LINE as u64);
    let line = multiplicative_hash(
        blocks,
        TRACKED_SLOTS.trailing_zeros() - LINE.trailing_zeros(),
    );
    (line * LINE + usize::from(remote_port ^ local_port) % LINE) & (TRACKED_SLOTS - 1)
}

/// `key`'s top `bits` bits after a multiplication by 2^64 / φ, which spreads keys lying a
/// fixed stride apart (ports in turn, cookies in turn) over the `2^bits` values.
#[inline(always)]
fn multiplicative_hash(key: u64, bits: u32) -> usize {
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
}

/// Entries of [`names::NETNS_COUNTERS_MAP`]: namespaces on one node, with room for churn
/// between the agent's sweeps. A namespace that finds it full is counted, not tracked.
pub const NETNS_COUNTERS_MAX: u32 = 4096;

/// Namespaces each CPU remembers the keepalive counter of (the timer program's per-CPU slots,
/// 40 bytes each): a power of two, for [`counter_slot`].
pub const COUNTER_SLOTS: usize = 256;

/// Slots a namespace may take on a CPU: the set of this many that [`counter_slot`] falls in
/// (`counter_slot(cookie) & !(COUNTER_SET_SLOTS - 1)`), so that namespaces whose cookies hash
/// close together need not push each other out.
pub const COUNTER_SET_SLOTS: usize = 4;

/// The timer programs' per-CPU context (`TIMER_CONTEXT` in timer.rs): the TCP timer callback
/// running on this CPU (timer callbacks do not nest on one CPU), and this CPU's memory of each
/// namespace's keepalive counter. Here, not in timer.rs, so that the tests can read it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TimerContext {
    /// The `timer_list` being run; 0 when no TCP timer callback is running.
    pub timer: u64,
    pub sk: u64,
    /// A `CloseContext` value.
    pub kind: u8,
    pub closed: u8,
    /// 1 while a timer program reads and moves a slot of `counters` (the entry taking one, the
    /// exit counting from one): a `counter_sweep` (timer.rs) that interrupted it leaves this
    /// CPU's slots alone. Only within one program run, so no skipped exit leaves it set.
    pub counting: u8,
    /// Write timer: `icsk_pending` and `packets_out` at entry, before an abort purges them.
    pub write_timer_event: u8,
    pub packets_out: u32,
    /// This CPU's per-CPU offset (what `this_cpu_ptr` adds), found by `cpu_offset` (timer.rs) at the
    /// first keepalive expiry on this CPU; 0 until then.
    pub cpu_offset: u64,
    /// Keepalive timer: where this CPU's `TCPKeepAlive` of the socket's namespace is, 0 when it
    /// could not be found (the exit then cannot count this expiry's probes).
    pub keepalive_mib: u64,
    /// Keepalive timer: that counter at entry.
    pub keepalive_mib_before: u64,
    /// Keepalive timer: the index of the namespace's slot in `counters`.
    pub counter_slot: u32,
    pub snapshot: SocketRecord,
    /// What a build without the ring write fills instead of a reservation (see
    /// `send_expiry`): the part of the snapshot the agent reads, and the exit's values.
    pub expiry: ExpiryRecord,
    /// The namespaces whose keepalive expiries this CPU ran, each in a slot of the set of
    /// [`COUNTER_SET_SLOTS`] its cookie picks ([`counter_slot`]): where this CPU's copy of its
    /// `TCPKeepAlive` is, and where that counter stood when the last of its expiries the
    /// programs saw here ended. A slot per namespace, not one for the last namespace, because a
    /// node's namespaces (a pod each) take turns on a CPU (`keepalive_mib` (timer.rs) says which slot).
    pub counters: [CounterSlot; COUNTER_SLOTS],
    /// Slots taken from another namespace (pushed out of its set, or gone): each loses what
    /// that namespace's counter grows by on this CPU until it takes a slot again. Read by the
    /// bench, to tell this loss from the others.
    pub slots_taken_over: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct CounterSlot {
    /// The namespace (its `struct net` address and cookie); 0 in a slot never taken.
    pub net: u64,
    pub cookie: u64,
    /// Where this CPU's `TCPKeepAlive` of the namespace is.
    pub at: u64,
    /// That counter when the last expiry the programs saw in the namespace on this CPU ended.
    pub seen: u64,
    /// When that expiry started (its record's `ktime_ns`), or when its exit created the
    /// namespace's entry if that is later; 0 when `seen` is not known. Growth since is added
    /// only to a namespace entry created by then (one created later, after the agent's
    /// retention sweep deleted an idle namespace's entry, starts from what happens after it).
    pub seen_ns: u64,
    /// The counter when the first expiry the programs saw after the slot was taken, and whose
    /// probes they could read, began: the probes on this CPU in this namespace before it,
    /// which no program counts (sent before the agent started, by expiries the kernel ran no
    /// program for, or by one whose probes were unreadable, counted as uncounted too). Read by
    /// the bench, which tells from it how much of a namespace's shortfall this limit explains.
    /// Not the gaps dropped later, when the slot's memory is lost (`seen_ns` 0: an unreadable
    /// counter) with `seen` already set.
    pub before_first_seen: u64,
}

/// The slot of the namespace whose cookie ([`SocketRecord::netns_cookie`]) is `cookie` among a
/// CPU's [`COUNTER_SLOTS`], which picks its set of [`COUNTER_SET_SLOTS`]: a multiplicative hash
/// of the cookie. From 5.12 the cookie comes from a counter (handed out in per-CPU batches,
/// and on 6.18 shared with every other namespace type, so a pod's network namespace lies a few
/// ids past the last one's); on 5.10 and 5.11 it is the random `hash_mix`. Not the
/// `struct net` address: through a typed pointer the verifier refuses arithmetic on it.
#[inline(always)]
pub fn counter_slot(cookie: u64) -> usize {
    const BITS: u32 = COUNTER_SLOTS.trailing_zeros();
    const _: () = assert!(COUNTER_SLOTS.is_power_of_two());
    multiplicative_hash(cookie, BITS)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data made only of integers, without implicit padding
    // (checked by the size assertion below).
    unsafe impl aya::Pod for super::SocketRecord {}
    unsafe impl aya::Pod for super::ExpiryRecord {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::AuditCursor {}
    unsafe impl aya::Pod for super::IpvsQuery {}
    unsafe impl aya::Pod for super::NetnsKey {}
    unsafe impl aya::Pod for super::NetnsCounters {}
    unsafe impl aya::Pod for super::NetnsCounterSlot {}
    unsafe impl aya::Pod for super::SnapshotRegion {}
    unsafe impl aya::Pod for super::ExpirySpan {}
    unsafe impl aya::Pod for super::RecordSlots {}
    unsafe impl aya::Pod for super::TimerContext {}
    unsafe impl aya::Pod for super::CounterSlot {}
}

/// Benchmarks only: the time keepalive expiries spend between `timer_expire_entry` and
/// `timer_expire_exit` on one CPU (the callback and every program on those hooks that runs
/// between the bench's two), summed by the programs `expiry_span_in`/`expiry_span_out`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpirySpan {
    /// The keepalive timer being run; 0 when none.
    pub timer: u64,
    pub start_ns: u64,
    pub total_ns: u64,
    pub expiries: u64,
}

/// Benchmarks only: a few close records per CPU and the count written, where the bench program
/// `close_record_slot` writes as a per-CPU ring would.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordSlots {
    /// Records written on this CPU.
    pub head: u64,
    pub records: [SocketRecord; RecordSlots::COUNT],
}

impl RecordSlots {
    /// A power of two, so the head masked by `COUNT - 1` picks a slot.
    pub const COUNT: usize = 4;
}

/// Which table an audit run walks.
pub mod audit_table {
    /// `ehash`: every connected socket (and time-wait and request sockets, which are skipped).
    pub const ESTABLISHED: u32 = 0;
    /// The listeners' table.
    pub const LISTENING: u32 = 1;
}

/// The audit walk's one map entry: the agent sets where to start, runs the program
/// (`BPF_PROG_TEST_RUN`), drains the records and runs it again from where it stopped, until
/// `done`. Each run visits a bounded number of buckets and sockets, so every kernel's verifier
/// accepts it and no run holds the CPU for long.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditCursor {
    /// Out: address of the tables walked (`net->ipv4.tcp_death_row.hashinfo` of the agent's
    /// namespace: `tcp_hashinfo`, shared by every namespace without tables of its own).
    pub hashinfo: u64,
    /// The program's own loop state: the chain node it is at.
    pub node: u64,
    /// In: an [`audit_table`] value.
    pub table: u32,
    /// In/out: the bucket to continue from.
    pub bucket: u32,
    /// In/out: sockets of `bucket` already visited (a chain is re-walked from its head, never
    /// from a node kept across runs: that socket may have been freed in between).
    pub skip: u32,
    /// The program's own loop state (kept here rather than in registers for the verifier):
    /// sockets of `bucket` visited in this run's walk of its chain.
    pub seen: u32,
    /// Out: the table's bucket count as the kernel reported it.
    pub buckets: u32,
    /// Out: 1 once the last bucket was walked.
    pub done: u32,
    /// Out: records written by this run.
    pub emitted: u32,
    /// Out: sockets this run could not read (a socket freed while being read, say).
    pub unreadable: u32,
    /// Out: non-zero when the table itself could not be read (a `bpf_probe_read_kernel` error).
    pub error: i32,
    /// Out: 1 when this run stopped because the record buffer was full (the agent drains it and
    /// runs again from the same place).
    pub full: u32,
}

/// The question the agent puts to the IPVS program (`names::IPVS_PROGRAM`, run with
/// `BPF_PROG_TEST_RUN`) and its answer: where IPVS keeps the TCP established timeout of one
/// network namespace. `net->ipvs` (a `struct netns_ipvs`, NULL until IPVS initialised the
/// namespace) → `proto_data_table[IPPROTO_TCP % 32]`, a chain of `struct ip_vs_proto_data`
/// linked by `next`, each naming its `struct ip_vs_protocol` (`pp->protocol`) → the TCP one's
/// `timeout_table[IP_VS_TCP_S_ESTABLISHED]`, in jiffies. The offsets come from the `ip_vs`
/// module's BTF: the types are not in the kernel's own.
///
/// The namespace is the host's, `init_net`, where kube-proxy configures IPVS: the program finds
/// it as `init_task`'s, climbing `task_struct.real_parent` from the running task (the agent)
/// to the task that is its own parent. That works from any PID namespace, and needs no data
/// symbol from `/proc/kallsyms` (kernels without `CONFIG_KALLSYMS_ALL` list none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpvsQuery {
    /// Out: the `struct net` read (the host's `init_net`).
    pub net: u64,
    /// In: `task_struct.real_parent`.
    pub task_real_parent: u32,
    /// In: `net.ipvs`, `netns_ipvs.proto_data_table`, `ip_vs_proto_data.next`, `.pp`,
    /// `.timeout_table`, `ip_vs_protocol.protocol`.
    pub net_ipvs: u32,
    pub proto_data_table: u32,
    pub proto_data_next: u32,
    pub proto_data_pp: u32,
    pub proto_data_timeout_table: u32,
    pub protocol_protocol: u32,
    /// In: `IP_VS_TCP_S_ESTABLISHED`, the index into `timeout_table`.
    pub established: u32,
    /// Out: an [`ipvs_status`] value.
    pub status: u32,
    /// Out: the timeout in jiffies, when `status` is [`ipvs_status::FOUND`].
    pub timeout_jiffies: i32,
    /// Out: the `bpf_probe_read_kernel` error, when `status` is [`ipvs_status::UNREADABLE`].
    pub error: i32,
    /// Out: parents climbed to `init_task`.
    pub depth: u32,
}

/// What the IPVS program found ([`IpvsQuery::status`]).
pub mod ipvs_status {
    /// The program has not run (the agent zeroes the answer before each run).
    pub const NOT_RUN: u32 = 0;
    pub const FOUND: u32 = 1;
    /// `net->ipvs` is NULL: IPVS has not initialised this namespace.
    pub const NO_IPVS: u32 = 2;
    /// No TCP entry in the protocol table (IPVS built without TCP support).
    pub const NO_TCP: u32 = 3;
    /// A pointer on the way could not be read.
    pub const UNREADABLE: u32 = 4;
    /// No task that is its own parent within the program's bound of parents.
    pub const NO_ROOT_TASK: u32 = 5;
}

const _: () = assert!(core::mem::size_of::<IpvsQuery>() == 56);
const _: () = assert!(SocketRecord::SIZE == 168);
const _: () = assert!(ExpiryRecord::SIZE == 88);
const _: () = assert!(ExpiryRecord::IPV4_BYTES == 64);
const _: () = assert!(core::mem::offset_of!(ExpiryRecord, addrs) == 56);
const _: () = assert!(ExpiryRecord::HEAD_BYTES + 8 == ExpiryRecord::IPV4_BYTES);
const _: () = assert!(core::mem::offset_of!(SocketRecord, local_addr) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(SocketRecord, remote_addr) % 8 == 0);
const _: () = assert!(core::mem::size_of::<AuditCursor>() == 56);
const _: () = assert!(core::mem::size_of::<NetnsKey>() == 16);
const _: () = assert!(core::mem::size_of::<NetnsCounters>() == 8 * (4 + DropReason::COUNT));
const _: () = assert!(core::mem::size_of::<NetnsCounterSlot>() == 128);
const _: () = assert!(core::mem::offset_of!(NetnsCounterSlot, counters) == 16);
const _: () = assert!(core::mem::offset_of!(NetnsCounters, created_ns) == 0);
const _: () = assert!(
    core::mem::size_of::<KernelOffsets>()
        == KernelOffsets::FIELD_COUNT * core::mem::size_of::<u32>()
);
