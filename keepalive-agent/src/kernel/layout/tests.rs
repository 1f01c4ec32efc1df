//! The resolver on the synthetic kernel generated from the field table, and on this machine's
//! kernel.

use std::path::Path;

use super::btf_builder::BtfBuilder;
use super::synthetic::{RST_REASONS, SendReset, Synth, synthetic_kernel};
use super::*;

const PROBES_OUT: &str = "inet_connection_sock.icsk_probes_out";
const LRCVTIME: &str = "inet_connection_sock.icsk_ack.lrcvtime";
const FAMILY: &str = "sock.__sk_common.skc_family";
const USER_TIMEOUT: &str = "inet_connection_sock.icsk_user_timeout";

fn rst_reason(name: &str) -> Option<u32> {
    RST_REASONS.iter().find(|(n, _)| *n == name).map(|r| r.1)
}

#[test]
fn running_kernel_btf() {
    if !Path::new(VMLINUX_BTF_PATH).exists() {
        // CI runs on a kernel with BTF and sets KEEPALIVE_REQUIRE_KERNEL=1: never skip there.
        assert!(
            std::env::var("KEEPALIVE_REQUIRE_KERNEL").as_deref() != Ok("1"),
            "KEEPALIVE_REQUIRE_KERNEL=1 but {VMLINUX_BTF_PATH} does not exist"
        );
        eprintln!("SKIPPED running_kernel_btf: {VMLINUX_BTF_PATH} does not exist");
        return;
    }
    let layout = KernelLayout::from_vmlinux().expect("layout of the running kernel");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if !release.starts_with("6.18.") {
        eprintln!("resolved, but exact offsets only checked on 6.18 (running {release})");
        return;
    }
    // The values KERNEL-NOTES.md lists for this machine's 6.18 kernel.
    let o = layout.offsets;
    assert_eq!(layout.timer_layout, TimerLayout::SockTimer);
    assert_eq!(o.keepalive_timer, 448);
    assert_eq!(o.timer_function, 24);
    assert_eq!(o.sk_err, 284);
    assert_eq!(o.sk_err_soft, 372);
    assert_eq!(o.skc_flags, 96);
    assert_eq!(o.icsk_probes_out, 1253);
    assert_eq!(o.icsk_pending, 1250);
    assert_eq!(o.icsk_user_timeout, 1292);
    assert_eq!(o.icsk_ack_lrcvtime, 1264);
    assert_eq!(o.tcp_keepalive_time, 2220);
    assert_eq!(o.tcp_keepalive_intvl, 2224);
    assert_eq!(o.tcp_keepalive_probes, 1917);
    assert_eq!(o.tcp_rcv_tstamp, 1724);
    assert_eq!(o.tcp_packets_out, 1684);
    assert_eq!(o.sock_flag_dead, 0);
    assert_eq!(o.sock_flag_keepopen, 3);
    assert_eq!(layout.rst_reason_keepalive_timeout, Some(15));
    assert_eq!(layout.rst_reason_tcp_state, Some(14));
    // sock_common starts with the addresses, then the ports.
    assert_eq!((o.skc_daddr, o.skc_rcv_saddr), (0, 4));
    assert_eq!(o.skc_dport, 12);
    assert_eq!(o.inet_sport, 814);
    // The write timer is in inet_connection_sock, after sock.
    assert!(o.write_timer > o.keepalive_timer);
}

#[test]
fn every_table_field_is_resolved_from_the_synthetic_kernel() {
    let kernel = synthetic_kernel(&Synth::default());
    let layout = KernelLayout::from_btf_bytes(&kernel.btf).expect("synthetic layout");
    let expected = kernel.expected_offsets();
    // Field by field, so a failure names the field.
    let mut resolved = layout.offsets;
    let mut wanted = expected;
    for ((field, got), want) in KernelOffsets::FIELDS
        .iter()
        .zip(resolved.fields_mut())
        .zip(wanted.fields_mut())
    {
        assert_eq!(*got, *want, "{} ({})", field.name, field.source);
    }
    // Each plain field at an offset of its own within its root struct: a resolver returning
    // the wrong member's offset could not match by accident.
    let mut seen = std::collections::HashMap::new();
    for field in KernelOffsets::FIELDS
        .iter()
        .filter(|f| f.kind != FieldKind::Computed)
    {
        let root = field.source.split('.').next().unwrap_or_default();
        let offset = kernel.offset_of(field.source);
        if let Some(other) = seen.insert((root, offset), field.name) {
            panic!("{} and {other} both at {root}+{offset}", field.name);
        }
    }
}

