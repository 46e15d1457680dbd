//! `dir:///path`: a directory used as an object store (local disk, or an NFS/EFS mount shared by
//! several hosts). This is cairn's embedded default store.
//!
//! Layout under the root:
//! - An object is a plain file. Its key is split on `/`; every segment but the last is a
//!   directory, the last is the file. Segments are percent-encoded where a file name could not
//!   hold them (`%`, control characters, a leading `.`), and an empty segment (the `dir/` marker
//!   of an empty directory) is stored as a file named `%`. So no object's name starts with `.`.
//! - Its metadata is a sidecar `.m/NAME` beside it (JSON), holding one entry per data file
//!   version it describes, keyed by inode: the entry whose inode matches the data file wins, so a
//!   crash between writing the sidecar and renaming the data never pairs data with the wrong
//!   metadata. A file with no matching entry (put there by hand) gets an ETag made of its inode,
//!   size and mtime, and no metadata.
//! - `.lock` serializes writers across processes (flock, which NFSv4 carries between hosts);
//!   `.tmp/` holds files being written; `.uploads/` holds multipart uploads in progress.
//!
//! Puts write a temporary file, fsync it, and rename it into place under the lock, so an object is
//! always a whole version and conditional puts hold across processes. A key whose directory part
//! names an existing object (or the reverse: `a` and `a/b`) cannot be stored: a file and a
//! directory cannot share a name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use md5::{Digest, Md5};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use super::listing::{Listed, after_token, paginate};
use super::{
    CompletedPart, ETag, ErrorKind, GetOptions, GetResult, ListEntry, ListOptions, ListPage,
    MAX_LIST_PAGE, Metadata, ObjectInfo, PartSource, PutCondition, PutOptions, PutResult, Result,
    Store, StoreError, UploadId, check_key, check_metadata, check_parts, clamp_range,
    condition_holds, multipart_etag,
};

/// Characters a segment keeps escaped on disk.
const ESCAPED: &AsciiSet = &CONTROLS.add(b'%');
/// The file name of an empty key segment (a `dir/` marker).
const EMPTY_SEGMENT: &str = "%";
/// Longest file name most filesystems take.
const MAX_SEGMENT_LEN: usize = 255;
/// The folder of sidecars, beside the data files it describes.
const SIDECARS: &str = ".m";

/// A directory used as an object store.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: Arc<PathBuf>,
}

impl DirStore {
    /// Opens the store at `root`, which must be an existing directory (the analogue of a bucket).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.is_dir() {
            return Err(StoreError::new(
                ErrorKind::NoSuchBucket,
                format!("{}: no such directory", root.display()),
            ));
        }
        Ok(Self {
            root: Arc::new(root),
        })
    }

    /// Creates `root` (mode 0700) if it is missing, then opens it. For the embedded default store.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| io_error(e, &root.display().to_string()))?;
        Self::open(root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> Result<T> + Send + 'static,
    {
        let root = Arc::clone(&self.root);
        tokio::task::spawn_blocking(move || work(&root))
            .await
            .map_err(|e| StoreError::other(format!("dir store task failed: {e}")))?
    }
}

/// Where one object lives on disk.
struct ObjectPath {
    dir: PathBuf,
    name: String,
}

impl ObjectPath {
    fn resolve(root: &Path, key: &str) -> Result<Self> {
        check_key(key)?;
        let mut segments: Vec<String> = key.split('/').map(encode_segment).collect();
        if let Some(long) = segments.iter().find(|s| s.len() > MAX_SEGMENT_LEN) {
            return Err(StoreError::invalid(format!(
                "{key}: the name {long:?} is longer than a dir store's limit of {MAX_SEGMENT_LEN} bytes"
            )));
        }
        let name = segments.pop().unwrap_or_default();
        let dir = segments.iter().fold(root.to_path_buf(), |d, s| d.join(s));
        Ok(Self { dir, name })
    }

