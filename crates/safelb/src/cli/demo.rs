//! `safelb demo`: the incident drill, on loopback, in well under a minute.
//!
//! It starts two healthy demo backends and one that accepts connections but never answers,
//! safelb in front of the healthy ones, and steady client traffic. Then it replays the outage
//! that safelb exists for: a change routing the pool to the backend that never answers — first
//! submitted normally (preflight rejects it, nothing is served), then forced with
//! `--skip-preflight` as the original change slipped through (the canary catches it, safelb
//! rolls back, an alert fires, an incident opens and resolves, the postmortem is written).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use safelb_control::controller::{recover, ApplyRequest};
use safelb_control::sqlite::SqliteStore;
use safelb_control::StoreHandle;
use safelb_testkit::{Behavior, TestBackend};

use super::serve;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Leave everything running after the drill (Ctrl-C to stop), with the URLs printed.
    #[arg(long)]
    keep_running: bool,
    /// Directory for the demo's config, version store and postmortem (default: a new temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn config(listen: u16, admin: u16, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"# Written by `safelb demo`.
[listener.public]
bind = "127.0.0.1:{listen}"

[admin]
bind = "127.0.0.1:{admin}"

[access_log]
enabled = false

[rollout]
canary_steps = [10, 50, 100]
step_bake = "3s"
min_requests = 10

[[route]]
name = "shop"
host = "shop.example"
pool = "shop"

[pool.shop]
balance = "round_robin"
backends = [{}]
response_timeout = "1s"
health = {{ path = "/healthz", interval = "1s", timeout = "500ms" }}

[[alert]]
name = "CanaryRolledBack"
kind = "rollback"
hold = "5s"
severity = "page"

[[alert]]
name = "HighErrorRate"
kind = "error_rate"
threshold = 0.02
window = "10s"
severity = "page"

[[alert]]
name = "ShopUnavailable"
kind = "no_healthy_backends"
pool = "shop"
severity = "page"

[[alert]]
name = "ErrorBudgetBurn"
kind = "burn_rate"
slo = 0.999
severity = "ticket"

[[test]]
request = "GET http://shop.example/cart"
expect_pool = "shop"
"#,
        list.join(", ")
    )
}

