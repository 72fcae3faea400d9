//! Requests that another version may have to answer: candidate requests (fallback on failure,
//! hedge to stable after the candidate's delay, rescue when the candidate is rolled back),
//! stable requests waiting on a version a manual rollback replaced, and the copies of the
//! shadow stage.

use super::*;

impl Proxy {
    /// A request whose version was rolled back (put back by `safelb rollback`) while it waited
    /// for a response head: a bodiless idempotent one is sent again through the version that
    /// serves now; another gets an immediate answer naming the rollback.
    pub(super) async fn rescue(
        &self,
        retired: &Snapshot,
        request: &mut Option<Request<RequestBody>>,
        client: SocketAddr,
        mut done: Box<Completion>,
    ) -> Response<ResponseBody> {
        let replayable = request
            .as_ref()
            .is_some_and(|r| is_idempotent(r.method()) && http_body::Body::is_end_stream(r.body()));
        let count = |f: fn(&CanaryCounters) -> &AtomicU64| retired.count_canary(f);
        if !replayable {
            count(|c| &c.rescue_refused);
            return local(done, ProxyError::new(ErrorKind::RolledBack));
        }
        count(|c| &c.rescued);
        let now_stable = self.handle.routing().stable.clone();
        let mut fresh = done.seed().start(&now_stable, Role::Stable);
        fresh.fell_back = true;
        done.quiet = Some(Arc::new(AtomicBool::new(true)));
        drop(done);
        finish(self.route_and_forward(&now_stable, request, client, fresh).await)
    }

    /// A stable request sampled by the shadow stage: served as usual, then its copy goes to the
    /// candidate from a task of its own, with the stable answer to compare against.
    pub(super) async fn serve_shadowed(
        &self,
        shadow: Arc<crate::shadow::Shadow>,
        snapshot: &Arc<Snapshot>,
        request: &mut Option<Request<RequestBody>>,
        client: SocketAddr,
        done: Box<Completion>,
    ) -> Response<ResponseBody> {
        let copy = request
            .as_ref()
            .map(|r| copy_head(r.method(), r.uri(), r.version(), r.headers()));
        let started = Instant::now();
        let response = finish(self.route_and_forward(snapshot, request, client, done).await);
        if let Some(parts) = copy {
            let (status, latency) = (response.status().as_u16(), started.elapsed());
            tokio::spawn(shadow.compare_live(snapshot.clone(), parts, self.listener.clone(), client, status, latency));
        }
        response
    }

    /// A request on the candidate. It races the candidate's answer against the version's
    /// rollback and, when replayable, against the candidate's hedge delay: past that delay the
    /// stable version gets the same request and the first response head wins. A replayable
    /// request that fails on the candidate in any way (a 5xx head included) is answered by the
    /// stable version; one waiting when the candidate is rolled back is sent there at once, and
    /// a request that is not replayable gets an immediate answer naming the rollback.
    pub(super) async fn serve_candidate(
        &self,
        candidate: &Arc<Snapshot>,
        stable: Arc<Snapshot>,
        request: &mut Option<Request<RequestBody>>,
        copy: Option<Replay>,
        client: SocketAddr,
        mut done: Box<Completion>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let quiet = Arc::new(AtomicBool::new(false));
        done.quiet = Some(quiet.clone());
        let seed = done.seed();
        let hedge_after = copy
            .as_ref()
            .and_then(|c| self.candidate_hedge_delay(candidate, &stable, &c.parts));
        // Boxed so that a lost attempt can be dropped (cancelled) at once, not at the end.
        let mut attempt: Attempt<'_> = Box::pin(self.route_and_forward(candidate, request, client, done));
        let timer = tokio::time::sleep(hedge_after.unwrap_or(Duration::MAX / 4));
        let mut timer = std::pin::pin!(timer);
        // Why the candidate lost the request, once it has.
        let lost = tokio::select! {
            r = &mut attempt => match r {
                Ok(response) if !(copy.is_some() && response.status().is_server_error()) => return response,
                Ok(response) => {
                    // Its 5xx head was not forwarded yet: the stable version answers instead.
                    quiet.store(true, Relaxed);
                    drop(response);
                    Lost::Failed
                }
                Err((err, done)) if err.kind == ErrorKind::RolledBack => {
                    quiet.store(true, Relaxed);
                    drop(done);
                    Lost::RolledBack
                }
                Err((err, done)) => {
                    if !copy.as_ref().is_some_and(|c| falls_back(&err, &stable, &self.listener, &c.parts)) {
                        return local(done, err);
                    }
                    quiet.store(true, Relaxed);
                    drop(done);
                    Lost::Failed
                }
            },
            _ = candidate.retired.cancelled() => Lost::RolledBack,
            _ = &mut timer, if hedge_after.is_some() => Lost::Slow,
        };
        let count = |f: fn(&CanaryCounters) -> &AtomicU64| candidate.count_canary(f);
        quiet.store(true, Relaxed);
        let Some(copy) = copy else {
            // Not replayable and the candidate was rolled back under it: answer now.
            drop(attempt);
            count(|h| &h.rescue_refused);
            // The answer's own completion counts it against the candidate.
            return local(
                seed.start(candidate, Role::Candidate),
                ProxyError::new(ErrorKind::RolledBack),
            );
        };
        // The stable version that serves now: after a rollback, the one put back.
        let now_stable = self.handle.routing().stable.clone();
        let mut fresh = seed.start(&now_stable, Role::Stable);
        fresh.fell_back = true;
        let stable_quiet = Arc::new(AtomicBool::new(false));
        fresh.quiet = Some(stable_quiet.clone());
        let mut replay = Some(copy.into_request());
        let again = self.route_and_forward(&now_stable, &mut replay, client, fresh);
        let mut again = std::pin::pin!(again);
        if lost != Lost::Slow {
            drop(attempt);
            candidate.stats.record(true, started.elapsed());
            count(if lost == Lost::RolledBack {
                |h| &h.rescued
            } else {
                |h| &h.fallbacks
            });
            return finish(again.await);
        }
        // Still in the race: the candidate's answer counts until it loses.
        quiet.store(false, Relaxed);
        count(|h| &h.hedges);
        // Both run; the first usable head wins, and the loser's attempt is dropped (cancelled).
        let mut candidate_out = false;
        loop {
            tokio::select! {
                r = &mut attempt, if !candidate_out => match r {
                    Ok(response) if !response.status().is_server_error() => {
                        stable_quiet.store(true, Relaxed);
                        return response;
                    }
                    failed => {
                        quiet.store(true, Relaxed);
                        drop(failed);
                        candidate.stats.record(true, started.elapsed());
                        candidate_out = true;
                    }
                },
                _ = candidate.retired.cancelled(), if !candidate_out => {
                    quiet.store(true, Relaxed);
                    attempt = Box::pin(std::future::pending());
                    candidate.stats.record(true, started.elapsed());
                    count(|h| &h.rescued);
                    candidate_out = true;
                }
                r = &mut again => {
                    if !candidate_out {
                        // The slow candidate attempt counts against the candidate's verdict.
                        quiet.store(true, Relaxed);
                        candidate.stats.record(true, started.elapsed());
                    }
                    return finish(r);
                }
            }
        }
    }

