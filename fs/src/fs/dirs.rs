//! Directories: what a directory holds as this mount sees it (the store's listing, or a page
//! kept from a listing of a tree above, with the pending changes of the change log applied on
//! top), opendir/readdir/releasedir, and trusting what a listing showed for the TTL.
//!
//! Touches the inode table (children, `listed*` fields), the change log (read only), the
//! listings kept from above, the handles (a directory handle keeps its listing) and the store
//! (list requests, bounded by the metadata budget and skipped while the store seems down).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt, stream};

use super::Filesystem;
use super::handles::Handle;
use super::health::{METADATA_BUDGET, store_down, unreachable};
use super::listings;
use super::names::check_new_name;
use super::reply::DirEntry;
use crate::attrs::Kind;
use crate::error::{FsError, FsResult};
use crate::fs::Inode;
use crate::namespace::ROOT;
use crate::store::{ErrorKind, ListOptions, ListPage, StoreExt};

impl Filesystem {
    /// The names, and kinds, of a directory's entries as this mount sees them: the store's
    /// listing with the pending changes applied. With the store unreachable, the last listing
    /// this mount made (if any) stands in for it.
    pub(super) async fn entries_of(&self, ino: u64) -> FsResult<(HashMap<String, Kind>, Instant)> {
        let (prefix, listed_before) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind() != Kind::Dir {
                return Err(FsError::NotDir);
            }
            (ns.dir_prefix(ino).ok_or(FsError::NotFound)?, inode.listed)
        };
        let mut names: HashMap<String, Kind> = HashMap::new();
        let kept = self.listings().take(&prefix, self.config.trust());
        // `listed_at`: when the listing started; `seen_at`: when what it shows was last seen
        // (a fresh listing's end, a kept page's start).
        let (listed, pending_before, listed_at, seen_at) = match kept {
            Some(kept) => (Ok(kept.page), kept.pending, kept.at, kept.at),
            None => {
                let started = Instant::now();
                // Pending changes as they stand before the listing: one the uploader applies
                // while the listing runs may be missing from both the listing and the log after.
                // (The count of recorded changes is read first: see `Listings::keep`.)
                let (flat, generation) = {
                    let listings = self.listings();
                    (!listings.is_too_big(&prefix), listings.generation())
                };
                let pending_below: Vec<(String, Option<Kind>)> = self
                    .change_log()
                    .below(&prefix)
                    .filter(|e| flat || !e.key[prefix.len()..].contains('/'))
                    .map(|e| (e.key.clone(), e.change.outcome().map(|(kind, _)| kind)))
                    .collect();
                let listed = if self.health.seems_down(&self.store) {
                    Err(store_down())
                } else {
                    let at = (started, generation);
                    let listing = self.list_store(&prefix, at, flat.then_some(&pending_below));
                    let listed = tokio::time::timeout(METADATA_BUDGET, listing)
                        .await
                        .unwrap_or_else(|_| Err(store_down()));
                    self.health.note_reached(
                        !matches!(&listed, Err(err) if err.kind() == ErrorKind::Timeout),
                    );
                    listed
                };
                let pending_before = listings::children_of(&prefix, &pending_below);
                (listed, pending_before, started, Instant::now())
            }
        };
        match listed {
            Ok(listed) => {
                self.confirm_children(ino, &prefix, &listed, seen_at);
                for prefix_entry in &listed.prefixes {
                    let name = prefix_entry[prefix.len()..].trim_end_matches('/');
                    if check_new_name(OsStr::new(name)).is_ok() {
                        names.insert(name.to_string(), Kind::Dir);
                    }
                }
                for object in &listed.objects {
                    let name = &object.key[prefix.len()..];
                    if check_new_name(OsStr::new(name)).is_ok() {
                        // A name that is both a file and a directory shows as the directory.
                        names.entry(name.to_string()).or_insert(Kind::File);
                    }
                }
            }
            Err(err) if listed_before && unreachable(&FsError::Store(err.clone())) => {
                let ns = self.ns();
                for (name, child) in ns.children(ino) {
                    if let Some(inode) = ns.get(child) {
                        names.insert(name.clone(), inode.kind());
                    }
                }
            }
            Err(err) => return Err(err.into()),
        }
        for (name, kind) in pending_before
            .into_iter()
            .chain(self.pending_children(&prefix))
        {
            match kind {
                Some(kind) => {
                    names.insert(name, kind);
                }
                None => {
                    names.remove(&name);
                }
            }
        }
        // Names this mount holds open or changed stay, whatever the listing says.
        let ns = self.ns();
        for (name, child) in ns.children(ino) {
            if let Some(inode) = ns.get(child).filter(|c| c.file.is_some()) {
                names.entry(name.clone()).or_insert(inode.kind());
            }
        }
        Ok((names, listed_at))
    }

    /// Lists the root once, so that the only writer (see [`crate::fs::FsConfig::only_writer`])
    /// knows every name there from the start: a new name in the root is then known to be free
    /// without asking the store, which lets files be made there with the store away. The names
    /// are kept as a lookup's relisting keeps them (no request per name).
    pub async fn know_the_root(&self) -> FsResult<()> {
        let (names, listed_at) = self.entries_of(ROOT).await?;
        if let Some(root) = self.ns().get_mut(ROOT) {
            root.keep_listing(Arc::new(names), listed_at);
        }
        Ok(())
    }

    /// Lists directory `prefix` in the store. With `pending_below` (the changes pending below
    /// it when the listing started, `at` a time and a count of recorded changes), first without
    /// a delimiter: if everything below fits in one page, that listing answers for the
    /// directories inside too. (One page only: s3rver, for one, loses keys across the pages of a
    /// listing without a delimiter, `a.rs` beside a full `a/`.)
    async fn list_store(
        &self,
        prefix: &str,
        at: (Instant, u64),
        pending_below: Option<&Vec<(String, Option<Kind>)>>,
    ) -> crate::store::Result<ListPage> {
        if let Some(pending) = pending_below {
            let page = self.store.list(prefix, ListOptions::default()).await?;
            if page.next.is_none() {
                let keys = page.objects.len();
                let mut pages = listings::split_flat(prefix, page.objects);
                let own = pages.remove(prefix).unwrap_or_default();
                let ttl = self.config.trust();
                let kept = self.listings().keep(at, pages, pending, ttl);
                tracing::debug!("{prefix}: listed flat, {keys} keys, {kept} pages kept");
                return Ok(own);
            }
            tracing::debug!("{prefix}: too much below to list flat");
            self.listings().mark_too_big(prefix);
        }
        self.store.list_all(prefix, true).await
    }

    /// A listing of `dir` made `at` showed these names as the mount knows them (the same
    /// version of a file, a directory as a directory): trust them afresh, so that the lookups
    /// of an `ls -l` or `rm -r` that follows need not ask the store about each name again.
    fn confirm_children(
        &self,
        dir: u64,
        prefix: &str,
        listed: &crate::store::ListPage,
        at: Instant,
    ) {
        let mut ns = self.ns();
        for object in &listed.objects {
            let name = &object.key[prefix.len()..];
            let Some(child) = ns.child(dir, name) else {
                continue;
            };
            if let Some(inode) = ns.get_mut(child)
                && inode.kind() == Kind::File
                && inode
                    .remote
                    .as_ref()
                    .is_some_and(|r| r.etag == object.etag && r.size == object.size)
            {
                inode.checked = inode.checked.max(at);
            }
        }
        for dir_prefix in &listed.prefixes {
            let name = dir_prefix[prefix.len()..].trim_end_matches('/');
            if let Some(child) = ns.child(dir, name)
                && let Some(inode) = ns.get_mut(child)
                && inode.kind() == Kind::Dir
            {
                inode.checked = inode.checked.max(at);
            }
        }
    }

    /// The pending changes of a directory's entries: a name and what it becomes (None: gone).
    pub(super) fn pending_children(&self, prefix: &str) -> Vec<(String, Option<Kind>)> {
        self.change_log()
            .children(prefix)
            .map(|e| {
                (
                    e.key[prefix.len()..].to_string(),
                    e.change.outcome().map(|(kind, _)| kind),
                )
            })
            .collect()
    }

    /// Opens a directory: its first read lists it, and later reads page through that listing.
    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        if self.attr(ino)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(self.handles.open(Handle::Dir { ino, entries: None }))
    }

    /// Whether directory `dir` was listed (or made) within the TTL.
    pub(super) fn listed_within_ttl(&self, dir: &Inode) -> bool {
        dir.listed_at
            .is_some_and(|at| at.elapsed() < self.config.trust())
    }

    /// The names of directory `ino` as this mount holds them, if it listed the directory in
    /// full (or made it) within the TTL: every name since made or removed here is in them.
    pub(super) fn listed_lately(&self, ino: u64) -> Option<HashMap<String, Kind>> {
        let ns = self.ns();
        let dir = ns.get(ino)?;
        let fresh = dir.listed && dir.listed_kinds.is_none() && self.listed_within_ttl(dir);
        fresh.then(|| {
            ns.children(ino)
                .filter_map(|(name, child)| Some((name.clone(), ns.get(child)?.kind())))
                .collect()
        })
    }

    /// The entries of directory `ino`, "." and ".." first: one listing of the store (unless
    /// one made within the TTL still stands), each entry's attributes fetched in parallel.
    async fn list_dir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let lately = self.listed_lately(ino);
        let from_store = lately.is_none();
        // When the listing was made (the store's answer may come from a listing of a
        // directory above, made a moment ago).
        let (names, started) = match lately {
            Some(names) => (names, Instant::now()),
            None => self.entries_of(ino).await?,
        };
        let mut entries: Vec<DirEntry> = stream::iter(names)
            .map(|(name, kind)| async move {
                match self.resolve_listed(ino, &name, Some(kind)).await {
                    Ok(Some(child)) => Some(self.attr(child).map(|attr| DirEntry { name, attr })),
                    Ok(None) => None, // Gone since the listing.
                    Err(err) => Some(Err(err)),
                }
            })
            .buffer_unordered(32)
            .filter_map(|entry| async move { entry })
            .try_collect()
            .await?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        if from_store {
            // Forget children that are no longer there; the listing is now complete.
            let mut ns = self.ns();
            let listed: std::collections::HashSet<&str> =
                entries.iter().map(|e| e.name.as_str()).collect();
            // Only what the mount knew before the listing started: a name made or changed here
            // meanwhile stays.
            let gone: Vec<u64> = ns
                .children(ino)
                .filter(|(name, _)| !listed.contains(name.as_str()))
                .map(|(_, child)| child)
                .filter(|child| {
                    ns.get(*child)
                        .is_some_and(|c| c.file.is_none() && c.checked < started)
                })
                .collect();
            for child in gone {
                ns.detach(child);
            }
            if let Some(inode) = ns.get_mut(ino) {
                inode.listed = true;
                inode.listed_at = Some(started);
                inode.listed_names = entries.len();
                inode.listed_kinds = None;
            }
        }
        let own = self.attr(ino)?;
        let parent_ino = self
            .ns()
            .get(ino)
            .map_or(ROOT, |i| if i.parent == 0 { ROOT } else { i.parent });
        let parent = self.attr(parent_ino).unwrap_or(own);
        let mut all = vec![
            DirEntry {
                name: ".".into(),
                attr: own,
            },
            DirEntry {
                name: "..".into(),
                attr: parent,
            },
        ];
        all.extend(entries);
        Ok(all)
    }

    /// Entries of an open directory from `offset` on (offsets count entries, "." and ".." first).
    pub async fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        let (ino, listed) = match self.handles.lock().get(&fh) {
            Some(Handle::Dir { ino, entries }) => (*ino, entries.clone()),
            _ => return Err(FsError::BadHandle),
        };
        let entries = match listed {
            Some(entries) => entries,
            None => {
                let entries = Arc::new(self.list_dir(ino).await?);
                if let Some(Handle::Dir { entries: kept, .. }) = self.handles.lock().get_mut(&fh) {
                    *kept = Some(Arc::clone(&entries));
                }
                entries
            }
        };
        Ok(entries.iter().skip(offset as usize).cloned().collect())
    }

    /// The kernel took an entry of a `readdirplus` reply as a lookup.
    pub fn took_entry(&self, ino: u64) {
        self.count_lookup(ino);
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.close(fh);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use crate::cache::Cache;
    use crate::error::FsError;
    use crate::fs::{Filesystem, FsConfig, test_mount};

    use crate::namespace::ROOT;
    use crate::store::memory::MemoryStore;
    use crate::store::{PutOptions, Store};

    /// A name another host made shows up once the TTL has passed, even right after a lookup of
    /// another name listed the directory again (that listing installs only the name asked for).
    #[tokio::test]
    async fn a_name_made_elsewhere_is_found_after_a_relist_for_another_name() {
        let store = Arc::new(MemoryStore::new());
        let put = |key: &'static str| {
            let store = store.clone();
            async move {
                store
                    .put(key, Bytes::from_static(b"x"), PutOptions::default())
                    .await
                    .unwrap()
            }
        };
        put("d/a").await;
        let cache_dir = tempfile::tempdir().unwrap();
        let config = FsConfig {
            metadata_ttl: Duration::from_millis(200),
            ..FsConfig::default()
        };
        let fs = Filesystem::new(
            store.clone(),
            Cache::open(cache_dir.path()).unwrap(),
            config,
        )
        .unwrap();
        let dir = fs.lookup(ROOT, "d".as_ref()).await.unwrap();
        let fh = fs.opendir(dir.ino).await.unwrap();
        assert_eq!(fs.readdir(fh, 0).await.unwrap().len(), 3); // ., .. and a
        put("d/b").await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        assert!(matches!(
            fs.lookup(dir.ino, "c".as_ref()).await,
            Err(FsError::NotFound)
        ));
        let found = fs.lookup(dir.ino, "b".as_ref()).await;
        assert!(found.is_ok(), "d/b is in the store: {found:?}");

        // A listing is reused for the TTL only: after it, a new name shows.
        let fh = fs.opendir(dir.ino).await.unwrap();
        assert_eq!(fs.readdir(fh, 0).await.unwrap().len(), 4);
        put("d/c").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fh = fs.opendir(dir.ino).await.unwrap();
        let names: Vec<String> = fs
            .readdir(fh, 0)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, [".", "..", "a", "b", "c"]);
    }

    /// The names of directory `ino`, as a read of it shows them.
    async fn names_in(fs: &Filesystem, ino: u64) -> Vec<String> {
        let fh = fs.opendir(ino).await.unwrap();
        let entries = fs.readdir(fh, 0).await.unwrap();
        fs.releasedir(fh);
        entries.into_iter().skip(2).map(|e| e.name).collect()
    }

    /// Reading a small tree (an `ls -R`, an `rm -rf`) lists the store once: the directories
    /// inside are answered from that listing within the TTL. A directory made inside after the
    /// listing shows, even once its marker is in the store (and so out of the change log).
    #[tokio::test]
    async fn a_small_tree_is_listed_once() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        for key in ["t/a/x", "t/a/y", "t/b/z", "t/b/c/w", "t/top"] {
            let body = Bytes::from_static(b"x");
            memory.put(key, body, PutOptions::default()).await.unwrap();
        }
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        let config = FsConfig {
            metadata_ttl: Duration::from_secs(60),
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let (fs, _cache) = test_mount(faulty.clone(), config);
        fs.start_uploader();
        let tree = fs.lookup(ROOT, "t".as_ref()).await.unwrap().ino;
        assert_eq!(names_in(&fs, tree).await, ["a", "b", "top"]);
        let lists = faulty.calls(Op::List);
        let (a, b) = (
            fs.lookup(tree, "a".as_ref()).await.unwrap().ino,
            fs.lookup(tree, "b".as_ref()).await.unwrap().ino,
        );
        assert_eq!(names_in(&fs, b).await, ["c", "z"]);
        let c = fs.lookup(b, "c".as_ref()).await.unwrap().ino;
        assert_eq!(names_in(&fs, c).await, ["w"]);
        assert_eq!(
            faulty.calls(Op::List),
            lists,
            "inner directories listed again"
        );

        fs.mkdir(a, "new".as_ref(), 0o755, 0o022, 0, 0)
            .await
            .unwrap();
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();
        assert!(
            memory.head("t/a/new/").await.is_ok(),
            "the marker is in the store"
        );
        assert_eq!(names_in(&fs, a).await, ["new", "x", "y"]);
    }

    /// A listing slower than the TTL still confirms the names it shows (as of its end): an
    /// `ls -l` of a big directory on a slow store does not ask about each name again.
    #[tokio::test]
    async fn a_listing_slower_than_the_ttl_confirms_what_it_shows() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        for n in 0..5 {
            let body = Bytes::from_static(b"x");
            memory
                .put(&format!("d/f{n}"), body, PutOptions::default())
                .await
                .unwrap();
        }
        let faulty = Arc::new(FaultyStore::new(memory));
        let ttl = Duration::from_millis(300);
        let config = FsConfig {
            metadata_ttl: ttl,
            ..FsConfig::default()
        };
        let (fs, _cache) = test_mount(faulty.clone(), config);
        let dir = fs.lookup(ROOT, "d".as_ref()).await.unwrap().ino;
        assert_eq!(names_in(&fs, dir).await.len(), 5);
        faulty.add_latency(Some(Op::List), ttl * 2);
        tokio::time::sleep(ttl).await;
        let heads = faulty.calls(Op::Head);
        assert_eq!(names_in(&fs, dir).await.len(), 5);
        assert_eq!(faulty.calls(Op::Head), heads, "names asked about again");
    }
}
