//! The control socket of a mount process: `cairn flush MOUNTPOINT` connects to it, asks for a
//! flush, and reads progress lines until everything is in the store.
//!
//! Protocol (one line each way, then lines back): the client sends `flush`; the mount answers
//! `pending CHANGES BYTES` lines while it works, `error permanent|retrying MESSAGE` when applying
//! a change fails, and `done` once the store holds everything. Or the client sends `status` and
//! the mount answers one line of JSON: `pending_changes`, `pending_bytes`,
//! `oldest_pending_seconds` (how long the oldest waiting change has been due), `uploaded_bytes`,
//! `upload_rate` (bytes per second over the last ten seconds),
//! `applied_changes`, `failing`, `permanent` and `last_error` (the plugin daemon shows these in
//! `docker volume inspect` and `cairn report`). Or `metrics`, answered with one line of JSON: the
//! mount's [`crate::metrics::MetricsSnapshot`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::fs::Filesystem;

/// Where control sockets live.
pub const CONTROL_DIR: &str = "/run/cairn/mounts";

/// The control socket of the mount on `mountpoint` (a short name: socket paths are limited).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    // FNV-1a: stable across builds, unlike the standard hasher.
    let hash = canonical
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    Path::new(CONTROL_DIR).join(format!("{hash:016x}.sock"))
}

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
    if request.trim() == "status" {
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
    if request.trim() == "metrics" {
        let line =
            serde_json::to_string(&fs.metrics().snapshot()).map_err(std::io::Error::other)?;
        write.write_all(format!("{line}\n").as_bytes()).await?;
        return Ok(());
    }
    if request.trim() != "flush" {
        write
            .write_all(b"error permanent unknown request\n")
            .await?;
        return Ok(());
    }
    let draining = {
        let fs = Arc::clone(&fs);
        tokio::spawn(async move { fs.drain(None).await })
    };
    let mut last_error = None;
    while !draining.is_finished() {
        let pending = fs.pending();
        write
            .write_all(format!("pending {} {}\n", pending.changes, pending.bytes).as_bytes())
            .await?;
        let status = fs.upload_status();
        if status.failing
            && let Some((at, message)) = status.last_error
            && last_error != Some(at)
        {
            last_error = Some(at);
            let kind = if status.permanent {
                "permanent"
            } else {
                "retrying"
            };
            write
                .write_all(format!("error {kind} {message}\n").as_bytes())
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    match draining.await {
        Ok(Ok(())) => write.write_all(b"pending 0 0\ndone\n").await?,
        Ok(Err(err)) => {
            write
                .write_all(format!("error permanent {err}\n").as_bytes())
                .await?
        }
        Err(err) => {
            write
                .write_all(format!("error permanent {err}\n").as_bytes())
                .await?
        }
    }
    Ok(())
}
