//! Operations that add or remove a name: create, mkdir, symlink, mknod, unlink, rmdir (and
//! link, which is refused). Each applies to the inode table first and then logs its change, so
//! the uploader always finds the inode the change is about.
//!
//! Touches the inode table, the change log (through `log_change`, under the naming lock for
//! removals), a file's contents (an unlinked file still open keeps its bytes) and the cache
//! index (the name's cached data goes, unless a pending upload still needs it).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use super::direct::OpenIntent;
use super::names::{check_name, check_new_name};
use super::reply::{Attr, Opened};
use super::{Filesystem, blocking};
use crate::attrs::{Attrs, Kind, S_IFREG};
use crate::error::{FsError, FsResult};
use crate::journal::Change;

/// The type of a file mknod makes, and a device node's number.
#[derive(Debug, Clone, Copy)]
struct Special {
    file_type: u32,
    rdev: u32,
}

impl Filesystem {
    /// Fails with EEXIST if `name` exists in `parent`; returns the new entry's key.
    async fn vacant(&self, parent: u64, name: &str) -> FsResult<String> {
        if self.resolve(parent, name).await?.is_some() {
            return Err(FsError::Exists);
        }
        Self::child_key(&self.ns(), parent, name)
    }

    fn new_attrs(kind: Kind, mode: u32, umask: u32, uid: u32, gid: u32) -> Attrs {
        Attrs {
            mode: kind.type_bits() | (mode & !umask & 0o7777),
            uid,
            gid,
            mtime: SystemTime::now(),
            atime: None,
            rdev: 0,
        }
    }

