//! `[[route]]`: listener, host, path prefix, method and header matches, and the action: the pool
//! a route sends to, a redirect or a fixed answer (the actions' own keys are in `actions.rs`).

use super::*;

pub(super) const ROUTE_KEYS: &[&str] = &[
    "name",
    "listener",
    "host",
    "path_prefix",
    "method",
    "headers",
    "pool",
    "redirect",
    "respond",
    "rewrite",
    "request_headers",
    "response_headers",
    "rate_limit",
];

const ACTIONS: [&str; 3] = ["pool", "redirect", "respond"];

pub(super) fn routes(
    d: &mut Diagnostics,
    top: &Section<'_, '_>,
    listeners: &[Listener],
    pools: &[(Pool, Range<usize>)],
) -> Vec<SpannedRoute> {
    let Some(list) = top.get("route") else {
        return Vec::new();
    };
    let Some(items) = as_array(d, list, "`route`") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut names: HashMap<String, ()> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let Some(mut r) = as_section(d, item, format!("route #{}", i + 1)) else {
            continue;
        };
        r.deny_unknown(d, ROUTE_KEYS);
        let name = match r.str(d, "name") {
            Some(n) => {
                if names.insert(n.get_ref().to_string(), ()).is_some() {
                    d.error(
                        Rule::DuplicateName,
                        n.span(),
                        format!("two routes are named `{}`", n.get_ref()),
                    );
                }
                n.get_ref().to_string()
            }
            None => format!("route#{}", i + 1),
        };
        let what = format!("route `{name}`");
        r.what = what.clone();
        let host = r.str(d, "host").and_then(|h| host_match(d, &h, &what));
        let path_prefix = match r.str(d, "path_prefix") {
            None => "/".to_string(),
            Some(p) if p.get_ref().starts_with('/') => p.get_ref().to_string(),
            Some(p) => {
                d.error(
                    Rule::InvalidValue,
                    p.span(),
                    format!("{what}: `path_prefix` must start with `/`"),
                )
                .hint(format!("write \"/{}\"", p.get_ref()));
                continue;
            }
        };
        let methods = r.get("method").map(|m| methods(d, m, &what)).unwrap_or_default();
        let headers = r.section(d, "headers").map(|h| header_pairs(d, &h)).unwrap_or_default();
        let listener = match r.str(d, "listener") {
            None => None,
            Some(l) if listeners.iter().any(|x| x.name == *l.get_ref()) => Some(l.get_ref().to_string()),
            Some(l) => {
                let diag = d.error(
                    Rule::UndefinedListener,
                    l.span(),
                    format!("{what} matches listener `{}`, which is not defined", l.get_ref()),
                );
                match did_you_mean(l.get_ref(), listeners.iter().map(|x| x.name.as_str())) {
                    Some(s) => diag.hint(format!("did you mean `{s}`?")),
                    None => diag.hint(format!("define it with `[listener.{}]`", l.get_ref())),
                };
                continue;
            }
        };
        let matches = RouteMatch {
            listener,
            host,
            path_prefix,
            methods,
            headers,
        };
        let request_headers = header_edits(d, &r, "request_headers");
        let response_headers = header_edits(d, &r, "response_headers");
        let rate_limit = r.section(d, "rate_limit").and_then(|s| rate_limit(d, &s));
        let given: Vec<&str> = ACTIONS.iter().copied().filter(|a| r.get(a).is_some()).collect();
        if given.len() != 1 {
            let span = given.get(1).map_or(item.span(), |a| r.key_span(a));
            d.error(
                Rule::RouteAction,
                span,
                if given.is_empty() {
                    format!("{what} has no action")
                } else {
                    format!("{what} has both `{}` and `{}`", given[0], given[1])
                },
            )
            .hint("give exactly one of `pool = \"NAME\"`, `redirect = { ... }`, `respond = { ... }`");
            continue;
        }
        let (rewrite, proxied_only) = match r.section(d, "rewrite") {
            Some(s) => (rewrite(d, &s), Some(r.key_span("rewrite"))),
            None => (None, None),
        };
        let action = match given[0] {
            "redirect" => r
                .section(d, "redirect")
                .and_then(|s| redirect(d, &s))
                .map(Action::Redirect),
            "respond" => r
                .section(d, "respond")
                .and_then(|s| respond(d, &s))
                .map(Action::Respond),
            _ => pool_action(d, &r, pools, &what),
        };
        let Some(action) = action else { continue };
        if let (Some(span), false) = (proxied_only, matches!(action, Action::Pool(_))) {
            d.error(
                Rule::RouteAction,
                span,
                format!("{what}: `rewrite` applies to requests sent to a pool, and this route answers itself"),
            )
            .hint("for a redirect, give the new location in `redirect` itself");
            continue;
        }
        let span = r.get("name").map_or(item.span(), |v| v.span());
        out.push((
            Route {
                name,
                matches,
                action,
                rewrite,
                request_headers,
                response_headers,
                rate_limit,
            },
            span,
        ));
    }
    out
}

