//! Fleet mode: real `safelb serve` processes sharing one history in a real etcd on loopback
//! (Debian's `etcd-server`, started by the test on free ports), under load, at the default
//! rollout settings. Every process a test starts is stopped by its pid when the test ends.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use safelb_testkit::etcd::Etcd;
use safelb_testkit::{Behavior, TestBackend};
use serde_json::{json, Value};

use crate::common::*;
use crate::lifecycle::{free_port, tempdir, wait_for_log, Process};

const CLUSTER: &str = "shop";

struct Member {
    name: String,
    port: u16,
    admin: u16,
    process: Option<Process>,
}

/// Instances of one cluster sharing one config file.
struct Fleet {
    etcd: Etcd,
    dir: PathBuf,
    members: Vec<Member>,
}

/// The shared config: one listener (each instance binds its own address), pool `p`.
fn config(backends: &[&TestBackend]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    format!(
        "[listener.public]\nbind = \"127.0.0.1:8080\"\n[access_log]\nenabled = false\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [{}]\n",
        list.join(", ")
    )
}

impl Fleet {
    fn start(names: &[&str], source: &str) -> Fleet {
        let dir = tempdir();
        std::fs::write(dir.join("safelb.toml"), source).unwrap();
        let mut fleet = Fleet {
            etcd: Etcd::start(),
            dir,
            members: names
                .iter()
                .map(|n| Member {
                    name: n.to_string(),
                    port: free_port(),
                    admin: free_port(),
                    process: None,
                })
                .collect(),
        };
        for i in 0..names.len() {
            fleet.spawn(i);
        }
        fleet
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let child = Command::new(safelb_bin())
            .args(["serve", "--config"])
            .arg(self.dir.join("safelb.toml"))
            .arg("--store")
            .arg(self.dir.join(&m.name))
            .args(["--etcd", &self.etcd.url, "--cluster", CLUSTER])
            .args(["--instance", &m.name])
            .arg("--bind")
            .arg(format!("public=127.0.0.1:{}", m.port))
            .arg("--admin-bind")
            .arg(format!("127.0.0.1:{}", m.admin))
            .env("SAFELB_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting safelb serve");
        let mut p = Process(child);
        wait_for_log(&mut p, "admin API listening", Duration::from_secs(20));
        self.members[i].process = Some(p);
    }

    /// `kill -9` of one instance (the process this test started, by pid).
    fn kill(&mut self, i: usize) {
        self.members[i].process = None;
    }

    fn index(&self, name: &str) -> usize {
        self.members.iter().position(|m| m.name == name).expect("a member")
    }

