//! The FUSE adapter: each kernel request becomes a task on the tokio runtime that calls the
//! async filesystem logic and answers the kernel with its result or its errno. Nothing here
//! decides behaviour; FUSE threads never wait on the store.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{Instrument, debug_span};

use crate::attrs::Kind;
use crate::error::{FsError, FsResult};
use crate::fs::{Attr, Filesystem, Opened, SetAttrs};

/// The FUSE face of a [`Filesystem`].
#[derive(Debug)]
pub struct FuseAdapter {
    fs: Arc<Filesystem>,
    runtime: tokio::runtime::Handle,
    backings: Arc<Mutex<Backings>>,
}

/// The kernel's references to cache files of handles that go direct (passthrough): one per
/// file, shared by its direct handles (the kernel requires the same one for all of them), and
/// given back when the last of them is released.
#[derive(Debug, Default)]
struct Backings {
    by_handle: HashMap<u64, Arc<BackingId>>,
    by_inode: HashMap<u64, Weak<BackingId>>,
}

impl Backings {
    /// The reference for direct handle `fh` of file `ino`: the file's live one, else a new one
    /// from `register`.
    fn get_or_register(
        &mut self,
        ino: u64,
        fh: u64,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let backing = match self.by_inode.get(&ino).and_then(Weak::upgrade) {
            Some(live) => live,
            None => {
                self.by_inode.retain(|_, weak| weak.strong_count() > 0);
                let made = Arc::new(register()?);
                self.by_inode.insert(ino, Arc::downgrade(&made));
                made
            }
        };
        self.by_handle.insert(fh, Arc::clone(&backing));
        Ok(backing)
    }
}

/// The kernel's reference to the cache file of `opened`, a new handle of file `ino`, taken
/// with `register`: None when the handle is not direct, or when the kernel refused (a warning;
/// the handle, and every later open, then go through the mount).
async fn direct_backing(
    fs: &Filesystem,
    backings: &Mutex<Backings>,
    ino: u64,
    opened: &Opened,
    register: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
) -> Option<Arc<BackingId>> {
    let file = opened.direct.as_ref()?;
    let registered = backings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_register(ino, opened.fh, || register(file));
    match registered {
        Ok(backing) => {
            tracing::debug!(ino, fh = opened.fh, ?backing, "direct open");
            Some(backing)
        }
        Err(err) => {
            tracing::warn!(
                "the kernel would not read and write cache files itself ({err}); \
                 file data goes through the mount from now on"
            );
            fs.route_refused(opened.fh).await;
            None
        }
    }
}

impl FuseAdapter {
    pub fn new(fs: Arc<Filesystem>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            fs,
            runtime,
            backings: Arc::default(),
        }
    }

    fn ttl(&self) -> Duration {
        self.fs.config().metadata_ttl
    }

    /// Runs `work` on the runtime, in a span named after the request, and counts it.
    fn spawn<F>(&self, name: &'static str, work: impl FnOnce(Arc<Filesystem>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let future = work(Arc::clone(&self.fs));
        let metrics = Arc::clone(self.fs.metrics());
        let started = Instant::now();
        let timed = async move {
            future.await;
            metrics.fuse_operation(name, started.elapsed());
        };
        self.runtime
            .spawn(timed.instrument(debug_span!("fuse", op = name)));
    }
}

fn errno(err: &FsError) -> Errno {
    if matches!(err, FsError::Store(_) | FsError::Io(_) | FsError::Index(_)) {
        tracing::warn!("{err}");
    }
    Errno::from_i32(err.errno())
}

fn answer_empty(reply: ReplyEmpty, result: FsResult<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(err) => reply.error(errno(&err)),
    }
}

fn answer_entry(reply: ReplyEntry, ttl: &Duration, result: FsResult<Attr>) {
    match result {
        Ok(attr) => reply.entry(ttl, &file_attr(&attr), Generation(0)),
        Err(err) => reply.error(errno(&err)),
    }
}

