//! Where the fields the eBPF programs read live in this kernel, computed from its BTF.
//!
//! Rust eBPF programs get no CO-RE relocations: a program compiled once cannot have its field
//! accesses rewritten by the loader for the running kernel. The layouts of `struct sock`,
//! `struct tcp_sock`, `struct net` and `struct timer_list` change with every kernel version and
//! with the configuration (debug options, `CONFIG_NET_NS`, IPv6, ...), so the programs read every
//! field at a byte offset held in a read-only global ([`KernelOffsets`]) that the agent fills in
//! before loading them. This module computes those offsets from the running kernel's own type
//! information (`/sys/kernel/btf/vmlinux`).
//!
//! Nothing here is guessed. A field that is missing, is a bitfield, does not start on a byte, or
//! has another size than the programs read makes loading fail with an error naming it: a wrong
//! offset would not crash anything, it would make the agent report plausible-looking garbage.

use std::path::{Path, PathBuf};

use btf_rs::{Btf, BtfType, Member, Struct, Type};
use keepalive_ebpf::{FieldKind, KernelOffsets};

use crate::kernel::{hooks::HOOKS, kfunc::RdonlyCast};

/// Where the kernel exposes its own BTF (`CONFIG_DEBUG_INFO_BTF=y`).
pub(crate) const VMLINUX_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// How deep anonymous structs/unions and typedef chains may nest before the BTF is taken to be
/// malformed (the kernel nests anonymous members two or three levels deep).
const MAX_NESTING: usize = 32;

/// Which `timer_list` runs `tcp_keepalive_timer`, and which runs `tcp_write_timer`.
///
/// The keepalive timer's callback is what the programs hook (`timer_expire_entry` filtered on
/// `function == tcp_keepalive_timer`), and a socket closing inside the write timer is a
/// retransmission timeout rather than a keepalive abort, so the programs must know both timers.
/// Each is decided from the members the kernel has, never one from the other: the stable
/// backports added `icsk_keepalive_timer` but kept `icsk_retransmit_timer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerLayout {
    /// Up to 6.18 (and 6.1/6.12 before the backport): the keepalive timer (which doubles as the
    /// SYN-ACK and FIN_WAIT2 timer) is the generic `sock.sk_timer`, and the write
    /// (retransmit/probe0) timer is `inet_connection_sock.icsk_retransmit_timer`.
    SockTimer,
    /// The stable backport "tcp: introduce icsk->icsk_keepalive_timer" (Debian 6.1.192,
    /// 6.12.113+): the keepalive timer is `icsk_keepalive_timer`, the write timer is still
    /// `icsk_retransmit_timer`, and TCP leaves `sk_timer` unused.
    KeepaliveTimerBackport,
    /// 6.19+/7.x: the keepalive timer is `icsk_keepalive_timer`, `icsk_retransmit_timer` is gone
    /// and the write timer lives in `sock.sk_timer`.
    IcskKeepaliveTimer,
}

impl std::fmt::Display for TimerLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SockTimer => {
                "keepalive timer = sock.sk_timer, write timer = icsk_retransmit_timer"
            }
            Self::KeepaliveTimerBackport => {
                "keepalive timer = icsk_keepalive_timer, write timer = icsk_retransmit_timer \
                 (stable backport layout)"
            }
            Self::IcskKeepaliveTimer => {
                "keepalive timer = icsk_keepalive_timer, write timer = sock.sk_timer"
            }
        })
    }
}

/// Where each timer lives; the paths the decision is taken from.
const SK_TIMER: &str = "sock.sk_timer";
const ICSK_KEEPALIVE_TIMER: &str = "inet_connection_sock.icsk_keepalive_timer";
const ICSK_RETRANSMIT_TIMER: &str = "inet_connection_sock.icsk_retransmit_timer";
const TIMER: FieldKind = FieldKind::Struct("timer_list");

/// The programs get a `struct sock *` and read `inet_connection_sock` and `tcp_sock` fields
/// through it: that only works because each of these structs begins with the next one
/// (`inet_csk(sk)` and `tcp_sk(sk)` are casts in the kernel too). `socket_alloc` must begin
/// with its `socket` for `SOCK_INODE(sock)` to be an offset from the `struct socket *`.
const MUST_BEGIN_WITH: [(&str, &str); 5] = [
    ("tcp_sock.inet_conn", "inet_connection_sock"),
    ("inet_connection_sock.icsk_inet", "inet_sock"),
    ("inet_sock.sk", "sock"),
    ("sock.__sk_common", "sock_common"),
    ("socket_alloc.socket", "socket"),
];

/// `SOCK_INODE(sock)`: the socket's inode follows it in `socket_alloc`.
const SOCKET_INODE: &str = "socket_alloc.vfs_inode";
const INODE_NUMBER: &str = "inode.i_ino";
/// The socket's own copy of its inode number (6.18+).
const SOCK_INODE_NUMBER: &str = "sock.sk_ino";
/// `enum { LINUX_MIB_NUM = 0, ... }` (uapi `snmp.h`) has no name: found by its enumerator.
const LINUX_MIB_TCPKEEPALIVE: &str = "LINUX_MIB_TCPKEEPALIVE";
/// Bounds the index so that `index * 8` stays a sane offset into `linux_mib.mibs` (about 130
/// entries in 6.18).
const LINUX_MIB_LIMIT: u64 = 4096;
const BPF_ARRAY_PPTRS: &str = "bpf_array.pptrs";
/// `struct linux_mib { unsigned long mibs[LINUX_MIB_MAX]; }`: at 0 in every kernel so far.
const LINUX_MIB_MIBS: &str = "linux_mib.mibs";

