//! The compiled route table: which route a request takes.
//!
//! One implementation serves both `safelb check` (route tests, shadowing) and the data plane,
//! so what `check` promises is what the proxy does.
//!
//! Precedence, in order: host specificity (exact host, then the longest matching wildcard
//! suffix, then routes without a host), then the longest path prefix, then declaration order.
//! A route matches only if its listener, method and header conditions hold as well; a request that
//! fails them falls through to the next candidate. Path prefixes match whole segments:
//! `/api` matches `/api` and `/api/cart`, never `/apix` (a prefix ending in `/` matches
//! anything below it).

use std::collections::HashMap;

/// Which requests a route takes: its conditions, apart from what it does with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    /// Only requests that arrived on this listener.
    pub listener: Option<String>,
    pub host: Option<HostMatch>,
    /// Always starts with `/`; `/` when the config gives none.
    pub path_prefix: String,
    /// Upper-case method names; empty matches every method.
    pub methods: Vec<String>,
    /// Lower-cased header name and exact value.
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostMatch {
    /// Lower-case host without port.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches any host ending with it.
    Wildcard(String),
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    /// Each route's conditions, in declaration order.
    routes: Vec<RouteMatch>,
    exact: HashMap<String, Vec<usize>>,
    /// `(suffix, routes)`, longest suffix first.
    wildcard: Vec<(String, Vec<usize>)>,
    any_host: Vec<usize>,
}

/// What the router needs to know of a request.
pub struct RequestView<'a, H: Fn(&str) -> Option<&'a str>> {
    /// The listener the request arrived on (empty when unknown: matches only routes without
    /// a `listener`).
    pub listener: &'a str,
    pub method: &'a str,
    /// The `Host` header or URI authority, possibly with a port and upper case.
    pub host: &'a str,
    /// The URI path without the query.
    pub path: &'a str,
    /// Header value by lower-case name.
    pub header: H,
}

impl RouteTable {
    /// The table for routes in declaration order; [`find`](Self::find) answers indexes into it.
    pub fn build(routes: Vec<RouteMatch>) -> RouteTable {
        let mut table = RouteTable::default();
        for (i, route) in routes.iter().enumerate() {
            match &route.host {
                Some(HostMatch::Exact(h)) => table.exact.entry(h.clone()).or_default().push(i),
                Some(HostMatch::Wildcard(s)) => match table.wildcard.iter_mut().find(|(suffix, _)| suffix == s) {
                    Some((_, list)) => list.push(i),
                    None => table.wildcard.push((s.clone(), vec![i])),
                },
                None => table.any_host.push(i),
            }
        }
        let by_prefix = |list: &mut Vec<usize>| {
            // Stable sort: equal prefixes keep declaration order.
            list.sort_by_key(|&i| std::cmp::Reverse(routes[i].path_prefix.len()));
        };
        table.exact.values_mut().for_each(by_prefix);
        table.wildcard.iter_mut().for_each(|(_, list)| by_prefix(list));
        by_prefix(&mut table.any_host);
        table.wildcard.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        table.routes = routes;
        table
    }

    /// The index of the route the request takes, if any.
    pub fn find<'a, H: Fn(&str) -> Option<&'a str>>(&self, req: &RequestView<'a, H>) -> Option<usize> {
        let host = normalize_host(req.host);
        let host = host.as_ref();
        if let Some(list) = self.exact.get(host) {
            if let Some(i) = self.first_match(list, req) {
                return Some(i);
            }
        }
        for (suffix, list) in &self.wildcard {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                if let Some(i) = self.first_match(list, req) {
                    return Some(i);
                }
            }
        }
        self.first_match(&self.any_host, req)
    }

    fn first_match<'a, H: Fn(&str) -> Option<&'a str>>(
        &self,
        list: &[usize],
        req: &RequestView<'a, H>,
    ) -> Option<usize> {
        list.iter().copied().find(|&i| {
            let r = &self.routes[i];
            r.listener.as_deref().is_none_or(|l| l == req.listener)
                && prefix_matches(&r.path_prefix, req.path)
                && (r.methods.is_empty() || r.methods.iter().any(|m| m == req.method))
                && r.headers
                    .iter()
                    .all(|(name, value)| (req.header)(name) == Some(value.as_str()))
        })
    }

    /// Pairs `(shadowed, by)`: routes that can never match because an earlier route with the
    /// same host and prefix and no stricter conditions always wins.
    pub fn shadowed(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(by) = self.routes[..i].iter().position(|earlier| {
                earlier.host == r.host
                    && (earlier.listener.is_none() || earlier.listener == r.listener)
                    && earlier.path_prefix == r.path_prefix
                    && (earlier.methods.is_empty()
                        || (!r.methods.is_empty() && r.methods.iter().all(|m| earlier.methods.contains(m))))
                    && earlier.headers.iter().all(|h| r.headers.contains(h))
            }) {
                out.push((i, by));
            }
        }
        out
    }
}

/// Lower-case host without port or trailing dot. Allocates only for upper-case input.
pub fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let without_port = if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop the port after them.
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    let trimmed = without_port.strip_suffix('.').unwrap_or(without_port);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(trimmed)
    }
}

