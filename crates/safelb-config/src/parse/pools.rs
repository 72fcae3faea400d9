//! `[pool.NAME]`: backends, balancing, timeouts, retry, panic, `health`, `outlier`, `hedge`.

use super::*;

pub(super) const POOL_KEYS: &[&str] = &[
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
    "slow_start",
    "max_in_flight",
];

pub(super) fn pools(d: &mut Diagnostics, section: &Section<'_, '_>) -> Vec<(Pool, Range<usize>)> {
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

pub(super) fn pool(d: &mut Diagnostics, s: &Section<'_, '_>, name: String, name_span: Range<usize>) -> Option<Pool> {
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
    let slow_start = s.duration(d, "slow_start").filter(|d| !d.is_zero());
    let max_in_flight = s.uint(d, "max_in_flight", 1_000_000).map(|n| n.max(1) as u32);
    Some(Pool {
        hedge,
        slow_start,
        max_in_flight,
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

pub(super) fn backends(d: &mut Diagnostics, s: &Section<'_, '_>, pool: &str, name_span: Range<usize>) -> Vec<Backend> {
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

pub(super) fn health(d: &mut Diagnostics, h: &Section<'_, '_>, pool: &str) -> Option<HealthCheck> {
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
pub(super) fn hedge(d: &mut Diagnostics, s: &Section<'_, '_>, pool: &str) -> Option<Hedge> {
    let def = Hedge::default();
    let h = match s.switch(d, "hedge") {
        Switch::Default => return Some(def),
        Switch::Off => return None,
        Switch::Table(h) => h,
    };
    h.deny_unknown(d, &["after", "budget"]);
    let after = hedge_after(d, &h, "after", &format!("pool `{pool}`: hedge `after`")).unwrap_or(def.after);
    let budget_permille = h
        .float(d, "budget", 0.0, 1.0)
        .map_or(def.budget_permille, |b| (b * 1000.0).round() as u32);
    Some(Hedge { after, budget_permille })
}

pub(super) fn outlier(d: &mut Diagnostics, o: &Section<'_, '_>) -> Outlier {
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
