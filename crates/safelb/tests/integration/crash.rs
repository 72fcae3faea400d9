//! Crash safety of the version store: `safelb serve` killed with SIGKILL at seeded random
//! moments of an apply, of each rollout stage, at promotion and during a manual rollback; then
//! a full disk under the store and a store file that is not a store.
//!
//! After every kill the process is started again on the same store and must show: every
//! version whose apply (or rollback) was acknowledged is in the history, no version is left
//! pending, the running version is the newest one the history calls known-good or promoted,
//! it is at least the one that ran before the kill, and the traffic it answers carries that
//! version's marker header. `SAFELB_CRASH_RUNS` (default 12) and `SAFELB_CRASH_SEED` choose
//! how many kills and which moments; a failing run prints its seed and moment.
//!
//! The one setting changed is `step_bake = "1s"` (default 10 s): the test is about where in a
//! rollout the process dies, not about how long a step lasts, and a 40-second rollout per kill
//! would allow only a handful of kills. Everything else is the default a user gets.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use safelb_testkit::TestBackend;
use serde_json::{json, Value};

use crate::common::*;
use crate::lifecycle::{admin_port, free_port, signal, spawn_serve, tempdir, wait_exit, wait_for_log, Process};

/// A small seeded generator: the same seed picks the same moments on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Where in the change the process is killed.
#[derive(Clone, Copy, Debug)]
enum Moment {
    /// Within the first 30 ms after the apply request was sent (acknowledged or not).
    Apply,
    Preflight,
    Shadow,
    /// During canary step 0, 1 or 2 (5 %, 25 %, 100 %).
    Step(u64),
    /// Around the end of the last step's bake, when the promotion is written.
    Promotion,
    /// Within 500 ms after the promotion was seen (the history must keep it).
    Promoted,
    /// Within 20 ms after a manual rollback was sent, with no rollout running.
    Rollback,
}

const MOMENTS: [Moment; 9] = [
    Moment::Apply,
    Moment::Preflight,
    Moment::Shadow,
    Moment::Step(0),
    Moment::Step(1),
    Moment::Step(2),
    Moment::Promotion,
    Moment::Promoted,
    Moment::Rollback,
];

/// One `safelb serve` on one store, restarted after each kill.
struct Site {
    dir: PathBuf,
    port: u16,
    backend: String,
    process: Option<Process>,
}

impl Site {
    fn admin(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", admin_port(self.port)).parse().unwrap()
    }

    fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    /// A config whose one route marks every answer with `X-Config: marker`.
    fn source(&self, marker: &str) -> String {
        format!(
            "[listener.public]\nbind = \"127.0.0.1:{}\"\n[admin]\nbind = \"{}\"\n[rollout]\nstep_bake = \"1s\"\n\n[[route]]\nname = \"r\"\npool = \"p\"\nresponse_headers = {{ set = {{ \"X-Config\" = \"{marker}\" }} }}\n\n[pool.p]\nbackends = [\"{}\"]\n",
            self.port,
            self.admin(),
            self.backend
        )
    }

    fn start(&mut self) {
        let mut p = spawn_serve(&self.dir.join("safelb.toml"));
        wait_for_log(&mut p, "admin API listening", Duration::from_secs(20));
        self.process = Some(p);
    }

    fn kill(&mut self) {
        let mut p = self.process.take().expect("a running process");
        signal(&p, 9);
        let _ = p.0.wait();
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("store/admin.token")).expect("the admin token")
    }

    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        admin_call(self.admin(), &self.token(), method, path, body).await
    }

    async fn status(&self) -> Value {
        self.api("GET", "/status", None).await.expect("status answers").1
    }
}

fn marker_of(source: &str) -> String {
    let at = source.find("\"X-Config\" = \"").expect("every version has a marker") + 14;
    source[at..].split('"').next().unwrap_or_default().to_string()
}

/// Waits (bounded) until the rollout in progress matches `want`; returns the status then.
async fn wait_rollout(site: &Site, want: impl Fn(&Value) -> bool, limit: Duration) -> Option<Value> {
    wait_status(site, |st| want(&st["rollout"]), limit).await
}

