//! The store layer: one narrow async trait over the places a volume's objects live (an S3 bucket,
//! a shared directory, memory), the types that cross it, and conveniences built on top of it.
//!
//! Every backend implements [`Store`]; [`StoreExt`] adds what can be written once over the trait
//! (whole-object reads, listing every page). `conformance` is the suite every backend passes, and
//! `faults` a wrapper that injects failures: test support, built with the `testing` feature only.
//! Keys are relative to the store's root (bucket + prefix, or directory) and are plain UTF-8
//! strings of at most [`MAX_KEY_LEN`] bytes; `/` has no meaning to the trait beyond listing with a
//! delimiter.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod dir;
#[cfg(any(test, feature = "testing"))]
pub mod faults;
pub mod memory;
pub mod metered;
pub mod s3;
pub mod spec;

mod error;
mod listing;

pub use error::{ErrorKind, StoreError};
pub use spec::{StoreSpec, open_store};

/// The longest key S3 accepts, in bytes of UTF-8; every backend holds to it.
pub const MAX_KEY_LEN: usize = 1024;

/// The smallest part of a multipart upload other than the last one (S3's rule).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// Most keys (and common prefixes) one list call returns.
pub const MAX_LIST_PAGE: usize = 1000;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// User metadata of an object: lower-case names (without `x-amz-meta-`) to printable ASCII values.
pub type Metadata = BTreeMap<String, String>;

/// An object's entity tag, exactly as the store gave it (S3 keeps the quotes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ETag(pub String);

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `head` (and every `get`) says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: ETag,
    pub last_modified: SystemTime,
    pub metadata: Metadata,
}

/// One object in a listing; listings carry no user metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub key: String,
    pub size: u64,
    pub etag: ETag,
    pub last_modified: SystemTime,
}

/// How to list: with `delimited`, keys that hold a `/` after the prefix are rolled up into
/// common prefixes (one level of a directory tree).
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub delimited: bool,
    /// The `next` of the previous page.
    pub continuation: Option<String>,
    /// At most this many entries (objects plus prefixes); `None` means [`MAX_LIST_PAGE`].
    pub max_keys: Option<usize>,
}

/// One page of a listing, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ListEntry>,
    /// Common prefixes, each ending in `/` (only when listing with a delimiter).
    pub prefixes: Vec<String>,
    /// Pass this as `continuation` for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// When a put (or the completion of a multipart upload) may replace what is there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PutCondition {
    #[default]
    Always,
    /// Only if no object has the key (`If-None-Match: *`).
    IfAbsent,
    /// Only if the object there still has this ETag (`If-Match`).
    IfMatch(ETag),
}

#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub metadata: Metadata,
    pub condition: PutCondition,
}

impl PutOptions {
    pub fn with_metadata(metadata: Metadata) -> Self {
        Self {
            metadata,
            condition: PutCondition::Always,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutResult {
    pub etag: ETag,
}

/// How to read: a byte range (clamped to the object: a range that starts at or past the end
/// reads zero bytes rather than failing) and an optional ETag the object must still have.
#[derive(Debug, Clone, Default)]
pub struct GetOptions {
    pub range: Option<Range<u64>>,
    pub if_match: Option<ETag>,
}

#[derive(Debug, Clone)]
pub struct GetResult {
    /// The whole object's description (`size` is the object's size, not the range's).
    pub info: ObjectInfo,
    /// The bytes actually returned, as a range of the object.
    pub range: Range<u64>,
    pub body: Bytes,
}

/// A read whose bytes arrive as a stream of pieces, in order (see [`Store::get_stream`]).
pub struct GetStream {
    /// The whole object's description (`size` is the object's size, not the range's).
    pub info: ObjectInfo,
    /// The bytes the stream brings, as a range of the object.
    pub range: Range<u64>,
    /// The bytes, in order; an error ends it early.
    pub body: futures::stream::BoxStream<'static, Result<Bytes>>,
}

/// The store's name for a multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UploadId(pub String);

/// Where a copied part's bytes come from: a range of an object, of one version if `if_match`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSource {
    pub key: String,
    pub range: Range<u64>,
    pub if_match: Option<ETag>,
}

/// What the store answered for one uploaded part; completion needs all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedPart {
    /// 1 to 10,000, as in S3.
    pub part_number: u32,
    pub etag: ETag,
}

/// The operations of [`Store`]: to count them, or to aim a fault at one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Head,
    Get,
    Put,
    StartMultipart,
    UploadPart,
    UploadPartCopy,
    CompleteMultipart,
    AbortMultipart,
    List,
    Delete,
    DeleteMany,
    Copy,
}