    fn data(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    fn sidecar(&self) -> PathBuf {
        self.dir.join(SIDECARS).join(&self.name)
    }
}

fn encode_segment(segment: &str) -> String {
    if segment.is_empty() {
        return EMPTY_SEGMENT.to_string();
    }
    let encoded = utf8_percent_encode(segment, ESCAPED).to_string();
    match encoded.strip_prefix('.') {
        Some(rest) => format!("%2E{rest}"),
        None => encoded,
    }
}

/// The key segment a file name stands for; `None` for cairn's own files and undecodable names.
fn decode_segment(name: &str) -> Option<String> {
    if name == EMPTY_SEGMENT {
        return Some(String::new());
    }
    if name.starts_with('.') {
        return None;
    }
    percent_decode_str(name)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The sidecar: what cairn knows of the data file versions it wrote under one name.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Sidecar {
    versions: Vec<Version>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Version {
    ino: u64,
    size: u64,
    etag: String,
    metadata: Metadata,
}

impl Sidecar {
    fn read(path: &Path) -> Sidecar {
        // A missing or unreadable sidecar means "nothing known": the data file still reads.
        fs::read(path)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default()
    }

    fn version_for(&self, stat: &fs::Metadata) -> Option<&Version> {
        self.versions
            .iter()
            .find(|v| v.ino == stat.ino() && v.size == stat.len())
    }
}

/// Describes the data file with `stat`, using the sidecar entry that matches it.
fn describe(key: &str, stat: &fs::Metadata, sidecar: &Sidecar) -> ObjectInfo {
    let last_modified = stat.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let (etag, metadata) = match sidecar.version_for(stat) {
        Some(v) => (ETag(v.etag.clone()), v.metadata.clone()),
        None => (foreign_etag(stat), Metadata::new()),
    };
    ObjectInfo {
        key: key.to_string(),
        size: stat.len(),
        etag,
        last_modified,
        metadata,
    }
}

/// An ETag for a file cairn did not write: it changes whenever the file is replaced or written.
fn foreign_etag(stat: &fs::Metadata) -> ETag {
    ETag(format!(
        "\"{:x}-{:x}-{:x}.{:x}\"",
        stat.ino(),
        stat.len(),
        stat.mtime(),
        stat.mtime_nsec()
    ))
}

fn io_error(err: io::Error, what: &str) -> StoreError {
    let kind = match err.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::AccessDenied,
        io::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Other,
    };
    StoreError::new(kind, format!("{what}: {err}"))
}

fn conflict(key: &str) -> StoreError {
    StoreError::invalid(format!(
        "{key}: conflicts with another object in this dir store (an object and a directory of \
         objects cannot share a name)"
    ))
}

/// A lock on the whole store, shared for readers and exclusive for writers; released on drop.
struct StoreLock {
    _held: File,
}

impl StoreLock {
    fn take(root: &Path, exclusive: bool) -> Result<Self> {
        let path = root.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(e, &path.display().to_string()))?;
        let locked = if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        };
        locked.map_err(|e| io_error(e, "locking the dir store"))?;
        Ok(Self { _held: file })
    }
}

fn make_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// A file in `.tmp/` that is removed on drop unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    fn new(root: &Path) -> Result<Self> {
        let dir = root.join(".tmp");
        make_dir(&dir).map_err(|e| io_error(e, &dir.display().to_string()))?;
        let path = dir.join(uuid::Uuid::new_v4().simple().to_string());
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(e, &path.display().to_string()))?;
        Ok(Self { path, file })
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| io_error(e, "writing a temporary file"))
    }

    fn sync(&self) -> Result<u64> {
        self.file
            .sync_all()
            .map_err(|e| io_error(e, "syncing a temporary file"))?;
        let stat = self
            .file
            .metadata()
            .map_err(|e| io_error(e, "stat of a temporary file"))?;
        Ok(stat.ino())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The current ETag at `path`, if an object is there.
fn current_etag(path: &ObjectPath) -> Result<Option<ETag>> {
    match fs::metadata(path.data()) {
        Ok(stat) if stat.is_file() => {
            let sidecar = Sidecar::read(&path.sidecar());
            Ok(Some(describe("", &stat, &sidecar).etag))
        }
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => Ok(None),
        Err(e) => Err(io_error(e, &path.data().display().to_string())),
    }
}

/// Moves a fully written, synced temporary file into place as `key`, if `condition` holds.
fn install(
    root: &Path,
    key: &str,
    data: TempFile,
    etag: ETag,
    metadata: Metadata,
    condition: &PutCondition,
) -> Result<PutResult> {
    let target = ObjectPath::resolve(root, key)?;
    let ino = data.sync()?;
    let size = data
        .file
        .metadata()
        .map_err(|e| io_error(e, "stat of a temporary file"))?
        .len();
    let _lock = StoreLock::take(root, true)?;
    condition_holds(key, condition, current_etag(&target)?.as_ref())?;
    make_dir(&target.dir).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => conflict(key),
        _ => io_error(e, &target.dir.display().to_string()),
    })?;
    if target.data().is_dir() {
        return Err(conflict(key));
    }

    let mut sidecar = Sidecar::read(&target.sidecar());
    let previous = fs::metadata(target.data())
        .ok()
        .and_then(|stat| sidecar.version_for(&stat).cloned());
    sidecar.versions = previous.into_iter().collect();
    sidecar.versions.push(Version {
        ino,
        size,
        etag: etag.0.clone(),
        metadata,
    });
    let mut meta = TempFile::new(root)?;
    let json = serde_json::to_vec(&sidecar).map_err(|e| StoreError::other(e.to_string()))?;
    meta.write_all(&json)?;
    meta.sync()?;
    let sidecars = target.dir.join(SIDECARS);
    make_dir(&sidecars).map_err(|e| io_error(e, &sidecars.display().to_string()))?;
    fs::rename(&meta.path, target.sidecar())
        .map_err(|e| io_error(e, &target.sidecar().display().to_string()))?;
    fs::rename(&data.path, target.data()).map_err(|e| match e.kind() {
        io::ErrorKind::IsADirectory | io::ErrorKind::DirectoryNotEmpty => conflict(key),
        _ => io_error(e, &target.data().display().to_string()),
    })?;
    sync_dir(&target.dir).map_err(|e| io_error(e, &target.dir.display().to_string()))?;
    Ok(PutResult { etag })
}

