//! A fault-injecting HTTP proxy on loopback, between cairn and a real S3 server: it forwards
//! each request and, as its [`FaultPlan`] says, answers 500 or 503 SlowDown instead, cuts the
//! connection in the middle of a request or answer body, ends an answer body early, holds a
//! request for a while, or stops answering at all. Faults are drawn from a seeded generator, so a
//! failing run can be replayed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// How often each fault strikes: probabilities per request, from 0 to 1 (checked in this
/// order; at most one fault per request).
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Answer `500 InternalError` without asking the server.
    pub internal_error: f64,
    /// Answer `503 SlowDown` without asking the server.
    pub slow_down: f64,
    /// Cut the connection halfway through the request body (requests with a body), or halfway
    /// through the answer body.
    pub reset_mid_body: f64,
    /// Send the answer's headers, then only half its body, and end the connection cleanly.
    pub truncate_body: f64,
    /// Hold the request this long before forwarding it.
    pub delay: f64,
    pub delay_for: Duration,
    /// Accept connections and requests but never answer.
    pub silent: bool,
}

impl FaultPlan {
    /// Every kind of fault, each at `rate`, with delays of `delay_for`.
    pub fn all_at(rate: f64, delay_for: Duration) -> FaultPlan {
        FaultPlan {
            internal_error: rate,
            slow_down: rate,
            reset_mid_body: rate,
            truncate_body: rate,
            delay: rate,
            delay_for,
            silent: false,
        }
    }
}

/// How many faults struck so far, by kind (a cut counts only when there was a body to cut).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub requests: u64,
    pub internal_errors: u64,
    pub slow_downs: u64,
    pub resets: u64,
    pub truncations: u64,
    pub delays: u64,
    pub held: u64,
}

impl FaultCounts {
    /// Requests that did not get the server's whole answer on time.
    pub fn faults(&self) -> u64 {
        self.internal_errors + self.slow_downs + self.resets + self.truncations + self.delays
    }
}

#[derive(Debug)]
struct Book {
    plan: FaultPlan,
    counts: FaultCounts,
    /// xorshift64 state.
    random: u64,
}

impl Book {
    fn draw(&mut self) -> f64 {
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        (self.random >> 11) as f64 / (1u64 << 53) as f64
    }

    fn decide(&mut self) -> Fault {
        self.counts.requests += 1;
        if self.plan.silent {
            self.counts.held += 1;
            return Fault::Silent;
        }
        let plan = self.plan.clone();
        let choices = [
            (plan.internal_error, Fault::InternalError),
            (plan.slow_down, Fault::SlowDown),
            (plan.reset_mid_body, Fault::Reset),
            (plan.truncate_body, Fault::Truncate),
            (plan.delay, Fault::Delay(plan.delay_for)),
        ];
        for (rate, fault) in choices {
            if self.draw() < rate {
                // Cuts are counted where they strike: not every request has a body to cut.
                match fault {
                    Fault::InternalError => self.counts.internal_errors += 1,
                    Fault::SlowDown => self.counts.slow_downs += 1,
                    Fault::Delay(_) => self.counts.delays += 1,
                    Fault::Reset | Fault::Truncate | Fault::None | Fault::Silent => {}
                }
                return fault;
            }
        }
        Fault::None
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    InternalError,
    SlowDown,
    Reset,
    Truncate,
    Delay(Duration),
    Silent,
}

/// The proxy: `http://127.0.0.1:{port}` reaches the server through it.
pub struct FaultProxy {
    pub port: u16,
    book: Arc<Mutex<Book>>,
    runtime: Option<tokio::runtime::Runtime>,
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

impl FaultProxy {
    /// Starts a proxy to the server on loopback port `target`, with no faults yet.
    pub fn start(target: u16, seed: u64) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the fault proxy");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the fault proxy");
        let port = listener.local_addr().unwrap().port();
        let book = Arc::new(Mutex::new(Book {
            plan: FaultPlan::default(),
            counts: FaultCounts::default(),
            random: seed.max(1),
        }));
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        let upstream: SocketAddr = ([127, 0, 0, 1], target).into();
        let shared = Arc::clone(&book);
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (book, client) = (Arc::clone(&shared), client.clone());
                let service = service_fn(move |request| {
                    forward(Arc::clone(&book), client.clone(), upstream, request)
                });
                tokio::spawn(async move {
                    // Cut connections are the point of this proxy: their errors are expected.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FaultProxy {
            port,
            book,
            runtime: Some(runtime),
        }
    }

