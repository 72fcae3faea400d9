//! Checks across sections: shadowed routes, unused pools, the admin address, route tests.

use std::ops::Range;

use crate::diagnostic::{Diagnostics, Rule};
use crate::model::{Admin, Pool, Route, RouteTest, TestExpectation};
use crate::routing::{RequestView, RouteTable};

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
        .hint("remove one, or give the earlier route a narrower condition (method, headers)");
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
        if !admin.bind.ip().is_loopback() {
            d.warning(
                Rule::AdminNotLoopback,
                span.clone(),
                format!(
                    "the admin API binds {}, which is reachable from other machines",
                    admin.bind
                ),
            )
            .hint("bind it to 127.0.0.1 or [::1] and reach it through an SSH tunnel or a private network");
        }
    }
    for (test, span) in tests {
        let view = RequestView {
            listener: &test.listener,
            method: &test.method,
            host: &test.host,
            path: &test.path,
            header: |name: &str| test.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()),
        };
        let found = table.find(&view).map(|i| &routes[i].0);
        let request = format!("{} http://{}{}", test.method, test.host, test.path);
        let got = match found {
            Some(r) => match r.pool() {
                Some(p) => format!("route `{}` (pool `{}`)", r.name, pools[p].0.name),
                None => format!("route `{}` ({})", r.name, r.action.name()),
            },
            None => "no route (404)".to_string(),
        };
        let ok = match (&test.expect, found) {
            (TestExpectation::Pool(p), Some(r)) => r.pool().is_some_and(|i| pools[i].0.name == *p),
            (TestExpectation::Route(name), Some(r)) => r.name == *name,
            (TestExpectation::Status(404), None) => true,
            _ => false,
        };
        if !ok {
            let want = match &test.expect {
                TestExpectation::Pool(p) => format!("pool `{p}`"),
                TestExpectation::Route(r) => format!("route `{r}`"),
                TestExpectation::Status(s) => format!("status {s}"),
            };
            d.error(
                Rule::TestFailed,
                span.clone(),
                format!("route test failed: {request} expected {want}, got {got}"),
            );
        }
    }
}
