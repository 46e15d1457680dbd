//! Lookups: resolving a name in a directory to an inode, from what the mount knows while it is
//! fresh, else from the change log (a pending put or delete decides), else from the store (a
//! relisting of a small directory, or a probe: HEAD of the object and of the marker and a
//! one-key listing), falling back to what the mount knows when the store does not answer.
//!
//! Owns the rules of trust (`trusted`, the TTL, `RELIST_LIMIT`) and installing what the store
//! said into the inode table. Reads the change log; never writes it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use super::health::{METADATA_BUDGET, store_down, timed_out, unreachable};
use super::reply::Attr;
use super::{Filesystem, blocking};
use crate::attrs::{Attrs, Kind};
use crate::error::{FsError, FsResult};
use crate::fs::{Inode, Namespace};
use crate::journal::Change;
use crate::namespace::{ROOT, Remote};
use crate::store::{ListOptions, ObjectInfo, StoreExt};

/// What a probe of the store found at a name.
#[derive(Debug)]
pub(super) enum StoreEntry {
    Object(ObjectInfo),
    Dir(Option<ObjectInfo>),
}

/// What the mount knows of a name without asking the store (see
/// [`Filesystem::resolve_known`]).
pub(super) enum Known {
    Found(u64),
    Absent,
    Unsure {
        key: String,
        /// The kind of the object the mount knew there (not trusted any more).
        known_object: Option<Kind>,
        /// The kind a listing showed there.
        listed_as: Option<Kind>,
    },
}

/// The most names a directory's last listing may have held for a miss there to list it again.
const RELIST_LIMIT: usize = 10_000;

impl Filesystem {
    pub(super) fn attr_of(inode: &Inode) -> Attr {
        let size = match &inode.file {
            Some(data) => data.size.load(Ordering::Acquire),
            None => inode.size,
        };
        Attr {
            ino: inode.ino,
            kind: inode.kind(),
            size,
            perm: inode.attrs.perm(),
            file_type: inode.attrs.mode & crate::attrs::S_IFMT,
            rdev: inode.attrs.rdev,
            uid: inode.attrs.uid,
            gid: inode.attrs.gid,
            mtime: inode.attrs.mtime,
            atime: inode.attrs.shown_atime(),
            ctime: inode.ctime,
        }
    }

    /// Whether what the mount knows of an inode may be used without asking the store.
    pub(super) fn trusted(&self, inode: &Inode) -> bool {
        inode.ino == ROOT || inode.file.is_some() || inode.checked.elapsed() < self.config.trust()
    }

    pub(super) fn attr(&self, ino: u64) -> FsResult<Attr> {
        self.ns()
            .get(ino)
            .map(Self::attr_of)
            .ok_or(FsError::NotFound)
    }

    pub(super) fn key_of(&self, ino: u64) -> FsResult<String> {
        self.ns().key(ino).ok_or(FsError::NotFound)
    }

    /// Asks the store what is at `key`: an object, a directory (prefix, with or without a
    /// marker), or nothing.
    pub(super) async fn probe(
        &self,
        key: &str,
        listed_as: Option<Kind>,
    ) -> FsResult<Option<StoreEntry>> {
        let marker = format!("{key}/");
        // A listing just showed what the name is: one request for its attributes will do.
        match listed_as {
            Some(Kind::Dir) => {
                return Ok(Some(StoreEntry::Dir(self.store.head_opt(&marker).await?)));
            }
            Some(_) => return Ok(self.store.head_opt(key).await?.map(StoreEntry::Object)),
            None => {}
        }
        let one = ListOptions {
            delimited: false,
            continuation: None,
            max_keys: Some(1),
        };
        let (object, marker_info, listed) = tokio::join!(
            self.store.head_opt(key),
            self.store.head_opt(&marker),
            self.store.list(&marker, one),
        );
        let listed = listed?;
        let marker_info = marker_info?;
        if marker_info.is_some() || !listed.objects.is_empty() || !listed.prefixes.is_empty() {
            return Ok(Some(StoreEntry::Dir(marker_info)));
        }
        Ok(object?.map(StoreEntry::Object))
    }

