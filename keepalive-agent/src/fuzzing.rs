//! Entry points for the fuzz targets (`fuzz/`, run by `cargo xtask test`): every parser that
//! takes input from outside the agent, callable with arbitrary bytes. Each one also checks a
//! property the rest of the agent relies on, so a fuzz run finds wrong answers, not only
//! panics. Built only with the `fuzzing` feature.

use std::str::FromStr as _;

use crate::{
    attribution, cmd, export, kernel,
    record::decoder,
    track::{classifier, idle_kill::IdleThreshold},
};

/// A ring-buffer record as the kernel programs write it (any bytes: the buffer is shared with
/// whatever else runs in the kernel's name), then what the pipeline makes of a decoded one: the
/// drop classification, the event stream line and the `watch` line.
pub fn ring_record(bytes: &[u8]) {
    // Exactly one of the three sizes a record has (picked by the first byte), so the fuzzer
    // spends its time on the fields.
    let sizes = [
        keepalive_ebpf::SocketRecord::SIZE,
        keepalive_ebpf::ExpiryRecord::IPV4_BYTES,
        keepalive_ebpf::ExpiryRecord::IPV6_BYTES,
    ];
    let size = sizes[usize::from(bytes.first().copied().unwrap_or(0)) % sizes.len()];
    let mut record = [0u8; keepalive_ebpf::SocketRecord::SIZE];
    let record = &mut record[..size];
    let n = bytes.len().min(size);
    record[..n].copy_from_slice(&bytes[..n]);
    if !sizes.contains(&bytes.len()) {
        assert!(
            decoder::decode(bytes).is_err(),
            "a record of the wrong size decoded"
        );
    }
    let Ok(event) = decoder::decode(record) else {
        return;
    };
    let hz = [100, 250, 300, 1000, 1024][usize::from(record[0]) % 5];
    let line = match event {
        decoder::Event::Close(close) => {
            let outcome = classifier::classify(
                &close,
                classifier::ResetReasons {
                    keepalive_timeout: Some(u32::from(record[1])),
                },
            );
            let classifier::CloseOutcome::Dropped(reason) = outcome else {
                return;
            };
            export::events::ConnectionEvent::from_close(
                export::events::EventKind::Drop,
                &close,
                reason,
                u64::from(close.probes_out),
                close.probes_out,
                hz,
            )
        }
        decoder::Event::KeepaliveExpiry(expiry) => export::events::ConnectionEvent::from_expiry(
            export::events::EventKind::ProbeSent,
            &expiry,
            expiry.probes_out_before,
            expiry.probes_out_before,
            hz,
        ),
        decoder::Event::Audit(_) => return,
    };
    let json = serde_json::to_string(&line).expect("an event always serializes");
    assert!(!json.contains('\n'), "an event line spans lines: {json}");
    let _ = cmd::watch::format_line(&line, false);
}

/// A cgroup path as /proc and cgroupfs name it: the Kubernetes ids read from it are label
/// values, so they must be plain and bounded.
pub fn cgroup_path(text: &str) {
    let ids = attribution::kubernetes::parse_kubernetes(text);
    for id in [ids.pod_uid, ids.container_id].into_iter().flatten() {
        assert!(
            !id.is_empty() && id.len() <= text.len(),
            "{id:?} from {text:?}"
        );
        assert!(
            id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
            "{id:?} from {text:?}"
        );
    }
}

/// The /proc texts the agent parses: /proc/timer_list, /proc/kallsyms, /proc/self/mounts, an
/// fd link of /proc/PID/fd.
pub fn proc_text(text: &str) {
    let _ = kernel::hz::parse_sample(text);
    let _ = kernel::kallsyms::TimerFunctions::parse(text);
    if let Some(mount) = attribution::cgroup::cgroup2_mount(text) {
        assert!(
            text.contains("cgroup2"),
            "a cgroup2 mount from a text without one"
        );
        let _ = mount;
    }
    let _ = attribution::process::parse_socket_target(text.as_bytes());
}

/// The flags that take structured text: what a parser accepts, the agent must be able to use
/// without a panic (a telemetry path becomes a route, a threshold a label value).
pub fn flag_values(text: &str) {
    if let Ok(threshold) = IdleThreshold::from_str(text) {
        assert!(threshold.seconds.is_finite() && threshold.seconds > 0.0);
        assert!(!threshold.name.is_empty());
    }
    let _ = export::labels::AggregateBy::from_str(text);
    let _ = cmd::flags::parse_ring_buffer_bytes(text);
    let _ = cmd::flags::parse_max_tracked(text);
    let _ = cmd::flags::parse_retention(text);
    let _ = cmd::flags::parse_listen_address(text);
    if let Ok(path) = cmd::flags::parse_telemetry_path(text) {
        // Accepted paths must make a router: axum panics on a conflict or a bad pattern.
        let state = std::sync::Arc::new(export::http::HttpState {
            registry: prometheus_client::registry::Registry::default(),
            ready: false.into(),
        });
        let _ = export::http::router(state, &path);
    }
}

/// A `--web.config.file` text (exporter-toolkit's YAML): parsed and checked without reading the
/// files it names or running bcrypt. What is accepted is what the server is built from, so it
/// must hold what the loader relies on: a TLS version to offer, paths to open, hashes bcrypt
/// can verify with.
pub fn web_config(text: &str) {
    let Ok(spec) = export::web_config::parse(text) else {
        return;
    };
    if let Some(tls) = &spec.tls {
        assert!(!tls.versions.is_empty(), "no TLS version from {text:?}");
        assert!(!tls.cert_file.as_os_str().is_empty() && !tls.key_file.as_os_str().is_empty());
        if let Some(ca) = &tls.client_ca {
            assert!(!ca.file.as_os_str().is_empty());
        }
    }
    if let Some(auth) = &spec.basic_auth {
        assert!(
            !auth.users.is_empty(),
            "basic auth without users from {text:?}"
        );
        assert!(
            (4..=16).contains(&auth.cost),
            "cost {} from {text:?}",
            auth.cost
        );
        for (user, hash) in &auth.users {
            assert!(!user.contains(':'), "user {user:?} can never log in");
            let parts = hash.parse::<bcrypt::HashParts>();
            assert!(
                parts.is_ok_and(|p| (4..=16).contains(&p.get_cost())),
                "{user}: {hash:?} accepted"
            );
        }
    }
}
