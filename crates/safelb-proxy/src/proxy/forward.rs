//! Forwarding within one pool: pick a backend, connect (retrying connect failures within the
//! budget), send, and race a hedge to a second backend when the first has no response head
//! after the hedge delay; the same wait watches for the version's rollback.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use super::*;

impl Proxy {
    pub(super) async fn forward(
        &self,
        snapshot: &Snapshot,
        pool: &PoolRuntime,
        request: &mut Option<Request<RequestBody>>,
        mut wire: Option<&mut Wire<'_>>,
        hash: u64,
        mut done: Box<Completion>,
    ) -> Result<Response<ResponseBody>, (ProxyError, Box<Completion>)> {
        let config = snapshot.pool_config(pool);
        // One clock read serves the first attempt: the budgets, the hedge delay, the backend
        // choice, the idle connection's age, the latency and, on a reused connection, the send
        // deadline. A retry reads the clock again (both are reset before each `continue`).
        let (mut started, mut started_ms) = crate::clock::read();
        pool.retry_budget.on_request(started_ms);
        // Bodiless HTTP/1.1 requests are exchanged on this task (h1/), their head encoded once
        // for every attempt (a request in wire form comes with it); others go through hyper.
        let (head, method) = match &wire {
            Some(w) => (Some(Cow::Borrowed(w.head)), w.method.clone()),
            None => {
                let Some(req) = request.as_mut() else {
                    unreachable!("forward is given a request");
                };
                if config.protocol == Protocol::H2 {
                    to_h2(req);
                }
                let bodiless = config.protocol == Protocol::Http1 && http_body::Body::is_end_stream(req.body());
                let encoded = bodiless.then(|| Cow::Owned(h1::encode_head(req.method(), req.uri(), req.headers())));
                (encoded, req.method().clone())
            }
        };
        let bodiless = head.is_some();
        // Hedging within the pool: an idempotent bodiless request, whose encoded head can go to a
        // second backend while the first is still waiting.
        let hedge_after = match (&pool.hedge, bodiless && is_idempotent(&method)) {
            (Some(h), true) => {
                h.budget.on_request();
                Some(pool.head_latency.delay(h.after, config.response_timeout, started_ms))
            }
            _ => None,
        };
        let mut tried: Vec<usize> = Vec::new();
        let mut last_error: Option<ErrorKind> = None;
        let mut stale_reuses = 0;
        loop {
            let idx = match pool.select(hash, &tried, started_ms) {
                Ok(i) => i,
                // A retry that finds no other backend reports the failure that caused it.
                Err(kind) => return Err((ProxyError::in_pool(last_error.unwrap_or(kind), &pool.name), done)),
            };
            let backend = &pool.backends[idx];
            let in_flight = InFlight::start(backend);
            let (mut sender, reused) = match pool.conns[idx]
                .checkout(config.connect_timeout, config.protocol, bodiless, started_ms)
                .await
            {
                Ok(s) => s,
                Err(kind) => {
                    drop(in_flight);
                    backend.observe_latency(config.connect_timeout, crate::clock::now_ms());
                    pool.upstream[idx].connect_errors.fetch_add(1, Relaxed);
                    failure(pool, snapshot, idx, kind);
                    tried.push(idx);
                    last_error = Some(kind);
                    // Nothing reached a backend, so any method may go elsewhere.
                    if done.retries < config.retry.attempts && pool.retry_budget.try_retry() {
                        done.retries += 1;
                        pool.retries.fetch_add(1, Relaxed);
                        (started, started_ms) = crate::clock::read();
                        continue;
                    }
                    return Err((ProxyError::in_pool(kind, &pool.name), done));
                }
            };
            // One send future and one timer for every request. It first runs to the hedge delay;
            // a request still waiting then enters the rare path (boxed): the hedge, if the
            // request may be hedged, and a watch on its version's rollback in every case.
            let outcome = 'send: {
                // Pinned where it is made: a named future moved into `pin!` keeps its first slot
                // in the state too (twice its size per request).
                let mut sent = std::pin::pin!(sender.send(request, head.as_deref().map(|h| (h, &method))));
                let sent_at = if reused {
                    tokio::time::Instant::from_std(started)
                } else {
                    tokio::time::Instant::now()
                };
                let first = hedge_after
                    .unwrap_or_else(|| {
                        pool.head_latency
                            .delay(safelb_config::HedgeAfter::Auto, config.response_timeout, started_ms)
                    })
                    .min(config.response_timeout);
                let timer = wire.as_mut().map(|w| w.timer.as_mut());
                if let Some(r) = until(sent.as_mut(), sent_at + first, timer).await {
                    break 'send Raced::from_send(r);
                }
                if first >= config.response_timeout {
                    break 'send Raced::TimedOut;
                }
                tried.push(idx);
                let hedge = HedgeRace {
                    snapshot,
                    pool,
                    hash,
                    tried: &tried,
                    head: head.as_deref().filter(|_| hedge_after.is_some()),
                    method: &method,
                    sent_at,
                };
                let race = Box::pin(hedge.run(sent.as_mut()));
                let raced = race.await;
                tried.pop();
                raced
            };
            // `asked`: when the answering backend's attempt started.
            let (idx, backend, in_flight, response, asked) = match outcome {
                Raced::Retired => {
                    // Not the backend's fault: nothing is counted against it.
                    drop(in_flight);
                    return Err((ProxyError::in_pool(ErrorKind::RolledBack, &pool.name), done));
                }
                Raced::TimedOut => {
                    drop(in_flight);
                    backend.observe_latency(config.response_timeout, crate::clock::now_ms());
                    done.backend = Some(backend.clone());
                    done.backend_idx = Some(idx);
                    pool.upstream[idx].timeouts.fetch_add(1, Relaxed);
                    failure(pool, snapshot, idx, ErrorKind::ResponseTimeout);
                    return Err((ProxyError::in_pool(ErrorKind::ResponseTimeout, &pool.name), done));
                }
                Raced::Failed(e) => {
                    drop(in_flight);
                    // A pooled connection the backend had closed: the request is back, unsent.
                    if e.unsent && reused && stale_reuses < MAX_STALE_REUSE {
                        stale_reuses += 1;
                        (started, started_ms) = crate::clock::read();
                        continue;
                    }
                    // A fresh connection closed before any answer: the backend died or cut it.
                    // The request is back unanswered and idempotent, so it may go to another
                    // backend like a connect failure (the failure counts against this one).
                    if e.unsent && done.retries < config.retry.attempts && pool.retry_budget.try_retry() {
                        failure(pool, snapshot, idx, ErrorKind::UpstreamProtocol);
                        tried.push(idx);
                        last_error = Some(ErrorKind::UpstreamProtocol);
                        done.retries += 1;
                        pool.retries.fetch_add(1, Relaxed);
                        (started, started_ms) = crate::clock::read();
                        continue;
                    }
                    done.backend = Some(backend.clone());
                    done.backend_idx = Some(idx);
                    let err = e.error;
                    if let Some(body_err) = request_body_error(&*err) {
                        let kind = match body_err {
                            RequestBodyError::TooLarge { .. } => ErrorKind::BodyTooLarge,
                            RequestBodyError::Client(_) => ErrorKind::ClientBody,
                        };
                        return Err((ProxyError::in_pool(kind, &pool.name), done));
                    }
                    tracing::debug!(backend = %backend.addr, error = %err, "upstream exchange failed");
                    failure(pool, snapshot, idx, ErrorKind::UpstreamProtocol);
                    return Err((ProxyError::in_pool(ErrorKind::UpstreamProtocol, &pool.name), done));
                }
                Raced::Answered(response) => (idx, backend, in_flight, response, started),
                Raced::HedgeAnswered(hedge) => {
                    // The slow backend's wait counts against it as a timeout would, so one that
                    // hangs is ejected after a few hedges instead of one timeout per request.
                    drop(in_flight);
                    backend.observe_latency(started.elapsed(), crate::clock::now_ms());
                    failure(pool, snapshot, idx, ErrorKind::ResponseTimeout);
                    sender = hedge.sender;
                    let hb = &pool.backends[hedge.idx];
                    (hedge.idx, hb, hedge.in_flight, hedge.response, hedge.started)
                }
            };
            let answered = Instant::now();
            let latency = answered.saturating_duration_since(asked);
            backend.observe_latency(latency, crate::clock::ms_at(answered));
            if response.status().is_server_error() {
                failure(pool, snapshot, idx, ErrorKind::UpstreamProtocol);
            } else {
                backend.record_success();
                if done.role == Role::Stable {
                    pool.head_latency.record(latency);
                }
            }
            done.upstream = Some(latency);
            done.backend = Some(backend.clone());
            done.backend_idx = Some(idx);
            done.backend_in_flight = in_flight.keep();
            done.status = response.status().as_u16();
            done.release = Some(sender);
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            return Ok(Response::from_parts(parts, ResponseBody::upstream(body, done)));
        }
    }
}

