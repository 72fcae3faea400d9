//! The request path of a plain HTTP/1 request in wire form ([`h1::RequestHead`]), as the
//! connection's own loop read it: routed by its fields where they lie, its backend's head written
//! in one pass beside the client's, forwarded by the same `forward` as every request.
//!
//! It serves the traffic a site carries most of the time: stable (no canary or shadow stage
//! running), to a route that forwards to an HTTP/1.1 pool without editing the request. Every
//! other request is turned into `http` form here and takes [`Proxy::serve`], so the rules of
//! refusals, rollouts, redirects, request edits and HTTP/2 pools stay in one place; the fuzz
//! target `request_head` checks that both forms send a backend the same fields.

use std::future::Future;
use std::pin::Pin;

use super::*;
use crate::h1::RequestHead;
use crate::headers::new_request_id;

/// A request's head already written for its backend, with its method, and its connection's
/// response timer (see `forward::until`).
pub(super) struct Wire<'a> {
    pub(super) head: &'a [u8],
    pub(super) method: &'a Method,
    pub(super) timer: Pin<&'a mut tokio::time::Sleep>,
}

/// Where a request in wire form goes, decided before anything waits.
enum Entered {
    /// To the pool's backends, its head written in the connection's `upstream` buffer.
    Forward {
        snapshot: Arc<Snapshot>,
        route: usize,
        pool: usize,
        hash: u64,
        done: Box<Completion>,
    },
    /// Answered at once (a rate limit; boxed, see `serve_wire`).
    Answered(Box<Response<ResponseBody>>),
    /// Through the general path (see the module doc).
    InHttpForm(Arc<ConnState>),
}

impl Proxy {
    /// Serves one plain HTTP/1 request. `upstream` is the connection's buffer for the backend's
    /// head (kept between requests: no allocation per request) and `timer` its response timer.
    /// Never fails: every error becomes a response.
    pub(crate) async fn serve_wire(
        &self,
        req: &RequestHead,
        client: SocketAddr,
        conn: Arc<ConnState>,
        upstream: &mut Vec<u8>,
        timer: Pin<&mut tokio::time::Sleep>,
    ) -> Response<ResponseBody> {
        // Nothing held across an await below is larger than it must be: this future is made
        // for every request (the match's value lives through its arms, hence the boxed answer).
        let (snapshot, route, pool, hash, done) = match self.enter(req, client, conn, upstream) {
            Entered::Forward {
                snapshot,
                route,
                pool,
                hash,
                done,
            } => (snapshot, route, pool, hash, done),
            Entered::Answered(response) => return *response,
            Entered::InHttpForm(conn) => return self.serve_in_http_form(req, client, conn).await,
        };
        let (err, done) = {
            let mut wire = Wire {
                head: upstream,
                method: &req.method,
                timer,
            };
            let pool = &snapshot.pools[pool];
            let mut forwarded = self
                .forward(&snapshot, pool, &mut None, Some(&mut wire), hash, done)
                .await;
            edit_response(&snapshot.actions[route], &mut forwarded);
            match forwarded {
                Ok(response) => return response,
                Err(failed) => failed,
            }
        };
        if err.kind == ErrorKind::RolledBack {
            return self.rescue_wire(&snapshot, upstream, client, done).await;
        }
        local(done, err)
    }

    /// Everything before the request waits: the version, the route and whether the wire form
    /// serves it; then the request's id, its sample and log fields, its head for the backend,
    /// the route's rate limit and the pool.
    fn enter(&self, req: &RequestHead, client: SocketAddr, conn: Arc<ConnState>, upstream: &mut Vec<u8>) -> Entered {
        let routing = self.handle.routing();
        let stable_only = routing.canary.is_none() && routing.shadow.is_none();
        let snapshot = routing.stable.clone();
        drop(routing);
        let host = req.host().unwrap_or("");
        // Decided before anything is counted or drawn (a canary's share is one draw, in `serve`).
        let found = (stable_only && req.is_plain())
            .then(|| snapshot.find_route_at(&self.listener, &req.method, &req.uri, host, req))
            .flatten();
        let forwarded_as_is = found.and_then(|route| match snapshot.config.routes[route].action {
            Action::Pool(p)
                if !snapshot.actions[route].edits_request() && snapshot.config.pools[p].protocol == Protocol::Http1 =>
            {
                Some((route, p))
            }
            _ => None,
        });
        let Some((route, p)) = forwarded_as_is else {
            return Entered::InHttpForm(conn);
        };
        let mut done = Completion::start(&self.log, client, conn, snapshot.clone(), Role::Stable);
        let new_id = match req.client_request_id() {
            Some(id) => {
                done.request_id = id;
                None
            }
            None => {
                let id = new_request_id();
                done.request_id = id.clone();
                Some(id)
            }
        };
        let path = req.uri.path();
        self.handle
            .samples()
            .record(&self.listener, req.method.as_str(), host, path);
        if done.log.enabled() {
            done.method = req.method.clone();
            done.host = host.to_owned();
            done.path = path.to_owned();
        }
        let client_ip = done.conn.client_ip.get_or_init(|| client_ip_value(client));
        upstream.clear();
        req.write_upstream(upstream, client_ip, self.scheme, new_id.as_ref());
        if let Err(wait) = enter_route(&snapshot, route, req, client, &mut done) {
            return Entered::Answered(Box::new(rate_limited(
                done,
                &snapshot.route_names[route],
                wait,
                &snapshot.actions[route],
            )));
        }
        let (_, hash) = enter_pool(&snapshot, route, p, req, client, &mut done);
        Entered::Forward {
            snapshot,
            route,
            pool: p,
            hash,
            done,
        }
    }

    /// A request the wire form does not serve, through [`Proxy::serve`]. Boxed, and built
    /// outside `serve_wire`'s body: only these requests pay for the general path's size.
    fn serve_in_http_form(
        &self,
        req: &RequestHead,
        client: SocketAddr,
        conn: Arc<ConnState>,
    ) -> Pin<Box<impl Future<Output = Response<ResponseBody>> + '_>> {
        Box::pin(self.serve(req.to_http().map(|()| ClientBody::Empty), client, conn))
    }

    /// The rescue of a request whose version was rolled back while it waited: the version now
    /// serving gets it as prepared, the head written for the backend read back in `http` form.
    fn rescue_wire<'s>(
        &'s self,
        retired: &'s Snapshot,
        upstream: &[u8],
        client: SocketAddr,
        done: Box<Completion>,
    ) -> Pin<Box<impl Future<Output = Response<ResponseBody>> + 's>> {
        let mut request = h1::read_back(upstream).map(|r| r.map(|()| RequestBody::empty()));
        Box::pin(async move { self.rescue(retired, &mut request, client, done).await })
    }
}
