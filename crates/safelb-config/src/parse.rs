//! From TOML text to a [`ValidConfig`]: syntax, then every section, then cross-checks.
//!
//! The keys accepted here are the schema; `docs/config.md` documents each one.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::decode::{as_array, as_section, as_str, as_uint, parse_addr, Section, Value};
use crate::diagnostic::{did_you_mean, Diagnostics, Rule};
use crate::model::*;
use crate::routing::RouteTable;
use crate::validate;

const TOP_KEYS: &[&str] = &[
    "listener",
    "admin",
    "limits",
    "access_log",
    "route",
    "pool",
    "test",
    "rollout",
    "change_freeze",
    "alert",
    "notify",
];
const ROUTE_KEYS: &[&str] = &["name", "host", "path_prefix", "method", "headers", "pool"];
const POOL_KEYS: &[&str] = &[
    "protocol",
    "balance",
    "backends",
    "hash_on",
    "min_healthy",
    "connect_timeout",
    "response_timeout",
    "retry",
    "panic_threshold",
    "panic_policy",
    "health",
    "outlier",
    "hedge",
];
const TEST_KEYS: &[&str] = &["request", "headers", "expect_pool", "expect_route", "expect_status"];

/// The result of checking a source: the config when there is no error, and all findings
/// (warnings are reported even for a valid config).
#[derive(Debug)]
pub struct Checked {
    pub config: Option<ValidConfig>,
    pub diagnostics: Diagnostics,
}

impl Checked {
    pub fn into_result(self) -> Result<ValidConfig, Diagnostics> {
        self.config.ok_or(self.diagnostics)
    }
}

/// Checks `source` (named `file` in messages) and builds the validated config.
pub fn check(file: &str, source: &str) -> Checked {
    let mut d = Diagnostics::new(file, source);
    let (root, errors) = DeTable::parse_recoverable(source);
    if !errors.is_empty() {
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            d.error(Rule::Syntax, span, format!("TOML syntax: {}", e.message().trim()));
        }
        return Checked {
            config: None,
            diagnostics: d,
        };
    }
    let top = Section::new(root.get_ref(), root.span(), "the top level");
    top.deny_unknown(&mut d, TOP_KEYS);

    let listeners = listeners(&mut d, &top);
    let admin = top.section(&mut d, "admin").and_then(|s| admin(&mut d, &s));
    let limits = top
        .section(&mut d, "limits")
        .map(|s| limits(&mut d, &s))
        .unwrap_or_default();
    let access_log = top
        .section(&mut d, "access_log")
        .map(|s| access_log(&mut d, &s))
        .unwrap_or_default();
    let pools = top
        .section(&mut d, "pool")
        .map(|s| pools(&mut d, &s))
        .unwrap_or_default();
    let routes = routes(&mut d, &top, &pools);
    let tests = tests(&mut d, &top);
    let rollout = top
        .section(&mut d, "rollout")
        .map(|s| rollout(&mut d, &s))
        .unwrap_or_default();
    let change_freezes = change_freezes(&mut d, &top);
    let alerts = alerts(&mut d, &top, &routes, &pools);
    let notify = notify(&mut d, &top);

    let route_list: Vec<Route> = routes.iter().map(|(r, _)| r.clone()).collect();
    let route_table = RouteTable::build(&route_list);
    validate::cross_check(&mut d, &routes, &pools, &route_table, &tests, admin.as_ref());
    let pool_list: Vec<Pool> = pools.into_iter().map(|(p, _)| p).collect();

    if d.has_errors() {
        return Checked {
            config: None,
            diagnostics: d,
        };
    }
    let config = Config {
        source: source.to_owned(),
        listeners: listeners.into_iter().map(|l| (l.name.clone(), l)).collect(),
        admin: admin.map(|(a, _)| a),
        limits,
        access_log,
        routes: route_list,
        pools: pool_list,
        tests: tests.into_iter().map(|(t, _)| t).collect(),
        rollout,
        change_freezes,
        alerts,
        notify,
        route_table,
    };
    Checked {
        config: Some(ValidConfig::new(config)),
        diagnostics: d,
    }
}

