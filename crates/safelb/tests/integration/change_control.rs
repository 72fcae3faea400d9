//! Change control end to end: a real `safelb serve` process with its version store, the real
//! CLI, real backends, and a steady client load measuring what each change costs clients.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use safelb_testkit::{closed_port, Behavior, TestBackend};

use crate::common::*;
use crate::lifecycle::{admin_port, free_port, signal, spawn_serve, tempdir, wait_for_log, Process};

/// One safelb deployment under test.
pub(crate) struct Deployment {
    pub dir: PathBuf,
    pub port: u16,
    pub process: Option<Process>,
    rollout: String,
    /// Lines of `[pool.p]` besides `backends`.
    pool: String,
}

const FAST_ROLLOUT: &str = "canary_steps = [10, 50, 100]\nstep_bake = \"1s\"\nmin_requests = 10";

impl Deployment {
    /// A deployment at the pool's defaults (15 s response timeout, hedging on).
    async fn start(backends: &[String], rollout: &str) -> Deployment {
        Self::start_with(backends, rollout, "").await
    }

    /// A deployment whose pool `p` has `pool` lines besides its backends (nothing else of the
    /// pool's defaults is changed).
    pub async fn start_with(backends: &[String], rollout: &str, pool: &str) -> Deployment {
        let mut d = Deployment {
            dir: tempdir(),
            port: free_port(),
            process: None,
            rollout: rollout.to_string(),
            pool: pool.to_string(),
        };
        d.write("safelb.toml", backends, "");
        let mut p = spawn_serve(&d.dir.join("safelb.toml"));
        wait_for_log(&mut p, "admin API listening", Duration::from_secs(10));
        d.process = Some(p);
        d
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn admin(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", admin_port(self.port)).parse().unwrap()
    }

    /// Writes a config naming `backends` (pool `p` with this deployment's pool lines) to `name`.
    pub fn write(&self, name: &str, backends: &[String], extra: &str) -> PathBuf {
        self.write_pool(name, backends, extra, &self.pool)
    }

    /// `write` with other lines for `[pool.p]`.
    pub fn write_pool(&self, name: &str, backends: &[String], extra: &str, pool: &str) -> PathBuf {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        let path = self.dir.join(name);
        std::fs::write(
            &path,
            format!(
                "[listener.public]\nbind = \"127.0.0.1:{}\"\n[admin]\nbind = \"{}\"\n[access_log]\nenabled = false\n[rollout]\n{}\n{extra}\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [{}]\n{pool}\n",
                self.port,
                self.admin(),
                self.rollout,
                list.join(", ")
            ),
        )
        .unwrap();
        path
    }

    /// Runs the CLI against this deployment; returns exit code, stdout, stderr and duration.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String, Duration) {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        run_cli(self.admin(), self.dir.clone(), args)
    }

    /// `apply FILE -m REASON --skip-preflight --skip-shadow`: a bad change forced past every
    /// check before the canary, the way the original outage's change slipped through.
    pub async fn force(&self, file: &std::path::Path, reason: &str) -> (i32, String, String, Duration) {
        let file = file.to_str().expect("test paths are UTF-8");
        self.cli_async(&["apply", file, "-m", reason, "--skip-preflight", "--skip-shadow"])
            .await
    }

    /// `cli` on a blocking thread, so the load keeps running on the test's runtime.
    pub async fn cli_async(&self, args: &[&str]) -> (i32, String, String, Duration) {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (admin, dir) = (self.admin(), self.dir.clone());
        tokio::task::spawn_blocking(move || run_cli(admin, dir, args))
            .await
            .unwrap()
    }
}

/// Runs the CLI against a deployment; returns exit code, stdout, stderr and duration.
fn run_cli(admin: std::net::SocketAddr, dir: PathBuf, args: Vec<String>) -> (i32, String, String, Duration) {
    let started = Instant::now();
    let out = Command::new(safelb_bin())
        .args(&args)
        .env("SAFELB_ADMIN", format!("http://{admin}"))
        .env("SAFELB_TOKEN_FILE", dir.join("store/admin.token"))
        .env("USER", "tester")
        .current_dir(dir)
        .output()
        .unwrap();
    let took = started.elapsed();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    )
}

