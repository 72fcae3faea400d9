//! Arbitrary bytes from a client through hyper's HTTP/1 server and the request path's head
//! handling; the properties are in `safelb_proxy::fuzzing::request_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    safelb_proxy::fuzzing::request_head(data);
});
