//! A reference-model property test: random sequences of operations drive the filesystem logic
//! (without FUSE, on a memory store) and a plain in-memory POSIX tree side by side; every
//! result, errno included, and every read and listing must agree. The mount is its volume's one
//! writer with an fsync log; some cases end by losing the host (its runtime dropped mid-work,
//! its cache gone): a fresh mount folds the log, and every file fsynced and not changed since
//! must be in the store as it was fsynced.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use cairn_fs::attrs::Kind;
use cairn_fs::cache::Cache;
use cairn_fs::fs::{Filesystem, FsConfig, SetAttrs};
use cairn_fs::namespace::ROOT;
use cairn_fs::store::StoreExt;
use cairn_fs::store::memory::MemoryStore;
use proptest::prelude::*;

/// Paths the operations pick from: three names, two levels deep.
fn paths() -> Vec<String> {
    let names = ["a", "b", "c"];
    let mut all: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    for first in names {
        for second in names {
            all.push(format!("{first}/{second}"));
        }
    }
    all
}

#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Write {
        path: usize,
        offset: u64,
        len: usize,
        byte: u8,
        fsync: bool,
    },
    Truncate {
        path: usize,
        size: u64,
    },
    Read(usize),
    Unlink(usize),
    Mkdir(usize),
    Rmdir(usize),
    Rename {
        from: usize,
        to: usize,
        no_replace: bool,
    },
    List(usize),
    /// `cairn flush`: every change into the store.
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let path = 0..12usize;
    prop_oneof![
        3 => path.clone().prop_map(Op::Create),
        4 => (path.clone(), 0..3000u64, 1..2000usize, any::<u8>(), any::<bool>())
            .prop_map(|(path, offset, len, byte, fsync)| Op::Write { path, offset, len, byte, fsync }),
        2 => (path.clone(), 0..4000u64).prop_map(|(path, size)| Op::Truncate { path, size }),
        3 => path.clone().prop_map(Op::Read),
        2 => path.clone().prop_map(Op::Unlink),
        3 => path.clone().prop_map(Op::Mkdir),
        2 => path.clone().prop_map(Op::Rmdir),
        3 => (path.clone(), path.clone(), any::<bool>())
            .prop_map(|(from, to, no_replace)| Op::Rename { from, to, no_replace }),
        2 => (0..13usize).prop_map(Op::List),
        1 => Just(Op::Flush),
    ]
}

/// The bytes an `Op::Write` writes.
fn write_body(len: usize, byte: u8) -> Vec<u8> {
    (0..len).map(|i| byte.wrapping_add(i as u8)).collect()
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

/// The model: a map from path to node; the root is implicit.
#[derive(Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
    /// Files fsynced and not changed since: what the store must hold after losing the host.
    durable: BTreeMap<String, Vec<u8>>,
}

type Outcome = Result<Option<Vec<u8>>, i32>;

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

impl Model {
    fn node(&self, path: &str) -> Option<&Node> {
        if path.is_empty() {
            Some(&Node::Dir)
        } else {
            self.nodes.get(path)
        }
    }