fn listeners(d: &mut Diagnostics, top: &Section<'_, '_>) -> Vec<Listener> {
    let Some(section) = top.section(d, "listener") else {
        d.error(Rule::MissingKey, 0..0, "no listener: safelb would accept no traffic")
            .hint("add `[listener.public]` with `bind = \"127.0.0.1:8080\"`");
        return Vec::new();
    };
    let mut out: Vec<Listener> = Vec::new();
    let mut seen: HashMap<std::net::SocketAddr, String> = HashMap::new();
    for (name, value) in section.table.iter() {
        let name = name.get_ref().to_string();
        let Some(l) = as_section(d, value, format!("listener `{name}`")) else {
            continue;
        };
        l.deny_unknown(d, &["bind", "tls"]);
        let Some(_) = l.require(d, "bind", "\"127.0.0.1:8080\"") else {
            continue;
        };
        let Some(bind) = l.addr(d, "bind") else {
            continue;
        };
        if let Some(other) = seen.insert(*bind.get_ref(), name.clone()) {
            d.error(
                Rule::DuplicateName,
                bind.span(),
                format!(
                    "listeners `{other}` and `{name}` bind the same address {}",
                    bind.get_ref()
                ),
            );
        }
        let tls = l.get("tls").and_then(|v| tls_certs(d, v, &name));
        out.push(Listener {
            name,
            bind: bind.into_inner(),
            tls,
        });
    }
    out
}

fn admin(d: &mut Diagnostics, s: &Section<'_, '_>) -> Option<(Admin, Range<usize>)> {
    s.deny_unknown(d, &["bind", "token_file"]);
    s.require(d, "bind", "\"127.0.0.1:9090\"")?;
    let bind = s.addr(d, "bind")?;
    let token_file = s.str(d, "token_file").map(|t| PathBuf::from(*t.get_ref()));
    Some((
        Admin {
            bind: *bind.get_ref(),
            token_file,
        },
        bind.span(),
    ))
}

fn limits(d: &mut Diagnostics, s: &Section<'_, '_>) -> Limits {
    s.deny_unknown(
        d,
        &[
            "header_timeout",
            "keepalive_timeout",
            "max_header_bytes",
            "max_body_bytes",
            "drain_timeout",
            "replay_body_bytes",
        ],
    );
    let def = Limits::default();
    let max_header_bytes = s.uint(d, "max_header_bytes", 1 << 20).map(|n| n as usize);
    if let Some(n) = max_header_bytes.filter(|n| *n < 8192) {
        d.error(
            Rule::InvalidValue,
            s.get("max_header_bytes").map_or(s.span.clone(), |v| v.span()),
            format!("`max_header_bytes` = {n} is below the 8192 bytes that common clients need"),
        );
    }
    Limits {
        header_timeout: s.duration(d, "header_timeout").unwrap_or(def.header_timeout),
        keepalive_timeout: s.duration(d, "keepalive_timeout").unwrap_or(def.keepalive_timeout),
        max_header_bytes: max_header_bytes.unwrap_or(def.max_header_bytes).max(8192),
        max_body_bytes: s.uint(d, "max_body_bytes", u64::MAX >> 1).unwrap_or(def.max_body_bytes),
        drain_timeout: s.duration(d, "drain_timeout").unwrap_or(def.drain_timeout),
        replay_body_bytes: s
            .uint(d, "replay_body_bytes", 16 << 20)
            .unwrap_or(def.replay_body_bytes),
    }
}

fn access_log(d: &mut Diagnostics, s: &Section<'_, '_>) -> AccessLog {
    s.deny_unknown(d, &["enabled", "path"]);
    AccessLog {
        enabled: s.bool(d, "enabled").unwrap_or(true),
        path: s
            .str(d, "path")
            .filter(|p| *p.get_ref() != "-")
            .map(|p| PathBuf::from(*p.get_ref())),
    }
}

fn pools(d: &mut Diagnostics, section: &Section<'_, '_>) -> Vec<(Pool, Range<usize>)> {
    let mut out = Vec::new();
    for (name, value) in section.table.iter() {
        let pool_name = name.get_ref().to_string();
        let Some(s) = as_section(d, value, format!("pool `{pool_name}`")) else {
            continue;
        };
        s.deny_unknown(d, POOL_KEYS);
        let mut span = name.span();
        span.end = span.end.max(span.start);
        if let Some(pool) = pool(d, &s, pool_name, name.span()) {
            out.push((pool, span));
        }
    }
    out
}

