//! The admin API: JSON under `/api/v1/`, bearer-token auth on everything but `/healthz`.
//!
//! `app(state)` returns the router, so tests can drive it without a port. Every error is JSON
//! `{"error": "..."}` with a message a person can act on; each outcome has one status code.

pub mod auth;
mod listener;
pub use listener::AdminListener;
mod dashboard;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use auth::Caller;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use safelb_control::controller::ApplyRequest;
use safelb_control::store::StoreError;
use safelb_control::{ApplyError, Controller, RollbackError};
use serde::Deserialize;
use serde_json::json;

#[derive(Clone)]
pub struct AdminState {
    pub controller: Controller,
    /// The bearer tokens `/api/v1` calls may carry (or a dashboard session instead).
    pub tokens: Arc<auth::Tokens>,
    pub sessions: Arc<session::Sessions>,
    pub failures: Arc<auth::Failures>,
    /// Whether the admin listener is served over TLS (session cookies get `Secure`).
    pub tls: bool,
    /// The process's runtimes by name (the data plane has one per worker), whose live task
    /// counts `/metrics` reports (a leak of tasks shows as a count that only grows).
    pub runtimes: Vec<(&'static str, Vec<tokio::runtime::Handle>)>,
    /// Access-log lines dropped because the log's writer fell behind (`AccessLog::dropped`).
    pub log_dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl AdminState {
    pub fn new(controller: Controller, tokens: auth::Tokens, tls: bool) -> AdminState {
        AdminState {
            controller,
            tokens: Arc::new(tokens),
            sessions: Arc::default(),
            failures: Arc::default(),
            tls,
            runtimes: Vec::new(),
            log_dropped: Arc::default(),
        }
    }
}

pub fn app(state: AdminState) -> Router {
    let api = Router::new()
        .route("/status", get(status))
        .route("/versions", get(versions))
        .route("/versions/{id}", get(version))
        .route("/diff", get(diff))
        .route("/plan", post(plan))
        .route("/apply", post(apply))
        .route("/rollback", post(rollback))
        .route("/rollouts/{id}", get(rollout))
        .route("/events", get(events))
        .route("/incidents", get(incidents))
        .route("/incidents/{id}", get(incident))
        .route("/incidents/{id}/postmortem", get(postmortem))
        .route("/backends/{addr}/drain", post(drain))
        .route("/backends/{addr}/undrain", post(undrain))
        .route("/stream", get(dashboard::stream))
        .route("/stats", get(dashboard::stats))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .merge(dashboard::pages())
        .with_state(state)
}

/// Prometheus text format; unauthenticated, like `/healthz`, so scrapers need no secret.
async fn metrics(State(s): State<AdminState>) -> Response {
    let mut e = match s.controller.fleet() {
        Some(f) => safelb_proxy::exposition::Exposition::labelled("instance", f.instance()),
        None => safelb_proxy::exposition::Exposition::default(),
    };
    safelb_proxy::exposition::render(s.controller.handle(), &mut e);
    s.controller.render_metrics(&mut e);
    e.family(
        "safelb_admin_auth_failures_total",
        "counter",
        "Admin API authentications that failed (missing or wrong token), and attempts refused unchecked (429) after too many failures from one address.",
    );
    e.family(
        "safelb_runtime_tasks",
        "gauge",
        "Tasks alive on each of safelb's runtimes (data: the proxy's workers together, health checks with the first; control: admin API, monitor, rollouts).",
    );
    for (name, runtimes) in &s.runtimes {
        let alive: usize = runtimes.iter().map(|rt| rt.metrics().num_alive_tasks()).sum();
        e.sample("safelb_runtime_tasks", &[("runtime", name)], alive as f64);
    }
    e.family(
        "safelb_access_log_dropped_total",
        "counter",
        "Access-log lines dropped because the log's writer fell behind (traffic is never slowed for the log).",
    );
    e.sample(
        "safelb_access_log_dropped_total",
        &[],
        s.log_dropped.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    for (result, n) in [("failed", &s.failures.failed), ("limited", &s.failures.limited)] {
        e.sample(
            "safelb_admin_auth_failures_total",
            &[("result", result)],
            n.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        e.finish(),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn store_error(e: StoreError) -> Response {
    let status = match e {
        StoreError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
        StoreError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

async fn status(State(s): State<AdminState>) -> Response {
    match s.controller.status().await {
        Ok(st) => Json(st).into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn versions(State(s): State<AdminState>, Query(q): Query<Limit>) -> Response {
    match s.controller.versions(q.limit.unwrap_or(100)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => store_error(e),
    }
}

async fn version(State(s): State<AdminState>, Path(id): Path<u64>) -> Response {
    match s.controller.version(id).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("version {id} does not exist")),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct DiffQuery {
    from: u64,
    to: u64,
}

async fn diff(State(s): State<AdminState>, Query(q): Query<DiffQuery>) -> Response {
    match s.controller.diff(q.from, q.to).await {
        Ok(Some(d)) => Json(json!({ "from": q.from, "to": q.to, "diff": d })).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("version {} or {} does not exist", q.from, q.to),
        ),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct PlanBody {
    source: String,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    confirm: bool,
}

async fn plan(State(s): State<AdminState>, Json(b): Json<PlanBody>) -> Response {
    let file = b.file.unwrap_or_else(|| "candidate.toml".into());
    Json(s.controller.plan(&file, &b.source, b.confirm).await).into_response()
}

#[derive(Deserialize)]
struct ApplyBody {
    source: String,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    author: Option<String>,
    #[serde(default)]
    skip_preflight: bool,
    #[serde(default)]
    skip_shadow: bool,
    #[serde(default)]
    confirm: bool,
    #[serde(default)]
    emergency: bool,
}

async fn apply(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Json(b): Json<ApplyBody>,
) -> Response {
    if b.reason.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "a reason is required: say why this change is made (-m \"...\")",
        );
    }
    let req = ApplyRequest {
        source: b.source,
        file_name: b.file.unwrap_or_else(|| "candidate.toml".into()),
        author: caller.author(b.author.as_deref()),
        reason: b.reason,
        origin: "apply".into(),
        skip_preflight: b.skip_preflight,
        skip_shadow: b.skip_shadow,
        confirm: b.confirm,
        emergency: b.emergency,
    };
    match s.controller.apply(req).await {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(e @ ApplyError::Busy(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ ApplyError::Frozen { .. }) => error(StatusCode::LOCKED, e.to_string()),
        Err(ApplyError::Invalid { version, rendered, diagnostics }) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": format!("version {version} is not a valid config"), "version": version, "rendered": rendered, "diagnostics": diagnostics })),
        )
            .into_response(),
        Err(e @ ApplyError::NotSwappable { .. }) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(ApplyError::Store(e)) => store_error(e),
    }
}

#[derive(Deserialize)]
struct RollbackBody {
    #[serde(default)]
    to: Option<u64>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    author: Option<String>,
}

async fn rollback(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Json(b): Json<RollbackBody>,
) -> Response {
    if b.reason.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "a reason is required: say why you roll back (-m \"...\")",
        );
    }
    let author = caller.author(b.author.as_deref());
    match s.controller.rollback(b.to, &author, &b.reason).await {
        Ok(done) => Json(done).into_response(),
        Err(e @ (RollbackError::NoTarget(_) | RollbackError::UnknownVersion(_))) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e @ RollbackError::Unservable(..)) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(RollbackError::Store(e)) => store_error(e),
    }
}

async fn rollout(State(s): State<AdminState>, Path(id): Path<u64>) -> Response {
    match s.controller.rollout_view(id) {
        Some(r) => Json(r).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no rollout of version {id} since this process started"),
        ),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn events(State(s): State<AdminState>, Query(q): Query<EventsQuery>) -> Response {
    match s.controller.events(q.after.unwrap_or(0), q.limit.unwrap_or(1000)).await {
        Ok(e) => Json(e).into_response(),
        Err(e) => store_error(e),
    }
}

async fn drain(state: State<AdminState>, caller: Extension<Caller>, addr: Path<String>) -> Response {
    set_draining(state, caller, addr, true).await
}

async fn undrain(state: State<AdminState>, caller: Extension<Caller>, addr: Path<String>) -> Response {
    set_draining(state, caller, addr, false).await
}

async fn set_draining(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(addr): Path<String>,
    draining: bool,
) -> Response {
    let Ok(parsed) = addr.parse::<SocketAddr>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{addr}` is not an IP:port backend address"),
        );
    };
    if s.controller.set_draining(parsed, draining, &caller.name).await {
        Json(json!({ "backend": addr, "draining": draining })).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("no backend {addr} in the running config"),
        )
    }
}

async fn incidents(State(s): State<AdminState>, Query(q): Query<Limit>) -> Response {
    match s.controller.incidents(q.limit.unwrap_or(100)).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => store_error(e),
    }
}

async fn incident(State(s): State<AdminState>, Path(id): Path<u64>) -> Response {
    match s.controller.incident(id).await {
        Ok(Some(i)) => Json(i).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("incident {id} does not exist")),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct PostmortemQuery {
    format: Option<String>,
}

async fn postmortem(State(s): State<AdminState>, Path(id): Path<u64>, Query(q): Query<PostmortemQuery>) -> Response {
    let incident = match s.controller.incident(id).await {
        Ok(Some(i)) => i,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("incident {id} does not exist")),
        Err(e) => return store_error(e),
    };
    if incident.resolved_ms.is_none() {
        return error(
            StatusCode::CONFLICT,
            format!("incident {id} is still open: its postmortem is written when it resolves"),
        );
    }
    match q.format.as_deref().unwrap_or("md") {
        "md" => (
            [(axum::http::header::CONTENT_TYPE, "text/markdown; charset=utf-8")],
            safelb_control::postmortem::markdown(&incident),
        )
            .into_response(),
        "json" => Json(incident).into_response(),
        other => error(
            StatusCode::BAD_REQUEST,
            format!("unknown format `{other}`: use md or json"),
        ),
    }
}
