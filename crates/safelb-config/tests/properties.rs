//! Properties of the route table on random input, the stable-Rust side of the fuzz targets
//! `router` and `config` (`fuzz/`): the table against a naive matcher on random routes and
//! requests, and random configs whose route tests say what the naive matcher says.

mod oracle;

use oracle::{Req, Spelling};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use safelb_config::{HostMatch, RouteMatch, Rule};

fn route() -> impl Strategy<Value = RouteMatch> {
    (
        option::of(0u8..2),
        option::of((any::<bool>(), 0u8..6)),
        0u8..7,
        vec(0u8..4, 0..3),
        vec((0u8..2, 0u8..2), 0..3),
    )
        .prop_map(|(listener, host, prefix, methods, headers)| {
            oracle::route(listener, host, prefix, &methods, &headers)
        })
}

/// A request whose host and path come from the vocabularies (`free`: or from free text).
fn request(free: bool) -> impl Strategy<Value = Req> {
    let known_host =
        (0u8..6, option::of(1u16..100), any::<bool>(), any::<bool>()).prop_map(|(h, port, upper, trailing_dot)| {
            Ok((
                h,
                Spelling {
                    port,
                    upper,
                    trailing_dot,
                },
            ))
        });
    let free_host = "[a-zA-Z0-9.:\\[\\]-]{0,20}".prop_map(Err);
    let host = if free {
        prop_oneof![known_host, free_host].boxed()
    } else {
        known_host.boxed()
    };
    // The last path of the vocabulary is empty, which a route test's URL cannot say.
    let known_path = (0u8..8).prop_map(Ok);
    let path = if free {
        prop_oneof![known_path, "/[a-z/]{0,12}".prop_map(Err)].boxed()
    } else {
        known_path.boxed()
    };
    (0u8..2, 0u8..4, host, path, vec((0u8..2, 0u8..2), 0..3))
        .prop_map(|(listener, method, host, path, headers)| oracle::request(listener, method, host, path, &headers))
}

/// A config with `routes` (named `r0`, `r1`, ...) and one `[[test]]` per request, each expecting
/// what the naive matcher picks.
fn config_text(routes: &[RouteMatch], requests: &[Req]) -> String {
    let mut out = String::from(
        "[listener.public]\nbind = \"127.0.0.1:8080\"\n[listener.admin]\nbind = \"127.0.0.1:8081\"\n\
         [pool.p]\nbackends = [\"127.0.0.1:9001\"]\n",
    );
    for (i, r) in routes.iter().enumerate() {
        out += &format!(
            "[[route]]\nname = \"r{i}\"\npool = \"p\"\npath_prefix = \"{}\"\n",
            r.path_prefix
        );
        match &r.host {
            Some(HostMatch::Exact(h)) => out += &format!("host = \"{h}\"\n"),
            Some(HostMatch::Wildcard(s)) => out += &format!("host = \"*{s}\"\n"),
            None => {}
        }
        if let Some(l) = &r.listener {
            out += &format!("listener = \"{l}\"\n");
        }
        if !r.methods.is_empty() {
            out += &format!("method = {:?}\n", r.methods);
        }
        out += &headers_table(&r.headers);
    }
    for req in requests {
        out += &format!(
            "[[test]]\nrequest = \"{} http://{}{}\"\nlistener = \"{}\"\n",
            req.method, req.host, req.path, req.listener
        );
        out += &headers_table(&req.headers);
        match oracle::naive_find(routes, req) {
            Some(i) => out += &format!("expect_route = \"r{i}\"\n"),
            None => out += "expect_status = 404\n",
        }
    }
    out
}

/// `headers = { ... }`, a name's first value only (a TOML table has each key once).
fn headers_table(headers: &[(String, String)]) -> String {
    let mut seen: Vec<&(String, String)> = Vec::new();
    for h in headers {
        if !seen.iter().any(|s| s.0 == h.0) {
            seen.push(h);
        }
    }
    if seen.is_empty() {
        return String::new();
    }
    let fields: Vec<String> = seen.iter().map(|(n, v)| format!("\"{n}\" = \"{v}\"")).collect();
    format!("headers = {{ {} }}\n", fields.join(", "))
}

/// Repeated header names keep their first value, as `headers_table` writes them.
fn first_values(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut kept: Vec<(String, String)> = Vec::new();
    for h in headers {
        if !kept.iter().any(|k| k.0 == h.0) {
            kept.push(h);
        }
    }
    kept
}

/// A route a config can say: a wildcard needs a domain, not an IPv6 literal.
fn config_route() -> impl Strategy<Value = RouteMatch> {
    route()
        .prop_filter(
            "a wildcard of an IPv6 literal",
            |r| !matches!(&r.host, Some(HostMatch::Wildcard(s)) if s.contains('[')),
        )
        .prop_map(|mut r| {
            r.headers = first_values(r.headers);
            r
        })
}

proptest! {
    // Under a second each in a debug build.
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_route_table_agrees_with_a_naive_matcher(
        routes in vec(route(), 0..12),
        requests in vec(request(true), 1..16),
    ) {
        oracle::compare(&routes, &requests);
    }

    #[test]
    fn random_configs_pass_the_route_tests_the_naive_matcher_writes(
        routes in vec(config_route(), 1..8),
        mut requests in vec(request(false), 1..8),
    ) {
        // Shadowed routes are an error of their own: such configs are not this property's.
        let table = safelb_config::routing::RouteTable::build(routes.clone());
        prop_assume!(table.shadowed().is_empty());
        for req in &mut requests {
            req.headers = first_values(std::mem::take(&mut req.headers));
        }
        let text = config_text(&routes, &requests);
        let checked = safelb_config::check("generated.toml", &text);
        let errors: Vec<String> = checked
            .diagnostics
            .located()
            .iter()
            .filter(|l| l.severity == safelb_config::Severity::Error)
            .map(|l| format!("{} {}", l.rule.as_str(), l.message))
            .collect();
        prop_assert!(
            checked.config.is_some(),
            "{text}\nfailed: {errors:#?} (route tests failed: {})",
            checked.diagnostics.located().iter().any(|l| l.rule == Rule::TestFailed)
        );
        oracle::check_config(&text);
    }
}