fn pool(d: &mut Diagnostics, s: &Section<'_, '_>, name: String, name_span: Range<usize>) -> Option<Pool> {
    let balance = match s.str(d, "balance") {
        None => Balance::RoundRobin,
        Some(b) => match Balance::from_name(b.get_ref()) {
            Some(b) => b,
            None => {
                let diag = d.error(
                    Rule::InvalidValue,
                    b.span(),
                    format!("pool `{name}`: unknown balance policy `{}`", b.get_ref()),
                );
                match did_you_mean(b.get_ref(), Balance::NAMES) {
                    Some(s) => diag.hint(format!("did you mean `{s}`?")),
                    None => diag.hint(format!("one of: {}", Balance::NAMES.join(", "))),
                };
                Balance::RoundRobin
            }
        },
    };
    let hash_key = match s.str(d, "hash_on") {
        None => HashKey::ClientAddress,
        Some(h) => {
            if balance != Balance::ConsistentHash {
                d.warning(
                    Rule::InvalidValue,
                    h.span(),
                    format!("pool `{name}`: `hash_on` only matters with balance = \"consistent_hash\""),
                );
            }
            let text = *h.get_ref();
            if text == "client_address" {
                HashKey::ClientAddress
            } else if let Some(header) = text.strip_prefix("header:").filter(|v| !v.is_empty()) {
                HashKey::Header(header.to_ascii_lowercase())
            } else if let Some(cookie) = text.strip_prefix("cookie:").filter(|v| !v.is_empty()) {
                HashKey::Cookie(cookie.to_string())
            } else {
                d.error(
                    Rule::InvalidValue,
                    h.span(),
                    format!("pool `{name}`: `hash_on` = \"{text}\" is not a hash key"),
                )
                .hint("use \"client_address\", \"header:NAME\" or \"cookie:NAME\"");
                HashKey::ClientAddress
            }
        }
    };
    let backends = backends(d, s, &name, name_span.clone());
    let min_healthy = s.uint(d, "min_healthy", 10_000).unwrap_or(1) as usize;
    if !backends.is_empty() && min_healthy > backends.len() {
        d.error(
            Rule::InvalidValue,
            s.get("min_healthy").map_or(name_span.clone(), |v| v.span()),
            format!(
                "pool `{name}`: min_healthy = {min_healthy} but the pool has {} backend(s)",
                backends.len()
            ),
        );
    }
    let retry_def = Retry::default();
    let retry = match s.section(d, "retry") {
        None => retry_def,
        Some(r) => {
            r.deny_unknown(d, &["attempts", "budget_percent", "min_per_second"]);
            Retry {
                attempts: r.uint(d, "attempts", 5).map_or(retry_def.attempts, |n| n as u32),
                budget_percent: r
                    .uint(d, "budget_percent", 100)
                    .map_or(retry_def.budget_percent, |n| n as u32),
                min_per_second: r
                    .uint(d, "min_per_second", 1_000_000)
                    .map_or(retry_def.min_per_second, |n| n as u32),
            }
        }
    };
    let panic_policy = match s.str(d, "panic_policy") {
        None => PanicPolicy::FailClosed,
        Some(p) => match *p.get_ref() {
            "fail_open" => PanicPolicy::FailOpen,
            "fail_closed" => PanicPolicy::FailClosed,
            other => {
                d.error(
                    Rule::InvalidValue,
                    p.span(),
                    format!("pool `{name}`: unknown panic_policy `{other}`"),
                )
                .hint("one of: fail_open, fail_closed");
                PanicPolicy::FailClosed
            }
        },
    };
    let protocol = match s.str(d, "protocol") {
        None => Protocol::Http1,
        Some(p) => match *p.get_ref() {
            "http1" => Protocol::Http1,
            "h2" => Protocol::H2,
            other => {
                d.error(
                    Rule::InvalidValue,
                    p.span(),
                    format!("pool `{name}`: unknown protocol `{other}`"),
                )
                .hint("one of: http1, h2");
                Protocol::Http1
            }
        },
    };
    let health = s.section(d, "health").and_then(|h| health(d, &h, &name));
    let outlier = s.section(d, "outlier").map(|o| outlier(d, &o)).unwrap_or_default();
    let hedge = hedge(d, s, &name);
    Some(Pool {
        hedge,
        protocol,
        balance,
        hash_key,
        backends,
        min_healthy,
        connect_timeout: s
            .duration(d, "connect_timeout")
            .unwrap_or(std::time::Duration::from_secs(1)),
        response_timeout: s
            .duration(d, "response_timeout")
            .unwrap_or(std::time::Duration::from_secs(15)),
        retry,
        panic_threshold: s.uint(d, "panic_threshold", 100).unwrap_or(0) as u8,
        panic_policy,
        health,
        outlier,
        name,
    })
}

