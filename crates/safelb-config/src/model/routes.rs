//! `[[route]]` in the model: what a route matches and what it does.

use crate::routing::RouteMatch;

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub name: String,
    /// Which requests take this route.
    pub matches: RouteMatch,
    /// What it does with them: exactly one of `pool`, `redirect`, `respond`.
    pub action: Action,
    /// How a proxied request is changed before it leaves (`pool` routes only).
    pub rewrite: Option<Rewrite>,
    pub request_headers: HeaderEdits,
    /// Applied to every answer of the route: proxied, redirect or fixed.
    pub response_headers: HeaderEdits,
    pub rate_limit: Option<RateLimit>,
}

impl Route {
    /// The pool a `pool` route sends to.
    pub fn pool(&self) -> Option<usize> {
        match self.action {
            Action::Pool(p) => Some(p),
            _ => None,
        }
    }
}

/// What a route does with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Proxy to `Config::pools[i]`.
    Pool(usize),
    Redirect(Redirect),
    Respond(Respond),
}

impl Action {
    /// The name used in metrics and plans.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Pool(_) => "proxied",
            Action::Redirect(_) => "redirect",
            Action::Respond(_) => "respond",
        }
    }
}

/// An answer that sends the client elsewhere. Parts left out keep the request's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// `http` or `https`.
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Replaces the whole path.
    pub path: Option<String>,
    /// Replaces the route's matched `path_prefix`, keeping the rest of the path.
    pub prefix: Option<String>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// A fixed answer given without a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Respond {
    pub status: u16,
    pub body: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
}

/// How a proxied request's target changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// Replaces the route's matched `path_prefix`.
    pub prefix: Option<String>,
    /// Replaces the `Host` header.
    pub host: Option<String>,
}

/// Header fields to set (replacing any of the same name) and to remove. Names are lower-case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// A token bucket per key: `rate` tokens a second, at most `burst` kept.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub key: RateKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// The client's IP address.
    Client,
    /// All requests of the route share one bucket.
    Route,
    /// The value of a request header (lower-case name); requests without it share one bucket.
    Header(String),
}

/// `path` with the route's matched `path_prefix` replaced by `prefix` (`/old/x` under `/old`
/// with `/new` is `/new/x`), for [`Route::backend_path`] and [`Route::location`], which the data
/// plane and route tests both use, so `check` predicts what the proxy does.
fn replace_prefix(path_prefix: &str, path: &str, prefix: &str) -> String {
    let matched = path_prefix.trim_end_matches('/');
    let rest = path.strip_prefix(matched).unwrap_or(path);
    let mut out = String::with_capacity(prefix.len() + rest.len());
    out.push_str(prefix.trim_end_matches('/'));
    if !rest.is_empty() && !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    out
}

impl Route {
    /// The path a backend sees for a request to `path` (after `rewrite.prefix`).
    pub fn backend_path(&self, path: &str) -> String {
        match self.rewrite.as_ref().and_then(|r| r.prefix.as_deref()) {
            Some(prefix) => replace_prefix(&self.matches.path_prefix, path, prefix),
            None => path.to_owned(),
        }
    }

    /// Where a redirect route sends a request that came with `scheme`, `host` (the `Host`
    /// header, port included) and `path` and `query`: the parts the redirect names, the
    /// request's own for the rest. `None` for other routes.
    pub fn location(&self, scheme: &str, host: &str, path: &str, query: Option<&str>) -> Option<String> {
        let Action::Redirect(r) = &self.action else { return None };
        let new_scheme = r.scheme.as_deref().unwrap_or(scheme);
        let authority = if r.scheme.is_none() && r.host.is_none() && r.port.is_none() {
            host.to_owned()
        } else {
            let name = r.host.clone().unwrap_or_else(|| host_without_port(host).to_owned());
            match r.port {
                Some(p) if !(new_scheme == "https" && p == 443 || new_scheme == "http" && p == 80) => {
                    format!("{name}:{p}")
                }
                _ => name,
            }
        };
        let path = match (&r.path, &r.prefix) {
            (Some(p), _) => p.clone(),
            (None, Some(prefix)) => replace_prefix(&self.matches.path_prefix, path, prefix),
            (None, None) => path.to_owned(),
        };
        let query = query.map_or(String::new(), |q| format!("?{q}"));
        Some(format!("{new_scheme}://{authority}{path}{query}"))
    }
}

fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}