/// Segment-aware prefix match (see the module doc).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    if !path.starts_with(prefix) {
        return false;
    }
    prefix.ends_with('/') || path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of named routes, for tests that read the chosen route's name.
    struct Named(RouteTable, Vec<&'static str>);

    fn route(name: &'static str, host: Option<&str>, prefix: &str) -> (&'static str, RouteMatch) {
        let matches = RouteMatch {
            listener: None,
            host: host.map(|h| match h.strip_prefix('*') {
                Some(s) => HostMatch::Wildcard(s.into()),
                None => HostMatch::Exact(h.into()),
            }),
            path_prefix: prefix.into(),
            methods: vec![],
            headers: vec![],
        };
        (name, matches)
    }

    fn table(routes: Vec<(&'static str, RouteMatch)>) -> Named {
        let (names, matches) = routes.into_iter().unzip();
        Named(RouteTable::build(matches), names)
    }

    fn find(t: &Named, host: &str, path: &str) -> Option<String> {
        find_with(t, "GET", host, path, &[])
    }

    fn find_with(t: &Named, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Option<String> {
        let view = RequestView {
            listener: "public",
            method,
            host,
            path,
            header: |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v),
        };
        t.0.find(&view).map(|i| t.1[i].to_string())
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any_then_longest_prefix() {
        let t = table(vec![
            route("default", None, "/"),
            route("wild", Some("*.shop.example"), "/"),
            route("shop", Some("shop.example"), "/"),
            route("shop-api", Some("shop.example"), "/api"),
            route("deep-wild", Some("*.eu.shop.example"), "/"),
        ]);
        assert_eq!(find(&t, "shop.example", "/api/cart").as_deref(), Some("shop-api"));
        assert_eq!(find(&t, "SHOP.example:8080", "/api").as_deref(), Some("shop-api"));
        assert_eq!(find(&t, "shop.example", "/apix").as_deref(), Some("shop"));
        assert_eq!(find(&t, "m.shop.example", "/").as_deref(), Some("wild"));
        assert_eq!(find(&t, "a.eu.shop.example", "/").as_deref(), Some("deep-wild"));
        assert_eq!(find(&t, "other.example", "/x").as_deref(), Some("default"));
    }

    #[test]
    fn wildcard_does_not_match_the_bare_domain() {
        let t = table(vec![route("wild", Some("*.shop.example"), "/")]);
        assert_eq!(find(&t, "shop.example", "/"), None);
        assert_eq!(find(&t, "evilshop.example", "/"), None);
    }

    #[test]
    fn conditions_fall_through_to_the_next_candidate() {
        let mut canary = route("canary", Some("shop.example"), "/api");
        canary.1.headers = vec![("x-canary".into(), "1".into())];
        let mut writes = route("writes", Some("shop.example"), "/api");
        writes.1.methods = vec!["POST".into()];
        let t = table(vec![
            canary,
            writes,
            route("api", Some("shop.example"), "/api"),
            route("any", None, "/"),
        ]);
        assert_eq!(
            find_with(&t, "GET", "shop.example", "/api", &[("x-canary", "1")]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            find_with(&t, "POST", "shop.example", "/api", &[]).as_deref(),
            Some("writes")
        );
        assert_eq!(
            find_with(&t, "GET", "shop.example", "/api", &[]).as_deref(),
            Some("api")
        );
        assert_eq!(
            find_with(&t, "GET", "shop.example", "/web", &[]).as_deref(),
            Some("any")
        );
    }

    #[test]
    fn a_listener_condition_falls_through_like_the_others() {
        let mut plain = route("to-https", None, "/");
        plain.1.listener = Some("plain".into());
        let t = table(vec![plain, route("site", None, "/")]);
        let on = |listener: &str| {
            let view = RequestView {
                listener,
                method: "GET",
                host: "shop.example",
                path: "/x",
                header: |_: &str| None,
            };
            t.0.find(&view).map(|i| t.1[i])
        };
        assert_eq!(on("plain"), Some("to-https"));
        assert_eq!(on("secure"), Some("site"));
        // A catch-all after a listener-scoped route is not shadowed by it; the reverse is.
        assert!(t.0.shadowed().is_empty());
        let mut scoped = route("later", None, "/");
        scoped.1.listener = Some("plain".into());
        assert_eq!(table(vec![route("all", None, "/"), scoped]).0.shadowed(), vec![(1, 0)]);
    }

    #[test]
    fn no_route_is_none() {
        let t = table(vec![route("api", Some("shop.example"), "/api")]);
        assert_eq!(find(&t, "shop.example", "/"), None);
    }

    #[test]
    fn shadowing_is_detected_only_when_certain() {
        let mut post_only = route("post", None, "/api");
        post_only.1.methods = vec!["POST".into()];
        let t = table(vec![
            route("a", None, "/api"),
            route("b", None, "/api"),
            post_only,
            route("c", Some("x.example"), "/api"),
            route("d", None, "/api/v2"),
        ]);
        assert_eq!(t.0.shadowed(), vec![(1, 0), (2, 0)]);
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Shop.Example:443"), "shop.example");
        assert_eq!(normalize_host("shop.example."), "shop.example");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
    }
}
