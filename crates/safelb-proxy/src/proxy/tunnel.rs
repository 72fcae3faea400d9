//! `Upgrade` requests (WebSocket): a fresh upstream connection, then a byte tunnel that holds
//! only sockets, so config swaps leave it alone.

use super::*;

impl Proxy {
    /// An Upgrade request (WebSocket): a fresh upstream connection; on `101 Switching Protocols`
    /// both connections become one byte tunnel that lives until either side closes. The tunnel
    /// holds sockets, not a snapshot, so config swaps leave it alone.
    pub(super) async fn tunnel(
        &self,
        snapshot: &Snapshot,
        request: Request<RequestBody>,
        mut done: Box<Completion>,
        on_client: hyper::upgrade::OnUpgrade,
        conn: Arc<ConnState>,
    ) -> Result<Response<ResponseBody>, (ProxyError, Box<Completion>)> {
        let Some(route) = snapshot.find_route(&self.listener, request.method(), request.uri(), request.headers())
        else {
            return Err((ProxyError::new(ErrorKind::NoRoute), done));
        };
        let Some(p) = snapshot.config.routes[route].pool() else {
            // A redirect or fixed answer needs no tunnel: the client gets it as a plain answer.
            done.route = Some(snapshot.route_names[route].clone());
            done.route_idx = Some(route);
            return Ok(self.answer(&snapshot.actions[route], &request, done));
        };
        let pool = &snapshot.pools[p];
        let config = snapshot.pool_config(pool);
        done.route = Some(snapshot.route_names[route].clone());
        done.route_idx = Some(route);
        done.pool = Some(pool.name.clone());
        done.pool_idx = Some(pool.index);
        let idx = match pool.select(0, &[], crate::clock::now_ms()) {
            Ok(i) => i,
            Err(kind) => return Err((ProxyError::in_pool(kind, &pool.name), done)),
        };
        let backend = &pool.backends[idx];
        done.backend = Some(backend.clone());
        done.backend_idx = Some(idx);
        let mut sender = match upstream::connect_upgradable(backend.addr, config.connect_timeout).await {
            Ok(s) => s,
            Err(kind) => {
                pool.upstream[idx].connect_errors.fetch_add(1, Relaxed);
                failure(pool, snapshot, idx, kind);
                return Err((ProxyError::in_pool(kind, &pool.name), done));
            }
        };
        let mut response = match tokio::time::timeout(config.response_timeout, sender.send_request(request)).await {
            Err(_) => return Err((ProxyError::in_pool(ErrorKind::ResponseTimeout, &pool.name), done)),
            Ok(Err(_)) => return Err((ProxyError::in_pool(ErrorKind::UpstreamProtocol, &pool.name), done)),
            Ok(Ok(r)) => r,
        };
        done.status = response.status().as_u16();
        if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            // Refused upgrade: relay the answer; the connection is not reused.
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            return Ok(Response::from_parts(
                parts,
                ResponseBody::upstream(UpstreamBody::Hyper(body), done),
            ));
        }
        backend.record_success();
        let on_upstream = hyper::upgrade::on(&mut response);
        conn.upgraded.store(true, Relaxed);
        let peer = backend.addr;
        let idle_limit = snapshot.config.limits.tunnel_idle_timeout;
        self.handle.tunnels().spawn(|closing| async move {
            let (Ok(client), Ok(upstream)) = (on_client.await, on_upstream.await) else {
                return;
            };
            let last = Arc::new(AtomicU64::new(crate::clock::now_ms()));
            let mut client = Touched(TokioIo::new(client), last.clone());
            let mut upstream = Touched(TokioIo::new(upstream), last.clone());
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
                    Ok((up, down)) => tracing::debug!(backend = %peer, up, down, "upgraded connection closed"),
                    Err(e) => tracing::debug!(backend = %peer, error = %e, "upgraded connection ended with an error"),
                },
                _ = idle(&last, idle_limit) => {
                    tracing::debug!(backend = %peer, idle_ms = idle_limit.as_millis() as u64, "upgraded connection closed: idle");
                }
                _ = closing.cancelled() => {
                    // Shutting down past the drain timeout: an orderly close of both sides.
                    use tokio::io::AsyncWriteExt;
                    let both = async { tokio::join!(client.shutdown(), upstream.shutdown()) };
                    let _ = tokio::time::timeout(Duration::from_secs(1), both).await;
                    tracing::debug!(backend = %peer, "upgraded connection closed: shutting down");
                }
            }
        });
        let mut out = Response::new(ResponseBody::local(Bytes::new(), Some(done)));
        *out.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        *out.headers_mut() = std::mem::take(response.headers_mut());
        Ok(out)
    }
}

/// The protocol asked for by an HTTP/1.1 `Upgrade` request (with `Connection: upgrade`).
pub(super) fn upgrade_protocol(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(http::header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Returns once no byte has crossed the tunnel for `limit` (checked a few times per limit).
async fn idle(last: &AtomicU64, limit: Duration) {
    let limit_ms = limit.as_millis() as u64;
    loop {
        let quiet = crate::clock::now_ms().saturating_sub(last.load(Relaxed));
        if quiet >= limit_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis((limit_ms - quiet).max(10))).await;
    }
}

/// One side of a tunnel that notes when bytes last came through it.
struct Touched<T>(T, Arc<AtomicU64>);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Touched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.1.store(crate::clock::now_ms(), Relaxed);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Touched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