    /// The candidate's hedge delay for a request: the running version's `[rollout] hedge_after`
    /// (a change must not weaken the rules that test it), from the stable latency of the pool
    /// the candidate routes the request to.
    pub(super) fn candidate_hedge_delay(
        &self,
        candidate: &Snapshot,
        stable: &Snapshot,
        parts: &http::request::Parts,
    ) -> Option<Duration> {
        let after = stable.config.rollout.hedge_after?;
        let route = candidate.find_route(&self.listener, &parts.method, &parts.uri, &parts.headers)?;
        let pool = &candidate.pools[candidate.config.routes[route].pool()?];
        let ceiling = candidate.pool_config(pool).response_timeout;
        Some(pool.head_latency.delay(after, ceiling, crate::clock::now_ms()))
    }
}

/// Should a candidate's failure be served by the stable version instead? Failures of the
/// candidate's routing or backends, yes; a 404 only when the stable version has a route.
pub(super) fn falls_back(err: &ProxyError, stable: &Snapshot, listener: &str, parts: &http::request::Parts) -> bool {
    match err.kind {
        ErrorKind::ConnectRefused
        | ErrorKind::ConnectTimeout
        | ErrorKind::ResponseTimeout
        | ErrorKind::NoHealthyBackend
        | ErrorKind::PanicFailClosed
        | ErrorKind::PoolAtCapacity
        | ErrorKind::UpstreamProtocol => true,
        ErrorKind::NoRoute => stable
            .find_route(listener, &parts.method, &parts.uri, &parts.headers)
            .is_some(),
        // The client's own doing: the stable version would refuse it too.
        ErrorKind::BodyTooLarge
        | ErrorKind::BadRequest
        | ErrorKind::ClientBody
        | ErrorKind::RolledBack
        | ErrorKind::AmbiguousFraming
        | ErrorKind::BadHost
        | ErrorKind::ConnectMethod => false,
    }
}

/// A candidate attempt in flight.
pub(super) type Attempt<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<ResponseBody>, (ProxyError, Box<Completion>)>> + Send + 'a>,
>;

/// Why the candidate lost a request to the stable version.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Lost {
    /// It failed (connect, timeout, protocol, a 5xx head, no route where stable has one).
    Failed,
    /// Its version was rolled back while the request waited.
    RolledBack,
    /// No response head within the hedge delay: the stable version got the request too.
    Slow,
}

/// A replayable request's copy: its head and its buffered body.
pub(super) struct Replay {
    pub(super) parts: http::request::Parts,
    pub(super) body: Bytes,
}

impl Replay {
    fn into_request(self) -> Request<RequestBody> {
        let body = if self.body.is_empty() {
            RequestBody::empty()
        } else {
            RequestBody::buffered(self.body)
        };
        Request::from_parts(self.parts, body)
    }
}

/// The `Idempotency-Key` header (IETF httpapi draft): the client says the request may be sent
/// twice.
pub(super) const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Idempotent without a body (RFC 9110 9.2.2), or with an `Idempotency-Key` and a declared body
/// of at most `max` bytes (a chunked body of unknown size is streamed, never sent twice).
pub(super) fn is_replayable(parts: &http::request::Parts, body: &ClientBody, max: u64) -> bool {
    let bodiless = http_body::Body::is_end_stream(body);
    if bodiless && is_idempotent(&parts.method) {
        return true;
    }
    if !parts.headers.contains_key(IDEMPOTENCY_KEY) {
        return false;
    }
    bodiless || http_body::Body::size_hint(body).exact().is_some_and(|n| n <= max)
}

/// Reads a (small, declared) request body whole, so it can be sent more than once.
pub(super) async fn buffer_body(body: ClientBody, max: u64) -> Result<Bytes, ErrorKind> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, max as usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ErrorKind::BodyTooLarge),
        Err(_) => Err(ErrorKind::ClientBody),
    }
}
