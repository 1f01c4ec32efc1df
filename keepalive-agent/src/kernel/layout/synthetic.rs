//! A synthetic kernel generated from [`KernelOffsets::FIELDS`]: every field the programs read
//! gets a member at an offset of its own, so a new table entry is in the test kernel (and in the
//! expected offsets) without touching this file. The members are wrapped the ways the real
//! kernel wraps them — anonymous unions of anonymous structs (`sock_common`), typedefs
//! (`__be32`, `possible_net_t`), `volatile` (`skc_state`), bitfields next to the fields read,
//! socket structs nested at offset 0 — so the resolver is exercised on each shape.

use std::collections::HashMap;

use keepalive_ebpf::{FieldKind, KernelOffsets};

use super::btf_builder::{BtfBuilder, M, bf, m};
use super::{
    BPF_ARRAY_PPTRS, ICSK_KEEPALIVE_TIMER, ICSK_RETRANSMIT_TIMER, INODE_NUMBER, LHASH2,
    LINUX_MIB_MIBS, LINUX_MIB_TCPKEEPALIVE, MUST_BEGIN_WITH, SEND_RESET_PROTOTYPE, SK_TIMER,
    SOCKET_INODE, TIMER, TimerLayout,
};

/// The member that gives `struct inet_ehash_bucket` its size.
const EHASH_BUCKET_CHAIN: &str = "inet_ehash_bucket.chain";

/// `enum sock_flags` of the synthetic kernel (the real numbers: they are looked up by name).
const SOCK_FLAGS: [(&str, u32); 5] = [
    ("SOCK_DEAD", 0),
    ("SOCK_DONE", 1),
    ("SOCK_URGINLINE", 2),
    ("SOCK_KEEPOPEN", 3),
    ("SOCK_LINGER", 4),
];

/// The anonymous `enum { LINUX_MIB_NUM = 0, ... }` of the synthetic kernel, deliberately not
/// the real numbers. An anonymous enum without the enumerator comes first, so the resolver
/// must look past it.
const LINUX_MIB: [(&str, u32); 3] = [
    ("LINUX_MIB_NUM", 0),
    ("LINUX_MIB_SYNCOOKIESSENT", 1),
    (LINUX_MIB_TCPKEEPALIVE, 77),
];

/// `enum sk_rst_reason` with active reasons (6.12+), deliberately not the real numbers.
pub(super) const RST_REASONS: [(&str, u32); 3] = [
    ("SK_RST_REASON_NOT_SPECIFIED", 0),
    ("SK_RST_REASON_TCP_STATE", 21),
    ("SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT", 22),
];

/// The prototype of `btf_trace_tcp_send_reset`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum SendReset {
    #[default]
    Absent,
    /// `(void *, const struct sock *, const struct sk_buff *)`: before 6.10.
    SockSkb,
    /// `(..., const enum sk_rst_reason)`: 6.10+.
    WithReason,
}

/// Variations of the synthetic kernel. The mutations name a dotted path of the table.
#[derive(Clone, Copy, Debug)]
pub(super) struct Synth {
    pub(super) timers: TimerLayout,
    /// Has `enum sk_rst_reason` with active reasons (6.12+).
    pub(super) rst_reasons: bool,
    pub(super) send_reset: SendReset,
    /// Leaves this member out (its container stays); `LINUX_MIB_TCPKEEPALIVE` leaves out the
    /// anonymous enum that has it.
    pub(super) omit: Option<&'static str>,
    /// Makes this member a bitfield of its own width.
    pub(super) bitfield: Option<&'static str>,
    /// Makes this integer twice as wide.
    pub(super) widen: Option<&'static str>,
    /// Moves this member 4 bits past a byte boundary.
    pub(super) unaligned: Option<&'static str>,
}

impl Default for Synth {
    fn default() -> Self {
        Self {
            timers: TimerLayout::SockTimer,
            rst_reasons: false,
            send_reset: SendReset::Absent,
            omit: None,
            bitfield: None,
            widen: None,
            unaligned: None,
        }
    }
}

pub(super) struct SyntheticKernel {
    pub(super) btf: Vec<u8>,
    /// Byte offset of every member placed, by dotted path from its root struct.
    placed: HashMap<String, u32>,
    /// Size of every named struct emitted.
    sizes: HashMap<String, u32>,
    synth: Synth,
}

impl SyntheticKernel {
    /// Where `path` was placed, from the start of its root struct.
    pub(super) fn offset_of(&self, path: &str) -> u32 {
        let mut components = path.split('.');
        let mut walked = components.next().unwrap_or_default().to_string();
        let mut offset = 0;
        for component in components {
            walked.push('.');
            walked.push_str(component);
            offset += self.placed[&walked];
        }
        offset
    }