fn backends(d: &mut Diagnostics, s: &Section<'_, '_>, pool: &str, name_span: Range<usize>) -> Vec<Backend> {
    let Some(list) = s.get("backends") else {
        d.error(Rule::EmptyPool, name_span, format!("pool `{pool}` has no `backends`"))
            .hint("add `backends = [\"127.0.0.1:9001\"]`");
        return Vec::new();
    };
    let Some(items) = as_array(d, list, &format!("`backends` of pool `{pool}`")) else {
        return Vec::new();
    };
    if items.is_empty() {
        d.error(
            Rule::EmptyPool,
            list.span(),
            format!("pool `{pool}` has an empty backend list"),
        )
        .hint("a pool needs at least one backend to serve requests");
        return Vec::new();
    }
    let mut out: Vec<Backend> = Vec::new();
    for item in items {
        let what = format!("a backend of pool `{pool}`");
        let parsed = match item.get_ref() {
            DeValue::String(_) => as_str(d, item, &what)
                .and_then(|a| parse_addr(d, &a, &what))
                .map(|a| (a, 1)),
            DeValue::Table(_) => {
                let b = as_section(d, item, what.clone()).expect("the value is a table");
                b.deny_unknown(d, &["addr", "weight"]);
                b.require(d, "addr", "\"127.0.0.1:9001\"");
                let addr = b.addr(d, "addr");
                let weight = b.uint(d, "weight", 1000).unwrap_or(1) as u32;
                addr.map(|a| (a, weight))
            }
            other => {
                d.error(
                    Rule::WrongType,
                    item.span(),
                    format!(
                        "{what} must be \"IP:port\" or {{ addr = \"IP:port\", weight = N }}, not {}",
                        other.type_str()
                    ),
                );
                None
            }
        };
        let Some((addr, weight)) = parsed else {
            continue;
        };
        if out.iter().any(|b| b.addr == *addr.get_ref()) {
            d.error(
                Rule::DuplicateBackend,
                addr.span(),
                format!("pool `{pool}` lists backend {} twice", addr.get_ref()),
            )
            .hint("use `weight` to give a backend a larger share");
            continue;
        }
        out.push(Backend {
            addr: *addr.get_ref(),
            weight,
        });
    }
    if !out.is_empty() && out.iter().all(|b| b.weight == 0) {
        d.error(
            Rule::ZeroWeights,
            list.span(),
            format!("every backend of pool `{pool}` has weight 0: the pool could serve nothing"),
        );
    }
    out
}

fn health(d: &mut Diagnostics, h: &Section<'_, '_>, pool: &str) -> Option<HealthCheck> {
    h.deny_unknown(d, &["kind", "path", "interval", "timeout", "healthy", "unhealthy"]);
    let kind = match h.str(d, "kind").map(|k| (k.span(), *k.get_ref())) {
        None | Some((_, "http")) => {
            let path = h
                .str(d, "path")
                .map_or("/healthz".to_string(), |p| p.get_ref().to_string());
            if !path.starts_with('/') {
                d.error(
                    Rule::InvalidValue,
                    h.get("path").map_or(h.span.clone(), |v| v.span()),
                    format!("pool `{pool}`: health `path` must start with `/`"),
                );
            }
            HealthCheckKind::Http { path }
        }
        Some((_, "tcp")) => HealthCheckKind::Tcp,
        Some((span, other)) => {
            d.error(
                Rule::InvalidValue,
                span,
                format!("pool `{pool}`: unknown health check kind `{other}`"),
            )
            .hint("one of: http, tcp");
            return None;
        }
    };
    let interval = h.duration(d, "interval").unwrap_or(std::time::Duration::from_secs(2));
    let check = HealthCheck {
        kind,
        interval,
        // The default never contradicts an interval the user chose: 1s, or the interval if shorter.
        timeout: h
            .duration(d, "timeout")
            .unwrap_or(std::time::Duration::from_secs(1).min(interval)),
        healthy: h.uint(d, "healthy", 100).unwrap_or(2).max(1) as u32,
        unhealthy: h.uint(d, "unhealthy", 100).unwrap_or(3).max(1) as u32,
    };
    if check.interval.is_zero() {
        d.error(
            Rule::InvalidValue,
            h.key_span("interval"),
            format!("pool `{pool}`: health `interval` must be above zero"),
        );
    }
    if check.timeout.is_zero() || check.timeout > check.interval {
        d.error(
            Rule::InvalidValue,
            h.key_span("timeout"),
            format!("pool `{pool}`: health `timeout` must be above zero and at most `interval`"),
        );
    }
    Some(check)
}

/// `hedge = false`, or `hedge = { after = "auto" | DURATION, budget = 0.1 }`; on by default.
fn hedge(d: &mut Diagnostics, s: &Section<'_, '_>, pool: &str) -> Option<Hedge> {
    let def = Hedge::default();
    let Some(v) = s.get("hedge") else {
        return Some(def);
    };
    if let DeValue::Boolean(on) = v.get_ref() {
        return on.then_some(def);
    }
    let h = s.section(d, "hedge")?;
    h.deny_unknown(d, &["after", "budget"]);
    let after = hedge_after(d, &h, "after", &format!("pool `{pool}`: hedge `after`")).unwrap_or(def.after);
    let budget = h.float(d, "budget", 0.0, 1.0).unwrap_or(0.1);
    Some(Hedge {
        after,
        budget_permille: (budget * 1000.0).round() as u32,
    })
}

