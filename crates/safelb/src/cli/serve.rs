//! `safelb serve`: load and check the config, bind the listeners, serve until SIGTERM/SIGINT,
//! then drain. SIGHUP re-reads the config file: a valid one replaces the running version, an
//! invalid one is refused with its diagnostics and changes nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use safelb_config::ValidConfig;
use safelb_proxy::{server, AccessLog, Proxy, ProxyHandle};
use safelb_testkit::TestBackend;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The config file.
    #[arg(long, short)]
    config: PathBuf,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Also start built-in demo backends on every backend address of the config, to try safelb
    /// without servers of your own.
    #[arg(long)]
    demo_backends: bool,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let config = match load(&args.config) {
        Ok(c) => c,
        Err(rendered) => {
            eprint!("{rendered}");
            return Ok(ExitCode::from(1));
        }
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .thread_name("safelb-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, config, threads))
}

/// Reads and checks a config file; on failure returns the rendered diagnostics.
fn load(path: &Path) -> Result<ValidConfig, String> {
    let source = std::fs::read_to_string(path).map_err(|e| format!("safelb: cannot read {}: {e}\n", path.display()))?;
    let checked = safelb_config::check(&path.display().to_string(), &source);
    if !checked.diagnostics.is_empty() {
        eprint!("{}", checked.diagnostics.render());
    }
    checked
        .into_result()
        .map_err(|_| format!("safelb: {} is not valid; nothing was started\n", path.display()))
}

async fn serve(args: ServeArgs, config: ValidConfig, threads: usize) -> anyhow::Result<ExitCode> {
    // Before anything is announced: a SIGHUP or SIGTERM during start-up must not kill the
    // process with the default action.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let _demo = if args.demo_backends {
        start_demo_backends(&config).await?
    } else {
        Vec::new()
    };
    let log = match (&config.access_log.enabled, &config.access_log.path) {
        (false, _) => AccessLog::disabled(),
        (true, None) => AccessLog::stdout(),
        (true, Some(p)) => AccessLog::file(p).with_context(|| format!("opening the access log {}", p.display()))?,
    };
    let mut bound = Vec::new();
    for l in config.listeners.values() {
        let listener =
            server::bind(l.bind).with_context(|| format!("cannot bind listener `{}` on {}", l.name, l.bind))?;
        bound.push((l.name.clone(), l.bind, listener));
    }
    let drain_timeout = config.limits.drain_timeout;
    let mut version = 1;
    let handle = ProxyHandle::new(config, version);
    let proxy = Proxy::new(handle.clone(), log);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for (name, addr, listener) in bound {
        tracing::info!(listener = %name, %addr, threads, "listening");
        accept_loops.push(tokio::spawn(server::serve(
            listener,
            proxy.clone(),
            shutdown.clone(),
            tracker.clone(),
        )));
    }

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                match load(&args.config) {
                    Err(why) => tracing::error!(reason = %why.trim(), "SIGHUP: config refused; the running version keeps serving"),
                    Ok(next) => match handle.swap(next, version + 1) {
                        Ok(_) => version += 1,
                        Err(e) => tracing::error!(error = %e, "SIGHUP: config refused; the running version keeps serving"),
                    },
                }
            }
        }
    }

    tracing::info!(
        drain_timeout_ms = drain_timeout.as_millis() as u64,
        "shutting down: no new connections, draining requests in flight"
    );
    shutdown.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    tracker.close();
    let drained = tokio::time::timeout(drain_timeout, tracker.wait()).await.is_ok();
    handle.shutdown();
    if drained {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("drain timeout reached; closing the remaining connections");
    }
    Ok(ExitCode::SUCCESS)
}

async fn start_demo_backends(config: &ValidConfig) -> anyhow::Result<Vec<Arc<TestBackend>>> {
    let mut started = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for pool in &config.pools {
        for b in &pool.backends {
            if !b.addr.ip().is_loopback() {
                bail!(
                    "--demo-backends only starts backends on loopback, and {} is not",
                    b.addr
                );
            }
            if seen.insert(b.addr) {
                let name = format!("{}-{}", pool.name, b.addr.port());
                let backend = TestBackend::start_on(b.addr, &name)
                    .await
                    .with_context(|| format!("starting a demo backend on {}", b.addr))?;
                tracing::info!(addr = %b.addr, name, "demo backend started");
                started.push(Arc::new(backend));
            }
        }
    }
    Ok(started)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SAFELB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