/// Waits (bounded) until the status matches `want`; returns it.
async fn wait_status(site: &Site, want: impl Fn(&Value) -> bool, limit: Duration) -> Option<Value> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let st = site.status().await;
        if want(&st) {
            return Some(st);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_of_changes_loses_no_acknowledged_version() {
    let runs = env_u64("SAFELB_CRASH_RUNS", 12);
    let seed = env_u64("SAFELB_CRASH_SEED", 20_261_202);
    let mut rng = Rng(seed | 1);
    let backend = TestBackend::start("b").await;
    let mut site = Site {
        dir: tempdir(),
        port: free_port(),
        backend: backend.addr.to_string(),
        process: None,
    };
    std::fs::write(site.dir.join("safelb.toml"), site.source("start")).unwrap();
    site.start();
    let mut acked: Vec<u64> = Vec::new();
    let mut running_before = site.status().await["running"]["id"].as_u64().unwrap();
    let load = SteadyLoad::start(site.addr(), 4);
    let mut by_moment = std::collections::BTreeMap::<String, u64>::new();
    for run in 0..runs {
        // Every moment in turn (from a seeded start), each at a seeded offset within it.
        let mut moment = MOMENTS[((run + seed) % MOMENTS.len() as u64) as usize];
        if matches!(moment, Moment::Rollback) && running_before <= 1 {
            moment = Moment::Apply; // nothing known-good before the first version to go back to
        }
        let marker = format!("run-{run}");
        let source = site.source(&marker);
        // The operator's flow: edit the file, then apply it.
        std::fs::write(site.dir.join("safelb.toml"), &source).unwrap();
        let jitter = rng.below(1_000);
        let (admin, token) = (site.admin(), site.token());
        let ack = tokio::spawn(async move {
            let (path, body) = if matches!(moment, Moment::Rollback) {
                (
                    "/rollback",
                    json!({ "reason": "crash test rollback", "author": "crash" }),
                )
            } else {
                (
                    "/apply",
                    json!({ "source": source, "reason": format!("crash run {run}"), "author": "crash" }),
                )
            };
            admin_call(admin, &token, "POST", path, Some(body)).await
        });
        let sent = Instant::now();
        let reached = match moment {
            Moment::Apply | Moment::Rollback => {
                tokio::time::sleep(Duration::from_millis(jitter % 30)).await;
                true
            }
            Moment::Preflight => {
                let hit = wait_rollout(&site, |r| r["phase"] == "preflight", Duration::from_secs(10)).await;
                tokio::time::sleep(Duration::from_millis(jitter % 200)).await;
                hit.is_some()
            }
            Moment::Shadow => {
                let hit = wait_rollout(&site, |r| r["phase"] == "shadow", Duration::from_secs(15)).await;
                tokio::time::sleep(Duration::from_millis(jitter * 3)).await;
                hit.is_some()
            }
            Moment::Promoted => {
                let promoted = |st: &Value| st["running"]["id"].as_u64() > Some(running_before);
                let hit = wait_status(&site, promoted, Duration::from_secs(60)).await;
                tokio::time::sleep(Duration::from_millis(jitter / 2)).await;
                hit.is_some()
            }
            Moment::Step(k) => {
                let hit = wait_rollout(
                    &site,
                    |r| r["phase"] == "canary" && r["step"].as_u64() == Some(k),
                    Duration::from_secs(40),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(jitter)).await;
                hit.is_some()
            }
            Moment::Promotion => {
                let last = wait_rollout(
                    &site,
                    |r| r["phase"] == "canary" && r["step"].as_u64() == Some(2),
                    Duration::from_secs(40),
                )
                .await;
                if let Some(st) = &last {
                    // From 50 ms before the bake ends to 250 ms after it (the verdict and the
                    // store write follow the bake's end).
                    let r = &st["rollout"];
                    let ends = r["step_started_ms"].as_i64().unwrap_or(0) + r["step_bake_ms"].as_i64().unwrap_or(0);
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as i64;
                    let at = ends - 50 + (jitter % 300) as i64;
                    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now).max(0) as u64)).await;
                }
                last.is_some()
            }
        };
        site.kill();
        let acknowledged = match ack.await.expect("the request task") {
            Ok((202, body)) => body["version"].as_u64(),
            Ok((200, body)) => body["version"].as_u64(),
            _ => None,
        };
        acked.extend(acknowledged);
        let what = format!(
            "run {run} (seed {seed:#x}): {moment:?}, killed {} ms after the request (stage reached: {reached})",
            sent.elapsed().as_millis()
        );
        *by_moment.entry(format!("{moment:?}")).or_default() += 1;

        site.start();
        let started = Instant::now();
        // The data plane first, before a resubmitted file could reach any client (its shadow
        // stage alone lasts 3 s).
        let reply = get(site.addr(), "x", "/").await;
        let served_marker = reply
            .headers
            .get("x-config")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let st = site.status().await;
        let running = st["running"]["id"].as_u64().expect("a running version");
        let (_, versions) = site.api("GET", "/versions?limit=10000", None).await.unwrap();
        let versions = versions.as_array().expect("a list of versions").clone();
        let ids: Vec<u64> = versions.iter().filter_map(|v| v["id"].as_u64()).collect();
        for id in &acked {
            assert!(
                ids.contains(id),
                "{what}: acknowledged version {id} is missing: {ids:?}"
            );
        }
        // A version the restart itself submitted (the file differing) is pending, legitimately.
        let before_restart = versions
            .iter()
            .filter(|v| v["origin"] != "startup" || v["fate"] != "pending")
            .collect::<Vec<_>>();
        assert!(
            before_restart.iter().all(|v| v["fate"] != "pending"),
            "{what}: a version was left pending: {versions:#?}"
        );
        let newest_good = before_restart
            .iter()
            .filter(|v| v["fate"] == "known_good" || v["fate"] == "promoted")
            .filter_map(|v| v["id"].as_u64())
            .max();
        assert_eq!(
            Some(running),
            newest_good,
            "{what}: the running version is not the newest promoted one: {versions:#?}"
        );
        assert!(
            running >= running_before,
            "{what}: version {running_before} ran before the kill, {running} after"
        );
        let (_, record) = site.api("GET", &format!("/versions/{running}"), None).await.unwrap();
        let want = marker_of(record["source"].as_str().expect("the running version's source"));
        assert_eq!(
            served_marker, want,
            "{what}: traffic is not served by version {running}"
        );
        println!(
            "{what}: running {running_before} -> {running}, {} versions, checked {:?} after restart",
            ids.len(),
            started.elapsed()
        );
        running_before = running;
        // A rollout the restart submitted from the file is aborted, so the next run starts clean.
        if !st["rollout"].is_null()
            || wait_rollout(&site, |r| !r.is_null(), Duration::from_millis(300))
                .await
                .is_some()
        {
            let body = json!({ "reason": "crash test: back to the running version", "author": "crash" });
            let _ = site.api("POST", "/rollback", Some(body)).await;
        }
        std::fs::write(site.dir.join("safelb.toml"), record["source"].as_str().unwrap()).unwrap();
    }
    let report = load.finish().await;
    println!(
        "{runs} kills by moment: {by_moment:?}; {} acknowledged versions kept; load: {} requests, {} failed (a killed proxy refuses connections)",
        acked.len(),
        report.total(),
        report.failed()
    );
}