impl Op {
    /// The operation's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Op::Head => "head",
            Op::Get => "get",
            Op::Put => "put",
            Op::StartMultipart => "start_multipart",
            Op::UploadPart => "upload_part",
            Op::UploadPartCopy => "upload_part_copy",
            Op::CompleteMultipart => "complete_multipart",
            Op::AbortMultipart => "abort_multipart",
            Op::List => "list",
            Op::Delete => "delete",
            Op::DeleteMany => "delete_many",
            Op::Copy => "copy",
        }
    }
}

/// The operations the filesystem needs from a place that holds objects.
///
/// Implementations keep the store's own message in every error and sort every error into an
/// [`ErrorKind`]. They must be safe to share between tasks and processes: conditional puts hold
/// against writers in other processes (and, for shared stores, other hosts).
#[async_trait]
pub trait Store: fmt::Debug + Send + Sync + 'static {
    /// Size, ETag, last-modified time and user metadata of one object.
    async fn head(&self, key: &str) -> Result<ObjectInfo>;

    /// Reads an object, or a byte range of it.
    async fn get(&self, key: &str, options: GetOptions) -> Result<GetResult>;

    /// [`Self::get`] with the bytes handed over as they arrive, so that a large range need not
    /// be held in memory whole. A body cut short ends the stream with an error (no retry).
    /// By default, one piece: the whole answer of `get`.
    async fn get_stream(&self, key: &str, options: GetOptions) -> Result<GetStream> {
        let got = self.get(key, options).await?;
        let body = futures::stream::once(async move { Ok(got.body) }).boxed();
        Ok(GetStream {
            info: got.info,
            range: got.range,
            body,
        })
    }

    /// Writes a whole object with its metadata, if the condition holds.
    async fn put(&self, key: &str, body: Bytes, options: PutOptions) -> Result<PutResult>;

    /// Starts a multipart upload; the metadata becomes the object's when it completes.
    async fn start_multipart(&self, key: &str, metadata: Metadata) -> Result<UploadId>;

    async fn upload_part(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart>;

    /// Uploads a part whose bytes are a range of an object, copied inside the store; fails with
    /// `PreconditionFailed` if the source no longer has the ETag `source.if_match` names.
    async fn upload_part_copy(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        source: &PartSource,
    ) -> Result<CompletedPart>;

    /// Joins the parts, in part-number order, into the object, if the condition holds.
    async fn complete_multipart(
        &self,
        key: &str,
        upload: &UploadId,
        parts: Vec<CompletedPart>,
        condition: PutCondition,
    ) -> Result<PutResult>;

    async fn abort_multipart(&self, key: &str, upload: &UploadId) -> Result<()>;

    /// One page of the keys that start with `prefix`, in key order.
    async fn list(&self, prefix: &str, options: ListOptions) -> Result<ListPage>;

    /// Deletes one object; deleting a key that does not exist succeeds.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Deletes many objects; missing keys are not an error. Fails if any key could not be deleted.
    async fn delete_many(&self, keys: &[String]) -> Result<()>;

    /// Copies an object inside the store, keeping its metadata or replacing it.
    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<Metadata>,
    ) -> Result<PutResult>;
}

