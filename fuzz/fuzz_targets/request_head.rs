//! Arbitrary bytes from a client through a listener's HTTP/1 parsers (safelb's own, then
//! hyper's) and the request path's head handling; the properties are in
//! `safelb_proxy::fuzzing::request_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    safelb_proxy::fuzzing::request_head(data);
});
