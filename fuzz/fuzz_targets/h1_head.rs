//! The inline HTTP/1 client's response-head parser on arbitrary bytes; the properties are in
//! `safelb_proxy::fuzzing::response_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    safelb_proxy::fuzzing::response_head(data);
});
