//! The client side's response writer: the framing a response gets (RFC 9112 §6.3), its head
//! written for the client, and chunk framing. The request head is `request.rs`.

use super::*;

/// How a response's body travels to the client.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Framing {
    /// No body bytes at all (HEAD, 1xx, 204, 304); the length is what the head says.
    Empty(Option<u64>),
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a body of unknown length).
    Close,
}

/// The framing of a response to a request of `version` (RFC 9112 §6.3): the response's own
/// `Content-Length` (`declared`), else the body's exact size, else chunked (HTTP/1.1) or close.
pub(crate) fn response_framing(
    head_request: bool,
    status: StatusCode,
    declared: Option<u64>,
    exact: Option<u64>,
    version: Version,
) -> Framing {
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        return Framing::Empty(None);
    }
    if head_request || status == StatusCode::NOT_MODIFIED {
        return Framing::Empty(declared.or(exact.filter(|_| head_request)));
    }
    match (declared.or(exact), version) {
        (Some(n), _) => Framing::Length(n),
        (None, Version::HTTP_11) => Framing::Chunked,
        (None, _) => Framing::Close,
    }
}

/// The `Content-Length` a header map declares, if it holds a valid one.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Appends a response head to `out`: the status line in the client's `version`, the fields of
/// the header map and then those kept in wire form (`raw`), without the framing and connection
/// fields, which the codec writes itself from `framing` and `keep_alive`, and `date` when the
/// response has none.
pub(crate) fn encode_response_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    raw: Option<&RawFields>,
    version: Version,
    framing: Framing,
    keep_alive: bool,
    date: &[u8],
) {
    out.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // Transfer-Encoding and Connection are hop-by-hop: never among the kept fields.
    for (name, value) in raw.into_iter().flat_map(RawFields::kept) {
        if !name.eq_ignore_ascii_case(b"content-length") {
            put_field(out, name, value);
        }
    }
    match framing {
        Framing::Length(n) | Framing::Empty(Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty(None) | Framing::Close => {}
    }
    if !parts.headers.contains_key(http::header::DATE) && !raw.is_some_and(RawFields::has_date) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    match (keep_alive, version) {
        (false, Version::HTTP_11) => out.extend_from_slice(b"connection: close\r\n"),
        (true, Version::HTTP_10) => out.extend_from_slice(b"connection: keep-alive\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a response's own `Connection` field says `close` (a local answer that ends the
/// connection sets it).
pub(crate) fn says_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| lists(v.as_bytes(), b"close"))
}

/// Whether a comma-separated field value (`Connection`, `TE`) lists `token`, in any case.
pub(super) fn lists(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Appends one chunk's size line (hex), before its data.
pub(crate) fn chunk_header(out: &mut Vec<u8>, len: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk, with trailer fields when there are any to send.
pub(crate) fn chunked_end(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

fn itoa(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_follows_the_status_method_and_what_is_known_of_the_body() {
        let (none, cl) = (None, Some(12));
        let v11 = Version::HTTP_11;
        assert_eq!(
            response_framing(false, StatusCode::OK, cl, None, v11),
            Framing::Length(12)
        );
        assert_eq!(
            response_framing(false, StatusCode::OK, none, Some(3), v11),
            Framing::Length(3)
        );
        assert_eq!(
            response_framing(false, StatusCode::OK, none, None, v11),
            Framing::Chunked
        );
        assert_eq!(
            response_framing(false, StatusCode::OK, none, None, Version::HTTP_10),
            Framing::Close
        );
        assert_eq!(
            response_framing(true, StatusCode::OK, cl, Some(0), v11),
            Framing::Empty(Some(12))
        );
        assert_eq!(
            response_framing(true, StatusCode::OK, none, Some(7), v11),
            Framing::Empty(Some(7))
        );
        assert_eq!(
            response_framing(false, StatusCode::NO_CONTENT, cl, None, v11),
            Framing::Empty(None)
        );
        assert_eq!(
            response_framing(false, StatusCode::NOT_MODIFIED, cl, None, v11),
            Framing::Empty(Some(12))
        );
    }

    #[test]
    fn the_response_head_carries_framing_date_and_connection_once() {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        let h = &mut parts.headers;
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        h.insert(CONNECTION, HeaderValue::from_static("close"));
        let mut out = Vec::new();
        let date = b"Wed, 02 Dec 2026 16:00:00 GMT";
        encode_response_head(
            &mut out,
            &parts,
            None,
            Version::HTTP_11,
            Framing::Length(5),
            false,
            date,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: Wed, 02 Dec 2026 16:00:00 GMT\r\nconnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        parts
            .headers
            .insert(http::header::DATE, HeaderValue::from_static("then"));
        parts.status = StatusCode::NOT_FOUND;
        encode_response_head(&mut out, &parts, None, Version::HTTP_10, Framing::Close, true, date);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.0 404 Not Found\r\nx-a: 1\r\ndate: then\r\nconnection: keep-alive\r\n\r\n"
        );
        let mut out = Vec::new();
        chunk_header(&mut out, 0x1a2b);
        chunked_end(&mut out, Some(&parts.headers));
        assert!(out.starts_with(b"1a2b\r\n0\r\nx-a: 1\r\n"));
        assert!(out.ends_with(b"\r\n\r\n"));
    }
}