/// The tracepoint typedef whose prototype says whether `tcp_send_reset` passes a reason.
const SEND_RESET_PROTOTYPE: &str = "btf_trace_tcp_send_reset";

/// Everything the agent needs to know about the running kernel's structure layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KernelLayout {
    /// The offsets written into the programs' `OFFSETS` global.
    pub offsets: KernelOffsets,
    /// Which timer is the keepalive timer (already reflected in `offsets`).
    pub timer_layout: TimerLayout,
    /// `SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT`: the `reason` of `tcp:tcp_send_reset` when the
    /// keepalive timer gives up on a peer. `None` on kernels before 6.12, which do not report
    /// active-reset reasons (the enum appeared in 6.10 with passive reasons only).
    pub rst_reason_keepalive_timeout: Option<u32>,
    /// `SK_RST_REASON_TCP_STATE`: the reason for resets sent by `tcp_abort` (`ss -K`) and for the
    /// orphaned FIN_WAIT2 timeout. `None` where the kernel does not have it.
    pub rst_reason_tcp_state: Option<u32>,
    /// The hooks ([`HOOKS`]) whose BTF tracepoint this kernel has: its `btf_trace_<name>`
    /// typedef, which the loader resolves `tp_btf/<name>` against.
    pub tracepoints: Vec<&'static str>,
    /// Where the listening sockets are, for the audit's walk (already in `offsets`).
    pub listen_table: ListenTable,
    /// `tcp:tcp_send_reset` passes `enum sk_rst_reason` as its fourth argument (6.10+). Before,
    /// its prototype is `(void *, const struct sock *, const struct sk_buff *)` and the verifier
    /// refuses a program that reads a fourth argument.
    pub(crate) send_reset_reason: bool,
    /// The kfunc `bpf_rdonly_cast` and `struct tcp_sock` (6.2+): the timer programs read the
    /// socket with typed loads. `None`: with helper calls.
    pub(crate) rdonly_cast: Option<RdonlyCast>,
}

/// Why the kernel's layout could not be determined. Every variant means the agent cannot run
/// correctly on this kernel; the messages say what to tell the operator.
#[derive(thiserror::Error, Debug)]
pub(crate) enum LayoutError {
    /// The BTF file could not be read at all.
    #[error(
        "cannot read kernel BTF from {}: {source} (the kernel must be built with \
         CONFIG_DEBUG_INFO_BTF=y)",
        path.display()
    )]
    BtfUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The BTF data could not be parsed, or refers to types it does not contain.
    #[error("kernel BTF is malformed ({context}): {source}")]
    BtfInvalid {
        context: String,
        #[source]
        source: btf_rs::Error,
    },
    /// The BTF nests types deeper than any kernel does (a loop in corrupt data).
    #[error("kernel BTF is malformed: `{path}` nests types more than {MAX_NESTING} levels deep")]
    TooDeep { path: String },
    /// A struct or enum the programs depend on is not described.
    #[error(
        "kernel BTF has no {kind} `{name}`: this kernel is not supported, or its BTF is incomplete"
    )]
    MissingType { kind: &'static str, name: String },
    /// A field the programs read does not exist under that name.
    #[error(
        "kernel BTF has no field `{path}` (no member `{member}` in {container}): this kernel's \
         layout is not supported, or its BTF is incomplete"
    )]
    MissingField {
        /// The full dotted path, e.g. `inet_connection_sock.icsk_ack.lrcvtime`.
        path: String,
        /// The component that was not found.
        member: String,
        /// The type that was searched, e.g. `struct sock_common`.
        container: String,
    },
    /// A field the programs read with a plain load is a bitfield.
    #[error(
        "`{path}` is a bitfield of {bits} bits (at bit {bit_offset}): the eBPF programs read whole \
         bytes, so this kernel's layout is not supported"
    )]
    Bitfield {
        path: String,
        bit_offset: u64,
        bits: u32,
    },
    /// A field does not start on a byte boundary.
    #[error(
        "`{path}` starts at bit {bit_offset}, not on a byte boundary: this kernel's layout is not \
         supported"
    )]
    Unaligned { path: String, bit_offset: u64 },
    /// A field is not the type or size the programs read it as.
    #[error(
        "`{path}` is {found}, but the eBPF programs read it as {expected}: this kernel's layout \
         is not supported"
    )]
    UnexpectedType {
        path: String,
        expected: String,
        found: String,
    },
    /// A dotted path goes through a member that is not a struct or union.
    #[error("`{path}` cannot be followed: it is {found}, not a struct or union")]
    NotComposite { path: String, found: String },
    /// A struct that must begin with another (`tcp_sock` → `inet_connection_sock` → `inet_sock`
    /// → `sock` → `sock_common`) does not, so offsets within it are not offsets from `sock`.
    #[error(
        "`{path}` is at byte {offset}, but the kernel's socket structs must begin with it: this \
         kernel's layout is not supported"
    )]
    NotAtStart { path: String, offset: u32 },
    /// An enum the programs depend on lacks a value.
    #[error(
        "kernel BTF enum `{enum_name}` has no value `{name}`: this kernel is not supported, or its \
         BTF is incomplete"
    )]
    MissingEnumValue { enum_name: String, name: String },
    /// An enum value is outside the range the programs can use.
    #[error("`{enum_name}::{name}` is {value}, outside the range 0..{limit} the eBPF programs use")]
    EnumValueOutOfRange {
        enum_name: String,
        name: String,
        value: i128,
        limit: u64,
    },
    /// A field declared computed in [`KernelOffsets`] that this module does not compute: the
    /// agent and its kernel programs were built from different declarations.
    #[error("`{field}` is declared computed from {source_desc}, but the agent does not compute it")]
    NotComputed {
        field: &'static str,
        source_desc: &'static str,
    },
    /// A byte offset does not fit the programs' `u32` offsets.
    #[error("`{path}` is at bit {bit_offset}, beyond the u32 byte offsets the eBPF programs use")]
    OffsetOverflow { path: String, bit_offset: u64 },
}

