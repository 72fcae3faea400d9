//! Header rules at the proxy boundary: hop-by-hop headers stop here, forwarding headers and a
//! request id are added.

use std::net::SocketAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes headers that describe one connection rather than the message (RFC 9110 §7.6.1),
/// including any the `Connection` header names. Forwarding a client's `Connection: close`
/// upstream would also cost the upstream keep-alive connection.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (cheap comparisons, no hashing) spares
    // seven hashed removals per message (a profile had them at 1.7% of a small request).
    let present = hop_by_hop_present(headers);
    if present == 0 {
        return;
    }
    // `Connection` lists options; any beyond the usual ones names a header to remove too. The
    // usual case (`keep-alive`, `close`) is decided without allocating.
    if headers
        .get_all(&CONNECTION)
        .iter()
        .any(|v| names_other_fields(v.as_bytes()))
    {
        let named: Vec<HeaderName> = headers
            .get_all(&CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|list| list.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            // `Connection: host` must not take away what the request is routed by and what
            // the backend needs (found by the request-head fuzz target).
            .filter(|n| *n != http::header::HOST)
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// The hop-by-hop headers every message loses (RFC 9110 §7.6.1, plus the legacy two).
static HOP_BY_HOP: [&HeaderName; 7] = [
    &CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &TE,
    &TRAILER,
    &TRANSFER_ENCODING,
    &UPGRADE,
];

/// Which of [`HOP_BY_HOP`] are present, as bits: one pass over the names, no hashing.
fn hop_by_hop_present(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0, |bits, name| {
        HOP_BY_HOP
            .iter()
            .position(|h| name == *h)
            .map_or(bits, |i| bits | 1 << i)
    })
}

/// Whether a `Connection` value lists an option beyond the usual ones, i.e. names a field,
/// which is then hop-by-hop too. A value that is not text names none (as `HeaderValue::to_str`
/// refuses it).
pub(crate) fn names_other_fields(value: &[u8]) -> bool {
    visible_ascii(value).is_some_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|t| !t.is_empty() && !is_connection_option(t.as_bytes()))
    })
}

/// Options of `Connection` that name no header beyond the fixed hop-by-hop list.
pub(crate) fn is_connection_option(token: &[u8]) -> bool {
    ["keep-alive", "close", "upgrade", "te", "trailer"]
        .iter()
        .any(|o| token.eq_ignore_ascii_case(o.as_bytes()))
}

/// Whether a field name, in any case, is one of [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
}

/// Whether any hop-by-hop header is present (no hashing: a pass over the names).
pub fn has_hop_by_hop(headers: &HeaderMap) -> bool {
    hop_by_hop_present(headers) != 0
}

/// Adds `X-Forwarded-For` (appended to any the client sent), `-Proto` and `-Host`.
/// `client_ip` is the client address as a header value, made once per connection (a profile
/// showed formatting it per request at 8% of a small request's instructions).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.is_empty() => {
            HeaderValue::from_str(&format!("{prior}, {}", client_ip.to_str().unwrap_or(""))).ok()
        }
        _ => Some(client_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
    }
}

/// The client's IP address as a header value, made once per connection. An IPv4 address is
/// written digit by digit: with a new connection per request, `to_string` (the formatting
/// machinery, a string grown four times) was 650 instructions of a 30.8k request (callgrind).
pub fn client_ip_value(client: SocketAddr) -> HeaderValue {
    let std::net::IpAddr::V4(ip) = client.ip() else {
        return HeaderValue::from_str(&client.ip().to_string()).expect("an IP address is a valid header value");
    };
    let mut text = Vec::with_capacity(15);
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text.push(b'.');
        }
        if octet >= 100 {
            text.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            text.push(b'0' + octet / 10 % 10);
        }
        text.push(b'0' + octet % 10);
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).expect("digits and dots are a valid header value")
}

/// The request's id: the client's `X-Request-Id` when it is sane, else a new random one
/// (128 bits, hex), which is then added to the request.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        if sane_request_id(v.as_bytes()) {
            return v.clone();
        }
    }
    let v = new_request_id();
    headers.insert(X_REQUEST_ID.clone(), v.clone());
    v
}