#[test]
fn sock_timer_layout() {
    let kernel = synthetic_kernel(&Synth {
        rst_reasons: true,
        ..Synth::default()
    });
    let layout = KernelLayout::from_btf_bytes(&kernel.btf).expect("synthetic 6.18-like layout");
    assert_eq!(layout.timer_layout, TimerLayout::SockTimer);
    assert_eq!(layout.offsets, kernel.expected_offsets());
    assert_eq!(layout.offsets.keepalive_timer, kernel.offset_of(SK_TIMER));
    assert_eq!(
        layout.offsets.write_timer,
        kernel.offset_of(ICSK_RETRANSMIT_TIMER)
    );
    assert_eq!(
        layout.rst_reason_keepalive_timeout,
        rst_reason("SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT")
    );
    assert_eq!(
        layout.rst_reason_tcp_state,
        rst_reason("SK_RST_REASON_TCP_STATE")
    );
    assert_eq!(layout.rst_reason_keepalive_timeout, Some(22));
}

#[test]
fn backport_layout_keeps_the_retransmit_timer_as_write_timer() {
    let kernel = synthetic_kernel(&Synth {
        timers: TimerLayout::KeepaliveTimerBackport,
        ..Synth::default()
    });
    let layout = KernelLayout::from_btf_bytes(&kernel.btf).expect("synthetic 6.1.192-like layout");
    assert_eq!(layout.timer_layout, TimerLayout::KeepaliveTimerBackport);
    // The keepalive timer sits in a union with mptcp_tout_timer, as in the backport.
    assert_eq!(
        layout.offsets.keepalive_timer,
        kernel.offset_of(ICSK_KEEPALIVE_TIMER)
    );
    assert_eq!(
        layout.offsets.write_timer,
        kernel.offset_of(ICSK_RETRANSMIT_TIMER)
    );
    // `sk_timer` is still there, unused by TCP: it must be neither timer.
    let sk_timer = kernel.offset_of(SK_TIMER);
    assert_ne!(layout.offsets.keepalive_timer, sk_timer);
    assert_ne!(layout.offsets.write_timer, sk_timer);
    assert_eq!(layout.offsets, kernel.expected_offsets());
}

#[test]
fn icsk_keepalive_timer_layout() {
    let kernel = synthetic_kernel(&Synth {
        timers: TimerLayout::IcskKeepaliveTimer,
        rst_reasons: true,
        ..Synth::default()
    });
    let layout = KernelLayout::from_btf_bytes(&kernel.btf).expect("synthetic 6.19-like layout");
    assert_eq!(layout.timer_layout, TimerLayout::IcskKeepaliveTimer);
    // Keepalive in inet_connection_sock, write timer in sk_timer.
    assert_eq!(
        layout.offsets.keepalive_timer,
        kernel.offset_of(ICSK_KEEPALIVE_TIMER)
    );
    assert_eq!(layout.offsets.write_timer, kernel.offset_of(SK_TIMER));
    assert_eq!(layout.offsets, kernel.expected_offsets());
}

#[test]
fn timer_layouts_name_both_timers() {
    for (layout, keepalive, write) in [
        (
            TimerLayout::SockTimer,
            "sock.sk_timer",
            "icsk_retransmit_timer",
        ),
        (
            TimerLayout::KeepaliveTimerBackport,
            "icsk_keepalive_timer",
            "icsk_retransmit_timer",
        ),
        (
            TimerLayout::IcskKeepaliveTimer,
            "icsk_keepalive_timer",
            "sock.sk_timer",
        ),
    ] {
        let text = layout.to_string();
        assert!(
            text.contains(&format!("keepalive timer = {keepalive}"))
                && text.contains(&format!("write timer = {write}")),
            "{text}"
        );
    }
}

