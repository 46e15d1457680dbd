//! Metadata operations: lookup, getattr, setattr (attributes, and the size through `write`'s
//! truncate), readlink, forget, statfs. New attributes are logged as a `SetAttrs` change, or
//! ride with a pending upload of the same file.

use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::Filesystem;
use super::lookup::Known;
use super::names::{NAME_MAX, check_name};
use super::reply::{Attr, SetAttrs, Statfs};
use crate::attrs::Kind;
use crate::error::{FsError, FsResult};
use crate::journal::{Change, StoredAttrs};
use crate::namespace::ROOT;
use crate::store::StoreExt;

impl Filesystem {
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = check_name(name)?;
        if name.chars().any(|c| c.is_ascii_control()) {
            // A name cairn never stores is never asked of the store either.
            return Err(FsError::NotFound);
        }
        let ino = self.existing(parent, &name).await?;
        self.count_lookup(ino);
        self.note_direct_writes_to(ino).await?;
        self.attr(ino)
    }

    /// A lookup answered on the spot, with no task and no blocking thread, where what the mount
    /// knows decides it (a trusted name, or one known absent) and no direct writer may have
    /// changed the file's size. `None`: ask [`Filesystem::lookup`].
    pub fn lookup_at_once(&self, parent: u64, name: &OsStr) -> Option<FsResult<Attr>> {
        let name = match check_name(name) {
            Ok(name) => name,
            Err(err) => return Some(Err(err)),
        };
        if name.chars().any(|c| c.is_ascii_control()) {
            return Some(Err(FsError::NotFound));
        }
        match self.resolve_known(parent, &name, None) {
            Err(err) => Some(Err(err)),
            Ok(Known::Absent) => Some(Err(FsError::NotFound)),
            Ok(Known::Unsure { .. }) => None,
            Ok(Known::Found(ino)) => {
                let attr = self.getattr_at_once(ino)?;
                self.count_lookup(ino);
                Some(attr)
            }
        }
    }

    /// A getattr answered on the spot, where the mount may answer it without I/O: the inode is
    /// trusted (or no longer in the tree), and not written by the kernel directly (whose size
    /// the mount learns by looking at the cache file). `None`: ask [`Filesystem::getattr`].
    pub fn getattr_at_once(&self, ino: u64) -> Option<FsResult<Attr>> {
        let ns = self.ns();
        let Some(inode) = ns.get(ino) else {
            return Some(Err(FsError::NotFound));
        };
        let written = inode
            .file
            .as_ref()
            .is_some_and(|data| data.direct_writers.load(Ordering::Acquire) > 0);
        let known = self.trusted(inode) || !ns.attached(ino);
        (known && !written).then(|| Ok(Self::attr_of(inode)))
    }

    pub fn forget(&self, ino: u64, count: u64) {
        self.ns().forget(ino, count);
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.note_direct_writes_to(ino).await?;
        let (parent, name) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if self.trusted(inode) || !ns.attached(ino) {
                return Ok(Self::attr_of(inode));
            }
            (inode.parent, inode.name.clone())
        };
        match self.resolve(parent, &name).await? {
            Some(found) if found == ino => self.attr(ino),
            _ => Err(FsError::NotFound),
        }
    }

    pub async fn setattr(&self, ino: u64, changes: SetAttrs) -> FsResult<Attr> {
        self.writable()?;
        let kind = self.attr(ino)?.kind;
        if let Some(size) = changes.size {
            if kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            self.truncate(ino, size).await?;
        }
        let attrs_changed = changes.mode.is_some()
            || changes.uid.is_some()
            || changes.gid.is_some()
            || changes.mtime.is_some()
            || changes.atime.is_some();
        if attrs_changed {
            let mut ns = self.ns();
            let inode = ns.get_mut(ino).ok_or(FsError::NotFound)?;
            if let Some(mode) = changes.mode {
                inode.attrs.mode = (inode.attrs.mode & crate::attrs::S_IFMT) | (mode & 0o7777);
            }
            inode.attrs.uid = changes.uid.unwrap_or(inode.attrs.uid);
            inode.attrs.gid = changes.gid.unwrap_or(inode.attrs.gid);
            inode.attrs.mtime = changes.mtime.unwrap_or(inode.attrs.mtime);
            inode.attrs.atime = changes.atime.or(inode.attrs.atime);
            inode.ctime = SystemTime::now();
        }
        if attrs_changed || changes.size.is_some() {
            self.persist_attrs(ino, kind, changes.size.is_some())
                .await?;
        }
        self.attr(ino)
    }

    /// Records an inode's new attributes (and, for a file truncated while no one has it open,
    /// its new contents) in the change log.
    pub(super) async fn persist_attrs(&self, ino: u64, kind: Kind, resized: bool) -> FsResult<()> {
        let data = self.loaded_file(ino);
        if let Some(data) = &data
            && resized
            && data.opens.load(Ordering::Acquire) == 0
        {
            self.queue_upload(data, true).await?;
            return Ok(());
        }
        // New attributes of a changed file go with its contents when it is closed.
        let dirty = match &data {
            Some(data) => data.content.lock().await.dirty(),
            None => false,
        };
        let _naming = self.naming.read().await;
        let (key, attrs, in_store) = {
            let ns = self.ns();
            if !ns.attached(ino) || ino == ROOT {
                return Ok(()); // Removed meanwhile; the root has no object of its own.
            }
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            (
                ns.key(ino).unwrap_or_default(),
                inode.attrs,
                inode.remote.is_some(),
            )
        };
        let stored = StoredAttrs::from(attrs);
        let update_key = key.clone();
        if self
            .update_change_log(move |j| j.update_attrs(&update_key, stored))
            .await?
            || dirty
        {
            return Ok(());
        }
        let change = Change::SetAttrs {
            kind: kind.into(),
            attrs: stored,
        };
        self.log_change(&key, change, in_store, true).await?;
        Ok(())
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<String> {
        let key = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind() != Kind::Symlink {
                return Err(FsError::Invalid("not a symbolic link".into()));
            }
            if let Some(target) = &inode.target {
                return Ok(target.clone());
            }
            ns.key(ino).ok_or(FsError::NotFound)?
        };
        if let Some(Change::PutSymlink { target, .. }) =
            self.change_log().latest(&key).map(|e| &e.change)
        {
            return Ok(target.clone());
        }
        let (_, body) = self.store.get_all(&self.fetch_key(&key)).await?;
        let target = String::from_utf8(body.to_vec())
            .map_err(|_| FsError::Invalid("the link target is not UTF-8".into()))?;
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.target = Some(target.clone());
        }
        Ok(target)
    }

    pub fn statfs(&self) -> Statfs {
        Statfs {
            blocks: 1 << 40,
            free: 1 << 40,
            files: 1 << 30,
            free_files: 1 << 30,
            block_size: 4096,
            name_max: NAME_MAX as u32,
        }
    }
}

