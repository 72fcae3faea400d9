//! What a `[[route]]` does besides matching: `redirect`, `respond`, `rewrite`, header edits and
//! `rate_limit`.

use super::*;

/// Header fields a route may not set: hop-by-hop fields (RFC 9110 §7.6.1), the framing safelb
/// owns, and `host`, which `rewrite.host` changes.
const NOT_SETTABLE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "host",
];

const REDIRECT_STATUSES: [u16; 5] = [301, 302, 303, 307, 308];

/// A field name as RFC 9110 §5.1 allows: one or more token characters.
pub(super) fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A field value safelb will write: visible ASCII, spaces and tabs, no line breaks.
pub(super) fn valid_header_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// A header name from config, lower-cased, or an error at `span`.
fn header_name(d: &mut Diagnostics, s: &Section<'_, '_>, name: &str, span: Range<usize>) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if valid_header_name(&lower) {
        return Some(lower);
    }
    d.error(
        Rule::InvalidHeader,
        span,
        format!("{}: `{name}` is not a valid header name", s.what),
    )
    .hint("header names are letters, digits and !#$%&'*+-.^_`|~");
    None
}

/// `{ "Name" = "value", ... }` with names and values checked; names come back lower-case.
fn header_table(d: &mut Diagnostics, s: &Section<'_, '_>, setting: bool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, value) in s.table.iter() {
        let Some(v) = as_str(d, value, &format!("header `{}` in {}", name.get_ref(), s.what)) else {
            continue;
        };
        let Some(lower) = header_name(d, s, name.get_ref(), name.span()) else {
            continue;
        };
        if setting && NOT_SETTABLE.contains(&lower.as_str()) {
            d.error(
                Rule::InvalidHeader,
                name.span(),
                format!("{}: `{}` cannot be set by a route", s.what, name.get_ref()),
            )
            .hint(if lower == "host" {
                "change the Host a backend sees with `rewrite = { host = \"...\" }`"
            } else {
                "it is a hop-by-hop or framing header, which safelb manages per connection"
            });
            continue;
        }
        if !valid_header_value(v.get_ref()) {
            d.error(
                Rule::InvalidHeader,
                v.span(),
                format!(
                    "{}: the value of `{}` has a line break or a control character",
                    s.what,
                    name.get_ref()
                ),
            );
            continue;
        }
        out.push((lower, v.get_ref().to_string()));
    }
    out
}

/// `request_headers` / `response_headers = { set = { ... }, remove = [ ... ] }`.
pub(super) fn header_edits(d: &mut Diagnostics, r: &Section<'_, '_>, key: &str) -> HeaderEdits {
    let Some(s) = r.section(d, key) else {
        return HeaderEdits::default();
    };
    s.deny_unknown(d, &["set", "remove"]);
    let set = s
        .section(d, "set")
        .map(|t| header_table(d, &t, true))
        .unwrap_or_default();
    let mut remove = Vec::new();
    if let Some(list) = s.get("remove") {
        for v in as_array(d, list, &format!("`remove` of {}", s.what)).unwrap_or_default() {
            let Some(name) = as_str(d, v, &format!("a name in `remove` of {}", s.what)) else {
                continue;
            };
            if let Some(lower) = header_name(d, &s, name.get_ref(), name.span()) {
                remove.push(lower);
            }
        }
    }
    HeaderEdits { set, remove }
}

/// The string at `key` if `valid` accepts it; otherwise an error saying it is not `a_what`.
fn checked(
    d: &mut Diagnostics,
    s: &Section<'_, '_>,
    key: &str,
    valid: fn(&str) -> bool,
    a_what: &str,
    hint: &str,
) -> Option<String> {
    let v = s.str(d, key)?;
    if !valid(v.get_ref()) {
        d.error(
            Rule::InvalidValue,
            v.span(),
            format!("{}: `{key}` = \"{}\" is not {a_what}", s.what, v.get_ref()),
        )
        .hint(hint.to_string());
        return None;
    }
    Some(v.get_ref().to_string())
}

/// An absolute path: starts with `/`, no query, fragment, spaces or control characters.
fn path_value(d: &mut Diagnostics, s: &Section<'_, '_>, key: &str) -> Option<String> {
    let valid = |p: &str| p.starts_with('/') && !p.contains(['?', '#']) && p.bytes().all(|b| b.is_ascii_graphic());
    checked(
        d,
        s,
        key,
        valid,
        "a path",
        "write an absolute path without query or spaces, e.g. \"/v2\"",
    )
}

fn host_value(d: &mut Diagnostics, s: &Section<'_, '_>, key: &str) -> Option<String> {
    let valid = |h: &str| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
    checked(
        d,
        s,
        key,
        valid,
        "a host name",
        "write the name alone, e.g. \"shop.example\"",
    )
    .map(|h| h.to_ascii_lowercase())
}

