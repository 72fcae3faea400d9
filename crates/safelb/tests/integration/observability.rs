//! Metrics, alerts, notifications, incidents and the postmortem, on a real `safelb serve`
//! process with real traffic; promtool and Alertmanager are Debian's (scripts/install-test-deps).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use safelb_testkit::{closed_port, Behavior, TestBackend};
use serde_json::Value;

use crate::common::*;
use crate::lifecycle::{free_port, spawn_serve, tempdir, wait_for_log, Process};

struct Site {
    dir: PathBuf,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    _process: Process,
}

impl Site {
    /// Starts `safelb serve` with `body` after the listener and admin tables.
    async fn start(body: &str) -> Site {
        let dir = tempdir();
        let (port, admin) = (free_port(), free_port());
        let source = format!("[listener.public]\nbind = \"127.0.0.1:{port}\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n[access_log]\nenabled = false\n{body}");
        std::fs::write(dir.join("safelb.toml"), &source).unwrap();
        let mut p = spawn_serve(&dir.join("safelb.toml"));
        wait_for_log(&mut p, "admin API listening", Duration::from_secs(10));
        Site {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
            dir,
            _process: p,
        }
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("store/admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    async fn api(&self, path: &str) -> Value {
        admin_call(self.admin, &self.token(), "GET", path, None)
            .await
            .expect("the admin API answers")
            .1
    }

    /// Waits until an event of `kind` mentioning `alert` is logged; returns it.
    async fn wait_event(&self, kind: &str, needle: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let events = self.api("/events").await;
            if let Some(e) = events
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["kind"] == kind && e["message"].as_str().is_some_and(|m| m.contains(needle)))
            {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} event for {needle} within {limit:?}; events: {events:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(safelb_bin())
            .args(args)
            .env("SAFELB_ADMIN", format!("http://{}", self.admin))
            .env("SAFELB_TOKEN_FILE", self.dir.join("store/admin.token"))
            .env("USER", "tester")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

async fn hit(addr: std::net::SocketAddr, path: &str, n: usize, pause: Duration) -> Vec<u16> {
    let mut client = Client::connect(addr).await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(client.get("x", path).await.map_or(0, |r| r.status));
        tokio::time::sleep(pause).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_scrape_passes_promtool() {
    let good = TestBackend::start("good").await;
    let site = Site::start(&format!(
        "[[route]]\nname = \"api\"\npath_prefix = \"/api\"\npool = \"api\"\n[[route]]\nname = \"dead\"\npath_prefix = \"/dead\"\npool = \"dead\"\n[pool.api]\nbackends = [\"{}\"]\nhealth = {{ path = \"/healthz\", interval = \"500ms\", timeout = \"200ms\" }}\n[pool.dead]\nbackends = [\"{}\"]\n",
        good.addr,
        closed_port()
    ))
    .await;
    hit(site.addr, "/api/x", 20, Duration::ZERO).await;
    hit(site.addr, "/dead", 3, Duration::ZERO).await;
    hit(site.addr, "/nowhere", 2, Duration::ZERO).await;
    let scrape = Client::connect(site.admin)
        .await
        .get("admin", "/metrics")
        .await
        .unwrap();
    assert_eq!(scrape.status, 200);
    assert_eq!(
        scrape.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = scrape.body;
    for needle in [
        "safelb_requests_total{route=\"api\",pool=\"api\",backend=\"",
        "status_class=\"5xx\",role=\"stable\"} 3",
        "safelb_requests_total{route=\"\",pool=\"\",backend=\"\",status_class=\"4xx\",role=\"stable\"} 2",
        "safelb_request_duration_seconds_bucket{pool=\"api\",role=\"stable\",le=\"+Inf\"} 20",
        "safelb_upstream_connect_errors_total{pool=\"dead\"",
        "safelb_backend_up{pool=\"api\"",
        "safelb_config_version{role=\"stable\"} 1",
        "safelb_rollouts_total{verdict=\"promoted\"} 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    // 25 lines is far below the writer's queue: none is dropped.
    let dropped: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("safelb_access_log_dropped_total "))
        .unwrap_or_else(|| panic!("no safelb_access_log_dropped_total in\n{text}"))
        .parse()
        .unwrap();
    assert_eq!(dropped, 0.0);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/install-test-deps");
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_kind_fires_and_resolves_on_real_traffic() {
    let (e, s, d, b) = (
        TestBackend::start("e").await,
        TestBackend::start("s").await,
        TestBackend::start("d").await,
        TestBackend::start("b").await,
    );
    let body = format!(
        r#"
[rollout]
canary_steps = [50, 100]
step_bake = "500ms"
min_requests = 1
[[route]]
name = "err"
path_prefix = "/err"
pool = "err"
[[route]]
name = "slow"
path_prefix = "/slow"
pool = "slow"
[[route]]
name = "down"
path_prefix = "/down"
pool = "down"
[[route]]
name = "burn"
path_prefix = "/burn"
pool = "burn"
[pool.err]
backends = ["{e}"]
outlier = {{ consecutive_failures = 0 }}
[pool.slow]
backends = ["{s}"]
[pool.down]
backends = ["{d}"]
health = {{ path = "/healthz", interval = "200ms", timeout = "150ms" }}
[pool.burn]
backends = ["{b}"]
outlier = {{ consecutive_failures = 0 }}
[[alert]]
name = "ErrRate"
kind = "error_rate"
pool = "err"
threshold = 0.2
window = "2s"
for = "1s"
min_requests = 5
[[alert]]
name = "Slow"
kind = "latency_p99"
pool = "slow"
threshold = "100ms"
window = "2s"
min_requests = 3
[[alert]]
name = "Down"
kind = "no_healthy_backends"
pool = "down"
severity = "page"
[[alert]]
name = "Burn"
kind = "burn_rate"
pool = "burn"
slo = 0.99
min_requests = 5
[[alert]]
name = "RolledBack"
kind = "rollback"
hold = "2s"
"#,
        e = e.addr,
        s = s.addr,
        d = d.addr,
        b = b.addr
    );
    let site = Site::start(&body).await;
    let limit = Duration::from_secs(10);

    // error_rate: pending for 1 s, then firing; resolves once the window holds only successes.
    e.set(Behavior::Status(500));
    hit(site.addr, "/err", 30, Duration::from_millis(50)).await;
    site.wait_event("AlertPending", "ErrRate", limit).await;
    site.wait_event("AlertFired", "ErrRate", limit).await;
    e.set(Behavior::Ok);
    hit(site.addr, "/err", 40, Duration::from_millis(80)).await;
    site.wait_event("AlertResolved", "ErrRate", limit).await;

    // latency_p99
    s.set(Behavior::Delay(Duration::from_millis(300)));
    hit(site.addr, "/slow", 8, Duration::ZERO).await;
    site.wait_event("AlertFired", "Slow", limit).await;
    s.set(Behavior::Ok);
    hit(site.addr, "/slow", 40, Duration::from_millis(80)).await;
    site.wait_event("AlertResolved", "Slow", limit).await;

    // no_healthy_backends: the health check takes the only backend out, then lets it back in.
    d.set(Behavior::Status(503));
    site.wait_event("AlertFired", "Down", limit).await;
    d.set(Behavior::Ok);
    site.wait_event("AlertResolved", "Down", limit).await;

    // burn_rate: 100% errors burn a 1% budget 100x; many successes bring the 5 m window back down.
    b.set(Behavior::Status(500));
    hit(site.addr, "/burn", 20, Duration::from_millis(20)).await;
    site.wait_event("AlertFired", "Burn", limit).await;
    b.set(Behavior::Ok);
    let report = load(site.addr, "x", "/burn", 4, Duration::from_secs(5), 3000).await;
    assert!(report.ok >= 1000, "{report:?}");
    site.wait_event("AlertResolved", "Burn", limit).await;

    // rollback: a forced bad change is rolled back by its canary.
    let bad = site.dir.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(site.dir.join("safelb.toml"))
            .unwrap()
            .replace(&e.addr.to_string(), &closed_port().to_string()),
    )
    .unwrap();
    let load_task = tokio::spawn(hit(site.addr, "/err", 60, Duration::from_millis(20)));
    let (code, out) = site.cli(&[
        "apply",
        bad.to_str().unwrap(),
        "-m",
        "forced",
        "--skip-preflight",
        "--skip-shadow",
    ]);
    assert_eq!(code, 4, "{out}");
    site.wait_event("AlertFired", "RolledBack", limit).await;
    site.wait_event("AlertResolved", "RolledBack", limit).await;
    load_task.await.unwrap();

    // Every transition is an event, and the incidents they opened are listed.
    let (code, out) = site.cli(&["incidents"]);
    assert_eq!(code, 0);
    assert!(out.lines().count() >= 2, "{out}");
}

fn alertmanager_config(dir: &Path) -> PathBuf {
    let path = dir.join("alertmanager.yml");
    std::fs::write(&path, "route:\n  receiver: \"null\"\nreceivers:\n  - name: \"null\"\n").unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_receives_the_alert() {
    let dir = tempdir();
    let am_port = free_port();
    let am = Command::new("prometheus-alertmanager")
        .arg(format!("--config.file={}", alertmanager_config(&dir).display()))
        .arg(format!("--storage.path={}", dir.join("am-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus-alertmanager is installed by scripts/install-test-deps");
    let _am = Process(am);
    let am_addr: std::net::SocketAddr = format!("127.0.0.1:{am_port}").parse().unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(am_addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "alertmanager did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let be = TestBackend::start("be").await;
    be.set(Behavior::Status(500));
    let site = Site::start(&format!(
        "[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"{}\"]\noutlier = {{ consecutive_failures = 0 }}\n[[alert]]\nname = \"SafelbHighErrorRate\"\nkind = \"error_rate\"\nthreshold = 0.5\nwindow = \"5s\"\nmin_requests = 5\nseverity = \"page\"\nlabels = {{ team = \"web\" }}\n[[notify]]\nkind = \"alertmanager\"\nurl = \"http://{am_addr}\"\n",
        be.addr
    ))
    .await;
    hit(site.addr, "/", 20, Duration::from_millis(20)).await;
    site.wait_event("AlertFired", "SafelbHighErrorRate", Duration::from_secs(10))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = Client::connect(am_addr)
            .await
            .get("alertmanager", "/api/v2/alerts")
            .await
            .unwrap();
        let alerts: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        if let Some(a) = alerts
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["labels"]["alertname"] == "SafelbHighErrorRate")
        {
            assert_eq!(a["labels"]["severity"], "page");
            assert_eq!(a["labels"]["team"], "web");
            assert_eq!(a["status"]["state"], "active");
            assert!(
                a["annotations"]["summary"].as_str().unwrap().contains("error rate"),
                "{a}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alertmanager has no SafelbHighErrorRate: {alerts}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmortem_figures_match_what_clients_saw() {
    let good = TestBackend::start("good").await;
    let site = Site::start(&format!(
        "[rollout]\ncanary_steps = [20, 100]\nstep_bake = \"2s\"\nmin_requests = 20\n[[route]]\nname = \"orders\"\npool = \"orders\"\n[pool.orders]\nbackends = [\"{}\"]\n[[alert]]\nname = \"CanaryRolledBack\"\nkind = \"rollback\"\nhold = \"1s\"\n",
        good.addr
    ))
    .await;
    // POSTs carry a body, so a failure on the candidate cannot be replayed on the stable version:
    // these clients do see the bad change.
    let addr = site.addr;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let mut seen: Vec<(u16, u128)> = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(6);
                while Instant::now() < deadline {
                    let status = match client
                        .send(request("POST", "x", "/order", Bytes::from_static(b"{\"item\": 1}")))
                        .await
                    {
                        Ok(r) => r.status,
                        Err(_) => {
                            client = Client::connect(addr).await;
                            0
                        }
                    };
                    seen.push((
                        status,
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_millis(),
                    ));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bad = site.dir.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(site.dir.join("safelb.toml"))
            .unwrap()
            .replace(&good.addr.to_string(), &closed_port().to_string()),
    )
    .unwrap();
    let (code, out) = site.cli(&[
        "apply",
        bad.to_str().unwrap(),
        "-m",
        "orders to the new cluster",
        "--skip-preflight",
        "--skip-shadow",
    ]);
    assert_eq!(code, 4, "{out}");
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap());
    }
    let failures: Vec<u128> = all
        .iter()
        .filter(|(s, _)| *s >= 500 || *s == 0)
        .map(|(_, t)| *t)
        .collect();
    assert!(!failures.is_empty(), "the forced change must have failed some POSTs");
    let (first, last) = (*failures.iter().min().unwrap(), *failures.iter().max().unwrap());

    let resolved = site
        .wait_event("IncidentResolved", "incident #1", Duration::from_secs(15))
        .await;
    assert!(resolved["message"].as_str().unwrap().contains("#1"));
    let pm = site.api("/incidents/1/postmortem?format=json").await;
    let report = &pm["report"];
    println!(
        "clients: {} requests, {} failed, first→last failure {} ms; postmortem: {}",
        all.len(),
        failures.len(),
        last - first,
        serde_json::to_string(&report["impact"]).unwrap()
    );
    assert_eq!(report["impact"]["failed"].as_u64(), Some(failures.len() as u64));
    assert_eq!(report["impact"]["distinct_clients"], 1);
    let (pf, pl) = (
        report["first_failure_ms"].as_i64().unwrap() as i128,
        report["last_failure_ms"].as_i64().unwrap() as i128,
    );
    assert!(
        ((pl - pf) - (last as i128 - first as i128)).abs() < 1000,
        "durations differ by more than a second"
    );
    assert_eq!(report["trigger"]["skip_preflight"], true);
    assert_eq!(report["trigger"]["author"], "admin (tester)");
    assert_eq!(report["mitigation"]["how"], "automatic rollback");

    let (code, md) = site.cli(&["postmortem", "1"]);
    assert_eq!(code, 0);
    for section in [
        "## Summary",
        "## Root cause analysis",
        "## Impact",
        "## Detection",
        "## Mitigation and resolution",
        "## Timeline",
        "## Lessons learned and action items",
    ] {
        assert!(md.contains(section), "missing {section}:\n{md}");
    }
    assert!(md.contains(&format!("{} failed of", failures.len())), "{md}");
    assert!(
        md.contains("Preflight was skipped with --skip-preflight by admin (tester)"),
        "{md}"
    );
    assert!(md.contains("```diff"), "{md}");
    assert!(!md.contains("| |"), "no blank cells:\n{md}");
}

#[test]
fn safelb_demo_tells_the_whole_story() {
    let dir = tempdir();
    let started = Instant::now();
    let out = Command::new(safelb_bin())
        .args(["demo", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("safelb demo took {took:?}:\n{stdout}");
    for needle in [
        "1. Healthy traffic",
        "rejected at preflight",
        "rolled back at 10%",
        "incident #1 opened",
        "incident #1 resolved",
        "Postmortem written by safelb",
        "rejected at the shadow stage",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
    // The totals line, "N client requests, M failed, in Ts.": M is a number, and it is zero.
    let totals = stdout
        .lines()
        .find(|l| l.contains(" client requests, "))
        .unwrap_or_else(|| panic!("no totals line in\n{stdout}"));
    let failed: u64 = totals
        .split(" client requests, ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no failure count in {totals:?}"));
    assert_eq!(failed, 0, "{totals}");
    assert!(dir.join("store/postmortems/incident-1.md").exists());
    assert!(took < Duration::from_secs(60), "the demo took {took:?}");
}
