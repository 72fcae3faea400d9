//! [`H1Body`]: a response body read straight off the backend connection, by length, chunks
//! (with trailers) or until close; the connection goes back to its pool when the body ended
//! exactly where its framing said.

use super::*;

pub(crate) enum State {
    /// Bytes of the body still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection.
    Close,
    /// Ended; the connection went back to its pool or was closed.
    Done,
}

pub(crate) enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers(HeaderMap, usize),
}

/// A response body read straight off the backend connection.
pub struct H1Body {
    pub(crate) conn: Option<Conn>,
    pub(crate) state: State,
    pub(crate) keep_alive: bool,
    pub(crate) home: Arc<IdleConns>,
    /// The response head's fields in wire form, when they are not in the response's header map
    /// (see [`RawFields`]).
    pub(crate) raw: Option<Box<RawFields>>,
}

impl H1Body {
    /// The body ended where its framing said: the connection may carry the next request.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(mut conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                // An idle connection keeps a head-sized buffer, not the last body's 64 KiB reads.
                if conn.buf.capacity() > IDLE_BUFFER {
                    conn.buf = BytesMut::new();
                }
                self.home.put(conn);
            }
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

/// Reads a CRLF-terminated line off the front of `buf`, without its line end.
pub(super) fn take_line(buf: &mut BytesMut) -> Option<Bytes> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let mut line = buf.split_to(end + 1).freeze();
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Some(line)
}

pub(super) fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?;
    let digits = std::str::from_utf8(digits)
        .ok()?
        .trim_matches(|c| c == ' ' || c == '\t');
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

pub(super) fn trailer_field(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = HeaderName::from_bytes(&line[..colon]).ok()?;
    let value = std::str::from_utf8(&line[colon + 1..]).ok()?.trim();
    Some((name, HeaderValue::from_str(value).ok()?))
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Each arm returns a frame, or falls through to read more bytes.
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Length(remaining) => {
                    if !conn.buf.is_empty() {
                        let n = (*remaining).min(conn.buf.len() as u64);
                        *remaining -= n;
                        let data = conn.buf.split_to(n as usize).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Chunked(chunk) => match chunk {
                    Chunk::Size => match take_line(&mut conn.buf) {
                        Some(line) => match chunk_size(&line) {
                            Some(0) => *chunk = Chunk::Trailers(HeaderMap::new(), 0),
                            Some(n) => *chunk = Chunk::Data(n),
                            None => return this.fail(Error::Protocol("invalid chunk size")),
                        },
                        None if conn.buf.len() > MAX_CHUNK_LINE => {
                            return this.fail(Error::Protocol("chunk size line too long"));
                        }
                        None => {}
                    },
                    Chunk::Data(remaining) => {
                        if !conn.buf.is_empty() {
                            let n = (*remaining).min(conn.buf.len() as u64);
                            *remaining -= n;
                            if *remaining == 0 {
                                *chunk = Chunk::DataEnd;
                            }
                            let data = conn.buf.split_to(n as usize).freeze();
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    Chunk::DataEnd => {
                        if conn.buf.len() >= 2 {
                            if &conn.buf[..2] != b"\r\n" {
                                return this.fail(Error::Protocol("chunk data longer than its size"));
                            }
                            conn.buf.advance(2);
                            *chunk = Chunk::Size;
                        }
                    }
                    Chunk::Trailers(fields, size) => match take_line(&mut conn.buf) {
                        Some(line) if line.is_empty() => {
                            let fields = std::mem::take(fields);
                            this.finish();
                            if fields.is_empty() {
                                return Poll::Ready(None);
                            }
                            return Poll::Ready(Some(Ok(Frame::trailers(fields))));
                        }
                        Some(line) => {
                            *size += line.len();
                            match trailer_field(&line) {
                                Some((name, value)) if *size <= MAX_HEAD => {
                                    fields.append(name, value);
                                }
                                _ => return this.fail(Error::Protocol("invalid trailer section")),
                            }
                        }
                        None if conn.buf.len() > MAX_HEAD => {
                            return this.fail(Error::Protocol("trailer section too long"))
                        }
                        None => {}
                    },
                },
            }
            // Progress was made without a frame (a chunk boundary): go round again before reading.
            let need_bytes = match &this.state {
                State::Chunked(Chunk::Size) | State::Chunked(Chunk::Trailers(..)) => {
                    this.conn.as_ref().is_some_and(|c| !c.buf.contains(&b'\n'))
                }
                State::Chunked(Chunk::DataEnd) => this.conn.as_ref().is_some_and(|c| c.buf.len() < 2),
                State::Chunked(Chunk::Data(0)) => false,
                State::Length(0) | State::Done => false,
                State::Chunked(Chunk::Data(_)) | State::Length(_) | State::Close => {
                    this.conn.as_ref().is_some_and(|c| c.buf.is_empty())
                }
            };
            if !need_bytes {
                continue;
            }
            // Room for what is known to come (a length, a chunk), else a modest read.
            let want = match this.state {
                State::Length(n) | State::Chunked(Chunk::Data(n)) => usize::try_from(n).unwrap_or(READ_SIZE),
                _ => 8 * 1024,
            };
            let conn = this.conn.as_mut().expect("checked above");
            match ready!(conn.poll_fill(cx, want)) {
                Ok(0) if matches!(this.state, State::Close) => {
                    // The backend closed: that is the end of this body, and of the connection.
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Error::Protocol("connection closed inside the body")),
                Ok(_) => {}
                Err(e) => return this.fail(Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        // hyper does not poll a body that reports its end up front (HEAD, 204, length 0).
        if matches!(self.state, State::Length(0)) {
            self.finish();
        }
    }
}