pub(super) fn redirect(d: &mut Diagnostics, s: &Section<'_, '_>) -> Option<Redirect> {
    s.deny_unknown(d, &["scheme", "host", "port", "path", "prefix", "status"]);
    let scheme = match s.str(d, "scheme") {
        None => None,
        Some(v) if ["http", "https"].contains(&v.get_ref().to_ascii_lowercase().as_str()) => {
            Some(v.get_ref().to_ascii_lowercase())
        }
        Some(v) => {
            d.error(
                Rule::InvalidValue,
                v.span(),
                format!(
                    "{}: `scheme` = \"{}\" must be \"http\" or \"https\"",
                    s.what,
                    v.get_ref()
                ),
            );
            return None;
        }
    };
    let host = host_value(d, s, "host");
    let port = s.uint(d, "port", u16::MAX as u64).map(|p| p as u16);
    let path = path_value(d, s, "path");
    let prefix = path_value(d, s, "prefix");
    let failed = |key: &str, parsed: bool| s.get(key).is_some() && !parsed;
    if failed("host", host.is_some())
        || failed("port", port.is_some())
        || failed("path", path.is_some())
        || failed("prefix", prefix.is_some())
    {
        return None;
    }
    if path.is_some() && prefix.is_some() {
        d.error(
            Rule::InvalidValue,
            s.key_span("prefix"),
            format!("{}: `path` and `prefix` cannot both be given", s.what),
        )
        .hint("`path` replaces the whole path; `prefix` replaces the matched `path_prefix` only");
        return None;
    }
    let status = match s.uint(d, "status", 999) {
        None if s.get("status").is_some() => return None,
        None => 302,
        Some(n) if REDIRECT_STATUSES.contains(&(n as u16)) => n as u16,
        Some(n) => {
            d.error(
                Rule::InvalidValue,
                s.get("status").map_or(s.span.clone(), |v| v.span()),
                format!("{}: status {n} is not a redirect", s.what),
            )
            .hint("use 301, 302, 303, 307 or 308 (302 unless the move is permanent)");
            return None;
        }
    };
    if scheme.is_none() && host.is_none() && port.is_none() && path.is_none() && prefix.is_none() {
        d.error(
            Rule::InvalidValue,
            s.span.clone(),
            format!("{} sends the client back to the same URL, a redirect loop", s.what),
        )
        .hint("give at least one of `scheme`, `host`, `port`, `path`, `prefix`");
        return None;
    }
    Some(Redirect {
        scheme,
        host,
        port,
        path,
        prefix,
        status,
    })
}

pub(super) fn respond(d: &mut Diagnostics, s: &Section<'_, '_>) -> Option<Respond> {
    s.deny_unknown(d, &["status", "body", "headers"]);
    let status = match s.uint(d, "status", 999) {
        Some(n) if (200..=599).contains(&n) => n as u16,
        Some(n) => {
            d.error(
                Rule::InvalidValue,
                s.get("status").map_or(s.span.clone(), |v| v.span()),
                format!("{}: status {n} is not a final HTTP status (200 to 599)", s.what),
            );
            return None;
        }
        None if s.get("status").is_some() => return None,
        None => 200,
    };
    let body = s.str(d, "body").map(|b| b.get_ref().to_string()).unwrap_or_default();
    let headers = s
        .section(d, "headers")
        .map(|h| header_table(d, &h, true))
        .unwrap_or_default();
    Some(Respond { status, body, headers })
}

pub(super) fn rewrite(d: &mut Diagnostics, s: &Section<'_, '_>) -> Option<Rewrite> {
    s.deny_unknown(d, &["prefix", "host"]);
    let prefix = path_value(d, s, "prefix");
    let host = host_value(d, s, "host");
    if s.get("prefix").is_some() && prefix.is_none() || s.get("host").is_some() && host.is_none() {
        return None;
    }
    if prefix.is_none() && host.is_none() {
        d.error(Rule::MissingKey, s.span.clone(), format!("{} changes nothing", s.what))
            .hint("give `prefix`, `host` or both, or remove it");
        return None;
    }
    Some(Rewrite { prefix, host })
}

/// `rate = "50/s"` (also `/m`, `/h`): requests per second.
fn rate(d: &mut Diagnostics, s: &Section<'_, '_>) -> Option<f64> {
    let text = s.require(d, "rate", "\"50/s\"").and_then(|_| s.str(d, "rate"))?;
    let parsed = text.get_ref().split_once('/').and_then(|(n, unit)| {
        let n: f64 = n.trim().parse().ok().filter(|n: &f64| *n > 0.0 && n.is_finite())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return None,
        };
        Some(n / per)
    });
    if parsed.is_none() {
        d.error(
            Rule::InvalidValue,
            text.span(),
            format!("{}: `rate` = \"{}\" is not a rate", s.what, text.get_ref()),
        )
        .hint("write requests per unit, e.g. \"50/s\", \"600/m\" or \"1000/h\"");
    }
    parsed
}

pub(super) fn rate_limit(d: &mut Diagnostics, s: &Section<'_, '_>) -> Option<RateLimit> {
    s.deny_unknown(d, &["rate", "burst", "key"]);
    let per_second = rate(d, s)?;
    let burst = match s.uint(d, "burst", 1_000_000) {
        Some(0) => {
            d.error(
                Rule::InvalidValue,
                s.get("burst").map_or(s.span.clone(), |v| v.span()),
                format!("{}: `burst` = 0 refuses every request", s.what),
            )
            .hint("use at least 1; to refuse everything, use `respond = { status = 403 }`");
            return None;
        }
        Some(b) => b as u32,
        None if s.get("burst").is_some() => return None,
        // One second's worth, so a client at the rate is never refused for arriving in a clump.
        None => per_second.ceil().max(1.0) as u32,
    };
    let key = match s.str(d, "key") {
        None => RateKey::Client,
        Some(k) => match *k.get_ref() {
            "client" => RateKey::Client,
            "route" => RateKey::Route,
            other => match other.strip_prefix("header:") {
                Some(name) if valid_header_name(&name.to_ascii_lowercase()) => {
                    RateKey::Header(name.to_ascii_lowercase())
                }
                _ => {
                    d.error(
                        Rule::InvalidValue,
                        k.span(),
                        format!("{}: `key` = \"{other}\" is not a rate-limit key", s.what),
                    )
                    .hint("use \"client\", \"route\" or \"header:NAME\"");
                    return None;
                }
            },
        },
    };
    Some(RateLimit { per_second, burst, key })
}
