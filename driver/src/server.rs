//! The HTTP server on the plugin's unix socket: routes Docker's POSTs to the driver, turns bodies
//! into protocol types, and answers every failure with `{"Err": "..."}` (a malformed body 400,
//! an unknown endpoint 404, a body over the limit 413, a failed call 200 with Err set, as Docker
//! expects). Stopping lets the calls in flight finish first.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;
use tracing::Instrument;

use crate::protocol::{
    self, ActivateResponse, CapabilitiesResponse, CreateRequest, ErrResponse, GetResponse,
    ListResponse, MountRequest, MountpointResponse, NameRequest,
};
use crate::volumes::Driver;

/// The largest request body taken (Docker's are a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// The endpoints cairn answers.
pub const ENDPOINTS: &[&str] = &[
    "/Plugin.Activate",
    "/VolumeDriver.Create",
    "/VolumeDriver.Remove",
    "/VolumeDriver.Mount",
    "/VolumeDriver.Path",
    "/VolumeDriver.Unmount",
    "/VolumeDriver.Get",
    "/VolumeDriver.List",
    "/VolumeDriver.Capabilities",
];

/// Binds the plugin socket: mode 0660, group `docker` where that group exists. A stale socket
/// from a daemon that died is replaced; a live one is an error.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another daemon already answers on {}", path.display()),
        ));
    }
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group_id("docker") {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(listener)
}

/// The ID of a group, from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// How long a stopping daemon lets calls in flight finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Answers connections on `listener` until `shutdown` completes, then lets the calls in flight
/// finish (a Mount that is starting a mount process, an Unmount that is draining one).
pub async fn serve(
    driver: Arc<Driver>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!("accepting a connection: {err}");
                    continue;
                }
            },
        };
        let driver = Arc::clone(&driver);
        let service = service_fn(move |request| answer(Arc::clone(&driver), request));
        let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!("plugin connection: {err}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("calls still in flight after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
}

type Answer = Result<Response<Full<Bytes>>, std::convert::Infallible>;

fn respond(status: StatusCode, body: &impl Serialize) -> Answer {
    let json = serde_json::to_vec(body).expect("answers serialize");
    Ok(Response::builder()
        .status(status)
        .header(CONTENT_TYPE, protocol::CONTENT_TYPE)
        .body(Full::new(Bytes::from(json)))
        .expect("a valid response"))
}

fn fail(status: StatusCode, message: impl Into<String>) -> Answer {
    respond(
        status,
        &ErrResponse {
            err: message.into(),
        },
    )
}

/// A request body as `T`; an empty body (or `null`) reads as `{}`.
fn parse<T: DeserializeOwned>(endpoint: &str, body: &[u8]) -> Result<T, String> {
    let body = match body.trim_ascii() {
        b"" | b"null" => b"{}".as_slice(),
        body => body,
    };
    serde_json::from_slice(body).map_err(|err| format!("malformed request to {endpoint}: {err}"))
}

async fn answer(driver: Arc<Driver>, request: Request<Incoming>) -> Answer {
    let endpoint = request.uri().path().to_string();
    if !ENDPOINTS.contains(&endpoint.as_str()) {
        return fail(
            StatusCode::NOT_FOUND,
            format!(
                "unknown endpoint {endpoint}; cairn answers {}",
                ENDPOINTS.join(", ")
            ),
        );
    }
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => {
            return fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes"),
            );
        }
        Err(err) => {
            return fail(
                StatusCode::BAD_REQUEST,
                format!("reading the request: {err}"),
            );
        }
    };
    let started = std::time::Instant::now();
    let span = tracing::info_span!("request", %endpoint);
    let answer = match call(&driver, &endpoint, &body).instrument(span).await {
        Ok(answer) => answer,
        Err(Malformed(message)) => fail(StatusCode::BAD_REQUEST, message),
    };
    // One line per call (shown with CAIRN_LOG=info); failures are also logged as warnings.
    let status = answer.as_ref().map_or(500, |a| a.status().as_u16());
    let elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::info!(%endpoint, status, elapsed_ms, "plugin call");
    answer
}

/// A body that does not parse.
struct Malformed(String);

impl From<String> for Malformed {
    fn from(message: String) -> Self {
        Self(message)
    }
}

fn err_text(result: Result<(), crate::volumes::DriverError>) -> String {
    result.err().map(|e| e.to_string()).unwrap_or_default()
}

async fn call(driver: &Driver, endpoint: &str, body: &[u8]) -> Result<Answer, Malformed> {
    let ok = StatusCode::OK;
    Ok(match endpoint {
        "/Plugin.Activate" => respond(
            ok,
            &ActivateResponse {
                implements: vec!["VolumeDriver"],
            },
        ),
        "/VolumeDriver.Capabilities" => respond(ok, &CapabilitiesResponse::from(driver.scope())),
        "/VolumeDriver.Create" => {
            let request: CreateRequest = parse(endpoint, body)?;
            let options = request.opts.unwrap_or_default();
            let err = err_text(driver.create(&request.name, &options).await);
            log_failure(endpoint, &request.name, &err);
            respond(ok, &ErrResponse { err })
        }
        "/VolumeDriver.Remove" => {
            let request: NameRequest = parse(endpoint, body)?;
            let err = err_text(driver.remove(&request.name).await);
            log_failure(endpoint, &request.name, &err);
            respond(ok, &ErrResponse { err })
        }
        "/VolumeDriver.Mount" => {
            let request: MountRequest = parse(endpoint, body)?;
            let (mountpoint, err) = match driver.mount(&request.name, &request.id).await {
                Ok(path) => (path.to_string_lossy().into_owned(), String::new()),
                Err(err) => (String::new(), err.to_string()),
            };
            log_failure(endpoint, &request.name, &err);
            respond(ok, &MountpointResponse { mountpoint, err })
        }
        "/VolumeDriver.Unmount" => {
            let request: MountRequest = parse(endpoint, body)?;
            let err = err_text(driver.unmount(&request.name, &request.id).await);
            log_failure(endpoint, &request.name, &err);
            respond(ok, &ErrResponse { err })
        }
        "/VolumeDriver.Path" => {
            let request: NameRequest = parse(endpoint, body)?;
            let (mountpoint, err) = match driver.path(&request.name).await {
                Ok(path) => (path.to_string_lossy().into_owned(), String::new()),
                Err(err) => (String::new(), err.to_string()),
            };
            respond(ok, &MountpointResponse { mountpoint, err })
        }
        "/VolumeDriver.Get" => {
            let request: NameRequest = parse(endpoint, body)?;
            match driver.get(&request.name).await {
                Ok(info) => respond(
                    ok,
                    &GetResponse {
                        volume: info.into(),
                        err: String::new(),
                    },
                ),
                Err(err) => fail(ok, err.to_string()),
            }
        }
        "/VolumeDriver.List" => match driver.list().await {
            Ok(volumes) => respond(
                ok,
                &ListResponse {
                    volumes: volumes.into_iter().map(Into::into).collect(),
                    err: String::new(),
                },
            ),
            Err(err) => fail(ok, err.to_string()),
        },
        _ => unreachable!("endpoints are checked against ENDPOINTS first"),
    })
}

fn log_failure(endpoint: &str, volume: &str, err: &str) {
    if !err.is_empty() {
        tracing::warn!(%endpoint, %volume, "{err}");
    }
}
