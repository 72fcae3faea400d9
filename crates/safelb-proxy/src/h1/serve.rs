//! The client side's codec: a request head parsed off the connection's buffer, and a response
//! head written for the client (RFC 9112).
//!
//! Only plain heads are taken: HTTP/1.0 or 1.1, any method but CONNECT, no body (or
//! `Content-Length: 0`), no `Transfer-Encoding`, `Upgrade` or `Expect`. Every other head, and
//! every head this parser finds malformed or too large, is [`Parsed::Declined`]: the caller
//! gives the connection, with the bytes already read, to hyper, whose answers to those heads
//! (400, 414, 431, bodies, 100-continue, upgrades) are the ones the tests pin down.

use super::*;

/// Most header fields in one request head (hyper's limit, so a declined head meets the same).
const MAX_REQUEST_HEADERS: usize = 100;

/// A request head this codec serves.
pub(crate) struct RequestHead {
    pub(crate) request: http::Request<()>,
    /// The client may send another request on this connection (RFC 9112 §9.3).
    pub(crate) keep_alive: bool,
    /// The client said `TE: trailers`: a chunked response may end with trailer fields.
    pub(crate) trailers: bool,
}

// Returned once per request and taken apart at once: a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Parsed {
    /// Not a whole head yet, and within the size limit.
    Partial,
    /// Left to hyper (see the module doc).
    Declined,
    Request(RequestHead),
}

/// Parses one request head off the front of `buf` (its bytes are split off when it is taken);
/// a head longer than `max_head` is declined, complete or not.
pub(crate) fn parse_request(buf: &mut BytesMut, max_head: usize) -> Parsed {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() <= max_head => return Parsed::Partial,
        _ => return Parsed::Declined,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Declined;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Declined;
    };
    if method == Method::CONNECT {
        return Parsed::Declined;
    }
    let version = if version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut head = RequestHead {
        request: http::Request::new(()),
        keep_alive: version == Version::HTTP_11,
        trailers: false,
    };
    // Decided on the parser's fields, before any byte leaves `buf`: a declined head stays whole
    // for hyper.
    let mut close = false;
    let mut lengths = 0;
    for field in req.headers.iter() {
        let name = field.name.as_bytes();
        let value = field.value;
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
            || (name.eq_ignore_ascii_case(b"content-length") && (value.is_empty() || value.iter().any(|&b| b != b'0')))
        {
            return Parsed::Declined;
        }
        // hyper folds repeated equal lengths into one field; such heads are left to it.
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            if lengths > 1 {
                return Parsed::Declined;
            }
        }
        if name.eq_ignore_ascii_case(b"connection") {
            close |= lists(value, b"close");
            head.keep_alive |= version == Version::HTTP_10 && lists(value, b"keep-alive");
        } else if name.eq_ignore_ascii_case(b"te") {
            head.trailers |= lists(value, b"trailers");
        }
    }
    // `close` anywhere wins over `keep-alive` elsewhere.
    head.keep_alive &= !close;
    // Offsets of the target and of each name and value, so the parts can share the head's bytes.
    let base = buf.as_ptr() as usize;
    let target = (path.as_ptr() as usize - base, path.len());
    let count = req.headers.len();
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_REQUEST_HEADERS];
    field_spans(base, req.headers, &mut spans);
    let bytes = buf.split_to(len).freeze();
    // A head the `http` types refuse after all goes back whole, for hyper.
    let decline = |buf: &mut BytesMut| {
        let mut whole = BytesMut::from(&bytes[..]);
        whole.extend_from_slice(buf);
        *buf = whole;
        Parsed::Declined
    };
    let Ok(uri) = http::Uri::from_maybe_shared(bytes.slice(target.0..target.0 + target.1)) else {
        return decline(buf);
    };
    // Room for what the request path adds (X-Forwarded-For, -Proto, -Host, X-Request-Id): a map
    // that grows while they go in rehashes every field (callgrind: 2.4k instructions a request).
    let mut headers = HeaderMap::with_capacity(count + 4);
    for &(ns, ne, vs, ve) in &spans[..count] {
        let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&bytes[ns..ne]),
            HeaderValue::from_maybe_shared(bytes.slice(vs..ve)),
        ) else {
            return decline(buf);
        };
        headers.append(name, value);
    }
    let r = &mut head.request;
    *r.method_mut() = method;
    *r.uri_mut() = uri;
    *r.version_mut() = version;
    *r.headers_mut() = headers;
    Parsed::Request(head)
}

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
fn lists(value: &[u8], token: &[u8]) -> bool {
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

    fn parse(head: &[u8]) -> Parsed {
        parse_request(&mut BytesMut::from(head), 16 * 1024)
    }

    fn request(head: &[u8]) -> RequestHead {
        match parse(head) {
            Parsed::Request(r) => r,
            Parsed::Partial => panic!("partial: {}", String::from_utf8_lossy(head)),
            Parsed::Declined => panic!("declined: {}", String::from_utf8_lossy(head)),
        }
    }

    #[test]
    fn a_plain_head_is_parsed_and_split_off_the_buffer() {
        let mut buf =
            BytesMut::from(&b"GET /a?b=1 HTTP/1.1\r\nHost: x.example\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /next"[..]);
        let Parsed::Request(head) = parse_request(&mut buf, 1024) else {
            panic!("not parsed");
        };
        assert_eq!(&buf[..], b"GET /next", "the next request's bytes stay");
        let r = head.request;
        assert_eq!(
            (r.method(), r.uri().path(), r.uri().query()),
            (&Method::GET, "/a", Some("b=1"))
        );
        assert_eq!(r.version(), Version::HTTP_11);
        assert_eq!(r.headers()["host"], "x.example");
        assert_eq!(r.headers().get_all("x-a").iter().count(), 2);
        assert!(head.keep_alive && !head.trailers);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_options() {
        assert!(!request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n").keep_alive);
        assert!(
            !request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n").keep_alive
        );
        assert!(!request(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(request(b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n").trailers);
    }

    #[test]
    fn heads_with_a_body_an_upgrade_or_trouble_go_to_hyper() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"GET http://a b/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://[::1/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(
                matches!(parse(head), Parsed::Declined),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        let many = head_with_fields(b"GET / HTTP/1.1\r\n", 101);
        assert!(matches!(parse(&many), Parsed::Declined), "more than 100 fields");
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"),
            Parsed::Request(_)
        ));
    }

    #[test]
    fn a_head_over_the_limit_is_declined_complete_or_not() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(100));
        assert!(matches!(
            parse_request(&mut BytesMut::from(long.as_bytes()), 64),
            Parsed::Declined
        ));
        assert!(matches!(
            parse_request(&mut BytesMut::from(&long.as_bytes()[..60]), 64),
            Parsed::Partial
        ));
        assert!(matches!(
            parse_request(&mut BytesMut::from(&long.as_bytes()[..70]), 64),
            Parsed::Declined
        ));
    }

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
