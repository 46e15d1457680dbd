//! The control socket of a mount process, defined once here: the mount serves it
//! ([`server`]), and the plugin daemon, `cairn flush` and the tests ask it ([`client`]).
//!
//! Protocol (one line each way, then lines back). The client sends one [`Request`]:
//! - `flush`: the mount answers [`FlushUpdate`] lines: `pending CHANGES BYTES` while it works,
//!   `error permanent|retrying MESSAGE` when applying a change fails, and `done` once the store
//!   holds everything;
//! - `status`: one line of JSON: `pending_changes`, `pending_bytes`, `oldest_pending_seconds`
//!   (how long the oldest waiting change has been due), `uploaded_bytes`, `upload_rate` (bytes
//!   per second over the last ten seconds), `applied_changes`, `failing`, `permanent` and
//!   `last_error` (the plugin daemon shows these in `docker volume inspect` and `cairn report`);
//! - `metrics`: one line of JSON, the mount's [`crate::metrics::MetricsSnapshot`].

pub mod client;
mod server;

use std::path::{Path, PathBuf};

pub use server::serve;

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

/// What a client asks of a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Upload everything now, reporting progress until done.
    Flush,
    /// The upload figures, as one line of JSON.
    Status,
    /// The mount's counters, as one line of JSON.
    Metrics,
}

impl Request {
    /// The request's line, without its newline.
    pub fn word(self) -> &'static str {
        match self {
            Self::Flush => "flush",
            Self::Status => "status",
            Self::Metrics => "metrics",
        }
    }

    pub fn parse(line: &str) -> Option<Self> {
        [Self::Flush, Self::Status, Self::Metrics]
            .into_iter()
            .find(|request| request.word() == line.trim())
    }
}

/// One line of the answer to a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushUpdate {
    /// Still to go.
    Pending { changes: u64, bytes: u64 },
    /// Applying a change failed; `permanent` when retrying will not fix it by itself (the flush
    /// ends), else it is retried.
    Error { permanent: bool, message: String },
    /// The store holds everything written before the flush.
    Done,
}

impl FlushUpdate {
    /// The update's line, without its newline.
    pub fn line(&self) -> String {
        match self {
            Self::Pending { changes, bytes } => format!("pending {changes} {bytes}"),
            Self::Error { permanent, message } => {
                let kind = if *permanent { "permanent" } else { "retrying" };
                // One line: the message may not end it early.
                format!("error {kind} {}", message.replace('\n', " "))
            }
            Self::Done => "done".into(),
        }
    }

    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.trim_end().splitn(3, ' ');
        match (words.next()?, words.next(), words.next()) {
            ("pending", Some(changes), Some(bytes)) => Some(Self::Pending {
                changes: changes.parse().ok()?,
                bytes: bytes.parse().ok()?,
            }),
            ("error", Some(kind @ ("permanent" | "retrying")), Some(message)) => {
                Some(Self::Error {
                    permanent: kind == "permanent",
                    message: message.to_string(),
                })
            }
            ("done", None, None) => Some(Self::Done),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_flush_updates_read_back_as_written() {
        for request in [Request::Flush, Request::Status, Request::Metrics] {
            assert_eq!(
                Request::parse(&format!("{}\n", request.word())),
                Some(request)
            );
        }
        assert_eq!(Request::parse("drop tables"), None);
        for update in [
            FlushUpdate::Pending {
                changes: 3,
                bytes: 4096,
            },
            FlushUpdate::Error {
                permanent: true,
                message: "access denied: check the key".into(),
            },
            FlushUpdate::Error {
                permanent: false,
                message: "timed out".into(),
            },
            FlushUpdate::Done,
        ] {
            assert_eq!(FlushUpdate::parse(&update.line()), Some(update));
        }
        assert_eq!(FlushUpdate::parse("pending x 1"), None);
        assert_eq!(FlushUpdate::parse("error maybe oops"), None);
    }

    #[test]
    fn an_error_message_stays_on_one_line() {
        let update = FlushUpdate::Error {
            permanent: true,
            message: "first\nsecond".into(),
        };
        assert_eq!(update.line(), "error permanent first second");
    }
}
