//! The response head: parsed off the connection's buffer with httparse (status, version,
//! headers, and what decides the framing), and the body framing it implies (RFC 9112 6.3).

use super::*;

pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) fields: Fields,
    pub(crate) keep_alive: bool,
    pub(crate) content_length: Option<u64>,
    /// `Transfer-Encoding: chunked` (the only transfer coding accepted).
    pub(crate) chunked: bool,
}

/// A response head's fields: in the bytes they arrived in when the head is small and plain (most
/// are), else a header map.
pub(crate) enum Fields {
    /// Boxed: moved with the response through several layers, inline it cost more in copies
    /// (callgrind) than the allocation.
    Raw(Box<RawFields>),
    /// A head with more than [`RAW_FIELDS`] fields, over 64 KiB, or whose `Connection` names
    /// other fields to drop; hop-by-hop fields are still in it.
    Map(HeaderMap),
}

/// Most fields a head may have and still be kept in wire form.
const RAW_FIELDS: usize = 24;

/// A response head's fields as offsets into the head's own bytes, with the hop-by-hop ones
/// (RFC 9110 §7.6.1) marked. The client's HTTP/1 writer copies the others straight out of the
/// head; only a response that goes to hyper (HTTP/2 clients, connections hyper serves) or whose
/// route edits response headers is turned into a header map ([`RawFields::into_map`]). A profile
/// of a small proxied request had building, reading and dropping that map at 3-4k of 24k
/// instructions.
pub struct RawFields {
    head: Bytes,
    /// Name start, name end, value start, value end of each field.
    spans: [(u16, u16, u16, u16); RAW_FIELDS],
    len: u8,
    /// Bit `i`: field `i` is hop-by-hop.
    hop_by_hop: u32,
    /// Bit `i`: field `i` is a length that chunked framing overrides; it never travels on.
    overridden: u32,
    has_date: bool,
    content_length: Option<u64>,
}

impl RawFields {
    /// The fields the client gets, in their order, as name and value bytes.
    pub(crate) fn kept(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.all()
            .enumerate()
            .filter(|(i, _)| (self.hop_by_hop | self.overridden) & (1 << i) == 0)
            .map(|(_, field)| field)
    }

    fn all(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans[..self.len as usize].iter().map(|&(ns, ne, vs, ve)| {
            (
                &self.head[ns as usize..ne as usize],
                &self.head[vs as usize..ve as usize],
            )
        })
    }

    /// Whether the backend sent a `Date`.
    pub(crate) fn has_date(&self) -> bool {
        self.has_date
    }

    /// The response's declared length (none when chunked framing overrides it).
    pub(crate) fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// The kept fields as a header map, values sharing the head's bytes.
    pub(crate) fn into_map(self) -> HeaderMap {
        self.map(false)
    }

