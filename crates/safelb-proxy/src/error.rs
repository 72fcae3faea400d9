//! Data-path errors: what failed, and the one function that turns an error into the status and
//! short body a client receives. (Whether another backend may be tried is decided where the
//! attempt is made, in `proxy/forward.rs`: it depends on what reached the backend, not on the
//! kind alone.)

use http::StatusCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NoRoute,
    NoHealthyBackend,
    /// The pool is under its panic threshold and its policy is `fail_closed`.
    PanicFailClosed,
    /// Every available backend of the pool carries its `max_in_flight` requests.
    PoolAtCapacity,
    ConnectRefused,
    ConnectTimeout,
    /// The backend accepted the request but sent no response head in time.
    ResponseTimeout,
    /// The backend closed or broke the connection, or answered with invalid HTTP.
    UpstreamProtocol,
    BodyTooLarge,
    /// The request itself cannot be forwarded (e.g. an invalid target).
    BadRequest,
    /// Both `Content-Length` and `Transfer-Encoding`: two framings, the shape of request
    /// smuggling (RFC 9112 §6.3); refused, and the connection closed.
    AmbiguousFraming,
    /// An HTTP/1.1 request without a `Host` field, or with more than one (RFC 9112 §3.2).
    BadHost,
    /// `CONNECT`: safelb is a reverse proxy, not a tunnel to anywhere a client names.
    ConnectMethod,
    /// Reading the client's request body failed (it went away or sent bad framing).
    ClientBody,
    /// The version serving the request was rolled back before a response head arrived, and
    /// the request is not replayable, so it was not sent again.
    RolledBack,
}

impl ErrorKind {
    /// The short name used in access logs and response bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::NoHealthyBackend => "no_healthy_backend",
            ErrorKind::PanicFailClosed => "panic_fail_closed",
            ErrorKind::PoolAtCapacity => "pool_at_capacity",
            ErrorKind::ConnectRefused => "connect_failed",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::ResponseTimeout => "response_timeout",
            ErrorKind::UpstreamProtocol => "upstream_protocol",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::AmbiguousFraming => "ambiguous_framing",
            ErrorKind::BadHost => "bad_host",
            ErrorKind::ConnectMethod => "connect_method",
            ErrorKind::ClientBody => "client_body",
            ErrorKind::RolledBack => "rolled_back",
        }
    }
}

/// An error on the request path, with the pool it concerns when there is one.
#[derive(Clone, Debug)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub pool: Option<std::sync::Arc<str>>,
}

impl ProxyError {
    pub fn new(kind: ErrorKind) -> Self {
        ProxyError { kind, pool: None }
    }

    pub fn in_pool(kind: ErrorKind, pool: &std::sync::Arc<str>) -> Self {
        ProxyError {
            kind,
            pool: Some(pool.clone()),
        }
    }
}

/// The single mapping from error to client answer: status and a one-line body naming the cause.
pub fn client_answer(err: &ProxyError) -> (StatusCode, String) {
    let pool = err.pool.as_deref().unwrap_or("?");
    match err.kind {
        ErrorKind::NoRoute => (StatusCode::NOT_FOUND, "no route matches this host and path".into()),
        ErrorKind::NoHealthyBackend => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no healthy backend in pool `{pool}`"),
        ),
        ErrorKind::PanicFailClosed => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("pool `{pool}` is below its panic threshold and fails closed"),
        ),
        ErrorKind::PoolAtCapacity => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("every backend of pool `{pool}` is at its max_in_flight; try again shortly"),
        ),
        ErrorKind::ConnectRefused => (
            StatusCode::BAD_GATEWAY,
            format!("could not connect to a backend of pool `{pool}`"),
        ),
        ErrorKind::ConnectTimeout => (
            StatusCode::BAD_GATEWAY,
            format!("timed out connecting to a backend of pool `{pool}`"),
        ),
        ErrorKind::ResponseTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("a backend of pool `{pool}` did not answer in time"),
        ),
        ErrorKind::UpstreamProtocol => (
            StatusCode::BAD_GATEWAY,
            format!("a backend of pool `{pool}` sent an invalid or incomplete response"),
        ),
        ErrorKind::BodyTooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body exceeds the configured limit".into(),
        ),
        ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "request cannot be forwarded".into()),
        ErrorKind::AmbiguousFraming => (
            StatusCode::BAD_REQUEST,
            "both Content-Length and Transfer-Encoding: the body's length is ambiguous".into(),
        ),
        ErrorKind::BadHost => (
            StatusCode::BAD_REQUEST,
            "an HTTP/1.1 request needs exactly one Host field".into(),
        ),
        ErrorKind::ConnectMethod => (
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported: this is a reverse proxy".into(),
        ),
        ErrorKind::ClientBody => (StatusCode::BAD_REQUEST, "request body could not be read".into()),
        ErrorKind::RolledBack => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the config version serving this request was rolled back before the backend answered; not sent again because the request is not replayable (add an Idempotency-Key to make it so)".into(),
        ),
    }
}

/// Answers for errors the HTTP parser produces before a request exists (see `client_io.rs`):
/// status, the short log name of the cause, and the body text.
pub fn parser_answer(status: u16) -> Option<(StatusCode, &'static str, &'static str)> {
    match status {
        400 => Some((StatusCode::BAD_REQUEST, "malformed_request", "malformed HTTP request")),
        408 => Some((
            StatusCode::REQUEST_TIMEOUT,
            "header_timeout",
            "request headers not received in time",
        )),
        414 => Some((StatusCode::URI_TOO_LONG, "uri_too_long", "request target too long")),
        431 => Some((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            "request headers exceed the configured limit",
        )),
        _ => None,
    }
}
