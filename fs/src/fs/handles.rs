//! Open handles: the files and directories the kernel holds open, by handle number. Owns its
//! one lock, a leaf: nothing else is locked while it is held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::direct::Route;
use super::reply::DirEntry;
use crate::error::{FsError, FsResult};

#[derive(Debug)]
pub(super) enum Handle {
    File {
        ino: u64,
        /// Where the next sequential read would start, and the current read-ahead window.
        next_offset: u64,
        window: u64,
        /// How the kernel reaches the file's bytes through this handle.
        route: Route,
    },
    /// An open directory: listed at its first `readdir` (so an open for `fsync`, as SQLite
    /// does at each commit, costs no listing).
    Dir {
        ino: u64,
        entries: Option<Arc<Vec<DirEntry>>>,
    },
}

/// The table of open handles.
#[derive(Debug)]
pub(super) struct Handles {
    table: Mutex<HashMap<u64, Handle>>,
    next: AtomicU64,
}

impl Default for Handles {
    fn default() -> Self {
        Self {
            table: Mutex::default(),
            next: AtomicU64::new(1),
        }
    }
}

impl Handles {
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<u64, Handle>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a handle; returns its number.
    pub(super) fn open(&self, handle: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(fh, handle);
        fh
    }

    /// Opens a new handle of file `ino` with a first read-ahead window of `window` bytes;
    /// returns its number.
    pub(super) fn open_file(&self, ino: u64, window: u64) -> u64 {
        self.open(Handle::File {
            ino,
            next_offset: 0,
            window,
            route: Route::Opening,
        })
    }

    pub(super) fn close(&self, fh: u64) {
        self.lock().remove(&fh);
    }

    /// The file and route of file handle `fh`.
    pub(super) fn file(&self, fh: u64) -> FsResult<(u64, Route)> {
        match self.lock().get(&fh) {
            Some(Handle::File { ino, route, .. }) => Ok((*ino, *route)),
            _ => Err(FsError::BadHandle),
        }
    }

    pub(super) fn set_route(&self, fh: u64, new: Route) {
        if let Some(Handle::File { route, .. }) = self.lock().get_mut(&fh) {
            *route = new;
        }
    }

    /// The read-ahead window of a read of `size` bytes at `offset` through `fh`, growing (up to
    /// `max`) while reads are sequential. The kernel sends its own read-ahead as several reads
    /// at once, which may arrive out of order: a read within a `block` of where the last ended
    /// still counts as sequential.
    pub(super) fn read_window(&self, fh: u64, offset: u64, size: u64, block: u64, max: u64) -> u64 {
        let mut table = self.lock();
        let Some(Handle::File {
            next_offset,
            window,
            ..
        }) = table.get_mut(&fh)
        else {
            return 0;
        };
        let sequential = offset > 0 && offset.abs_diff(*next_offset) <= block;
        if sequential {
            *window = (*window * 2).min(max);
            *next_offset = (*next_offset).max(offset + size);
        } else {
            *window = block;
            *next_offset = offset + size;
        }
        *window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window doubles while reads follow each other (even slightly out of order), up to
    /// the maximum, and starts over at a jump.
    #[test]
    fn the_read_ahead_window_grows_on_sequential_reads_and_resets_on_a_jump() {
        let handles = Handles::default();
        let fh = handles.open_file(2, 1 << 20);
        let (block, max) = (1 << 20, 4 << 20);
        assert_eq!(handles.read_window(fh, 0, 128 << 10, block, max), block);
        assert_eq!(
            handles.read_window(fh, 128 << 10, 128 << 10, block, max),
            2 << 20
        );
        assert_eq!(
            handles.read_window(fh, 512 << 10, 128 << 10, block, max),
            4 << 20
        );
        assert_eq!(
            handles.read_window(fh, 256 << 10, 128 << 10, block, max),
            4 << 20
        );
        assert_eq!(handles.read_window(fh, 100 << 20, 4096, block, max), block);
        assert_eq!(
            handles.read_window(9, 0, 4096, block, max),
            0,
            "no such handle"
        );
    }
}