/// `"auto"` or a duration above zero.
fn hedge_after(d: &mut Diagnostics, s: &Section<'_, '_>, key: &str, what: &str) -> Option<HedgeAfter> {
    let v = s.get(key)?;
    if let DeValue::String(text) = v.get_ref() {
        if text.as_ref() == "auto" {
            return Some(HedgeAfter::Auto);
        }
    }
    let after = s.duration(d, key)?;
    if after.is_zero() {
        d.error(Rule::InvalidValue, v.span(), format!("{what} must be above zero"))
            .hint("\"auto\" derives it from the observed latency");
        return None;
    }
    Some(HedgeAfter::Fixed(after))
}

fn outlier(d: &mut Diagnostics, o: &Section<'_, '_>) -> Outlier {
    o.deny_unknown(
        d,
        &[
            "consecutive_failures",
            "base_ejection",
            "max_ejection",
            "max_ejected_percent",
        ],
    );
    let def = Outlier::default();
    Outlier {
        consecutive_failures: o
            .uint(d, "consecutive_failures", 1000)
            .map_or(def.consecutive_failures, |n| n as u32),
        base_ejection: o.duration(d, "base_ejection").unwrap_or(def.base_ejection),
        max_ejection: o.duration(d, "max_ejection").unwrap_or(def.max_ejection),
        max_ejected_percent: o
            .uint(d, "max_ejected_percent", 100)
            .map_or(def.max_ejected_percent, |n| n as u8),
    }
}

/// Routes with the span of their `name` (or table) for later cross-checks.
pub(crate) type SpannedRoute = (Route, Range<usize>);

fn routes(d: &mut Diagnostics, top: &Section<'_, '_>, pools: &[(Pool, Range<usize>)]) -> Vec<SpannedRoute> {
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
                host,
                path_prefix,
                methods,
                headers,
                pool,
            },
            span,
        ));
    }
    out
}

fn host_match(d: &mut Diagnostics, h: &Spanned<&str>, what: &str) -> Option<HostMatch> {
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

fn methods(d: &mut Diagnostics, v: &Value<'_>, what: &str) -> Vec<String> {
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

fn header_pairs(d: &mut Diagnostics, h: &Section<'_, '_>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, value) in h.table.iter() {
        let Some(v) = as_str(d, value, &format!("header `{}` in {}", name.get_ref(), h.what)) else {
            continue;
        };
        out.push((name.get_ref().to_ascii_lowercase(), v.get_ref().to_string()));
    }
    out
}

pub(crate) type SpannedTest = (RouteTest, Range<usize>);

fn tests(d: &mut Diagnostics, top: &Section<'_, '_>) -> Vec<SpannedTest> {
    let Some(list) = top.get("test") else {
        return Vec::new();
    };
    let Some(items) = as_array(d, list, "`test`") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(t) = as_section(d, item, format!("test #{}", i + 1)) else {
            continue;
        };
        t.deny_unknown(d, TEST_KEYS);
        let Some(_) = t.require(d, "request", "\"GET http://shop.example/api/cart\"") else {
            continue;
        };
        let Some(request) = t.str(d, "request") else {
            continue;
        };
        let Some((method, host, path)) = parse_test_request(request.get_ref()) else {
            d.error(
                Rule::InvalidValue,
                request.span(),
                format!(
                    "test #{}: `request` = \"{}\" is not \"METHOD http://host/path\"",
                    i + 1,
                    request.get_ref()
                ),
            )
            .hint("e.g. \"GET http://shop.example/api/cart\"");
            continue;
        };
        let expect = match (
            t.str(d, "expect_pool"),
            t.str(d, "expect_route"),
            t.get("expect_status"),
        ) {
            (Some(p), None, None) => TestExpectation::Pool(p.get_ref().to_string()),
            (None, Some(r), None) => TestExpectation::Route(r.get_ref().to_string()),
            (None, None, Some(s)) => match as_uint(d, s, "`expect_status`", 999) {
                Some(404) => TestExpectation::Status(404),
                Some(other) => {
                    d.error(
                        Rule::InvalidValue,
                        s.span(),
                        format!("test #{}: expect_status = {other} cannot be checked offline", i + 1),
                    )
                    .hint("only 404 (no route matches) is decided by the routing table");
                    continue;
                }
                None => continue,
            },
            _ => {
                d.error(
                    Rule::InvalidValue,
                    item.span(),
                    format!(
                        "test #{} needs exactly one of `expect_pool`, `expect_route`, `expect_status`",
                        i + 1
                    ),
                );
                continue;
            }
        };
        let headers = t.section(d, "headers").map(|h| header_pairs(d, &h)).unwrap_or_default();
        out.push((
            RouteTest {
                method,
                host,
                path,
                headers,
                expect,
            },
            request.span(),
        ));
    }
    out
}