/// The running kernel's raw BTF, read once per [`crate::kernel::Session`].
pub(crate) fn read_vmlinux_btf() -> Result<Vec<u8>, LayoutError> {
    read_btf(Path::new(VMLINUX_BTF_PATH))
}

fn read_btf(path: &Path) -> Result<Vec<u8>, LayoutError> {
    crate::files::read_bounded(path, crate::files::cap::BTF).map_err(|source| {
        LayoutError::BtfUnreadable {
            path: path.to_path_buf(),
            source,
        }
    })
}

impl KernelLayout {
    /// Reads the running kernel's BTF from [`VMLINUX_BTF_PATH`].
    #[cfg(test)]
    pub(crate) fn from_vmlinux() -> Result<Self, LayoutError> {
        Self::from_btf_bytes(&read_vmlinux_btf()?)
    }

    /// Reads raw BTF (the format of `/sys/kernel/btf/vmlinux`) from a file.
    #[cfg(test)]
    pub(crate) fn from_path(path: impl AsRef<Path>) -> Result<Self, LayoutError> {
        Self::from_btf_bytes(&read_btf(path.as_ref())?)
    }

    /// Parses raw BTF bytes (a base BTF blob, not split module BTF).
    pub(crate) fn from_btf_bytes(bytes: &[u8]) -> Result<Self, LayoutError> {
        let btf = Btf::from_bytes(bytes).map_err(|source| LayoutError::BtfInvalid {
            context: "parsing".to_string(),
            source,
        })?;
        Self::from_btf(&btf)
    }

    /// Computes the layout from already parsed BTF.
    pub(crate) fn from_btf(btf: &Btf) -> Result<Self, LayoutError> {
        let r = Resolver { btf };
        for (path, struct_name) in MUST_BEGIN_WITH {
            r.check_at_start(path, struct_name)?;
        }
        let timers = Timers::resolve(&r)?;

        let listen_table = ListenTable::resolve(&r)?;
        let conntrack = Conntrack::resolve(&r)?;
        let mut offsets = KernelOffsets::default();
        for (field, slot) in KernelOffsets::FIELDS.iter().zip(offsets.fields_mut()) {
            *slot = match (field.kind, field.name) {
                (FieldKind::Computed, "keepalive_timer") => timers.keepalive,
                (FieldKind::Computed, "write_timer") => timers.write,
                (FieldKind::Computed, "sock_flag_dead") => {
                    r.required_enum_value("sock_flags", "SOCK_DEAD", 64)?
                }
                (FieldKind::Computed, "sock_flag_keepopen") => {
                    r.required_enum_value("sock_flags", "SOCK_KEEPOPEN", 64)?
                }
                // `SOCK_INODE(sock)`: `socket_alloc` begins with the socket (checked above).
                (FieldKind::Computed, "socket_ino") => {
                    r.offset(SOCKET_INODE, FieldKind::Struct("inode"))?
                        + r.offset(INODE_NUMBER, FieldKind::Int(8))?
                }
                (FieldKind::Computed, "sk_ino") => r
                    .optional_offset(SOCK_INODE_NUMBER, FieldKind::Int(8))?
                    .unwrap_or(0),
                (FieldKind::Computed, "net_cookie_lazy") => {
                    u32::from(!matches!(r.field(NET_COOKIE)?.ty, Type::Int(_)))
                }
                (FieldKind::Computed, "icsk_probes_tstamp") => r
                    .optional_offset(ICSK_PROBES_TSTAMP, FieldKind::Int(4))?
                    .unwrap_or(0),
                (FieldKind::Computed, "net_ct_tcp_established") => conntrack.established,
                (FieldKind::Computed, "net_defrag_ipv4") => conntrack.defrag_ipv4,
                (FieldKind::Computed, "net_defrag_ipv6") => conntrack.defrag_ipv6,
                (FieldKind::Computed, "net_defrag_is_bool") => u32::from(conntrack.defrag_is_bool),
                (FieldKind::Computed, "net_hooks_ipv4_local_in") => conntrack.confirm.ipv4,
                (FieldKind::Computed, "net_hooks_ipv6_local_in") => conntrack.confirm.ipv6,
                (FieldKind::Computed, "nf_hook_entries_hooks") => conntrack.confirm.entries_hooks,
                (FieldKind::Computed, "nf_hook_entry_size") => conntrack.confirm.entry_size,
                (FieldKind::Computed, "nf_hook_ops_priority") => conntrack.confirm.ops_priority,
                (FieldKind::Computed, "mib_tcp_keepalive") => {
                    r.field(LINUX_MIB_MIBS)?.byte_offset
                        + r.anonymous_enum_value(LINUX_MIB_TCPKEEPALIVE, LINUX_MIB_LIMIT)? * 8
                }
                // A flexible array in an anonymous union: no size to check.
                (FieldKind::Computed, "bpf_array_pptrs") => r.field(BPF_ARRAY_PPTRS)?.byte_offset,
                (FieldKind::Computed, "ehash_bucket_size") => r.struct_size("inet_ehash_bucket")?,
                (FieldKind::Computed, "listen_bucket_size") => {
                    r.struct_size("inet_listen_hashbucket")?
                }
                (FieldKind::Computed, "hashinfo_listen") => listen_table.offset(),
                (FieldKind::Computed, "listen_inline_buckets") => listen_table.inline_buckets(),
                (FieldKind::Computed, _) => {
                    return Err(LayoutError::NotComputed {
                        field: field.name,
                        source_desc: field.source,
                    });
                }
                (kind, _) => r.offset(field.source, kind)?,
            };
        }

        let has = |name: &str| {
            btf.resolve_ids_by_name(name)
                .is_ok_and(|ids| !ids.is_empty())
        };
        let tracepoints = HOOKS
            .iter()
            .map(|hook| hook.tracepoint)
            .filter(|tracepoint| has(&format!("btf_trace_{tracepoint}")))
            .collect();

        let rst_limit = u64::from(u32::MAX) + 1;
        Ok(Self {
            tracepoints,
            listen_table,
            send_reset_reason: r.send_reset_has_reason()?,
            rdonly_cast: RdonlyCast::resolve(btf),
            offsets,
            timer_layout: timers.layout,
            rst_reason_keepalive_timeout: r.optional_enum_value(
                "sk_rst_reason",
                "SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT",
                rst_limit,
            )?,
            rst_reason_tcp_state: r.optional_enum_value(
                "sk_rst_reason",
                "SK_RST_REASON_TCP_STATE",
                rst_limit,
            )?,
        })
    }
}