/// Waits for `sent` until `deadline`: `None` when the deadline came first. On the connection's
/// own timer when it has one (the own HTTP/1 loop's): moving a registered timer to a later
/// deadline is one atomic store, where a timer of the request's own is registered with the
/// runtime's timer wheel and taken out of it again, every request (callgrind, docs/performance.md).
async fn until<F: Future>(
    mut sent: Pin<&mut F>,
    deadline: tokio::time::Instant,
    timer: Option<Pin<&mut tokio::time::Sleep>>,
) -> Option<F::Output> {
    let mut own = std::pin::pin!(None::<tokio::time::Sleep>);
    let mut timer = match timer {
        Some(mut shared) => {
            shared.as_mut().reset(deadline);
            shared
        }
        None => {
            own.set(Some(tokio::time::sleep_until(deadline)));
            own.as_mut().as_pin_mut().expect("set above")
        }
    };
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = sent.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// Stale pooled connections tried before a fresh one is opened; bounds a loop on a backend
/// that closes every idle connection.
pub(super) const MAX_STALE_REUSE: u32 = 3;

/// One request's claim on a backend's in-flight count, released when dropped: an attempt that
/// is abandoned (a hedge won, a client left, a rollback rescued the request) gives it back.
pub(super) struct InFlight<'a>(Option<&'a BackendState>);

