//! Entry points for the fuzz targets in `fuzz/` and the property tests in `tests/properties.rs`.
//!
//! Each function drives one crate-private piece with arbitrary input and panics when a property
//! the piece promises does not hold, so a fuzzer and a property test check the same thing: the
//! inline HTTP/1 client's response-head parser ([`response_head`]), its body framing
//! ([`body_framing`], [`chunked_roundtrip`]) and the request path's handling of a client's head
//! before it is forwarded ([`request_head`]). Nothing in safelb calls this module; it is not an
//! API and changes with the code it wraps.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Version};
use http_body::Body;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::ErrorKind;
use crate::h1::{self, Chunk, Conn, H1Body, IdleConns, State};
use crate::headers::{add_forwarded, has_hop_by_hop, request_id, strip_hop_by_hop};
use crate::proxy::{hostile_head, origin_form};

/// Parses `data` as a backend's response head and checks what the parser promises: it takes
/// whole lines and never more than it was given; the head alone parses the same as the head
/// followed by anything; a head cut short is incomplete, not a different head; and the framing
/// it reports is the one its fields allow (one Transfer-Encoding, chunked only; a Content-Length
/// every copy agrees on; never both on the way to the client). Returns whether a head parsed.
pub fn response_head(data: &[u8]) -> bool {
    let mut buf = BytesMut::from(data);
    let Ok(Some(head)) = h1::parse_head(&mut buf) else {
        return false;
    };
    let used = data.len() - buf.len();
    assert!(used > 0 && used <= data.len(), "took {used} of {} bytes", data.len());
    assert_eq!(&buf[..], &data[used..], "the bytes after the head were changed");
    assert_eq!(data[used - 1], b'\n', "a head ends with a line end");

    let mut alone = BytesMut::from(&data[..used]);
    let again = h1::parse_head(&mut alone)
        .expect("the same head parses again")
        .expect("the head alone is complete");
    assert!(alone.is_empty(), "the head alone was not taken whole");
    assert_eq!(summary(&again), summary(&head), "the bytes after the head changed it");
    for cut in [used - 1, used / 2] {
        let mut short = BytesMut::from(&data[..cut]);
        assert!(
            matches!(h1::parse_head(&mut short), Ok(None)),
            "a head cut at {cut} of {used} bytes was not incomplete"
        );
    }

    let fields = all_fields(&head);
    let lengths = fields.get_all(CONTENT_LENGTH).iter().count();
    let codings = fields.get_all(TRANSFER_ENCODING).iter().count();
    if head.chunked {
        assert_eq!(codings, 1, "chunked with {codings} Transfer-Encoding fields");
        assert_eq!(head.content_length, None, "chunked and a length");
        assert_eq!(lengths, 0, "a Content-Length would travel on beside chunked");
    } else {
        assert_eq!(codings, 0, "a transfer coding other than chunked was accepted");
    }
    match head.content_length {
        Some(n) => {
            for v in fields.get_all(CONTENT_LENGTH) {
                let value = v.to_str().expect("a length is text").trim().parse::<u64>();
                assert_eq!(value.ok(), Some(n), "a Content-Length disagrees with the framing");
            }
        }
        None => assert!(head.chunked || lengths == 0, "a Content-Length was ignored"),
    }
    if head.version == Version::HTTP_10 {
        let asked = fields
            .get_all(CONNECTION)
            .iter()
            .any(|v| v.to_str().unwrap_or("").to_ascii_lowercase().contains("keep-alive"));
        assert!(asked || !head.keep_alive, "HTTP/1.0 kept alive without asking");
    }
    for method in [Method::GET, Method::HEAD] {
        let state = h1::framing(&head, &method);
        let bodiless = method == Method::HEAD || head.status == 204 || head.status == 304;
        assert!(
            !bodiless || matches!(state, State::Length(0)),
            "a bodiless answer has a body"
        );
    }
    true
}

/// What two parses of one head must agree on (a header map's debug form lists every field in
/// order).
fn summary(head: &h1::Head) -> String {
    format!(
        "{} {:?} keep-alive {} length {:?} chunked {} {:?}",
        head.status,
        head.version,
        head.keep_alive,
        head.content_length,
        head.chunked,
        all_fields(head)
    )
}

