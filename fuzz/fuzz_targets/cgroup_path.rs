//! Cgroup paths: the Kubernetes pod UID and container id read from them.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        keepalive_agent::fuzzing::cgroup_path(text);
    }
});
