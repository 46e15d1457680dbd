//! The fsync log: what makes a durable fsync one small request. A file already in the store
//! that changed in a few places is not uploaded whole at fsync: the bytes that changed since
//! its stored version (its *base*) go into one small object under the volume's
//! `.cairn/fsync/VOLUME/` at the store root, a *record*. The plain object is brought up to date
//! later by the file's usual upload, after which its records are deleted. A host that mounts
//! the volume next (after a crash, or taking over a lapsed lease) first *folds* the records
//! into the objects they change, then deletes them.
//!
//! A record names, for each file it carries, the key and the base (ETag and size) its bytes
//! apply to. Folding applies a key's records only if the store still holds that base: once the
//! file's upload has landed, the object is another version and its records are moot. Records
//! are named by a number that grows with each one written, so folding takes them in order.
//!
//! This module is the format and the store side; `fs/fsync_log.rs` in the filesystem decides
//! when a file goes this way and folds records at mount.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt, stream};
use serde::{Deserialize, Serialize};

use crate::cache::RangeSet;
use crate::journal::StoredAttrs;
use crate::store::{ErrorKind, PutOptions, SharedStore, StoreError, StoreExt};

/// What a record's body starts with.
const MAGIC: &[u8] = b"cairn-fsync-log 1\n";

/// The store and the prefix of one volume's fsync log.
#[derive(Debug)]
pub struct FsyncLog {
    store: SharedStore,
    prefix: String,
    /// The number of the last record this mount wrote.
    last: AtomicU64,
}

/// What changed in one file since its base version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Bytes written.
    pub written: RangeSet,
    /// The smallest size the file was cut to, if it was.
    pub cut: Option<u64>,
}

impl Delta {
    pub fn wrote(&mut self, range: Range<u64>) {
        self.written.insert(range);
    }

    pub fn truncated(&mut self, size: u64) {
        self.written.truncate(size);
        self.cut = Some(self.cut.map_or(size, |cut| cut.min(size)));
    }

    pub fn is_empty(&self) -> bool {
        self.written.is_empty() && self.cut.is_none()
    }
}

/// One file in a record: its bytes `ranges` (in the record's body, in this order) and size
/// over the base version `base_etag` of `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDelta {
    pub key: String,
    pub base_etag: String,
    pub base_size: u64,
    pub cut: Option<u64>,
    pub size: u64,
    pub attrs: StoredAttrs,
    /// (offset, length) of each written range.
    pub ranges: Vec<(u64, u64)>,
}

/// A record as read back: its files and, for each, the bytes of its ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub files: Vec<(FileDelta, Vec<Bytes>)>,
}

/// A key's records folded over its base: the bytes they wrote, in order, and what is left of
/// the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folded {
    pub base_etag: String,
    /// Bytes below this not written by a record are the base's.
    pub base_end: u64,
    pub written: RangeSet,
    pub size: u64,
    pub attrs: StoredAttrs,
    /// Each write, in order (a later one wins where they overlap).
    pub writes: Vec<(u64, Bytes)>,
}

/// Folds the deltas of one key, in order, over the base they name: the ones for another base
/// than `current` (the store's version now) are moot and skipped.
pub fn fold<'a>(
    current: &str,
    deltas: impl IntoIterator<Item = &'a (FileDelta, Vec<Bytes>)>,
) -> Option<Folded> {
    let mut folded: Option<Folded> = None;
    for (delta, bytes) in deltas {
        if delta.base_etag != current {
            continue;
        }
        let into = folded.get_or_insert_with(|| Folded {
            base_etag: delta.base_etag.clone(),
            base_end: delta.base_size,
            written: RangeSet::default(),
            size: delta.base_size,
            attrs: delta.attrs,
            writes: Vec::new(),
        });
        if let Some(cut) = delta.cut {
            into.base_end = into.base_end.min(cut);
            into.written.truncate(cut);
            // What earlier records wrote past the cut is gone (zeros if the file grows again).
            into.writes.retain_mut(|(offset, bytes)| {
                bytes.truncate(cut.saturating_sub(*offset) as usize);
                !bytes.is_empty()
            });
        }
        for (&(offset, length), body) in delta.ranges.iter().zip(bytes) {
            into.written.insert(offset..offset + length);
            into.writes.push((offset, body.clone()));
        }
        into.size = delta.size;
        into.base_end = into.base_end.min(delta.size);
        into.written.truncate(delta.size);
        into.attrs = delta.attrs;
    }
    folded
}