/// "GET http://shop.example/api/cart?x=1" -> ("GET", "shop.example", "/api/cart").
fn parse_test_request(text: &str) -> Option<(String, String, String)> {
    let (method, url) = text.trim().split_once(char::is_whitespace)?;
    let rest = url
        .trim()
        .strip_prefix("http://")
        .or_else(|| url.trim().strip_prefix("https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = path.split(['?', '#']).next().unwrap_or("/");
    if authority.is_empty() || method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    Some((method.to_ascii_uppercase(), authority.to_string(), path.to_string()))
}

fn rollout(d: &mut Diagnostics, s: &Section<'_, '_>) -> Rollout {
    s.deny_unknown(
        d,
        &[
            "canary_steps",
            "step_bake",
            "max_error_rate",
            "max_error_ratio",
            "max_p99",
            "min_requests",
            "max_traffic_shift",
            "sticky",
            "preflight",
            "hedge_after",
            "shadow",
        ],
    );
    let def = Rollout::default();
    let hedge_after = match s.get("hedge_after").map(|v| v.get_ref()) {
        None => def.hedge_after,
        Some(DeValue::Boolean(false)) => None,
        Some(_) => hedge_after(d, s, "hedge_after", "`hedge_after` of [rollout]").or(def.hedge_after),
    };
    let canary_steps = match s.get("canary_steps") {
        None => def.canary_steps.clone(),
        Some(v) => {
            let steps: Vec<u8> = as_array(d, v, "`canary_steps` in [rollout]")
                .unwrap_or(&[])
                .iter()
                .filter_map(|i| as_uint(d, i, "a canary step", 100).map(|n| n as u8))
                .collect();
            let ascending = steps.windows(2).all(|w| w[0] < w[1]);
            if steps.is_empty() || !ascending || steps.last() != Some(&100) || steps[0] == 0 {
                d.error(
                    Rule::InvalidValue,
                    v.span(),
                    "`canary_steps` must be ascending percentages above 0 ending at 100",
                )
                .hint("e.g. canary_steps = [5, 25, 100]");
                def.canary_steps.clone()
            } else {
                steps
            }
        }
    };
    let (probes, timeout) = match s.section(d, "preflight") {
        None => (def.preflight_probes, def.preflight_timeout),
        Some(p) => {
            p.deny_unknown(d, &["probes", "timeout"]);
            (
                p.uint(d, "probes", 20)
                    .map_or(def.preflight_probes, |n| n.max(1) as u32),
                p.duration(d, "timeout").unwrap_or(def.preflight_timeout),
            )
        }
    };
    Rollout {
        canary_steps,
        step_bake: s.duration(d, "step_bake").unwrap_or(def.step_bake),
        max_error_rate: s.float(d, "max_error_rate", 0.0, 1.0).unwrap_or(def.max_error_rate),
        max_error_ratio: s.float(d, "max_error_ratio", 1.0, 1e6).unwrap_or(def.max_error_ratio),
        max_p99: s.duration(d, "max_p99"),
        min_requests: s.uint(d, "min_requests", 1_000_000).unwrap_or(def.min_requests),
        max_traffic_shift: s
            .float(d, "max_traffic_shift", 0.0, 100.0)
            .unwrap_or(def.max_traffic_shift),
        sticky: s.bool(d, "sticky").unwrap_or(def.sticky),
        preflight_probes: probes,
        preflight_timeout: timeout,
        hedge_after,
        shadow: shadow(d, s),
    }
}

/// `shadow = false`, or `shadow = { duration, share, min_requests, concurrency }`; on by default.
fn shadow(d: &mut Diagnostics, s: &Section<'_, '_>) -> Option<ShadowPolicy> {
    let def = ShadowPolicy::default();
    let Some(v) = s.get("shadow") else {
        return Some(def);
    };
    if let DeValue::Boolean(on) = v.get_ref() {
        return on.then_some(def);
    }
    let sh = s.section(d, "shadow")?;
    sh.deny_unknown(d, &["duration", "share", "min_requests", "concurrency"]);
    let duration = sh.duration(d, "duration").unwrap_or(def.duration);
    if duration.is_zero() {
        d.error(
            Rule::InvalidValue,
            sh.key_span("duration"),
            "`shadow.duration` must be above zero",
        )
        .hint("`shadow = false` turns the stage off");
    }
    Some(ShadowPolicy {
        duration,
        share: sh.float(d, "share", 0.0, 1.0).unwrap_or(def.share),
        min_requests: sh.uint(d, "min_requests", 1_000_000).unwrap_or(def.min_requests),
        concurrency: sh
            .uint(d, "concurrency", 10_000)
            .map_or(def.concurrency, |n| n.max(1) as u32),
    })
}

fn change_freezes(d: &mut Diagnostics, top: &Section<'_, '_>) -> Vec<ChangeFreeze> {
    let Some(list) = top.get("change_freeze") else {
        return Vec::new();
    };
    let Some(items) = as_array(d, list, "`change_freeze`") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(f) = as_section(d, item, format!("change_freeze #{}", i + 1)) else {
            continue;
        };
        f.deny_unknown(d, &["start", "end", "reason"]);
        f.require(d, "start", "2026-12-24T00:00:00Z");
        f.require(d, "end", "2026-12-27T00:00:00Z");
        let (Some(start), Some(end)) = (f.datetime(d, "start"), f.datetime(d, "end")) else {
            continue;
        };
        if end <= start {
            d.error(
                Rule::InvalidValue,
                f.key_span("end"),
                format!("change_freeze #{}: `end` must be after `start`", i + 1),
            );
            continue;
        }
        let reason = f
            .str(d, "reason")
            .map_or_else(|| "change freeze".to_string(), |r| r.get_ref().to_string());
        out.push(ChangeFreeze { reason, start, end });
    }
    out
}

fn alerts(
    d: &mut Diagnostics,
    top: &Section<'_, '_>,
    routes: &[SpannedRoute],
    pools: &[(Pool, Range<usize>)],
) -> Vec<AlertRule> {
    let Some(list) = top.get("alert") else {
        return Vec::new();
    };
    let Some(items) = as_array(d, list, "`alert`") else {
        return Vec::new();
    };
    let mut out: Vec<AlertRule> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(a) = as_section(d, item, format!("alert #{}", i + 1)) else {
            continue;
        };
        a.deny_unknown(
            d,
            &[
                "name",
                "kind",
                "threshold",
                "slo",
                "window",
                "for",
                "hold",
                "route",
                "pool",
                "severity",
                "labels",
                "min_requests",
            ],
        );
        let (Some(_), Some(_)) = (
            a.require(d, "name", "\"HighErrorRate\""),
            a.require(d, "kind", "\"error_rate\""),
        ) else {
            continue;
        };
        let (Some(name), Some(kind)) = (a.str(d, "name"), a.str(d, "kind")) else {
            continue;
        };
        if out.iter().any(|r| r.name == *name.get_ref()) {
            d.error(
                Rule::DuplicateName,
                name.span(),
                format!("two alerts are named `{}`", name.get_ref()),
            );
        }
        let what = format!("alert `{}`", name.get_ref());
        let need_threshold = |d: &mut Diagnostics| {
            d.error(Rule::MissingKey, a.span.clone(), format!("{what} needs `threshold`"));
        };
        let kind = match *kind.get_ref() {
            "error_rate" => match a.float(d, "threshold", 0.0, 1.0) {
                Some(t) => AlertKind::ErrorRate { threshold: t },
                None => {
                    if a.get("threshold").is_none() {
                        need_threshold(d);
                    }
                    continue;
                }
            },
            "latency_p99" => match a.duration(d, "threshold") {
                Some(t) => AlertKind::LatencyP99 { threshold: t },
                None => {
                    if a.get("threshold").is_none() {
                        need_threshold(d);
                    }
                    continue;
                }
            },
            "no_healthy_backends" => AlertKind::NoHealthyBackends,
            "burn_rate" => match a.float(d, "slo", 0.5, 0.99999) {
                Some(slo) => AlertKind::BurnRate { slo },
                None => {
                    if a.get("slo").is_none() {
                        d.error(
                            Rule::MissingKey,
                            a.span.clone(),
                            format!("{what} needs `slo`, e.g. slo = 0.999"),
                        );
                    }
                    continue;
                }
            },
            "rollback" => AlertKind::Rollback {
                hold: a.duration(d, "hold").unwrap_or(Duration::from_secs(60)),
            },
            other => {
                let diag = d.error(
                    Rule::InvalidValue,
                    kind.span(),
                    format!("{what}: unknown kind `{other}`"),
                );
                match did_you_mean(other, AlertKind::NAMES) {
                    Some(s) => diag.hint(format!("did you mean `{s}`?")),
                    None => diag.hint(format!("one of: {}", AlertKind::NAMES.join(", "))),
                };
                continue;
            }
        };
        let route = a.str(d, "route").map(|r| {
            if !routes.iter().any(|(x, _)| x.name == *r.get_ref()) {
                d.error(
                    Rule::InvalidValue,
                    r.span(),
                    format!("{what} watches route `{}`, which is not defined", r.get_ref()),
                );
            }
            r.get_ref().to_string()
        });
        let pool = a.str(d, "pool").map(|p| {
            if !pools.iter().any(|(x, _)| x.name == *p.get_ref()) {
                d.error(
                    Rule::UndefinedPool,
                    p.span(),
                    format!("{what} watches pool `{}`, which is not defined", p.get_ref()),
                );
            }
            p.get_ref().to_string()
        });
        out.push(AlertRule {
            name: name.get_ref().to_string(),
            kind,
            route,
            pool,
            window: a.duration(d, "window").unwrap_or(Duration::from_secs(60)),
            for_: a.duration(d, "for").unwrap_or(Duration::ZERO),
            severity: a
                .str(d, "severity")
                .map_or_else(|| "warning".to_string(), |s| s.get_ref().to_string()),
            labels: a.section(d, "labels").map(|l| header_pairs(d, &l)).unwrap_or_default(),
            min_requests: a.uint(d, "min_requests", 1_000_000).unwrap_or(10),
        });
    }
    out
}