/// Conveniences written once over [`Store`].
#[async_trait]
pub trait StoreExt: Store {
    /// The whole object's bytes and description.
    async fn get_all(&self, key: &str) -> Result<(ObjectInfo, Bytes)> {
        let got = self.get(key, GetOptions::default()).await?;
        Ok((got.info, got.body))
    }

    /// A byte range of an object (clamped to its end).
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let options = GetOptions {
            range: Some(range),
            if_match: None,
        };
        Ok(self.get(key, options).await?.body)
    }

    /// `head`, with a missing object as `None` instead of an error.
    async fn head_opt(&self, key: &str) -> Result<Option<ObjectInfo>> {
        match self.head(key).await {
            Ok(info) => Ok(Some(info)),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Every page of a listing, joined.
    async fn list_all(&self, prefix: &str, delimited: bool) -> Result<ListPage> {
        let mut all = ListPage::default();
        let mut continuation = None;
        loop {
            let options = ListOptions {
                delimited,
                continuation,
                max_keys: None,
            };
            let page = self.list(prefix, options).await?;
            all.objects.extend(page.objects);
            all.prefixes.extend(page.prefixes);
            match page.next {
                Some(next) => continuation = Some(next),
                None => return Ok(all),
            }
        }
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// A store shared between tasks.
pub type SharedStore = Arc<dyn Store>;

/// Refuses keys that no backend may hold: empty, or longer than [`MAX_KEY_LEN`].
pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::invalid("an object key must not be empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StoreError::invalid(format!(
            "key of {} bytes is longer than the store limit of {MAX_KEY_LEN} bytes",
            key.len()
        )));
    }
    Ok(())
}

/// Refuses metadata that S3 would not carry in its headers (names must be lower-case tokens,
/// values printable ASCII), so that every backend accepts exactly the same metadata.
pub fn check_metadata(metadata: &Metadata) -> Result<()> {
    for (name, value) in metadata {
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(StoreError::invalid(format!(
                "metadata name {name:?} must be lower-case ASCII letters, digits, '-' or '_'"
            )));
        }
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(StoreError::invalid(format!(
                "metadata value for {name:?} must be printable ASCII"
            )));
        }
    }
    Ok(())
}

/// The part of `range` that lies inside an object of `size` bytes (empty if it starts past the end).
pub fn clamp_range(range: Option<Range<u64>>, size: u64) -> Range<u64> {
    match range {
        None => 0..size,
        Some(r) => {
            let end = r.end.min(size);
            let start = r.start.min(end);
            start..end
        }
    }
}

/// Whether `condition` lets a write replace an object whose current ETag is `current`.
pub fn condition_holds(key: &str, condition: &PutCondition, current: Option<&ETag>) -> Result<()> {
    let holds = match (condition, current) {
        (PutCondition::Always, _) => true,
        (PutCondition::IfAbsent, current) => current.is_none(),
        (PutCondition::IfMatch(want), Some(have)) => want == have,
        (PutCondition::IfMatch(_), None) => {
            return Err(StoreError::not_found(key));
        }
    };
    if holds {
        Ok(())
    } else {
        Err(StoreError::new(
            ErrorKind::PreconditionFailed,
            format!("{key}: the object changed or exists; the conditional write was not applied"),
        ))
    }
}

/// The ETag S3 gives a single-part object: the quoted hex MD5 of its bytes.
pub fn content_etag(body: &[u8]) -> ETag {
    use md5::{Digest, Md5};
    ETag(format!("\"{}\"", hex::encode(Md5::digest(body))))
}

/// The ETag S3 gives a multipart object: the MD5 of the parts' MD5s, a dash, and the part count.
/// Takes the parts' own ETags (quoted hex MD5s, as [`content_etag`] makes them).
pub fn multipart_etag<'a>(part_etags: impl IntoIterator<Item = &'a ETag>) -> ETag {
    use md5::{Digest, Md5};
    let mut outer = Md5::new();
    let mut count = 0;
    for etag in part_etags {
        let digest = hex::decode(etag.0.trim_matches('"')).unwrap_or_default();
        outer.update(digest);
        count += 1;
    }
    ETag(format!("\"{}-{count}\"", hex::encode(outer.finalize())))
}

