//! A naive route matcher and the properties a checked config must have, shared by
//! `tests/properties.rs` and the fuzz targets `config` and `router` (which include this file by
//! path: one oracle for both, so a fuzzer and a property test cannot drift apart).
//!
//! The matcher reads the precedence rules of `routing.rs`'s module doc literally: among the
//! routes whose every condition holds, the best host match (exact, then the longest wildcard
//! suffix, then none), then the longest path prefix, then the first declared. It scans every
//! route per request; the real table indexes them by host. They must always agree.
// Each includer uses a part of it.
#![allow(dead_code)]

use safelb_config::{HostMatch, RouteMatch};

/// A request as the router sees it.
#[derive(Clone, Debug)]
pub struct Req {
    pub listener: String,
    pub method: String,
    pub host: String,
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
}

/// The host as routes compare it: lower case, without a port (digits after the last colon,
/// or after an IPv6 literal's bracket) and without one trailing dot.
fn bare_host(host: &str) -> String {
    let mut h = host;
    if h.starts_with('[') {
        if let Some(end) = h.find(']') {
            h = &h[..=end];
        }
    } else if let Some(colon) = h.rfind(':') {
        if h[colon + 1..].chars().all(|c| c.is_ascii_digit()) {
            h = &h[..colon];
        }
    }
    h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase()
}

/// Whole path segments: `/api` takes `/api` and `/api/x`, not `/apix`.
fn under(prefix: &str, path: &str) -> bool {
    if prefix == "/" || path == prefix {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// The index of the route `req` takes, by scanning every route.
pub fn naive_find(routes: &[RouteMatch], req: &Req) -> Option<usize> {
    let host = bare_host(&req.host);
    let mut best: Option<((u8, usize), usize, usize)> = None;
    for (i, r) in routes.iter().enumerate() {
        let host_rank = match &r.host {
            Some(HostMatch::Exact(h)) if *h == host => (2, 0),
            Some(HostMatch::Wildcard(s)) if host.len() > s.len() && host.ends_with(s.as_str()) => (1, s.len()),
            None => (0, 0),
            _ => continue,
        };
        let holds = r.listener.as_ref().is_none_or(|l| *l == req.listener)
            && under(&r.path_prefix, &req.path)
            && (r.methods.is_empty() || r.methods.contains(&req.method))
            && r.headers
                .iter()
                .all(|(n, v)| req.headers.iter().find(|(name, _)| name == n).map(|(_, value)| value) == Some(v));
        if !holds {
            continue;
        }
        let better = match best {
            None => true,
            // Later routes win only by a strictly better host or a strictly longer prefix.
            Some((rank, len, _)) => (host_rank, r.path_prefix.len()) > (rank, len),
        };
        if better {
            best = Some((host_rank, r.path_prefix.len(), i));
        }
    }
    best.map(|(_, _, i)| i)
}

/// The real table's answer for `req`.
pub fn table_find(table: &safelb_config::routing::RouteTable, req: &Req) -> Option<usize> {
    table.find(&safelb_config::routing::RequestView {
        listener: &req.listener,
        method: &req.method,
        host: &req.host,
        path: &req.path,
        header: |name: &str| req.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()),
    })
}

/// Builds the table for `routes` and checks it against the naive matcher on every request.
pub fn compare(routes: &[RouteMatch], requests: &[Req]) {
    let table = safelb_config::routing::RouteTable::build(routes.to_vec());
    for req in requests {
        assert_eq!(
            table_find(&table, req),
            naive_find(routes, req),
            "the table and the naive matcher disagree on {req:?} over {routes:#?}"
        );
    }
}

/// A request that meets `route`'s own conditions (its listener, a host it takes, its prefix, its
/// first method, its headers): the route may still lose to a better one.
pub fn request_for(route: &RouteMatch) -> Req {
    Req {
        listener: route.listener.clone().unwrap_or_default(),
        method: route.methods.first().cloned().unwrap_or_else(|| "GET".into()),
        host: match &route.host {
            Some(HostMatch::Exact(h)) => h.clone(),
            Some(HostMatch::Wildcard(s)) => format!("x{s}"),
            None => "any.example".into(),
        },
        path: route.path_prefix.clone(),
        headers: route.headers.clone(),
    }
}

/// Checks `source` and, when it is valid, that its own promises hold: no route is shadowed; each
/// `[[test]]` request takes the route the naive matcher picks; and for a request made from each
/// route's own conditions the table agrees with the naive matcher. Rendering the diagnostics
/// (text and located, as `check` prints them) must not panic either.
pub fn check_config(source: &str) {
    let checked = safelb_config::check("fuzz.toml", source);
    let _ = checked.diagnostics.render();
    let _ = checked.diagnostics.located();
    let Some(config) = checked.config else {
        assert!(checked.diagnostics.has_errors(), "no config and no error");
        return;
    };
    let routes: Vec<RouteMatch> = config.routes.iter().map(|r| r.matches.clone()).collect();
    assert!(
        config.route_table.shadowed().is_empty(),
        "a valid config has a shadowed route"
    );
    let mut requests: Vec<Req> = routes.iter().map(request_for).collect();
    for test in &config.tests {
        let req = Req {
            listener: test.listener.clone(),
            method: test.method.clone(),
            host: test.host.clone(),
            path: test.path.clone(),
            headers: test.headers.clone(),
        };
        assert_eq!(test.route(&config.route_table), naive_find(&routes, &req), "{req:?}");
        requests.push(req);
    }
    for req in &requests {
        assert_eq!(
            table_find(&config.route_table, req),
            naive_find(&routes, req),
            "{req:?}"
        );
    }
}

// Small vocabularies, so that random routes and requests meet often: hosts that are each
// other's suffixes, prefixes on and off segment boundaries, a few methods and header values.
const HOSTS: &[&str] = &[
    "shop.example",
    "eu.shop.example",
    "a.eu.shop.example",
    "example",
    "other.test",
    "[::1]",
];
const PREFIXES: &[&str] = &["/", "/api", "/api/", "/api/v2", "/apix", "/a", "/a/b"];
const PATHS: &[&str] = &["/", "/api", "/api/", "/api/v2/x", "/apix", "/apixy", "/a/b/c", "/b", ""];
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE"];
const HEADER_NAMES: &[&str] = &["x-canary", "x-user"];
const HEADER_VALUES: &[&str] = &["1", "2"];
const LISTENERS: &[&str] = &["public", "admin"];

fn pick<'a>(list: &[&'a str], i: u8) -> &'a str {
    list[usize::from(i) % list.len()]
}