fn notify(d: &mut Diagnostics, top: &Section<'_, '_>) -> Vec<Notify> {
    let Some(list) = top.get("notify") else {
        return Vec::new();
    };
    let Some(items) = as_array(d, list, "`notify`") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(n) = as_section(d, item, format!("notify #{}", i + 1)) else {
            continue;
        };
        n.deny_unknown(d, &["kind", "url", "timeout"]);
        let (Some(_), Some(_)) = (
            n.require(d, "kind", "\"alertmanager\""),
            n.require(d, "url", "\"http://127.0.0.1:9093\""),
        ) else {
            continue;
        };
        let (Some(kind), Some(url)) = (n.str(d, "kind"), n.str(d, "url")) else {
            continue;
        };
        let kind = match *kind.get_ref() {
            "alertmanager" => NotifyKind::Alertmanager,
            "webhook" => NotifyKind::Webhook,
            other => {
                d.error(
                    Rule::InvalidValue,
                    kind.span(),
                    format!("notify #{}: unknown kind `{other}`", i + 1),
                )
                .hint("one of: alertmanager, webhook");
                continue;
            }
        };
        let Some(rest) = url.get_ref().strip_prefix("http://") else {
            d.error(
                Rule::InvalidValue,
                url.span(),
                format!("notify #{}: `url` must start with http://", i + 1),
            );
            continue;
        };
        let authority = rest.split('/').next().unwrap_or("");
        if authority.parse::<std::net::SocketAddr>().is_err() {
            d.error(
                Rule::InvalidAddress,
                url.span(),
                format!("notify #{}: `{authority}` is not an IP:port address", i + 1),
            )
            .hint("host names are not resolved: e.g. \"http://127.0.0.1:9093\"");
            continue;
        }
        out.push(Notify {
            kind,
            url: url.get_ref().trim_end_matches('/').to_string(),
            timeout: n.duration(d, "timeout").unwrap_or(Duration::from_secs(2)),
        });
    }
    out
}