    fn addr(&self, i: usize) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.members[i].port).parse().unwrap()
    }

    /// One admin API call on instance `i`: status and JSON body.
    async fn api(&self, i: usize, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = &self.members[i];
        let token = std::fs::read_to_string(self.dir.join(&m.name).join("admin.token")).unwrap();
        let admin = format!("127.0.0.1:{}", m.admin).parse().unwrap();
        admin_call(admin, &token, method, path, body)
            .await
            .expect("the admin API answers")
    }

    async fn status(&self, i: usize) -> Value {
        self.api(i, "GET", "/status", None).await.1
    }

    /// The version instance `i` serves.
    async fn serving(&self, i: usize) -> u64 {
        self.status(i).await["running"]["id"].as_u64().unwrap_or(0)
    }

    async fn apply(&self, i: usize, source: &str, reason: &str) -> (u16, Value) {
        self.api(
            i,
            "POST",
            "/apply",
            Some(json!({ "source": source, "reason": reason, "author": "test" })),
        )
        .await
    }

    /// Waits until every instance in `alive` serves `version`; how long it took.
    async fn until_all_serve(&self, alive: &[usize], version: u64, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let mut serving = Vec::new();
            for &i in alive {
                serving.push(self.serving(i).await);
            }
            if serving.iter().all(|&v| v == version) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "not every instance serves version {version} after {limit:?}: {serving:?}; status: {:#}",
                self.status(alive[0]).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the rollout of `version` ends, as instance `i` sees it; its final status.
    async fn until_rollout_ends(&self, i: usize, version: u64, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            let (_, r) = self.api(i, "GET", &format!("/rollouts/{version}"), None).await;
            if ["promoted", "rolled_back", "rejected"].contains(&r["phase"].as_str().unwrap_or("")) {
                return r;
            }
            assert!(
                started.elapsed() < limit,
                "rollout {version} did not end within {limit:?}: {r:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until instance `i` reports that it refused `version`; the reason it gives.
    async fn until_refused(&self, i: usize, version: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.status(i).await;
            let me = s["fleet"]["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == self.members[i].name)
                .cloned()
                .unwrap_or_default();
            if me["refused"][0] == version {
                return me["refused"][1].as_str().unwrap_or("").to_string();
            }
            assert!(
                Instant::now() < deadline,
                "instance {i} did not report refusing version {version}: {s:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn events(&self, i: usize) -> Vec<Value> {
        self.api(i, "GET", "/events?limit=100000", None)
            .await
            .1
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.process = None;
        }
    }
}

fn loads(fleet: &Fleet, alive: &[usize]) -> Vec<SteadyLoad> {
    alive.iter().map(|&i| SteadyLoad::start(fleet.addr(i), 2)).collect()
}

/// Prints what each instance's clients saw (for the record of a run: `--nocapture`).
fn report(what: &str, reports: &[LoadReport]) {
    let line: Vec<String> = reports
        .iter()
        .map(|r| format!("{} of {} failed", r.failed(), r.total()))
        .collect();
    eprintln!("fleet: {what}: {}", line.join("; "));
}

async fn finish(loads: Vec<SteadyLoad>) -> Vec<LoadReport> {
    let mut out = Vec::new();
    for l in loads {
        out.push(l.finish().await);
    }
    out
}

/// Three instances under load: two applies at once on two instances give one rollout and one
/// 409; all three come to serve it; their histories are one. Then etcd goes down: all keep
/// serving, one restarted meanwhile serves the last known-good version from its disk; etcd comes
/// back, they catch up, and the next apply goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_change_together_and_outlive_an_etcd_outage() {
    let v1 = [TestBackend::start("v1-a").await, TestBackend::start("v1-b").await];
    let v2 = TestBackend::start("v2").await;
    let v3 = TestBackend::start("v3").await;
    let mut fleet = Fleet::start(&["a", "b", "c"], &config(&[&v1[0], &v1[1]]));
    let all = [0, 1, 2];
    assert!(
        {
            let mut same = true;
            for i in all {
                same &= fleet.serving(i).await == 1;
            }
            same
        },
        "the file seeded the empty cluster as version 1"
    );
    let load = loads(&fleet, &all);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let (to_v2, to_v3) = (config(&[&v2]), config(&[&v3]));
    let (on_b, on_c) = tokio::join!(fleet.apply(1, &to_v2, "to v2"), fleet.apply(2, &to_v3, "to v3"));
    let mut codes = [on_b.0, on_c.0];
    codes.sort();
    assert_eq!(codes, [202, 409], "one rollout and one conflict: {on_b:?} {on_c:?}");
    let winner_backend = if on_b.0 == 202 { v2.name() } else { v3.name() };
    let (winner, loser) = if on_b.0 == 202 { (on_b, on_c) } else { (on_c, on_b) };
    assert!(
        loser.1["error"].as_str().unwrap_or("").contains("is still running"),
        "{loser:?}"
    );
    let version = winner.1["version"].as_u64().unwrap();
    fleet.until_all_serve(&all, version, Duration::from_secs(300)).await;
    eprintln!(
        "fleet: apply-to-all-serving with 3 instances: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ended = fleet.until_rollout_ends(0, version, Duration::from_secs(30)).await;
    assert_eq!(ended["phase"], "promoted", "{ended:#}");
    let reports = finish(load).await;
    report("during the rollout", &reports);
    for (i, r) in reports.iter().enumerate() {
        assert!(r.total() > 100, "instance {i} served its load: {r:?}");
        assert_eq!(r.failed(), 0, "instance {i} failed requests during the rollout: {r:?}");
    }
    let histories = {
        let mut h = Vec::new();
        for i in all {
            let (_, versions) = fleet.api(i, "GET", "/versions", None).await;
            h.push(
                versions
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| (v["id"].as_u64().unwrap(), v["fate"].as_str().unwrap().to_string()))
                    .collect::<Vec<_>>(),
            );
        }
        h
    };
    assert_eq!(histories[0], histories[1]);
    assert_eq!(histories[0], histories[2]);
    assert_eq!(
        histories[0],
        [(version, "known_good".to_string()), (1, "known_good".to_string())],
        "one new version, no rejected twin of the losing apply"
    );

    // etcd goes down (kill -9 of the process this test started).
    fleet.etcd.kill();
    let load = loads(&fleet, &all);
    for i in all {
        let deadline = Instant::now() + Duration::from_secs(10);
        while fleet.status(i).await["fleet"]["etcd_reachable"] != false {
            assert!(
                Instant::now() < deadline,
                "instance {i} does not say etcd is unreachable"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let metrics = get(
        format!("127.0.0.1:{}", fleet.members[0].admin).parse().unwrap(),
        "admin",
        "/metrics",
    )
    .await
    .body;
    assert!(
        metrics.contains("safelb_fleet_etcd_reachable{instance=\"a\"} 0\n"),
        "{metrics}"
    );
    // c restarts while etcd is down: it serves what it served, from its own disk.
    fleet.kill(2);
    fleet.spawn(2);
    let reply = get(fleet.addr(2), "x", "/").await;
    assert_eq!((reply.status, reply.backend()), (200, winner_backend));
    assert_eq!(fleet.serving(2).await, version);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reports = finish(load).await;
    report("while etcd was down (c restarted)", &reports);
    for (i, r) in reports.iter().enumerate().take(2) {
        assert_eq!(r.failed(), 0, "instance {i} failed requests while etcd was down: {r:?}");
    }

    // etcd is back: every instance reconnects, and the next change goes through.
    fleet.etcd.resume();
    for i in all {
        let deadline = Instant::now() + Duration::from_secs(20);
        while fleet.status(i).await["fleet"]["etcd_reachable"] != true {
            assert!(Instant::now() < deadline, "instance {i} did not reconnect to etcd");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleet.status(0).await["fleet"]["instances"]
        .as_array()
        .map_or(0, Vec::len)
        < 3
    {
        assert!(Instant::now() < deadline, "not every instance is back in etcd");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load = loads(&fleet, &all);
    let (code, next) = fleet.apply(0, &config(&[&v1[0]]), "back to v1-a").await;
    assert_eq!(code, 202, "{next}");
    let next = next["version"].as_u64().unwrap();
    fleet.until_all_serve(&all, next, Duration::from_secs(300)).await;
    let reports = finish(load).await;
    report("the apply after etcd came back", &reports);
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.failed(), 0, "instance {i} failed requests: {r:?}");
    }
    let reconnected = fleet
        .events(0)
        .await
        .iter()
        .filter(|e| e["kind"] == "EtcdReconnected")
        .count();
    assert!(reconnected >= 2, "the reconnections are in the history: {reconnected}");
}

/// A bad change is refused at the first stage, on one instance, and never reaches the others;
/// then the leader is killed in the middle of a good change's rollout: a new leader takes over
/// within the lease's TTL plus a second and the rollout ends on the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_change_stops_at_the_first_stage_and_a_killed_leader_is_replaced() {
    let good = [TestBackend::start("good-a").await, TestBackend::start("good-b").await];
    let broken = TestBackend::start("broken").await;
    broken.set(Behavior::HealthyButFailing(500));
    let mut fleet = Fleet::start(&["a", "b", "c"], &config(&[&good[0], &good[1]]));
    let all = [0, 1, 2];
    let load = loads(&fleet, &all);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (code, bad) = fleet.apply(1, &config(&[&broken]), "to the broken backend").await;
    assert_eq!(code, 202, "{bad}");
    let bad = bad["version"].as_u64().unwrap();
    let ended = fleet.until_rollout_ends(1, bad, Duration::from_secs(180)).await;
    assert_ne!(ended["phase"], "promoted", "{ended:#}");
    let reports = finish(load).await;
    report("the bad change", &reports);
    let events = fleet.events(0).await;
    let stage = events
        .iter()
        .find(|e| e["kind"] == "FleetStageStarted" && e["version"] == bad)
        .expect("the leader started stage 1");
    let first: Vec<String> = serde_json::from_value(stage["data"]["instances"].clone()).unwrap();
    assert_eq!(first.len(), 1, "one instance first: {first:?}");
    assert!(
        !events
            .iter()
            .any(|e| e["kind"] == "FleetStageStarted" && e["version"] == bad && e["data"]["stage"] == 2),
        "the bad change never reached the second stage"
    );
    let back = events
        .iter()
        .find(|e| e["kind"] == "FleetRolloutRolledBack" && e["version"] == bad)
        .expect("the fleet-wide rollback is recorded");
    assert_eq!(
        back["data"]["instances"],
        json!(first),
        "it names the instances it reached"
    );
    for (i, r) in reports.iter().enumerate() {
        if fleet.members[i].name == first[0] {
            assert!(r.failed() <= 50, "the first stage bounds the failures: {r:?}");
        } else {
            assert_eq!(r.failed(), 0, "instance {i} never served the bad change: {r:?}");
        }
    }
    for i in all {
        assert_eq!(fleet.serving(i).await, 1, "instance {i} serves the known-good version");
    }
    // The leader opened one incident for the fleet; its postmortem names the instance.
    let deadline = Instant::now() + Duration::from_secs(20);
    let incident = loop {
        let (_, incidents) = fleet.api(2, "GET", "/incidents", None).await;
        if let Some(i) = incidents
            .as_array()
            .and_then(|l| l.iter().find(|i| !i["resolved_ms"].is_null()))
        {
            break i.clone();
        }
        assert!(Instant::now() < deadline, "no resolved incident: {incidents:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        incident["report"]["instances"]
            .as_array()
            .is_some_and(|l| l.contains(&json!(first[0]))),
        "{incident:#}"
    );

    // A good change; the leader dies in the middle of its rollout.
    let load = loads(&fleet, &all);
    let (code, next) = fleet.apply(0, &config(&[&good[1]]), "only good-b").await;
    assert_eq!(code, 202, "{next}");
    let next = next["version"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader = loop {
        let s = fleet.status(0).await;
        let staged = s["fleet"]["rollout"]["phase"] == "running";
        if let (true, Some(l)) = (staged, s["fleet"]["leader"].as_str()) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "the rollout did not start: {s:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dead = fleet.index(&leader);
    fleet.kill(dead);
    let killed = Instant::now();
    let survivors: Vec<usize> = all.into_iter().filter(|&i| i != dead).collect();
    let new_leader = loop {
        let s = fleet.status(survivors[0]).await;
        if let Some(l) = s["fleet"]["leader"].as_str().filter(|l| *l != leader) {
            break l.to_string();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no new leader 10 s after the old one was killed: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failover = killed.elapsed();
    eprintln!("fleet: leader {leader} killed; {new_leader} leads after {failover:?}");
    assert!(
        failover <= Duration::from_secs(safelb_control::fleet::LEASE_TTL_S + 1) + Duration::from_millis(600),
        "failover took {failover:?}"
    );
    let ended = fleet
        .until_rollout_ends(survivors[0], next, Duration::from_secs(300))
        .await;
    assert!(
        ["promoted", "rolled_back"].contains(&ended["phase"].as_str().unwrap()),
        "{ended:#}"
    );
    let expect = if ended["phase"] == "promoted" { next } else { 1 };
    fleet.until_all_serve(&survivors, expect, Duration::from_secs(10)).await;
    let reports = finish(load).await;
    report(&format!("the leader ({leader}) killed mid-rollout"), &reports);
    for &i in &survivors {
        assert_eq!(reports[i].failed(), 0, "survivor {i} failed requests: {:?}", reports[i]);
    }
}

/// A version put into etcd by hand (etcdctl), bypassing `apply`, that does not pass check: no
/// instance serves it; each says so in its status, its metrics and the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_written_into_etcd_by_hand_that_fails_validation_is_refused() {
    let backend = TestBackend::start("ok").await;
    let fleet = Fleet::start(&["a", "b"], &config(&[&backend]));
    let bad = json!({
        "id": 2, "parent": 1, "author": "someone", "reason": "by hand", "created_ms": 0,
        "hash": "0", "origin": "apply", "skip_preflight": false, "emergency": false,
        "fate": "known_good",
        "source": "[listener.public]\nbind = \"127.0.0.1:8080\"\n[[route]]\nname = \"r\"\npool = \"nowhere\"\n",
    });
    let put = |key: &str, value: &str| {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &fleet.etcd.url, "put"])
            .arg(format!("/safelb/{CLUSTER}/{key}"))
            .arg(value)
            .output()
            .expect("etcdctl is installed by scripts/install-test-deps");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    put("versions/00000000000000000002", &bad.to_string());
    put("state/running", "2");
    for i in 0..2 {
        let why = fleet.until_refused(i, 2).await;
        assert!(why.contains("nowhere"), "{why}");
        assert_eq!(fleet.serving(i).await, 1, "instance {i} still serves version 1");
        let reply = get(fleet.addr(i), "x", "/").await;
        assert_eq!((reply.status, reply.backend()), (200, "ok"));
        let metrics = get(
            format!("127.0.0.1:{}", fleet.members[i].admin).parse().unwrap(),
            "admin",
            "/metrics",
        )
        .await
        .body;
        let line = format!(
            "safelb_fleet_refused_version{{instance=\"{}\"}} 2\n",
            fleet.members[i].name
        );
        assert!(metrics.contains(&line), "{metrics}");
        // Every fleet metric the shipped alerting rules name is exposed.
        let rules = std::fs::read_to_string(crate::deploy::deploy("prometheus/alerts.yml")).unwrap();
        let exposed = crate::deploy::metric_names(&metrics);
        for name in crate::deploy::metric_names(&rules) {
            assert!(
                !name.starts_with("safelb_fleet_") || exposed.contains(&name),
                "{name} is named by the rules but not exposed"
            );
        }
    }
    let refused: Vec<String> = fleet
        .events(0)
        .await
        .iter()
        .filter(|e| e["kind"] == "VersionRefused" && e["version"] == 2)
        .map(|e| e["data"]["instance"].as_str().unwrap_or("").to_string())
        .collect();
    let mut refused = refused;
    refused.sort();
    assert_eq!(refused, ["a", "b"], "each instance recorded its refusal once");

    // A valid version without a single route, put in by hand (no `--confirm` anywhere): refused.
    let mut empty = bad.clone();
    empty["id"] = json!(3);
    empty["source"] = json!("[listener.public]\nbind = \"127.0.0.1:8080\"\n");
    put("versions/00000000000000000003", &empty.to_string());
    put("state/running", "3");
    for i in 0..2 {
        let why = fleet.until_refused(i, 3).await;
        assert!(why.contains("no routes"), "{why}");
        assert_eq!(fleet.serving(i).await, 1, "instance {i} still serves version 1");
        assert_eq!(get(fleet.addr(i), "x", "/").await.status, 200);
    }
}
