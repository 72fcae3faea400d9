//! [`Completion`]: what happens when a request's response ends, exactly once — the backend is
//! released, the upstream connection goes back to its pool if the body was read to the end, the
//! counters get the outcome, and the access-log line is written. Local answers (`local`) carry
//! one too.

use super::*;

/// A local answer: the status and short body for `err`, logged like any request.
pub(super) fn local(mut done: Box<Completion>, err: ProxyError) -> Response<ResponseBody> {
    let (status, text) = client_answer(&err);
    done.status = status.as_u16();
    done.error = Some(err.kind.as_str());
    let body = Bytes::from(format!(
        "{} {}: {text}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    ));
    let request_id = done.request_id.clone();
    let mut response = Response::new(ResponseBody::local(body, Some(done)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    response
}

/// An answer given without a backend (a redirect, a fixed response), logged like any request.
pub(super) fn answer(
    mut done: Box<Completion>,
    status: StatusCode,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Response<ResponseBody> {
    done.status = status.as_u16();
    let request_id = done.request_id.clone();
    let mut response = Response::new(ResponseBody::local(body, Some(done)));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    for (name, value) in headers {
        h.insert(name.clone(), value.clone());
    }
    h.insert(X_REQUEST_ID.clone(), request_id);
    response
}

/// `429 Too Many Requests` for a route over its rate limit, with `Retry-After`.
pub(super) fn rate_limited(
    done: Box<Completion>,
    route: &str,
    wait_secs: u64,
    actions: &RouteActions,
) -> Response<ResponseBody> {
    let body = Bytes::from(format!(
        "429 Too Many Requests: route `{route}` is rate limited; retry in {wait_secs} s\n"
    ));
    let mut response = answer(
        done,
        StatusCode::TOO_MANY_REQUESTS,
        &[(http::header::RETRY_AFTER, HeaderValue::from(wait_secs))],
        body,
    );
    actions.response_headers.apply(response.headers_mut());
    response
}

pub(super) fn finish(r: Result<Response<ResponseBody>, (ProxyError, Box<Completion>)>) -> Response<ResponseBody> {
    match r {
        Ok(response) => response,
        Err((err, done)) => local(done, err),
    }
}

/// What happens when a request's response ends: see the module doc.
pub(crate) struct Completion {
    pub(super) log: AccessLog,
    pub(super) conn: Arc<ConnState>,
    pub(super) start: Instant,
    pub(super) client: SocketAddr,
    /// The version serving this request; its counters get the outcome.
    pub(super) snapshot: Arc<Snapshot>,
    /// Served by the stable version after failing on the candidate.
    pub(super) fell_back: bool,
    pub(super) request_id: HeaderValue,
    pub(super) method: Method,
    pub(super) host: String,
    pub(super) path: String,
    pub(super) role: Role,
    pub(super) route: Option<Arc<str>>,
    /// Index of the route in the snapshot, for its counters.
    pub(super) route_idx: Option<usize>,
    pub(super) pool: Option<Arc<str>>,
    pub(super) pool_idx: Option<usize>,
    pub(super) backend: Option<Arc<BackendState>>,
    pub(super) backend_idx: Option<usize>,
    /// Whether `backend`'s in-flight count includes this request.
    pub(super) backend_in_flight: bool,
    pub(super) release: Option<Sender>,
    pub(super) upstream: Option<Duration>,
    pub(super) status: u16,
    /// Answered by the route itself (redirect, fixed answer): `Some(suspect)`, where a suspect
    /// answer of a candidate counts as its error whatever the status, and an intended one
    /// (tested, or unchanged from stable) never does.
    pub(super) route_answer: Option<bool>,
    pub(super) retries: u32,
    pub(super) error: Option<&'static str>,
    pub(super) bytes: u64,
    pub(super) complete: bool,
    /// Set when this attempt lost a race (hedge, fallback, rescue): its end then only gives
    /// back what it held, and the request is counted and logged by the attempt that answered.
    pub(super) quiet: Option<Arc<AtomicBool>>,
}

/// What a second attempt at the same client request starts from.
pub(super) struct Seed {
    log: AccessLog,
    conn: Arc<ConnState>,
    client: SocketAddr,
    start: Instant,
    request_id: HeaderValue,
    method: Method,
    host: String,
    path: String,
}

impl Seed {
    pub(super) fn start(self, snapshot: &Arc<Snapshot>, role: Role) -> Box<Completion> {
        let mut done = Completion::start(&self.log, self.client, self.conn, snapshot.clone(), role);
        done.start = self.start;
        done.request_id = self.request_id;
        done.method = self.method;
        done.host = self.host;
        done.path = self.path;
        done
    }
}

impl Completion {
    pub(super) fn start(
        log: &AccessLog,
        client: SocketAddr,
        conn: Arc<ConnState>,
        snapshot: Arc<Snapshot>,
        role: Role,
    ) -> Box<Completion> {
        conn.in_flight.fetch_add(1, Relaxed);
        snapshot.metrics.in_flight.fetch_add(1, Relaxed);
        Box::new(Completion {
            log: log.clone(),
            conn,
            start: Instant::now(),
            client,
            snapshot,
            fell_back: false,
            request_id: HeaderValue::from_static(""),
            method: Method::GET,
            host: String::new(),
            path: String::new(),
            role,
            route: None,
            route_idx: None,
            pool: None,
            pool_idx: None,
            backend: None,
            backend_idx: None,
            backend_in_flight: false,
            release: None,
            upstream: None,
            // Until a response exists, the client went away first (nginx's 499).
            status: 499,
            route_answer: None,
            retries: 0,
            error: None,
            bytes: 0,
            complete: false,
            quiet: None,
        })
    }

    pub(super) fn seed(&self) -> Seed {
        Seed {
            log: self.log.clone(),
            conn: self.conn.clone(),
            client: self.client,
            start: self.start,
            request_id: self.request_id.clone(),
            method: self.method.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
        }
    }

    /// Called by the response body when it ends or is dropped.
    pub(crate) fn finish(mut self: Box<Self>, bytes: u64, complete: bool) {
        self.bytes = bytes;
        self.complete = complete;
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(backend) = &self.backend {
            if self.backend_in_flight {
                backend.end_request();
            }
            if let Some(sender) = self.release.take() {
                if self.complete {
                    sender.checkin();
                }
            }
        }
        self.conn.in_flight.fetch_sub(1, Relaxed);
        let snapshot = &self.snapshot;
        snapshot.metrics.in_flight.fetch_sub(1, Relaxed);
        if self.quiet.as_ref().is_some_and(|q| q.load(Relaxed)) {
            return;
        }
        let elapsed = self.start.elapsed();
        let counters = match self.route_idx {
            Some(r) => {
                let per_backend = &snapshot.route_counters[r];
                &per_backend[self
                    .backend_idx
                    .unwrap_or(per_backend.len() - 1)
                    .min(per_backend.len() - 1)]
            }
            None => &snapshot.no_route,
        };
        counters.inc(self.status, self.role);
        if let Some(p) = self.pool_idx {
            snapshot.pools[p].durations[self.role as usize].observe(elapsed);
        }
        if self.status != 499 {
            let error = match self.route_answer {
                Some(suspect) => suspect && self.role == Role::Candidate,
                None => self.status >= 500,
            };
            snapshot.stats.record(error, elapsed);
        }
        if self.status >= 500 {
            snapshot.metrics.record_failed_client(self.client.ip());
        }
        if self.log.enabled() {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            self.log.write(&LogEntry {
                time: rfc3339_now(),
                request_id: self.request_id.to_str().unwrap_or(""),
                client: self.client,
                method: self.method.as_str(),
                host: &self.host,
                path: &self.path,
                route: self.route.as_deref(),
                pool: self.pool.as_deref(),
                backend: self.backend.as_ref().map(|b| &*b.label),
                status: self.status,
                bytes_sent: self.bytes,
                duration_ms: ms(self.start.elapsed()),
                upstream_ms: self.upstream.map(ms),
                retries: self.retries,
                error: self.error,
                complete: self.complete,
                config_version: self.snapshot.version,
                fell_back: self.fell_back,
            });
        }
    }
}