    /// ENOENT or ENOTDIR if a directory on the way to `path` is missing or a file.
    fn walk_parent(&self, path: &str) -> Result<(), i32> {
        let mut at = String::new();
        for part in parent_of(path).split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            match self.nodes.get(&at) {
                None => return Err(libc::ENOENT),
                Some(Node::File(_)) => return Err(libc::ENOTDIR),
                Some(Node::Dir) => {}
            }
        }
        Ok(())
    }

    fn existing(&self, path: &str) -> Result<&Node, i32> {
        self.walk_parent(path)?;
        self.node(path).ok_or(libc::ENOENT)
    }

    fn file_mut(&mut self, path: &str) -> Result<&mut Vec<u8>, i32> {
        match self.existing(path)? {
            Node::Dir => Err(libc::EISDIR),
            Node::File(_) => match self.nodes.get_mut(path) {
                Some(Node::File(data)) => Ok(data),
                _ => unreachable!(),
            },
        }
    }

    fn children(&self, dir: &str) -> Vec<(String, bool)> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        self.nodes
            .iter()
            .filter(|(p, _)| {
                p.starts_with(&prefix) && !p[prefix.len()..].contains('/') && p.len() > prefix.len()
            })
            .map(|(p, n)| (p[prefix.len()..].to_string(), *n == Node::Dir))
            .collect()
    }

    /// Applies `op`, and keeps `durable` up to date.
    fn apply(&mut self, op: &Op, paths: &[String]) -> Outcome {
        let outcome = self.apply_to_tree(op, paths);
        if outcome.is_ok() {
            let changed: Vec<&String> = match op {
                Op::Create(p) | Op::Unlink(p) | Op::Truncate { path: p, .. } => vec![&paths[*p]],
                Op::Write { path, .. } => vec![&paths[*path]],
                Op::Rename { from, to, .. } => vec![&paths[*from], &paths[*to]],
                Op::Read(_) | Op::Mkdir(_) | Op::Rmdir(_) | Op::List(_) | Op::Flush => vec![],
            };
            for path in changed {
                let below = format!("{path}/");
                self.durable
                    .retain(|p, _| p != path && !p.starts_with(&below));
            }
            if let Op::Write {
                path, fsync: true, ..
            } = op
                && let Some(Node::File(data)) = self.nodes.get(&paths[*path])
            {
                self.durable.insert(paths[*path].clone(), data.clone());
            }
        }
        outcome
    }

    fn apply_to_tree(&mut self, op: &Op, paths: &[String]) -> Outcome {
        match op {
            Op::Create(p) => {
                let path = &paths[*p];
                self.walk_parent(path)?;
                if self.nodes.contains_key(path) {
                    return Err(libc::EEXIST);
                }
                self.nodes.insert(path.clone(), Node::File(Vec::new()));
                Ok(None)
            }
            Op::Write {
                path,
                offset,
                len,
                byte,
                ..
            } => {
                let data = self.file_mut(&paths[*path])?;
                let (offset, end) = (*offset as usize, *offset as usize + len);
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[offset..end].copy_from_slice(&write_body(*len, *byte));
                Ok(None)
            }
            Op::Truncate { path, size } => {
                self.file_mut(&paths[*path])?.resize(*size as usize, 0);
                Ok(None)
            }
            Op::Read(p) => Ok(Some(self.file_mut(&paths[*p])?.clone())),
            Op::Unlink(p) => {
                let path = &paths[*p];
                if *self.existing(path)? == Node::Dir {
                    return Err(libc::EISDIR);
                }
                self.nodes.remove(path);
                Ok(None)
            }
            Op::Mkdir(p) => {
                let path = &paths[*p];
                self.walk_parent(path)?;
                if self.nodes.contains_key(path) {
                    return Err(libc::EEXIST);
                }
                self.nodes.insert(path.clone(), Node::Dir);
                Ok(None)
            }
            Op::Rmdir(p) => {
                let path = &paths[*p];
                if let Node::File(_) = self.existing(path)? {
                    return Err(libc::ENOTDIR);
                }
                if !self.children(path).is_empty() {
                    return Err(libc::ENOTEMPTY);
                }
                self.nodes.remove(path);
                Ok(None)
            }
            Op::Rename {
                from,
                to,
                no_replace,
            } => {
                let (from, to) = (&paths[*from], &paths[*to]);
                let source = self.existing(from)?.clone();
                self.walk_parent(to)?;
                if from == to {
                    return Ok(None);
                }
                if let Some(target) = self.nodes.get(to) {
                    if *no_replace {
                        return Err(libc::EEXIST);
                    }
                    match (&source, target) {
                        (Node::Dir, Node::Dir) if !self.children(to).is_empty() => {
                            return Err(libc::ENOTEMPTY);
                        }
                        (Node::Dir, Node::File(_)) => return Err(libc::ENOTDIR),
                        (Node::File(_), Node::Dir) => return Err(libc::EISDIR),
                        _ => {}
                    }
                }
                if source == Node::Dir && to.starts_with(&format!("{from}/")) {
                    return Err(libc::EINVAL);
                }
                let moved: Vec<(String, Node)> = self
                    .nodes
                    .iter()
                    .filter(|(p, _)| *p == from || p.starts_with(&format!("{from}/")))
                    .map(|(p, n)| (format!("{to}{}", &p[from.len()..]), n.clone()))
                    .collect();
                self.nodes
                    .retain(|p, _| p != from && !p.starts_with(&format!("{from}/")) && p != to);
                self.nodes.extend(moved);
                Ok(None)
            }
            Op::Flush => Ok(None),
            Op::List(p) => {
                let path = if *p == 12 { "" } else { paths[*p].as_str() };
                match self.existing(path)? {
                    Node::File(_) => Err(libc::ENOTDIR),
                    Node::Dir => Ok(Some(listing(self.children(path)))),
                }
            }
        }
    }
}