#[test]
fn kernel_without_any_icsk_timer_names_the_retransmit_timer() {
    let kernel = synthetic_kernel(&Synth {
        omit: Some(ICSK_RETRANSMIT_TIMER),
        ..Synth::default()
    });
    let err = KernelLayout::from_btf_bytes(&kernel.btf).expect_err("no write timer");
    assert!(
        matches!(&err, LayoutError::MissingField { path, member, .. }
            if path == ICSK_RETRANSMIT_TIMER && member == "icsk_retransmit_timer"),
        "{err:?}"
    );
}

#[test]
fn keepalive_counter_is_found_in_an_anonymous_enum_and_its_absence_is_named() {
    let kernel = synthetic_kernel(&Synth::default());
    let layout = KernelLayout::from_btf_bytes(&kernel.btf).expect("synthetic layout");
    assert_eq!(
        layout.offsets.mib_tcp_keepalive,
        kernel.offset_of(super::LINUX_MIB_MIBS) + 77 * 8
    );
    assert_ne!(kernel.offset_of(super::LINUX_MIB_MIBS), 0);
    let kernel = synthetic_kernel(&Synth {
        omit: Some(super::LINUX_MIB_TCPKEEPALIVE),
        ..Synth::default()
    });
    let err = KernelLayout::from_btf_bytes(&kernel.btf).expect_err("no LINUX_MIB_TCPKEEPALIVE");
    assert!(
        matches!(&err, LayoutError::MissingEnumValue { name, .. }
            if name == "LINUX_MIB_TCPKEEPALIVE"),
        "{err:?}"
    );
    assert!(err.to_string().contains("LINUX_MIB_TCPKEEPALIVE"), "{err}");
}

#[test]
fn kernel_without_rst_reasons() {
    let kernel = synthetic_kernel(&Synth::default());
    let layout = KernelLayout::from_btf_bytes(&kernel.btf).expect("synthetic pre-6.10 layout");
    assert_eq!(layout.rst_reason_keepalive_timeout, None);
    assert_eq!(layout.rst_reason_tcp_state, None);
}

#[test]
fn send_reset_without_reason_before_6_10() {
    let kernel = synthetic_kernel(&Synth {
        send_reset: SendReset::SockSkb,
        ..Synth::default()
    });
    let layout = KernelLayout::from_btf_bytes(&kernel.btf).expect("synthetic 6.1-like layout");
    assert!(layout.tracepoints.contains(&"tcp_send_reset"));
    assert!(!layout.send_reset_reason);
}

#[test]
fn send_reset_with_reason_from_6_10() {
    for rst_reasons in [false, true] {
        let kernel = synthetic_kernel(&Synth {
            send_reset: SendReset::WithReason,
            rst_reasons,
            ..Synth::default()
        });
        let layout = KernelLayout::from_btf_bytes(&kernel.btf).expect("synthetic 6.10+ layout");
        assert!(layout.tracepoints.contains(&"tcp_send_reset"));
        assert!(layout.send_reset_reason, "rst_reasons: {rst_reasons}");
    }
}

#[test]
fn send_reset_absent() {
    let kernel = synthetic_kernel(&Synth::default());
    let layout = KernelLayout::from_btf_bytes(&kernel.btf).expect("synthetic layout");
    assert!(!layout.tracepoints.contains(&"tcp_send_reset"));
    assert!(!layout.send_reset_reason);
}

