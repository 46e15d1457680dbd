//! The local cache of file contents: one sparse cache file per file, and a SQLite index of which
//! byte ranges of which object version (key + ETag) each cache file holds, so that a remount
//! reads what is still valid from local disk.
//!
//! The index only ever describes clean data (bytes as the store has them): a file that is
//! being changed locally is dropped from the index first, and recorded again once uploaded.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::FsResult;
use crate::store::ETag;

/// A set of disjoint, non-touching byte ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end
    spans: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn full(end: u64) -> Self {
        let mut set = Self::default();
        set.insert(0..end);
        set
    }

    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        let touching: Vec<(u64, u64)> = self
            .spans
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.spans.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.spans.insert(start, end);
    }

    /// Forgets everything at or past `offset`.
    pub fn truncate(&mut self, offset: u64) {
        let cut: Vec<(u64, u64)> = self
            .spans
            .range(..)
            .filter(|(_, e)| **e > offset)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, _) in cut {
            self.spans.remove(&s);
            if s < offset {
                self.spans.insert(s, offset);
            }
        }
    }

    /// The parts of `range` not in the set, in order.
    pub fn missing(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut at = range.start;
        let overlapping = self
            .spans
            .range(..range.end)
            .filter(|(_, e)| **e > range.start);
        for (&s, &e) in overlapping {
            if s > at {
                gaps.push(at..s);
            }
            at = at.max(e);
        }
        if at < range.end {
            gaps.push(at..range.end);
        }
        gaps
    }

    pub fn contains(&self, range: Range<u64>) -> bool {
        range.start >= range.end || self.missing(range).is_empty()
    }

    pub fn spans(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.spans.iter().map(|(s, e)| *s..*e)
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.spans.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

/// What the index knows of one object version.
#[derive(Debug, Clone)]
pub struct Cached {
    pub file: String,
    pub etag: ETag,
    pub present: RangeSet,
}

/// A cached object that eviction may remove.
#[derive(Debug, Clone)]
pub struct Evictable {
    pub key: String,
    pub file: String,
    /// The disk its cache file takes.
    pub bytes: u64,
}

/// A changed file that holds only some of its bytes: those it did not change, below
/// `base_end`, are the store's version `etag` of its key, which an upload copies inside the
/// store instead of uploading them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    pub etag: ETag,
    pub base_end: u64,
    /// The bytes written since the base version (in the cache file).
    pub changed: RangeSet,
}

impl Partial {
    /// The parts of `range` that are the base version's bytes.
    pub fn from_base(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let end = range.end.min(self.base_end);
        if range.start >= end {
            return Vec::new();
        }
        self.changed.missing(range.start..end)
    }
}

/// The cache directory: `data/` holds the cache files, `index.db` the SQLite index (which
/// versions of which keys the cache files hold, and what changed files hold only in part).
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    index: Arc<Mutex<Connection>>,
    spares: Arc<Spares>,
}

/// Empty cache files made ahead of need, by a thread of their own: a new file's cache file is
/// then taken from memory, with no `openat` on the way (a new inode took 0.3-1 ms on this
/// machine's ext4 after many deletes, most of the time of creating a small file through the
/// mount). Spares that no file took are removed when the cache is dropped, or as orphans when
/// the next mount starts.
#[derive(Debug)]
struct Spares {
    data: PathBuf,
    files: Mutex<Vec<(String, File)>>,
    /// A thread is making more.
    refilling: AtomicBool,
}

/// Below this many spares, a thread makes more, up to [`SPARES_HIGH`].
const SPARES_LOW: usize = 32;
const SPARES_HIGH: usize = 128;

impl Spares {
    fn new(data: PathBuf) -> Self {
        Self {
            data,
            files: Mutex::default(),
            refilling: AtomicBool::new(false),
        }
    }

    fn files(&self) -> std::sync::MutexGuard<'_, Vec<(String, File)>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A spare, if one is ready; starts making more when few are left.
    fn take(self: &Arc<Self>) -> Option<(String, File)> {
        let (taken, left) = {
            let mut files = self.files();
            (files.pop(), files.len())
        };
        if left < SPARES_LOW && !self.refilling.swap(true, Ordering::AcqRel) {
            let spares = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("cairn-spares".into())
                .spawn(move || spares.refill());
            if spawned.is_err() {
                self.refilling.store(false, Ordering::Release);
            }
        }
        taken
    }