/// Opens an object's data file and describes it, consistently, under a shared lock.
fn open_object(root: &Path, key: &str) -> Result<(File, ObjectInfo)> {
    let path = ObjectPath::resolve(root, key)?;
    let _lock = StoreLock::take(root, false)?;
    let file = match File::open(path.data()) {
        Ok(file) => file,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory =>
        {
            return Err(StoreError::not_found(key));
        }
        Err(e) => return Err(io_error(e, key)),
    };
    let stat = file.metadata().map_err(|e| io_error(e, key))?;
    if !stat.is_file() {
        return Err(StoreError::not_found(key));
    }
    let info = describe(key, &stat, &Sidecar::read(&path.sidecar()));
    Ok((file, info))
}

fn read_range(file: &File, range: &Range<u64>, key: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0; (range.end - range.start) as usize];
    file.read_exact_at(&mut buf, range.start)
        .map_err(|e| io_error(e, key))?;
    Ok(buf)
}

/// Removes `dir` and its empty parents, up to (not including) `root`.
fn remove_empty_dirs(root: &Path, mut dir: &Path) {
    while dir != root && dir.starts_with(root) {
        if fs::remove_dir(dir).is_err() {
            return;
        }
        match dir.parent() {
            Some(parent) => dir = parent,
            None => return,
        }
    }
}

/// The sidecar of the data file at `data`.
fn sidecar_of(data: &Path) -> PathBuf {
    let name = data.file_name().unwrap_or_default();
    data.with_file_name(SIDECARS).join(name)
}

/// A multipart upload's folder: `.uploads/ID/` with `key`, `metadata.json` and `NNNNN` parts.
fn upload_dir(root: &Path, key: &str, upload: &UploadId) -> Result<PathBuf> {
    let valid_id = !upload.0.is_empty() && upload.0.bytes().all(|b| b.is_ascii_hexdigit());
    let dir = root.join(".uploads").join(&upload.0);
    let owner = if valid_id {
        fs::read_to_string(dir.join("key")).ok()
    } else {
        None
    };
    match owner {
        Some(owner) if owner == key => Ok(dir),
        _ => Err(StoreError::new(
            ErrorKind::NotFound,
            format!("{key}: no multipart upload {}", upload.0),
        )),
    }
}

fn part_path(dir: &Path, part_number: u32) -> Result<PathBuf> {
    if !(1..=10_000).contains(&part_number) {
        return Err(StoreError::invalid(format!(
            "part number {part_number} is not between 1 and 10000"
        )));
    }
    Ok(dir.join(format!("{part_number:05}")))
}

