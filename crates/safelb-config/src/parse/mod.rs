//! From TOML text to a [`ValidConfig`]: syntax, then every section, then cross-checks.
//!
//! The keys accepted here are the schema; `docs/config.md` documents each one.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::decode::{as_array, as_section, as_str, as_uint, parse_addr, Section, Switch, Value};
use crate::diagnostic::{did_you_mean, Diagnostics, Rule};
use crate::model::*;
use crate::routing::{HostMatch, RouteMatch, RouteTable};
use crate::validate::{self, SpannedRoute, SpannedTest};

mod actions;
mod alerts;
mod listeners;
mod pools;
mod rollout;
mod route_tests;
mod routes;

use actions::*;
use alerts::*;
use listeners::*;
use pools::*;
use rollout::*;
use route_tests::*;
use routes::*;

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
    let routes = routes(&mut d, &top, &listeners, &pools);
    let tests = tests(&mut d, &top);
    let rollout = top
        .section(&mut d, "rollout")
        .map(|s| rollout(&mut d, &s))
        .unwrap_or_default();
    let change_freezes = change_freezes(&mut d, &top);
    let alerts = alerts(&mut d, &top, &routes, &pools);
    let notify = notify(&mut d, &top);

    let route_table = RouteTable::build(routes.iter().map(|(r, _)| r.matches.clone()).collect());
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
        routes: routes.into_iter().map(|(r, _)| r).collect(),
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
