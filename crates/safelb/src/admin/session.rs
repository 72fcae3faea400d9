//! Browser sessions for the dashboard: the login page trades the admin token for a random
//! session id in an `HttpOnly`, `SameSite=Strict` cookie, so the token never sits in a page, a
//! URL or the browser's storage. Sessions live in memory (a restart logs everyone out) and end
//! after [`LIFETIME`] or at logout.
//!
//! A request authenticated by its cookie that changes something must also come from the
//! dashboard's own origin (`Origin` equal to the address it was sent to): a cross-site form or
//! script that makes the browser attach the cookie is refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, Method};

use super::auth::Caller;

pub const COOKIE: &str = "safelb_session";
/// How long a session lasts after login.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest are dropped first (a flood of logins cannot grow memory).
const MAX_SESSIONS: usize = 1024;

/// Hex of `n` bytes from the operating system's CSPRNG, through rustls's provider
/// ([`safelb_proxy::tls::crypto`]): session ids and the generated admin token.
pub fn secret_hex(n: usize) -> Result<String, String> {
    let mut bytes = vec![0u8; n];
    safelb_proxy::tls::crypto()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "the system random number generator failed".to_string())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Default)]
pub struct Sessions {
    /// Session id -> when it ends and whose token opened it.
    live: Mutex<HashMap<String, (Instant, Caller)>>,
}

impl Sessions {
    /// A new session for `caller`; its id goes into the cookie.
    pub fn create(&self, caller: Caller) -> Result<String, String> {
        let id = secret_hex(32)?;
        let mut live = self.live.lock().expect("session lock is never poisoned");
        let now = Instant::now();
        live.retain(|_, (until, _)| *until > now);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live.iter().min_by_key(|(_, (until, _))| *until).map(|(k, _)| k.clone()) {
                live.remove(&oldest);
            }
        }
        live.insert(id.clone(), (now + LIFETIME, caller));
        Ok(id)
    }

    /// Whose live session the request's cookie names, if any.
    pub fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        let id = cookie(headers)?;
        let live = self.live.lock().expect("session lock is never poisoned");
        live.get(id)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, caller)| caller.clone())
    }

    /// Ends the request's session, if it has one.
    pub fn end(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers) {
            self.live.lock().expect("session lock is never poisoned").remove(id);
        }
    }
}

/// The session id in the request's `Cookie` header.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    safelb_proxy::headers::cookie(headers, COOKIE)
}

/// The `Set-Cookie` value for a new session (`Secure` when the dashboard is served over TLS).
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// May a cookie-authenticated request with this method and these headers change something?
/// Reads pass; writes need an `Origin` naming the host the request was sent to.
pub fn same_origin(method: &Method, headers: &HeaderMap) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return true;
    }
    let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    authority.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_session_is_valid_until_logout_and_keeps_its_caller() {
        let s = Sessions::default();
        let viewer = Caller {
            name: "viewer".into(),
            role: super::super::auth::Role::Read,
        };
        let id = s.create(viewer.clone()).unwrap();
        assert_eq!(id.len(), 64);
        let with = headers(&[("cookie", &format!("theme=dark; {COOKIE}={id}"))]);
        assert_eq!(s.caller(&with), Some(viewer));
        assert_eq!(s.caller(&headers(&[("cookie", &format!("{COOKIE}=guess"))])), None);
        assert_eq!(s.caller(&HeaderMap::new()), None);
        s.end(&with);
        assert_eq!(s.caller(&with), None);
    }

    #[test]
    fn writes_need_the_dashboards_own_origin() {
        let host = ("host", "127.0.0.1:9090");
        assert!(same_origin(&Method::GET, &headers(&[host])));
        assert!(same_origin(
            &Method::POST,
            &headers(&[host, ("origin", "http://127.0.0.1:9090")])
        ));
        assert!(!same_origin(
            &Method::POST,
            &headers(&[host, ("origin", "http://evil.example")])
        ));
        assert!(!same_origin(&Method::POST, &headers(&[host])), "no Origin: refused");
        assert!(!same_origin(&Method::POST, &headers(&[host, ("origin", "null")])));
    }

    #[test]
    fn cookie_flags() {
        let c = set_cookie("abc", true);
        for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Max-Age=43200", "Path=/"] {
            assert!(c.contains(flag), "{c}");
        }
        assert!(!set_cookie("abc", false).contains("Secure"));
    }
}
