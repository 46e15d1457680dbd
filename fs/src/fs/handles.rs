//! Open handles: files and directories the kernel holds open.

use super::direct;
use super::reply::DirEntry;
use std::sync::Arc;

#[derive(Debug)]
pub(super) enum Handle {
    File {
        ino: u64,
        /// Where the next sequential read would start, and the current read-ahead window.
        next_offset: u64,
        window: u64,
        /// How the kernel reaches the file's bytes through this handle.
        route: direct::Route,
    },
    /// An open directory: listed at its first `readdir` (so an open for `fsync`, as SQLite
    /// does at each commit, costs no listing).
    Dir {
        ino: u64,
        entries: Option<Arc<Vec<DirEntry>>>,
    },
}
