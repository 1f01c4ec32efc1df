//! Flag values: idle thresholds, --aggregate-by, sizes, durations, addresses, the telemetry path.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        keepalive_agent::fuzzing::flag_values(text);
    }
});