    /// What the resolver must find: every field of the table, the computed ones from the
    /// members they are computed from.
    pub(super) fn expected_offsets(&self) -> KernelOffsets {
        let (keepalive, write) = match self.synth.timers {
            TimerLayout::SockTimer => (SK_TIMER, ICSK_RETRANSMIT_TIMER),
            TimerLayout::KeepaliveTimerBackport => (ICSK_KEEPALIVE_TIMER, ICSK_RETRANSMIT_TIMER),
            TimerLayout::IcskKeepaliveTimer => (ICSK_KEEPALIVE_TIMER, SK_TIMER),
        };
        let flag = |name: &str| SOCK_FLAGS.iter().find(|(n, _)| *n == name).map(|f| f.1);
        let mut offsets = KernelOffsets::default();
        for (field, slot) in KernelOffsets::FIELDS.iter().zip(offsets.fields_mut()) {
            *slot = match (field.kind, field.name) {
                (FieldKind::Computed, "keepalive_timer") => self.offset_of(keepalive),
                (FieldKind::Computed, "write_timer") => self.offset_of(write),
                (FieldKind::Computed, "sock_flag_dead") => flag("SOCK_DEAD").unwrap_or_default(),
                (FieldKind::Computed, "sock_flag_keepopen") => {
                    flag("SOCK_KEEPOPEN").unwrap_or_default()
                }
                (FieldKind::Computed, "socket_ino") => {
                    self.offset_of(SOCKET_INODE) + self.offset_of(INODE_NUMBER)
                }
                // The synthetic kernel predates `sock.sk_ino`.
                (FieldKind::Computed, "sk_ino") => 0,
                (FieldKind::Computed, "mib_tcp_keepalive") => {
                    self.offset_of(LINUX_MIB_MIBS) + 77 * 8
                }
                (FieldKind::Computed, "bpf_array_pptrs") => self.offset_of(BPF_ARRAY_PPTRS),
                (FieldKind::Computed, "ehash_bucket_size") => self.sizes["inet_ehash_bucket"],
                (FieldKind::Computed, "listen_bucket_size") => self.sizes["inet_listen_hashbucket"],
                // 5.19+: listeners behind the `lhash2` pointer, no inline buckets.
                (FieldKind::Computed, "hashinfo_listen") => self.offset_of(LHASH2),
                (FieldKind::Computed, "listen_inline_buckets") => 0,
                // `net.net_cookie` is emitted as the table's 8 bytes: not an integer here.
                (FieldKind::Computed, "net_cookie_lazy") => 1,
                // It predates `icsk_probes_tstamp`.
                (FieldKind::Computed, "icsk_probes_tstamp") => 0,
                // Built without conntrack: no threshold of its own for any namespace.
                (
                    FieldKind::Computed,
                    "net_ct_tcp_established"
                    | "net_defrag_ipv4"
                    | "net_defrag_ipv6"
                    | "net_defrag_is_bool"
                    | "net_hooks_ipv4_local_in"
                    | "net_hooks_ipv6_local_in"
                    | "nf_hook_entries_hooks"
                    | "nf_hook_entry_size"
                    | "nf_hook_ops_priority",
                ) => 0,
                (FieldKind::Computed, name) => {
                    panic!("the synthetic kernel does not know how `{name}` is computed")
                }
                _ => self.offset_of(field.source),
            };
        }
        offsets
    }
}

/// A member path: intermediate when `kind` is `None`.
struct Node {
    path: String,
    name: String,
    kind: Option<FieldKind>,
    children: Vec<Node>,
}

impl Node {
    fn new(path: String, name: &str) -> Self {
        Self {
            path,
            name: name.to_string(),
            kind: None,
            children: Vec::new(),
        }
    }
}

fn insert(roots: &mut Vec<Node>, path: &str, kind: FieldKind) {
    let mut components = path.split('.');
    let root_name = components.next().unwrap_or_default();
    let index = match roots.iter().position(|r| r.name == root_name) {
        Some(i) => i,
        None => {
            roots.push(Node::new(root_name.to_string(), root_name));
            roots.len() - 1
        }
    };
    let mut node = &mut roots[index];
    for component in components {
        let index = match node.children.iter().position(|c| c.name == component) {
            Some(i) => i,
            None => {
                let child = Node::new(format!("{}.{component}", node.path), component);
                node.children.push(child);
                node.children.len() - 1
            }
        };
        node = &mut node.children[index];
    }
    node.kind = Some(kind);
}