    /// `spec` (an S3 store spec on the server) with its endpoint turned to this proxy.
    pub fn spec(&self, server: &crate::S3Server, spec: &str) -> String {
        spec.replace(&server.endpoint, &format!("http://127.0.0.1:{}", self.port))
    }

    /// From now on, faults strike as `plan` says.
    pub fn set(&self, plan: FaultPlan) {
        self.book.lock().unwrap().plan = plan;
    }

    pub fn counts(&self) -> FaultCounts {
        self.book.lock().unwrap().counts.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn s3_error(status: StatusCode, code: &str) -> Response<ProxyBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>injected by the fault proxy</Message><RequestId>fault</RequestId></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(full(Bytes::from(body)))
        .unwrap()
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

async fn forward(
    book: Arc<Mutex<Book>>,
    client: Client<HttpConnector, Incoming>,
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::io::Error> {
    let fault = book.lock().unwrap().decide();
    match fault {
        Fault::Silent => std::future::pending::<()>().await,
        Fault::InternalError => {
            return Ok(s3_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError"));
        }
        Fault::SlowDown => return Ok(s3_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown")),
        Fault::Delay(pause) => tokio::time::sleep(pause).await,
        Fault::Reset if request.body().size_hint().lower() > 1 => {
            // Take half the body, then drop the connection without an answer.
            book.lock().unwrap().counts.resets += 1;
            let half = request.body().size_hint().lower() / 2;
            let mut body = request.into_body();
            let mut taken = 0;
            while taken < half {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        taken += frame.data_ref().map_or(0, |d| d.len() as u64);
                    }
                    _ => break,
                }
            }
            return Err(std::io::Error::other("cut mid request body"));
        }
        Fault::None | Fault::Reset | Fault::Truncate => {}
    }
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    parts.uri = format!("http://{upstream}{path}").parse().unwrap();
    let answer = client
        .request(Request::from_parts(parts, body))
        .await
        .map_err(std::io::Error::other)?;
    let (parts, body) = answer.into_parts();
    let length = body.size_hint().exact().unwrap_or(0);
    let body = match fault {
        Fault::Reset | Fault::Truncate if length > 1 => {
            let mut book = book.lock().unwrap();
            if matches!(fault, Fault::Reset) {
                book.counts.resets += 1;
            } else {
                book.counts.truncations += 1;
            }
            let cut = CutBody {
                inner: body,
                left: length / 2,
                fail: matches!(fault, Fault::Reset),
            };
            cut.boxed()
        }
        _ => body.map_err(std::io::Error::other).boxed(),
    };
    Ok(Response::from_parts(parts, body))
}

/// An answer body that passes `left` bytes on, then fails (a cut connection) or ends (a
/// truncated answer under a Content-Length that promised more).
struct CutBody {
    inner: Incoming,
    left: u64,
    fail: bool,
}

impl Body for CutBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(if self.fail {
                Some(Err(std::io::Error::other("cut mid answer body")))
            } else {
                None
            });
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    if data.len() as u64 > self.left {
                        data.truncate(self.left as usize);
                    }
                    self.left -= data.len() as u64;
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(std::io::Error::other(err)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        // Promise the whole body, as the server's Content-Length did.
        self.inner.size_hint()
    }
}