/// A listing as comparable bytes: "name/" for directories, "name" for files, one per line.
fn listing(mut entries: Vec<(String, bool)>) -> Vec<u8> {
    entries.sort();
    entries
        .iter()
        .map(|(name, dir)| {
            if *dir {
                format!("{name}/\n")
            } else {
                format!("{name}\n")
            }
        })
        .collect::<String>()
        .into_bytes()
}

/// The filesystem under test, opened on a fresh memory store, with its fsync log in another
/// (the store root).
struct Subject {
    fs: Arc<Filesystem>,
    store: Arc<MemoryStore>,
    root: Arc<MemoryStore>,
    _cache: tempfile::TempDir,
}

impl Subject {
    /// Must be called inside the runtime: it starts the uploader. With no write-back delay the
    /// uploader races the operations; with one, changes mostly coalesce before they upload.
    fn new(writeback_delay: Duration) -> Subject {
        let subject = Self::over(
            Arc::new(MemoryStore::new()),
            Arc::new(MemoryStore::new()),
            writeback_delay,
        );
        subject.fs.start_uploader();
        subject
    }

    /// A mount of `store` on a fresh cache directory, the uploader not started.
    fn over(store: Arc<MemoryStore>, root: Arc<MemoryStore>, writeback_delay: Duration) -> Self {
        let cache_dir = tempfile::tempdir().unwrap();
        let config = FsConfig {
            metadata_ttl: Duration::from_secs(3600),
            writeback_delay,
            ..FsConfig::default()
        };
        let fs = Filesystem::new(
            store.clone(),
            Cache::open(cache_dir.path()).unwrap(),
            config,
        )
        .unwrap()
        .with_fsync_log(root.clone(), "v");
        Subject {
            fs: Arc::new(fs),
            store,
            root,
            _cache: cache_dir,
        }
    }