/// Builds the synthetic kernel.
pub(super) fn synthetic_kernel(synth: &Synth) -> SyntheticKernel {
    let mut roots = Vec::new();
    // First, so the nested socket structs begin their containers.
    for (path, struct_name) in MUST_BEGIN_WITH {
        insert(&mut roots, path, FieldKind::Struct(struct_name));
    }
    insert(&mut roots, SK_TIMER, TIMER);
    if synth.timers != TimerLayout::IcskKeepaliveTimer {
        insert(&mut roots, ICSK_RETRANSMIT_TIMER, TIMER);
    }
    if synth.timers != TimerLayout::SockTimer {
        insert(&mut roots, ICSK_KEEPALIVE_TIMER, TIMER);
    }
    insert(&mut roots, SOCKET_INODE, FieldKind::Struct("inode"));
    insert(&mut roots, INODE_NUMBER, FieldKind::Int(8));
    insert(
        &mut roots,
        EHASH_BUCKET_CHAIN,
        FieldKind::Struct("hlist_nulls_head"),
    );
    insert(&mut roots, LHASH2, FieldKind::Pointer);
    insert(&mut roots, BPF_ARRAY_PPTRS, FieldKind::Pointer);
    // Not at 0, so that the resolver is seen to add its offset (the real kernel's is 0).
    insert(&mut roots, "linux_mib.head", FieldKind::Int(8));
    insert(&mut roots, LINUX_MIB_MIBS, FieldKind::Int(8));
    for field in KernelOffsets::FIELDS {
        if field.kind != FieldKind::Computed {
            insert(&mut roots, field.source, field.kind);
        }
    }

    let mut e = Emitter {
        b: BtfBuilder::new(),
        synth,
        roots: &roots,
        structs: HashMap::new(),
        ints: HashMap::new(),
        placed: HashMap::new(),
    };
    for root in &roots {
        e.named_struct(&root.name);
    }
    e.enums_and_prototypes();
    SyntheticKernel {
        btf: e.b.build(),
        placed: e.placed,
        sizes: e
            .structs
            .iter()
            .map(|(name, emitted)| (name.clone(), emitted.size))
            .collect(),
        synth: *synth,
    }
}

/// A type emitted: id, size and alignment in bytes.
#[derive(Clone, Copy)]
struct Emitted {
    id: u32,
    size: u32,
    align: u32,
}

struct Emitter<'a> {
    b: BtfBuilder,
    synth: &'a Synth,
    roots: &'a [Node],
    structs: HashMap<String, Emitted>,
    ints: HashMap<u32, u32>,
    placed: HashMap<String, u32>,
}

fn align_up(n: u32, align: u32) -> u32 {
    n.div_ceil(align) * align
}

