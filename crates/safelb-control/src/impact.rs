//! Traffic impact preview: recent requests replayed through the running and the candidate
//! route tables, to show which share of traffic a change moves and where.

use std::collections::BTreeMap;

use safelb_config::routing::RequestView;
use safelb_config::{Action, Config};
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

fn pool_of(config: &Config, s: &Sample) -> String {
    // Samples keep method, host and path only: header conditions see no headers.
    let view = RequestView {
        listener: "",
        method: &s.method,
        host: &s.host,
        path: &s.path,
        header: |_: &str| None,
    };
    match config.route_table.find(&view) {
        Some(i) => match &config.routes[i].action {
            Action::Pool(p) => config.pools[*p].name.clone(),
            Action::Redirect(r) => format!("redirect {} (route `{}`)", r.status, config.routes[i].name),
            Action::Respond(r) => format!("respond {} (route `{}`)", r.status, config.routes[i].name),
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
    for s in samples {
        let (from, to) = (pool_of(running, s), pool_of(candidate, s));
        if from != to {
            impact.moved += 1;
            if to == NO_ROUTE {
                impact.newly_404 += 1;
            }
            *moves.entry((from, to)).or_default() += 1;
        }
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
