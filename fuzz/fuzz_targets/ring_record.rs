//! Ring-buffer records: decoded, classified and formatted as the pipeline does.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| keepalive_agent::fuzzing::ring_record(bytes));
