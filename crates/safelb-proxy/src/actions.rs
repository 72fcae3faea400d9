//! A route's actions compiled for the request path: header edits as ready names and values,
//! the rewrite, the redirect's `Location`, the fixed answer, and the rate limiter.
//!
//! Everything that can be decided from the config is decided here, when the snapshot is built;
//! a request only copies prepared values.

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{HeaderMap, StatusCode, Uri};
use safelb_config::{Action, RateKey, Route};
use xxhash_rust::xxh3::xxh3_64;

use crate::headers::Fields;
use crate::metrics::ActionCounters;
use crate::ratelimit::{Limiter, RateLimiters};

/// Header fields to remove, then to set.
#[derive(Debug, Default)]
pub struct Edits {
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl Edits {
    fn compile(edits: &safelb_config::HeaderEdits) -> Edits {
        // `check` validated names and values: a failure here would be a bug there, and the
        // field is skipped rather than the snapshot refused.
        Edits {
            set: edits
                .set
                .iter()
                .filter_map(|(n, v)| {
                    Some((
                        HeaderName::from_bytes(n.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            remove: edits
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// A fixed answer, prepared once.
#[derive(Debug)]
pub struct Fixed {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// One route's actions.
#[derive(Debug)]
pub struct RouteActions {
    /// The route itself, for what is decided per request from its config (the path a rewrite
    /// gives, a redirect's `Location` and status).
    route: Route,
    /// `rewrite.host`, ready to send.
    rewrite_host: Option<HeaderValue>,
    pub request_headers: Edits,
    pub response_headers: Edits,
    pub limiter: Option<Arc<Limiter>>,
    pub fixed: Option<Fixed>,
    pub counters: Arc<ActionCounters>,
    /// A route that answers itself and that a `[[test]]` of its config exercises: its answers
    /// are intended (a maintenance page), not an accident.
    pub tested: bool,
    /// On a candidate: a route that answers itself, untested, and not in the stable version as
    /// it is. Its answers count as errors of the candidate (see `Snapshot::mark_suspects`).
    pub suspect: AtomicBool,
}

impl RouteActions {
    pub fn new(route: &Route, limiters: &RateLimiters, counters: Arc<ActionCounters>) -> RouteActions {
        let fixed = match &route.action {
            Action::Respond(r) => Some(Fixed {
                status: StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK),
                headers: Edits::compile(&safelb_config::HeaderEdits {
                    set: r.headers.clone(),
                    remove: Vec::new(),
                })
                .set,
                body: Bytes::from(r.body.clone()),
            }),
            _ => None,
        };
        RouteActions {
            route: route.clone(),
            rewrite_host: route
                .rewrite
                .as_ref()
                .and_then(|r| r.host.as_deref())
                .and_then(|h| HeaderValue::from_str(h).ok()),
            request_headers: Edits::compile(&route.request_headers),
            response_headers: Edits::compile(&route.response_headers),
            limiter: route.rate_limit.as_ref().map(|rule| limiters.get(&route.name, rule)),
            fixed,
            counters,
            tested: false,
            suspect: AtomicBool::new(false),
        }
    }

    /// Takes a rate-limit token for this request; `Err(seconds)` to wait when there is none.
    pub(crate) fn admit(&self, headers: &impl Fields, client: SocketAddr) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        let hash = match &limiter.key {
            RateKey::Route => 0,
            RateKey::Client => match client.ip() {
                std::net::IpAddr::V4(ip) => xxh3_64(&ip.octets()),
                std::net::IpAddr::V6(ip) => xxh3_64(&ip.octets()),
            },
            RateKey::Header(name) => headers.first(name).map_or(0, xxh3_64),
        };
        limiter
            .check(hash)
            .map_err(|wait| wait.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// Whether a proxied request is changed before it leaves (`rewrite`, `request_headers`).
    pub fn edits_request(&self) -> bool {
        self.route.rewrite.is_some() || !self.request_headers.is_empty()
    }

    /// Applies `rewrite` and `request_headers` to a request about to be proxied.
    pub fn prepare(&self, uri: &mut Uri, headers: &mut HeaderMap) {
        if self.route.rewrite.as_ref().is_some_and(|r| r.prefix.is_some()) {
            let path = self.route.backend_path(uri.path());
            let target = match uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            if let Ok(new) = Uri::try_from(target) {
                *uri = new;
            }
        }
        if let Some(host) = &self.rewrite_host {
            headers.insert(HOST, host.clone());
        }
        self.request_headers.apply(headers);
    }

    /// The `Location` a redirect route sends a request to (see [`Route::location`]).
    pub fn location(&self, scheme: &str, host: &str, uri: &Uri) -> Option<String> {
        self.route.location(scheme, host, uri.path(), uri.query())
    }

    pub fn redirect_status(&self) -> StatusCode {
        match &self.route.action {
            Action::Redirect(r) => StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND),
            _ => StatusCode::FOUND,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(extra: &str) -> Route {
        let source = format!(
            "[listener.plain]\nbind = \"127.0.0.1:1\"\n[pool.p]\nbackends = [\"127.0.0.1:9\"]\n[[route]]\nname = \"fallback\"\npath_prefix = \"/fallback\"\npool = \"p\"\n[[route]]\nname = \"r\"\n{extra}\n"
        );
        let config = safelb_config::check("t.toml", &source).into_result().expect("valid");
        config.routes[1].clone()
    }

    fn actions(extra: &str) -> RouteActions {
        RouteActions::new(&route(extra), &RateLimiters::default(), Arc::default())
    }

    #[test]
    fn redirect_locations() {
        let uri: Uri = "/old/x?a=1&b=2".parse().unwrap();
        let https = actions("path_prefix = \"/old\"\nredirect = { scheme = \"https\", port = 8443, status = 308 }");
        assert_eq!(
            https.location("http", "shop.example:8080", &uri).as_deref(),
            Some("https://shop.example:8443/old/x?a=1&b=2")
        );
        assert_eq!(https.redirect_status(), StatusCode::PERMANENT_REDIRECT);
        let default_port = actions("path_prefix = \"/old\"\nredirect = { scheme = \"https\", port = 443 }");
        assert_eq!(
            default_port.location("http", "shop.example:8080", &uri).as_deref(),
            Some("https://shop.example/old/x?a=1&b=2")
        );
        assert_eq!(default_port.redirect_status(), StatusCode::FOUND);
        let moved = actions("path_prefix = \"/old\"\nredirect = { prefix = \"/new\" }");
        assert_eq!(
            moved.location("http", "shop.example:8080", &uri).as_deref(),
            Some("http://shop.example:8080/new/x?a=1&b=2")
        );
        let whole = actions("path_prefix = \"/old\"\nredirect = { host = \"www.example\", path = \"/\" }");
        assert_eq!(
            whole
                .location("https", "shop.example", &"/old/x".parse().unwrap())
                .as_deref(),
            Some("https://www.example/")
        );
    }

    #[test]
    fn rewrite_replaces_the_matched_prefix_and_the_host() {
        let a = actions("path_prefix = \"/api\"\npool = \"p\"\nrewrite = { prefix = \"/v2\", host = \"api.internal\" }\nrequest_headers = { set = { \"X-Env\" = \"prod\" }, remove = [\"X-Debug\"] }");
        for (before, after) in [("/api/cart?id=3", "/v2/cart?id=3"), ("/api", "/v2"), ("/api/", "/v2/")] {
            let mut uri: Uri = before.parse().unwrap();
            let mut headers = HeaderMap::new();
            headers.insert(HOST, HeaderValue::from_static("shop.example"));
            headers.insert("x-debug", HeaderValue::from_static("1"));
            a.prepare(&mut uri, &mut headers);
            assert_eq!(uri.to_string(), after, "from {before}");
            assert_eq!(headers[HOST], "api.internal");
            assert_eq!(headers["x-env"], "prod");
            assert!(!headers.contains_key("x-debug"));
        }
        let root = actions("pool = \"p\"\nrewrite = { prefix = \"/app\" }");
        let mut uri: Uri = "/x".parse().unwrap();
        root.prepare(&mut uri, &mut HeaderMap::new());
        assert_eq!(uri.to_string(), "/app/x");
    }

    #[test]
    fn rate_limit_keys() {
        let a = actions("pool = \"p\"\nrate_limit = { rate = \"1/s\", burst = 1, key = \"header:X-Api-Key\" }");
        let client: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let mut k1 = HeaderMap::new();
        k1.insert("x-api-key", HeaderValue::from_static("one"));
        let mut k2 = HeaderMap::new();
        k2.insert("x-api-key", HeaderValue::from_static("two"));
        assert!(a.admit(&k1, client).is_ok());
        assert_eq!(a.admit(&k1, client), Err(1));
        assert!(a.admit(&k2, client).is_ok(), "another key has its own bucket");
    }
}
