//! The one error type of the filesystem logic, and its exhaustive mapping to the errno a POSIX
//! program sees at the FUSE boundary.

use crate::store::{ErrorKind, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("name too long: {0}")]
    NameTooLong(String),
    #[error("invalid name or argument: {0}")]
    Invalid(String),
    #[error("read-only mount")]
    ReadOnly,
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    #[error("bad file handle")]
    BadHandle,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("local cache: {0}")]
    Io(#[from] std::io::Error),
    #[error("cache index: {0}")]
    Index(#[from] rusqlite::Error),
    /// This mount may no longer write to the store (its lease was taken over).
    #[error("{0}")]
    Fenced(String),
}

impl FsError {
    /// The errno for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound => libc::ENOENT,
            Self::Exists => libc::EEXIST,
            Self::NotEmpty => libc::ENOTEMPTY,
            Self::NotDir => libc::ENOTDIR,
            Self::IsDir => libc::EISDIR,
            Self::NameTooLong(_) => libc::ENAMETOOLONG,
            Self::Invalid(_) => libc::EINVAL,
            Self::ReadOnly => libc::EROFS,
            Self::NotSupported(_) => libc::EOPNOTSUPP,
            Self::BadHandle => libc::EBADF,
            Self::NotPermitted => libc::EPERM,
            Self::Fenced(_) => libc::EIO,
            Self::Store(err) => match err.kind() {
                ErrorKind::NotFound => libc::ENOENT,
                ErrorKind::AccessDenied => libc::EACCES,
                ErrorKind::Timeout => libc::ETIMEDOUT,
                ErrorKind::InvalidRequest => libc::EINVAL,
                ErrorKind::NoSuchBucket
                | ErrorKind::PreconditionFailed
                | ErrorKind::Throttled
                | ErrorKind::Unavailable
                | ErrorKind::Other => libc::EIO,
            },
            Self::Io(err) => err.raw_os_error().unwrap_or(libc::EIO),
            Self::Index(rusqlite::Error::SqliteFailure(failure, _))
                if failure.code == rusqlite::ErrorCode::DiskFull =>
            {
                libc::ENOSPC
            }
            Self::Index(_) => libc::EIO,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