    fn refill(&self) {
        while self.files().len() < SPARES_HIGH {
            match create_cache_file(&self.data) {
                Ok(spare) => self.files().push(spare),
                // A full disk, say: the foreground makes its own and says why.
                Err(_) => break,
            }
        }
        self.refilling.store(false, Ordering::Release);
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        for (name, _) in self.files().drain(..) {
            let _ = fs::remove_file(self.data.join(name));
        }
    }
}

/// A new, empty cache file in `data`, with a random name.
fn create_cache_file(data: &Path) -> std::io::Result<(String, File)> {
    let name = uuid::Uuid::new_v4().simple().to_string();
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(data.join(&name))?;
    Ok((name, file))
}

impl Cache {
    /// Opens (creating, mode 0700) the cache in `dir`.
    pub fn open(dir: &Path) -> FsResult<Self> {
        for sub in ["data", "snapshots"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))?;
        }
        // Snapshots are only ever in use by a running uploader.
        for stale in fs::read_dir(dir.join("snapshots"))? {
            let _ = fs::remove_file(stale?.path());
        }
        let index = Connection::open(dir.join("index.db"))?;
        index.pragma_update(None, "journal_mode", "WAL")?;
        index.pragma_update(None, "synchronous", "NORMAL")?;
        index.execute_batch(
            "CREATE TABLE IF NOT EXISTS objects (
                 key TEXT PRIMARY KEY,
                 etag TEXT NOT NULL,
                 file TEXT NOT NULL UNIQUE,
                 used REAL NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS ranges (
                 file TEXT NOT NULL,
                 start INTEGER NOT NULL,
                 end INTEGER NOT NULL,
                 PRIMARY KEY (file, start)
             );
             CREATE TABLE IF NOT EXISTS partial (
                 file TEXT PRIMARY KEY,
                 etag TEXT NOT NULL,
                 base_end INTEGER NOT NULL
             );",
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            index: Arc::new(Mutex::new(index)),
            spares: Arc::new(Spares::new(dir.join("data"))),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the cache disk can take `bytes` more file data and still keep the margin the
    /// change log and the index need (so that the deletes that free space can be recorded).
    pub fn room_for(&self, bytes: u64) -> bool {
        const MARGIN: u64 = 2 << 20;
        free_bytes(&self.dir).is_none_or(|free| free >= bytes + MARGIN)
    }

    /// Whether the cache disk has room for a copy of `file` and then some (else an upload goes
    /// from the cache file itself rather than from a snapshot).
    pub fn room_for_copy_of(&self, file: &str) -> bool {
        let size = fs::metadata(self.path_of(file)).map_or(0, |m| m.len());
        free_bytes(&self.dir).is_none_or(|free| free >= 2 * size + (16 << 20))
    }

    /// Free bytes on the cache disk (None if the system cannot tell).
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh path for an upload's snapshot of a cache file.
    pub fn snapshot_path(&self) -> PathBuf {
        self.dir
            .join("snapshots")
            .join(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Marks `file` as just used, for eviction's order. Best effort: on a full disk the index
    /// may refuse the update, and the file only looks older than it is.
    pub fn touch(&self, file: &str) {
        let touched = self.index().execute(
            "UPDATE objects SET used = ?2 WHERE file = ?1",
            params![file, now_seconds()],
        );
        if let Err(err) = touched {
            tracing::debug!("could not mark cache file {file} as used: {err}");
        }
    }

    /// Cache files the index names.
    pub fn indexed_files(&self) -> FsResult<Vec<String>> {
        let index = self.index();
        let mut query = index.prepare("SELECT file FROM objects")?;
        let files = query
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(files)
    }

    /// Every cache file on disk.
    pub fn all_files(&self) -> FsResult<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.dir.join("data"))? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    /// Bytes of local disk a cache file takes (its allocated blocks; holes take none).
    pub fn file_bytes(&self, file: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(self.path_of(file)).map_or(0, |m| m.blocks() * 512)
    }

    /// What to evict to bring the cache under `limit` (to nine tenths of it): the bytes to free
    /// (0 when under the limit) and every cached object, least recently used first. The caller
    /// skips the files in use and removes the rest with [`Self::remove`] until enough is freed.
    pub fn eviction_candidates(&self, limit: u64) -> FsResult<(u64, Vec<Evictable>)> {
        let used: u64 = self.all_files()?.iter().map(|f| self.file_bytes(f)).sum();
        if used <= limit {
            return Ok((0, Vec::new()));
        }
        let index = self.index();
        let mut query = index.prepare("SELECT key, file FROM objects ORDER BY used")?;
        let candidates = query
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|(key, file)| {
                let bytes = self.file_bytes(&file);
                Evictable { key, file, bytes }
            })
            .collect();
        Ok((used - limit / 10 * 9, candidates))
    }

    pub fn path_of(&self, file: &str) -> PathBuf {
        self.dir.join("data").join(file)
    }

    /// A new, empty cache file; returns its name and an open handle.
    pub fn new_file(&self) -> FsResult<(String, File)> {
        match self.spare_file() {
            Some(spare) => Ok(spare),
            None => Ok(create_cache_file(&self.dir.join("data"))?),
        }
    }

    /// A new, empty cache file made ahead of need, if one is ready: no disk I/O, so an async
    /// worker may ask ([`Cache::new_file`] makes one when none is).
    pub fn spare_file(&self) -> Option<(String, File)> {
        self.spares.take()
    }

    /// Whether cache file `name` is on disk (the index may outlive it after a full disk).
    pub fn has_file(&self, name: &str) -> bool {
        self.path_of(name).exists()
    }

    pub fn open_file(&self, name: &str) -> FsResult<File> {
        Ok(OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path_of(name))?)
    }

    /// What the index holds for `key`, if anything.
    pub fn lookup(&self, key: &str) -> FsResult<Option<Cached>> {
        let index = self.index();
        let row: Option<(String, String)> = index
            .query_row(
                "SELECT file, etag FROM objects WHERE key = ?1",
                params![key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((file, etag)) = row else {
            return Ok(None);
        };
        let present = ranges_of(&index, &file)?;
        Ok(Some(Cached {
            file,
            etag: ETag(etag),
            present,
        }))
    }

    /// Indexes `file` as holding `present` of version `etag` of `key` (clean: no longer changed).
    pub fn index_version(
        &self,
        key: &str,
        file: &str,
        etag: &ETag,
        present: &RangeSet,
    ) -> FsResult<()> {
        let mut index = self.index();
        let tx = index.transaction()?;
        tx.execute("DELETE FROM partial WHERE file = ?1", params![file])?;
        tx.execute(
            "DELETE FROM objects WHERE key = ?1 OR file = ?2",
            params![key, file],
        )?;
        tx.execute(
            "INSERT INTO objects (key, etag, file, used) VALUES (?1, ?2, ?3, ?4)",
            params![key, etag.0, file, now_seconds()],
        )?;
        write_ranges(&tx, file, present)?;
        tx.commit()?;
        Ok(())
    }

    /// Records that the changed `file` holds only part of its bytes (see [`Partial`]).
    pub fn record_partial(&self, file: &str, partial: &Partial) -> FsResult<()> {
        let mut index = self.index();
        let tx = index.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO partial (file, etag, base_end) VALUES (?1, ?2, ?3)",
            params![file, partial.etag.0, partial.base_end as i64],
        )?;
        write_ranges(&tx, file, &partial.changed)?;
        tx.commit()?;
        Ok(())
    }

    /// What a changed `file` holds, if only in part.
    pub fn partial(&self, file: &str) -> FsResult<Option<Partial>> {
        let index = self.index();
        let row: Option<(String, i64)> = index
            .query_row(
                "SELECT etag, base_end FROM partial WHERE file = ?1",
                params![file],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((etag, base_end)) = row else {
            return Ok(None);
        };
        Ok(Some(Partial {
            etag: ETag(etag),
            base_end: base_end as u64,
            changed: ranges_of(&index, file)?,
        }))
    }

    /// The changed `file` now holds all its bytes.
    pub fn forget_partial(&self, file: &str) -> FsResult<()> {
        let index = self.index();
        let partial = index.execute("DELETE FROM partial WHERE file = ?1", params![file])?;
        let indexed: bool = index.query_row(
            "SELECT EXISTS (SELECT 1 FROM objects WHERE file = ?1)",
            params![file],
            |r| r.get(0),
        )?;
        if partial > 0 && !indexed {
            index.execute("DELETE FROM ranges WHERE file = ?1", params![file])?;
        }
        Ok(())
    }

    /// Drops `key` from the index (its cache file stays, for the caller to reuse or remove).
    pub fn forget(&self, key: &str) -> FsResult<()> {
        let index = self.index();
        let file: Option<String> = index
            .query_row(
                "SELECT file FROM objects WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(file) = file {
            index.execute("DELETE FROM ranges WHERE file = ?1", params![file])?;
        }
        index.execute("DELETE FROM objects WHERE key = ?1", params![key])?;
        Ok(())
    }

    /// Drops the index entry of `key` and deletes its cache file.
    pub fn remove(&self, key: &str) -> FsResult<()> {
        if let Some(cached) = self.lookup(key)? {
            // The file first: on a full disk, its room is what lets the index record the rest.
            let _ = fs::remove_file(self.path_of(&cached.file));
            self.forget(key)?;
        }
        Ok(())
    }

    /// Deletes a cache file that no index entry names.
    pub fn discard_file(&self, file: &str) {
        let _ = self.forget_partial(file);
        let _ = fs::remove_file(self.path_of(file));
    }

    /// Moves index entries from `from` to `to`: one key, or (`prefix`) every key under it.
    pub fn rename(&self, from: &str, to: &str, prefix: bool) -> FsResult<()> {
        let index = self.index();
        if prefix {
            let cut = from.chars().count() as i64 + 1;
            index.execute(
                "UPDATE objects SET key = ?2 || substr(key, ?3) WHERE substr(key, 1, length(?1)) = ?1",
                params![from, to, cut],
            )?;
        } else {
            index.execute("DELETE FROM objects WHERE key = ?1", params![to])?;
            index.execute(
                "UPDATE objects SET key = ?2 WHERE key = ?1",
                params![from, to],
            )?;
        }
        Ok(())
    }
}

/// The most bytes `write_fetched` hands the kernel in one write.
pub const WRITE_PIECE: usize = 1 << 20;

/// Writes bytes fetched from the store into a cache file at `offset`, at most 1 MiB per write.
/// The kernel sizes the page-cache folios a write allocates by the write: one 4 MiB write gets
/// 2 MiB folios. On the VM the benchmarks run on, right after a large write and sync, filling
/// such folios ran several times slower than 1 MiB writes (our reading: its host takes back free
/// memory in 2 MiB blocks, and hands each back slowly; benches/RESULTS.md, runs J and K).
pub fn write_fetched(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut at = offset;
    for piece in bytes.chunks(WRITE_PIECE) {
        file.write_all_at(piece, at)?;
        at += piece.len() as u64;
    }
    Ok(())
}

/// Free bytes on the filesystem that holds `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid out-parameter, and the path is a valid C string.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
    (rc == 0).then(|| stats.f_bavail * stats.f_frsize)
}