impl FsyncLog {
    /// The log of volume `volume` in the store whose root is `store`.
    pub fn new(store: SharedStore, volume: &str) -> Self {
        Self {
            store,
            prefix: format!(".cairn/fsync/{volume}/"),
            last: AtomicU64::new(0),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The number of the next record: above every record's this mount wrote, and (clocks
    /// permitting) every earlier mount's: microseconds since the epoch, or one more than the
    /// last. Taken when the record's bytes are, so that numbers follow the file's changes.
    pub fn next_number(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let next = now.max(last + 1);
            match self
                .last
                .compare_exchange(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Writes record `number` (see [`Self::next_number`]) of `files` (each with the bytes of
    /// its ranges): one put. Returns its key.
    pub async fn append(
        &self,
        number: u64,
        files: &[(FileDelta, Vec<Bytes>)],
    ) -> Result<String, StoreError> {
        let key = format!("{}{number:020}", self.prefix);
        let body = encode(files);
        self.store.put(&key, body, PutOptions::default()).await?;
        Ok(key)
    }

    /// Every record in the store, in the order they were written.
    pub async fn records(&self) -> Result<Vec<Record>, StoreError> {
        let listed = self.store.list_all(&self.prefix, false).await?;
        let mut keys: Vec<String> = listed.objects.into_iter().map(|o| o.key).collect();
        keys.sort();
        stream::iter(keys)
            .map(|key| async move {
                let (_, body) = self.store.get_all(&key).await?;
                let files = decode(body).map_err(|why| {
                    StoreError::new(
                        ErrorKind::Other,
                        format!(
                            "the fsync log record {key} is damaged ({why}); the fsyncs it holds \
                             cannot be replayed: delete it from the store to mount without them"
                        ),
                    )
                })?;
                Ok::<_, StoreError>(Record { key, files })
            })
            .buffered(8)
            .try_collect()
            .await
    }

    /// Deletes records (moot or folded).
    pub async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        for batch in keys.chunks(1000) {
            self.store.delete_many(batch).await?;
        }
        Ok(())
    }

    /// Deletes every record in the store; returns how many there were.
    pub async fn delete_all(&self) -> Result<usize, StoreError> {
        let listed = self.store.list_all(&self.prefix, false).await?;
        let keys: Vec<String> = listed.objects.into_iter().map(|o| o.key).collect();
        self.delete(&keys).await?;
        Ok(keys.len())
    }
}

fn encode(files: &[(FileDelta, Vec<Bytes>)]) -> Bytes {
    let header: Vec<&FileDelta> = files.iter().map(|(delta, _)| delta).collect();
    let header = serde_json::to_vec(&header).expect("a record's header serializes");
    let bytes: usize = files.iter().flat_map(|(_, b)| b).map(Bytes::len).sum();
    let mut body = BytesMut::with_capacity(MAGIC.len() + header.len() + 1 + bytes);
    body.put_slice(MAGIC);
    body.put_slice(&header);
    body.put_u8(b'\n');
    for chunk in files.iter().flat_map(|(_, b)| b) {
        body.put_slice(chunk);
    }
    body.freeze()
}

fn decode(body: Bytes) -> Result<Vec<(FileDelta, Vec<Bytes>)>, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("it does not start as a record does")?;
    let end = rest
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("its header has no end")?;
    let header: Vec<FileDelta> =
        serde_json::from_slice(&rest[..end]).map_err(|e| format!("its header: {e}"))?;
    let mut at = MAGIC.len() + end + 1;
    let mut files = Vec::with_capacity(header.len());
    for delta in header {
        let mut bytes = Vec::with_capacity(delta.ranges.len());
        for &(_, length) in &delta.ranges {
            let end = at + length as usize;
            if end > body.len() {
                return Err("its body is shorter than its header says".into());
            }
            bytes.push(body.slice(at..end));
            at = end;
        }
        files.push((delta, bytes));
    }
    if at != body.len() {
        return Err("its body is longer than its header says".into());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> StoredAttrs {
        StoredAttrs {
            mode: 0o100644,
            uid: 0,
            gid: 0,
            mtime_ns: 1,
            atime_ns: None,
            rdev: 0,
        }
    }

    fn delta(
        base: &str,
        cut: Option<u64>,
        size: u64,
        writes: &[(u64, &str)],
    ) -> (FileDelta, Vec<Bytes>) {
        (
            FileDelta {
                key: "f".into(),
                base_etag: base.into(),
                base_size: 10,
                cut,
                size,
                attrs: attrs(),
                ranges: writes.iter().map(|(o, b)| (*o, b.len() as u64)).collect(),
            },
            writes
                .iter()
                .map(|(_, b)| Bytes::copy_from_slice(b.as_bytes()))
                .collect(),
        )
    }

    #[test]
    fn records_read_back_as_written() {
        let files = vec![
            delta("e1", None, 12, &[(0, "ab"), (10, "xy")]),
            delta("e2", Some(3), 3, &[]),
        ];
        assert_eq!(decode(encode(&files)).unwrap(), files);
        let mut cut_short = encode(&files).to_vec();
        cut_short.pop();
        assert!(decode(Bytes::from(cut_short)).is_err());
        assert!(decode(Bytes::from_static(b"garbage")).is_err());
    }

    #[test]
    fn folding_applies_only_the_deltas_of_the_current_base_in_order() {
        let deltas = [
            delta("old", None, 20, &[(0, "zz")]),
            delta("e", None, 12, &[(2, "ab"), (10, "xy")]),
            delta("e", Some(4), 4, &[]),
            delta("e", None, 8, &[(6, "q")]),
        ];
        let folded = fold("e", &deltas).unwrap();
        assert_eq!(
            folded.base_end, 4,
            "the cut keeps only the base's first 4 bytes"
        );
        assert_eq!(folded.size, 8);
        assert_eq!(folded.written.spans().collect::<Vec<_>>(), vec![2..4, 6..7]);
        let writes: Vec<(u64, &[u8])> = folded.writes.iter().map(|(o, b)| (*o, &b[..])).collect();
        assert_eq!(
            writes,
            vec![(2, &b"ab"[..]), (6, &b"q"[..])],
            "what was written past the cut is gone"
        );
        assert!(
            fold("other", &deltas).is_none(),
            "moot deltas fold to nothing"
        );
    }
}