/// A head's fields as a header map, hop-by-hop ones included, whichever form they were kept in;
/// for a head in wire form, the kept fields are checked to be exactly the map's others.
fn all_fields(head: &h1::Head) -> http::HeaderMap {
    match &head.fields {
        h1::Fields::Map(map) => map.clone(),
        h1::Fields::Raw(raw) => {
            // A map groups the values of one name: compare in that order (a stable sort by name).
            let mut kept: Vec<(Vec<u8>, Vec<u8>)> =
                raw.kept().map(|(n, v)| (n.to_ascii_lowercase(), v.to_vec())).collect();
            kept.sort_by(|a, b| a.0.cmp(&b.0));
            let all = raw.map(true);
            let mut stripped = all.clone();
            crate::headers::strip_hop_by_hop(&mut stripped);
            let mut from_map: Vec<(Vec<u8>, Vec<u8>)> = stripped
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect();
            from_map.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(
                kept, from_map,
                "the wire form keeps other fields than the header map would"
            );
            all
        }
    }
}

/// How a body under test is delimited.
#[derive(Clone, Copy, Debug)]
pub enum Framing {
    Length(u64),
    Chunked,
    Close,
}

/// How a decoding ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The body ended where its framing said.
    Complete,
    /// The decoder refused the bytes.
    Failed,
    /// It wanted more bytes than there were.
    Incomplete,
}

#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    data: Vec<u8>,
    trailers: Option<HeaderMap>,
    end: End,
}

/// Decodes `wire` as a body with the given framing, delivered in pieces cut at `cuts` (offsets,
/// in any order; out of range ones are ignored), and checks: the result does not depend on
/// where the reads were cut; no more bytes come out than went in; a length-delimited body is
/// exactly its first `n` bytes; a close-delimited body is all of them; and a chunked body that
/// ended, encoded again as one chunk with its trailers, decodes to the same data and trailers.
pub fn body_framing(framing: Framing, wire: &[u8], cuts: &[usize]) {
    let whole = decode(framing, wire, &[]);
    let pieces = decode(framing, wire, cuts);
    assert_eq!(pieces, whole, "cutting the reads at {cuts:?} changed the body");
    assert!(whole.data.len() <= wire.len(), "more bytes out than in");
    match framing {
        Framing::Length(n) => {
            let take = wire.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            assert_eq!(whole.data, &wire[..take], "a length-delimited body is its first bytes");
            let end = if take as u64 == n {
                End::Complete
            } else {
                End::Incomplete
            };
            assert_eq!(whole.end, end);
        }
        Framing::Close => {
            assert_eq!(whole.data, wire, "a close-delimited body is every byte");
            assert_eq!(whole.end, End::Incomplete, "only the close ends such a body");
        }
        Framing::Chunked if whole.end == End::Complete => {
            let fields = trailer_fields(&whole.trailers);
            let again = decode(Framing::Chunked, &encode_chunked(&[&whole.data], &fields, false), &[]);
            assert_eq!(again, whole, "the decoded body, encoded again, decodes differently");
        }
        Framing::Chunked => {}
    }
}

/// Encodes `chunks` (empty ones left out: an empty chunk is the last) with `trailers`, cuts the
/// encoding at `cuts` and checks that it decodes to the chunks' bytes and the trailers.
/// Trailer names must be lower-case tokens and values visible ASCII without edge spaces.
pub fn chunked_roundtrip(chunks: &[&[u8]], trailers: &[(String, String)], extensions: bool, cuts: &[usize]) {
    let wire = encode_chunked(chunks, trailers, extensions);
    let decoded = decode(Framing::Chunked, &wire, cuts);
    assert_eq!(
        decoded.end,
        End::Complete,
        "a well-formed chunked body did not end: {decoded:?}"
    );
    assert_eq!(decoded.data, chunks.concat(), "the chunks' bytes changed");
    let mut want = trailers.to_vec();
    let mut got_sorted = trailer_fields(&decoded.trailers);
    // A header map groups repeated names: compare as multisets.
    want.sort();
    got_sorted.sort();
    assert_eq!(got_sorted, want, "the trailers changed");
    body_framing(Framing::Chunked, &wire, cuts);
}

/// Trailer fields as text (the decoder accepts text values only).
fn trailer_fields(trailers: &Option<HeaderMap>) -> Vec<(String, String)> {
    trailers
        .iter()
        .flatten()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().expect("trailers are text").to_owned()))
        .collect()
}