/// `tls = { cert, key, names }` or an array of such tables.
fn tls_certs(d: &mut Diagnostics, v: &Value<'_>, listener: &str) -> Option<Vec<TlsCert>> {
    let what = format!("`tls` of listener `{listener}`");
    let items: Vec<&Value<'_>> = match v.get_ref() {
        DeValue::Array(a) => a.iter().collect(),
        _ => vec![v],
    };
    if items.is_empty() {
        d.error(Rule::InvalidValue, v.span(), format!("{what} lists no certificate"))
            .hint("tls = { cert = \"site.pem\", key = \"site.key\" }");
        return None;
    }
    let mut out = Vec::new();
    for item in items {
        let t = as_section(d, item, what.clone())?;
        t.deny_unknown(d, &["cert", "key", "names"]);
        let (Some(_), Some(_)) = (
            t.require(d, "cert", "\"site.pem\""),
            t.require(d, "key", "\"site.key\""),
        ) else {
            continue;
        };
        let (Some(cert), Some(key)) = (t.str(d, "cert"), t.str(d, "key")) else {
            continue;
        };
        let names = match t.get("names") {
            None => Vec::new(),
            Some(n) => as_array(d, n, &format!("`names` in {what}"))
                .unwrap_or(&[])
                .iter()
                .filter_map(|x| as_str(d, x, "a TLS name").map(|s| s.get_ref().to_ascii_lowercase()))
                .collect(),
        };
        out.push(TlsCert {
            cert: PathBuf::from(*cert.get_ref()),
            key: PathBuf::from(*key.get_ref()),
            names,
        });
    }
    Some(out)
}
