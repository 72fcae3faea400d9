//! The dashboard's server side: its pages and assets (embedded in the binary; no network at run
//! time), the login that trades the admin token for a session, and the live stream
//! (`/api/v1/stream`: server-sent events of every recorded event and a stats frame a second).
//!
//! Every page is sent with a Content-Security-Policy that allows scripts, styles and connections
//! from the admin address only, and no inline script; the token never appears in a page.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::Stream;
use safelb_control::live::Live;
use tokio::sync::broadcast::error::RecvError;

use super::session;
use super::AdminState;

const INDEX: &str = include_str!("../../assets/index.html");
const LOGIN: &str = include_str!("../../assets/login.html");
const APP_JS: &str = include_str!("../../assets/app.js");
const STYLE: &str = include_str!("../../assets/style.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn pages() -> Router<AdminState> {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/assets/{name}", get(asset))
}

/// A page with the headers every dashboard page carries.
fn page(status: StatusCode, html: impl Into<String>) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html.into(),
    )
        .into_response()
}

async fn index(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if s.sessions.caller(&headers).is_none() {
        return Redirect::to("/login").into_response();
    }
    page(StatusCode::OK, INDEX)
}

async fn login_page() -> Response {
    page(StatusCode::OK, LOGIN)
}

/// `POST /login` with `token=...` (a form): a session cookie and back to `/`, or 401.
async fn login(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !session::same_origin(&axum::http::Method::POST, &headers) {
        return (StatusCode::FORBIDDEN, "cross-site login refused\n").into_response();
    }
    if let Some(retry) = s.failures.blocked(peer.ip()) {
        return s.failures.too_many(retry);
    }
    let given = form_value(&body, "token").unwrap_or_default();
    let Some(caller) = s.tokens.find(&given) else {
        s.failures.record(peer.ip());
        let said = "<p class=\"error\" role=\"alert\">That is not one of this safelb's admin tokens.</p>";
        return page(StatusCode::UNAUTHORIZED, LOGIN.replace("<!-- error -->", said));
    };
    let id = match s.sessions.create(caller) {
        Ok(id) => id,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    let mut response = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id, s.tls)) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

async fn logout(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if !session::same_origin(&axum::http::Method::POST, &headers) {
        return (StatusCode::FORBIDDEN, "cross-site logout refused\n").into_response();
    }
    s.sessions.end(&headers);
    let mut response = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The value of `key` in an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let raw = text
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)?
        .1;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The frames of the last 15 minutes, oldest first, for the charts of a page that just opened.
pub async fn stats(State(s): State<AdminState>) -> Response {
    let frames = s.controller.store().live().history();
    Json(frames.iter().map(|f| &**f).collect::<Vec<_>>()).into_response()
}

/// Server-sent events: `event: event` for every recorded event, `event: stats` once a second,
/// `event: lagged` when this client fell behind and missed some.
pub async fn stream(State(s): State<AdminState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = s.controller.store().live().subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(Live::Event(row)) => Event::default().event("event").data(row.to_string()),
            Ok(Live::Stats(frame)) => Event::default()
                .event("stats")
                .data(serde_json::to_string(&*frame).unwrap_or_default()),
            Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(n.to_string()),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(form_value(b"token=abc123", "token").as_deref(), Some("abc123"));
        assert_eq!(form_value(b"a=1&token=a%2Bb+c", "token").as_deref(), Some("a+b c"));
        assert_eq!(form_value(b"a=1", "token"), None);
        assert_eq!(form_value(b"token=%zz", "token"), None);
    }

    #[test]
    fn pages_keep_script_to_the_admin_origin() {
        assert!(!CSP.contains("unsafe-inline") && CSP.contains("script-src 'self'"));
        for html in [INDEX, LOGIN] {
            assert!(!html.contains("<script>"), "no inline script");
            let handler = html.split(" on").skip(1).any(|rest| {
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
                !name.is_empty() && rest[name.len()..].starts_with('=')
            });
            assert!(!handler, "no inline event handlers");
        }
    }
}
