//! Traffic impact preview: recent requests replayed through the running and the candidate
//! route tables, to show which share of traffic a change moves and where.

use std::collections::BTreeMap;

use safelb_config::routing::RequestView;
use safelb_config::{Action, Config, RateKey, Route};
use safelb_proxy::samples::Sample;
use serde::{Deserialize, Serialize};

pub const NO_ROUTE: &str = "404 (no route)";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Impact {
    /// Requests replayed.
    pub samples: usize,
    /// Requests whose pool would change (404 included).
    pub moved: usize,
    /// Requests that would get 404 under the candidate but not now.
    pub newly_404: usize,
    /// `moved` as a percentage of `samples`.
    pub shift_percent: f64,
    /// Requests the candidate would redirect, where the running version did not.
    pub redirected: usize,
    /// Requests the candidate would answer itself (`respond`), where the running version did not.
    pub answered: usize,
    /// Requests whose backend would see another path than now (a `rewrite` added or changed).
    pub rewritten: usize,
    /// Requests a rate limit of the candidate would have refused, at the sampled rate, for
    /// routes limited by `key = "route"`; other keys depend on the clients, named in
    /// `rate_limited_unknown`.
    pub rate_limited: usize,
    pub rate_limited_unknown: Vec<String>,
    pub moves: Vec<Move>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Move {
    pub from: String,
    pub to: String,
    pub requests: usize,
    pub percent: f64,
}

/// The route a sample takes. Samples keep listener, method, host and path only: header
/// conditions see no headers.
fn route_of<'c>(config: &'c Config, s: &Sample) -> Option<&'c Route> {
    let view = RequestView {
        listener: &s.listener,
        method: &s.method,
        host: &s.host,
        path: &s.path,
        header: |_: &str| None,
    };
    config.route_table.find(&view).map(|i| &config.routes[i])
}

/// Where a sample goes: its pool, or what its route answers.
fn pool_of(config: &Config, s: &Sample) -> String {
    match route_of(config, s) {
        Some(route) => match &route.action {
            Action::Pool(p) => config.pools[*p].name.clone(),
            Action::Redirect(r) => format!("redirect {} (route `{}`)", r.status, route.name),
            Action::Respond(r) => format!("respond {} (route `{}`)", r.status, route.name),
        },
        None => NO_ROUTE.to_string(),
    }
}

