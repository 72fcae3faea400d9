//! `[[route]]`: host, path prefix, method and header matches, and the pool a route sends to.

use super::*;

pub(super) const ROUTE_KEYS: &[&str] = &["name", "host", "path_prefix", "method", "headers", "pool"];

pub(super) fn routes(d: &mut Diagnostics, top: &Section<'_, '_>, pools: &[(Pool, Range<usize>)]) -> Vec<SpannedRoute> {
    let Some(list) = top.get("route") else {
        return Vec::new();
    };
    let Some(items) = as_array(d, list, "`route`") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut names: HashMap<String, ()> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let Some(r) = as_section(d, item, format!("route #{}", i + 1)) else {
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
        let Some(_) = r.require(d, "pool", "\"api\"") else {
            continue;
        };
        let Some(pool_name) = r.str(d, "pool") else {
            continue;
        };
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
            continue;
        };
        let span = r.get("name").map_or(item.span(), |v| v.span());
        out.push((
            Route {
                name,
                matches: RouteMatch {
                    host,
                    path_prefix,
                    methods,
                    headers,
                },
                pool,
            },
            span,
        ));
    }
    out
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