/// Where `struct inet_hashinfo` keeps its listening sockets. Both tables chain them through
/// `skc_nulls_node` from an `inet_listen_hashbucket.nulls_head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListenTable {
    /// Up to 5.18: the array `listening_hash[buckets]` inside the struct, at `offset` (its
    /// `lhash2` chains through `icsk_listen_portaddr_node` instead, so it is not walked).
    Inline { offset: u32, buckets: u32 },
    /// 5.19+: `lhash2`, a pointer at `offset` to `lhash2_mask + 1` buckets.
    Lhash2 { offset: u32 },
}

const LISTENING_HASH: &str = "inet_hashinfo.listening_hash";
const NET_COOKIE: &str = "net.net_cookie";
const LHASH2: &str = "inet_hashinfo.lhash2";

impl ListenTable {
    fn resolve(r: &Resolver<'_>) -> Result<Self, LayoutError> {
        match r.field(LISTENING_HASH) {
            Ok(Field {
                byte_offset,
                ty: Type::Array(array),
            }) => Ok(Self::Inline {
                offset: byte_offset,
                buckets: u32::try_from(array.len()).unwrap_or(u32::MAX),
            }),
            Ok(other) => Err(LayoutError::UnexpectedType {
                path: LISTENING_HASH.to_owned(),
                expected: "an array of struct inet_listen_hashbucket".to_owned(),
                found: r.describe(&other.ty),
            }),
            Err(e) if e.is_missing_member(LISTENING_HASH) => Ok(Self::Lhash2 {
                offset: r.offset(LHASH2, FieldKind::Pointer)?,
            }),
            Err(e) => Err(e),
        }
    }

    fn offset(self) -> u32 {
        match self {
            Self::Inline { offset, .. } | Self::Lhash2 { offset } => offset,
        }
    }

    fn inline_buckets(self) -> u32 {
        match self {
            Self::Inline { buckets, .. } => buckets,
            Self::Lhash2 { .. } => 0,
        }
    }

    /// For `check` and the start-up log.
    pub(crate) fn describe(self) -> String {
        match self {
            Self::Inline { buckets, .. } => format!("listeners in listening_hash[{buckets}]"),
            Self::Lhash2 { .. } => "listeners in lhash2".to_owned(),
        }
    }
}

/// Where `struct net` keeps the namespace's conntrack TCP established timeout and whether
/// conntrack is attached to it; 0 offsets where the kernel has no conntrack (the programs then
/// report no conntrack threshold).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Conntrack {
    established: u32,
    defrag_ipv4: u32,
    defrag_ipv6: u32,
    defrag_is_bool: bool,
    /// Where conntrack's confirm hook shows it is attached (see [`ConfirmHook`]); all 0 when
    /// the kernel's types do not say, and the defragmentation users alone decide.
    confirm: ConfirmHook,
}

