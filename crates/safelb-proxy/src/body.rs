//! [`RequestBody`]: the client's body on its way upstream, streamed (never buffered whole
//! unless a replayable request's is read first), with the size limit enforced as bytes pass.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Why a request body stopped.
#[derive(Debug)]
pub enum RequestBodyError {
    TooLarge { limit: u64 },
    Client(hyper::Error),
}

impl fmt::Display for RequestBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestBodyError::TooLarge { limit } => write!(f, "request body exceeds {limit} bytes"),
            RequestBodyError::Client(e) => write!(f, "reading the request body failed: {e}"),
        }
    }
}

impl StdError for RequestBodyError {}

/// Finds a [`RequestBodyError`] in the cause chain of an upstream send error.
pub(crate) fn request_body_error<'e>(e: &'e (dyn StdError + 'static)) -> Option<&'e RequestBodyError> {
    let mut cur: Option<&'e (dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<RequestBodyError>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

/// A request's body as the client side read it: hyper's for a connection hyper serves, none
/// for a bodiless request read by safelb's own HTTP/1 server (`server/h1.rs`).
pub enum ClientBody {
    Hyper(Incoming),
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(body) => Pin::new(body).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(body) => body.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(body) => body.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

pub struct RequestBody {
    /// `None` for a request without a streaming body: none at all, or one buffered in `buffered`.
    inner: Option<Incoming>,
    /// A replayable request's body, read whole before sending (`Idempotency-Key`).
    buffered: Option<Bytes>,
    remaining: u64,
    limit: u64,
}

impl RequestBody {
    pub(crate) fn new(inner: ClientBody, limit: u64) -> Self {
        let inner = match inner {
            ClientBody::Hyper(body) => Some(body),
            ClientBody::Empty => None,
        };
        RequestBody {
            inner,
            buffered: None,
            remaining: limit,
            limit,
        }
    }

    pub(crate) fn empty() -> Self {
        RequestBody {
            inner: None,
            buffered: None,
            remaining: 0,
            limit: 0,
        }
    }

    /// A body already read whole (its size was checked against the limits when it was read).
    pub(crate) fn buffered(data: Bytes) -> Self {
        RequestBody {
            inner: None,
            buffered: (!data.is_empty()).then_some(data),
            remaining: 0,
            limit: 0,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(this.buffered.take().map(|data| Ok(Frame::data(data))));
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge { limit: this.limit })));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.buffered) {
            (Some(b), _) => b.size_hint(),
            (None, Some(data)) => SizeHint::with_exact(data.len() as u64),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}
