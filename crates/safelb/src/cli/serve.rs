//! `safelb serve`: open the version store, decide which version serves (the store's running
//! version, or the config file on a first start), bind the listeners and the admin API, serve
//! until SIGTERM/SIGINT, then drain. A config file that differs from the running version, and
//! every SIGHUP, submit the file through the change pipeline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use safelb_config::ValidConfig;
use safelb_control::controller::{check_placed, recover, ApplyRequest, Startup};
use safelb_control::fleet::{cache, Fleet, FleetOptions};
use safelb_control::sqlite::SqliteStore;
use safelb_control::{Controller, StoreHandle};
use safelb_proxy::tls::CertResolver;
use safelb_proxy::{server, AccessLog, Proxy, ProxyHandle};
use safelb_testkit::TestBackend;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminListener, AdminState};
use axum::serve::ListenerExt;

/// How often TLS certificate and key files are checked for changes.
const CERT_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Where the admin API listens when the config has no `[admin]` table.
const DEFAULT_ADMIN: &str = "127.0.0.1:9090";

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The config file.
    #[arg(long, short)]
    config: PathBuf,
    /// Directory of the version store (SQLite) and the generated admin token.
    #[arg(long, default_value = "safelb-data")]
    store: PathBuf,
    /// Worker threads serving requests, each with its own runtime, listening sockets and upstream
    /// connections (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Also start built-in demo backends on every backend address of the config, to try safelb
    /// without servers of your own.
    #[arg(long)]
    demo_backends: bool,
    /// Fleet mode: etcd endpoints (`http://host:port`, comma-separated). The cluster's history
    /// in etcd is the truth; the config file only seeds an empty cluster.
    #[arg(long, requires_all = ["cluster", "instance"])]
    etcd: Option<String>,
    /// Fleet mode: the cluster's name (its keys live under `/safelb/NAME/`).
    #[arg(long, requires = "etcd")]
    cluster: Option<String>,
    /// Fleet mode: this instance's name, unique in the cluster.
    #[arg(long, requires = "etcd")]
    instance: Option<String>,
    /// Puts a listener of the config on another address on this instance: `NAME=ADDR`
    /// (repeatable; several instances can share a machine and a config).
    #[arg(long = "bind", value_name = "LISTENER=ADDR", value_parser = parse_bind)]
    binds: Vec<(String, SocketAddr)>,
    /// The admin API's address on this instance (instead of the config's `[admin] bind`).
    #[arg(long)]
    admin_bind: Option<SocketAddr>,
}

fn parse_bind(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected LISTENER=ADDR, e.g. public=127.0.0.1:8081"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("`{addr}` is not an address (ip:port): {e}"))?;
    Ok((name.to_string(), addr))
}

/// Where this instance differs from the config it shares: listener and admin addresses, and
/// its fleet.
#[derive(Default)]
pub struct Placement {
    pub binds: Vec<(String, SocketAddr)>,
    pub admin_bind: Option<SocketAddr>,
    pub fleet: Option<Arc<Fleet>>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_logging("info");
    let file_name = args.config.display().to_string();
    let source = std::fs::read_to_string(&args.config).with_context(|| format!("cannot read {file_name}"))?;
    let checked = safelb_config::check(&file_name, &source);
    if !checked.diagnostics.is_empty() {
        eprint!("{}", checked.diagnostics.render());
    }
    if let Some(c) = checked.config.as_ref() {
        if let Some((name, _)) = args.binds.iter().find(|(n, _)| !c.listeners.contains_key(n)) {
            eprintln!("safelb: --bind names listener `{name}`, which {file_name} does not have; nothing was started");
            return Ok(ExitCode::from(2));
        }
    }
    if args.etcd.is_some() {
        return run_in_fleet(args, file_name, source, checked.config.is_some());
    }
    let store = StoreHandle::new(SqliteStore::open(&args.store).context("opening the version store")?);
    let has_running = store
        .blocking(|s| s.running())
        .context("reading the version store")?
        .is_some();
    if checked.config.is_none() && !has_running {
        eprintln!("safelb: {file_name} is not valid and the store has no running version; nothing was started");
        return Ok(ExitCode::from(1));
    }
    let mut startup = store.blocking(|s| recover(s, &file_name, &source))?;
    startup.config.bind_overrides(&args.binds);
    let placement = Placement {
        binds: args.binds.clone(),
        admin_bind: args.admin_bind,
        fleet: None,
    };
    runtime()?.block_on(serve(args, source, startup, store, placement))
}

