//! The `safelb serve` process: graceful shutdown with a request in flight, SIGHUP reloads,
//! refusal of an invalid config at start.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use safelb_testkit::{Behavior, TestBackend};

use crate::common::*;

pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        // Only the process this test started, by its pid.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn write_config(dir: &std::path::Path, port: u16, backend: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("safelb.toml");
    // The admin port is derived from the listener's so that rewrites keep it.
    std::fs::write(
        &path,
        format!(
            "[listener.public]\nbind = \"127.0.0.1:{port}\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n[limits]\ndrain_timeout = \"5s\"\n[access_log]\nenabled = false\n[rollout]\ncanary_steps = [50, 100]\nstep_bake = \"200ms\"\nmin_requests = 1\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"{backend}\"]\n{extra}",
            admin = admin_port(port)
        ),
    )
    .unwrap();
    path
}

/// The admin port paired with a listener port in these tests.
pub fn admin_port(port: u16) -> u16 {
    ADMIN_PORTS
        .lock()
        .unwrap()
        .entry(port)
        .or_insert_with(free_port)
        .to_owned()
}

static ADMIN_PORTS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u16, u16>>> =
    std::sync::LazyLock::new(Default::default);

pub fn spawn_serve(config: &std::path::Path) -> Process {
    let store = config
        .parent()
        .expect("config files live in a test directory")
        .join("store");
    let child = Command::new(safelb_bin())
        .args(["serve", "--config"])
        .arg(config)
        .arg("--store")
        .arg(store)
        .env("SAFELB_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting safelb serve");
    Process(child)
}

/// Lines a process wrote to standard error so far.
type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Standard-error lines of the processes tests started, by pid, read by one thread each.
static LOGS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u32, Lines>>> =
    std::sync::LazyLock::new(Default::default);

/// Waits until the process has logged a line containing `needle` (bounded); returns the lines.
pub fn wait_for_log(p: &mut Process, needle: &str, limit: Duration) -> Vec<String> {
    let lines = {
        let mut logs = LOGS.lock().unwrap();
        logs.entry(p.0.id())
            .or_insert_with(|| {
                let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
                let stderr = p.0.stderr.take().expect("stderr is piped");
                let sink = lines.clone();
                // Keeps draining for the process's life, so it never blocks on a full pipe.
                std::thread::spawn(move || {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        sink.lock().unwrap().push(line);
                    }
                });
                lines
            })
            .clone()
    };
    let deadline = Instant::now() + limit;
    loop {
        {
            let seen = lines.lock().unwrap();
            if seen.iter().any(|l| l.contains(needle)) {
                return seen.clone();
            }
            if Instant::now() >= deadline {
                panic!("`{needle}` not logged within {limit:?}: {seen:#?}");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(p: &Process, sig: i32) {
    let rc = unsafe_free_kill(p.0.id(), sig);
    assert_eq!(rc, 0, "kill failed");
}

/// `kill(2)` through the `kill` command, keeping the test crate free of unsafe code.
fn unsafe_free_kill(pid: u32, sig: i32) -> i32 {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.code().unwrap_or(1))
        .unwrap_or(1)
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let slow = TestBackend::start("slow").await;
    slow.set(Behavior::Delay(Duration::from_millis(1500)));
    let dir = tempdir();
    let port = free_port();
    let cfg = write_config(&dir, port, &slow.addr.to_string(), "response_timeout = \"10s\"\n");
    let mut p = spawn_serve(&cfg);
    wait_for_log(&mut p, "listening", Duration::from_secs(10));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let in_flight = tokio::spawn(async move { get(addr, "x", "/").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&p, 15);
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200, "the request in flight completed: {reply:?}");
    assert_eq!(reply.backend(), "slow");
    let exited = wait_exit(&mut p, Duration::from_secs(5));
    assert_eq!(exited, Some(0));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no new connections after shutdown"
    );
}

/// A WebSocket open at SIGTERM is a connection in flight too: it keeps working through the
/// drain (`drain_timeout = "5s"` here), is closed at its end, and serve then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_websockets_then_closes_them_at_the_drain_timeout() {
    use futures_util::StreamExt;
    let backend = TestBackend::start("ws").await;
    let dir = tempdir();
    let port = free_port();
    let cfg = write_config(&dir, port, &backend.addr.to_string(), "");
    let mut p = spawn_serve(&cfg);
    wait_for_log(&mut p, "admin API listening", Duration::from_secs(10));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut ws = crate::protocols::ws_connect(addr).await;
    assert_eq!(crate::protocols::echo(&mut ws, "before").await, "ws: before");
    let term = Instant::now();
    signal(&p, 15);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        crate::protocols::echo(&mut ws, "draining").await,
        "ws: draining",
        "the tunnel works during the drain"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let closed_after = term.elapsed();
    assert!(
        matches!(
            end,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))))
        ),
        "the tunnel was still open 10 s into a 5 s drain: {end:?}"
    );
    assert!(
        closed_after >= Duration::from_millis(4500) && closed_after < Duration::from_secs(8),
        "closed {closed_after:?} after SIGTERM"
    );
    assert_eq!(wait_exit(&mut p, Duration::from_secs(5)), Some(0));
    let log = wait_for_log(&mut p, "drain timeout reached", Duration::from_secs(1));
    // The log's fields are coloured: compare the text without its escape sequences.
    let plain = |l: &String| {
        let mut out = String::new();
        let mut escape = false;
        for c in l.chars() {
            match (escape, c) {
                (false, '\u{1b}') => escape = true,
                (true, 'm') => escape = false,
                (false, c) => out.push(c),
                _ => {}
            }
        }
        out
    };
    assert!(
        log.iter().map(plain).any(|l| l.contains("tunnels_closed=1")),
        "{log:#?}"
    );
}