fn encode_chunked(chunks: &[&[u8]], trailers: &[(String, String)], extensions: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in chunks.iter().filter(|c| !c.is_empty()) {
        out.extend_from_slice(format!("{:x}", chunk.len()).as_bytes());
        if extensions {
            out.extend_from_slice(b";name=value");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// What the body decoder needs beyond bytes: a runtime for its socket, and a connection that
/// never receives anything (the bytes are put straight into the connection's buffer, so a read
/// the decoder asks for is always pending, which is where the next piece goes in).
struct Rig {
    runtime: tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    /// The backend's end of the current connection, kept open so the decoder never sees a close.
    peer: Option<std::net::TcpStream>,
    home: std::sync::Arc<IdleConns>,
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("a current-thread runtime builds")
}

impl Rig {
    fn new() -> Rig {
        Rig {
            runtime: runtime(),
            listener: std::net::TcpListener::bind("127.0.0.1:0").expect("loopback binds"),
            peer: None,
            home: std::sync::Arc::default(),
        }
    }

    /// The connection the last body left in its pool, else a new one on loopback.
    fn conn(&mut self) -> Conn {
        if let Some(conn) = self.home.take(Duration::MAX, crate::clock::now_ms()) {
            return conn;
        }
        let addr = self.listener.local_addr().expect("bound");
        let client = std::net::TcpStream::connect(addr).expect("loopback connects");
        let (peer, _) = self.listener.accept().expect("loopback accepts");
        client.set_nonblocking(true).expect("non-blocking");
        self.peer = Some(peer);
        let _in_runtime = self.runtime.enter();
        Conn::new(tokio::net::TcpStream::from_std(client).expect("registers with the reactor"))
    }
}

fn decode(framing: Framing, wire: &[u8], cuts: &[usize]) -> Decoded {
    let decoded = decode_once(framing, wire, cuts);
    // tokio frees a dropped socket's registration on the reactor's next turn, and nothing else
    // turns it here: without this, every connection a failed body closed stayed allocated (the
    // first long run grew by about 250 bytes per execution).
    RIG.with(|rig| {
        if let Some(rig) = rig.borrow().as_ref() {
            rig.runtime.block_on(tokio::task::yield_now());
        }
    });
    decoded
}

fn decode_once(framing: Framing, wire: &[u8], cuts: &[usize]) -> Decoded {
    let mut at: Vec<usize> = cuts.iter().copied().filter(|&c| c > 0 && c < wire.len()).collect();
    at.sort_unstable();
    at.dedup();
    at.push(wire.len());
    RIG.with(|rig| {
        let mut rig = rig.borrow_mut();
        let rig = rig.get_or_insert_with(Rig::new);
        let state = match framing {
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        };
        let conn = rig.conn();
        let _in_runtime = rig.runtime.enter();
        let mut body = H1Body {
            conn: Some(conn),
            state,
            keep_alive: !matches!(framing, Framing::Close),
            home: rig.home.clone(),
            raw: None,
        };
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Decoded {
            data: Vec::new(),
            trailers: None,
            end: End::Incomplete,
        };
        let mut from = 0;
        for to in at {
            match body.conn.as_mut() {
                Some(conn) => conn.buf.extend_from_slice(&wire[from..to]),
                None => break,
            }
            from = to;
            loop {
                match Pin::new(&mut body).poll_frame(&mut cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => out.data.extend_from_slice(&data),
                        Err(frame) => out.trailers = frame.into_trailers().ok(),
                    },
                    Poll::Ready(Some(Err(_))) => {
                        out.end = End::Failed;
                        return out;
                    }
                    Poll::Ready(None) => {
                        out.end = End::Complete;
                        return out;
                    }
                    Poll::Pending => break,
                }
            }
        }
        out
    })
}

/// How the request path treated one client request head.
#[derive(Debug)]
pub enum Treated {
    /// Refused before routing, with this error.
    Refused(ErrorKind),
    /// Prepared for a backend: the head the inline client would write.
    Forwarded(Vec<u8>),
}

/// Feeds `raw` to a listener's HTTP/1 parsers (safelb's own for plain heads, then hyper's, see
/// `serve_bytes`), and for every request they accept runs the request path's head handling: the refusals of
/// `hostile_head`, then what `Proxy::serve` does to a head before forwarding (request id, Host
/// from an absolute-form target, origin form, hop-by-hop fields removed, forwarding fields
/// added), encoded as the inline client writes it; for a head the wire form forwards
/// (`Proxy::serve_wire`), that its head for the backend says the same. Checks: every head with two framings, a
/// repeated Host on any version, a missing one on HTTP/1.1, or CONNECT is refused; every
/// forwarded head is one well-formed request with exactly one Host (one known exception, see
/// `treat`), no hop-by-hop
/// field and at most one length, that parses back field for field (nothing a client sent
/// becomes a second request or an extra field).
/// Returns what happened to each request.
///
/// The preparation mirrors `Proxy::serve` step by step (that function needs a live connection);
/// the two must change together.
pub fn request_head(raw: &[u8]) -> Vec<Treated> {
    RIG.with(|rig| {
        let mut rig = rig.borrow_mut();
        let rig = rig.get_or_insert_with(Rig::new);
        rig.runtime.block_on(serve_bytes(raw))
    })
}

/// As a listener does: safelb's own loop takes the plain heads off the front
/// (`h1::parse_request`), and the rest, from the first head it declines, goes to hyper. Every
/// head the own parser takes, hyper given the same bytes must read as the same request (method,
/// target, version, every field in order): the two parsers on one connection never disagree on
/// where a request ends or what it says.
async fn serve_bytes(raw: &[u8]) -> Vec<Treated> {
    let max_head = safelb_config::Limits::default().max_header_bytes;
    let mut buf = BytesMut::from(raw);
    let mut treated = Vec::new();
    let mut fields = Vec::new();
    loop {
        let before = buf.clone();
        match h1::parse_request(&mut buf, max_head, &mut fields) {
            h1::Parsed::Request(head) => {
                let taken = &before[..before.len() - buf.len()];
                let by_hyper = serve_hyper(taken).await;
                let Some((_, hyper_head)) = by_hyper.first() else {
                    panic!(
                        "hyper refuses a head safelb's parser took: {:?}",
                        String::from_utf8_lossy(taken)
                    );
                };
                let r = head.to_http();
                assert_eq!(
                    hyper_head,
                    &format!("{} {} {:?} {:?}", r.method(), r.uri(), r.version(), r.headers()),
                    "the two parsers read one head differently"
                );
                let by_map = treat(r);
                if head.is_plain() {
                    let Treated::Forwarded(map_head) = &by_map else {
                        panic!("a head the wire form forwards is refused: {by_map:?}");
                    };
                    same_request(map_head, &by_wire(&head), head.client_request_id().is_none());
                }
                treated.push(by_map);
                fields = head.into_fields();
            }
            h1::Parsed::Declined => {
                assert_eq!(buf, before, "a declined head is handed on whole");
                treated.extend(serve_hyper(&buf).await.into_iter().map(|(t, _)| t));
                return treated;
            }
            h1::Parsed::Partial => return treated,
        }
    }
}

/// The head `Proxy::serve_wire` writes for a backend, as `treat` prepares the map's.
fn by_wire(head: &h1::RequestHead) -> Vec<u8> {
    let new_id = head
        .client_request_id()
        .is_none()
        .then(|| HeaderValue::from_static("00000000000000000000000000000000"));
    let mut out = Vec::new();
    head.write_upstream(
        &mut out,
        &HeaderValue::from_static("127.0.0.1"),
        "http",
        new_id.as_ref(),
    );
    out
}

/// Checks that two heads for a backend say the same: request line, and for every field name (in
/// any case) the same values in the same order. With `new_id`, each made its own request id:
/// both have exactly one, whatever its value.
fn same_request(by_map: &[u8], by_wire: &[u8], new_id: bool) {
    let read = |head: &[u8]| {
        let mut fields = [httparse::EMPTY_HEADER; 256];
        let mut parsed = httparse::Request::new(&mut fields);
        assert!(
            matches!(parsed.parse(head), Ok(httparse::Status::Complete(n)) if n == head.len()),
            "a head for the backend is one whole head: {:?}",
            String::from_utf8_lossy(head)
        );
        let mut by_name = std::collections::BTreeMap::<String, Vec<Vec<u8>>>::new();
        for f in parsed.headers.iter() {
            let name = f.name.to_ascii_lowercase();
            let value = if new_id && name == "x-request-id" {
                &b"new"[..]
            } else {
                f.value
            };
            by_name.entry(name).or_default().push(value.to_vec());
        }
        (
            parsed.method.map(str::to_owned),
            parsed.path.map(str::to_owned),
            by_name,
        )
    };
    let (map, wire) = (read(by_map), read(by_wire));
    assert_eq!(
        map,
        wire,
        "the wire form and the header map prepare one head differently:\n{}\n{}",
        String::from_utf8_lossy(by_map),
        String::from_utf8_lossy(by_wire)
    );
    if new_id {
        assert_eq!(wire.2.get("x-request-id").map(Vec::len), Some(1), "one new request id");
    }
}

/// hyper's HTTP/1 server on `raw`, configured as safelb's listeners configure it: what the
/// request path did with each request, and each head as hyper read it.
async fn serve_hyper(raw: &[u8]) -> Vec<(Treated, String)> {
    let seen = std::rc::Rc::new(RefCell::new(Vec::new()));
    let (client, server) = tokio::io::duplex(16 * 1024);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let record = seen.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let head = format!("{} {} {:?} {:?}", req.method(), req.uri(), req.version(), req.headers());
        record.borrow_mut().push((treat(req), head));
        std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(
            Empty::<bytes::Bytes>::new(),
        )))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // As `server::http1_builder` at the default `max_header_bytes`.
    builder
        .keep_alive(true)
        .max_buf_size(safelb_config::Limits::default().max_header_bytes)
        .header_read_timeout(None);
    let conn = builder.serve_connection(TokioIo::new(server), service);
    let write = async {
        let _ = to_server.write_all(raw).await;
        let _ = to_server.shutdown().await;
    };
    let read = async {
        let mut sink = Vec::new();
        let _ = from_server.read_to_end(&mut sink).await;
    };
    let _ = tokio::join!(conn, write, read);
    seen.take()
}

