//! `--web.config.file` text: exporter-toolkit's YAML (TLS policy, basic auth users and hashes).
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        keepalive_agent::fuzzing::web_config(text);
    }
});
