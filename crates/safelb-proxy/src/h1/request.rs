//! The client's request head as it arrived: parsed once off the connection's buffer, its fields
//! kept as offsets into the head's bytes, looked up by a scan instead of a hash, and written to
//! the backend with the proxy's edits in one pass (hop-by-hop fields left out, `X-Forwarded-*`
//! and a request id added).
//!
//! A relayed request needs no header map: building one, inserting four fields into it, encoding
//! it and dropping it was a sixth of a small request's instructions (docs/performance.md). The
//! map is still built, by [`RequestHead::to_http`], for the requests the wire form does not
//! serve (see `proxy/wire.rs`).
//!
//! Only plain heads are taken: HTTP/1.0 or 1.1, any method but CONNECT, no body (or
//! `Content-Length: 0`), no `Transfer-Encoding`, `Upgrade` or `Expect`. Every other head, and
//! every head this parser finds malformed or too large, is [`Parsed::Declined`]: the caller
//! gives the connection, with the bytes already read, to hyper, whose answers to those heads
//! (400, 414, 431, bodies, 100-continue, upgrades) are the ones the tests pin down.
//!
//! The edits follow `crate::headers` rule for rule (`strip_hop_by_hop`, `add_forwarded`,
//! `request_id`); the `request_head` fuzz target and its property test check that both give the
//! same fields for every head the wire form serves.

use super::head::offsets;
use super::serve::lists;
use super::*;
use crate::headers::{is_hop_by_hop, names_other_fields, sane_request_id, visible_ascii, Fields};

/// Most header fields in one request head (hyper's limit, so a declined head meets the same).
const MAX_REQUEST_HEADERS: usize = 100;

/// Where one field's name and value are in the head's bytes.
#[derive(Clone, Copy, Default)]
pub(crate) struct FieldSpan {
    name: (u32, u32),
    value: (u32, u32),
}

/// A request head this codec serves.
pub(crate) struct RequestHead {
    /// The head as the client sent it; the target and field values share these bytes.
    bytes: Bytes,
    pub(crate) method: Method,
    pub(crate) uri: http::Uri,
    pub(crate) version: Version,
    /// Kept by the connection from one request to the next (see [`RequestHead::into_fields`]).
    fields: Vec<FieldSpan>,
    /// The client may send another request on this connection (RFC 9112 §9.3).
    pub(crate) keep_alive: bool,
    /// The client said `TE: trailers`: a chunked response may end with trailer fields.
    pub(crate) trailers: bool,
    /// How many `Host` fields the head has.
    hosts: u8,
    /// Where the first `Host` value is (read on every request: routing, samples, forwarding).
    host: Option<(u32, u32)>,
    /// A hop-by-hop field is present (they are left out of the upstream head).
    hop_by_hop: bool,
    /// A `Connection` field names other fields (hop-by-hop too): left to the header map's rules.
    names_fields: bool,
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
/// a head longer than `max_head` is declined, complete or not. `spans` is the connection's
/// field list, handed back by [`RequestHead::into_fields`] after each request (no allocation
/// per request).
pub(crate) fn parse_request(buf: &mut BytesMut, max_head: usize, spans: &mut Vec<FieldSpan>) -> Parsed {
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
    let (mut keep_alive, mut trailers, mut close) = (version == Version::HTTP_11, false, false);
    let (mut hosts, mut host, mut hop_by_hop, mut names_fields) = (0u8, None, false, false);
    let base = buf.as_ptr() as usize;
    // Decided on the parser's fields, before any byte leaves `buf`: a declined head stays whole
    // for hyper.
    let mut lengths = 0;
    for field in req.headers.iter() {
        let name = field.name.as_bytes();
        let value = field.value;
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
            || (name.eq_ignore_ascii_case(b"content-length") && (value.is_empty() || value.iter().any(|&b| b != b'0')))
            // Longer than a header name may be (http's limit): the map could not hold it.
            || name.len() > usize::from(u16::MAX)
        {
            return Parsed::Declined;
        }
        if name.eq_ignore_ascii_case(b"host") {
            hosts = hosts.saturating_add(1);
            host.get_or_insert(offsets(base, value));
            continue;
        }
        // hyper folds repeated equal lengths into one field; such heads are left to it.
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            if lengths > 1 {
                return Parsed::Declined;
            }
        }
        if !is_hop_by_hop(name) {
            continue;
        }
        hop_by_hop = true;
        if name.eq_ignore_ascii_case(b"connection") {
            close |= lists(value, b"close");
            keep_alive |= version == Version::HTTP_10 && lists(value, b"keep-alive");
            names_fields |= names_other_fields(value);
        } else if name.eq_ignore_ascii_case(b"te") {
            trailers |= lists(value, b"trailers");
        }
    }
    // `close` anywhere wins over `keep-alive` elsewhere.
    keep_alive &= !close;
    let target = offsets(base, path.as_bytes());
    spans.clear();
    spans.extend(req.headers.iter().map(|field| FieldSpan {
        name: offsets(base, field.name.as_bytes()),
        value: offsets(base, field.value),
    }));
    let bytes = buf.split_to(len).freeze();
    let Ok(uri) = http::Uri::from_maybe_shared(bytes.slice(target.0 as usize..target.1 as usize)) else {
        // A target the `http` types refuse goes back whole, for hyper.
        let mut whole = BytesMut::from(&bytes[..]);
        whole.extend_from_slice(buf);
        *buf = whole;
        return Parsed::Declined;
    };
    Parsed::Request(RequestHead {
        bytes,
        method,
        uri,
        version,
        fields: std::mem::take(spans),
        keep_alive,
        trailers,
        hosts,
        host,
        hop_by_hop,
        names_fields,
    })
}

