//! [`ResponseBody`]: what the client receives. It relays the backend's body (or carries a short
//! local answer) and, when it ends or is dropped, runs the request's [`Completion`]: the
//! upstream connection goes back to its pool only if the body was read to the end, and the
//! access-log line is written.

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::Completion;
use crate::h1::{H1Body, RawFields};
use crate::upstream::UpstreamBody;

enum Source {
    Upstream(Incoming),
    Inline(H1Body),
    Local(Option<Bytes>),
}

/// What a response body fails with: hyper's error or the inline client's.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The body sent to the client.
pub struct ResponseBody {
    source: Source,
    bytes: u64,
    completion: Option<Box<Completion>>,
}

impl ResponseBody {
    pub(crate) fn upstream(body: UpstreamBody, completion: Box<Completion>) -> Self {
        ResponseBody {
            source: match body {
                UpstreamBody::Hyper(b) => Source::Upstream(b),
                UpstreamBody::Inline(b) => Source::Inline(b),
            },
            bytes: 0,
            completion: Some(completion),
        }
    }

    pub(crate) fn local(text: Bytes, completion: Option<Box<Completion>>) -> Self {
        ResponseBody {
            source: Source::Local(Some(text)),
            bytes: 0,
            completion,
        }
    }

    /// The backend's response fields in wire form, when they are not in the response's header
    /// map (see [`RawFields`]): only safelb's own HTTP/1 writer reads them.
    pub(crate) fn raw_fields(&self) -> Option<&RawFields> {
        match &self.source {
            Source::Inline(body) => body.raw.as_deref(),
            _ => None,
        }
    }

    fn complete(&mut self, fully_read: bool) {
        if let Some(c) = self.completion.take() {
            c.finish(self.bytes, fully_read);
        }
    }
}

/// Moves a response's wire-form fields (if it has them) into its header map (a name already
/// there takes the backend's values): what a response needs before hyper writes it or a route
/// edits its headers.
pub(crate) fn fields_to_map(response: &mut http::Response<ResponseBody>) {
    let raw = match &mut response.body_mut().source {
        Source::Inline(body) => body.raw.take(),
        _ => None,
    };
    if let Some(raw) = raw {
        let map = raw.into_map();
        let headers = response.headers_mut();
        if headers.is_empty() {
            *headers = map;
        } else {
            headers.extend(map);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut this.source {
            Source::Local(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            Source::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            Source::Inline(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
        };
        match ready!(polled) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.complete(false);
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.complete(true);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Local(text) => text.is_none(),
            Source::Upstream(body) => body.is_end_stream(),
            Source::Inline(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Local(Some(t)) => SizeHint::with_exact(t.len() as u64),
            Source::Local(None) => SizeHint::with_exact(0),
            Source::Upstream(body) => body.size_hint(),
            Source::Inline(body) => body.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper may skip polling a body that reports its end up front (HEAD, 204, length 0).
        let ended = self.is_end_stream();
        self.complete(ended);
    }
}