/// Stores one part's bytes (from `fill`) in the upload's folder, atomically.
fn store_part(
    root: &Path,
    key: &str,
    upload: &UploadId,
    part_number: u32,
    fill: impl FnOnce(&mut TempFile) -> Result<()>,
) -> Result<CompletedPart> {
    let dir = upload_dir(root, key, upload)?;
    let path = part_path(&dir, part_number)?;
    let mut part = TempFile::new(root)?;
    fill(&mut part)?;
    part.sync()?;
    fs::rename(&part.path, &path).map_err(|e| io_error(e, &path.display().to_string()))?;
    let mut body = File::open(&path).map_err(|e| io_error(e, "reading a part"))?;
    Ok(CompletedPart {
        part_number,
        etag: digest_file(&mut body)?,
    })
}

fn digest_file(file: &mut File) -> Result<ETag> {
    let mut hasher = Md5::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| io_error(e, "reading a part"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(ETag(format!("\"{}\"", hex::encode(hasher.finalize()))))
}

/// One directory's children, as listing items in key order (without descending).
enum Child {
    Object(String, PathBuf),
    Dir(String, PathBuf),
}

impl Child {
    fn name(&self) -> &str {
        match self {
            Self::Object(key, _) | Self::Dir(key, _) => key,
        }
    }
}

fn children(dir: &Path, dir_key: &str) -> Result<Vec<Child>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(Vec::new()),
        Err(e) => return Err(io_error(e, &dir.display().to_string())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(e, &dir.display().to_string()))?;
        let Some(segment) = entry.file_name().to_str().and_then(decode_segment) else {
            continue;
        };
        let file_type = entry
            .file_type()
            .map_err(|e| io_error(e, &dir.display().to_string()))?;
        let key = format!("{dir_key}{segment}");
        if file_type.is_dir() {
            found.push(Child::Dir(format!("{key}/"), entry.path()));
        } else if file_type.is_file() {
            found.push(Child::Object(key, entry.path()));
        }
    }
    found.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(found)
}