    pub async fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.writable()?;
        let name = check_new_name(name)?;
        let key = self.vacant(parent, &name).await?;
        let attrs = Self::new_attrs(Kind::Dir, mode, umask, uid, gid);
        let change = Change::PutDir {
            attrs: attrs.into(),
        };
        let ino = self
            .add_entry(parent, &name, &key, attrs, 0, change)
            .await?;
        if let Some(inode) = self.ns().get_mut(ino) {
            // New and empty: its listing is known.
            inode.listed = true;
            inode.listed_at = Some(Instant::now());
            inode.listed_kinds = None;
        }
        self.count_lookup(ino);
        self.attr(ino)
    }

    /// Adds a new name to the tree, then records its creation: in that order, so that the
    /// uploader always finds the inode to tell what the store now holds.
    async fn add_entry(
        &self,
        parent: u64,
        name: &str,
        key: &str,
        attrs: Attrs,
        size: u64,
        change: Change,
    ) -> FsResult<u64> {
        let ino = self.ns().upsert(parent, name, attrs, size, None);
        if let Err(err) = self.log_change(key, change, false, true).await {
            self.ns().detach(ino);
            return Err(err);
        }
        Ok(ino)
    }

    pub async fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.writable()?;
        let name = check_new_name(name)?;
        let target = std::str::from_utf8(target.as_bytes())
            .map_err(|_| FsError::Invalid("link targets must be valid UTF-8".into()))?
            .to_string();
        let key = self.vacant(parent, &name).await?;
        let attrs = Self::new_attrs(Kind::Symlink, 0o777, 0, uid, gid);
        let change = Change::PutSymlink {
            target: target.clone(),
            attrs: attrs.into(),
        };
        let ino = self
            .add_entry(parent, &name, &key, attrs, target.len() as u64, change)
            .await?;
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.target = Some(target);
        }
        self.count_lookup(ino);
        self.attr(ino)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> FsResult<(Attr, Opened)> {
        let plain = Special {
            file_type: S_IFREG,
            rdev: 0,
        };
        self.create_node(parent, name, (mode, umask), flags, (uid, gid), plain)
            .await
    }

    /// [`Self::create`] of a file of type `special` (a regular file, or a special one made by
    /// mknod: its type is in its attributes from its first record in the change log).
    async fn create_node(
        &self,
        parent: u64,
        name: &OsStr,
        (mode, umask): (u32, u32),
        flags: i32,
        (uid, gid): (u32, u32),
        special: Special,
    ) -> FsResult<(Attr, Opened)> {
        self.writable()?;
        let name = check_new_name(name)?;
        if let Some(existing) = self.resolve(parent, &name).await? {
            if flags & libc::O_EXCL != 0 {
                return Err(FsError::Exists);
            }
            if self.attr(existing)?.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            let opened = self.open(existing, flags).await?;
            self.count_lookup(existing);
            return Ok((self.attr(existing)?, opened));
        }
        let key = Self::child_key(&self.ns(), parent, &name)?;
        let mut attrs = Self::new_attrs(Kind::File, mode, umask, uid, gid);
        attrs.mode = special.file_type | attrs.perm();
        attrs.rdev = special.rdev;
        let ino = self.ns().upsert(parent, &name, attrs, 0, None);
        let data = self.new_file_data(ino).await?;
        data.opens.fetch_add(1, Ordering::AcqRel);
        let cache_file = data.content.lock().await.cache_name().to_string();
        let change = Change::PutFile {
            cache_file,
            attrs: attrs.into(),
        };
        if let Err(err) = self.log_change(&key, change, false, true).await {
            self.ns().detach(ino);
            return Err(err);
        }
        self.count_lookup(ino);
        let fh = self.new_handle(ino);
        let open = OpenIntent::of_writer(flags, true);
        let direct = match self.choose_route(fh, &data, open).await {
            Ok(direct) => direct,
            Err(err) => {
                self.release(fh).await.ok();
                return Err(err);
            }
        };
        Ok((
            self.attr(ino)?,
            Opened {
                fh,
                keep_cache: false,
                direct,
            },
        ))
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.writable()?;
        let name = check_name(name)?;
        let ino = self.existing(parent, &name).await?;
        let (key, data, in_store) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind() == Kind::Dir {
                return Err(FsError::IsDir);
            }
            (
                ns.key(ino).ok_or(FsError::NotFound)?,
                inode.file.clone(),
                inode.remote.is_some(),
            )
        };
        if let Some(data) = &data
            && data.opens.load(Ordering::Acquire) > 0
        {
            // Still open somewhere: keep every byte locally, if the store can still give them.
            let mut content = data.content.lock().await;
            let size = data.size.load(Ordering::Acquire);
            if content.is_partial() {
                self.make_whole(&key, &mut content, size).await?;
            } else {
                let _ = self.materialize(&key, &mut content, size).await;
            }
            content.cut_from_store();
        }
        {
            let _naming = self.naming.write().await;
            self.log_change(&key, Change::Delete, in_store, true)
                .await?;
            // Gone, as this mount knows: a new file of this name needs no probe within the TTL.
            let mut ns = self.ns();
            ns.detach(ino);
            ns.mark_absent(parent, &name);
        }
        let (cache, journal) = (self.cache.clone(), Arc::clone(&self.journal));
        let keep = data
            .as_ref()
            .is_some_and(|d| d.opens.load(Ordering::Acquire) > 0);
        blocking(move || match cache.lookup(&key)? {
            Some(cached)
                if !keep
                    && !journal
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .uploads_cache_file(&cached.file) =>
            {
                cache.remove(&key)
            }
            _ => cache.forget(&key),
        })
        .await?;
        if let Some(data) = data
            && !keep
        {
            if let Some(inode) = self.ns().get_mut(ino) {
                inode.file = None; // Unlinked and closed: its contents go.
            }
            self.drop_cache_file_if_unused(&data).await;
        }
        Ok(())
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.writable()?;
        let name = check_name(name)?;
        let ino = self.existing(parent, &name).await?;
        let (key, in_store) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind() != Kind::Dir {
                return Err(FsError::NotDir);
            }
            (
                ns.key(ino).ok_or(FsError::NotFound)?,
                inode.remote.is_some(),
            )
        };
        // A listing made within the TTL (as `rm -r` makes before it removes the entries) that
        // every name has since left here: empty, as far as lookups would tell.
        let empty = match self.listed_lately(ino) {
            Some(names) if names.is_empty() => self
                .pending_children(&format!("{key}/"))
                .iter()
                .all(|(_, kind)| kind.is_none()),
            _ => self.entries_of(ino).await?.0.is_empty(),
        };
        if !empty {
            return Err(FsError::NotEmpty);
        }
        self.log_change(&key, Change::DeleteDir, in_store, false)
            .await?;
        let mut ns = self.ns();
        ns.detach(ino);
        ns.mark_absent(parent, &name);
        Ok(())
    }

    /// Hard links cannot be stored as objects.
    pub fn link(&self) -> FsResult<Attr> {
        Err(FsError::NotSupported("hard links"))
    }

    /// Regular files may be made with mknod; device files, FIFOs and sockets cannot be stored.
    /// mknod: a regular file, or a special one (a FIFO, a unix socket's name, a device node),
    /// which is an empty file whose mode carries its type (and `rdev` its device number), as
    /// s3fs keeps them. The kernel does the rest: opening a FIFO or connecting to a socket never
    /// reaches the mount, and device nodes do not open on a `nodev` mount.
    pub async fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        (uid, gid): (u32, u32),
        rdev: u32,
    ) -> FsResult<Attr> {
        let file_type = mode & crate::attrs::S_IFMT;
        if ![
            S_IFREG,
            libc::S_IFIFO,
            libc::S_IFSOCK,
            libc::S_IFCHR,
            libc::S_IFBLK,
        ]
        .contains(&file_type)
        {
            return Err(FsError::Invalid(format!(
                "mknod of file type {file_type:o}"
            )));
        }
        let special = Special { file_type, rdev };
        let flags = libc::O_EXCL | libc::O_WRONLY;
        let (attr, opened) = self
            .create_node(parent, name, (mode, umask), flags, (uid, gid), special)
            .await?;
        self.release(opened.fh).await?;
        Ok(attr)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::fs::{FsConfig, test_mount};
    use crate::journal::Change;
    use crate::namespace::ROOT;
    use crate::store::memory::MemoryStore;

    /// A FIFO's type is in its very first record in the change log, so an upload that starts
    /// at once (no write-back delay) cannot put it as a regular file.
    #[tokio::test]
    async fn a_special_file_is_recorded_with_its_type_from_the_start() {
        let (fs, _cache) = test_mount(Arc::new(MemoryStore::new()), FsConfig::default());
        let mode = libc::S_IFIFO | 0o640;
        let attr = fs
            .mknod(ROOT, "fifo".as_ref(), mode, 0o022, (0, 0), 0)
            .await
            .unwrap();
        assert_eq!(attr.file_type, libc::S_IFIFO);
        match fs.change_log().latest("fifo").map(|e| e.change.clone()) {
            Some(Change::PutFile { attrs, .. }) => assert_eq!(attrs.mode, mode),
            other => panic!("recorded {other:?}"),
        }
    }
}