    /// The fields as a header map, hop-by-hop ones too when `hop_by_hop` (what the header-map
    /// form holds). httparse has checked every name and value against the same rules as the
    /// `http` types, so none is refused here.
    pub(crate) fn map(&self, hop_by_hop: bool) -> HeaderMap {
        let skip = self.overridden | if hop_by_hop { 0 } else { self.hop_by_hop };
        let mut map = HeaderMap::with_capacity(self.len as usize);
        for (i, &(ns, ne, vs, ve)) in self.spans[..self.len as usize].iter().enumerate() {
            if skip & (1 << i) != 0 {
                continue;
            }
            let name = HeaderName::from_bytes(&self.head[ns as usize..ne as usize]);
            let value = HeaderValue::from_maybe_shared(self.head.slice(vs as usize..ve as usize));
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
        map
    }
}

/// Parses one response head off the front of `buf`; `None` until it is complete.
pub(crate) fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Error> {
    // Uninitialised slots: zeroing 128 of them per response showed in the profile.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len =
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::Protocol("more than 128 header fields")),
            Err(_) => return Err(Error::Protocol("malformed response head")),
        };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Error::Protocol("invalid status code"))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut head = Head {
        status,
        version,
        fields: Fields::Map(HeaderMap::new()),
        keep_alive: version == Version::HTTP_11,
        content_length: None,
        chunked: false,
    };
    let mut spans = [(0u16, 0u16, 0u16, 0u16); RAW_FIELDS];
    let (mut hop_by_hop, mut has_date) = (0u32, false);
    // Wire form for a small plain head; decided on the parser's fields, before the head leaves
    // `buf`.
    let mut wire = response.headers.len() <= RAW_FIELDS && len <= u16::MAX as usize;
    // Bit `i`: field `i` is a Content-Length.
    let mut lengths = 0u32;
    let base = buf.as_ptr() as usize;
    for (i, field) in response.headers.iter().enumerate() {
        let (name, value) = (field.name.as_bytes(), field.value);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(Error::Protocol("invalid Content-Length"))?;
            if head.content_length.is_some_and(|prior| prior != n) {
                return Err(Error::Protocol("conflicting Content-Length values"));
            }
            head.content_length = Some(n);
            if i < RAW_FIELDS {
                lengths |= 1 << i;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let only_chunked = std::str::from_utf8(value).is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            if !only_chunked || head.chunked {
                return Err(Error::Protocol("unsupported Transfer-Encoding"));
            }
            head.chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            // Options are read from visible text only, as `HeaderValue::to_str` allows; a value
            // with other bytes says nothing, and takes the header map's way.
            let text = value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
            wire &= text;
            for option in value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|_| text) {
                if option.eq_ignore_ascii_case(b"close") {
                    head.keep_alive = false;
                } else if option.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    head.keep_alive = true;
                }
                // A `Connection` that names fields to drop: the header map's rules apply.
                wire &= option.is_empty() || crate::headers::is_connection_option(option);
            }
        } else if name.eq_ignore_ascii_case(b"date") {
            has_date = true;
        }
        if wire {
            let name_at = field.name.as_ptr() as usize - base;
            let value_at = value.as_ptr() as usize - base;
            spans[i] = (
                name_at as u16,
                (name_at + name.len()) as u16,
                value_at as u16,
                (value_at + value.len()) as u16,
            );
            if crate::headers::is_hop_by_hop(name) {
                hop_by_hop |= 1 << i;
            }
        }
    }
    let both = head.chunked && head.content_length.is_some();
    if both {
        // Both: chunked wins, the length must not travel on (RFC 9112 §6.3), and a backend that
        // sends such a message does not get to carry another on this connection.
        head.content_length = None;
        head.keep_alive = false;
    }
    if wire {
        let count = response.headers.len() as u8;
        head.fields = Fields::Raw(Box::new(RawFields {
            head: buf.split_to(len).freeze(),
            spans,
            len: count,
            hop_by_hop,
            overridden: if both { lengths } else { 0 },
            has_date,
            content_length: head.content_length,
        }));
        return Ok(Some(head));
    }
    // Positions of each name and value in the head, so that values can share its bytes.
    let count = response.headers.len();
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    field_spans(base, response.headers, &mut spans);
    let bytes = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(count);
    for &(ns, ne, vs, ve) in &spans[..count] {
        let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
        let name = HeaderName::from_bytes(&bytes[ns..ne]).map_err(|_| Error::Protocol("invalid header name"))?;
        let value =
            HeaderValue::from_maybe_shared(bytes.slice(vs..ve)).map_err(|_| Error::Protocol("invalid header value"))?;
        if !(both && name == CONTENT_LENGTH) {
            map.append(name, value);
        }
    }
    head.fields = Fields::Map(map);
    Ok(Some(head))
}

/// Where each field's name and value lie in a parsed head, as offsets from `base` (the head's
/// first byte): the head is then split off its buffer and the fields share its bytes.
fn field_spans(base: usize, fields: &[httparse::Header<'_>], spans: &mut [(u32, u32, u32, u32)]) {
    for (span, field) in spans.iter_mut().zip(fields) {
        let (name, value) = (offsets(base, field.name.as_bytes()), offsets(base, field.value));
        *span = (name.0, name.1, value.0, value.1);
    }
}

/// Where `part`, a slice of a parsed head starting at `base`, begins and ends in it. A head is
/// at most `MAX_HEAD` plus one read (or a request's `max_head`): u32 offsets hold it.
pub(super) fn offsets(base: usize, part: &[u8]) -> (u32, u32) {
    let start = (part.as_ptr() as usize - base) as u32;
    (start, start + part.len() as u32)
}

/// How the body of a response is delimited (RFC 9112 §6.3).
pub(crate) fn framing(head: &Head, method: &Method) -> State {
    if *method == Method::HEAD || head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED {
        return State::Length(0);
    }
    match (head.chunked, head.content_length) {
        (true, _) => State::Chunked(Chunk::Size),
        (false, Some(n)) => State::Length(n),
        (false, None) => State::Close,
    }
}
