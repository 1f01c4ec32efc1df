//! Where IPVS keeps its TCP established timeout (see [`IpvsQuery`]): `task_struct.real_parent`
//! and `net.ipvs` from the kernel's BTF, the IPVS structs from the `ip_vs` module's (split BTF
//! on top of the kernel's; the kernel's own has them only when IPVS is built in).

use btf_rs::{Btf, Type};
use keepalive_ebpf::{FieldKind, IpvsQuery};

use super::{Field, LayoutError, Resolver};

/// Where the kernel exposes a loaded module's BTF.
pub(crate) const MODULE_BTF_PATH: &str = "/sys/kernel/btf/ip_vs";

/// `IP_VS_TCP_S_ESTABLISHED` (include/net/ip_vs.h), an anonymous enum BTF does not carry:
/// the second TCP state, after `IP_VS_TCP_S_NONE`, since IPVS was merged (2.6.10).
const TCP_S_ESTABLISHED: u32 = 1;
/// `IP_VS_PROTO_TAB_SIZE`: the program reads slot `IPPROTO_TCP % 32`.
const PROTO_TAB_SIZE: usize = 32;

const NET_IPVS: &str = "net.ipvs";
const PROTO_DATA_TABLE: &str = "netns_ipvs.proto_data_table";

/// Whether the program has something to read, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IpvsLayout {
    /// The kernel was built without IPVS (`struct net` has no `ipvs`).
    NotBuilt,
    /// IPVS is a module, not loaded (no module BTF, and the kernel's has no `netns_ipvs`).
    NotLoaded,
    /// The query's offsets, everything but its answer.
    Query(IpvsQuery),
}

const NETNS_IPVS: &str = "netns_ipvs";

/// Where the program reads IPVS's TCP timeout, from the kernel's BTF and the `ip_vs` module's
/// (`module`: `None` when [`MODULE_BTF_PATH`] does not exist).
pub(crate) fn query(vmlinux: &Btf, module: Option<&Btf>) -> Result<IpvsLayout, LayoutError> {
    let kernel = Resolver { btf: vmlinux };
    let Some(net_ipvs) = kernel.optional_offset(NET_IPVS, FieldKind::Pointer)? else {
        return Ok(IpvsLayout::NotBuilt);
    };
    let task_real_parent = kernel.offset("task_struct.real_parent", FieldKind::Pointer)?;
    let r = match module {
        Some(btf) => Resolver { btf },
        None => match kernel.root_struct(NETNS_IPVS) {
            Ok(_) => kernel,
            Err(LayoutError::MissingType { .. }) => return Ok(IpvsLayout::NotLoaded),
            Err(e) => return Err(e),
        },
    };
    let proto_data_table = match r.field(PROTO_DATA_TABLE)? {
        Field {
            byte_offset,
            ty: Type::Array(array),
        } if array.len() == PROTO_TAB_SIZE => byte_offset,
        other => {
            return Err(LayoutError::UnexpectedType {
                path: PROTO_DATA_TABLE.to_owned(),
                expected: format!("an array of {PROTO_TAB_SIZE} pointers"),
                found: r.describe(&other.ty),
            });
        }
    };
    Ok(IpvsLayout::Query(IpvsQuery {
        task_real_parent,
        net_ipvs,
        proto_data_table,
        proto_data_next: r.offset("ip_vs_proto_data.next", FieldKind::Pointer)?,
        proto_data_pp: r.offset("ip_vs_proto_data.pp", FieldKind::Pointer)?,
        proto_data_timeout_table: r.offset("ip_vs_proto_data.timeout_table", FieldKind::Pointer)?,
        protocol_protocol: r.offset("ip_vs_protocol.protocol", FieldKind::Int(2))?,
        established: TCP_S_ESTABLISHED,
        ..IpvsQuery::default()
    }))
}
