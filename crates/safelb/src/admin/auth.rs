//! Authentication for the admin API: the bearer token (CLI, scripts) or a dashboard session
//! cookie (see `session.rs`). 401 without either, 403 with a wrong token or a cross-site write;
//! the token comparison takes the same time wherever the first differing byte is.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AdminState;

pub async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None if state.sessions.valid(request.headers()) => {
            if super::session::same_origin(request.method(), request.headers()) {
                next.run(request).await
            } else {
                (
                    StatusCode::FORBIDDEN,
                    Json(json!({ "error": "cross-site request refused: changes from the dashboard must come from its own page" })),
                )
                    .into_response()
            }
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({ "error": "missing `Authorization: Bearer <token>`: pass --token-file or SAFELB_TOKEN" })),
        )
            .into_response(),
        Some(token) if constant_time_eq(token.trim().as_bytes(), state.token.as_bytes()) => next.run(request).await,
        Some(_) => (StatusCode::FORBIDDEN, Json(json!({ "error": "wrong admin token" }))).into_response(),
    }
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
}