/// How the programs find whether conntrack is attached to a namespace for a family, past
/// defragmentation (which TPROXY and `xt_socket` also enable, without conntrack): the last of
/// the namespace's `NF_INET_LOCAL_IN` hooks (`net.nf.hooks_ipv{4,6}[NF_INET_LOCAL_IN]`, sorted
/// by priority) has conntrack's `NF_IP_PRI_CONNTRACK_CONFIRM` (`INT_MAX`). Its `nf_hook_ops`
/// pointer lies past the `struct nf_hook_entry` array (`nf_hook_entries_get_hook_ops`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ConfirmHook {
    /// Offsets in `struct net` of the two `NF_INET_LOCAL_IN` pointers.
    ipv4: u32,
    ipv6: u32,
    /// `nf_hook_entries.hooks`, `sizeof(struct nf_hook_entry)`, `nf_hook_ops.priority`.
    entries_hooks: u32,
    entry_size: u32,
    ops_priority: u32,
}

const CT_TCP_TIMEOUTS: &str = "net.ct.nf_ct_proto.tcp.timeouts";
/// 5.11, and 5.10's stable updates ("tcp: fix TCP_USER_TIMEOUT with zero window").
const ICSK_PROBES_TSTAMP: &str = "inet_connection_sock.icsk_probes_tstamp";

impl Conntrack {
    fn resolve(r: &Resolver<'_>) -> Result<Self, LayoutError> {
        let timeouts = match r.field(CT_TCP_TIMEOUTS) {
            Ok(Field {
                byte_offset,
                ty: Type::Array(array),
            }) => Some((byte_offset, array.len())),
            Ok(other) => {
                return Err(LayoutError::UnexpectedType {
                    path: CT_TCP_TIMEOUTS.to_owned(),
                    expected: "an array of unsigned int".to_owned(),
                    found: r.describe(&other.ty),
                });
            }
            Err(e) if e.is_missing_on_the_way(CT_TCP_TIMEOUTS) => None,
            Err(e) => return Err(e),
        };
        let Some((timeouts, len)) = timeouts else {
            return Ok(Self::default());
        };
        let Some(index) = r.optional_enum_value(
            "tcp_conntrack",
            "TCP_CONNTRACK_ESTABLISHED",
            u64::try_from(len).unwrap_or(0),
        )?
        else {
            return Ok(Self::default());
        };
        let users = |family: &str| -> Result<(u32, bool), LayoutError> {
            let counter = format!("net.nf.defrag_{family}_users");
            if let Some(at) = r.optional_offset(&counter, FieldKind::Int(4))? {
                return Ok((at, false));
            }
            let flag = format!("net.nf.defrag_{family}");
            Ok(match r.optional_offset(&flag, FieldKind::Int(1))? {
                Some(at) => (at, true),
                None => (0, false),
            })
        };
        let (defrag_ipv4, ipv4_bool) = users("ipv4")?;
        let (defrag_ipv6, ipv6_bool) = users("ipv6")?;
        if defrag_ipv4 == 0 {
            // Without the IPv4 member nothing tells whether conntrack tracks the namespace.
            return Ok(Self::default());
        }
        Ok(Self {
            established: timeouts + 4 * index,
            confirm: ConfirmHook::resolve(r)?.unwrap_or_default(),
            defrag_ipv4,
            // One load width for both: a kernel with one member of each kind is not one the
            // programs know how to read.
            defrag_ipv6: if ipv6_bool == ipv4_bool {
                defrag_ipv6
            } else {
                0
            },
            defrag_is_bool: ipv4_bool,
        })
    }
}

const NF_HOOKS_IPV4: &str = "net.nf.hooks_ipv4";
const NF_HOOKS_IPV6: &str = "net.nf.hooks_ipv6";
const NF_HOOK_ENTRIES_HOOKS: &str = "nf_hook_entries.hooks";
const NF_HOOK_OPS_PRIORITY: &str = "nf_hook_ops.priority";

