//! The mount's side of the control socket: answers each connection's one request (see the
//! protocol in [`super`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{CONTROL_DIR, FlushUpdate, Request, socket_path};
use crate::fs::Filesystem;

/// Listens on the control socket of `mountpoint` until the returned task is aborted.
pub fn serve(
    fs: Arc<Filesystem>,
    mountpoint: &Path,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(mountpoint);
    std::fs::create_dir_all(CONTROL_DIR)?;
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    let rate = Arc::new(UploadRate::default());
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { return };
                    let (fs, rate) = (Arc::clone(&fs), Arc::clone(&rate));
                    tokio::spawn(async move {
                        if let Err(err) = answer(fs, rate, stream).await {
                            tracing::debug!("control connection: {err}");
                        }
                    });
                }
                _ = tick.tick() => rate.sample(fs.upload_status().uploaded_bytes),
            }
        }
    }))
}

/// Bytes uploaded per second over the last ten seconds, from a sample a second.
#[derive(Debug, Default)]
struct UploadRate {
    samples: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
}

impl UploadRate {
    const WINDOW: usize = 11;

    fn sample(&self, uploaded: u64) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((std::time::Instant::now(), uploaded));
        while samples.len() > Self::WINDOW {
            samples.pop_front();
        }
    }

    fn bytes_per_second(&self) -> u64 {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        match (samples.front(), samples.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                (b1.saturating_sub(*b0) as f64 / (*t1 - *t0).as_secs_f64()) as u64
            }
            _ => 0,
        }
    }
}

async fn answer(
    fs: Arc<Filesystem>,
    rate: Arc<UploadRate>,
    stream: UnixStream,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut request = String::new();
    BufReader::new(read).read_line(&mut request).await?;
    let send = |update: FlushUpdate| format!("{}\n", update.line());
    let Some(request) = Request::parse(&request) else {
        let refused = FlushUpdate::Error {
            permanent: true,
            message: format!("unknown request {:?}", request.trim()),
        };
        write.write_all(send(refused).as_bytes()).await?;
        return Ok(());
    };
    if request == Request::Status {
        let pending = fs.pending_now().await;
        let status = fs.upload_status();
        let oldest = pending
            .oldest
            .and_then(|due| std::time::SystemTime::now().duration_since(due).ok())
            .map(|age| age.as_secs());
        let line = serde_json::json!({
            "pending_changes": pending.changes,
            "pending_bytes": pending.bytes,
            "oldest_pending_seconds": oldest,
            "uploaded_bytes": status.uploaded_bytes,
            "upload_rate": rate.bytes_per_second(),
            "applied_changes": status.applied_changes,
            "failing": status.failing,
            "permanent": status.permanent,
            "last_error": status.last_error.map(|(_, message)| message),
        });
        write.write_all(format!("{line}\n").as_bytes()).await?;
        return Ok(());
    }
    if request == Request::Metrics {
        let line =
            serde_json::to_string(&fs.metrics().snapshot()).map_err(std::io::Error::other)?;
        write.write_all(format!("{line}\n").as_bytes()).await?;
        return Ok(());
    }
    let draining = {
        let fs = Arc::clone(&fs);
        tokio::spawn(async move { fs.drain(None).await })
    };
    let mut last_error = None;
    while !draining.is_finished() {
        let pending = fs.pending();
        let update = FlushUpdate::Pending {
            changes: pending.changes as u64,
            bytes: pending.bytes,
        };
        write.write_all(send(update).as_bytes()).await?;
        let status = fs.upload_status();
        if status.failing
            && let Some((at, message)) = status.last_error
            && last_error != Some(at)
        {
            last_error = Some(at);
            let update = FlushUpdate::Error {
                permanent: status.permanent,
                message,
            };
            write.write_all(send(update).as_bytes()).await?;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let last = match draining.await {
        Ok(Ok(())) => {
            let none_left = FlushUpdate::Pending {
                changes: 0,
                bytes: 0,
            };
            send(none_left) + &send(FlushUpdate::Done)
        }
        Ok(Err(err)) => send(FlushUpdate::Error {
            permanent: true,
            message: err.to_string(),
        }),
        Err(err) => send(FlushUpdate::Error {
            permanent: true,
            message: err.to_string(),
        }),
    };
    write.write_all(last.as_bytes()).await?;
    Ok(())
}