impl Fields for RequestHead {
    fn first(&self, name: &str) -> Option<&[u8]> {
        self.named(name.as_bytes()).next().map(|f| self.value(f))
    }

    fn each<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> {
        self.named(name.as_bytes()).map(|f| self.value(f))
    }
}

impl RequestHead {
    /// The connection's field list, for the next [`parse_request`].
    pub(crate) fn into_fields(self) -> Vec<FieldSpan> {
        self.fields
    }

    /// The fields called `name` (any case), in order.
    fn named<'s, 'n>(&'s self, name: &'n [u8]) -> impl Iterator<Item = &'s FieldSpan> + use<'s, 'n> {
        self.fields
            .iter()
            .filter(move |f| self.name(f).eq_ignore_ascii_case(name))
    }

    fn name(&self, f: &FieldSpan) -> &[u8] {
        &self.bytes[f.name.0 as usize..f.name.1 as usize]
    }

    fn value(&self, f: &FieldSpan) -> &[u8] {
        &self.bytes[f.value.0 as usize..f.value.1 as usize]
    }

    /// The first `Host` value, when it is text (as `Fields::first_str("host")`, without the scan).
    pub(crate) fn host(&self) -> Option<&str> {
        self.host
            .and_then(|(start, end)| visible_ascii(&self.bytes[start as usize..end as usize]))
    }

    /// Whether the wire form can carry this request to a backend as the header map would: one
    /// `Host` on HTTP/1.1 (at most one on 1.0), an origin-form target, and no field named by
    /// `Connection`. The rest (refusals, absolute targets) takes the map's path.
    pub(crate) fn is_plain(&self) -> bool {
        let hosts_ok = match self.version {
            Version::HTTP_10 => self.hosts <= 1,
            _ => self.hosts == 1,
        };
        hosts_ok && !self.names_fields && self.uri.scheme().is_none() && self.uri.authority().is_none()
    }

    /// The client's own request id when it is one safelb keeps (`headers::request_id`'s rule).
    pub(crate) fn client_request_id(&self) -> Option<HeaderValue> {
        let f = self.named(b"x-request-id").next()?;
        let value = self.bytes.slice(f.value.0 as usize..f.value.1 as usize);
        sane_request_id(&value).then(|| HeaderValue::from_maybe_shared(value).ok())?
    }

    /// Appends the head a backend gets for a plain request ([`RequestHead::is_plain`]): the
    /// client's request line as HTTP/1.1 and its fields in their order and case, without the
    /// hop-by-hop ones, with `X-Forwarded-For` (the client's first one extended),
    /// `X-Forwarded-Proto` and `X-Forwarded-Host` (when there is a Host) replacing the client's,
    /// and `new_id` replacing any `X-Request-Id` when the client's was not kept.
    pub(crate) fn write_upstream(
        &self,
        out: &mut Vec<u8>,
        client_ip: &HeaderValue,
        proto: &str,
        new_id: Option<&HeaderValue>,
    ) {
        // One allocation on a connection's first request (growing by doubling took five).
        out.reserve(self.bytes.len() + client_ip.len() + proto.len() + 128);
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let host = self.host.map(|(start, end)| &self.bytes[start as usize..end as usize]);
        let mut prior_xff: Option<&[u8]> = None;
        for f in &self.fields {
            let (name, value) = (self.name(f), self.value(f));
            // One length test passes most fields by: the edited names are 12, 15, 16 and 17 bytes long.
            let edited = match name.len() {
                12 => new_id.is_some() && name.eq_ignore_ascii_case(b"x-request-id"),
                15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => {
                    prior_xff.get_or_insert(value);
                    true
                }
                16 => name.eq_ignore_ascii_case(b"x-forwarded-host") && host.is_some(),
                17 => name.eq_ignore_ascii_case(b"x-forwarded-proto"),
                _ => false,
            };
            if edited || (self.hop_by_hop && is_hop_by_hop(name)) {
                continue;
            }
            put_field(out, name, value);
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        // As `add_forwarded`: the client's first value, when it is visible ASCII and not empty.
        if let Some(prior) = prior_xff.filter(|p| !p.is_empty() && visible_ascii(p).is_some()) {
            out.extend_from_slice(prior);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
        put_field(out, b"x-forwarded-proto", proto.as_bytes());
        if let Some(host) = host {
            put_field(out, b"x-forwarded-host", host);
        }
        if let Some(id) = new_id {
            put_field(out, b"x-request-id", id.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }

    /// The request in `http` form, as hyper would have parsed it (the fuzz target checks that).
    pub(crate) fn to_http(&self) -> http::Request<()> {
        let mut request = http::Request::new(());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        // Room for what the request path adds (X-Forwarded-For, -Proto, -Host, X-Request-Id): a
        // map that grows while they go in rehashes every field.
        let headers = request.headers_mut();
        headers.reserve(self.fields.len() + 4);
        for f in &self.fields {
            let name = HeaderName::from_bytes(self.name(f)).expect("httparse checked the name's bytes");
            let value = HeaderValue::from_maybe_shared(self.bytes.slice(f.value.0 as usize..f.value.1 as usize))
                .expect("httparse checked the value's bytes");
            headers.append(name, value);
        }
        request
    }
}

/// A head [`RequestHead::write_upstream`] wrote, read back in `http` form (what a request in
/// wire form becomes when it must go to another version).
pub(crate) fn read_back(head: &[u8]) -> Option<http::Request<()>> {
    // The client's fields and the four the proxy adds.
    let mut fields = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS + 4];
    let mut parsed = httparse::Request::new(&mut fields);
    parsed.parse(head).ok()?.is_complete().then_some(())?;
    let mut request = http::Request::new(());
    *request.method_mut() = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    *request.uri_mut() = http::Uri::try_from(parsed.path?).ok()?;
    let headers = request.headers_mut();
    for field in parsed.headers.iter() {
        headers.append(
            HeaderName::from_bytes(field.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(field.value).ok()?,
        );
    }
    Some(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &[u8]) -> Parsed {
        parse_request(&mut BytesMut::from(head), 16 * 1024, &mut Vec::new())
    }

    fn request(head: &[u8]) -> RequestHead {
        match parse(head) {
            Parsed::Request(r) => r,
            Parsed::Partial => panic!("partial: {}", String::from_utf8_lossy(head)),
            Parsed::Declined => panic!("declined: {}", String::from_utf8_lossy(head)),
        }
    }

    fn upstream(head: &[u8], new_id: Option<&'static str>) -> String {
        let mut out = Vec::new();
        let id = new_id.map(HeaderValue::from_static);
        request(head).write_upstream(&mut out, &HeaderValue::from_static("10.0.0.9"), "http", id.as_ref());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_plain_head_is_parsed_and_split_off_the_buffer() {
        let mut buf =
            BytesMut::from(&b"GET /a?b=1 HTTP/1.1\r\nHost: x.example\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /next"[..]);
        let Parsed::Request(head) = parse_request(&mut buf, 1024, &mut Vec::new()) else {
            panic!("not parsed");
        };
        assert_eq!(&buf[..], b"GET /next", "the next request's bytes stay");
        assert_eq!(head.first_str("HOST"), Some("x.example"));
        assert_eq!(head.first("x-a"), Some(&b"1"[..]), "the first of two");
        assert!(head.is_plain());
        let r = head.to_http();
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
        let parse = |bytes: &[u8]| parse_request(&mut BytesMut::from(bytes), 64, &mut Vec::new());
        assert!(matches!(parse(long.as_bytes()), Parsed::Declined));
        assert!(matches!(parse(&long.as_bytes()[..60]), Parsed::Partial));
        assert!(matches!(parse(&long.as_bytes()[..70]), Parsed::Declined));
    }

    #[test]
    fn heads_the_wire_form_does_not_forward_take_the_maps_path() {
        for head in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
            b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, x-secret\r\nX-Secret: 1\r\n\r\n",
        ] {
            assert!(!request(head).is_plain(), "{}", String::from_utf8_lossy(head));
        }
        assert!(request(b"GET / HTTP/1.0\r\n\r\n").is_plain(), "HTTP/1.0 may omit Host");
        assert!(request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, TE\r\nTE: trailers\r\n\r\n").is_plain());
    }

    #[test]
    fn the_upstream_head_keeps_the_clients_fields_and_replaces_the_forwarding_ones() {
        assert_eq!(
            upstream(
                b"GET /a?b HTTP/1.0\r\nHost: shop.example\r\nConnection: keep-alive\r\nX-Forwarded-For: 1.2.3.4\r\n\
                  X-Forwarded-Proto: https\r\nx-forwarded-for: 5.6.7.8\r\nKeep-Alive: timeout=5\r\nAccept: */*\r\n\
                  X-Forwarded-Host: evil\r\n\r\n",
                Some("abc"),
            ),
            "GET /a?b HTTP/1.1\r\nHost: shop.example\r\nAccept: */*\r\nx-forwarded-for: 1.2.3.4, 10.0.0.9\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: shop.example\r\nx-request-id: abc\r\n\r\n"
        );
        // Without a Host, the client's X-Forwarded-Host stays; a kept request id stays as sent.
        assert_eq!(
            upstream(
                b"GET / HTTP/1.0\r\nX-Forwarded-Host: a\r\nX-Request-Id: mine\r\nX-Forwarded-For:\r\n\r\n",
                None
            ),
            "GET / HTTP/1.1\r\nX-Forwarded-Host: a\r\nX-Request-Id: mine\r\nx-forwarded-for: 10.0.0.9\r\n\
             x-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn a_head_written_for_the_backend_reads_back_as_the_request_it_says() {
        let head = upstream(
            b"DELETE /a?b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
            Some("id"),
        );
        let r = read_back(head.as_bytes()).expect("a whole head");
        assert_eq!((r.method(), r.uri().to_string().as_str()), (&Method::DELETE, "/a?b"));
        let fields: Vec<_> = r
            .headers()
            .iter()
            .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
            .collect();
        assert_eq!(
            fields,
            [
                "host=x",
                "x-a=1",
                "x-a=2",
                "x-forwarded-for=10.0.0.9",
                "x-forwarded-proto=http",
                "x-forwarded-host=x",
                "x-request-id=id"
            ]
        );
    }

    #[test]
    fn a_sane_client_request_id_is_kept_and_others_are_replaced() {
        let id = |head: &[u8]| request(head).client_request_id();
        assert_eq!(
            id(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: r-1\r\nX-Request-Id: r-2\r\n\r\n").unwrap(),
            "r-1"
        );
        assert!(id(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id:\r\n\r\n").is_none());
        assert!(id(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: caf\xc3\xa9\r\n\r\n").is_none());
        let long = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: {}\r\n\r\n", "a".repeat(129));
        assert!(id(long.as_bytes()).is_none());
        let upstream = upstream(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id:\r\n\r\n", Some("new"));
        assert_eq!(
            upstream.matches("x-request-id").count() + upstream.matches("X-Request-Id").count(),
            1
        );
        assert!(upstream.contains("x-request-id: new\r\n"));
    }
}
