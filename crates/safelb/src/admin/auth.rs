//! Authentication for the admin API: named bearer tokens with a role each (CLI, scripts) or a
//! dashboard session cookie (see `session.rs`) that carries the token's name and role.
//!
//! 401 without credentials, 403 with a wrong token, a cross-site write, or a `read` token asking
//! for a change. Token comparison takes the same time wherever the first differing byte is and
//! whichever token matches. Failed attempts are counted per client address; past
//! [`FAILURES_ALLOWED`] in [`FAILURE_WINDOW`], that address gets 429 until the window ends, so
//! a token cannot be guessed at network speed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AdminState;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Status, history, diffs, events, incidents, plans, the dashboard's views.
    Read,
    /// Everything `read` may, and changes: apply, rollback, drain.
    Operate,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "operate" => Some(Role::Operate),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
        }
    }
}

/// Who made an authenticated request: the token's name and role. Handlers record the name as
/// the author of every change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The author recorded for a change: the token's name, and the person the client says it
    /// acts for (`--author`, `$USER`) when that is another name.
    pub fn author(&self, claimed: Option<&str>) -> String {
        match claimed.map(str::trim).filter(|c| !c.is_empty() && *c != self.name) {
            Some(user) => format!("{} ({user})", self.name),
            None => self.name.clone(),
        }
    }
}

struct Token {
    caller: Caller,
    secret: String,
}

/// The tokens this admin API accepts.
pub struct Tokens(Vec<Token>);

/// Shortest secret accepted: 16 characters.
const MIN_SECRET: usize = 16;

impl Tokens {
    /// One token named `admin` with role `operate` (the generated or `token_file` token).
    pub fn single(secret: &str) -> Tokens {
        Tokens(vec![Token {
            caller: Caller {
                name: "admin".into(),
                role: Role::Operate,
            },
            secret: secret.trim().to_string(),
        }])
    }

    /// A tokens file: one `NAME ROLE SECRET` per line; blank lines and `#` comments skipped.
    pub fn parse(path: &Path, text: &str) -> Result<Tokens, String> {
        let mut out: Vec<Token> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let at = format!("{}:{}", path.display(), i + 1);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, secret] = fields[..] else {
                return Err(format!(
                    "{at}: expected `NAME ROLE SECRET` (three fields), found {}",
                    fields.len()
                ));
            };
            let role = Role::parse(role).ok_or_else(|| format!("{at}: role `{role}` is not `read` or `operate`"))?;
            if secret.len() < MIN_SECRET {
                return Err(format!(
                    "{at}: the secret of `{name}` is shorter than {MIN_SECRET} characters"
                ));
            }
            if out.iter().any(|t| t.caller.name == name) {
                return Err(format!("{at}: a second token named `{name}`"));
            }
            if out.iter().any(|t| t.secret == secret) {
                return Err(format!("{at}: `{name}` has the same secret as another token"));
            }
            out.push(Token {
                caller: Caller {
                    name: name.to_string(),
                    role,
                },
                secret: secret.to_string(),
            });
        }
        if out.is_empty() {
            return Err(format!(
                "{}: no token (expected `NAME ROLE SECRET` lines)",
                path.display()
            ));
        }
        Ok(Tokens(out))
    }

    /// The caller a presented secret belongs to. Every token is compared in full, so the time
    /// taken does not tell which one (or how much of one) matched.
    pub fn find(&self, given: &str) -> Option<Caller> {
        let given = given.trim().as_bytes();
        let mut found = None;
        for t in &self.0 {
            if constant_time_eq(given, t.secret.as_bytes()) {
                found = Some(t.caller.clone());
            }
        }
        found
    }

    pub fn names(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|t| format!("{} ({})", t.caller.name, t.caller.role.as_str()))
            .collect()
    }
}

/// Failed attempts allowed per client address within [`FAILURE_WINDOW`].
pub const FAILURES_ALLOWED: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most; a flood from many addresses cannot grow memory past it.
const MAX_ADDRESSES: usize = 4096;

/// Failed authentications, per client address and in total.
#[derive(Default)]
pub struct Failures {
    by_addr: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Wrong or missing credentials (each one, limited or not).
    pub failed: AtomicU64,
    /// Attempts refused with 429 without being checked.
    pub limited: AtomicU64,
}

