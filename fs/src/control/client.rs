//! Asking a mount over its control socket (see the protocol in [`super`]): the plugin daemon
//! asks for status, metrics and flushes, `cairn flush` for flushes, the tests for metrics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{FlushUpdate, Request, socket_path};

/// How long a one-line question (status, metrics) may take.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Why a flush did not finish.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("no cairn mount answers on {} ({socket}: {source})", .mountpoint.display(), socket = .socket.display())]
    Unreachable {
        mountpoint: PathBuf,
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The mount gave up: a change it cannot apply without help.
    #[error("{0}")]
    Failed(String),
    #[error("lost the mount process before the flush finished: {0}")]
    Lost(String),
}

async fn connect(mountpoint: &Path, request: Request) -> Result<UnixStream, FlushError> {
    let socket = socket_path(mountpoint);
    let unreachable = |source| FlushError::Unreachable {
        mountpoint: mountpoint.to_path_buf(),
        socket: socket.clone(),
        source,
    };
    let mut stream = UnixStream::connect(&socket).await.map_err(unreachable)?;
    stream
        .write_all(format!("{}\n", request.word()).as_bytes())
        .await
        .map_err(unreachable)?;
    Ok(stream)
}

/// The one-line JSON answer of the mount on `mountpoint` to `request` (status, metrics); None
/// if it does not answer within two seconds.
pub async fn ask(mountpoint: &Path, request: Request) -> Option<Value> {
    let ask = async {
        let stream = connect(mountpoint, request).await.ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.ok()?;
        serde_json::from_str(&line).ok()
    };
    tokio::time::timeout(ANSWER_WAIT, ask).await.ok().flatten()
}

/// Asks the mount on `mountpoint` to upload everything and waits until it has, handing each
/// update to `seen` on the way. Bound it with a timeout if it must end.
pub async fn flush(
    mountpoint: &Path,
    mut seen: impl FnMut(&FlushUpdate),
) -> Result<(), FlushError> {
    let stream = connect(mountpoint, Request::Flush).await?;
    let mut lines = BufReader::new(stream).lines();
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| FlushError::Lost(e.to_string()))?
            .ok_or_else(|| FlushError::Lost("it closed the connection".into()))?;
        let Some(update) = FlushUpdate::parse(&line) else {
            continue;
        };
        seen(&update);
        match update {
            FlushUpdate::Done => return Ok(()),
            FlushUpdate::Error {
                permanent: true,
                message,
            } => return Err(FlushError::Failed(message)),
            _ => {}
        }
    }
}
