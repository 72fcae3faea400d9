//! The response head: parsed off the connection's buffer with httparse (status, version,
//! headers, and what decides the framing), and the body framing it implies (RFC 9112 6.3).

use super::*;

pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) keep_alive: bool,
    pub(crate) content_length: Option<u64>,
    /// `Transfer-Encoding: chunked` (the only transfer coding accepted).
    pub(crate) chunked: bool,
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
    // Positions of each name and value in the head, so that values can share its bytes.
    let base = buf.as_ptr() as usize;
    let count = response.headers.len();
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    field_spans(base, response.headers, &mut spans);
    let head = buf.split_to(len).freeze();
    let mut parsed = Head {
        status,
        version,
        headers: HeaderMap::with_capacity(count),
        keep_alive: version == Version::HTTP_11,
        content_length: None,
        chunked: false,
    };
    for &(ns, ne, vs, ve) in &spans[..count] {
        let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
        let name = HeaderName::from_bytes(&head[ns..ne]).map_err(|_| Error::Protocol("invalid header name"))?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(vs..ve)).map_err(|_| Error::Protocol("invalid header value"))?;
        if name == CONTENT_LENGTH {
            let n = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(Error::Protocol("invalid Content-Length"))?;
            if parsed.content_length.is_some_and(|prior| prior != n) {
                return Err(Error::Protocol("conflicting Content-Length values"));
            }
            parsed.content_length = Some(n);
        } else if name == TRANSFER_ENCODING {
            let only_chunked = value.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            if !only_chunked || parsed.chunked {
                return Err(Error::Protocol("unsupported Transfer-Encoding"));
            }
            parsed.chunked = true;
        } else if name == CONNECTION {
            for option in value.to_str().unwrap_or("").split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    parsed.keep_alive = false;
                } else if option.eq_ignore_ascii_case("keep-alive") && version == Version::HTTP_10 {
                    parsed.keep_alive = true;
                }
            }
        }
        parsed.headers.append(name, value);
    }
    if parsed.chunked && parsed.content_length.take().is_some() {
        // Both: chunked wins, the length must not travel on (RFC 9112 §6.3), and a backend that
        // sends such a message does not get to carry another on this connection.
        parsed.headers.remove(CONTENT_LENGTH);
        parsed.keep_alive = false;
    }
    Ok(Some(parsed))
}

/// Where each field's name and value lie in a parsed head, as offsets from `base` (the head's
/// first byte): the head is then split off its buffer and the fields share its bytes. A head is
/// at most `MAX_HEAD` plus one read (or a request's `max_head`): u32 offsets hold it.
pub(crate) fn field_spans(base: usize, fields: &[httparse::Header<'_>], spans: &mut [(u32, u32, u32, u32)]) {
    for (span, field) in spans.iter_mut().zip(fields) {
        let name = (field.name.as_ptr() as usize - base) as u32;
        let value = (field.value.as_ptr() as usize - base) as u32;
        *span = (
            name,
            name + field.name.len() as u32,
            value,
            value + field.value.len() as u32,
        );
    }
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