    /// Records what a probe found under `parent`/`name` and returns the inode number.
    fn install(&self, ns: &mut Namespace, parent: u64, name: &str, found: StoreEntry) -> u64 {
        if let Some(ino) = ns.child(parent, name) {
            let inode = ns.get_mut(ino).expect("a child is a live inode");
            if inode.file.is_some() {
                // Open or changed here: the local state wins.
                inode.checked = Instant::now();
                return ino;
            }
        }
        let defaults = &self.config.defaults;
        match found {
            StoreEntry::Object(info) => {
                let attrs = Attrs::decode(&info.metadata, Kind::File, info.last_modified, defaults);
                let remote = Remote {
                    etag: info.etag,
                    size: info.size,
                };
                let ino = ns.upsert(parent, name, attrs, info.size, Some(remote.clone()));
                if let Some(inode) = ns.get_mut(ino)
                    && inode.remote.as_ref() != Some(&remote)
                {
                    inode.target = None;
                }
                ino
            }
            StoreEntry::Dir(marker) => {
                let (attrs, remote) = match marker {
                    Some(info) => (
                        Attrs::decode(&info.metadata, Kind::Dir, info.last_modified, defaults),
                        Some(Remote {
                            etag: info.etag,
                            size: 0,
                        }),
                    ),
                    None => (
                        Attrs::decode(&Default::default(), Kind::Dir, SystemTime::now(), defaults),
                        None,
                    ),
                };
                ns.upsert(parent, name, attrs, 0, remote)
            }
        }
    }