impl Emitter<'_> {
    fn int(&mut self, size: u32) -> u32 {
        if let Some(&id) = self.ints.get(&size) {
            return id;
        }
        let name = match size {
            1 => "unsigned char",
            2 => "short unsigned int",
            4 => "unsigned int",
            _ => "long long unsigned int",
        };
        let id = self.b.int(name, size, false);
        self.ints.insert(size, id);
        id
    }

    /// A struct by name: the root of that name, or a stand-in with one member.
    fn named_struct(&mut self, name: &str) -> Emitted {
        if let Some(&emitted) = self.structs.get(name) {
            return emitted;
        }
        let roots = self.roots;
        let emitted = match roots.iter().find(|r| r.name == name) {
            Some(root) => self.composite(name, &root.children, false),
            None => {
                let u64_ = self.int(8);
                let id = self.b.structure(name, 8, &[m("opaque", u64_, 0)]);
                Emitted {
                    id,
                    size: 8,
                    align: 8,
                }
            }
        };
        self.structs.insert(name.to_string(), emitted);
        emitted
    }

    /// The type of one member (its `index` in its container picks a wrapping).
    fn member_type(&mut self, node: &Node, index: usize) -> Emitted {
        match node.kind {
            Some(FieldKind::Int(n)) => {
                let mut size = n as u32;
                if self.synth.widen == Some(node.path.as_str()) {
                    size *= 2;
                }
                let base = self.int(size);
                let id = match index % 3 {
                    0 => base,
                    1 => self.b.typedef(&format!("__u{}", size * 8), base),
                    _ => self.b.volatile(base),
                };
                Emitted {
                    id,
                    size,
                    align: size,
                }
            }
            Some(FieldKind::Bytes(n)) => {
                let size = n as u32;
                let byte = self.int(1);
                let index_ty = self.int(4);
                let array = self.b.array(byte, index_ty, size);
                let id = if index.is_multiple_of(2) {
                    array
                } else {
                    self.b.structure("", size, &[m("bytes", array, 0)])
                };
                Emitted { id, size, align: 4 }
            }
            Some(FieldKind::Pointer) => Emitted {
                id: self.b.ptr(0),
                size: 8,
                align: 8,
            },
            Some(FieldKind::Struct(name)) if node.children.is_empty() => self.named_struct(name),
            Some(FieldKind::Struct(name)) => self.composite(name, &node.children, true),
            Some(FieldKind::Computed) => unreachable!("computed fields are not members"),
            None => {
                let anonymous = self.composite("", &node.children, true);
                if index % 2 == 1 {
                    let id = self.b.typedef(&format!("{}_t", node.name), anonymous.id);
                    Emitted { id, ..anonymous }
                } else {
                    anonymous
                }
            }
        }
    }

    /// A struct of `children`, laid out in order. Nested structs start with a member that is not
    /// read, so no field sits at the start of its container by accident.
    fn composite(&mut self, name: &str, children: &[Node], nested: bool) -> Emitted {
        let mut members: Vec<M> = Vec::new();
        let mut offset = 0;
        if nested {
            let u32_ = self.int(4);
            members.push(m("first", u32_, 0));
            offset = 4;
        }
        for (index, child) in children.iter().enumerate() {
            if self.synth.omit == Some(child.path.as_str()) {
                continue;
            }
            if index % 4 == 3 {
                // Bitfields next to the field read, and unnamed padding, as in sock_common.
                let u8_ = self.int(1);
                members.push(bf(&format!("{}_bits", child.name), u8_, offset * 8, 3));
                members.push(bf("", u8_, offset * 8 + 3, 5));
                offset += 1;
            }
            let ty = self.member_type(child, index);
            offset = align_up(offset, ty.align);
            self.placed.insert(child.path.clone(), offset);
            let name = child.name.as_str();
            let shift = if self.synth.unaligned == Some(child.path.as_str()) {
                4
            } else {
                0
            };
            let bits = if self.synth.bitfield == Some(child.path.as_str()) {
                ty.size * 8
            } else {
                0
            };
            let is_leaf = matches!(
                child.kind,
                Some(FieldKind::Int(_) | FieldKind::Bytes(_) | FieldKind::Pointer)
            );
            if child.path == ICSK_KEEPALIVE_TIMER || (is_leaf && index % 2 == 1) {
                // `union { alias; struct { member; }; }`, as `icsk_keepalive_timer` shares a
                // union with `mptcp_tout_timer` and `skc_daddr` one with `skc_addrpair`.
                let alias = if child.path == ICSK_KEEPALIVE_TIMER {
                    "mptcp_tout_timer".to_string()
                } else {
                    format!("{}_alias", child.name)
                };
                let inner = self
                    .b
                    .structure("", ty.size, &[bf(name, ty.id, shift, bits)]);
                let union = self
                    .b
                    .union("", ty.size, &[m(&alias, ty.id, 0), m("", inner, 0)]);
                members.push(m("", union, offset));
            } else {
                members.push(bf(name, ty.id, offset * 8 + shift, bits));
            }
            offset += ty.size;
        }
        let size = align_up(offset.max(1), 8);
        let id = self.b.structure(name, size, &members);
        Emitted { id, size, align: 8 }
    }

    fn enums_and_prototypes(&mut self) {
        self.b.enumeration("sock_flags", &SOCK_FLAGS);
        self.b
            .enumeration("", &[("TCP_ESTABLISHED", 1), ("TCP_SYN_SENT", 2)]);
        if self.synth.omit != Some(LINUX_MIB_TCPKEEPALIVE) {
            self.b.enumeration("", &LINUX_MIB);
        }
        let reasons: &[(&str, u32)] = if self.synth.rst_reasons {
            &RST_REASONS
        } else {
            // 6.10 and 6.11: the enum and the reason argument, passive reasons only.
            &RST_REASONS[..1]
        };
        let reason_enum = (self.synth.rst_reasons
            || self.synth.send_reset == SendReset::WithReason)
            .then(|| self.b.enumeration("sk_rst_reason", reasons));
        if self.synth.send_reset == SendReset::Absent {
            return;
        }
        let int = self.b.int("int", 4, true);
        let void_ptr = self.b.ptr(0);
        let sock = self.named_struct("sock");
        let const_sock = self.b.constant(sock.id);
        let sock_ptr = self.b.ptr(const_sock);
        let skb = self.named_struct("sk_buff");
        let const_skb = self.b.constant(skb.id);
        let skb_ptr = self.b.ptr(const_skb);
        let mut params = vec![("__data", void_ptr), ("sk", sock_ptr), ("skb", skb_ptr)];
        if let Some(reason_enum) = reason_enum
            && self.synth.send_reset == SendReset::WithReason
        {
            let const_reason = self.b.constant(reason_enum);
            params.push(("reason", const_reason));
        }
        let proto = self.b.func_proto(int, &params);
        let proto_ptr = self.b.ptr(proto);
        self.b.typedef(SEND_RESET_PROTOTYPE, proto_ptr);
    }
}
