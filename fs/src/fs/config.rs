//! How the filesystem behaves: the settings a mount is made with.

use std::time::Duration;

use crate::attrs::Defaults;

/// How the filesystem behaves.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Attributes shown for objects that carry none.
    pub defaults: Defaults,
    /// How long what the store said is trusted before asking again (and the kernel's TTL).
    pub metadata_ttl: Duration,
    /// This mount is the only writer of its folder (an exclusive volume): what it listed,
    /// looked up or made stays known for as long as it lives, whatever `metadata_ttl` says
    /// (which still sets the kernel's TTL). Objects other tools put into the folder behind its
    /// back are not seen until the next mount.
    pub only_writer: bool,
    pub read_only: bool,
    /// Reads fetch whole blocks of this size.
    pub block_size: u64,
    /// The read-ahead window grows on sequential reads up to this.
    pub max_readahead: u64,
    /// Files up to this size upload in one put; larger ones in multipart parts of `part_size`.
    pub single_put_limit: u64,
    pub part_size: u64,
    /// Store requests in flight for one read or upload.
    pub concurrency: usize,
    /// Changes applied to the store at once.
    pub uploads_in_flight: usize,
    /// How long after a close a file's upload waits (more writes may follow).
    pub writeback_delay: Duration,
    /// fsync returns once the data is on local disk (true) or in the store (false).
    pub fsync_local: bool,
    /// A file kept open and written is uploaded at least this often.
    pub max_dirty_age: Duration,
    /// Bytes of local disk the cache may use; clean data beyond it is evicted, and writers wait
    /// for uploads when changed data fills it.
    pub cache_size: u64,
    /// A stored file at least this large that changes before it is all cached keeps its
    /// unchanged bytes in the store: its upload copies those parts inside the store instead of
    /// downloading and uploading them again.
    pub copy_threshold: u64,
    /// Let the kernel read and write a file's cache file itself (FUSE passthrough) when the cache
    /// file holds the whole file, if the kernel offers it (see `direct`).
    pub passthrough: bool,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            defaults: Defaults::default(),
            metadata_ttl: Duration::from_secs(2),
            only_writer: false,
            read_only: false,
            block_size: 1 << 20,
            max_readahead: 128 << 20,
            single_put_limit: 16 << 20,
            part_size: 8 << 20,
            concurrency: 8,
            uploads_in_flight: 8,
            writeback_delay: Duration::from_secs(2),
            fsync_local: false,
            max_dirty_age: Duration::from_secs(30),
            cache_size: 10 << 30,
            copy_threshold: 32 << 20,
            passthrough: true,
        }
    }
}

impl FsConfig {
    /// How long what the mount learned of its folder (names, attributes, listings) is trusted:
    /// the metadata TTL, or for the only writer, for good.
    pub fn trust(&self) -> Duration {
        if self.only_writer {
            Duration::MAX
        } else {
            self.metadata_ttl
        }
    }
}