fn treat<B>(req: Request<B>) -> Treated {
    let hop_by_hop = has_hop_by_hop(req.headers());
    let refused = hostile_head(&req, hop_by_hop);
    let headers = req.headers();
    let both = headers.contains_key(TRANSFER_ENCODING) && headers.contains_key(CONTENT_LENGTH);
    let hosts = headers.get_all(HOST).iter().count();
    let http11 = req.version() == Version::HTTP_11;
    let must_refuse = both || hosts > 1 || (http11 && hosts == 0) || req.method() == Method::CONNECT;
    assert_eq!(
        refused.is_some(),
        must_refuse,
        "{} {} {:?} with {hosts} Host fields, both framings {both}: refused as {refused:?}",
        req.method(),
        req.uri(),
        req.version()
    );
    if let Some(kind) = refused {
        return Treated::Refused(kind);
    }
    let (mut parts, _body) = req.into_parts();
    // The one head the Host check below does not hold to, a finding docs/reliability.md lists:
    // HTTP/1.0 without Host is forwarded without one.
    let host_exempt = parts.version == Version::HTTP_10 && !parts.headers.contains_key(HOST);
    request_id(&mut parts.headers);
    let host = origin_form(&mut parts);
    if hop_by_hop {
        strip_hop_by_hop(&mut parts.headers);
    }
    add_forwarded(
        &mut parts.headers,
        &HeaderValue::from_static("127.0.0.1"),
        "http",
        host.as_ref(),
    );
    let head = h1::encode_head(&parts.method, &parts.uri, &parts.headers);
    check_forwarded(&head, &parts.method, &parts.headers, host_exempt);
    Treated::Forwarded(head)
}

fn check_forwarded(head: &[u8], method: &Method, headers: &HeaderMap, host_exempt: bool) {
    let mut fields = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Request::new(&mut fields);
    let status = parsed.parse(head).expect("a forwarded head parses");
    assert_eq!(
        status,
        httparse::Status::Complete(head.len()),
        "a forwarded head is one whole head"
    );
    assert_eq!(parsed.method, Some(method.as_str()));
    let target = parsed.path.expect("a target");
    assert!(
        target.starts_with('/') || target == "*",
        "target {target:?} is not origin-form"
    );
    assert_eq!(
        parsed.headers.len(),
        headers.len(),
        "fields appeared or vanished on the wire"
    );
    let named = |name: &str| {
        parsed
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    let hosts = named("host");
    assert!(hosts == 1 || host_exempt, "a forwarded head has {hosts} Host fields");
    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        assert_eq!(named(hop), 0, "`{hop}` was forwarded");
    }
    assert!(named("content-length") <= 1, "a forwarded head has several lengths");
}