fn has_objects(dir: &Path) -> Result<bool> {
    for child in children(dir, "")? {
        match child {
            Child::Object(..) => return Ok(true),
            Child::Dir(_, path) => {
                if has_objects(&path)? {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Walks the tree in key order, collecting up to `want` items after the token.
struct Walk<'a> {
    prefix: &'a str,
    delimited: bool,
    token: Option<&'a str>,
    want: usize,
    found: Vec<Listed>,
}

impl Walk<'_> {
    fn full(&self) -> bool {
        self.found.len() >= self.want
    }

    fn visit(&mut self, dir: &Path, dir_key: &str) -> Result<()> {
        for child in children(dir, dir_key)? {
            if self.full() {
                return Ok(());
            }
            match child {
                Child::Object(key, path) => {
                    if key.starts_with(self.prefix) && after_token(&key, self.token) {
                        let stat = fs::metadata(&path).map_err(|e| io_error(e, &key))?;
                        let info = describe(&key, &stat, &Sidecar::read(&sidecar_of(&path)));
                        self.found.push(Listed::Object(ListEntry {
                            key,
                            size: info.size,
                            etag: info.etag,
                            last_modified: info.last_modified,
                        }));
                    }
                }
                Child::Dir(sub, path) => self.visit_dir(&sub, &path)?,
            }
        }
        Ok(())
    }

    fn visit_dir(&mut self, sub: &str, path: &Path) -> Result<()> {
        let overlaps = sub.starts_with(self.prefix) || self.prefix.starts_with(sub);
        if !overlaps {
            return Ok(());
        }
        let rolled_up = self.delimited && sub.len() > self.prefix.len();
        if rolled_up {
            if after_token(sub, self.token) && has_objects(path)? {
                self.found.push(Listed::Prefix(sub.to_string()));
            }
            return Ok(());
        }
        // Every key below starts with `sub`: skip the subtree when all of them are at or
        // before the token.
        let all_before = self
            .token
            .is_some_and(|token| token > sub && !token.starts_with(sub));
        if all_before {
            return Ok(());
        }
        self.visit(path, sub)
    }
}

#[async_trait]
impl Store for DirStore {
    async fn head(&self, key: &str) -> Result<ObjectInfo> {
        let key = key.to_string();
        self.blocking(move |root| Ok(open_object(root, &key)?.1))
            .await
    }

    async fn get(&self, key: &str, options: GetOptions) -> Result<GetResult> {
        let key = key.to_string();
        self.blocking(move |root| {
            let (file, info) = open_object(root, &key)?;
            if let Some(want) = options.if_match {
                condition_holds(&key, &PutCondition::IfMatch(want), Some(&info.etag))?;
            }
            let range = clamp_range(options.range, info.size);
            let body = Bytes::from(read_range(&file, &range, &key)?);
            Ok(GetResult { info, range, body })
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes, options: PutOptions) -> Result<PutResult> {
        check_key(key)?;
        check_metadata(&options.metadata)?;
        let key = key.to_string();
        self.blocking(move |root| {
            ObjectPath::resolve(root, &key)?;
            let mut data = TempFile::new(root)?;
            data.write_all(&body)?;
            let etag = super::content_etag(&body);
            install(root, &key, data, etag, options.metadata, &options.condition)
        })
        .await
    }

    async fn start_multipart(&self, key: &str, metadata: Metadata) -> Result<UploadId> {
        check_metadata(&metadata)?;
        let key = key.to_string();
        self.blocking(move |root| {
            ObjectPath::resolve(root, &key)?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            let dir = root.join(".uploads").join(&id);
            make_dir(&dir).map_err(|e| io_error(e, &dir.display().to_string()))?;
            let json =
                serde_json::to_vec(&metadata).map_err(|e| StoreError::other(e.to_string()))?;
            fs::write(dir.join("metadata.json"), json)
                .map_err(|e| io_error(e, "writing an upload"))?;
            // Written last: an upload folder without its key is not an upload yet.
            fs::write(dir.join("key"), &key).map_err(|e| io_error(e, "writing an upload"))?;
            Ok(UploadId(id))
        })
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        let (key, upload) = (key.to_string(), upload.clone());
        self.blocking(move |root| {
            store_part(root, &key, &upload, part_number, |part| {
                part.write_all(&body)
            })
        })
        .await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        source: &PartSource,
    ) -> Result<CompletedPart> {
        let (key, upload, source) = (key.to_string(), upload.clone(), source.clone());
        self.blocking(move |root| {
            let (source_key, source_range) = (source.key, source.range);
            let (file, info) = open_object(root, &source_key)?;
            if source
                .if_match
                .as_ref()
                .is_some_and(|etag| *etag != info.etag)
            {
                return Err(StoreError::new(
                    ErrorKind::PreconditionFailed,
                    format!("{source_key} is no longer version {:?}", source.if_match),
                ));
            }
            if source_range.start >= source_range.end || source_range.end > info.size {
                return Err(StoreError::invalid(format!(
                    "range {source_range:?} is not inside {source_key} ({} bytes)",
                    info.size
                )));
            }
            store_part(root, &key, &upload, part_number, |part| {
                let mut source = file;
                source
                    .seek(SeekFrom::Start(source_range.start))
                    .map_err(|e| io_error(e, &source_key))?;
                let mut limited = source.take(source_range.end - source_range.start);
                io::copy(&mut limited, &mut part.file).map_err(|e| io_error(e, &source_key))?;
                Ok(())
            })
        })
        .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload: &UploadId,
        parts: Vec<CompletedPart>,
        condition: PutCondition,
    ) -> Result<PutResult> {
        let (key, upload) = (key.to_string(), upload.clone());
        self.blocking(move |root| {
            let dir = upload_dir(root, &key, &upload)?;
            let metadata: Metadata = fs::read(dir.join("metadata.json"))
                .ok()
                .and_then(|raw| serde_json::from_slice(&raw).ok())
                .unwrap_or_default();
            let mut files = Vec::with_capacity(parts.len());
            let mut sizes = Vec::with_capacity(parts.len());
            for part in &parts {
                let path = part_path(&dir, part.part_number)?;
                let missing = || {
                    StoreError::invalid(format!(
                        "part {} of {key} was not uploaded with ETag {}",
                        part.part_number, part.etag
                    ))
                };
                let mut file = File::open(&path).map_err(|_| missing())?;
                if digest_file(&mut file)? != part.etag {
                    return Err(missing());
                }
                sizes.push(file.metadata().map_err(|e| io_error(e, &key))?.len());
                files.push(file);
            }
            check_parts(&parts, &sizes)?;
            let mut joined = TempFile::new(root)?;
            for mut file in files {
                file.seek(SeekFrom::Start(0))
                    .map_err(|e| io_error(e, &key))?;
                io::copy(&mut file, &mut joined.file).map_err(|e| io_error(e, &key))?;
            }
            let etag = multipart_etag(parts.iter().map(|p| &p.etag));
            let result = install(root, &key, joined, etag, metadata, &condition)?;
            let _ = fs::remove_dir_all(&dir);
            Ok(result)
        })
        .await
    }

    async fn abort_multipart(&self, key: &str, upload: &UploadId) -> Result<()> {
        let (key, upload) = (key.to_string(), upload.clone());
        self.blocking(move |root| {
            let dir = upload_dir(root, &key, &upload)?;
            fs::remove_dir_all(&dir).map_err(|e| io_error(e, &dir.display().to_string()))
        })
        .await
    }

    async fn list(&self, prefix: &str, options: ListOptions) -> Result<ListPage> {
        let prefix = prefix.to_string();
        self.blocking(move |root| {
            // Start in the deepest directory the prefix names whole.
            let dir_key = match prefix.rfind('/') {
                Some(at) => &prefix[..=at],
                None => "",
            };
            let start = if dir_key.is_empty() {
                root.to_path_buf()
            } else {
                dir_key[..dir_key.len() - 1]
                    .split('/')
                    .fold(root.to_path_buf(), |d, s| d.join(encode_segment(s)))
            };
            let want = options
                .max_keys
                .unwrap_or(MAX_LIST_PAGE)
                .clamp(1, MAX_LIST_PAGE)
                + 1;
            let mut walk = Walk {
                prefix: &prefix,
                delimited: options.delimited,
                token: options.continuation.as_deref(),
                want,
                found: Vec::new(),
            };
            walk.visit(&start, dir_key)?;
            Ok(paginate(walk.found, &options))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.blocking(move |root| delete_object(root, &key)).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        let keys = keys.to_vec();
        self.blocking(move |root| {
            let failed: Vec<String> = keys
                .iter()
                .filter_map(|key| {
                    delete_object(root, key)
                        .err()
                        .map(|e| format!("{key} ({e})"))
                })
                .collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(StoreError::other(format!(
                    "could not delete {}",
                    failed.join(", ")
                )))
            }
        })
        .await
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<Metadata>,
    ) -> Result<PutResult> {
        if let Some(metadata) = &metadata {
            check_metadata(metadata)?;
        }
        let (source_key, dest_key) = (source_key.to_string(), dest_key.to_string());
        self.blocking(move |root| {
            ObjectPath::resolve(root, &dest_key)?;
            let (mut file, info) = open_object(root, &source_key)?;
            let mut copy = TempFile::new(root)?;
            io::copy(&mut file, &mut copy.file).map_err(|e| io_error(e, &source_key))?;
            let metadata = metadata.unwrap_or(info.metadata);
            install(
                root,
                &dest_key,
                copy,
                info.etag,
                metadata,
                &PutCondition::Always,
            )
        })
        .await
    }
}

fn delete_object(root: &Path, key: &str) -> Result<()> {
    let path = ObjectPath::resolve(root, key)?;
    let _lock = StoreLock::take(root, true)?;
    for file in [path.data(), path.sidecar()] {
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {}
            // A directory at the key's place holds other objects, not this one.
            Err(_) if file.is_dir() => {}
            Err(e) => return Err(io_error(e, key)),
        }
    }
    let _ = fs::remove_dir(path.dir.join(SIDECARS));
    remove_empty_dirs(root, &path.dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_and_never_start_with_a_dot() {
        for segment in [
            "",
            ".",
            "..",
            ".hidden",
            "a%b",
            "tab\there",
            "ünï cødé",
            "+plus",
        ] {
            let encoded = encode_segment(segment);
            assert!(!encoded.starts_with('.'), "{segment:?} -> {encoded:?}");
            assert!(!encoded.contains('/'));
            assert_eq!(decode_segment(&encoded).as_deref(), Some(segment));
        }
        assert_eq!(decode_segment(".m"), None);
    }

    #[test]
    fn sidecar_entries_match_by_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"abc").unwrap();
        let stat = fs::metadata(&path).unwrap();
        let known = Sidecar {
            versions: vec![Version {
                ino: stat.ino(),
                size: 3,
                etag: "\"e\"".into(),
                metadata: Metadata::new(),
            }],
        };
        assert_eq!(describe("f", &stat, &known).etag.0, "\"e\"");
        let stale = Sidecar {
            versions: vec![Version {
                ino: stat.ino() + 1,
                ..known.versions[0].clone()
            }],
        };
        assert_ne!(describe("f", &stat, &stale).etag.0, "\"e\"");
    }
}
