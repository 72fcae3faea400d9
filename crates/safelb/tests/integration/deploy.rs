//! The files under deploy/ for operators with Prometheus, Grafana and systemd: the rules pass
//! `promtool check rules`, the unit passes `systemd-analyze verify`, and every safelb metric the
//! rules and the dashboard name is one a real safelb exposes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use crate::change_control::{addrs, backends, Deployment};
use crate::common::*;

pub fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path)
}

/// The `safelb_*` metric names in a text.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("safelb_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn the_prometheus_rules_pass_promtool() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yml"))
        .output()
        .expect("promtool is installed by scripts/install-test-deps");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(deploy("systemd/safelb.service")).unwrap();
    for setting in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=safelb",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(setting), "missing {setting}");
    }
    // Verified with ExecStart pointing at the binary under test (verify wants it to exist).
    let dir = crate::lifecycle::tempdir();
    let path = dir.join("safelb.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/safelb", safelb_bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed by scripts/install-test-deps");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_grafana_dashboard_name_is_exposed() {
    let dashboard = std::fs::read_to_string(deploy("grafana/safelb.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 10));
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let named: BTreeSet<String> = metric_names(&dashboard).union(&metric_names(&rules)).cloned().collect();

    let good = backends(1).await;
    let d = Deployment::start_with(&addrs(&good), "", "").await;
    for _ in 0..5 {
        get(d.addr(), "x", "/").await;
    }
    let scrape = get(d.admin(), "x", "/metrics").await.body;
    let exposed = metric_names(&scrape);
    // Fleet mode's own metrics are checked on a fleet instance, in `fleet.rs`.
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| !exposed.contains(*n) && !n.starts_with("safelb_fleet_"))
        .collect();
    assert!(missing.is_empty(), "named but not exposed: {missing:?}");
    assert!(named.len() >= 12, "{named:?}");
}