/// A directory on a small filesystem of its own (tmpfs), unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(at.to_path_buf())
    }

    /// Writes a file until the filesystem is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        for _ in 0..100_000 {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        // Fill the last partial block too.
        while f.write_all(&[0u8; 512]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_store_fails_apply_clearly_and_keeps_serving() {
    let backend = TestBackend::start("b").await;
    let dir = tempdir();
    let disk = SmallDisk::mount(&dir.join("store"), "4m");
    let mut site = Site {
        dir: dir.clone(),
        port: free_port(),
        backend: backend.addr.to_string(),
        process: None,
    };
    std::fs::write(dir.join("safelb.toml"), site.source("one")).unwrap();
    site.start();
    let filler = disk.fill();

    let source = site.source("two");
    let apply = json!({ "source": source, "reason": "on a full disk", "author": "ops" });
    let (status, body) = site.api("POST", "/apply", Some(apply.clone())).await.unwrap();
    println!("apply on a full disk: {status} {body}");
    assert_eq!(status, 507, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains("full"), "the error says the disk is full: {message}");
    // The running version keeps serving, unchanged.
    for _ in 0..20 {
        let r = get(site.addr(), "x", "/").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-config"], "one");
    }
    let st = site.status().await;
    assert_eq!(st["running"]["id"], 1, "{st}");
    assert!(st["rollout"].is_null(), "no rollout started: {st}");

    // With room again, the same apply goes through.
    std::fs::remove_file(filler).unwrap();
    let (status, body) = site.api("POST", "/apply", Some(apply)).await.unwrap();
    assert_eq!(status, 202, "{body}");
    site.kill();
    drop(disk);
}

#[test]
fn a_store_file_that_is_not_a_store_stops_serve_with_a_clear_message() {
    for (what, damage) in [
        (
            "garbage",
            b"this is not a database, it was overwritten by accident\n".repeat(200),
        ),
        ("truncated", Vec::new()),
    ] {
        let dir = tempdir();
        let port = free_port();
        let config = dir.join("safelb.toml");
        std::fs::write(
            &config,
            format!("[listener.public]\nbind = \"127.0.0.1:{port}\"\n[admin]\nbind = \"127.0.0.1:{}\"\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:9\"]\n", admin_port(port)),
        )
        .unwrap();
        // A real store first, then damaged: overwritten, or cut in the middle of a page.
        let store = dir.join("store");
        let mut p = spawn_serve(&config);
        wait_for_log(&mut p, "admin API listening", Duration::from_secs(20));
        // A clean stop checkpoints the journal into the file, so the damage below hits data.
        signal(&p, 15);
        assert_eq!(wait_exit(&mut p, Duration::from_secs(20)), Some(0));
        let db = store.join("safelb.db");
        let bytes = if what == "truncated" {
            let full = std::fs::read(&db).unwrap();
            full[..full.len() / 2 + 100].to_vec()
        } else {
            damage
        };
        std::fs::write(&db, bytes).unwrap();

        let out = Command::new(safelb_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--store")
            .arg(&store)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("serve on a {what} store: exit {:?}\n{stderr}", out.status.code());
        assert_eq!(out.status.code(), Some(2), "{what}: exit 2, an error: {stderr}");
        assert!(
            stderr.contains(&db.display().to_string()),
            "{what}: names the file: {stderr}"
        );
        assert!(
            stderr.contains("not a safelb version store") || stderr.contains("damaged"),
            "{what}: says what is wrong: {stderr}"
        );
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{what}: nothing listens"
        );
    }
}
