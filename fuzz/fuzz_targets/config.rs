//! `safelb_config::check` on arbitrary text; a valid config must keep its own promises (no
//! shadowed route, route tests and the route table agree with a naive matcher): see
//! `crates/safelb-config/tests/oracle/mod.rs`.
#![no_main]

#[path = "../../crates/safelb-config/tests/oracle/mod.rs"]
mod oracle;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(source) = std::str::from_utf8(data) {
        oracle::check_config(source);
    }
});
