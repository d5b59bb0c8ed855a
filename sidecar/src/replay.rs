//! Sending a pooled request again when the peer did not process it.
//!
//! A peer sidecar winds a pooled connection down with GOAWAY (new credentials or trust bundle,
//! a certificate expiring). A request that meets that GOAWAY on its way (refused before it
//! was sent, on a stream above the GOAWAY's last stream, or with `REFUSED_STREAM`) was not
//! processed, and RFC 9113 (section 8.7) says it may be sent again. hyper gives back a
//! request only when it never reached HTTP/2; for the others we keep the head of every
//! request without a body ([`Replay`]) and build it again. A request with a body cannot be
//! replayed (its body is gone) and fails as before.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The body of a request on a pooled connection: the app's, or none (a replay).
#[derive(Debug)]
pub enum ReqBody {
    App(Incoming),
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::App(body) => Pin::new(body).poll_frame(cx),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::App(body) => body.is_end_stream(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::App(body) => body.size_hint(),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What it takes to send a request without a body again.
#[derive(Debug)]
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    /// The head of `req`, if it has no body (None: it could not be sent again).
    pub fn of<B: Body>(req: &Request<B>) -> Option<Self> {
        req.body().is_end_stream().then(|| Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    pub fn request(self) -> Request<ReqBody> {
        let mut req = Request::new(ReqBody::Empty);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Whether `e`, the failure of a request on a pooled connection, proves that the peer did not
/// process it: the peer was winding the connection down (a GOAWAY with `NO_ERROR`, which h2
/// reports only for requests it did not send or that were above the GOAWAY's last stream) or
/// refused the stream. Anything else (a GOAWAY for an error, a reset, a broken connection)
/// may have come after the peer began on it.
pub fn not_processed(e: &hyper::Error) -> bool {
    let Some(h2) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>()) else {
        return false;
    };
    match h2.reason() {
        Some(h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
        Some(h2::Reason::REFUSED_STREAM) => true,
        _ => false,
    }
}