impl ConfirmHook {
    /// `None` when a type or member is missing (no netfilter, or a layout the programs do
    /// not know): then defragmentation users alone say whether conntrack is attached.
    fn resolve(r: &Resolver<'_>) -> Result<Option<Self>, LayoutError> {
        let Some(local_in) = r.optional_enum_value("nf_inet_hooks", "NF_INET_LOCAL_IN", 16)? else {
            return Ok(None);
        };
        let hook_pointer = |path: &str| -> Result<Option<u32>, LayoutError> {
            match r.field(path) {
                Ok(Field {
                    byte_offset,
                    ty: Type::Array(array),
                }) if array.len() > local_in as usize => Ok(Some(byte_offset + 8 * local_in)),
                Ok(other) => Err(LayoutError::UnexpectedType {
                    path: path.to_owned(),
                    expected: format!("an array of more than {local_in} pointers"),
                    found: r.describe(&other.ty),
                }),
                Err(e) if e.is_missing_on_the_way(path) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let (Some(ipv4), ipv6) = (hook_pointer(NF_HOOKS_IPV4)?, hook_pointer(NF_HOOKS_IPV6)?)
        else {
            return Ok(None);
        };
        let entries_hooks = match r.field(NF_HOOK_ENTRIES_HOOKS) {
            Ok(field) => field.byte_offset,
            Err(e) if e.is_missing_on_the_way(NF_HOOK_ENTRIES_HOOKS) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(ops_priority) = r.optional_offset(NF_HOOK_OPS_PRIORITY, FieldKind::Int(4))? else {
            return Ok(None);
        };
        Ok(Some(Self {
            ipv4,
            ipv6: ipv6.unwrap_or(0),
            entries_hooks,
            entry_size: r.struct_size("nf_hook_entry")?,
            ops_priority,
        }))
    }
}

/// Both TCP timers of this kernel.
struct Timers {
    layout: TimerLayout,
    keepalive: u32,
    write: u32,
}

impl Timers {
    fn resolve(r: &Resolver<'_>) -> Result<Self, LayoutError> {
        let keepalive = r.optional_offset(ICSK_KEEPALIVE_TIMER, TIMER)?;
        Ok(match (keepalive, r.offset(ICSK_RETRANSMIT_TIMER, TIMER)) {
            (None, Ok(write)) => Self {
                layout: TimerLayout::SockTimer,
                keepalive: r.offset(SK_TIMER, TIMER)?,
                write,
            },
            (Some(keepalive), Ok(write)) => Self {
                layout: TimerLayout::KeepaliveTimerBackport,
                keepalive,
                write,
            },
            (Some(keepalive), Err(e)) if e.is_missing_member(ICSK_RETRANSMIT_TIMER) => Self {
                layout: TimerLayout::IcskKeepaliveTimer,
                keepalive,
                write: r.offset(SK_TIMER, TIMER)?,
            },
            // Neither icsk timer: the error names the one every kernel before 6.19 has.
            (_, Err(e)) => return Err(e),
        })
    }
}

impl LayoutError {
    /// `path` or any struct on the way to it is missing a member (a kernel built without the
    /// feature that adds it).
    fn is_missing_on_the_way(&self, path: &str) -> bool {
        matches!(self, Self::MissingField { path: p, .. } if p == path)
    }

    /// Whether this is `path` missing its last member (and not a missing struct or
    /// intermediate member on the way to it).
    fn is_missing_member(&self, path: &str) -> bool {
        matches!(self, Self::MissingField { path: p, member, .. }
            if p == path && path.rsplit('.').next() == Some(member.as_str()))
    }
}

fn describe_kind(kind: FieldKind) -> String {
    match kind {
        FieldKind::Int(n) => format!("a {n}-byte integer"),
        FieldKind::Bytes(n) => format!("{n} bytes"),
        FieldKind::Pointer => "an 8-byte pointer".to_string(),
        FieldKind::Struct(name) => format!("struct {name}"),
        FieldKind::Computed => "a computed value".to_string(),
    }
}

/// A resolved field: its byte offset from the start of the path's root struct and its type
/// (typedefs and qualifiers stripped).
struct Field {
    byte_offset: u32,
    ty: Type,
}

/// Lookups in one parsed BTF.
struct Resolver<'a> {
    btf: &'a Btf,
}

impl Resolver<'_> {
    fn invalid(context: impl Into<String>) -> impl FnOnce(btf_rs::Error) -> LayoutError {
        let context = context.into();
        move |source| LayoutError::BtfInvalid { context, source }
    }

    /// The named struct that starts a dotted path. Forward declarations and other kinds that
    /// share the name (a function called `sock`, say) are skipped.
    fn root_struct(&self, name: &str) -> Result<Struct, LayoutError> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(Self::invalid(format!("looking up struct {name}")))?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .ok_or_else(|| LayoutError::MissingType {
                kind: "struct",
                name: name.to_string(),
            })
    }

    /// Follows typedefs and `const`/`volatile`/`restrict`/type tags to the underlying type
    /// (`skc_state` is `volatile unsigned char`, `skc_net` is the typedef `possible_net_t`).
    fn strip(&self, mut ty: Type, path: &str) -> Result<Type, LayoutError> {
        for _ in 0..MAX_NESTING {
            ty = match &ty {
                Type::Typedef(t) => self.chained(t, path)?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => self.chained(t, path)?,
                Type::TypeTag(t) => self.chained(t, path)?,
                _ => return Ok(ty),
            };
        }
        Err(LayoutError::TooDeep {
            path: path.to_string(),
        })
    }

    fn chained<T: BtfType + ?Sized>(&self, t: &T, path: &str) -> Result<Type, LayoutError> {
        self.btf
            .resolve_chained_type(t)
            .map_err(Self::invalid(format!("resolving the type of `{path}`")))
    }

    fn name_of(&self, t: &dyn BtfType, path: &str) -> Result<String, LayoutError> {
        self.btf
            .resolve_name(t)
            .map_err(Self::invalid(format!("resolving a name under `{path}`")))
    }

    /// Finds `name` among the members of `s`, looking inside anonymous struct and union members
    /// the way C does (`skc_daddr` sits in an anonymous struct inside an anonymous union of
    /// `sock_common`). Returns the member and its bit offset from the start of `s`.
    fn find_member(
        &self,
        s: &Struct,
        name: &str,
        path: &str,
        depth: usize,
    ) -> Result<Option<(u64, Member)>, LayoutError> {
        if depth > MAX_NESTING {
            return Err(LayoutError::TooDeep {
                path: path.to_string(),
            });
        }
        for m in &s.members {
            let member_name = self.name_of(m, path)?;
            if member_name == name {
                return Ok(Some((u64::from(m.bit_offset()), m.clone())));
            }
            if !member_name.is_empty() {
                continue;
            }
            // Unnamed: an anonymous struct/union to search, or padding (`int :3`) to skip.
            let inner = self.strip(self.chained(m, path)?, path)?;
            if let Type::Struct(inner) | Type::Union(inner) = inner
                && let Some((offset, found)) = self.find_member(&inner, name, path, depth + 1)?
            {
                return Ok(Some((u64::from(m.bit_offset()) + offset, found)));
            }
        }
        Ok(None)
    }