/// The main thread's runtime: data-plane worker 0 (the others get threads of their own, see
/// [`start`]), with the signals, health checks, certificate watches, start and drain.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn threads(args: &ServeArgs) -> usize {
    args.threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// Fleet mode's start: the cluster's running version from etcd (the file seeds an empty
/// cluster, and is never submitted at start), or, when etcd cannot be reached, the last
/// version this instance ran, from local disk.
fn run_in_fleet(args: ServeArgs, file_name: String, source: String, file_valid: bool) -> anyhow::Result<ExitCode> {
    let (Some(endpoints), Some(cluster), Some(instance)) =
        (args.etcd.clone(), args.cluster.clone(), args.instance.clone())
    else {
        bail!("--etcd needs --cluster and --instance");
    };
    std::fs::create_dir_all(&args.store).with_context(|| format!("creating {}", args.store.display()))?;
    let fleet = Arc::new(
        Fleet::new(FleetOptions {
            endpoints,
            cluster: cluster.clone(),
            instance: instance.clone(),
            cache_dir: args.store.clone(),
        })
        .context("the --etcd endpoints")?,
    );
    let from_etcd = match fleet.running_source() {
        Ok(Some((version, text))) => Some(Ok((version, text))),
        Ok(None) if file_valid => match fleet.seed(&file_name, &source) {
            Ok(version) => {
                let text = fleet.running_source().ok().flatten().map_or(source.clone(), |(_, t)| t);
                tracing::info!(
                    version,
                    cluster,
                    "the cluster had no history: seeded it from the config file"
                );
                Some(Ok((version, text)))
            }
            Err(e) => Some(Err(e)),
        },
        Ok(None) => {
            eprintln!(
                "safelb: cluster `{cluster}` has no history in etcd and {file_name} is not valid; nothing was started"
            );
            return Ok(ExitCode::from(1));
        }
        Err(e) => Some(Err(e)),
    };
    let checked = |version: u64, text: &str| check_placed(&format!("version {version}"), text, &args.binds);
    let (version, config) = match from_etcd.map(|r| r.map(|(v, text)| (v, checked(v, &text)))) {
        Some(Ok((version, c))) if c.config.is_some() => (version, c.config.expect("checked above")),
        other => {
            let why = match other {
                Some(Err(e)) => format!("etcd cannot be reached ({e})"),
                _ => "the running version in etcd does not pass check".to_string(),
            };
            let cached = match cache::load(&args.store, &cluster) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    eprintln!("safelb: {why}, and this instance has no version of cluster `{cluster}` on local disk; nothing was started");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => {
                    eprintln!("safelb: {why}, and {e}; nothing was started");
                    return Ok(ExitCode::from(1));
                }
            };
            match checked(cached.version, &cached.source).into_result() {
                Ok(c) => {
                    tracing::warn!(version = cached.version, %why, "serving the last known-good version from local disk");
                    (cached.version, c)
                }
                Err(d) => {
                    eprint!("{}", d.render());
                    eprintln!(
                        "safelb: {why}, and version {} on local disk does not pass check; nothing was started",
                        cached.version
                    );
                    return Ok(ExitCode::from(1));
                }
            }
        }
    };
    let store = StoreHandle::new(fleet.store()).for_instance(&instance);
    let startup = Startup {
        config,
        version,
        file_differs: false,
    };
    let placement = Placement {
        binds: args.binds.clone(),
        admin_bind: args.admin_bind,
        fleet: Some(fleet),
    };
    runtime()?.block_on(serve(args, source, startup, store, placement))
}

