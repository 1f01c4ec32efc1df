//! The resolver on real kernels' BTF, kept compressed in `tests/btf/` (see its README for where
//! each came from): the layouts users run, including both stable backports of
//! `icsk_keepalive_timer`, checked without booting them.

use std::io::Read;
use std::path::PathBuf;

use super::*;

pub(crate) fn fixture(name: &str) -> KernelLayout {
    KernelLayout::from_btf_bytes(&fixture_bytes(name))
        .unwrap_or_else(|e| panic!("layout of {name}: {e}"))
}

pub(crate) fn fixture_bytes(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/btf")
        .join(name);
    let compressed = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("BTF fixture {}: {e}", path.display()));
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(compressed)
        .unwrap_or_else(|e| panic!("BTF fixture {}: {e}", path.display()));
    let mut bytes = Vec::new();
    decoder
        .read_to_end(&mut bytes)
        .unwrap_or_else(|e| panic!("decompressing {}: {e}", path.display()));
    bytes
}

/// Debian builds IPVS as a module: `struct net` has `ipvs`, the structs behind it come with
/// the module's BTF (`cargo xtask vm` loads it and reads the timeout). The development
/// kernel has no IPVS at all.
#[test]
fn ipvs_is_a_module_on_debian_and_absent_from_the_development_kernel() {
    let query = |name: &str| {
        let btf = Btf::from_bytes(&fixture_bytes(name)).expect("parse");
        ipvs::query(&btf, None).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    for name in [
        "5.10.262_5.10.0-46-cloud-amd64.btf.zst",
        "6.1.192_6.1.0-57-cloud-amd64.btf.zst",
        "6.12.117_6.12.117+deb12-cloud-amd64.btf.zst",
    ] {
        assert_eq!(query(name), ipvs::IpvsLayout::NotLoaded, "{name}");
    }
    assert_eq!(
        query("6.18.44_6.18.44-fc-v1045.btf.zst"),
        ipvs::IpvsLayout::NotBuilt
    );
}

#[test]
fn debian_5_10_has_sock_timer_and_no_reset_reason() {
    let layout = fixture("5.10.262_5.10.0-46-cloud-amd64.btf.zst");
    assert_eq!(layout.timer_layout, TimerLayout::SockTimer);
    assert!(layout.offsets.write_timer > layout.offsets.keepalive_timer);
    assert!(layout.tracepoints.contains(&"tcp_send_reset"));
    assert!(!layout.send_reset_reason);
    // Every hook's tracepoint, as on the newer kernels.
    assert_eq!(layout.tracepoints.len(), HOOKS.len());
    assert_eq!(layout.rst_reason_keepalive_timeout, None);
    // Listeners chain through skc_nulls_node in the 32 buckets of listening_hash up to 5.18.
    assert_eq!(
        layout.listen_table,
        ListenTable::Inline {
            offset: layout.offsets.hashinfo_listen,
            buckets: 32
        }
    );
    assert_eq!(layout.offsets.listen_inline_buckets, 32);
    // net_cookie is a lazily generated atomic64_t here: namespaces are told apart by hash_mix.
    assert_eq!(layout.offsets.net_cookie_lazy, 1);
    assert!(layout.offsets.net_hash_mix > 0);
}

#[test]
fn every_matrix_kernel_after_5_10_keeps_its_listeners_in_lhash2() {
    for name in [
        "6.1.190_6.1.0-54-cloud-amd64.btf.zst",
        "6.1.192_6.1.0-57-cloud-amd64.btf.zst",
        "6.12.111_6.12.111+deb12-cloud-amd64.btf.zst",
        "6.12.117_6.12.117+deb12-cloud-amd64.btf.zst",
        "6.18.44_6.18.44-fc-v1045.btf.zst",
    ] {
        let layout = fixture(name);
        assert!(
            matches!(layout.listen_table, ListenTable::Lhash2 { .. }),
            "{name}"
        );
        assert_eq!(layout.offsets.listen_inline_buckets, 0, "{name}");
        assert_eq!(
            layout.offsets.net_cookie_lazy, 0,
            "{name}: net_cookie is a u64"
        );
    }
}

#[test]
fn every_matrix_kernel_has_the_hash_tables_the_audit_walks() {
    for name in [
        "5.10.262_5.10.0-46-cloud-amd64.btf.zst",
        "6.1.190_6.1.0-54-cloud-amd64.btf.zst",
        "6.12.117_6.12.117+deb12-cloud-amd64.btf.zst",
        "6.18.44_6.18.44-fc-v1045.btf.zst",
    ] {
        let o = fixture(name).offsets;
        // `struct inet_ehash_bucket` is one hlist_nulls_head; `inet_hashinfo.ehash` comes first.
        assert_eq!(o.ehash_bucket_size, 8, "{name}");
        assert_eq!(o.hashinfo_ehash, 0, "{name}");
        assert!(o.listen_bucket_size >= 16, "{name}");
        assert!(o.listen_bucket_head > 0, "{name}");
        assert!(o.net_tcp_hashinfo > 0 && o.task_nsproxy > 0, "{name}");
    }
}

#[test]
fn debian_6_1_before_the_backport_has_sock_timer() {
    let layout = fixture("6.1.190_6.1.0-54-cloud-amd64.btf.zst");
    assert_eq!(layout.timer_layout, TimerLayout::SockTimer);
    assert!(layout.offsets.write_timer > layout.offsets.keepalive_timer);
    assert!(!layout.send_reset_reason);
}

#[test]
fn debian_6_1_192_backport_keeps_the_retransmit_timer() {
    let layout = fixture("6.1.192_6.1.0-57-cloud-amd64.btf.zst");
    assert_eq!(layout.timer_layout, TimerLayout::KeepaliveTimerBackport);
    // From the disassembly of inet_csk_init_xmit_timers on this kernel.
    assert_eq!(layout.offsets.write_timer, 1096);
    assert_eq!(layout.offsets.keepalive_timer, 1176);
    assert!(!layout.send_reset_reason);
}

#[test]
fn debian_6_12_before_the_backport_has_sock_timer() {
    let layout = fixture("6.12.111_6.12.111+deb12-cloud-amd64.btf.zst");
    assert_eq!(layout.timer_layout, TimerLayout::SockTimer);
    assert!(layout.offsets.write_timer > layout.offsets.keepalive_timer);
    assert!(layout.send_reset_reason);
    assert!(layout.rst_reason_keepalive_timeout.is_some());
}

#[test]
fn debian_6_12_117_backport_keeps_the_retransmit_timer() {
    let layout = fixture("6.12.117_6.12.117+deb12-cloud-amd64.btf.zst");
    assert_eq!(layout.timer_layout, TimerLayout::KeepaliveTimerBackport);
    assert_eq!(layout.offsets.write_timer, 1104);
    assert_eq!(layout.offsets.keepalive_timer, 1184);
    assert!(layout.send_reset_reason);
}

#[test]
fn development_kernel_6_18() {
    let layout = fixture("6.18.44_6.18.44-fc-v1045.btf.zst");
    assert_eq!(layout.timer_layout, TimerLayout::SockTimer);
    // The values KERNEL-NOTES.md lists for the development machine.
    assert_eq!(layout.offsets.keepalive_timer, 448);
    assert_eq!(layout.offsets.icsk_probes_out, 1253);
    assert_eq!(layout.offsets.tcp_keepalive_time, 2220);
    assert!(layout.send_reset_reason);
    assert_eq!(layout.rst_reason_keepalive_timeout, Some(15));
}

#[test]
fn only_6_18_keeps_the_inode_number_in_the_socket() {
    // 6.18's `struct sock` has `sk_ino` (an `unsigned long`, after `sk_uid`); the programs read
    // it from the snapshot's copy instead of following `sk_socket` to the inode.
    assert_eq!(
        fixture("6.18.44_6.18.44-fc-v1045.btf.zst").offsets.sk_ino,
        608
    );
    for older in [
        "5.10.262_5.10.0-46-cloud-amd64.btf.zst",
        "6.1.190_6.1.0-54-cloud-amd64.btf.zst",
        "6.1.192_6.1.0-57-cloud-amd64.btf.zst",
        "6.12.111_6.12.111+deb12-cloud-amd64.btf.zst",
        "6.12.117_6.12.117+deb12-cloud-amd64.btf.zst",
    ] {
        assert_eq!(fixture(older).offsets.sk_ino, 0, "{older}");
    }
}

/// Every matrix kernel has conntrack's per-namespace TCP timeouts in `struct net` (Debian
/// builds it as a module, the struct is vmlinux's): a `bool` per family tells whether conntrack
/// is attached on 5.10, a counter of users after.
#[test]
fn every_matrix_kernel_has_the_namespaces_conntrack_timeout() {
    for (name, defrag_is_bool) in [
        ("5.10.262_5.10.0-46-cloud-amd64.btf.zst", true),
        ("6.1.190_6.1.0-54-cloud-amd64.btf.zst", false),
        ("6.1.192_6.1.0-57-cloud-amd64.btf.zst", false),
        ("6.12.111_6.12.111+deb12-cloud-amd64.btf.zst", false),
        ("6.12.117_6.12.117+deb12-cloud-amd64.btf.zst", false),
        ("6.18.44_6.18.44-fc-v1045.btf.zst", false),
    ] {
        let o = fixture(name).offsets;
        // The probe timer's first-run stamp (5.11, and 5.10's stable updates).
        assert!(o.icsk_probes_tstamp > 0, "{name}");
        assert!(o.net_ct_tcp_established > 0, "{name}");
        assert_eq!(o.net_defrag_is_bool, u32::from(defrag_is_bool), "{name}");
        // `defrag_ipv6[_users]` follows `defrag_ipv4[_users]` in `struct netns_nf`.
        let width = if defrag_is_bool { 1 } else { 4 };
        assert!(o.net_defrag_ipv4 > 0, "{name}");
        assert_eq!(o.net_defrag_ipv6, o.net_defrag_ipv4 + width, "{name}");
        // Conntrack's confirm hook, which defragmentation alone (TPROXY) does not register:
        // `hooks_ipv6[5]` follows `hooks_ipv4[5]`, `NF_INET_LOCAL_IN` is the second of each.
        assert!(o.net_hooks_ipv4_local_in > 0, "{name}");
        assert_eq!(
            o.net_hooks_ipv6_local_in,
            o.net_hooks_ipv4_local_in + 5 * 8,
            "{name}"
        );
        assert_eq!(o.nf_hook_entries_hooks, 8, "{name}: a u16, padded");
        assert_eq!(o.nf_hook_entry_size, 16, "{name}: hook and priv");
        assert!(o.nf_hook_ops_priority > 0, "{name}");
    }
}
