//! The route table against a naive matcher (`crates/safelb-config/tests/oracle/mod.rs`) on
//! arbitrary routes and requests: hosts, ports, case, trailing dots, prefixes, methods, headers,
//! listeners, declaration order, and free-text hosts and paths.
#![no_main]

use arbitrary::Arbitrary;

#[path = "../../crates/safelb-config/tests/oracle/mod.rs"]
mod oracle;

#[derive(Arbitrary, Debug)]
struct Route {
    listener: Option<u8>,
    host: Option<(bool, u8)>,
    prefix: u8,
    methods: Vec<u8>,
    headers: Vec<(u8, u8)>,
}

#[derive(Arbitrary, Debug)]
enum Text<T> {
    Known(T),
    Free(String),
}

#[derive(Arbitrary, Debug)]
struct Request {
    listener: u8,
    method: u8,
    host: Text<(u8, Option<u16>, bool, bool)>,
    path: Text<u8>,
    headers: Vec<(u8, u8)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    routes: Vec<Route>,
    requests: Vec<Request>,
}

libfuzzer_sys::fuzz_target!(|input: Input| {
    let routes: Vec<_> = input
        .routes
        .iter()
        .map(|r| oracle::route(r.listener, r.host, r.prefix, &r.methods, &r.headers))
        .collect();
    let requests: Vec<_> = input
        .requests
        .into_iter()
        .map(|q| {
            let host = match q.host {
                Text::Known((h, port, upper, trailing_dot)) => Ok((
                    h,
                    oracle::Spelling {
                        port,
                        upper,
                        trailing_dot,
                    },
                )),
                Text::Free(text) => Err(text),
            };
            let path = match q.path {
                Text::Known(p) => Ok(p),
                Text::Free(text) => Err(text),
            };
            oracle::request(q.listener, q.method, host, path, &q.headers)
        })
        .collect();
    oracle::compare(&routes, &requests);
});