/// Checks the parts of a completion request: numbered 1..=10000, strictly ascending, and all but
/// the last at least [`MIN_PART_SIZE`] bytes (`sizes` gives each part's size, in order).
pub fn check_parts(parts: &[CompletedPart], sizes: &[u64]) -> Result<()> {
    if parts.is_empty() {
        return Err(StoreError::invalid(
            "a multipart upload needs at least one part",
        ));
    }
    let ascending = parts
        .windows(2)
        .all(|w| w[0].part_number < w[1].part_number);
    if !ascending || parts[0].part_number == 0 || parts[parts.len() - 1].part_number > 10_000 {
        return Err(StoreError::invalid(
            "part numbers must be 1 to 10000 and in ascending order",
        ));
    }
    if let Some(small) = sizes[..sizes.len() - 1]
        .iter()
        .position(|&size| size < MIN_PART_SIZE)
    {
        return Err(StoreError::invalid(format!(
            "part {} is {} bytes; every part but the last must be at least {MIN_PART_SIZE} bytes",
            parts[small].part_number, sizes[small]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_clamp_to_the_object() {
        assert_eq!(clamp_range(None, 10), 0..10);
        assert_eq!(clamp_range(Some(2..5), 10), 2..5);
        assert_eq!(clamp_range(Some(8..50), 10), 8..10);
        assert_eq!(clamp_range(Some(12..50), 10), 10..10);
        assert_eq!(clamp_range(Some(0..1), 0), 0..0);
    }

    #[test]
    fn etags_follow_s3() {
        // MD5 of the empty string, as S3 reports for an empty object.
        assert_eq!(content_etag(b"").0, "\"d41d8cd98f00b204e9800998ecf8427e\"");
        let parts = [content_etag(b"a"), content_etag(b"b")];
        assert!(multipart_etag(&parts).0.ends_with("-2\""));
    }

    #[test]
    fn metadata_must_fit_in_headers() {
        let mut ok = Metadata::new();
        ok.insert("mode".into(), "33184".into());
        assert!(check_metadata(&ok).is_ok());
        let mut upper = Metadata::new();
        upper.insert("Mode".into(), "1".into());
        assert_eq!(
            check_metadata(&upper).unwrap_err().kind(),
            ErrorKind::InvalidRequest
        );
        let mut non_ascii = Metadata::new();
        non_ascii.insert("name".into(), "é".into());
        assert!(check_metadata(&non_ascii).is_err());
    }

    #[test]
    fn conditions() {
        let a = ETag("\"a\"".into());
        let b = ETag("\"b\"".into());
        assert!(condition_holds("k", &PutCondition::IfAbsent, None).is_ok());
        assert!(condition_holds("k", &PutCondition::IfAbsent, Some(&a)).is_err());
        assert!(condition_holds("k", &PutCondition::IfMatch(a.clone()), Some(&a)).is_ok());
        let lost = condition_holds("k", &PutCondition::IfMatch(a.clone()), Some(&b));
        assert_eq!(lost.unwrap_err().kind(), ErrorKind::PreconditionFailed);
        let gone = condition_holds("k", &PutCondition::IfMatch(a), None);
        assert_eq!(gone.unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn small_middle_parts_are_refused() {
        let parts: Vec<CompletedPart> = (1..=2)
            .map(|n| CompletedPart {
                part_number: n,
                etag: ETag(String::new()),
            })
            .collect();
        assert!(check_parts(&parts, &[MIN_PART_SIZE, 1]).is_ok());
        assert!(check_parts(&parts, &[1, MIN_PART_SIZE]).is_err());
        let backwards = vec![parts[1].clone(), parts[0].clone()];
        assert!(check_parts(&backwards, &[MIN_PART_SIZE, 1]).is_err());
    }
}
