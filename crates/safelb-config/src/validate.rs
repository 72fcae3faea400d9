//! Checks across sections: shadowed routes, unused pools, the admin address, route tests.

use std::ops::Range;

use crate::diagnostic::{Diagnostics, Rule};
use crate::model::{Action, Admin, HeaderEdits, Pool, Route, RouteTest, TestExpectation};
use crate::routing::RouteTable;

/// Routes with the span of their `name` (or table), for diagnostics.
pub(crate) type SpannedRoute = (Route, Range<usize>);

/// `[[test]]` cases with the span of their table.
pub(crate) type SpannedTest = (RouteTest, Range<usize>);

pub(crate) fn cross_check(
    d: &mut Diagnostics,
    routes: &[SpannedRoute],
    pools: &[(Pool, Range<usize>)],
    table: &RouteTable,
    tests: &[SpannedTest],
    admin: Option<&(Admin, Range<usize>)>,
) {
    for (shadowed, by) in table.shadowed() {
        let (r, span) = &routes[shadowed];
        d.error(
            Rule::ShadowedRoute,
            span.clone(),
            format!(
                "route `{}` can never match: route `{}` before it has the same host and path prefix",
                r.name, routes[by].0.name
            ),
        )
        .hint("remove one, or give the earlier route a narrower condition (listener, method, headers)");
    }
    // A route that failed to parse may be the pool's user: only warn on an otherwise clean file.
    let routes_complete = !d.has_errors();
    for (i, (pool, span)) in pools.iter().enumerate() {
        if routes_complete && !routes.iter().any(|(r, _)| r.pool() == Some(i)) {
            d.warning(
                Rule::UnusedPool,
                span.clone(),
                format!("pool `{}` is not used by any route", pool.name),
            );
        }
    }
    if let Some((admin, span)) = admin {
        if !admin.bind.ip().is_loopback() && admin.tls.is_none() {
            // Tokens in clear text across a network: refused unless the operator says the
            // network is safe; even then, a warning.
            let message = format!(
                "the admin API binds {}, which is reachable from other machines, without TLS",
                admin.bind
            );
            let hint = "bind it to 127.0.0.1 or [::1], add `tls = { cert = \"admin.pem\", key = \"admin.key\" }`, or set `insecure = true` if a private network protects it";
            if admin.insecure {
                d.warning(Rule::AdminNotLoopback, span.clone(), message).hint(hint);
            } else {
                d.error(Rule::AdminNotLoopback, span.clone(), message).hint(hint);
            }
        }
    }
    for (test, span) in tests {
        if let Some(failure) = route_test(test, routes, pools, table) {
            d.error(Rule::TestFailed, span.clone(), format!("route test failed: {failure}"));
        }
    }
}

/// Runs one `[[test]]`: `None` when it passes, else what went wrong.
fn route_test(
    test: &RouteTest,
    routes: &[SpannedRoute],
    pools: &[(Pool, Range<usize>)],
    table: &RouteTable,
) -> Option<String> {
    let found = test.route(table).map(|i| &routes[i].0);
    let query = test.query.as_deref().map_or(String::new(), |q| format!("?{q}"));
    let request = format!("{} {}://{}{}{query}", test.method, test.scheme, test.host, test.path);
    let location = |r: &Route| r.location(&test.scheme, &test.host, &test.path, test.query.as_deref());
    let got = match found.map(|r| (r, &r.action)) {
        Some((r, Action::Pool(p))) => format!("route `{}` (pool `{}`)", r.name, pools[*p].0.name),
        Some((r, Action::Redirect(x))) => format!(
            "route `{}` (redirect {} to {})",
            r.name,
            x.status,
            location(r).unwrap_or_default()
        ),
        Some((r, Action::Respond(x))) => format!("route `{}` (status {})", r.name, x.status),
        None => "no route (404)".to_string(),
    };
    let ok = match (&test.expect, found) {
        (TestExpectation::Pool(p), Some(r)) => r.pool().is_some_and(|i| pools[i].0.name == *p),
        (TestExpectation::Route(name), Some(r)) => r.name == *name,
        (TestExpectation::Status(404), None) => true,
        (TestExpectation::Status(s), Some(r)) => match &r.action {
            Action::Respond(x) => x.status == *s,
            Action::Redirect(x) => x.status == *s,
            Action::Pool(_) => false,
        },
        (TestExpectation::Redirect(url), Some(r)) => location(r).as_deref() == Some(url.as_str()),
        _ => false,
    };
    if !ok {
        let want = match &test.expect {
            TestExpectation::Pool(p) => format!("pool `{p}`"),
            TestExpectation::Route(r) => format!("route `{r}`"),
            TestExpectation::Status(s) => format!("status {s}"),
            TestExpectation::Redirect(url) => format!("a redirect to {url}"),
        };
        return Some(format!("{request} expected {want}, got {got}"));
    }
    let route = found?;
    if let Some(want) = &test.expect_path {
        if route.pool().is_none() {
            return Some(format!(
                "{request}: `expect_path`, but route `{}` answers itself",
                route.name
            ));
        }
        let seen = format!("{}{query}", route.backend_path(&test.path));
        if seen != *want {
            return Some(format!(
                "{request} expected the backend to see {want}, it would see {seen}"
            ));
        }
    }
    let headers = seen_headers(test, route);
    for (name, want) in &test.expect_headers {
        let got = headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        if got != Some(want.as_str()) {
            let side = if route.pool().is_some() {
                "the backend's request"
            } else {
                "the answer"
            };
            return Some(format!(
                "{request} expected `{name}: {want}` on {side}, got {}",
                got.map_or("no such header".to_string(), |v| format!("`{v}`"))
            ));
        }
    }
    None
}

/// The header fields a route test's `expect_header` is checked against: the request the
/// backend receives for a pool route, the answer for a route that answers itself.
fn seen_headers(test: &RouteTest, route: &Route) -> Vec<(String, String)> {
    let apply = |mut fields: Vec<(String, String)>, edits: &HeaderEdits| {
        fields.retain(|(n, _)| !edits.remove.contains(n) && !edits.set.iter().any(|(s, _)| s == n));
        fields.extend(edits.set.iter().cloned());
        fields
    };
    match &route.action {
        Action::Pool(_) => {
            let mut fields = test.headers.clone();
            let host = route
                .rewrite
                .as_ref()
                .and_then(|r| r.host.clone())
                .unwrap_or_else(|| test.host.clone());
            fields.retain(|(n, _)| n != "host");
            fields.push(("host".into(), host));
            apply(fields, &route.request_headers)
        }
        Action::Respond(x) => apply(x.headers.clone(), &route.response_headers),
        Action::Redirect(_) => {
            let location = route
                .location(&test.scheme, &test.host, &test.path, test.query.as_deref())
                .unwrap_or_default();
            apply(vec![("location".into(), location)], &route.response_headers)
        }
    }
}