/// Whether a client's `X-Request-Id` is kept as the request's id: not empty, at most 128
/// bytes, visible ASCII.
pub(crate) fn sane_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 128 && visible_ascii(v).is_some()
}

/// Request ids a thread makes at once: one allocation for all of them (an allocation per id was
/// a fifth of what making one cost, callgrind).
const IDS_PER_BATCH: usize = 64;

/// A request id's length: 128 bits in hex.
const ID_LEN: usize = 32;

/// A new random request id (128 bits as 32 hex digits), a slice of this thread's current batch:
/// shared by refcount between the request's header and its completion.
pub(crate) fn new_request_id() -> HeaderValue {
    thread_local! {
        static BATCH: std::cell::RefCell<(bytes::Bytes, usize)> =
            const { std::cell::RefCell::new((bytes::Bytes::new(), 0)) };
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    BATCH.with_borrow_mut(|(ids, next)| {
        if (*next + 1) * ID_LEN > ids.len() {
            let mut batch = Vec::with_capacity(ID_LEN * IDS_PER_BATCH);
            for _ in 0..IDS_PER_BATCH {
                for b in fastrand::u128(..).to_be_bytes() {
                    batch.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
                }
            }
            *ids = bytes::Bytes::from(batch);
            *next = 0;
        }
        let id = ids.slice(*next * ID_LEN..(*next + 1) * ID_LEN);
        *next += 1;
        HeaderValue::from_maybe_shared(id).expect("hex digits are a valid header value")
    })
}

/// A request's fields as routing, rate limits and hashing read them: in a header map, or in the
/// client's head as it arrived (`h1::RequestHead`), so a relayed HTTP/1 request needs no map.
pub trait Fields {
    /// The first value of field `name` (any case), as `HeaderMap::get` finds it.
    fn first(&self, name: &str) -> Option<&[u8]>;
    /// Every value of field `name`, in order.
    fn each<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]>;

    /// The first value of `name` when it is text (`HeaderValue::to_str`'s rule).
    fn first_str(&self, name: &str) -> Option<&str> {
        self.first(name).and_then(visible_ascii)
    }
}

impl Fields for HeaderMap {
    fn first(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(HeaderValue::as_bytes)
    }

    fn each<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }
}

/// `value` as text when every byte is visible ASCII or a tab (`HeaderValue::to_str`'s rule).
pub(crate) fn visible_ascii(value: &[u8]) -> Option<&str> {
    if value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// The value of the cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h impl Fields, name: &str) -> Option<&'h str> {
    headers
        .each("cookie")
        .filter_map(visible_ascii)
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_address_reads_as_its_display_form() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "192.168.9.99",
            "::1",
            "2001:db8::7",
        ] {
            let addr = SocketAddr::new(ip.parse().unwrap(), 80);
            assert_eq!(client_ip_value(addr), ip);
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn connection_cannot_name_host_away() {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("x.example"));
        h.insert(CONNECTION, HeaderValue::from_static("host, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get(http::header::HOST).unwrap(), "x.example");
        assert!(h.get("x-secret").is_none() && h.get(CONNECTION).is_none());
    }

    #[test]
    fn messages_without_hop_by_hop_headers_keep_every_header() {
        let mut h = HeaderMap::new();
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.append("x-kept", HeaderValue::from_static("2"));
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
        assert!(!h.contains_key("proxy-connection"));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(
            &mut h,
            &client_ip_value("127.0.0.1:5000".parse().unwrap()),
            "http",
            Some(&HeaderValue::from_static("shop.example")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example");
    }

    #[test]
    fn request_id_is_kept_or_made() {
        let mut h = HeaderMap::new();
        let id = request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h[&X_REQUEST_ID], id);
        let mut h2 = HeaderMap::new();
        h2.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("abc"));
        assert_eq!(request_id(&mut h2), "abc");
    }

    #[test]
    fn new_request_ids_are_distinct_hex_across_batches() {
        let ids: std::collections::HashSet<HeaderValue> =
            (0..3 * IDS_PER_BATCH + 1).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 3 * IDS_PER_BATCH + 1);
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(
                id.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{id:?}"
            );
        }
    }
}