pub(crate) async fn backends(n: usize) -> Vec<TestBackend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(TestBackend::start(&format!("b{i}")).await);
    }
    v
}

pub(crate) fn addrs(b: &[TestBackend]) -> Vec<String> {
    b.iter().map(|b| b.addr.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_candidates_are_rejected_at_preflight_and_cost_no_request() {
    let good = backends(2).await;
    let hung = TestBackend::start("hung").await;
    hung.set(Behavior::Hang);
    let d = Deployment::start(&addrs(&good), FAST_ROLLOUT).await;
    let load = SteadyLoad::start(d.addr(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let closed = d.write("closed.toml", &[closed_port().to_string()], "");
    let (code, out, _, took) = d
        .cli_async(&["apply", closed.to_str().unwrap(), "-m", "pool to a closed port"])
        .await;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("rejected at preflight") && out.contains("Connection refused"),
        "{out}"
    );
    println!("closed-port candidate rejected at preflight in {took:?}");

    let hang = d.write("hang.toml", &[hung.addr.to_string()], "");
    let (code, out, _, took) = d
        .cli_async(&[
            "apply",
            hang.to_str().unwrap(),
            "-m",
            "pool to a backend that never answers",
        ])
        .await;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("rejected at preflight") && out.contains("no answer within"),
        "{out}"
    );
    println!("hanging candidate rejected at preflight in {took:?}");

    let report = load.finish().await;
    println!("load during both rejected changes: {report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(
        hung.hits() <= 3,
        "only preflight probes reached the hung backend, not {} requests",
        hung.hits()
    );
    let (_, history, _, _) = d.cli(&["history"]);
    assert_eq!(history.matches("rejected").count(), 2, "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_bad_candidates_roll_back_within_step_bake_plus_a_second() {
    let good = backends(2).await;
    let hung = TestBackend::start("hung").await;
    hung.set(Behavior::Hang);
    let rollout = "canary_steps = [10, 50, 100]\nstep_bake = \"2s\"\nmin_requests = 10";
    let d = Deployment::start(&addrs(&good), rollout).await;
    let load = SteadyLoad::start(d.addr(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    for (name, backend) in [("closed", closed_port()), ("hang", hung.addr)] {
        let file = d.write(&format!("{name}.toml"), &[backend.to_string()], "");
        let (code, out, err, took) = d.force(&file, "forced bad change").await;
        assert_eq!(code, 4, "{out}\n{err}");
        assert!(out.contains("rolled back at 10%"), "{out}");
        println!("{name}: forced bad change rolled back, apply returned after {took:?}:\n{out}");
        assert!(
            took < Duration::from_secs(3),
            "rollback took {took:?}, more than step_bake + 1s"
        );
    }
    let report = load.finish().await;
    println!("load during both forced bad changes: {report:?}");
    // Bounded by the first canary share (10%); with the fallback to the stable version it is 0.
    assert!(report.failed() * 10 <= report.total(), "{report:?}");
    assert_eq!(
        report.failed(),
        0,
        "failed candidate requests are served by the stable version: {report:?}"
    );
    let (_, history, _, _) = d.cli(&["history"]);
    assert_eq!(history.matches("rolled_back").count(), 2, "{history}");
    assert_eq!(history.matches("[preflight skipped]").count(), 2, "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_candidate_is_promoted_through_every_step_and_rollback_is_immediate() {
    let old = backends(2).await;
    let new = TestBackend::start("new").await;
    let d = Deployment::start(&addrs(&old), FAST_ROLLOUT).await;
    let load = SteadyLoad::start(d.addr(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let file = d.write("new.toml", &[new.addr.to_string()], "");
    let (code, out, err, took) = d
        .cli_async(&[
            "apply",
            file.to_str().unwrap(),
            "-m",
            "move to the new backend",
            "--confirm",
        ])
        .await;
    assert_eq!(code, 0, "{out}\n{err}");
    for step in [
        "step 1/3 passed at 10%",
        "step 2/3 passed at 50%",
        "step 3/3 passed at 100%",
        "promoted",
    ] {
        assert!(out.contains(step), "missing `{step}` in {out}");
    }
    println!("good change promoted through 3 steps in {took:?}");
    assert_eq!(get(d.addr(), "x", "/").await.backend(), "new");

    let (code, out, _, took) = d.cli_async(&["rollback", "-m", "the new backend is too slow"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(the content of version 1)"), "{out}");
    println!("manual rollback: CLI returned in {took:?}: {out}");
    // At once: the very next request is routed by the old version.
    assert!(get(d.addr(), "x", "/").await.backend().starts_with('b'));
    let report = load.finish().await;
    assert_eq!(report.failed(), 0, "{report:?}");
    let (_, history, _, _) = d.cli(&["history"]);
    assert!(
        history.contains("known_good") && history.contains("rollback"),
        "{history}"
    );
    let (code, diff, _, _) = d.cli(&["diff", "1", "2"]);
    assert_eq!(code, 0);
    assert!(diff.contains(&format!("+backends = [\"{}\"]", new.addr)), "{diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_rollout_keeps_every_acknowledged_version() {
    let old = backends(1).await;
    let new = TestBackend::start("new").await;
    let slow = "canary_steps = [10, 100]\nstep_bake = \"20s\"\nmin_requests = 10";
    let mut d = Deployment::start(&addrs(&old), slow).await;
    let good = d.write(
        "good.toml",
        &[old[0].addr.to_string()],
        "[pool.spare]\nbackends = [\"127.0.0.1:9\"]",
    );
    let _ = good;
    let cand = d.write("cand.toml", &[new.addr.to_string()], "");
    let (code, out, err, _) = d
        .cli_async(&[
            "apply",
            cand.to_str().unwrap(),
            "-m",
            "slow rollout",
            "--confirm",
            "--no-wait",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("version 2 submitted"), "{out}");
    // The rollout is in its first 20 s step: kill -9 the process we started.
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(d.process.as_ref().unwrap(), 9);
    let mut dead = d.process.take().unwrap();
    let _ = dead.0.wait();

    let mut p = spawn_serve(&d.dir.join("safelb.toml"));
    wait_for_log(&mut p, "admin API listening", Duration::from_secs(10));
    d.process = Some(p);
    let (_, history, _, _) = d.cli(&["history"]);
    println!("after kill -9 and restart:\n{history}");
    assert!(
        history.contains("*  1"),
        "version 1, the last promoted, runs: {history}"
    );
    assert!(
        history.lines().any(|l| l.contains("   2") && l.contains("rolled_back")),
        "{history}"
    );
    assert_eq!(get(d.addr(), "x", "/").await.backend(), "b0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_demands_the_token_and_one_rollout_at_a_time() {
    let old = backends(1).await;
    let slow = "canary_steps = [10, 100]\nstep_bake = \"10s\"\nmin_requests = 10";
    let d = Deployment::start(&addrs(&old), slow).await;
    let token = std::fs::read_to_string(d.dir.join("store/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let mut client = Client::connect(d.admin()).await;
    assert_eq!(
        client.get("x", "/healthz").await.unwrap().status,
        200,
        "healthz needs no token"
    );
    assert_eq!(client.get("x", "/api/v1/status").await.unwrap().status, 401);
    let mut wrong = request("GET", "x", "/api/v1/status", Bytes::new());
    wrong
        .headers_mut()
        .insert("authorization", "Bearer not-the-token".parse().unwrap());
    let r = client.send(wrong).await.unwrap();
    assert_eq!(r.status, 403);
    assert!(r.body.contains("wrong admin token"), "{}", r.body);
    let mut apply = request("POST", "x", "/api/v1/apply", Bytes::from(r#"{"source": "x = 1"}"#));
    apply
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    apply
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let r = client.send(apply).await.unwrap();
    assert_eq!(r.status, 400, "a reason is required: {}", r.body);

    let cand = d.write(
        "cand.toml",
        &[old[0].addr.to_string()],
        "[pool.other]\nbackends = [\"127.0.0.1:9\"]\n",
    );
    let (code, _, err, _) = d
        .cli_async(&["apply", cand.to_str().unwrap(), "-m", "first", "--no-wait"])
        .await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err, _) = d.cli_async(&["apply", cand.to_str().unwrap(), "-m", "second"]).await;
    assert_eq!(code, 3);
    assert!(err.contains("is still running"), "{err}");
    // A rollback during a rollout aborts it.
    let (code, out, _, _) = d.cli_async(&["rollback", "-m", "stop it"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("rollout of version 2 aborted"), "{out}");
    let invalid = d.dir.join("invalid.toml");
    std::fs::write(&invalid, "[listener.public]\nbind = \"nope\"\n").unwrap();
    let (code, _, err, _) = d.cli_async(&["apply", invalid.to_str().unwrap(), "-m", "broken"]).await;
    assert_eq!(code, 3);
    assert!(err.contains("invalid-address"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_freeze_refuses_changes_unless_emergency() {
    let old = backends(1).await;
    let d = Deployment::start(&addrs(&old), FAST_ROLLOUT).await;
    // Put a freeze in force: through the pipeline, with an emergency flag for this very change.
    let frozen = d.write(
        "frozen.toml",
        &addrs(&old),
        "[[change_freeze]]\nstart = 2020-01-01T00:00:00Z\nend = 2099-01-01T00:00:00Z\nreason = \"holiday season\"\n",
    );
    let (code, out, err, _) = d
        .cli_async(&["apply", frozen.to_str().unwrap(), "-m", "declare the freeze"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let later = d.write("later.toml", &addrs(&old), &format!("[[change_freeze]]\nstart = 2020-01-01T00:00:00Z\nend = 2099-01-01T00:00:00Z\nreason = \"holiday season\"\n[pool.more]\nbackends = [\"{}\"]\n", old[0].addr));
    let (code, _, err, _) = d
        .cli_async(&["apply", later.to_str().unwrap(), "-m", "routine change"])
        .await;
    assert_eq!(code, 3);
    assert!(err.contains("holiday season"), "{err}");
    let (code, out, err, _) = d
        .cli_async(&["apply", later.to_str().unwrap(), "-m", "incident fix", "--emergency"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_moving_much_traffic_needs_confirm() {
    let old = backends(1).await;
    let d = Deployment::start(&addrs(&old), FAST_ROLLOUT).await;
    let report = load(d.addr(), "shop.example", "/cart", 2, Duration::from_millis(500), 400).await;
    assert!(report.ok > 50);
    // The candidate serves only /api: every recent request would get 404.
    let narrow = d.dir.join("narrow.toml");
    let source = std::fs::read_to_string(d.dir.join("safelb.toml"))
        .unwrap()
        .replace("name = \"r\"\n", "name = \"r\"\npath_prefix = \"/api\"\n");
    std::fs::write(&narrow, source).unwrap();
    let (code, out, _, _) = d.cli_async(&["plan", narrow.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("100.0%  p -> 404 (no route)"), "{out}");
    let (code, out, _, _) = d
        .cli_async(&["apply", narrow.to_str().unwrap(), "-m", "narrow the routes"])
        .await;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("moves 100.0% of recent traffic") && out.contains("--confirm"),
        "{out}"
    );
    assert_eq!(
        get(d.addr(), "shop.example", "/cart").await.status,
        200,
        "the running version still serves"
    );
}