    /// The size a pending change gives its key.
    async fn pending_size(&self, change: &Change) -> u64 {
        match change {
            Change::PutFile { cache_file, .. } => {
                let path = self.cache.path_of(cache_file);
                blocking(move || Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)))
                    .await
                    .unwrap_or(0)
            }
            Change::Copy { size, .. } => *size,
            Change::PutSymlink { target, .. } => target.len() as u64,
            _ => 0,
        }
    }

    /// Finds `name` in `parent`: from what the mount knows while it is fresh, else from the
    /// change log, else from the store. With the store unreachable, what the mount knows
    /// (even stale) answers.
    pub(super) async fn resolve(&self, parent: u64, name: &str) -> FsResult<Option<u64>> {
        self.resolve_listed(parent, name, None).await
    }

    /// What the mount knows of `name` in `parent` without asking the store or waiting: found
    /// (trusted), absent (a directory listed within the TTL did not hold it, or it was seen
    /// absent lately), or unsure (what `resolve` needs to go on: the key, and whether the name
    /// was an object, or listed as a kind).
    pub(super) fn resolve_known(
        &self,
        parent: u64,
        name: &str,
        listed_as: Option<Kind>,
    ) -> FsResult<Known> {
        let mut listed_as = listed_as;
        let ns = self.ns();
        let key = Self::child_key(&ns, parent, name)?;
        let mut known_object = None;
        if let Some(ino) = ns.child(parent, name) {
            let inode = ns.get(ino).expect("live child");
            if self.trusted(inode) {
                tracing::debug!(
                    "{key}: known (inode {ino}, open or changed here: {}, checked {:?} ago)",
                    inode.file.is_some(),
                    inode.checked.elapsed()
                );
                return Ok(Known::Found(ino));
            }
            known_object =
                (inode.kind() != Kind::Dir && inode.remote.is_some()).then(|| inode.kind());
        } else if self.change_log().latest(&key).is_none() {
            // A directory listed within the TTL: a name it did not hold is absent, one it
            // held needs no listing again to tell a file from a directory.
            let listing = ns
                .get(parent)
                .filter(|p| self.listed_within_ttl(p))
                .map(|p| p.listed_kinds.as_ref().and_then(|k| k.get(name).copied()));
            if ns.known_absent(parent, name, self.config.trust()) || listing == Some(None) {
                return Ok(Known::Absent);
            }
            listed_as = listed_as.or(listing.flatten());
        }
        Ok(Known::Unsure {
            key,
            known_object,
            listed_as,
        })
    }

    /// [`Self::resolve`] of a name a listing just showed as `listed_as` (a file or a directory),
    /// which spares the store the requests that tell one from the other.
    pub(super) async fn resolve_listed(
        &self,
        parent: u64,
        name: &str,
        listed_as: Option<Kind>,
    ) -> FsResult<Option<u64>> {
        let (key, known_object, listed_as) = match self.resolve_known(parent, name, listed_as)? {
            Known::Found(ino) => return Ok(Some(ino)),
            Known::Absent => return Ok(None),
            Known::Unsure {
                key,
                known_object,
                listed_as,
            } => (key, known_object, listed_as),
        };
        loop {
            let latest = self
                .change_log()
                .latest(&key)
                .map(|e| (e.seq, e.change.clone()));
            let (seq, pending) = latest.map_or((None, None), |(s, c)| (Some(s), Some(c)));
            // Whether the change log moved on while this resolve waited on I/O.
            let moved_on = || self.change_log().latest(&key).map(|e| e.seq) != seq;
            match &pending {
                Some(Change::Delete | Change::DeleteDir) => {
                    let mut ns = self.ns();
                    if let Some(ino) = ns.child(parent, name) {
                        ns.detach(ino);
                    }
                    ns.mark_absent(parent, name);
                    return Ok(None);
                }
                Some(
                    change @ (Change::PutFile { .. }
                    | Change::PutDir { .. }
                    | Change::PutSymlink { .. }
                    | Change::Copy { .. }),
                ) => {
                    let (_, attrs) = change.outcome().expect("puts have an outcome");
                    let size = self.pending_size(change).await;
                    let remote = match change {
                        Change::Copy { etag, size, .. } => Some(Remote {
                            etag: crate::store::ETag(etag.clone()),
                            size: *size,
                        }),
                        _ => None,
                    };
                    let mut ns = self.ns();
                    if moved_on() {
                        continue;
                    }
                    let ino = match ns.child(parent, name) {
                        Some(ino)
                            if ns
                                .get(ino)
                                .is_some_and(|i| i.file.is_some() && i.kind() == attrs.kind()) =>
                        {
                            if let Some(inode) = ns.get_mut(ino) {
                                inode.checked = Instant::now();
                            }
                            ino
                        }
                        _ => ns.upsert(parent, name, attrs, size, remote),
                    };
                    if let (Change::PutSymlink { target, .. }, Some(inode)) =
                        (change, ns.get_mut(ino))
                    {
                        inode.target = Some(target.clone());
                    }
                    tracing::debug!("{key}: pending change {:?} (inode {ino})", seq);
                    return Ok(Some(ino));
                }
                _ => {}
            }
            let mut hint = listed_as.or(known_object);
            if listed_as.is_none() && self.relists(parent) {
                // A name in a directory the mount listed before, not too large: one listing
                // answers for this name and every other there for the TTL (a new name is absent
                // if not listed; a known one is confirmed if listed as it was), where asking per
                // name would take three requests for a new name and one for a known one: an
                // untar, a batch of new files, a `stat` of each file cost a listing per TTL.
                if let Ok((names, listed_at)) = self.entries_of(parent).await {
                    let names = Arc::new(names);
                    let mut ns = self.ns();
                    if let Some(dir) = ns.get_mut(parent) {
                        dir.keep_listing(Arc::clone(&names), listed_at);
                    }
                    if moved_on() {
                        continue;
                    }
                    let child = ns.child(parent, name);
                    if let Some(ino) = child
                        && ns.get(ino).is_some_and(|inode| self.trusted(inode))
                    {
                        tracing::debug!("{key}: known (inode {ino}), found while relisting");
                        return Ok(Some(ino));
                    }
                    match names.get(name) {
                        None if child.is_none() => {
                            ns.mark_absent(parent, name);
                            return Ok(None);
                        }
                        None => {}
                        Some(kind) => hint = Some(*kind),
                    }
                }
            }
            let probed = if self.health.seems_down(&self.store) {
                Err(FsError::Store(store_down()))
            } else {
                let probing = async {
                    // An object the mount knows is looked at again with one HEAD; only if it
                    // is gone does the name take the full probe.
                    match self.probe(&key, hint).await {
                        Ok(None) if listed_as.is_none() && known_object.is_some() => {
                            self.probe(&key, None).await
                        }
                        other => other,
                    }
                };
                let probed = tokio::time::timeout(METADATA_BUDGET, probing)
                    .await
                    .unwrap_or_else(|_| Err(FsError::Store(store_down())));
                self.health
                    .note_reached(!matches!(&probed, Err(err) if timed_out(err)));
                probed
            };
            let found = match probed {
                Ok(found) => found,
                Err(err) if unreachable(&err) => {
                    let ns = self.ns();
                    if let Some(ino) = ns.child(parent, name) {
                        return Ok(Some(ino));
                    }
                    if ns.get(parent).is_some_and(|p| p.listed) {
                        return Ok(None);
                    }
                    return Err(err);
                }
                Err(err) => return Err(err),
            };
            let mut ns = self.ns();
            if moved_on() {
                continue;
            }
            match found {
                Some(found) => {
                    tracing::debug!("{key}: the store has it (hint {hint:?}): {found:?}");
                    let ino = self.install(&mut ns, parent, name, found);
                    if let (Some(Change::SetAttrs { attrs, .. }), Some(inode)) =
                        (&pending, ns.get_mut(ino))
                    {
                        inode.attrs = (*attrs).into();
                    }
                    return Ok(Some(ino));
                }
                None => {
                    if let Some(ino) = ns.child(parent, name) {
                        if ns.get(ino).is_some_and(|i| i.file.is_some()) {
                            return Ok(Some(ino));
                        }
                        ns.detach(ino);
                    }
                    ns.mark_absent(parent, name);
                    return Ok(None);
                }
            }
        }
    }

    /// Whether a miss in `dir` is answered by listing it again rather than by a probe: it was
    /// listed in full before (or made here), and its last listing was small.
    fn relists(&self, dir: u64) -> bool {
        self.ns()
            .get(dir)
            .is_some_and(|d| d.listed && d.listed_names <= RELIST_LIMIT)
    }

    pub(super) async fn existing(&self, parent: u64, name: &str) -> FsResult<u64> {
        self.resolve(parent, name).await?.ok_or(FsError::NotFound)
    }

    pub(super) fn count_lookup(&self, ino: u64) {
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.lookups += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::fs::{Filesystem, FsConfig, store_holding, test_mount};
    use crate::namespace::ROOT;
    use crate::store::faults::FaultyStore;

    use crate::store::{ErrorKind, StoreError, StoreExt};

    /// Makes `name` in `parent` with `body`, and closes it.
    async fn make(
        fs: &Filesystem,
        parent: u64,
        name: &str,
        body: &[u8],
    ) -> crate::error::FsResult<()> {
        let (_, opened) = fs.create(parent, name.as_ref(), 0o644, 0, 0, 0, 0).await?;
        fs.write(opened.fh, 0, body).await?;
        fs.flush(opened.fh).await?;
        fs.release(opened.fh).await
    }

    fn away() -> StoreError {
        StoreError::new(ErrorKind::Unavailable, "the store is away")
    }

    /// The only writer of a folder knows it: once its root is listed, with the store away and
    /// past the metadata TTL, it makes, writes, renames and removes files in the root and in a
    /// directory it made, and the store gets exactly that once it is back. A mount that is not
    /// the only writer has to ask the store about a new name in the root, and fails.
    #[tokio::test]
    async fn the_only_writer_goes_on_with_the_store_away() {
        let memory = store_holding(&[("kept", b"old")]).await;
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        let config = FsConfig {
            only_writer: true,
            metadata_ttl: Duration::from_millis(1),
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let (fs, _cache) = test_mount(faulty.clone(), config.clone());
        fs.start_uploader();
        fs.know_the_root().await.unwrap();
        faulty.fail_next(None, u64::MAX, away());
        tokio::time::sleep(Duration::from_millis(20)).await;

        make(&fs, ROOT, "a", b"first").await.unwrap();
        let dir = fs
            .mkdir(ROOT, "d".as_ref(), 0o755, 0, 0, 0)
            .await
            .unwrap()
            .ino;
        make(&fs, dir, "b", b"second").await.unwrap();
        make(&fs, dir, "gone", b"short-lived").await.unwrap();
        fs.rename(ROOT, "a".as_ref(), dir, "c".as_ref(), false)
            .await
            .unwrap();
        fs.unlink(dir, "gone".as_ref()).await.unwrap();
        assert!(fs.lookup(ROOT, "a".as_ref()).await.is_err(), "renamed away");

        faulty.clear();
        fs.drain(Some(Duration::from_secs(30))).await.unwrap();
        let listed = memory.list_all("", false).await.unwrap();
        let mut keys: Vec<String> = listed.objects.into_iter().map(|o| o.key).collect();
        keys.sort();
        assert_eq!(keys, ["d/", "d/b", "d/c", "kept"]);
        assert_eq!(&memory.get_all("d/c").await.unwrap().1[..], b"first");

        // The same without being the only writer: a new name needs the store.
        let config = FsConfig {
            only_writer: false,
            ..config
        };
        let (other, _cache) = test_mount(faulty.clone(), config);
        other.know_the_root().await.unwrap();
        faulty.fail_next(None, u64::MAX, away());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(make(&other, ROOT, "x", b"x").await.is_err());
    }
}
