//! The change log: an ordered list of changes made locally and not yet applied to the store,
//! kept in SQLite (WAL) so that it survives a crash of the mount process, and mirrored in memory
//! so that the filesystem can answer from it (a pending create is a file; a pending delete hides
//! what the store still holds).
//!
//! Coalescing: a key has at most one entry that has not started uploading; a newer change of the
//! same key replaces it in place, keeping its position in the order (so a file never moves ahead
//! of its directory's marker). A delete of a key the store never had removes the pending entry
//! instead: a file written then deleted before upload never reaches the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use crate::attrs::{Attrs, Kind};
use crate::error::FsResult;

/// One change to apply to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Upload the contents of a cache file as the object, with these attributes.
    PutFile {
        cache_file: String,
        attrs: StoredAttrs,
    },
    /// Put a directory's `dir/` marker.
    PutDir { attrs: StoredAttrs },
    /// Put a symlink object whose body is the target.
    PutSymlink { target: String, attrs: StoredAttrs },
    /// Copy another object (version `etag`, `size` bytes) here inside the store: a renamed file.
    Copy {
        from: String,
        etag: String,
        size: u64,
        attrs: StoredAttrs,
    },
    /// Rewrite an object's (or a directory marker's) attributes.
    SetAttrs {
        kind: StoredKind,
        attrs: StoredAttrs,
    },
    /// Delete the object.
    Delete,
    /// Delete the directory's marker.
    DeleteDir,
}

/// Attributes as the journal stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAttrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: u128,
    /// Set by `utimensat` (change logs written before it was kept have none).
    #[serde(default)]
    pub atime_ns: Option<u128>,
    /// A device node's device number.
    #[serde(default)]
    pub rdev: u32,
}

impl From<Attrs> for StoredAttrs {
    fn from(a: Attrs) -> Self {
        Self {
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            mtime_ns: nanos_since_epoch(a.mtime),
            atime_ns: a.atime.map(nanos_since_epoch),
            rdev: a.rdev,
        }
    }
}

impl From<StoredAttrs> for Attrs {
    fn from(a: StoredAttrs) -> Self {
        Attrs {
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            mtime: time_from_nanos(a.mtime_ns),
            atime: a.atime_ns.map(time_from_nanos),
            rdev: a.rdev,
        }
    }
}

fn nanos_since_epoch(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn time_from_nanos(nanos: u128) -> SystemTime {
    let secs = (nanos / 1_000_000_000) as u64;
    UNIX_EPOCH + Duration::new(secs, (nanos % 1_000_000_000) as u32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredKind {
    File,
    Dir,
    Symlink,
}

impl From<Kind> for StoredKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::File => Self::File,
            Kind::Dir => Self::Dir,
            Kind::Symlink => Self::Symlink,
        }
    }
}

impl From<StoredKind> for Kind {
    fn from(k: StoredKind) -> Self {
        match k {
            StoredKind::File => Self::File,
            StoredKind::Dir => Self::Dir,
            StoredKind::Symlink => Self::Symlink,
        }
    }
}

impl Change {
    /// What the key holds once this change applies: a kind and attributes, or nothing.
    pub fn outcome(&self) -> Option<(Kind, Attrs)> {
        match self {
            Self::PutFile { attrs, .. } | Self::Copy { attrs, .. } => {
                Some((Kind::File, (*attrs).into()))
            }
            Self::PutDir { attrs } => Some((Kind::Dir, (*attrs).into())),
            Self::PutSymlink { attrs, .. } => Some((Kind::Symlink, (*attrs).into())),
            Self::SetAttrs { kind, attrs } => Some(((*kind).into(), (*attrs).into())),
            Self::Delete | Self::DeleteDir => None,
        }
    }

    /// Whether the change puts a new object at its key, or removes it: what an earlier change
    /// of the key stored is then no longer what the key holds.
    pub fn replaces_object(&self) -> bool {
        matches!(
            self,
            Self::PutFile { .. } | Self::PutSymlink { .. } | Self::Copy { .. } | Self::Delete
        )
    }

    /// Whether the change is about a directory's marker object rather than a file's object.
    pub fn is_marker(&self) -> bool {
        matches!(
            self,
            Self::PutDir { .. }
                | Self::DeleteDir
                | Self::SetAttrs {
                    kind: StoredKind::Dir,
                    ..
                }
        )
    }