impl<'a> InFlight<'a> {
    fn start(backend: &'a BackendState) -> InFlight<'a> {
        backend.start_request();
        InFlight(Some(backend))
    }

    /// The response now holds the claim (its `Completion` releases it).
    fn keep(mut self) -> bool {
        self.0.take().is_some()
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.0 {
            b.end_request();
        }
    }
}

/// How one attempt (and its hedge, if one was sent) ended.
pub(super) enum Raced<'a> {
    Answered(Response<UpstreamBody>),
    Failed(upstream::SendError),
    TimedOut,
    /// The hedge's response head came first.
    HedgeAnswered(Hedged<'a>),
    /// The request's version was rolled back while it waited.
    Retired,
}

pub(super) struct Hedged<'a> {
    idx: usize,
    sender: Sender,
    in_flight: InFlight<'a>,
    response: Response<UpstreamBody>,
    /// When this attempt started: its latency is read once it has won the race.
    started: Instant,
}

impl Raced<'_> {
    fn from_send(r: Result<Response<UpstreamBody>, upstream::SendError>) -> Self {
        match r {
            Err(e) => Raced::Failed(e),
            Ok(response) => Raced::Answered(response),
        }
    }
}

/// What a hedge needs to know about the request it doubles.
pub(super) struct HedgeRace<'r, 'a> {
    snapshot: &'r Snapshot,
    pool: &'a PoolRuntime,
    hash: u64,
    /// Backends not to hedge to (the primary's among them).
    tried: &'r [usize],
    /// The encoded head of a request that may be hedged; `None`: only watch for a rollback.
    head: Option<&'r [u8]>,
    method: &'r Method,
    sent_at: tokio::time::Instant,
}

