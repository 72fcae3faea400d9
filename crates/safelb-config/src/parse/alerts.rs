//! `[[alert]]` rules and `[[notify]]` targets.

use super::*;

pub(super) fn alerts(
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

pub(super) fn notify(d: &mut Diagnostics, top: &Section<'_, '_>) -> Vec<Notify> {
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
