//! What the filesystem's operations answer: attributes, directory entries, the changes of a
//! setattr, an opened file, statfs. Plain data for the FUSE adapter.

use std::fs::File;
use std::sync::Arc;
use std::time::SystemTime;

use crate::attrs::Kind;

/// What `stat` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits only.
    pub perm: u32,
    /// The type bits of st_mode (`S_IFIFO`, `S_IFSOCK`, ... tell special files, which are
    /// files to the filesystem).
    pub file_type: u32,
    /// A device node's device number.
    pub rdev: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub atime: SystemTime,
    pub ctime: SystemTime,
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: String,
    pub attr: Attr,
}

/// The changes of a `setattr` call.
#[derive(Debug, Clone, Default)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
    pub atime: Option<SystemTime>,
}

/// An opened file.
#[derive(Debug, Clone)]
pub struct Opened {
    pub fh: u64,
    /// The kernel may keep its page cache of the file: it has not changed since last opened.
    pub keep_cache: bool,
    /// The kernel should read and write this cache file itself (see `direct`).
    pub direct: Option<Arc<File>>,
}

/// What `statfs` shows: a volume with room to spare (the store has no fixed size).
#[derive(Debug, Clone, Copy)]
pub struct Statfs {
    pub blocks: u64,
    pub free: u64,
    pub files: u64,
    pub free_files: u64,
    pub block_size: u32,
    pub name_max: u32,
}