/// `pool = "NAME"`: the index of a defined pool.
fn pool_action(d: &mut Diagnostics, r: &Section<'_, '_>, pools: &[(Pool, Range<usize>)], what: &str) -> Option<Action> {
    let pool_name = r.str(d, "pool")?;
    let Some(pool) = pools.iter().position(|(p, _)| p.name == *pool_name.get_ref()) else {
        let diag = d.error(
            Rule::UndefinedPool,
            pool_name.span(),
            format!(
                "{what} sends traffic to pool `{}`, which is not defined",
                pool_name.get_ref()
            ),
        );
        match did_you_mean(pool_name.get_ref(), pools.iter().map(|(p, _)| p.name.as_str())) {
            Some(s) => diag.hint(format!("did you mean `{s}`?")),
            None => diag.hint(format!("define it with `[pool.{}]`", pool_name.get_ref())),
        };
        return None;
    };
    Some(Action::Pool(pool))
}

pub(super) fn host_match(d: &mut Diagnostics, h: &Spanned<&str>, what: &str) -> Option<HostMatch> {
    let text = h.get_ref().to_ascii_lowercase();
    let valid_label = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    };
    let parsed = match text.strip_prefix("*.") {
        Some(rest) if valid_label(rest) => Some(HostMatch::Wildcard(format!(".{rest}"))),
        None if valid_label(&text) || (text.starts_with('[') && text.ends_with(']')) => {
            Some(HostMatch::Exact(text.clone()))
        }
        _ => None,
    };
    if parsed.is_none() {
        d.error(
            Rule::InvalidValue,
            h.span(),
            format!(
                "{what}: `host` = \"{}\" is not a host name or `*.domain` wildcard",
                h.get_ref()
            ),
        )
        .hint("write the name without scheme or port, e.g. \"shop.example\" or \"*.shop.example\"");
    }
    parsed
}

pub(super) fn methods(d: &mut Diagnostics, v: &Value<'_>, what: &str) -> Vec<String> {
    let one = |d: &mut Diagnostics, v: &Value<'_>| -> Option<String> {
        let m = as_str(d, v, &format!("`method` of {what}"))?;
        let upper = m.get_ref().to_ascii_uppercase();
        if upper.is_empty() || !upper.bytes().all(|b| b.is_ascii_alphabetic()) {
            d.error(
                Rule::InvalidValue,
                m.span(),
                format!("{what}: `{}` is not an HTTP method", m.get_ref()),
            );
            return None;
        }
        Some(upper)
    };
    match v.get_ref() {
        DeValue::Array(items) => items.iter().filter_map(|i| one(d, i)).collect(),
        _ => one(d, v).into_iter().collect(),
    }
}

pub(super) fn header_pairs(d: &mut Diagnostics, h: &Section<'_, '_>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, value) in h.table.iter() {
        let Some(v) = as_str(d, value, &format!("header `{}` in {}", name.get_ref(), h.what)) else {
            continue;
        };
        out.push((name.get_ref().to_ascii_lowercase(), v.get_ref().to_string()));
    }
    out
}