fn answer_attr(reply: ReplyAttr, ttl: &Duration, result: FsResult<Attr>) {
    match result {
        Ok(attr) => reply.attr(ttl, &file_attr(&attr)),
        Err(err) => reply.error(errno(&err)),
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    let kind = match (attr.file_type, attr.kind) {
        (libc::S_IFIFO, _) => FileType::NamedPipe,
        (libc::S_IFSOCK, _) => FileType::Socket,
        (libc::S_IFCHR, _) => FileType::CharDevice,
        (libc::S_IFBLK, _) => FileType::BlockDevice,
        (_, Kind::File) => FileType::RegularFile,
        (_, Kind::Dir) => FileType::Directory,
        (_, Kind::Symlink) => FileType::Symlink,
    };
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.atime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.ctime,
        kind,
        perm: attr.perm as u16,
        nlink: if attr.kind == Kind::Dir { 2 } else { 1 },
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: 128 * 1024,
        flags: 0,
    }
}

fn time(value: TimeOrNow) -> SystemTime {
    match value {
        TimeOrNow::SpecificTime(at) => at,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn open_flags(keep_cache: bool) -> FopenFlags {
    if keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Ask for readdirplus so that `ls -l` needs no lookup per entry; older kernels say no.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        // O_TRUNC comes with the open (not as a separate truncate after it), so that an open
        // that truncates a file may go direct (see `Filesystem::open`).
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        let _ = config.set_max_readahead(1 << 20);
        // Passthrough (Linux 6.9+): with a stacking depth of 1 the cache directory must not be
        // on a stacked filesystem (overlayfs), and cairn's mount may be below one.
        if self.fs.config().passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.fs.allow_passthrough();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (started, ttl) = (Instant::now(), self.ttl());
        if let Some(answer) = self.fs.lookup_at_once(parent.0, name) {
            answer_entry(reply, &ttl, answer);
            self.fs
                .metrics()
                .fuse_operation("lookup", started.elapsed());
            return;
        }
        let name = name.to_owned();
        self.spawn("lookup", move |fs| async move {
            answer_entry(reply, &ttl, fs.lookup(parent.0, &name).await)
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (started, ttl) = (Instant::now(), self.ttl());
        if let Some(answer) = self.fs.getattr_at_once(ino.0) {
            answer_attr(reply, &ttl, answer);
            self.fs
                .metrics()
                .fuse_operation("getattr", started.elapsed());
            return;
        }
        self.spawn("getattr", move |fs| async move {
            answer_attr(reply, &ttl, fs.getattr(ino.0).await)
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = SetAttrs {
            mode,
            uid,
            gid,
            size,
            mtime: mtime.map(time),
            atime: atime.map(time),
        };
        let ttl = self.ttl();
        self.spawn("setattr", move |fs| async move {
            answer_attr(reply, &ttl, fs.setattr(ino.0, changes).await)
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn("readlink", move |fs| async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(target.as_bytes()),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (name, ttl, uid, gid) = (name.to_owned(), self.ttl(), req.uid(), req.gid());
        self.spawn("mknod", move |fs| async move {
            answer_entry(
                reply,
                &ttl,
                fs.mknod(parent.0, &name, mode, umask, (uid, gid), rdev)
                    .await,
            )
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (name, ttl, uid, gid) = (name.to_owned(), self.ttl(), req.uid(), req.gid());
        self.spawn("mkdir", move |fs| async move {
            answer_entry(
                reply,
                &ttl,
                fs.mkdir(parent.0, &name, mode, umask, uid, gid).await,
            )
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn("unlink", move |fs| async move {
            answer_empty(reply, fs.unlink(parent.0, &name).await)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn("rmdir", move |fs| async move {
            answer_empty(reply, fs.rmdir(parent.0, &name).await)
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = (link_name.to_owned(), target.as_os_str().to_owned());
        let (ttl, uid, gid) = (self.ttl(), req.uid(), req.gid());
        self.spawn("symlink", move |fs| async move {
            answer_entry(
                reply,
                &ttl,
                fs.symlink(parent.0, &name, &target, uid, gid).await,
            )
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.spawn("rename", move |fs| async move {
            match fs
                .rename(parent.0, &name, newparent.0, &newname, no_replace)
                .await
            {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.fs.link() {
            Ok(attr) => reply.entry(&self.ttl(), &file_attr(&attr), Generation(0)),
            Err(err) => reply.error(errno(&err)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let backings = Arc::clone(&self.backings);
        self.spawn("open", move |fs| async move {
            let opened = match fs.open(ino.0, flags.0).await {
                Ok(opened) => opened,
                Err(err) => return reply.error(errno(&err)),
            };
            let fh = FileHandle(opened.fh);
            let register = |file: &std::fs::File| reply.open_backing(file);
            match direct_backing(&fs, &backings, ino.0, &opened, register).await {
                // The kernel refuses a direct open asked to keep its page cache (which plays
                // no part in it).
                Some(backing) => reply.opened_passthrough(fh, FopenFlags::empty(), &backing),
                None => reply.opened(fh, open_flags(opened.keep_cache)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let started = Instant::now();
        if let Some(bytes) = self.fs.read_at_once(fh.0, offset, size) {
            reply.data(&bytes);
            self.fs.metrics().fuse_operation("read", started.elapsed());
            return;
        }
        self.spawn("read", move |fs| async move {
            match fs.read(fh.0, offset, size).await {
                Ok(bytes) => reply.data(&bytes),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.spawn("write", move |fs| async move {
            match fs.write_owned(fh.0, offset, data).await {
                Ok(written) => reply.written(written),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let started = Instant::now();
        if let Some(answer) = self.fs.flush_at_once(fh.0) {
            answer_empty(reply, answer);
            self.fs.metrics().fuse_operation("flush", started.elapsed());
            return;
        }
        self.spawn("flush", move |fs| async move {
            answer_empty(reply, fs.flush(fh.0).await)
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The kernel has let go of the file: its cache file reference goes with the last handle.
        let mut backings = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        backings.by_handle.remove(&fh.0);
        drop(backings);
        let started = Instant::now();
        if let Some(answer) = self.fs.release_at_once(fh.0) {
            answer_empty(reply, answer);
            self.fs
                .metrics()
                .fuse_operation("release", started.elapsed());
            return;
        }
        self.spawn("release", move |fs| async move {
            answer_empty(reply, fs.release(fh.0).await)
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("fsync", move |fs| async move {
            answer_empty(reply, fs.fsync(fh.0).await)
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn("opendir", move |fs| async move {
            match fs.opendir(ino.0).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn("readdir", move |fs| async move {
            match fs.readdir(fh.0, offset).await {
                Ok(entries) => {
                    for (i, entry) in entries.iter().enumerate() {
                        let kind = file_attr(&entry.attr).kind;
                        if reply.add(
                            INodeNo(entry.attr.ino),
                            offset + i as u64 + 1,
                            kind,
                            &entry.name,
                        ) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl();
        self.spawn("readdirplus", move |fs| async move {
            match fs.readdir(fh.0, offset).await {
                Ok(entries) => {
                    for (i, entry) in entries.iter().enumerate() {
                        let attr = file_attr(&entry.attr);
                        let next = offset + i as u64 + 1;
                        if reply.add(
                            INodeNo(entry.attr.ino),
                            next,
                            &entry.name,
                            &ttl,
                            &attr,
                            Generation(0),
                        ) {
                            break;
                        }
                        if entry.name != "." && entry.name != ".." {
                            fs.took_entry(entry.attr.ino);
                        }
                    }
                    reply.ok();
                }
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("fsyncdir", move |fs| async move {
            answer_empty(reply, fs.fsyncdir(ino.0).await)
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks,
            s.free,
            s.free,
            s.files,
            s.free_files,
            s.block_size,
            s.name_max,
            s.block_size,
        );
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // Extended attributes are not stored; every lookup finds none.
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::from_i32(libc::EOPNOTSUPP));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // No device controls: what a terminal check (TCGETS, as in Python's open()) expects to
        // hear from a plain file, without a warning in the log for each.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // With default_permissions the kernel checks mode bits itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, ttl, uid, gid) = (name.to_owned(), self.ttl(), req.uid(), req.gid());
        let backings = Arc::clone(&self.backings);
        self.spawn("create", move |fs| async move {
            let (attr, opened) = match fs
                .create(parent.0, &name, mode, umask, flags, uid, gid)
                .await
            {
                Ok(created) => created,
                Err(err) => return reply.error(errno(&err)),
            };
            let (attr, fh, generation) = (file_attr(&attr), FileHandle(opened.fh), Generation(0));
            let register = |file: &std::fs::File| reply.open_backing(file);
            match direct_backing(&fs, &backings, attr.ino.0, &opened, register).await {
                Some(backing) => {
                    let flags = FopenFlags::empty();
                    reply.created_passthrough(&ttl, &attr, generation, fh, flags, &backing);
                }
                None => {
                    let flags = open_flags(opened.keep_cache);
                    reply.created(&ttl, &attr, generation, fh, flags);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::store::{ErrorKind, StoreError};

    fn attr(kind: Kind, size: u64) -> Attr {
        Attr {
            ino: 42,
            kind,
            size,
            perm: 0o640,
            file_type: kind.type_bits(),
            rdev: 0,
            uid: 1000,
            gid: 100,
            mtime: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            atime: UNIX_EPOCH + Duration::from_secs(1_600_000_000),
            ctime: UNIX_EPOCH + Duration::from_secs(1_700_000_100),
        }
    }

    /// What `stat` shows of each kind: its type, the permission bits, sizes in 512-byte blocks,
    /// two links for a directory, and the atime as the filesystem keeps it.
    #[test]
    fn attributes_reach_the_kernel_as_stat_shows_them() {
        let file = file_attr(&attr(Kind::File, 1025));
        assert_eq!(file.kind, FileType::RegularFile);
        assert_eq!((file.ino, file.size, file.blocks), (INodeNo(42), 1025, 3));
        assert_eq!(
            (file.perm, file.uid, file.gid, file.nlink),
            (0o640, 1000, 100, 1)
        );
        assert_eq!(file.atime, attr(Kind::File, 0).atime);
        assert_eq!(file.ctime, attr(Kind::File, 0).ctime);
        let dir = file_attr(&attr(Kind::Dir, 0));
        assert_eq!(
            (dir.kind, dir.nlink, dir.blocks),
            (FileType::Directory, 2, 0)
        );
        assert_eq!(file_attr(&attr(Kind::Symlink, 7)).kind, FileType::Symlink);
    }

    #[test]
    fn keep_cache_is_the_only_open_flag_set() {
        assert_eq!(open_flags(true), FopenFlags::FOPEN_KEEP_CACHE);
        assert_eq!(open_flags(false), FopenFlags::empty());
    }

    /// Each error reaches the application as the errno a local filesystem would give, and a
    /// store that does not answer as a timeout, not as "no such file".
    #[test]
    fn errors_reach_the_application_as_their_errno() {
        let store = |kind| FsError::Store(StoreError::new(kind, "test"));
        let cases = [
            (FsError::NotFound, libc::ENOENT),
            (FsError::Exists, libc::EEXIST),
            (FsError::NotEmpty, libc::ENOTEMPTY),
            (FsError::IsDir, libc::EISDIR),
            (FsError::NameTooLong("x".into()), libc::ENAMETOOLONG),
            (FsError::ReadOnly, libc::EROFS),
            (FsError::NotSupported("hard links"), libc::EOPNOTSUPP),
            (FsError::BadHandle, libc::EBADF),
            (FsError::Fenced("lease lost".into()), libc::EIO),
            (store(ErrorKind::NotFound), libc::ENOENT),
            (store(ErrorKind::AccessDenied), libc::EACCES),
            (store(ErrorKind::Timeout), libc::ETIMEDOUT),
            (store(ErrorKind::Unavailable), libc::EIO),
            (
                FsError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)),
                libc::ENOSPC,
            ),
        ];
        for (err, expected) in cases {
            assert_eq!(errno(&err), Errno::from_i32(expected), "{err:?}");
        }
    }
}