    /// Resolves a dotted path such as `sock.__sk_common.skc_daddr`: the first component is a
    /// struct, each further one a member (named or reached through anonymous members).
    fn field(&self, path: &str) -> Result<Field, LayoutError> {
        let mut components = path.split('.');
        let root_name = components.next().unwrap_or_default();
        let root = self.root_struct(root_name)?;
        let mut container = self.describe(&Type::Struct(root.clone()));
        let mut current = Type::Struct(root);
        let mut bit_offset: u64 = 0;
        // The prefix of `path` resolved so far, for errors about an intermediate member.
        let mut walked = root_name.to_string();
        for component in components {
            let composite = match &current {
                Type::Struct(s) | Type::Union(s) => s,
                other => {
                    return Err(LayoutError::NotComposite {
                        path: walked,
                        found: self.describe(other),
                    });
                }
            };
            walked.push('.');
            walked.push_str(component);
            let Some((relative, member)) = self.find_member(composite, component, path, 0)? else {
                return Err(LayoutError::MissingField {
                    path: path.to_string(),
                    member: component.to_string(),
                    container,
                });
            };
            bit_offset += relative;
            // With kind_flag set, every member carries a bitfield size; 0 means a plain member.
            if let Some(bits) = member.bitfield_size()
                && bits != 0
            {
                return Err(LayoutError::Bitfield {
                    path: walked,
                    bit_offset,
                    bits,
                });
            }
            current = self.strip(self.chained(&member, &walked)?, &walked)?;
            container = self.describe(&current);
        }
        if !bit_offset.is_multiple_of(8) {
            return Err(LayoutError::Unaligned {
                path: walked,
                bit_offset,
            });
        }
        let byte_offset =
            u32::try_from(bit_offset / 8).map_err(|_| LayoutError::OffsetOverflow {
                path: walked,
                bit_offset,
            })?;
        Ok(Field {
            byte_offset,
            ty: current,
        })
    }

    /// The byte offset of `path`, after checking its type is what the programs read.
    fn offset(&self, path: &str, expect: FieldKind) -> Result<u32, LayoutError> {
        let field = self.field(path)?;
        let ok = match expect {
            FieldKind::Int(n) => match &field.ty {
                Type::Int(i) => i.size() == n,
                Type::Enum(e) => e.size() == n,
                Type::Enum64(e) => e.size() == n,
                _ => false,
            },
            FieldKind::Bytes(n) => self.size_of(&field.ty, path, 0)? == Some(n),
            FieldKind::Pointer => matches!(field.ty, Type::Ptr(_)),
            FieldKind::Struct(name) => match &field.ty {
                Type::Struct(s) => self.name_of(s, path)? == name,
                _ => false,
            },
            FieldKind::Computed => false,
        };
        if !ok {
            return Err(LayoutError::UnexpectedType {
                path: path.to_string(),
                expected: describe_kind(expect),
                found: self.describe(&field.ty),
            });
        }
        Ok(field.byte_offset)
    }