/// Client traffic the drill watches: what a user of the site would see.
struct Traffic {
    sent: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

async fn traffic(addr: SocketAddr, t: Arc<Traffic>) {
    use http_body_util::{BodyExt, Empty};
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>> = None;
    while !t.stop.load(Relaxed) {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            sender = match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await {
                    Ok((s, conn)) => {
                        tokio::spawn(conn);
                        Some(s)
                    }
                    Err(_) => None,
                },
                Err(_) => None,
            };
        }
        let ok = match sender.as_mut() {
            Some(s) => {
                let req = http::Request::get("/cart")
                    .header("host", "shop.example")
                    .body(Empty::new())
                    .expect("a valid request");
                match tokio::time::timeout(Duration::from_secs(5), async {
                    let _ = s.ready().await;
                    s.send_request(req).await
                })
                .await
                {
                    Ok(Ok(resp)) => {
                        let good = resp.status().as_u16() < 500;
                        let _ = resp.into_body().collect().await;
                        good
                    }
                    _ => false,
                }
            }
            None => false,
        };
        t.sent.fetch_add(1, Relaxed);
        if !ok {
            t.failed.fetch_add(1, Relaxed);
            sender = None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn say(step: &str, text: &str) {
    eprintln!("\r\x1b[2K");
    println!("== {step}");
    for line in text.lines() {
        println!("   {line}");
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    // The drill narrates; the operational log would drown it. SAFELB_LOG=info shows both.
    serve::init_logging("error");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(drill(args))
}

async fn drill(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("safelb-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let shop = [TestBackend::start("shop-1").await, TestBackend::start("shop-2").await];
    let silent = TestBackend::start("new-shop").await;
    silent.set(Behavior::Hang);
    let broken = TestBackend::start("shop-v2").await;
    broken.set(Behavior::HealthyButFailing(500));
    let (listen, admin) = (free_port()?, free_port()?);
    let good = config(listen, admin, &[shop[0].addr, shop[1].addr]);
    let bad = config(listen, admin, &[silent.addr]);
    let broken_change = config(listen, admin, &[broken.addr]);
    let file = dir.join("safelb.toml");
    std::fs::write(&file, &good)?;
    std::fs::write(dir.join("bad-change.toml"), &bad)?;
    std::fs::write(dir.join("new-release.toml"), &broken_change)?;

    let store_dir = dir.join("store");
    let store = StoreHandle::new(SqliteStore::open(&store_dir)?);
    let startup = store.blocking(|s| recover(s, &file.display().to_string(), &good))?;
    let running = serve::start(startup, store, &store_dir, false, 2, serve::Placement::default()).await?;
    let controller = running.controller.clone();
    let addr = running.listeners[0];
    say(
        "safelb demo: the incident drill",
        &format!(
            "A load balancer change once routed all traffic to backends that did not answer, and the\n\
             site was down until someone found the change and rolled it back by hand. Here it is again,\n\
             on this machine, with safelb in front.\n\n\
             safelb        http://{addr}  (admin and metrics http://{})\n\
             backends      shop-1 {}  shop-2 {}  (healthy)\n\
             new-shop      {}  accepts connections, never answers\n\
             shop-v2       {}  passes its health check, answers 500 to real requests\n\
             files         {}",
            running.admin,
            shop[0].addr,
            shop[1].addr,
            silent.addr,
            broken.addr,
            dir.display()
        ),
    );

    let t = Arc::new(Traffic {
        sent: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let clients: Vec<_> = (0..4).map(|_| tokio::spawn(traffic(addr, t.clone()))).collect();
    let progress_t = t.clone();
    let progress_c = controller.clone();
    let progress = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let routing = progress_c.handle().routing();
            let canary = routing.canary.as_ref().map_or("no rollout".to_string(), |c| {
                format!("canary: version {} at {}%", c.candidate.version, c.percent)
            });
            eprint!(
                "\r\x1b[2K   traffic: {} requests, {} failed | serving version {} | {canary}",
                progress_t.sent.load(Relaxed),
                progress_t.failed.load(Relaxed),
                routing.stable.version
            );
        }
    });

    tokio::time::sleep(Duration::from_secs(3)).await;
    say(
        "1. Healthy traffic",
        &format!(
            "{} requests so far, {} failed.",
            t.sent.load(Relaxed),
            t.failed.load(Relaxed)
        ),
    );

    let change = |skip: bool, reason: &str| ApplyRequest {
        source: bad.clone(),
        file_name: "bad-change.toml".into(),
        author: "demo-operator".into(),
        reason: reason.into(),
        origin: "apply".into(),
        skip_preflight: skip,
        skip_shadow: skip,
        ..ApplyRequest::default()
    };
    say(
        "2. The bad change, submitted normally",
        "$ safelb apply bad-change.toml -m \"move the shop to the new servers\"",
    );
    let failed_before = t.failed.load(Relaxed);
    let accepted = controller
        .apply(change(false, "move the shop to the new servers"))
        .await?;
    let verdict = wait_rollout(&controller, accepted.rollout).await;
    println!("   {verdict}");
    println!(
        "   -> rejected at preflight: the change served no request ({} failed requests).",
        t.failed.load(Relaxed) - failed_before
    );

    say(
        "3. A release that passes its health checks and breaks real requests",
        "$ safelb apply new-release.toml -m \"shop v2\"",
    );
    let failed_before = t.failed.load(Relaxed);
    let accepted = controller
        .apply(ApplyRequest {
            source: broken_change.clone(),
            file_name: "new-release.toml".into(),
            author: "demo-operator".into(),
            reason: "shop v2".into(),
            origin: "apply".into(),
            ..ApplyRequest::default()
        })
        .await?;
    let verdict = wait_rollout(&controller, accepted.rollout).await;
    println!("   {verdict}");
    println!(
        "   -> rejected at the shadow stage: {} copies reached shop-v2, no client was served by it ({} failed requests).",
        broken.shadow_hits(),
        t.failed.load(Relaxed) - failed_before
    );

    say(
        "4. The first change forced through, the way the original one slipped past review",
        "$ safelb apply bad-change.toml -m \"move the shop, preflight is flaky\" --skip-preflight --skip-shadow",
    );
    let accepted = controller
        .apply(change(true, "move the shop, preflight is flaky"))
        .await?;
    let verdict = wait_rollout(&controller, accepted.rollout).await;
    println!("   {verdict}");
    // The rollback alert fires on the next tick and holds 5 s; the incident resolves after it.
    let incident = wait_incident(&controller, Duration::from_secs(30)).await;

    t.stop.store(true, Relaxed);
    for c in clients {
        let _ = c.await;
    }
    progress.abort();
    let (sent, failed) = (t.sent.load(Relaxed), t.failed.load(Relaxed));
    let mut summary = format!(
        "{sent} client requests, {failed} failed, in {:.0}s.",
        started.elapsed().as_secs_f64()
    );
    let mut code = ExitCode::SUCCESS;
    match &incident {
        Some(i) => {
            let path = store_dir.join("postmortems").join(format!("incident-{}.md", i.id));
            let md = safelb_control::postmortem::markdown(i);
            let short: Vec<&str> = md
                .lines()
                .skip_while(|l| !l.starts_with("## Summary"))
                .skip(2)
                .take_while(|l| !l.is_empty())
                .collect();
            summary.push_str(&format!(
                "\nIncident #{}: {}\n\nPostmortem written by safelb: {}\n\n{}",
                i.id,
                i.title,
                path.display(),
                short.join("\n")
            ));
            summary.push_str(&format!(
                "\n\nRead it: safelb postmortem {} --admin http://{} --token-file {}",
                i.id,
                running.admin,
                store_dir.join("admin.token").display()
            ));
        }
        None => {
            summary.push_str("\nNo incident resolved within 30 s: this drill did not go as it should.");
            code = ExitCode::from(1);
        }
    }
    say("5. Totals", &summary);

    if args.keep_running {
        say(
            "Still running (Ctrl-C to stop)",
            &format!(
                "site       curl -H 'Host: shop.example' http://{addr}/cart\n\
                 metrics    http://{}/metrics\n\
                 CLI        export SAFELB_ADMIN=http://{} SAFELB_TOKEN_FILE={}\n\
                 \x20          safelb status; safelb history; safelb incidents",
                running.admin,
                running.admin,
                store_dir.join("admin.token").display()
            ),
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    running.stop().await;
    Ok(code)
}

async fn wait_rollout(controller: &safelb_control::Controller, id: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = 0;
    while Instant::now() < deadline {
        if let Some(r) = controller.rollout(id) {
            for line in &r.progress[printed..] {
                eprint!("\r\x1b[2K");
                println!("   {line}");
            }
            printed = r.progress.len();
            if r.phase.is_final() {
                return r.verdict.unwrap_or_default();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    "the rollout did not finish within 60 s".into()
}

async fn wait_incident(
    controller: &safelb_control::Controller,
    limit: Duration,
) -> Option<safelb_control::store::IncidentRecord> {
    let deadline = Instant::now() + limit;
    let mut announced = false;
    while Instant::now() < deadline {
        if let Ok(list) = controller.incidents(1).await {
            if let Some(i) = list.into_iter().next() {
                if !announced {
                    eprint!("\r\x1b[2K");
                    println!("   incident #{} opened: {}", i.id, i.title);
                    announced = true;
                }
                if i.resolved_ms.is_some() {
                    eprint!("\r\x1b[2K");
                    println!(
                        "   incident #{} resolved after {:.0}s",
                        i.id,
                        (i.resolved_ms.unwrap_or(0) - i.opened_ms) as f64 / 1000.0
                    );
                    return Some(i);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}
