//! The one error type of the store boundary: a kind that callers act on, and the store's own words.

use std::fmt;

/// What kind of failure a store reported; callers decide by kind (retry, report, give up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The object (or multipart upload) does not exist.
    NotFound,
    /// The bucket, or the store's root directory, does not exist.
    NoSuchBucket,
    /// A conditional write or read found the object in another state.
    PreconditionFailed,
    /// The store asked us to slow down (503 SlowDown, 429). Retryable.
    Throttled,
    /// The store could not be reached or failed internally (connection refused, 5xx). Retryable.
    Unavailable,
    /// The store did not answer in time. Retryable.
    Timeout,
    /// The credentials were refused or do not allow this operation.
    AccessDenied,
    /// The request itself is wrong (a key too long, bad metadata, a bad part list).
    InvalidRequest,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Whether trying the same request again later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Throttled | Self::Unavailable | Self::Timeout)
    }

    fn describe(self) -> &'static str {
        match self {
            Self::NotFound => "not found",
            Self::NoSuchBucket => "bucket does not exist",
            Self::PreconditionFailed => "precondition failed",
            Self::Throttled => "throttled by the store",
            Self::Unavailable => "store unavailable",
            Self::Timeout => "store timed out",
            Self::AccessDenied => "access denied",
            Self::InvalidRequest => "invalid request",
            Self::Other => "store error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A failed store operation: its kind and the store's own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct StoreError {
    kind: ErrorKind,
    message: String,
}

impl StoreError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn not_found(key: &str) -> Self {
        Self::new(ErrorKind::NotFound, format!("{key}: no such object"))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Other, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The store's own description of what went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}
