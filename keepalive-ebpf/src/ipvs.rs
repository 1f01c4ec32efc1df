//! IPVS's TCP established timeout in the host's network namespace: a few pointer reads the
//! agent runs on demand with `BPF_PROG_TEST_RUN` (never attached), because a pod without
//! `hostNetwork` and `CAP_NET_ADMIN` cannot ask IPVS itself (`IP_VS_SO_GET_TIMEOUT`, or
//! netlink) in the namespace where kube-proxy configures it.

use aya_ebpf::{
    helpers::bpf_get_current_task,
    macros::{map, raw_tracepoint},
    maps::Array,
    programs::RawTracePointContext,
};
use keepalive_ebpf::{IPPROTO_TCP, IpvsQuery, ipvs_status};

use crate::socket::read;

/// `IP_VS_PROTO_TAB_SIZE` (include/net/ip_vs.h): the protocol table hashes by
/// `proto & (IP_VS_PROTO_TAB_SIZE - 1)`.
const PROTO_TAB_SIZE: u16 = 32;
/// Entries of one hash chain the program follows: IPVS registers five protocols (TCP, UDP,
/// SCTP, AH, ESP), none of which shares TCP's slot.
const MAX_CHAIN: usize = 8;
/// Parents climbed to `init_task`: a process tree deeper than this is not one a node runs.
const MAX_DEPTH: u32 = 64;

#[map]
static IPVS_QUERY: Array<IpvsQuery> = Array::with_max_entries(1, 0);

#[raw_tracepoint]
pub(crate) fn ipvs_tcp_timeout(_ctx: RawTracePointContext) -> i32 {
    let Some(q) = IPVS_QUERY.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: `q` points to the map's only value, valid for the whole run; the agent does not
    // touch it until the run returns.
    let q = unsafe { &mut *q };
    let found = host_net(q).and_then(|net| {
        let Some(net) = net else {
            return Ok(None);
        };
        q.net = net;
        tcp_timeout(q, net)
    });
    match found {
        Ok(Some(jiffies)) => {
            q.timeout_jiffies = jiffies;
            q.status = ipvs_status::FOUND;
        }
        Ok(None) => {}
        Err(err) => {
            q.error = err as i32;
            q.status = ipvs_status::UNREADABLE;
        }
    }
    0
}

/// `init_task`'s network namespace (`init_net`), or `None` with `q.status` saying why not.
#[inline(always)]
fn host_net(q: &mut IpvsQuery) -> Result<Option<u64>, i64> {
    // SAFETY: no preconditions; the task is only read through bpf_probe_read_kernel.
    let mut task = unsafe { bpf_get_current_task() };
    for depth in 0..MAX_DEPTH {
        let parent = read::<u64>(task as *const u8, q.task_real_parent as usize)?;
        if parent == task || parent == 0 {
            q.depth = depth;
            let nsproxy = read::<u64>(task as *const u8, offset!(task_nsproxy))?;
            return read::<u64>(nsproxy as *const u8, offset!(nsproxy_net_ns)).map(Some);
        }
        task = parent;
    }
    q.status = ipvs_status::NO_ROOT_TASK;
    Ok(None)
}

/// The timeout, or `None` with `q.status` saying why there is none.
#[inline(always)]
fn tcp_timeout(q: &mut IpvsQuery, net: u64) -> Result<Option<i32>, i64> {
    let ipvs = read::<u64>(net as *const u8, q.net_ipvs as usize)?;
    if ipvs == 0 {
        q.status = ipvs_status::NO_IPVS;
        return Ok(None);
    }
    let slot = usize::from(IPPROTO_TCP % PROTO_TAB_SIZE) * 8;
    let mut data = read::<u64>(ipvs as *const u8, q.proto_data_table as usize + slot)?;
    for _ in 0..MAX_CHAIN {
        if data == 0 {
            break;
        }
        let protocol = read::<u64>(data as *const u8, q.proto_data_pp as usize)?;
        if read::<u16>(protocol as *const u8, q.protocol_protocol as usize)? == IPPROTO_TCP {
            let table = read::<u64>(data as *const u8, q.proto_data_timeout_table as usize)?;
            let at = q.established as usize * 4;
            return read::<i32>(table as *const u8, at).map(Some);
        }
        data = read::<u64>(data as *const u8, q.proto_data_next as usize)?;
    }
    q.status = ipvs_status::NO_TCP;
    Ok(None)
}
