//! /proc texts: timer_list, kallsyms, mounts, fd links.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        keepalive_agent::fuzzing::proc_text(text);
    }
});