impl<'r, 'a> HedgeRace<'r, 'a> {
    /// `primary` has had no response head for the hedge delay. If the budget allows, the same
    /// head goes to another backend of the pool; the first head wins, an attempt that fails
    /// leaves the other to answer, and `timer` (reset to the response timeout) bounds both.
    async fn run(
        self,
        mut primary: std::pin::Pin<
            &mut impl std::future::Future<Output = Result<Response<UpstreamBody>, upstream::SendError>>,
        >,
    ) -> Raced<'a> {
        let HedgeRace {
            snapshot,
            pool,
            hash,
            tried,
            head,
            method,
            sent_at,
        } = self;
        let config = snapshot.pool_config(pool);
        // The response timeout counts from the primary's send, as without a hedge.
        let timer = tokio::time::sleep_until(sent_at + config.response_timeout);
        let mut timer = std::pin::pin!(timer);
        let retired = snapshot.retired.cancelled();
        let mut retired = std::pin::pin!(retired);
        let budget = pool.hedge.as_ref().map(|h| &h.budget);
        let other = head.and_then(|_| pool.select(hash, tried, crate::clock::now_ms()).ok());
        let (Some(j), Some(head)) = (other.filter(|_| budget.is_some_and(|b| b.try_take())), head) else {
            if other.is_some() {
                pool.hedging.hedges_denied.fetch_add(1, Relaxed);
            }
            return tokio::select! {
                r = &mut primary => Raced::from_send(r),
                _ = &mut timer => Raced::TimedOut,
                _ = &mut retired => Raced::Retired,
            };
        };
        pool.hedging.hedges.fetch_add(1, Relaxed);
        let backend = &pool.backends[j];
        let hedge = async {
            let in_flight = InFlight::start(backend);
            let started = Instant::now();
            let (mut sender, _) = match pool.conns[j]
                .checkout(
                    config.connect_timeout,
                    Protocol::Http1,
                    true,
                    crate::clock::ms_at(started),
                )
                .await
            {
                Ok(s) => s,
                Err(kind) => {
                    pool.upstream[j].connect_errors.fetch_add(1, Relaxed);
                    failure(pool, snapshot, j, kind);
                    return None;
                }
            };
            match sender.send_head(head, method).await {
                Ok(response) => Some(Hedged {
                    idx: j,
                    sender,
                    in_flight,
                    response,
                    started,
                }),
                Err(_) => {
                    failure(pool, snapshot, j, ErrorKind::UpstreamProtocol);
                    None
                }
            }
        };
        let mut hedge = std::pin::pin!(hedge);
        let mut primary_failed: Option<upstream::SendError> = None;
        let mut hedge_failed = false;
        loop {
            tokio::select! {
                r = &mut primary, if primary_failed.is_none() => match r {
                    Ok(response) => return Raced::Answered(response),
                    Err(e) if hedge_failed => return Raced::Failed(e),
                    Err(e) => primary_failed = Some(e),
                },
                h = &mut hedge, if !hedge_failed => match h {
                    Some(won) => {
                        pool.hedging.hedges_won.fetch_add(1, Relaxed);
                        return Raced::HedgeAnswered(won);
                    }
                    None => match primary_failed.take() {
                        Some(e) => return Raced::Failed(e),
                        None => hedge_failed = true,
                    },
                },
                _ = &mut timer => return Raced::TimedOut,
                _ = &mut retired => return Raced::Retired,
            }
        }
    }
}

/// Counts a failure against the backend's outlier state; ejects it when the pool can spare it.
pub(super) fn failure(pool: &PoolRuntime, snapshot: &Snapshot, idx: usize, kind: ErrorKind) {
    let outlier = &snapshot.pool_config(pool).outlier;
    let backend = &pool.backends[idx];
    if let Some(for_how_long) = backend.record_failure(outlier, || pool.may_eject()) {
        pool.conns[idx].clear();
        snapshot
            .metrics
            .push_event(crate::metrics::DataPlaneEvent::BackendEjected {
                backend: backend.label.to_string(),
                pool: pool.name.to_string(),
                cause: kind.as_str(),
                for_ms: for_how_long.as_millis() as u64,
            });
        tracing::warn!(
            backend = %backend.addr,
            pool = %pool.name,
            cause = kind.as_str(),
            ejected_for_ms = for_how_long.as_millis() as u64,
            "backend ejected after consecutive failures: no new requests until the ejection ends"
        );
    }
}
