//! A client of the plugin socket, for cairn's own commands (`cairn ls`, `cairn report`): one
//! protocol call, answered as JSON.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// Calls `endpoint` with `body` on the daemon listening on `socket`; the answer's JSON, or what
/// went wrong (including the answer's `Err`).
pub async fn call(socket: &Path, endpoint: &str, body: &Value) -> Result<Value, String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot reach the cairn daemon on {}: {e} (is `cairn serve` running?)",
            socket.display()
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::post(endpoint)
        .header("Host", "cairn")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let answer: Value = serde_json::from_slice(&bytes).map_err(|e| {
        format!("the daemon answered {endpoint} with something else than JSON: {e}")
    })?;
    match answer.get("Err").and_then(Value::as_str) {
        Some(err) if !err.is_empty() => Err(err.to_string()),
        _ => Ok(answer),
    }
}