async fn serve(
    args: ServeArgs,
    file_source: String,
    startup: Startup,
    store: StoreHandle,
    placement: Placement,
) -> anyhow::Result<ExitCode> {
    // Before anything is announced: a SIGHUP or SIGTERM during start-up must not kill the
    // process with the default action.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let file_differs = startup.file_differs;
    let running = start(
        startup,
        store,
        &args.store,
        args.demo_backends,
        threads(&args),
        placement,
    )
    .await?;
    let file_name = args.config.display().to_string();
    if file_differs {
        submit(
            &running,
            &file_name,
            file_source,
            "startup",
            "the config file differs from the running version at start",
        );
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // File reads block: on the blocking pool, not on a worker serving requests.
                let certs = running.certs.clone();
                let path = args.config.clone();
                let read = tokio::task::spawn_blocking(move || {
                    for c in &certs {
                        // A bad new certificate is refused and logged; the old one keeps serving.
                        let _ = c.reload();
                    }
                    std::fs::read_to_string(&path)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match read {
                    Ok(source) => submit(&running, &file_name, source, "sighup", "SIGHUP: configuration file re-read"),
                    Err(e) => tracing::error!(file = %file_name, error = %e, "SIGHUP: cannot read the config file; nothing changes"),
                }
            }
        }
    }
    running.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// A running safelb: listeners, admin API, monitor; stopped (and drained) by [`Running::stop`].
pub struct Running {
    pub controller: Controller,
    /// The certificates of TLS listeners, reloaded on SIGHUP (and when their files change).
    pub certs: Vec<Arc<CertResolver>>,
    pub listeners: Vec<SocketAddr>,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    tracker: TaskTracker,
    drain_timeout: std::time::Duration,
    control: RuntimeThread,
    /// The data plane's worker threads; dropped (their connections closed) after the drain.
    workers: Vec<RuntimeThread>,
    _demo: Vec<Arc<TestBackend>>,
}

/// A thread running a current-thread runtime until dropped. The control plane has one: the
/// admin API, the monitor and every rollout run there, so a data plane saturated with traffic
/// cannot delay a rollback verdict, and a slow admin call cannot take a request's turn. Each
/// data-plane worker but the first (the main thread) has one too (`worker`: its index, see
/// `safelb_proxy::worker`).
struct RuntimeThread {
    handle: tokio::runtime::Handle,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeThread {
    fn start(name: String, worker: Option<usize>) -> anyhow::Result<RuntimeThread> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(index) = worker {
                    safelb_proxy::worker::enter(index);
                }
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                match runtime {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt.block_on(until.cancelled());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .with_context(|| format!("starting thread {name}"))?;
        let handle = rx
            .recv()
            .with_context(|| format!("thread {name} ended at start"))?
            .with_context(|| format!("starting the runtime of thread {name}"))?;
        Ok(RuntimeThread {
            handle,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds everything for the version `startup` chose and starts serving.
pub async fn start(
    startup: Startup,
    store: StoreHandle,
    store_dir: &Path,
    demo_backends: bool,
    threads: usize,
    placement: Placement,
) -> anyhow::Result<Running> {
    let config = startup.config;
    // Before any backend state exists: its idle connections are kept per worker.
    safelb_proxy::worker::set_workers(threads);
    let demo = if demo_backends {
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
    let mut certs = Vec::new();
    for l in config.listeners.values() {
        // Certificates first: a listener that cannot serve TLS must not bind.
        let tls = match &l.tls {
            None => None,
            Some(specs) => {
                let resolver = CertResolver::load(&l.name, specs).map_err(anyhow::Error::msg)?;
                let acceptor = resolver.acceptor().map_err(anyhow::Error::msg)?;
                certs.push(resolver);
                Some(acceptor)
            }
        };
        let group = server::bind_group(l.bind, threads)
            .with_context(|| format!("cannot bind listener `{}` on {}", l.name, l.bind))?;
        bound.push((l.name.clone(), group, tls));
    }
    let admin_bind: SocketAddr = placement.admin_bind.unwrap_or_else(|| {
        config
            .admin
            .as_ref()
            .map_or_else(|| DEFAULT_ADMIN.parse().expect("a valid address"), |a| a.bind)
    });
    let admin_config = config.admin.clone().unwrap_or(safelb_config::model::Admin {
        bind: admin_bind,
        token_file: None,
        tokens_file: None,
        tls: None,
        insecure: false,
    });
    // `check` refuses this for the config's own bind; `--admin-bind` must not get around it.
    if !admin_bind.ip().is_loopback() && admin_config.tls.is_none() && !admin_config.insecure {
        bail!(
            "the admin API would listen on {admin_bind}, reachable from other machines, without TLS: add `tls = {{ cert, key }}` to [admin], bind it to loopback, or set `insecure = true` in [admin] if a private network protects it"
        );
    }
    let admin_tls = match &admin_config.tls {
        None => None,
        Some(specs) => {
            let resolver = CertResolver::load("admin", specs).map_err(anyhow::Error::msg)?;
            let acceptor = resolver.acceptor_for(&[b"http/1.1"]).map_err(anyhow::Error::msg)?;
            certs.push(resolver);
            Some(acceptor)
        }
    };
    let admin_listener = tokio::net::TcpListener::bind(admin_bind)
        .await
        .with_context(|| format!("cannot bind the admin API on {admin_bind}"))?;
    let admin = admin_listener.local_addr()?;
    let store_path = store_dir.to_path_buf();
    let tokens = {
        let admin_config = admin_config.clone();
        tokio::task::spawn_blocking(move || admin_tokens(&admin_config, &store_path)).await??
    };
    tracing::info!(tokens = ?tokens.names(), tls = admin_tls.is_some(), "admin API tokens");
    let drain_timeout = config.limits.drain_timeout;

    let control = RuntimeThread::start("safelb-control".into(), None)?;
    // Worker 0 is the calling thread's runtime (with one thread, safelb is one thread serving
    // everything, as measured best); workers 1.. get threads of their own.
    safelb_proxy::worker::enter(0);
    let workers = (1..threads)
        .map(|i| RuntimeThread::start(format!("safelb-worker-{i}"), Some(i)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let worker_handles: Vec<tokio::runtime::Handle> = std::iter::once(tokio::runtime::Handle::current())
        .chain(workers.iter().map(|w| w.handle.clone()))
        .collect();
    let handle = ProxyHandle::new(config, startup.version);
    // The listeners are bound (connections queue in the backlog) but accept nothing until every
    // checked backend has its first verdict: a cold start must not send traffic to a backend
    // that would fail its first check.
    handle.first_verdicts().await;
    if let Some(fleet) = &placement.fleet {
        fleet.set_admin(admin.to_string());
    }
    let controller = Controller::placed(handle.clone(), store, placement.fleet.clone(), placement.binds.clone());
    let shutdown = CancellationToken::new();
    for c in &certs {
        c.watch(CERT_POLL, shutdown.clone());
    }
    let tracker = TaskTracker::new();
    let mut tasks = Vec::new();
    let mut listeners = Vec::new();
    for (name, group, tls) in bound {
        let addr = group[0].local_addr()?;
        tracing::info!(listener = %name, %addr, tls = tls.is_some(), threads, version = startup.version, "listening");
        listeners.push(addr);
        let proxy = Proxy::for_listener(handle.clone(), log.clone(), &name, tls.is_some());
        for (listener, worker) in group.into_iter().zip(&worker_handles) {
            let (proxy, tls, shutdown, tracker) = (proxy.clone(), tls.clone(), shutdown.clone(), tracker.clone());
            tasks.push(worker.spawn(async move {
                // Registered here, with this worker's reactor.
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => server::serve(l, proxy, tls, shutdown, tracker).await,
                    Err(e) => tracing::error!(error = %e, "a worker cannot register its listening socket"),
                }
            }));
        }
    }
    let mut state = AdminState::new(controller.clone(), tokens, admin_tls.is_some());
    state.runtimes = vec![("data", worker_handles), ("control", vec![control.handle.clone()])];
    state.log_dropped = log.dropped();
    let app = admin::app(state);
    let admin_shutdown = shutdown.clone();
    tasks.push(control.handle.spawn(async move {
        // `tap_io` (here doing nothing) is axum's way to hand a custom listener's peer address
        // to handlers as `ConnectInfo<SocketAddr>`: the failed-login limit is per address.
        let listener = match AdminListener::new(admin_listener, admin_tls) {
            Ok(l) => l.tap_io(|_| {}),
            Err(e) => {
                tracing::error!(error = %e, "admin API: cannot start its listener");
                return;
            }
        };
        let served = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move { admin_shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API stopped");
        }
    }));
    let monitor = safelb_control::monitor::Monitor::new(controller.clone(), Some(store_dir.join("postmortems")));
    tasks.push(control.handle.spawn(monitor.run(shutdown.clone())));
    if placement.fleet.is_some() {
        tasks.push(control.handle.spawn(controller.clone().run_fleet(shutdown.clone())));
    }
    tracing::info!(addr = %admin, store = %store_dir.display(), "admin API listening");
    Ok(Running {
        controller,
        certs,
        listeners,
        admin,
        shutdown,
        tasks,
        tracker,
        drain_timeout,
        control,
        workers,
        _demo: demo,
    })
}

impl Running {
    /// Stops accepting, lets requests in flight finish (up to the drain timeout), stops the rest.
    pub async fn stop(self) {
        tracing::info!(
            drain_timeout_ms = self.drain_timeout.as_millis() as u64,
            "shutting down: no new connections, draining requests in flight"
        );
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.tracker.close();
        let started = tokio::time::Instant::now();
        let drained = tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_ok();
        // Tunnels (WebSockets) share the same drain time, then the rest are closed.
        let left = self.drain_timeout.saturating_sub(started.elapsed());
        let tunnels = self.controller.handle().tunnels().open();
        let closed = self.controller.handle().tunnels().drain(left).await;
        self.controller.handle().shutdown();
        // What is still open on the workers closes with their runtimes.
        drop(self.workers);
        if drained && closed == 0 {
            tracing::info!(tunnels, "drained; exiting");
        } else {
            tracing::warn!(
                tunnels_closed = closed,
                "drain timeout reached; closing the remaining connections"
            );
        }
    }
}

/// Submits a config through the pipeline in the background (on the control runtime, where its
/// rollout then runs), logging the outcome.
fn submit(running: &Running, file_name: &str, source: String, origin: &str, reason: &str) {
    let req = ApplyRequest {
        source,
        file_name: file_name.to_owned(),
        author: origin.to_owned(),
        reason: reason.to_owned(),
        origin: origin.to_owned(),
        ..ApplyRequest::default()
    };
    let controller = running.controller.clone();
    running.control.handle.spawn(async move {
        match controller.apply(req).await {
            Ok(a) => tracing::info!(version = a.version, "configuration file submitted through the pipeline"),
            Err(e) => tracing::error!(error = %e, "configuration file refused; the running version keeps serving"),
        }
    });
}

/// The admin API's tokens: the named ones of `tokens_file`, or the one token of `token_file`
/// or of the store directory (see [`admin_token`]) named `admin` with role `operate`.
fn admin_tokens(admin: &safelb_config::model::Admin, store: &Path) -> anyhow::Result<admin::auth::Tokens> {
    match &admin.tokens_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin tokens file {}", path.display()))?;
            admin::auth::Tokens::parse(path, &text).map_err(anyhow::Error::msg)
        }
        None => Ok(admin::auth::Tokens::single(&admin_token(
            admin.token_file.as_deref(),
            store,
        )?)),
    }
}

/// The admin token: from `token_file` if the config names one, else generated once into the
/// store directory (readable by the owner only).
pub fn admin_token(configured: Option<&Path>, store: &Path) -> anyhow::Result<String> {
    if let Some(path) = configured {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading the admin token file {}", path.display()))?;
        let token = token.trim().to_string();
        if token.len() < 16 {
            bail!("the admin token in {} is shorter than 16 characters", path.display());
        }
        return Ok(token);
    }
    let path = store.join("admin.token");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if existing.trim().len() >= 16 {
            return Ok(existing.trim().to_string());
        }
    }
    // 24 bytes from the operating system's CSPRNG, as for session ids: the token is a secret.
    let token = crate::admin::session::secret_hex(24).map_err(anyhow::Error::msg)?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{token}")?;
    tracing::info!(path = %path.display(), "generated an admin token");
    Ok(token)
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

/// Logs to standard error at `SAFELB_LOG` (an `EnvFilter`), else at `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SAFELB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