    /// The byte offset of `path`, or `None` when its last member does not exist.
    fn optional_offset(&self, path: &str, expect: FieldKind) -> Result<Option<u32>, LayoutError> {
        match self.offset(path, expect) {
            Ok(offset) => Ok(Some(offset)),
            Err(e) if e.is_missing_member(path) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks that `path` is at offset 0 and is a `struct_name`.
    fn check_at_start(&self, path: &str, struct_name: &'static str) -> Result<(), LayoutError> {
        match self.offset(path, FieldKind::Struct(struct_name))? {
            0 => Ok(()),
            offset => Err(LayoutError::NotAtStart {
                path: path.to_string(),
                offset,
            }),
        }
    }

    fn size_of(&self, ty: &Type, path: &str, depth: usize) -> Result<Option<usize>, LayoutError> {
        if depth > MAX_NESTING {
            return Err(LayoutError::TooDeep {
                path: path.to_string(),
            });
        }
        Ok(match ty {
            Type::Int(i) => Some(i.size()),
            Type::Enum(e) => Some(e.size()),
            Type::Enum64(e) => Some(e.size()),
            Type::Float(f) => Some(f.size()),
            Type::Struct(s) | Type::Union(s) => Some(s.size()),
            Type::Ptr(_) => Some(8),
            Type::Array(a) => {
                let elem = self.strip(self.chained(a, path)?, path)?;
                self.size_of(&elem, path, depth + 1)?
                    .and_then(|size| size.checked_mul(a.len()))
            }
            _ => None,
        })
    }

    /// `sizeof(struct name)`, to step through an array of them.
    fn struct_size(&self, name: &str) -> Result<u32, LayoutError> {
        let size = self.root_struct(name)?.size();
        u32::try_from(size)
            .ok()
            .filter(|&size| size > 0)
            .ok_or_else(|| LayoutError::UnexpectedType {
                path: name.to_owned(),
                expected: "a struct of 1 to 2^32 bytes".to_owned(),
                found: format!("{size} bytes"),
            })
    }

    /// A human description of a type for error messages.
    fn describe(&self, ty: &Type) -> String {
        match ty {
            Type::Int(i) => format!("a {}-byte integer", i.size()),
            Type::Enum(e) => format!("a {}-byte enum", e.size()),
            Type::Enum64(e) => format!("a {}-byte enum", e.size()),
            Type::Ptr(_) => "a pointer".to_string(),
            Type::Struct(s) | Type::Union(s) => {
                let kind = if matches!(ty, Type::Union(_)) {
                    "union"
                } else {
                    "struct"
                };
                match self.btf.resolve_name(s) {
                    Ok(name) if !name.is_empty() => format!("{kind} {name} ({} bytes)", s.size()),
                    _ => format!("an anonymous {kind} ({} bytes)", s.size()),
                }
            }
            Type::Array(a) => format!("an array of {} elements", a.len()),
            other => format!("a BTF {}", other.name()),
        }
    }

    /// Whether `tcp:tcp_send_reset` passes its reason: the tracepoint's typedef (a pointer to
    /// the probe's prototype) has a fourth parameter of type `enum sk_rst_reason`. False without
    /// the typedef, or with the `(void *, sock *, sk_buff *)` prototype of kernels before 6.10.
    fn send_reset_has_reason(&self) -> Result<bool, LayoutError> {
        let path = SEND_RESET_PROTOTYPE;
        let types = self
            .btf
            .resolve_types_by_name(path)
            .map_err(Self::invalid(format!("looking up {path}")))?;
        for ty in types {
            let Type::Typedef(typedef) = ty else { continue };
            let Type::Ptr(ptr) = self.strip(self.chained(&typedef, path)?, path)? else {
                continue;
            };
            let Type::FuncProto(proto) = self.strip(self.chained(&ptr, path)?, path)? else {
                continue;
            };
            let Some(reason) = proto.parameters.get(3) else {
                return Ok(false);
            };
            return Ok(match self.strip(self.chained(reason, path)?, path)? {
                Type::Enum(e) => self.name_of(&e, path)? == "sk_rst_reason",
                Type::Enum64(e) => self.name_of(&e, path)? == "sk_rst_reason",
                _ => false,
            });
        }
        Ok(false)
    }

    /// The value of enumerator `name` in `enum enum_name`; `Ok(None)` when the enum or the
    /// value does not exist. Values must be in `0..limit`.
    fn optional_enum_value(
        &self,
        enum_name: &str,
        name: &str,
        limit: u64,
    ) -> Result<Option<u32>, LayoutError> {
        self.enumerator_value(enum_name, enum_name, name, limit)
    }

    /// The value of enumerator `name` of an enum without a name (`enum { LINUX_MIB_NUM, ... }`),
    /// the first such enum that has it: BTF indexes types without a name under `""`.
    fn anonymous_enum_value(&self, name: &str, limit: u64) -> Result<u32, LayoutError> {
        const ANONYMOUS: &str = "(anonymous)";
        self.enumerator_value("", ANONYMOUS, name, limit)?
            .ok_or_else(|| LayoutError::MissingEnumValue {
                enum_name: ANONYMOUS.to_string(),
                name: name.to_string(),
            })
    }

    /// [`Self::optional_enum_value`] among the enums BTF names `lookup`, called `enum_name` in
    /// errors.
    fn enumerator_value(
        &self,
        lookup: &str,
        enum_name: &str,
        name: &str,
        limit: u64,
    ) -> Result<Option<u32>, LayoutError> {
        let context = || format!("looking up enum {enum_name}");
        let types = self
            .btf
            .resolve_types_by_name(lookup)
            .map_err(Self::invalid(context()))?;
        for ty in types {
            let value: Option<i128> = match &ty {
                Type::Enum(e) => {
                    let mut found = None;
                    for m in &e.members {
                        if self.name_of(m, enum_name)? == name {
                            // BTF stores 32 bits; the kind flag says whether they are signed.
                            found = Some(if e.is_signed() {
                                i128::from(m.val() as i32)
                            } else {
                                i128::from(m.val())
                            });
                            break;
                        }
                    }
                    found
                }
                Type::Enum64(e) => {
                    let mut found = None;
                    for m in &e.members {
                        if self.name_of(m, enum_name)? == name {
                            found = Some(if e.is_signed() {
                                i128::from(m.val() as i64)
                            } else {
                                i128::from(m.val())
                            });
                            break;
                        }
                    }
                    found
                }
                _ => continue,
            };
            let Some(value) = value else { continue };
            return match u32::try_from(value) {
                Ok(v) if u64::from(v) < limit => Ok(Some(v)),
                _ => Err(LayoutError::EnumValueOutOfRange {
                    enum_name: enum_name.to_string(),
                    name: name.to_string(),
                    value,
                    limit,
                }),
            };
        }
        Ok(None)
    }

    fn required_enum_value(
        &self,
        enum_name: &str,
        name: &str,
        limit: u64,
    ) -> Result<u32, LayoutError> {
        let exists = self
            .btf
            .resolve_types_by_name(enum_name)
            .map_err(Self::invalid(format!("looking up enum {enum_name}")))?
            .iter()
            .any(|t| matches!(t, Type::Enum(_) | Type::Enum64(_)));
        if !exists {
            return Err(LayoutError::MissingType {
                kind: "enum",
                name: enum_name.to_string(),
            });
        }
        self.optional_enum_value(enum_name, name, limit)?
            .ok_or_else(|| LayoutError::MissingEnumValue {
                enum_name: enum_name.to_string(),
                name: name.to_string(),
            })
    }
}

pub(crate) mod ipvs;

#[cfg(test)]
mod btf_builder;
#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod synthetic;
#[cfg(test)]
mod tests;