impl Failures {
    /// Seconds until `ip` may try again, when it has used up its failures.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        let by_addr = self.by_addr.lock().expect("failure lock is never poisoned");
        let (since, n) = by_addr.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (*n >= FAILURES_ALLOWED).then(|| left.as_secs().max(1))
    }

    pub fn record(&self, ip: IpAddr) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut by_addr = self.by_addr.lock().expect("failure lock is never poisoned");
        if by_addr.len() >= MAX_ADDRESSES && !by_addr.contains_key(&ip) {
            by_addr.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
            if by_addr.len() >= MAX_ADDRESSES {
                // Still full of live entries: forget the oldest one.
                if let Some(oldest) = by_addr.iter().min_by_key(|(_, (since, _))| *since).map(|(k, _)| *k) {
                    by_addr.remove(&oldest);
                }
            }
        }
        let entry = by_addr.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }

    /// The 429 for an address that used up its failures.
    pub fn too_many(&self, retry_after: u64) -> Response {
        self.limited.fetch_add(1, Ordering::Relaxed);
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after.to_string())],
            Json(json!({ "error": format!("too many failed authentications from this address: try again in {retry_after} s") })),
        )
            .into_response()
    }
}

/// May `caller` make this request? Changes need `operate`; a plan changes nothing.
fn allowed(caller: &Caller, method: &Method, path: &str) -> bool {
    caller.role == Role::Operate || matches!(*method, Method::GET | Method::HEAD) || path.ends_with("/plan")
}

pub async fn require_token(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Some(retry) = state.failures.blocked(peer.ip()) {
        return state.failures.too_many(retry);
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let caller = match given {
        None => match state.sessions.caller(request.headers()) {
            Some(caller) if super::session::same_origin(request.method(), request.headers()) => caller,
            Some(_) => {
                return (
                    StatusCode::FORBIDDEN,
                    Json(json!({ "error": "cross-site request refused: changes from the dashboard must come from its own page" })),
                )
                    .into_response()
            }
            None => {
                state.failures.record(peer.ip());
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    Json(json!({ "error": "missing `Authorization: Bearer <token>`: pass --token-file or SAFELB_TOKEN" })),
                )
                    .into_response();
            }
        },
        Some(token) => match state.tokens.find(token) {
            Some(caller) => caller,
            None => {
                state.failures.record(peer.ip());
                return (StatusCode::FORBIDDEN, Json(json!({ "error": "wrong admin token" }))).into_response();
            }
        },
    };
    if !allowed(&caller, request.method(), request.uri().path()) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({ "error": format!("token `{}` has role `{}`; this request changes something and needs role `operate`", caller.name, caller.role.as_str()) })),
        )
            .into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Equal-length inputs are compared in full; only the length can leak, which a random token
/// of fixed length does not mind.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn a_tokens_file_names_each_token_and_its_role() {
        let path = Path::new("tokens");
        let t = Tokens::parse(
            path,
            "# who\nci operate 0123456789abcdef01\n\nviewer   read  fedcba9876543210ff\n",
        )
        .unwrap();
        assert_eq!(t.find("0123456789abcdef01").unwrap().name, "ci");
        assert_eq!(t.find(" fedcba9876543210ff\n").unwrap().role, Role::Read);
        assert_eq!(t.find("0123456789abcdef0"), None);
        for (text, says) in [
            (
                "ci operate",
                "tokens:1: expected `NAME ROLE SECRET` (three fields), found 2",
            ),
            (
                "ci admin 0123456789abcdef01",
                "tokens:1: role `admin` is not `read` or `operate`",
            ),
            ("ci read short", "tokens:1: the secret of `ci` is shorter than 16"),
            (
                "a read 0123456789abcdef01\na operate 0123456789abcdef02",
                "tokens:2: a second token named `a`",
            ),
            (
                "a read 0123456789abcdef01\nb operate 0123456789abcdef01",
                "tokens:2: `b` has the same secret",
            ),
            ("# nothing\n", "tokens: no token"),
        ] {
            let e = Tokens::parse(path, text).err().unwrap();
            assert!(e.starts_with(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn read_tokens_may_look_and_plan_but_not_change() {
        let reader = Caller {
            name: "r".into(),
            role: Role::Read,
        };
        assert!(allowed(&reader, &Method::GET, "/api/v1/status"));
        assert!(allowed(&reader, &Method::POST, "/api/v1/plan"));
        assert!(!allowed(&reader, &Method::POST, "/api/v1/apply"));
        assert!(!allowed(&reader, &Method::POST, "/api/v1/rollback"));
        assert!(!allowed(&reader, &Method::POST, "/api/v1/backends/127.0.0.1:1/drain"));
        assert_eq!(reader.author(Some("ana")), "r (ana)");
        assert_eq!(reader.author(Some("r")), "r");
        assert_eq!(reader.author(None), "r");
    }

    #[test]
    fn an_address_is_limited_after_its_failures_and_others_are_not() {
        let f = Failures::default();
        let bad: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..FAILURES_ALLOWED - 1 {
            f.record(bad);
        }
        assert_eq!(f.blocked(bad), None);
        f.record(bad);
        assert!(f.blocked(bad).is_some_and(|s| (1..=60).contains(&s)));
        assert_eq!(f.blocked("127.0.0.3".parse().unwrap()), None);
        assert_eq!(f.failed.load(Ordering::Relaxed), u64::from(FAILURES_ALLOWED));
    }
}