/// Replaces the spans the ranges table holds for `file`.
fn write_ranges(tx: &rusqlite::Transaction<'_>, file: &str, spans: &RangeSet) -> FsResult<()> {
    tx.execute("DELETE FROM ranges WHERE file = ?1", params![file])?;
    for span in spans.spans() {
        tx.execute(
            "INSERT INTO ranges (file, start, end) VALUES (?1, ?2, ?3)",
            params![file, span.start as i64, span.end as i64],
        )?;
    }
    Ok(())
}

/// The spans of `file` the ranges table holds.
fn ranges_of(index: &Connection, file: &str) -> FsResult<RangeSet> {
    let mut present = RangeSet::default();
    let mut query = index.prepare("SELECT start, end FROM ranges WHERE file = ?1")?;
    let spans = query.query_map(params![file], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
    })?;
    for span in spans {
        let (start, end) = span?;
        present.insert(start as u64..end as u64);
    }
    Ok(present)
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Copies the `spans` of `source` (below `size`) into a new file `target` of `size` bytes,
/// leaving the rest as holes; returns `size`.
fn copy_spans(source: &Path, target: &Path, size: u64, spans: &RangeSet) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let from = std::fs::File::open(source)?;
    let to = std::fs::File::create(target)?;
    to.set_len(size)?;
    let mut buffer = vec![0; CHUNK as usize];
    for span in spans.spans() {
        let mut at = span.start;
        while at < span.end.min(size) {
            let len = (span.end.min(size) - at).min(CHUNK) as usize;
            from.read_exact_at(&mut buffer[..len], at)?;
            to.write_all_at(&buffer[..len], at)?;
            at += len as u64;
        }
    }
    Ok(size)
}