fn headers(pairs: &[(u8, u8)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|&(n, v)| (pick(HEADER_NAMES, n).to_owned(), pick(HEADER_VALUES, v).to_owned()))
        .collect()
}

/// A route from indexes into the vocabularies; `host`'s flag makes it a wildcard.
pub fn route(
    listener: Option<u8>,
    host: Option<(bool, u8)>,
    prefix: u8,
    methods: &[u8],
    hdrs: &[(u8, u8)],
) -> RouteMatch {
    RouteMatch {
        listener: listener.map(|l| pick(LISTENERS, l).to_owned()),
        host: host.map(|(wild, h)| match wild {
            true => HostMatch::Wildcard(format!(".{}", pick(HOSTS, h))),
            false => HostMatch::Exact(pick(HOSTS, h).to_owned()),
        }),
        path_prefix: pick(PREFIXES, prefix).to_owned(),
        methods: methods.iter().map(|&m| pick(METHODS, m).to_owned()).collect(),
        headers: headers(hdrs),
    }
}

/// How a request's host is spelt around the vocabulary's name.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spelling {
    pub port: Option<u16>,
    pub upper: bool,
    pub trailing_dot: bool,
}

/// A request from indexes into the vocabularies, or free text for its host and path.
pub fn request(
    listener: u8,
    method: u8,
    host: Result<(u8, Spelling), String>,
    path: Result<u8, String>,
    hdrs: &[(u8, u8)],
) -> Req {
    let host = match host {
        Ok((h, spelling)) => {
            let mut host = pick(HOSTS, h).to_owned();
            if spelling.upper {
                host = host.to_ascii_uppercase();
            }
            if spelling.trailing_dot {
                host.push('.');
            }
            if let Some(port) = spelling.port {
                host = format!("{host}:{port}");
            }
            host
        }
        Err(text) => text,
    };
    Req {
        listener: pick(LISTENERS, listener).to_owned(),
        method: pick(METHODS, method).to_owned(),
        host,
        path: path.map_or_else(|text| text, |p| pick(PATHS, p).to_owned()),
        headers: headers(hdrs),
    }
}