    fn with_attrs(&self, new: StoredAttrs) -> Change {
        let mut changed = self.clone();
        match &mut changed {
            Self::PutFile { attrs, .. }
            | Self::PutDir { attrs }
            | Self::PutSymlink { attrs, .. }
            | Self::Copy { attrs, .. }
            | Self::SetAttrs { attrs, .. } => *attrs = new,
            Self::Delete | Self::DeleteDir => {}
        }
        changed
    }
}

/// One pending change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub key: String,
    pub change: Change,
    /// Whether the store held the key before the first pending change of it.
    pub existed: bool,
    /// Not to be applied before this time (the write-back delay after a close).
    pub not_before: SystemTime,
}

impl Entry {
    /// Keys this entry reads or writes in the store.
    fn keys(&self) -> impl Iterator<Item = &str> {
        let from = match &self.change {
            Change::Copy { from, .. } => Some(from.as_str()),
            _ => None,
        };
        std::iter::once(self.key.as_str()).chain(from)
    }

    /// Whether two entries must be applied in order: they touch the same key, or one key is a
    /// directory above the other. (The uploader asks [`EarlierKeys`], which answers the same.)
    #[cfg(test)]
    fn related(&self, other: &Entry) -> bool {
        self.keys().any(|a| {
            other
                .keys()
                .any(|b| a == b || is_below(a, b) || is_below(b, a))
        })
    }
}

/// The keys of the entries met so far in [`Journal::take_up_to`]'s walk.
#[derive(Default)]
struct EarlierKeys<'a>(BTreeSet<&'a str>);

impl<'a> EarlierKeys<'a> {
    fn add(&mut self, entry: &'a Entry) {
        self.0.extend(entry.keys());
    }

    /// Whether an earlier entry touches `key`, a directory above it, or a key inside it: the
    /// relation [`Entry::related`] tests pair by pair.
    fn holds_back(&self, key: &str) -> bool {
        let same_or_above = key
            .match_indices('/')
            .map(|(at, _)| &key[..at])
            .chain(std::iter::once(key))
            .any(|k| self.0.contains(k));
        let inside = format!("{key}/");
        let below = self
            .0
            .range::<str, _>((Bound::Included(inside.as_str()), Bound::Unbounded))
            .next()
            .is_some_and(|k| k.starts_with(&inside));
        same_or_above || below
    }
}