    async fn walk(&self, path: &str) -> Result<u64, i32> {
        let mut ino = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self
                .fs
                .lookup(ino, OsStr::new(part))
                .await
                .map_err(|e| e.errno())?
                .ino;
        }
        Ok(ino)
    }

    async fn split(&self, path: &str) -> Result<(u64, String), i32> {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        Ok((self.walk(parent).await?, name.to_string()))
    }

    async fn open_file(&self, path: &str, flags: i32) -> Result<u64, i32> {
        let ino = self.walk(path).await?;
        Ok(self.fs.open(ino, flags).await.map_err(|e| e.errno())?.fh)
    }

    /// Waits until every change is in the store, then reads the store back as a tree:
    /// directories (their markers) and files with their contents.
    async fn stored_tree(&self) -> BTreeMap<String, Node> {
        self.fs
            .drain(Some(Duration::from_secs(30)))
            .await
            .expect("the store takes every change");
        let listed = self.store.list_all("", false).await.unwrap();
        let mut tree = BTreeMap::new();
        for object in listed.objects {
            match object.key.strip_suffix('/') {
                Some(dir) => tree.insert(dir.to_string(), Node::Dir),
                None => {
                    let (_, body) = self.store.get_all(&object.key).await.unwrap();
                    tree.insert(object.key, Node::File(body.to_vec()))
                }
            };
        }
        tree
    }

    async fn read_all(&self, path: &str) -> Outcome {
        let errno = |e: cairn_fs::error::FsError| e.errno();
        let fh = self.open_file(path, libc::O_RDONLY).await?;
        let read = self.fs.read(fh, 0, 1 << 20).await.map_err(errno);
        self.fs.release(fh).await.map_err(errno)?;
        Ok(Some(read?.to_vec()))
    }

    async fn apply(&self, op: &Op, paths: &[String]) -> Outcome {
        let errno = |e: cairn_fs::error::FsError| e.errno();
        match op {
            Op::Create(p) => {
                let (parent, name) = self.split(&paths[*p]).await?;
                let flags = libc::O_CREAT | libc::O_EXCL | libc::O_RDWR;
                let (_, opened) = self
                    .fs
                    .create(parent, OsStr::new(&name), 0o644, 0o022, flags, 0, 0)
                    .await
                    .map_err(errno)?;
                self.fs.release(opened.fh).await.map_err(errno)?;
                Ok(None)
            }
            Op::Write {
                path,
                offset,
                len,
                byte,
                fsync,
            } => {
                let fh = self.open_file(&paths[*path], libc::O_RDWR).await?;
                let data = write_body(*len, *byte);
                let mut written = self.fs.write(fh, *offset, &data).await.map_err(errno);
                if *fsync && written.is_ok() {
                    written = self.fs.fsync(fh).await.map_err(errno).and(written);
                }
                self.fs.release(fh).await.map_err(errno)?;
                assert_eq!(written?, *len as u32);
                Ok(None)
            }
            Op::Truncate { path, size } => {
                let ino = self.walk(&paths[*path]).await?;
                let changes = SetAttrs {
                    size: Some(*size),
                    ..SetAttrs::default()
                };
                self.fs.setattr(ino, changes).await.map_err(errno)?;
                Ok(None)
            }
            Op::Read(p) => self.read_all(&paths[*p]).await,
            Op::Unlink(p) => {
                let (parent, name) = self.split(&paths[*p]).await?;
                self.fs
                    .unlink(parent, OsStr::new(&name))
                    .await
                    .map_err(errno)?;
                Ok(None)
            }
            Op::Mkdir(p) => {
                let (parent, name) = self.split(&paths[*p]).await?;
                self.fs
                    .mkdir(parent, OsStr::new(&name), 0o755, 0o022, 0, 0)
                    .await
                    .map_err(errno)?;
                Ok(None)
            }
            Op::Rmdir(p) => {
                let (parent, name) = self.split(&paths[*p]).await?;
                self.fs
                    .rmdir(parent, OsStr::new(&name))
                    .await
                    .map_err(errno)?;
                Ok(None)
            }
            Op::Rename {
                from,
                to,
                no_replace,
            } => {
                let (from_parent, from_name) = self.split(&paths[*from]).await?;
                // The kernel looks the source up before the target's parent.
                self.fs
                    .lookup(from_parent, OsStr::new(&from_name))
                    .await
                    .map_err(errno)?;
                let (to_parent, to_name) = self.split(&paths[*to]).await?;
                self.fs
                    .rename(
                        from_parent,
                        OsStr::new(&from_name),
                        to_parent,
                        OsStr::new(&to_name),
                        *no_replace,
                    )
                    .await
                    .map_err(errno)?;
                Ok(None)
            }
            Op::Flush => {
                self.fs
                    .drain(Some(Duration::from_secs(30)))
                    .await
                    .map_err(errno)?;
                Ok(None)
            }
            Op::List(p) => {
                let path = if *p == 12 { "" } else { paths[*p].as_str() };
                let ino = self.walk(path).await?;
                let fh = self.fs.opendir(ino).await.map_err(errno)?;
                let entries = self.fs.readdir(fh, 2).await.map_err(errno)?;
                self.fs.releasedir(fh);
                let entries = entries
                    .into_iter()
                    .map(|e| (e.name, e.attr.kind == Kind::Dir))
                    .collect();
                Ok(Some(listing(entries)))
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_filesystem_behaves_like_a_posix_tree(
        ops in proptest::collection::vec(op(), 1..50),
        delay_ms in prop_oneof![Just(0u64), Just(2000u64)],
        lose_the_host in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let paths = paths();
        let subject = {
            let _inside = runtime.enter();
            Subject::new(Duration::from_millis(delay_ms))
        };
        let mut model = Model::default();
        for (step, op) in ops.iter().enumerate() {
            let expected = model.apply(op, &paths);
            let actual = runtime.block_on(subject.apply(op, &paths));
            prop_assert_eq!(&actual, &expected, "step {} {:?}", step, op);
        }
        if lose_the_host {
            // The host is gone mid-work: its tasks stop where they are, its cache is lost. The
            // next mount folds the log; what was fsynced and not changed since is in the store.
            let (store, root) = (subject.store.clone(), subject.root.clone());
            drop(subject);
            runtime.shutdown_background();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let next = Subject::over(store.clone(), root, Duration::from_millis(delay_ms));
            runtime.block_on(next.fs.fold_fsync_log()).expect("the log folds");
            for (path, data) in &model.durable {
                let stored = runtime.block_on(store.get_all(path)).map(|(_, body)| body.to_vec());
                prop_assert_eq!(stored.ok(), Some(data.clone()), "{} as fsynced", path);
            }
            return Ok(());
        }
        // At the end, every file reads back as the model has it.
        for (path, node) in &model.nodes {
            if let Node::File(data) = node {
                let read = runtime.block_on(subject.read_all(path));
                prop_assert_eq!(read, Ok(Some(data.clone())), "final contents of {}", path);
            }
        }
        // And once the uploader has applied every change, the store holds the same tree.
        let stored = runtime.block_on(subject.stored_tree());
        prop_assert_eq!(stored, model.nodes);
    }
}