/// Copies cache file `from` to `to`: only its `spans` for a partial file (the rest holes),
/// else all of it. Returns the copy's length; a failed copy leaves nothing behind.
pub fn copy_cache_file(from: &Path, to: &Path, spans: Option<&RangeSet>) -> std::io::Result<u64> {
    let copied = match spans {
        Some(spans) => {
            std::fs::metadata(from).and_then(|meta| copy_spans(from, to, meta.len(), spans))
        }
        None => std::fs::copy(from, to),
    };
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_report_gaps() {
        let mut set = RangeSet::default();
        set.insert(10..20);
        set.insert(30..40);
        assert_eq!(set.missing(0..50), vec![0..10, 20..30, 40..50]);
        set.insert(20..30);
        assert_eq!(set.spans().collect::<Vec<_>>(), vec![10..40]);
        set.insert(0..5);
        set.insert(5..10);
        assert_eq!(set.spans().collect::<Vec<_>>(), vec![0..40]);
        assert!(set.contains(3..39));
        assert!(!set.contains(3..41));
        set.truncate(25);
        assert_eq!(set.spans().collect::<Vec<_>>(), vec![0..25]);
        assert_eq!(set.len(), 25);
    }

    #[test]
    fn fetched_bytes_land_where_they_belong_whatever_their_length() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let bytes: Vec<u8> = (0..WRITE_PIECE * 5 / 2 + 7)
            .map(|i| (i % 251) as u8)
            .collect();
        write_fetched(&file, &bytes, 3).unwrap();
        write_fetched(&file, &[], 1).unwrap();
        let written = fs::read(dir.path().join("f")).unwrap();
        assert_eq!(written.len(), bytes.len() + 3);
        assert_eq!(&written[..3], &[0, 0, 0]);
        assert!(
            written[3..] == bytes[..],
            "the pieces are in order, none lost"
        );
    }

    #[test]
    fn the_index_survives_reopening_and_follows_renames() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (file, _) = cache.new_file().unwrap();
        let mut present = RangeSet::default();
        present.insert(0..100);
        present.insert(200..300);
        cache
            .index_version("a/b", &file, &ETag("\"e\"".into()), &present)
            .unwrap();
        cache.rename("a/", "z/", true).unwrap();
        drop(cache);
        let cache = Cache::open(dir.path()).unwrap();
        assert!(cache.lookup("a/b").unwrap().is_none());
        let found = cache.lookup("z/b").unwrap().unwrap();
        assert_eq!(found.present, present);
        assert_eq!(found.etag.0, "\"e\"");
        cache.remove("z/b").unwrap();
        assert!(cache.lookup("z/b").unwrap().is_none());
        assert!(!cache.path_of(&file).exists());
    }

    /// New cache files are distinct, empty and writable, whether made ahead of need or on the
    /// spot; the spares no file took go with the cache.
    #[test]
    fn new_cache_files_are_distinct_and_spares_do_not_outlive_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let mut names = std::collections::HashSet::new();
        for _ in 0..(SPARES_HIGH + 10) {
            let (name, file) = cache.new_file().unwrap();
            assert_eq!(file.metadata().unwrap().len(), 0);
            std::os::unix::fs::FileExt::write_all_at(&file, b"x", 0).unwrap();
            assert!(names.insert(name), "a cache file was handed out twice");
        }
        while cache.spares.refilling.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let on_disk = cache.all_files().unwrap().len();
        assert!(on_disk > names.len(), "spares were made ahead of need");
        drop(cache);
        let left = std::fs::read_dir(dir.path().join("data")).unwrap().count();
        assert_eq!(left, names.len(), "only the files handed out remain");
    }
}