/// Whether `key` lies inside directory `dir`.
#[cfg(test)]
fn is_below(key: &str, dir: &str) -> bool {
    key.len() > dir.len() && key.starts_with(dir) && key.as_bytes()[dir.len()] == b'/'
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn from_unix_seconds(s: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(s.max(0.0))
}

/// The journal: SQLite on disk, a map in memory.
#[derive(Debug)]
pub struct Journal {
    db: Connection,
    entries: BTreeMap<u64, Entry>,
    /// key -> seqs of its pending entries, oldest first.
    by_key: HashMap<String, Vec<u64>>,
    in_flight: HashSet<u64>,
    /// Kept in step with `entries` and `in_flight` by [`Journal::track`] and
    /// [`Journal::untrack`], so that the uploader's questions after every request cost a lookup,
    /// not a walk over thousands of waiting changes.
    index: Index,
    next_seq: u64,
}

/// What the uploader asks of the journal, indexed.
#[derive(Debug, Default)]
struct Index {
    /// Entries not started, by due time.
    waiting: BTreeSet<(SystemTime, u64)>,
    /// Entries that delete a file's object.
    deletes: BTreeSet<u64>,
    /// Cache file name -> how many entries upload it.
    cache_files: HashMap<String, usize>,
}

impl Journal {
    /// Opens (creating) the journal in `path` and loads what is pending.
    pub fn open(path: &Path) -> FsResult<Self> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode survives a crash of the process (the OS has every commit); an
        // fsync with fsync=local asks for a full sync explicitly.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS changes (
                 seq INTEGER PRIMARY KEY,
                 key TEXT NOT NULL,
                 change TEXT NOT NULL,
                 existed INTEGER NOT NULL,
                 not_before REAL NOT NULL
             );",
        )?;
        let mut journal = Self {
            db,
            entries: BTreeMap::new(),
            by_key: HashMap::new(),
            in_flight: HashSet::new(),
            index: Index::default(),
            next_seq: 1,
        };
        let loaded: Vec<Entry> = {
            let mut query = journal.db.prepare(
                "SELECT seq, key, change, existed, not_before FROM changes ORDER BY seq",
            )?;
            let rows = query.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, f64>(4)?,
                ))
            })?;
            let mut loaded = Vec::new();
            for row in rows {
                let (seq, key, change, existed, not_before) = row?;
                let change: Change = serde_json::from_str(&change).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?;
                loaded.push(Entry {
                    seq: seq as u64,
                    key,
                    change,
                    existed: existed != 0,
                    not_before: from_unix_seconds(not_before),
                });
            }
            loaded
        };
        for entry in loaded {
            journal.next_seq = journal.next_seq.max(entry.seq + 1);
            journal
                .by_key
                .entry(entry.key.clone())
                .or_default()
                .push(entry.seq);
            let seq = entry.seq;
            journal.entries.insert(seq, entry);
            journal.track(seq);
        }
        Ok(journal)
    }

    /// Adds entry `seq` as it is now to the index.
    fn track(&mut self, seq: u64) {
        let Some(entry) = self.entries.get(&seq) else {
            return;
        };
        if !self.in_flight.contains(&seq) {
            self.index.waiting.insert((entry.not_before, seq));
        }
        match &entry.change {
            Change::Delete => {
                self.index.deletes.insert(seq);
            }
            Change::PutFile { cache_file, .. } => {
                *self
                    .index
                    .cache_files
                    .entry(cache_file.clone())
                    .or_default() += 1;
            }
            _ => {}
        }
    }

    /// Takes entry `seq` as it is now out of the index (before it changes or goes).
    fn untrack(&mut self, seq: u64) {
        let Some(entry) = self.entries.get(&seq) else {
            return;
        };
        self.index.waiting.remove(&(entry.not_before, seq));
        self.index.deletes.remove(&seq);
        if let Change::PutFile { cache_file, .. } = &entry.change
            && let Some(count) = self.index.cache_files.get_mut(cache_file)
        {
            *count -= 1;
            if *count == 0 {
                self.index.cache_files.remove(cache_file);
            }
        }
    }

    /// Changes entry `seq` in memory, keeping the index in step; returns it as changed.
    fn change_entry(&mut self, seq: u64, change: impl FnOnce(&mut Entry)) -> Option<Entry> {
        self.untrack(seq);
        let entry = self.entries.get_mut(&seq).map(|entry| {
            change(entry);
            entry.clone()
        });
        self.track(seq);
        entry
    }

    fn write_row(&self, entry: &Entry) -> FsResult<()> {
        let change = serde_json::to_string(&entry.change).expect("changes serialize");
        self.db.execute(
            "INSERT OR REPLACE INTO changes (seq, key, change, existed, not_before) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![entry.seq as i64, entry.key, change, entry.existed as i64, unix_seconds(entry.not_before)],
        )?;
        Ok(())
    }

    fn delete_row(&self, seq: u64) -> FsResult<()> {
        self.db
            .execute("DELETE FROM changes WHERE seq = ?1", params![seq as i64])?;
        Ok(())
    }

    /// The newest pending entry of `key`.
    pub fn latest(&self, key: &str) -> Option<&Entry> {
        self.by_key
            .get(key)?
            .last()
            .and_then(|seq| self.entries.get(seq))
    }

    /// The newest entry of `key` that has not started, which a new change may replace.
    fn replaceable(&self, key: &str) -> Option<u64> {
        let seq = *self.by_key.get(key)?.last()?;
        (!self.in_flight.contains(&seq)).then_some(seq)
    }

    /// Whether the store holds `key` as far as the journal knows: the store's answer before the
    /// first pending change, as given by `store_has` (None when the journal has nothing).
    pub fn existed(&self, key: &str) -> Option<bool> {
        let seqs = self.by_key.get(key)?;
        Some(
            seqs.iter()
                .filter_map(|s| self.entries.get(s))
                .any(|e| e.existed),
        )
    }

    /// Records a change of `key`; `store_has` says whether the store holds the key now (used
    /// when the journal has no entry for it). Returns the entry's sequence number, or None when
    /// the change cancelled a pending create.
    pub fn record(
        &mut self,
        key: &str,
        change: Change,
        store_has: bool,
        not_before: SystemTime,
    ) -> FsResult<Option<u64>> {
        let existed = self.existed(key).unwrap_or(store_has);
        let in_flight_pending = self
            .by_key
            .get(key)
            .is_some_and(|seqs| seqs.iter().any(|s| self.in_flight.contains(s)));
        let cancels = matches!(change, Change::Delete | Change::DeleteDir)
            && self.existed(key) == Some(false)
            && !in_flight_pending;
        let same_kind = |seq: &u64| {
            self.entries
                .get(seq)
                .is_some_and(|e| e.change.is_marker() == change.is_marker())
        };
        if cancels && let Some(seq) = self.replaceable(key).filter(same_kind) {
            // A create that never reached the store: forget it ever existed.
            self.remove(seq)?;
            return Ok(None);
        }
        // In place only over a change of the same store object: a directory's marker (`key/`)
        // and a file's object (`key`) are different objects, so neither replaces the other.
        if let Some(seq) = self.replaceable(key).filter(same_kind) {
            let entry = self
                .change_entry(seq, |entry| {
                    entry.change = change;
                    // The earlier due time stands: repeated closes do not postpone an upload.
                    entry.not_before = entry.not_before.min(not_before);
                })
                .expect("indexed entries exist");
            self.write_row(&entry)?;
            return Ok(Some(seq));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = Entry {
            seq,
            key: key.to_string(),
            change,
            existed,
            not_before,
        };
        self.write_row(&entry)?;
        self.by_key.entry(key.to_string()).or_default().push(seq);
        self.entries.insert(seq, entry);
        self.track(seq);
        Ok(Some(seq))
    }

    /// Drops the waiting (not started) change of `key`, if any.
    pub fn discard(&mut self, key: &str) -> FsResult<()> {
        if let Some(seq) = self.replaceable(key) {
            self.remove(seq)?;
        }
        Ok(())
    }

    /// Notes that an entry is starting to apply: once a put of a key has started, the store may
    /// hold the key, so a later delete of it must not be cancelled as if it never got there.
    pub fn mark_started(&mut self, seq: u64) -> FsResult<()> {
        let Some(key) = self
            .entries
            .get(&seq)
            .filter(|e| e.change.outcome().is_some())
            .map(|e| e.key.clone())
        else {
            return Ok(());
        };
        let seqs = self.by_key.get(&key).cloned().unwrap_or_default();
        for s in seqs {
            if let Some(entry) = self.entries.get_mut(&s)
                && !entry.existed
            {
                entry.existed = true;
                let entry = entry.clone();
                self.write_row(&entry)?;
            }
        }
        Ok(())
    }

    /// Changes the attributes a pending change will write; false if nothing is pending.
    pub fn update_attrs(&mut self, key: &str, attrs: StoredAttrs) -> FsResult<bool> {
        let Some(seq) = self.replaceable(key) else {
            return Ok(false);
        };
        if self.entries[&seq].change.outcome().is_none() {
            return Ok(false);
        }
        let entry = self
            .change_entry(seq, |entry| entry.change = entry.change.with_attrs(attrs))
            .expect("indexed entries exist");
        self.write_row(&entry)?;
        Ok(true)
    }

    /// Makes the pending change of `key` due now (fsync, flush).
    pub fn hurry(&mut self, key: &str) -> FsResult<Option<u64>> {
        let Some(seq) = self.by_key.get(key).and_then(|s| s.last().copied()) else {
            return Ok(None);
        };
        if !self.in_flight.contains(&seq)
            && let Some(entry) =
                self.change_entry(seq, |entry| entry.not_before = SystemTime::UNIX_EPOCH)
        {
            self.write_row(&entry)?;
        }
        Ok(Some(seq))
    }

    /// Makes the changes `seqs` due now, and every earlier change they wait for: the earlier
    /// changes of their keys, of the directories above them and of keys inside them, and in turn
    /// what those wait for (an fsync: never the unrelated changes made before it).
    pub fn hurry_with_predecessors(&mut self, seqs: &[u64]) -> FsResult<()> {
        let Some(&last) = seqs.iter().max() else {
            return Ok(());
        };
        let mut needed = EarlierKeys::default();
        let mut hurried = Vec::new();
        for entry in self.entries.range(..=last).rev().map(|(_, entry)| entry) {
            let wanted = seqs.contains(&entry.seq) || entry.keys().any(|k| needed.holds_back(k));
            if wanted {
                needed.add(entry);
                if entry.not_before != SystemTime::UNIX_EPOCH {
                    hurried.push(entry.seq);
                }
            }
        }
        if hurried.is_empty() {
            return Ok(());
        }
        let tx = self.db.transaction()?;
        for seq in &hurried {
            tx.execute(
                "UPDATE changes SET not_before = 0 WHERE seq = ?1",
                params![*seq as i64],
            )?;
        }
        tx.commit()?;
        for seq in hurried {
            self.change_entry(seq, |entry| entry.not_before = SystemTime::UNIX_EPOCH);
        }
        Ok(())
    }

    /// Whether change `seq` is still to be applied.
    pub fn is_pending(&self, seq: u64) -> bool {
        self.entries.contains_key(&seq)
    }

    /// Makes every pending change due now (unmount, `cairn flush`).
    pub fn hurry_all(&mut self) -> FsResult<()> {
        let due: Vec<u64> = self.entries.keys().copied().collect();
        for seq in due {
            self.change_entry(seq, |entry| entry.not_before = SystemTime::UNIX_EPOCH);
        }
        self.db.execute("UPDATE changes SET not_before = 0", [])?;
        Ok(())
    }

    /// Drops a pending entry (applied, or cancelled), on disk and in memory.
    pub fn remove(&mut self, seq: u64) -> FsResult<()> {
        self.delete_row(seq)?;
        self.forget(seq);
        Ok(())
    }

    /// Drops an applied entry from disk only; [`Journal::forget`] then drops it from memory
    /// (the caller does that together with updating what it knows of the store).
    pub fn remove_row(&mut self, seq: u64) -> FsResult<()> {
        self.delete_row(seq)
    }

    /// Drops an entry from memory.
    pub fn forget(&mut self, seq: u64) {
        self.untrack(seq);
        self.in_flight.remove(&seq);
        if let Some(entry) = self.entries.remove(&seq)
            && let Some(seqs) = self.by_key.get_mut(&entry.key)
        {
            seqs.retain(|s| *s != seq);
            if seqs.is_empty() {
                self.by_key.remove(&entry.key);
            }
        }
    }

    /// Entries that may start now: due, not started, and with no earlier related entry still
    /// pending. At most `limit`.
    pub fn take_runnable(&mut self, now: SystemTime, limit: usize) -> Vec<Entry> {
        if self.next_due().is_none_or(|due| due > now) {
            return Vec::new();
        }
        // The walk ends at the last candidate (looked for from the end, where the newest
        // changes wait out their delay): later entries hold back nothing before them.
        let last = self
            .entries
            .values()
            .rev()
            .find(|e| e.not_before <= now && !self.in_flight.contains(&e.seq))
            .map(|e| e.seq);
        self.take_up_to(now, limit, last, |_| true)
    }

    /// [`Journal::take_runnable`] of the deletes of files only (the other entries still hold
    /// back the deletes related to them).
    pub fn take_runnable_deletes(&mut self, now: SystemTime, limit: usize) -> Vec<Entry> {
        let last = self
            .index
            .deletes
            .iter()
            .rev()
            .copied()
            .find(|seq| !self.in_flight.contains(seq) && self.entries[seq].not_before <= now);
        self.take_up_to(now, limit, last, |e| e.change == Change::Delete)
    }

    /// Walks the entries up to `last` (the last candidate, if any), and starts at most `limit`
    /// of the due ones `wanted` picks that no earlier entry holds back.
    fn take_up_to(
        &mut self,
        now: SystemTime,
        limit: usize,
        last: Option<u64>,
        wanted: impl Fn(&Entry) -> bool,
    ) -> Vec<Entry> {
        let Some(last) = last else {
            return Vec::new();
        };
        let candidate =
            |e: &Entry| e.not_before <= now && !self.in_flight.contains(&e.seq) && wanted(e);
        let mut picked = Vec::new();
        // Every earlier entry holds back the later ones related to it; indexed by key, so that
        // thousands of waiting changes (a big untar) cost a lookup each, not a scan each.
        let mut earlier = EarlierKeys::default();
        for entry in self.entries.values() {
            if candidate(entry) && !entry.keys().any(|key| earlier.holds_back(key)) {
                picked.push(entry.clone());
            }
            if picked.len() >= limit || entry.seq == last {
                break;
            }
            earlier.add(entry);
        }
        for entry in &picked {
            self.in_flight.insert(entry.seq);
            self.index.waiting.remove(&(entry.not_before, entry.seq));
        }
        picked
    }

    /// An entry that failed goes back to waiting (to be retried after `not_before`).
    pub fn retry_later(&mut self, seq: u64, not_before: SystemTime) {
        self.in_flight.remove(&seq);
        if let Some(entry) = self.entries.get_mut(&seq) {
            entry.not_before = entry.not_before.max(not_before);
            self.index.waiting.insert((entry.not_before, seq));
        }
    }

    /// When the next waiting entry is due, if any.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.index.waiting.first().map(|(due, _)| *due)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Whether a pending change will upload cache file `name`.
    pub fn uploads_cache_file(&self, name: &str) -> bool {
        self.index.cache_files.contains_key(name)
    }

    /// Pending changes of the direct children of directory `prefix` ("" or "dir/").
    pub fn children<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.below(prefix)
            .filter(move |e| !e.key[prefix.len()..].contains('/'))
    }

    /// Pending changes of every key below directory `prefix` ("" or "dir/"), at any depth.
    pub fn below<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.by_key
            .iter()
            .filter(move |(key, _)| key.len() > prefix.len() && key.starts_with(prefix))
            .filter_map(|(_, seqs)| seqs.last().and_then(|s| self.entries.get(s)))
    }

    /// Forces the journal to disk (fsync=local).
    pub fn sync(&self) -> FsResult<()> {
        self.db.execute_batch("PRAGMA wal_checkpoint(FULL);")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::S_IFREG;

    fn attrs() -> StoredAttrs {
        StoredAttrs {
            mode: S_IFREG | 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            atime_ns: None,
            rdev: 0,
        }
    }

    fn put(file: &str) -> Change {
        Change::PutFile {
            cache_file: file.into(),
            attrs: attrs(),
        }
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    /// The key index the uploader's walk uses holds back exactly what the pairwise relation
    /// says, for keys that share prefixes with and without a '/' between.
    #[test]
    fn earlier_keys_hold_back_what_is_related() {
        let keys = [
            "", "a", "a/b", "a/b/c", "a/bc", "a-b", "a.b", "ab", "a/b/c/d", "b", "b/a", "a/b-c",
        ];
        let entry = |key: &str, change: Change| Entry {
            seq: 0,
            key: key.into(),
            change,
            existed: false,
            not_before: now(),
        };
        let mut entries: Vec<Entry> = keys.iter().map(|k| entry(k, Change::Delete)).collect();
        for (to, from) in [("b/a", "a/b"), ("ab", "a.b"), ("a/bc", "b")] {
            let copy = Change::Copy {
                from: from.into(),
                etag: "e".into(),
                size: 1,
                attrs: attrs(),
            };
            entries.push(entry(to, copy));
        }
        for first in &entries {
            let mut earlier = EarlierKeys::default();
            earlier.add(first);
            for later in &entries {
                let held = later.keys().any(|key| earlier.holds_back(key));
                assert_eq!(
                    held,
                    first.related(later),
                    "{:?} then {:?}",
                    first.keys().collect::<Vec<_>>(),
                    later.keys().collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn a_file_written_then_deleted_never_reaches_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("j.db")).unwrap();
        journal.record("a", put("f1"), false, now()).unwrap();
        assert_eq!(
            journal.record("a", Change::Delete, false, now()).unwrap(),
            None
        );
        assert!(journal.is_empty());
        // A file the store has needs its delete.
        journal.record("b", put("f2"), true, now()).unwrap();
        journal.record("b", Change::Delete, true, now()).unwrap();
        assert_eq!(journal.latest("b").unwrap().change, Change::Delete);
        assert_eq!(journal.len(), 1);
    }

    #[test]
    fn changes_replace_in_place_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("j.db")).unwrap();
        let marker = journal
            .record("d", Change::PutDir { attrs: attrs() }, false, now())
            .unwrap();
        journal.record("d/f", put("f1"), false, now()).unwrap();
        let again = journal
            .record("d", Change::PutDir { attrs: attrs() }, false, now())
            .unwrap();
        assert_eq!(
            again, marker,
            "the marker keeps its place ahead of its file"
        );
        let runnable = journal.take_runnable(now(), 10);
        assert_eq!(
            runnable.len(),
            1,
            "the file waits for its directory's marker"
        );
        assert_eq!(runnable[0].key, "d");
        journal.remove(runnable[0].seq).unwrap();
        let next = journal.take_runnable(now(), 10);
        assert_eq!(next[0].key, "d/f");
    }

    /// An fsync hurries what its change waits for (its directory's new marker, an earlier
    /// change inside a directory it replaces) and nothing unrelated, before or after it; on disk
    /// too.
    #[test]
    fn an_fsync_hurries_what_its_change_waits_for_and_nothing_unrelated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let mut journal = Journal::open(&path).unwrap();
        let later = now() + std::time::Duration::from_secs(600);
        journal.record("a", put("f1"), false, later).unwrap();
        let marker = Change::PutDir { attrs: attrs() };
        journal.record("d", marker, false, later).unwrap();
        journal.record("e", put("f2"), false, later).unwrap();
        let fsynced = journal
            .record("d/x", put("f3"), false, later)
            .unwrap()
            .unwrap();
        journal.record("c", put("f4"), false, later).unwrap();
        assert!(
            journal.take_runnable(now(), 10).is_empty(),
            "nothing is due"
        );
        journal.hurry_with_predecessors(&[fsynced]).unwrap();
        let due: Vec<String> = journal
            .take_runnable(now(), 10)
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(due, ["d"], "d's marker first; a, e and c still wait");
        drop(journal);
        let mut reopened = Journal::open(&path).unwrap();
        let due: Vec<String> = reopened
            .take_runnable(now(), 10)
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(due, ["d"], "after a restart too");
        assert!(reopened.is_pending(fsynced));
    }

    #[test]
    fn an_entry_in_flight_is_not_changed_underneath() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("j.db")).unwrap();
        journal.record("a", put("f1"), false, now()).unwrap();
        let started = journal.take_runnable(now(), 1);
        let newer = journal
            .record("a", put("f1"), false, now())
            .unwrap()
            .unwrap();
        assert_ne!(newer, started[0].seq);
        assert!(
            journal.take_runnable(now(), 10).is_empty(),
            "the newer one waits for the first"
        );
        journal.remove(started[0].seq).unwrap();
        assert_eq!(journal.take_runnable(now(), 10)[0].seq, newer);
    }

    /// The index as sorted lists: waiting (due, seq), deletes, cache files with their counts.
    type IndexView = (Vec<(SystemTime, u64)>, Vec<u64>, Vec<(String, usize)>);

    impl Journal {
        /// The index as a walk over every entry computes it.
        fn index_by_walking(&self) -> IndexView {
            let mut waiting: Vec<_> = self
                .entries
                .values()
                .filter(|e| !self.in_flight.contains(&e.seq))
                .map(|e| (e.not_before, e.seq))
                .collect();
            waiting.sort();
            let deletes = self
                .entries
                .values()
                .filter(|e| e.change == Change::Delete)
                .map(|e| e.seq)
                .collect();
            let mut cache_files = HashMap::<String, usize>::new();
            for entry in self.entries.values() {
                if let Change::PutFile { cache_file, .. } = &entry.change {
                    *cache_files.entry(cache_file.clone()).or_default() += 1;
                }
            }
            let mut cache_files: Vec<_> = cache_files.into_iter().collect();
            cache_files.sort();
            (waiting, deletes, cache_files)
        }

        fn index_as_kept(&self) -> IndexView {
            let mut cache_files: Vec<_> = self
                .index
                .cache_files
                .iter()
                .map(|(name, count)| (name.clone(), *count))
                .collect();
            cache_files.sort();
            (
                self.index.waiting.iter().copied().collect(),
                self.index.deletes.iter().copied().collect(),
                cache_files,
            )
        }
    }

    /// Thousands of mixed operations (records that replace or cancel, takes, retries, hurries,
    /// applied entries) leave the index what a walk over the entries says, and so after a
    /// reopen.
    #[test]
    fn the_index_stays_in_step_with_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let mut journal = Journal::open(&path).unwrap();
        let start = now();
        let mut state = 7u64;
        let mut next = |below: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % below
        };
        for step in 0..3000u64 {
            let key = format!("d{}/f{}", next(3), next(8));
            let at = start + Duration::from_millis(next(50));
            match next(10) {
                0..=2 => {
                    let file = format!("c{}", next(6));
                    journal.record(&key, put(&file), next(2) == 0, at).unwrap();
                }
                3 => {
                    journal
                        .record(&key, Change::Delete, next(2) == 0, at)
                        .unwrap();
                }
                4 => {
                    let dir = format!("d{}", next(3));
                    let change = [Change::PutDir { attrs: attrs() }, Change::DeleteDir];
                    let change = change[next(2) as usize].clone();
                    journal.record(&dir, change, true, at).unwrap();
                }
                5 => {
                    let when = start + Duration::from_millis(next(60));
                    journal.take_runnable(when, 1 + next(3) as usize);
                    journal.take_runnable_deletes(when, 1 + next(3) as usize);
                }
                6 => {
                    if let Some(seq) = journal.in_flight.iter().next().copied() {
                        if next(2) == 0 {
                            journal.retry_later(seq, at);
                        } else {
                            journal.remove(seq).unwrap();
                        }
                    }
                }
                7 => {
                    journal.hurry(&key).unwrap();
                }
                8 => {
                    let attrs = StoredAttrs {
                        mtime_ns: step.into(),
                        ..attrs()
                    };
                    journal.update_attrs(&key, attrs).unwrap();
                }
                _ => match next(20) {
                    0 => journal.hurry_all().unwrap(),
                    1 => journal.discard(&key).unwrap(),
                    _ => journal.hurry_with_predecessors(&[next(step + 1)]).unwrap(),
                },
            }
            assert_eq!(
                journal.index_as_kept(),
                journal.index_by_walking(),
                "step {step}"
            );
            let walked = journal.index_by_walking();
            assert_eq!(journal.next_due(), walked.0.first().map(|(due, _)| *due));
            for name in ["c0", "c3", "c5"] {
                assert_eq!(
                    journal.uploads_cache_file(name),
                    walked.2.iter().any(|(file, _)| file == name)
                );
            }
        }
        assert!(!journal.entries.is_empty() && !journal.in_flight.is_empty());
        drop(journal);
        let reopened = Journal::open(&path).unwrap();
        assert_eq!(reopened.index_as_kept(), reopened.index_by_walking());
    }

    #[test]
    fn the_journal_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        {
            let mut journal = Journal::open(&path).unwrap();
            journal.record("x", put("f1"), false, now()).unwrap();
            journal
                .record(
                    "y",
                    Change::Copy {
                        from: "x0".into(),
                        etag: "\"e\"".into(),
                        size: 3,
                        attrs: attrs(),
                    },
                    false,
                    now(),
                )
                .unwrap();
        }
        let journal = Journal::open(&path).unwrap();
        assert_eq!(journal.len(), 2);
        assert!(matches!(
            journal.latest("y").unwrap().change,
            Change::Copy { .. }
        ));
    }

    #[test]
    fn a_copy_waits_for_nothing_but_blocks_the_delete_of_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("j.db")).unwrap();
        journal
            .record(
                "b",
                Change::Copy {
                    from: "a".into(),
                    etag: "\"e\"".into(),
                    size: 1,
                    attrs: attrs(),
                },
                false,
                now(),
            )
            .unwrap();
        journal.record("a", Change::Delete, true, now()).unwrap();
        let runnable = journal.take_runnable(now(), 10);
        assert_eq!(runnable.len(), 1);
        assert_eq!(runnable[0].key, "b");
    }

    #[test]
    fn delays_are_respected_until_hurried() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("j.db")).unwrap();
        let later = now() + Duration::from_secs(60);
        journal.record("a", put("f1"), false, later).unwrap();
        assert!(journal.take_runnable(now(), 10).is_empty());
        journal.hurry("a").unwrap();
        assert_eq!(journal.take_runnable(now(), 10).len(), 1);
    }
}