pub fn preview(samples: &[Sample], running: &Config, candidate: &Config) -> Impact {
    let mut moves: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut impact = Impact {
        samples: samples.len(),
        ..Impact::default()
    };
    let mut limited: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for s in samples {
        let (from, to) = (pool_of(running, s), pool_of(candidate, s));
        if from != to {
            impact.moved += 1;
            if to == NO_ROUTE {
                impact.newly_404 += 1;
            }
            *moves.entry((from, to)).or_default() += 1;
        }
        let (before, after) = (route_of(running, s), route_of(candidate, s));
        let Some(after) = after else { continue };
        match (&after.action, before.map(|b| &b.action)) {
            (Action::Redirect(_), Some(Action::Redirect(_))) | (Action::Respond(_), Some(Action::Respond(_))) => {}
            (Action::Redirect(_), _) => impact.redirected += 1,
            (Action::Respond(_), _) => impact.answered += 1,
            (Action::Pool(_), _) => {
                let now = before.filter(|b| b.pool().is_some()).map(|b| b.backend_path(&s.path));
                if now.is_some_and(|p| p != after.backend_path(&s.path)) {
                    impact.rewritten += 1;
                }
            }
        }
        if let Some(rule) = &after.rate_limit {
            let i = candidate.routes.iter().position(|r| r.name == after.name).unwrap_or(0);
            match rule.key {
                RateKey::Route => limited.entry(i).or_default().push(s.ms),
                _ if !impact.rate_limited_unknown.contains(&after.name) => {
                    impact.rate_limited_unknown.push(after.name.clone())
                }
                _ => {}
            }
        }
    }
    for (i, times) in limited {
        let Some(rule) = &candidate.routes[i].rate_limit else {
            continue;
        };
        // Samples are one request in `EVERY`; spread evenly over the sampled span, the limit
        // lets `rate x span + burst` through.
        let span_s = match (times.iter().min(), times.iter().max()) {
            (Some(a), Some(b)) => (b - a) as f64 / 1000.0,
            _ => 0.0,
        };
        let requests = times.len() as f64 * safelb_proxy::samples::EVERY as f64;
        let allowed = rule.per_second * span_s + rule.burst as f64;
        let refused = ((requests - allowed) / safelb_proxy::samples::EVERY as f64).max(0.0);
        impact.rate_limited += refused.round() as usize;
    }
    let pct = |n: usize| {
        if samples.is_empty() {
            0.0
        } else {
            n as f64 * 100.0 / samples.len() as f64
        }
    };
    impact.shift_percent = pct(impact.moved);
    impact.moves = moves
        .into_iter()
        .map(|((from, to), requests)| Move {
            from,
            to,
            requests,
            percent: pct(requests),
        })
        .collect();
    impact.moves.sort_by_key(|m| std::cmp::Reverse(m.requests));
    impact
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(routes: &str) -> safelb_config::ValidConfig {
        let source = format!(
            "[listener.public]\nbind = \"127.0.0.1:1\"\n[pool.web]\nbackends = [\"127.0.0.1:9\"]\n[pool.api]\nbackends = [\"127.0.0.1:10\"]\n{routes}"
        );
        safelb_config::check("t.toml", &source).into_result().expect("valid")
    }

    fn sample(path: &str, ms: u64) -> Sample {
        Sample {
            listener: "public".into(),
            method: "GET".into(),
            host: "shop.example".into(),
            path: path.into(),
            ms,
        }
    }

    #[test]
    fn a_preview_counts_what_each_action_would_do_to_the_replayed_requests() {
        let running = config("[[route]]\nname = \"web\"\npool = \"web\"\n[[route]]\nname = \"api\"\npath_prefix = \"/api\"\npool = \"api\"\n");
        let candidate = config(concat!(
            "[[route]]\nname = \"web\"\npool = \"web\"\n",
            "[[route]]\nname = \"api\"\npath_prefix = \"/api\"\npool = \"api\"\nrewrite = { prefix = \"/v2\" }\n",
            "rate_limit = { rate = \"10/s\", burst = 10, key = \"route\" }\n",
            "[[route]]\nname = \"old\"\npath_prefix = \"/old\"\nredirect = { prefix = \"/new\" }\n",
            "[[route]]\nname = \"down\"\npath_prefix = \"/down\"\nrespond = { status = 503 }\n",
        ));
        // 100 sampled API requests in one second stand for 400 (one in EVERY = 4 is sampled):
        // the limit lets 10/s x 1 s + 10 through, so 380 refused, 95 in sample units.
        let mut samples: Vec<Sample> = (0..100).map(|i| sample("/api/x", 1_000 + i * 10)).collect();
        samples.extend((0..20).map(|_| sample("/old/page", 1_500)));
        samples.extend((0..30).map(|_| sample("/down", 1_500)));
        samples.extend((0..50).map(|_| sample("/", 1_500)));
        let impact = preview(&samples, &running, &candidate);
        assert_eq!(impact.samples, 200);
        assert_eq!(impact.redirected, 20);
        assert_eq!(impact.answered, 30);
        assert_eq!(impact.rewritten, 100);
        assert_eq!(impact.rate_limited, 95);
        assert!(impact.rate_limited_unknown.is_empty());
        assert_eq!(impact.moved, 50, "the redirected and answered ones leave pool `web`");
        // A redirect for one listener moves only the requests that arrived on it.
        let scoped = config(concat!(
            "[listener.plain]\nbind = \"127.0.0.1:2\"\n",
            "[[route]]\nname = \"to-https\"\nlistener = \"plain\"\nredirect = { scheme = \"https\" }\n",
            "[[route]]\nname = \"web\"\npool = \"web\"\n",
            "[[route]]\nname = \"api\"\npath_prefix = \"/api\"\npool = \"api\"\n",
        ));
        let mut on_plain = sample("/", 1_500);
        on_plain.listener = "plain".into();
        let mixed = [on_plain, sample("/", 1_500)];
        assert_eq!(preview(&mixed, &running, &scoped).redirected, 1);
        // Unchanged actions are not news.
        let again = preview(&samples, &candidate, &candidate);
        assert_eq!((again.redirected, again.answered, again.rewritten), (0, 0, 0));
    }
}