#[test]
fn missing_field_is_named() {
    let kernel = synthetic_kernel(&Synth {
        omit: Some(LRCVTIME),
        ..Synth::default()
    });
    let err = KernelLayout::from_btf_bytes(&kernel.btf).expect_err("lrcvtime is missing");
    match &err {
        LayoutError::MissingField {
            path,
            member,
            container,
        } => {
            assert_eq!(path, LRCVTIME);
            assert_eq!(member, "lrcvtime");
            assert!(
                container.starts_with("an anonymous struct ("),
                "{container}"
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(LRCVTIME), "{message}");
    assert!(message.contains("not supported"), "{message}");
}

#[test]
fn bitfield_is_rejected() {
    let kernel = synthetic_kernel(&Synth {
        bitfield: Some(PROBES_OUT),
        ..Synth::default()
    });
    let err = KernelLayout::from_btf_bytes(&kernel.btf).expect_err("probes_out is a bitfield");
    match &err {
        LayoutError::Bitfield {
            path,
            bit_offset,
            bits,
        } => {
            assert_eq!(path, PROBES_OUT);
            assert_eq!(
                (*bit_offset, *bits),
                (u64::from(kernel.offset_of(PROBES_OUT)) * 8, 8)
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("icsk_probes_out"));
}

#[test]
fn wrong_size_is_rejected() {
    let kernel = synthetic_kernel(&Synth {
        widen: Some(FAMILY),
        ..Synth::default()
    });
    let err = KernelLayout::from_btf_bytes(&kernel.btf).expect_err("skc_family is 4 bytes");
    match &err {
        LayoutError::UnexpectedType {
            path,
            expected,
            found,
        } => {
            assert_eq!(path, FAMILY);
            assert_eq!(expected, "a 2-byte integer");
            assert_eq!(found, "a 4-byte integer");
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn unaligned_field_is_rejected() {
    let kernel = synthetic_kernel(&Synth {
        unaligned: Some(USER_TIMEOUT),
        ..Synth::default()
    });
    let err = KernelLayout::from_btf_bytes(&kernel.btf).expect_err("icsk_user_timeout unaligned");
    let expected_bits = u64::from(kernel.offset_of(USER_TIMEOUT)) * 8 + 4;
    assert!(
        matches!(&err, LayoutError::Unaligned { path, bit_offset }
            if path == USER_TIMEOUT && *bit_offset == expected_bits),
        "{err:?}"
    );
}

#[test]
fn error_messages_name_the_field() {
    let cases = [
        Synth {
            omit: Some(LRCVTIME),
            ..Synth::default()
        },
        Synth {
            bitfield: Some(PROBES_OUT),
            ..Synth::default()
        },
        Synth {
            widen: Some(FAMILY),
            ..Synth::default()
        },
    ];
    for (synth, field) in cases
        .iter()
        .zip(["lrcvtime", "icsk_probes_out", "skc_family"])
    {
        let message = KernelLayout::from_btf_bytes(&synthetic_kernel(synth).btf)
            .expect_err("broken layout")
            .to_string();
        eprintln!("{message}");
        assert!(message.contains(field), "{message}");
        assert!(message.contains("not supported"), "{message}");
    }
}

#[test]
fn every_plain_field_missing_is_named() {
    // A field added to the table is checked too: leaving out any one of them must fail with
    // its own path.
    for field in KernelOffsets::FIELDS
        .iter()
        .filter(|f| f.kind != FieldKind::Computed)
    {
        let kernel = synthetic_kernel(&Synth {
            omit: Some(field.source),
            ..Synth::default()
        });
        let err = KernelLayout::from_btf_bytes(&kernel.btf).expect_err(field.name);
        assert!(
            matches!(&err, LayoutError::MissingField { path, .. } if path == field.source),
            "{}: {err:?}",
            field.name
        );
    }
}

#[test]
fn missing_struct_is_named() {
    let mut b = BtfBuilder::new();
    b.int("int", 4, true);
    let err = KernelLayout::from_btf_bytes(&b.build()).expect_err("no structs at all");
    assert!(
        matches!(&err, LayoutError::MissingType { kind: "struct", name } if name == "tcp_sock"),
        "{err:?}"
    );
}

#[test]
fn garbage_and_missing_files() {
    let err = KernelLayout::from_btf_bytes(b"not BTF").expect_err("garbage");
    assert!(matches!(err, LayoutError::BtfInvalid { .. }), "{err:?}");
    let err = KernelLayout::from_path("/nonexistent/vmlinux").expect_err("no such file");
    assert!(matches!(err, LayoutError::BtfUnreadable { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/vmlinux"));
}