#[cfg(test)]
mod tests {

    use crate::error::FsError;
    use crate::fs::{FsConfig, store_holding, test_mount};
    use crate::namespace::ROOT;

    /// Names made here, and names a directory made here does not hold, are answered on the
    /// spot; a name the mount has never seen waits for the store.
    #[tokio::test]
    async fn lookups_known_here_are_answered_at_once_and_others_go_to_the_store() {
        let store = store_holding(&[("elsewhere", b"stored")]).await;
        let (fs, _cache) = test_mount(store, FsConfig::default());
        let dir = fs.mkdir(ROOT, "d".as_ref(), 0o755, 0, 0, 0).await.unwrap();
        let (made, opened) = fs
            .create(dir.ino, "f".as_ref(), 0o644, 0, 0, 0, 0)
            .await
            .unwrap();
        fs.release(opened.fh).await.unwrap();

        let found = fs.lookup_at_once(dir.ino, "f".as_ref()).expect("made here");
        assert_eq!(found.unwrap().ino, made.ino);
        let absent = fs
            .lookup_at_once(dir.ino, "nothing".as_ref())
            .expect("made here, empty");
        assert!(matches!(absent, Err(FsError::NotFound)));
        assert_eq!(fs.getattr_at_once(made.ino).unwrap().unwrap(), made);
        assert!(
            fs.lookup_at_once(ROOT, "elsewhere".as_ref()).is_none(),
            "the root was never listed: the store must be asked"
        );
        assert_eq!(fs.lookup(ROOT, "elsewhere".as_ref()).await.unwrap().size, 6);
    }
}