#[tokio::test]
async fn sighup_applies_a_valid_config_and_refuses_an_invalid_one() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = tempdir();
    let port = free_port();
    let cfg = write_config(&dir, port, &a.addr.to_string(), "");
    let mut p = spawn_serve(&cfg);
    wait_for_log(&mut p, "listening", Duration::from_secs(10));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(get(addr, "x", "/").await.backend(), "a");

    // An invalid file changes nothing.
    std::fs::write(
        &cfg,
        "[listener.public]\nbind = \"127.0.0.1:1\"\n[pool.p]\nbackends = []\n",
    )
    .unwrap();
    signal(&p, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(addr, "x", "/").await.backend(), "a");

    write_config(&dir, port, &b.addr.to_string(), "");
    signal(&p, 1);
    let mut client = Client::connect(addr).await;
    let mut moved = false;
    // Through the pipeline: preflight, then 50% and 100% steps of 200 ms each.
    for _ in 0..250 {
        if client.get("x", "/").await.unwrap().backend() == "b" {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "SIGHUP with a valid config moves traffic to the new pool");
}

/// Workers share a listener's port (`SO_REUSEPORT`); that must not let a second process join a
/// port the first serves and take half its connections. It is refused as a plain bind would be.
#[tokio::test]
async fn a_second_instance_on_a_served_port_is_refused_and_the_first_keeps_serving() {
    let be = TestBackend::start("be").await;
    let dir = tempdir();
    let port = free_port();
    let cfg = write_config(&dir, port, &be.addr.to_string(), "");
    let mut first = spawn_serve(&cfg);
    wait_for_log(&mut first, "admin API listening", Duration::from_secs(10));
    let out = Command::new(safelb_bin())
        .args(["serve", "--threads", "2", "--config"])
        .arg(&cfg)
        .arg("--store")
        .arg(dir.join("store-2"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot bind listener `public` on 127.0.0.1:{port}")) && stderr.contains("in use"),
        "{stderr}"
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..20 {
        let reply = get(addr, "x", "/").await;
        assert_eq!((reply.status, reply.backend()), (200, "be"), "{reply:?}");
    }
}

#[test]
fn serve_refuses_an_invalid_config_and_binds_nothing() {
    let dir = tempdir();
    let port = free_port();
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        format!("[listener.public]\nbind = \"127.0.0.1:{port}\"\n[[route]]\nname = \"r\"\npool = \"missing\"\n"),
    )
    .unwrap();
    let out = Command::new(safelb_bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("undefined-pool"), "{stderr}");
    assert!(stderr.contains("nothing was started"), "{stderr}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens"
    );
}

pub fn wait_exit(p: &mut Process, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = p.0.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A fresh directory under the target dir's tmp (removed at the next run, never elsewhere).
pub fn tempdir() -> std::path::PathBuf {
    let dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("t-{}-{}", std::process::id(), fastrand_name()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fastrand_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}
