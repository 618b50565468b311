//! Two small tower layers on every request, written out rather than built from `from_fn` or
//! tower's `ConcurrencyLimit` + `LoadShed` + `HandleError`: those allocated on every request (a
//! boxed future each, a semaphore future per clone of the service; some 6% of the gateway's
//! instructions per request under callgrind). These allocate nothing on the common path.

use crate::error::{ErrorInfo, GatewayError};
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::{BoxFuture, Either, Ready};
use futures_util::StreamExt;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};
use tower_http::decompression::{RequestDecompression, RequestDecompressionLayer};

/// Load shedding: at most `max` requests in flight; past it, 503 `overloaded` with
/// `Retry-After: 1` at once, never a queue (a queue only moves the overload into everyone's
/// latency). A streamed response counts until its body ends, not only until its head is out:
/// a stream holds an upstream connection for as long. Only `POST`s (completions, feedback) count
/// and are shed: `/health`, `/metrics` and `/v1/models` cost next to nothing, and an overloaded
/// gateway whose health check failed would be restarted rather than relieved.
#[derive(Clone)]
pub struct InFlightLayer {
    count: Arc<AtomicUsize>,
    max: usize,
}

impl InFlightLayer {
    pub fn new(max: usize) -> Self {
        InFlightLayer {
            count: Arc::new(AtomicUsize::new(0)),
            max: max.max(1),
        }
    }
}

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlight<S>;
    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight {
            inner,
            count: self.count.clone(),
            max: self.max,
        }
    }
}

#[derive(Clone)]
pub struct InFlight<S> {
    inner: S,
    count: Arc<AtomicUsize>,
    max: usize,
}

/// A request's place among those in flight, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S> Service<Request> for InFlight<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, Held<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if req.method() != Method::POST {
            return Either::Right(Held {
                inner: self.inner.call(req),
                slot: None,
            });
        }
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.count.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("tandem_shed_total").increment(1);
            return Either::Left(futures_util::future::ready(Ok(
                GatewayError::Overloaded.into_response()
            )));
        }
        Either::Right(Held {
            inner: self.inner.call(req),
            slot: Some(Slot(self.count.clone())),
        })
    }
}

pin_project_lite::pin_project! {
    /// The inner response future, holding its slot: until the response is out, or for a
    /// stream until its body ends or is dropped (client gone).
    pub struct Held<F> {
        #[pin]
        inner: F,
        slot: Option<Slot>,
    }
}

impl<F> Future for Held<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(resp) = std::task::ready!(this.inner.poll(cx));
        // Not counted (not a POST), or done: the slot, if any, is given back here.
        let Some(slot) = this.slot.take().filter(|_| is_stream(&resp)) else {
            return Poll::Ready(Ok(resp));
        };
        Poll::Ready(Ok(resp.map(|body| {
            let stream = body.into_data_stream().map(move |frame| {
                // Moved in, so that it is dropped with the body.
                let _ = &slot;
                frame
            });
            axum::body::Body::from_stream(stream)
        })))
    }
}

fn is_stream(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Request decompression (tower-http's) for the requests that name a `Content-Encoding`, the
/// others straight to the handler: decompression boxes the request and response bodies of every
/// request it sees. Codings are case-insensitive (RFC 9110) but tower-http matches them byte for
/// byte: the header is lowercased first. And its 415 for a coding it cannot decode has an empty
/// body: it gets OpenAI's shape.
#[derive(Clone, Default)]
pub struct CodingLayer;

impl<S: Clone> Layer<S> for CodingLayer {
    type Service = Coding<S>;
    fn layer(&self, inner: S) -> Coding<S> {
        Coding {
            decompress: RequestDecompressionLayer::new().layer(inner.clone()),
            plain: inner,
        }
    }
}

#[derive(Clone)]
pub struct Coding<S> {
    plain: S,
    decompress: RequestDecompression<S>,
}

impl<S, B> Service<Request> for Coding<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    RequestDecompression<S>:
        Service<Request, Response = axum::http::Response<B>, Error = Infallible>,
    <RequestDecompression<S> as Service<Request>>::Future: Send + 'static,
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        std::task::ready!(self.plain.poll_ready(cx))?;
        self.decompress.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let Some(v) = req.headers().get(header::CONTENT_ENCODING) else {
            return Either::Left(self.plain.call(req));
        };
        let coding = String::from_utf8_lossy(v.as_bytes())
            .trim()
            .to_ascii_lowercase();
        if let Ok(v) = HeaderValue::from_str(&coding) {
            req.headers_mut().insert(header::CONTENT_ENCODING, v);
        }
        let fut = self.decompress.call(req);
        Either::Right(Box::pin(async move {
            let Ok(resp) = fut.await;
            Ok(unsupported(resp.map(axum::body::Body::new), &coding))
        }))
    }
}

/// tower-http's bare 415 in OpenAI's shape, keeping its `Accept-Encoding`.
fn unsupported(resp: Response, coding: &str) -> Response {
    if resp.status() != StatusCode::UNSUPPORTED_MEDIA_TYPE
        || resp.extensions().get::<ErrorInfo>().is_some()
    {
        return resp;
    }
    let shown: String = coding.chars().take(64).collect();
    let mut r = GatewayError::BadRequest(format!(
        "Content-Encoding `{shown}` is not supported; send the body as is or compressed with one of gzip, deflate, br, zstd"
    ))
    .into_response();
    *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    if let Some(accept) = resp.headers().get(header::ACCEPT_ENCODING) {
        r.headers_mut()
            .insert(header::ACCEPT_ENCODING, accept.clone());
    }
    r
}
